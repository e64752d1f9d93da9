//! Webhooks: the channel (signed JSON per event type), a JSON gateway for SMS, and the SSRF guard.

use serde_json::{json, Value};
use wiremock::matchers::{header_exists, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{spawn_app_with, TestApp, TestOptions};

/// The `[webhook]` section (secret, whether loopback targets are allowed, endpoints).
fn hooks(secret: &str, allow_internal: bool, endpoints: &str) -> String {
    format!(
        "[webhook]\nsecret = \"{secret}\"\nallow_internal_targets = {allow_internal}\ntimeout_ms = 2000\nmax_response_bytes = 1024\n[webhook.endpoints]\n{endpoints}\n"
    )
}

async fn app_with(toml: String) -> TestApp {
    spawn_app_with(TestOptions {
        config_toml: Some(toml),
        ..Default::default()
    })
    .await
}

async fn order_shipped(app: &TestApp) -> Value {
    app.put_user(
        "w1",
        json!({"email": "w1@example.com", "phone": "+4915100000001", "first_name": "W"}),
    )
    .await;
    let (status, body) = app
        .post_event(&json!({"event_type": "order_shipped", "channels": ["webhook"], "recipients": {"user_ids": ["w1"]}, "payload": {"order": "A-17"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["notification_id"].as_str().expect("id").to_owned();
    app.wait_finished(&id, 20).await;
    let did = app.deliveries(&id).await[0]["delivery_id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.get(&format!("/v1/deliveries/{did}")).await.1
}

/// A signed request: its headers and body.
pub(crate) type Signed = (Vec<(String, String)>, Vec<u8>);

/// What a receiver got, as a [`Signed`].
pub(crate) fn signed(r: &wiremock::Request) -> Signed {
    let headers = r
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    (headers, r.body.clone())
}

/// Whether the Standard Webhooks reference library (Python's `standardwebhooks`, not
/// herald's code) verifies every request with `secret`; `None` without the checker.
pub(crate) fn verified_by_the_reference_library(
    secret: &str,
    requests: &[Signed],
) -> Option<Result<(), String>> {
    use base64::Engine as _;
    use std::io::Write as _;
    let python = crate::helpers::python_checker("standardwebhooks")?;
    let batch: Vec<Value> = requests
        .iter()
        .map(|(headers, body)| {
            let headers: serde_json::Map<String, Value> =
                headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({"headers": headers,
                   "body": base64::engine::general_purpose::STANDARD.encode(body)})
        })
        .collect();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhooks/verify.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .arg(secret)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(json!(batch).to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("verify.py ends");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(said)
    })
}

#[tokio::test]
async fn the_webhook_channel_posts_standard_webhooks_signed_json_to_the_event_types_url() {
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks/orders"))
        .and(header_exists("webhook-signature"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&receiver)
        .await;
    let secret = herald::domain::standard_webhooks::SigningKey::generate().to_text();
    let app = app_with(hooks(
        &secret,
        true,
        &format!("order_shipped = \"{}/hooks/orders\"", receiver.uri()),
    ))
    .await;
    let d = order_shipped(&app).await;
    assert_eq!(d["status"], "sent", "{d}");
    let requests = receiver.received_requests().await.expect("recorded");
    let r = &requests[0];
    let body: Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(
        body,
        json!({"order": "A-17", "user": "w1", "event": "order_shipped"})
    );
    let header = |n: &str| {
        r.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    // The delivery's id is the message id (stable across its retries: receivers
    // de-duplicate on it), and the reference verifier accepts the signature.
    assert_eq!(
        header("webhook-id"),
        d["delivery_id"].as_str().unwrap_or_default()
    );
    let got: Vec<Signed> = requests.iter().map(signed).collect();
    if let Some(verdict) = verified_by_the_reference_library(&secret, &got) {
        assert_eq!(verdict, Ok(()));
        let other = herald::domain::standard_webhooks::SigningKey::generate().to_text();
        assert!(
            verified_by_the_reference_library(&other, &got).is_some_and(|v| v.is_err()),
            "another secret does not verify"
        );
    }
    // The earlier scheme's headers still come, for receivers built on them.
    let ts: i64 = header("x-herald-timestamp").parse().expect("timestamp");
    assert_eq!(header("webhook-timestamp"), ts.to_string());
    assert_eq!(
        header("x-herald-signature"),
        herald::channels::http::signature(&secret, ts, &r.body),
    );
    app.stop().await;
}

#[tokio::test]
async fn internal_targets_are_refused_and_redirects_not_followed() {
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .expect(0)
        .mount(&receiver)
        .await;
    let app = app_with(hooks(
        "",
        false,
        &format!("order_shipped = \"{}/hooks/orders\"", receiver.uri()),
    ))
    .await;
    let d = order_shipped(&app).await;
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("failed"), Some("provider_rejected")),
        "{d}"
    );
    assert!(
        d["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("internal address")),
        "{d}"
    );
    app.stop().await;

    let redirecting = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(302).insert_header("location", "http://169.254.169.254/latest"),
        )
        .mount(&redirecting)
        .await;
    let app = app_with(hooks(
        "",
        true,
        &format!("order_shipped = \"{}/hooks\"", redirecting.uri()),
    ))
    .await;
    let d = order_shipped(&app).await;
    assert_eq!(d["status"], "failed");
    assert!(
        d["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("redirects are not followed")),
        "{d}"
    );
    assert_eq!(
        redirecting.received_requests().await.map(|r| r.len()),
        Some(1)
    );
    app.stop().await;
}

/// Sends one SMS to a fresh user through the configured gateway; returns the request
/// the gateway received and its JSON body.
async fn sms_through(
    app: &TestApp,
    gateway: &MockServer,
    note: &str,
) -> (wiremock::Request, Value) {
    app.put_user("w1", json!({"phone": "+4915100000001", "first_name": "W"}))
        .await;
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["sms"], "recipients": {"user_ids": ["w1"]}, "payload": {"note": note}}))
        .await;
    let n = app
        .wait_finished(body["notification_id"].as_str().expect("id"), 20)
        .await;
    assert_eq!(n["counts"]["sent"], 1, "{n}");
    let r = gateway
        .received_requests()
        .await
        .expect("recorded")
        .remove(0);
    let sent: Value = serde_json::from_slice(&r.body).expect("json");
    (r, sent)
}

#[tokio::test]
async fn a_json_gateway_provider_carries_sms_for_any_other_service() {
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "g-1"})))
        .expect(1)
        .mount(&gateway)
        .await;
    let gateway_toml = format!(
        "[sms]\nrecord_dir = \"unused\"\n[[sms.providers]]\nname = \"gateway\"\nkind = \"webhook\"\nurl = \"{}/sms\"\nheaders = {{ authorization = \"Bearer gw-key\" }}\n",
        gateway.uri()
    );
    let app = app_with(hooks("", true, "") + &gateway_toml).await;
    let (r, sent) = sms_through(&app, &gateway, "gw").await;
    assert_eq!(sent["channel"], "sms");
    assert_eq!(sent["to"], json!(["+4915100000001"]));
    assert_eq!(sent["text"], "SMS for W: gw");
    assert_eq!(
        r.headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer gw-key")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_gateway_body_template_shapes_the_request() {
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/send"))
        .respond_with(ResponseTemplate::new(202))
        .expect(1)
        .mount(&gateway)
        .await;
    let gateway_toml = format!(
        "[sms]\nrecord_dir = \"unused\"\n[[sms.providers]]\nname = \"legacy\"\nkind = \"webhook\"\nurl = \"{}/send\"\nbody_template = '{{\"msisdn\": \"{{{{to.[0]}}}}\", \"message\": \"{{{{text}}}}\", \"ref\": \"{{{{delivery_id}}}}\"}}'\n",
        gateway.uri()
    );
    let app = app_with(hooks("", true, "") + &gateway_toml).await;
    let (_, sent) = sms_through(&app, &gateway, "tpl").await;
    assert_eq!(sent["msisdn"], "+4915100000001");
    assert_eq!(sent["message"], "SMS for W: tpl");
    assert!(sent["ref"].as_str().is_some_and(|r| !r.is_empty()));
    app.stop().await;
}

#[tokio::test]
async fn status_webhook_endpoints_show_their_secret_once_refuse_bad_input_and_rotate_with_overlap()
{
    let app = spawn_app_with(TestOptions::default()).await;
    let count = || app.count("webhook_endpoints");
    // Refused, naming the field, and nothing written.
    for (body, field) in [
        (json!({"events": ["message.sent"]}), "url"),
        (
            json!({"url": "ftp://example.com/x", "events": ["message.sent"]}),
            "url",
        ),
        (
            json!({"url": "http://127.0.0.1:9/hook", "events": ["message.sent"]}),
            "url",
        ),
        (
            json!({"url": "https://example.com/hook", "events": []}),
            "events",
        ),
        (
            json!({"url": "https://example.com/hook", "events": ["message.nope"]}),
            "events",
        ),
        (
            json!({"url": "https://example.com/hook", "events": ["message.sent"], "colour": 1}),
            "colour",
        ),
        (
            json!({"url": "https://example.com/hook", "events": ["message.sent"], "description": "x".repeat(201)}),
            "description",
        ),
    ] {
        let (s, b) = app.post("/v1/webhook-endpoints", &body).await;
        assert_eq!(s, 422, "{body}: {b}");
        assert!(
            b["error"]["details"]
                .as_array()
                .expect("details")
                .iter()
                .any(|d| d["field"] == field),
            "{body}: {b}"
        );
    }
    assert_eq!(count().await, 0);

    let (s, made) = app
        .post(
            "/v1/webhook-endpoints",
            &json!({"url": "https://example.com/hooks/herald", "events": ["message.delivered", "message.delivered"],
                    "description": "billing"}),
        )
        .await;
    assert_eq!(s, 201, "{made}");
    let id = made["id"].as_str().expect("id").to_owned();
    let first = made["secret"]
        .as_str()
        .expect("secret shown once")
        .to_owned();
    assert!(first.starts_with("whsec_"), "{first}");
    assert_eq!(made["events"], json!(["message.delivered"]));
    assert_eq!(
        (made["enabled"].as_bool(), made["include_contact"].as_bool()),
        (Some(true), Some(false))
    );
    let (_, shown) = app.get(&format!("/v1/webhook-endpoints/{id}")).await;
    assert!(shown.get("secret").is_none(), "never shown again: {shown}");
    let (_, all) = app.get("/v1/webhook-endpoints").await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(1));
    assert!(all["items"][0].get("secret").is_none());

    let (s, changed) = app
        .patch(
            &format!("/v1/webhook-endpoints/{id}"),
            &json!({"events": ["message.sent", "message.bounced"], "enabled": false}),
        )
        .await;
    assert_eq!(s, 200, "{changed}");
    assert_eq!(
        changed["events"],
        json!(["message.sent", "message.bounced"])
    );
    assert_eq!(changed["enabled"], false);
    let (s, _) = app
        .patch(
            &format!("/v1/webhook-endpoints/{id}"),
            &json!({"url": "http://10.0.0.1/x"}),
        )
        .await;
    assert_eq!(s, 422);

    // Rotation: a new secret, shown once; both sign for a day, each verifiable by the
    // Standard Webhooks library.
    let (s, rotated) = app
        .post(
            &format!("/v1/webhook-endpoints/{id}/rotate-secret"),
            &json!({}),
        )
        .await;
    assert_eq!(s, 200, "{rotated}");
    let second = rotated["secret"].as_str().expect("new secret").to_owned();
    assert_ne!(first, second);
    assert!(
        rotated["previous_secret_expires_at"].is_string(),
        "{rotated}"
    );
    let stored = app
        .ctx
        .store
        .endpoint(&id)
        .await
        .expect("read")
        .expect("endpoint");
    let signing = stored.signing_secrets(mongodb::bson::DateTime::now());
    assert_eq!(signing, [second.as_str(), first.as_str()]);
    let keys: Vec<_> = signing
        .iter()
        .map(|s| herald::domain::standard_webhooks::SigningKey::parse(s).expect("key"))
        .collect();
    let body = br#"{"type":"message.sent","timestamp":"2026-12-05T00:00:00Z","data":{}}"#;
    let ts = chrono::Utc::now().timestamp();
    let headers = herald::domain::standard_webhooks::headers(&keys, "msg_rotation", ts, body);
    assert_eq!(headers[2].1.split(' ').count(), 2, "two signatures");
    let request: Signed = (
        headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        body.to_vec(),
    );
    for secret in [&first, &second] {
        if let Some(verdict) =
            verified_by_the_reference_library(secret, std::slice::from_ref(&request))
        {
            assert_eq!(verdict, Ok(()), "either secret verifies during the overlap");
        }
    }

    // The scope: webhooks:write (or admin), nothing less.
    for (scopes, status) in [
        (vec![herald::domain::Scope::LogsRead], 403),
        (vec![herald::domain::Scope::WebhooksWrite], 200),
    ] {
        let (_, key) = app
            .ctx
            .store
            .create_key("hooks", &scopes, None)
            .await
            .expect("key");
        let r = crate::helpers::client_with_key(&key)
            .get(app.url("/v1/webhook-endpoints"))
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status().as_u16(), status, "{scopes:?}");
    }
    assert_eq!(
        app.delete(&format!("/v1/webhook-endpoints/{id}")).await,
        204
    );
    assert_eq!(app.get(&format!("/v1/webhook-endpoints/{id}")).await.0, 404);
    app.stop().await;
}
