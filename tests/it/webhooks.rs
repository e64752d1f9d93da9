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

/// Whether the Standard Webhooks reference library (Python's `standardwebhooks`, not
/// herald's code) verifies every request with `secret`; `None` without the checker.
fn verified_by_the_reference_library(
    secret: &str,
    requests: &[wiremock::Request],
) -> Option<Result<(), String>> {
    use base64::Engine as _;
    use std::io::Write as _;
    let python = crate::helpers::python_checker("standardwebhooks")?;
    let batch: Vec<Value> = requests
        .iter()
        .map(|r| {
            let headers: serde_json::Map<String, Value> = r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
                .collect();
            json!({"headers": headers,
                   "body": base64::engine::general_purpose::STANDARD.encode(&r.body)})
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
    if let Some(verdict) = verified_by_the_reference_library(&secret, &requests) {
        assert_eq!(verdict, Ok(()));
        let other = herald::domain::standard_webhooks::SigningKey::generate().to_text();
        assert!(
            verified_by_the_reference_library(&other, &requests).is_some_and(|v| v.is_err()),
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
