//! Amazon SES (through SNS) and SendGrid feedback, signed as the providers sign it: SNS
//! messages with a test key whose certificate a loopback HTTP server serves (each checked
//! first by a third-party SNS validator), SendGrid batches with a test ECDSA key (checked
//! first by SendGrid's own library).

use std::path::Path;

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::feedback::{delivery, send};
use crate::helpers::*;

const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:herald-ses";
const TOOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/feedback/providers.py");

/// Runs the providers' signing tool; `None` when no Python with its libraries is set.
fn tool(args: &[&str]) -> Option<String> {
    let python = python_checker("the providers' signing libraries")?;
    let out = std::process::Command::new(python)
        .arg(TOOL)
        .args(args)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// An SNS message of `kind` carrying `message`, to be signed.
fn sns(kind: &str, id: &str, message: &Value, version: &str, cert_url: &str) -> Value {
    let mut m = json!({
        "Type": kind, "MessageId": id, "TopicArn": TOPIC,
        "Message": message.as_str().map_or_else(|| message.to_string(), str::to_owned),
        "Timestamp": "2026-12-05T12:00:00.000Z", "SignatureVersion": version,
        "Signature": "", "SigningCertURL": cert_url,
    });
    if kind == "SubscriptionConfirmation" {
        m["Token"] = json!("2336412f37fb687f5d51e6e2425c464de");
        m["SubscribeURL"] = json!(format!(
            "{}/confirm?Action=ConfirmSubscription&Token=2336412f",
            cert_url.trim_end_matches("/SimpleNotificationService-0123456789abcdef.pem")
        ));
    }
    m
}

fn sign_sns(dir: &Path, messages: &[Value]) -> Vec<Value> {
    let signed = tool(&[
        "sns-sign",
        dir.to_str().expect("dir"),
        &Value::Array(messages.to_vec()).to_string(),
    ])
    .expect("checked by the caller");
    serde_json::from_str(&signed).expect("signed messages")
}

async fn post_sns(app: &TestApp, m: &Value) -> (u16, Value) {
    // SNS posts JSON as text/plain.
    answer(
        reqwest::Client::new()
            .post(app.url("/v1/feedback/ses"))
            .header("content-type", "text/plain; charset=UTF-8")
            .header("x-amz-sns-message-type", m["Type"].as_str().unwrap_or(""))
            .body(m.to_string()),
    )
    .await
}

/// SES's notification about a message herald sent from `source` with `message_id`.
fn ses(kind: &str, source: &str, message_id: &str, body: Value) -> Value {
    let mut n = json!({
        "notificationType": kind,
        "mail": {"timestamp": "2026-12-05T12:00:00.000Z", "messageId": "0100019abc-ses",
                 "source": source, "destination": ["one@example.com"],
                 "commonHeaders": {"from": ["herald@localhost"], "to": ["one@example.com"],
                                   "messageId": message_id, "subject": "Hello"}},
    });
    let field = match kind {
        "Bounce" => "bounce",
        "Complaint" => "complaint",
        _ => "delivery",
    };
    n[field] = body;
    n
}

fn permanent_bounce(addresses: &[&str]) -> Value {
    json!({"bounceType": "Permanent", "bounceSubType": "General", "feedbackId": "f1",
           "timestamp": "2026-12-05T12:00:01.000Z",
           "bouncedRecipients": addresses.iter().map(|a| json!({"emailAddress": a,
               "action": "failed", "status": "5.1.1",
               "diagnosticCode": "smtp; 550 5.1.1 user unknown"})).collect::<Vec<_>>()})
}

#[tokio::test]
async fn ses_notifications_through_sns_are_verified_confirmed_and_applied() {
    let dir = tempdir();
    if tool(&["sns-keygen", dir.to_str().expect("dir")]).is_none() {
        return;
    }
    let certs = MockServer::start().await;
    let pem = std::fs::read(dir.join("sns-cert.pem")).expect("cert");
    Mock::given(method("GET"))
        .and(path("/SimpleNotificationService-0123456789abcdef.pem"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(pem))
        .mount(&certs)
        .await;
    Mock::given(method("GET"))
        .and(path("/confirm"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<ConfirmSubscriptionResponse/>"))
        .expect(1)
        .mount(&certs)
        .await;
    let cert_url = format!(
        "{}/SimpleNotificationService-0123456789abcdef.pem",
        certs.uri()
    );
    let app = spawn_app_with(TestOptions {
        env: vec![(
            "HERALD__EMAIL__RETURN_PATH".into(),
            "bounces+{delivery_id}@example.com".into(),
        )],
        config_toml: Some(format!(
            "[feedback.ses]\ntopic_arns = [\"{TOPIC}\"]\ncert_hosts = [\"127.0.0.1\"]\n"
        )),
        ..TestOptions::default()
    })
    .await;
    app.put_ana().await;
    let d = send(&app, "email").await;
    let id = d["delivery_id"].as_str().expect("id").to_owned();
    let verp = format!("bounces+{id}@example.com");

    // The subscription is confirmed at its SubscribeURL (the mock expects one GET).
    let confirm = sns(
        "SubscriptionConfirmation",
        "m-sub",
        &json!("You have chosen to subscribe"),
        "1",
        &cert_url,
    );
    let [confirm] = sign_sns(&dir, &[confirm]).try_into().expect("one");
    let (status, body) = post_sns(&app, &confirm).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (200, Some("confirmed")),
        "{body}"
    );

    // A hard bounce naming two recipients, signed with version 2 (SHA-256), matched by
    // the VERP return path.
    let bounce = ses(
        "Bounce",
        &verp,
        "<elsewhere@example.com>",
        permanent_bounce(&["one@example.com", "two@example.com"]),
    );
    let bounce = sns("Notification", "m-bounce", &bounce, "2", &cert_url);
    let [bounce] = sign_sns(&dir, &[bounce]).try_into().expect("one");

    // Refused, nothing written: an altered message, another topic, a certificate
    // elsewhere, a garbled signature, a body that is not an SNS message.
    let mut altered = bounce.clone();
    altered["Message"] = json!(altered["Message"]
        .as_str()
        .expect("text")
        .replace("two@", "six@"));
    assert_eq!(post_sns(&app, &altered).await.0, 403);
    let mut other_topic = bounce.clone();
    other_topic["TopicArn"] = json!("arn:aws:sns:us-east-1:999999999999:other");
    let (status, body) = post_sns(&app, &other_topic).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("topic_not_allowed")),
        "{body}"
    );
    let mut elsewhere = bounce.clone();
    elsewhere["SigningCertURL"] = json!(cert_url.replace("127.0.0.1", "localhost"));
    let (status, body) = post_sns(&app, &elsewhere).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("host_not_allowed")),
        "{body}"
    );
    let mut garbled = bounce.clone();
    garbled["Signature"] = json!("bm90IGEgc2lnbmF0dXJl");
    let (status, body) = post_sns(&app, &garbled).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("signature_invalid")),
        "{body}"
    );
    let (status, body) = answer(
        reqwest::Client::new()
            .post(app.url("/v1/feedback/ses"))
            .body("{}"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("not_an_sns_message")),
        "{body}"
    );
    assert_eq!(delivery(&app, &id).await["status"], "sent");

    let (status, body) = post_sns(&app, &bounce).await;
    assert_eq!(
        (status, body["delivery_id"].as_str()),
        (200, Some(id.as_str())),
        "{body}"
    );
    let detail = delivery(&app, &id).await;
    assert_eq!(
        (detail["status"].as_str(), detail["reason"].as_str()),
        (Some("bounced"), Some("hard_bounce")),
        "{detail}"
    );
    assert_eq!(
        detail["feedback"].as_array().map(Vec::len),
        Some(2),
        "one entry per recipient: {detail}"
    );
    for address in ["one@example.com", "two@example.com"] {
        let (_, s) = app
            .get(&format!("/v1/suppressions?channel=email&address={address}"))
            .await;
        assert_eq!(s["items"][0]["reason"], "hard_bounce", "{s}");
    }
    // SNS retries a message with its MessageId: applied once.
    let (status, body) = post_sns(&app, &bounce).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (200, Some("duplicate")),
        "{body}"
    );
    assert_eq!(
        delivery(&app, &id).await["feedback"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // The next email to the address is suppressed.
    assert_eq!(send(&app, "email").await["reason"], "suppressed");

    // Another delivery, matched by its Message-ID (no VERP): delivered, then a late soft
    // bounce changes nothing, then a complaint marks it and suppresses the address.
    assert_eq!(
        app.delete("/v1/suppressions/email/one@example.com").await,
        204
    );
    let second = send(&app, "email").await["delivery_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let message_id = format!("<{second}@localhost>");
    let recipients = json!({"timestamp": "2026-12-05T12:00:02.000Z", "processingTimeMillis": 500,
                            "recipients": ["one@example.com"], "smtpResponse": "250 2.6.0 Message received"});
    let transient = json!({"bounceType": "Transient", "bounceSubType": "MailboxFull",
                           "bouncedRecipients": [{"emailAddress": "one@example.com"}]});
    let complaint = json!({"complainedRecipients": [{"emailAddress": "one@example.com"}],
                           "complaintFeedbackType": "abuse", "feedbackId": "f2"});
    let signed = sign_sns(
        &dir,
        &[
            sns(
                "Notification",
                "m-delivery",
                &ses("Delivery", "herald@localhost", &message_id, recipients),
                "1",
                &cert_url,
            ),
            sns(
                "Notification",
                "m-transient",
                &ses("Bounce", "herald@localhost", &message_id, transient),
                "1",
                &cert_url,
            ),
            sns(
                "Notification",
                "m-complaint",
                &ses("Complaint", "herald@localhost", &message_id, complaint),
                "2",
                &cert_url,
            ),
            sns(
                "Notification",
                "m-unknown",
                &ses(
                    "Delivery",
                    "herald@localhost",
                    "<nobody@localhost>",
                    json!({"recipients": ["x@example.com"]}),
                ),
                "1",
                &cert_url,
            ),
        ],
    );
    // The live stream shows the status feedback sets.
    let mut stream = crate::logs::SseReader::open(&app, "channel=email", None).await;
    assert_eq!(post_sns(&app, &signed[0]).await.0, 200);
    let (_, change) = stream.delivery(20).await;
    assert_eq!(
        (change["delivery_id"].as_str(), change["status"].as_str()),
        (Some(second.as_str()), Some("delivered")),
        "{change}"
    );
    assert_eq!(delivery(&app, &second).await["status"], "delivered");
    assert_eq!(post_sns(&app, &signed[1]).await.0, 200);
    let detail = delivery(&app, &second).await;
    assert_eq!(detail["status"], "delivered", "{detail}");
    assert_eq!(detail["feedback"][1]["kind"], "deferred", "{detail}");
    drop(stream);
    assert_eq!(post_sns(&app, &signed[2]).await.0, 200);
    let detail = delivery(&app, &second).await;
    assert_eq!(detail["status"], "delivered", "{detail}");
    assert!(detail["complained_at"].is_string(), "{detail}");
    let (_, s) = app
        .get("/v1/suppressions?channel=email&address=one@example.com")
        .await;
    assert_eq!(s["items"][0]["reason"], "complaint", "{s}");
    // Feedback for a message herald never sent: kept as unmatched, for operators.
    let (status, body) = post_sns(&app, &signed[3]).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (202, Some("unmatched")),
        "{body}"
    );
    let (_, unmatched) = app.get("/v1/feedback").await;
    assert_eq!(unmatched["items"][0]["provider"], "ses", "{unmatched}");
    assert_eq!(
        unmatched["items"][0]["target"], "<nobody@localhost>",
        "{unmatched}"
    );

    // The statistics count the bounce and the complaint.
    let (_, stats) = app.get("/v1/stats/deliveries").await;
    let email = &stats["channels"]["email"];
    assert_eq!(
        (email["bounced"].as_i64(), email["complained"].as_i64()),
        (Some(1), Some(1)),
        "{stats}"
    );
    assert!(
        email["complaint_rate"].as_f64().is_some_and(|r| r > 0.0),
        "{stats}"
    );
    assert_eq!(email["providers"]["smtp"]["complained"], 1, "{stats}");
    // So does /metrics: each event by its result, and the statuses feedback moved to.
    app.assert_metrics(&[
        r#"herald_feedback_events_total{provider="ses",kind="bounced",result="applied"} 2"#,
        r#"herald_feedback_events_total{provider="ses",kind="bounced",result="duplicate"} 2"#,
        r#"herald_feedback_events_total{provider="ses",kind="delivered",result="unmatched"} 1"#,
        r#"herald_deliveries_total{channel="email",status="bounced",provider="smtp"} 1"#,
        r#"herald_deliveries_total{channel="email",status="delivered",provider="smtp"} 1"#,
    ])
    .await;
    app.stop().await;
    certs.verify().await;
}

async fn post_sendgrid(
    app: &TestApp,
    body: &str,
    timestamp: &str,
    signature: Option<&str>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(app.url("/v1/feedback/sendgrid"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(s) = signature {
        request = request
            .header("X-Twilio-Email-Event-Webhook-Signature", s)
            .header("X-Twilio-Email-Event-Webhook-Timestamp", timestamp);
    }
    answer(request).await
}

#[tokio::test]
async fn sendgrid_event_batches_are_verified_and_applied_once_each() {
    let dir = tempdir();
    let Some(public_key) = tool(&["sendgrid-keygen", dir.to_str().expect("dir")]) else {
        return;
    };
    let app = spawn_app_with(TestOptions {
        config_toml: Some(format!(
            "[feedback.sendgrid]\npublic_key = \"{public_key}\"\n"
        )),
        ..TestOptions::default()
    })
    .await;
    app.put_ana().await;
    let id = send(&app, "email").await["delivery_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let smtp_id = format!("<{id}@localhost>");
    let event = |event: &str, sg_event_id: &str, extra: Value| {
        let mut e = json!({"email": "one@example.com", "timestamp": 1_796_000_000, "event": event,
                           "sg_event_id": sg_event_id, "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
                           "smtp-id": smtp_id});
        if let (Some(e), Some(extra)) = (e.as_object_mut(), extra.as_object()) {
            e.extend(extra.clone());
        }
        e
    };
    let sign = |body: &str, ts: &str| {
        tool(&["sendgrid-sign", dir.to_str().expect("dir"), ts, body]).expect("tool")
    };

    let first = json!([
        event("processed", "e-processed", json!({})),
        event("delivered", "e-delivered", json!({"response": "250 OK"})),
        event(
            "bounce",
            "e-blocked",
            json!({"type": "blocked", "status": "4.0.0", "reason": "try later"})
        )
    ])
    .to_string();
    let ts = "1796000000";
    let signature = sign(&first, ts);
    // No signature, or one over another body or timestamp: refused, nothing written.
    assert_eq!(post_sendgrid(&app, &first, ts, None).await.0, 401);
    assert_eq!(
        post_sendgrid(&app, &first, "1796000001", Some(&signature))
            .await
            .0,
        403
    );
    let (status, body) = post_sendgrid(
        &app,
        &first.replace("delivered", "dropped"),
        ts,
        Some(&signature),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("signature_invalid")),
        "{body}"
    );
    assert_eq!(delivery(&app, &id).await["status"], "sent");

    let (status, body) = post_sendgrid(&app, &first, ts, Some(&signature)).await;
    assert_eq!(status, 200, "{body}");
    let detail = delivery(&app, &id).await;
    assert_eq!(detail["status"], "delivered", "{detail}");
    let kinds: Vec<&str> = detail["feedback"]
        .as_array()
        .expect("feedback")
        .iter()
        .filter_map(|f| f["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["delivered", "deferred"],
        "a blocked bounce is soft: {detail}"
    );
    // A replay changes nothing.
    let (status, body) = post_sendgrid(&app, &first, ts, Some(&signature)).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (200, Some("duplicate")),
        "{body}"
    );

    // A hard bounce after `delivered` wins; a spam report marks the delivery; both suppress.
    let second = json!([
        event(
            "bounce",
            "e-bounce",
            json!({"type": "bounce", "status": "5.1.1", "reason": "550 unknown user"})
        ),
        event("spamreport", "e-spam", json!({}))
    ])
    .to_string();
    let (status, body) = post_sendgrid(&app, &second, ts, Some(&sign(&second, ts))).await;
    assert_eq!(status, 200, "{body}");
    let detail = delivery(&app, &id).await;
    assert_eq!(
        (detail["status"].as_str(), detail["reason"].as_str()),
        (Some("bounced"), Some("hard_bounce")),
        "{detail}"
    );
    assert!(detail["complained_at"].is_string(), "{detail}");
    let (_, s) = app
        .get("/v1/suppressions?channel=email&address=one@example.com")
        .await;
    assert!(
        s["items"][0]["reason"]
            .as_str()
            .is_some_and(|r| r == "hard_bounce" || r == "complaint"),
        "{s}"
    );
    // A batch whose event lacks its id: a clear 422, nothing applied.
    let bad = json!([{"event": "delivered", "email": "x@example.com"}]).to_string();
    let (status, body) = post_sendgrid(&app, &bad, ts, Some(&sign(&bad, ts))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("not_sendgrid_events")),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn feedback_endpoints_of_unconfigured_providers_refuse_everything() {
    let app = spawn_app().await;
    let (status, body) = post_sendgrid(&app, "[]", "1", Some("c2ln")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("provider_not_configured")),
        "{body}"
    );
    let m = sns(
        "Notification",
        "m",
        &json!("{}"),
        "1",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-01.pem",
    );
    let (status, body) = post_sns(&app, &m).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("topic_not_allowed")),
        "{body}"
    );
    app.stop().await;
}
