//! What the providers report after `sent`, through their own authentication: Twilio's
//! signed status callbacks (signed here by Twilio's own Python library) and RFC 3464
//! delivery status notifications in the shapes Postfix and Gmail send them; suppression
//! of what bounced, and the suppression list.

use serde_json::{json, Value};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

const TWILIO_TOKEN: &str = "secret-token";
const CALLBACK: &str = "http://127.0.0.1:8080/v1/feedback/twilio";

/// Twilio's signature of a callback, by Twilio's own library (`twilio` from PyPI).
fn twilio_signs(params: &[(&str, &str)]) -> Option<String> {
    let python = python_checker("twilio")?;
    let script = r#"
import json, sys
from twilio.request_validator import RequestValidator
params = json.loads(sys.argv[3])
print(RequestValidator(sys.argv[1]).compute_signature(sys.argv[2], params))
"#;
    let map: serde_json::Map<String, Value> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let out = std::process::Command::new(python)
        .args([
            "-c",
            script,
            TWILIO_TOKEN,
            CALLBACK,
            &Value::Object(map).to_string(),
        ])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// herald with a Twilio account whose API gives every message `sid`, answering after
/// `delay`.
async fn twilio_app(sid: &str, delay: std::time::Duration) -> (TestApp, MockServer) {
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": sid, "status": "queued"}))
                .set_delay(delay),
        )
        .mount(&twilio)
        .await;
    let app = spawn_app_with(TestOptions {
        config_toml: Some(format!(
            "[sms]\nrecord_dir = \"unused\"\n[[sms.providers]]\nname = \"twilio\"\nkind = \"twilio\"\n\
             base_url = \"{}\"\naccount_sid = \"AC123\"\nauth_token = \"{TWILIO_TOKEN}\"\n\
             from = \"+15550001111\"\n",
            twilio.uri()
        )),
        ..TestOptions::default()
    })
    .await;
    (app, twilio)
}

pub(crate) async fn send(app: &TestApp, channel: &str) -> Value {
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": [channel],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": "hi"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["notification_id"].as_str().expect("id").to_owned();
    app.wait_finished(&id, 30).await;
    app.deliveries(&id).await.remove(0)
}

async fn callback(app: &TestApp, params: &[(&str, &str)], signature: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(app.url("/v1/feedback/twilio"))
        .form(params);
    if let Some(s) = signature {
        request = request.header("X-Twilio-Signature", s);
    }
    answer(request).await
}

pub(crate) async fn delivery(app: &TestApp, id: &str) -> Value {
    app.get(&format!("/v1/deliveries/{id}")).await.1
}

#[tokio::test]
async fn twilio_callbacks_move_the_delivery_once_in_any_order_and_an_invalid_number_is_suppressed()
{
    let (app, _twilio) = twilio_app("SM42", std::time::Duration::ZERO).await;
    app.put_user("u1", json!({"phone": "+4915100000001", "first_name": "P"}))
        .await;
    let d = send(&app, "sms").await;
    assert_eq!(d["status"], "sent", "{d}");
    let id = d["delivery_id"].as_str().expect("id").to_owned();

    let delivered = [
        ("MessageSid", "SM42"),
        ("MessageStatus", "delivered"),
        ("AccountSid", "AC123"),
        ("To", "+4915100000001"),
    ];
    let Some(signature) = twilio_signs(&delivered) else {
        eprintln!("skipping: no twilio library");
        return app.stop().await;
    };
    // No signature, a wrong one, or one for other parameters: refused, nothing written.
    assert_eq!(callback(&app, &delivered, None).await.0, 401);
    assert_eq!(callback(&app, &delivered, Some("AAAA")).await.0, 403);
    let mut altered = delivered;
    altered[1] = ("MessageStatus", "undelivered");
    assert_eq!(callback(&app, &altered, Some(&signature)).await.0, 403);
    assert_eq!(delivery(&app, &id).await["status"], "sent");

    let (status, body) = callback(&app, &delivered, Some(&signature)).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (200, Some("applied")),
        "{body}"
    );
    let d = delivery(&app, &id).await;
    assert_eq!(d["status"], "delivered", "{d}");
    assert_eq!(d["feedback"][0]["provider"], "twilio");
    // A replayed callback changes nothing.
    let (status, body) = callback(&app, &delivered, Some(&signature)).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (200, Some("duplicate")),
        "{body}"
    );
    assert_eq!(
        delivery(&app, &id).await["feedback"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // The carrier reports it lost after all: undelivered wins, and the number is suppressed.
    let lost = [
        ("MessageSid", "SM42"),
        ("MessageStatus", "undelivered"),
        ("AccountSid", "AC123"),
        ("To", "+4915100000001"),
        ("ErrorCode", "30006"),
    ];
    let signature = twilio_signs(&lost).expect("signed");
    let (status, body) = callback(&app, &lost, Some(&signature)).await;
    assert_eq!(status, 200, "{body}");
    let d = delivery(&app, &id).await;
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("undelivered"), Some("undelivered")),
        "{d}"
    );
    let n = app
        .get(&format!(
            "/v1/notifications/{}",
            d["notification_id"].as_str().expect("n")
        ))
        .await
        .1;
    assert_eq!(
        (
            n["counts"]["sent"].as_i64(),
            n["counts"]["undelivered"].as_i64()
        ),
        (Some(0), Some(1)),
        "{n}"
    );
    let (_, list) = app.get("/v1/suppressions?channel=sms").await;
    assert_eq!(list["items"][0]["address"], "+4915100000001", "{list}");
    assert_eq!(list["items"][0]["reason"], "invalid_number");
    assert_eq!(list["items"][0]["delivery_id"], id.as_str());

    // The statistics count it, with the bounce rate.
    let (_, stats) = app.get("/v1/stats/deliveries?group_by=status").await;
    assert_eq!(stats["channels"]["sms"]["undelivered"], 1, "{stats}");
    assert_eq!(stats["channels"]["sms"]["bounce_rate"], 1.0, "{stats}");

    // The next SMS to that number is not sent.
    let d = send(&app, "sms").await;
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("skipped"), Some("suppressed")),
        "{d}"
    );

    // A callback for a message herald never sent is kept for operators, not an error.
    let unknown = [
        ("MessageSid", "SM999"),
        ("MessageStatus", "delivered"),
        ("AccountSid", "AC123"),
    ];
    let signature = twilio_signs(&unknown).expect("signed");
    let (status, body) = callback(&app, &unknown, Some(&signature)).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (202, Some("unmatched")),
        "{body}"
    );
    let (_, unmatched) = app.get("/v1/feedback").await;
    assert_eq!(unmatched["items"][0]["target"], "SM999", "{unmatched}");
    app.stop().await;
}

/// A bounce as Postfix writes it to the return path.
pub(crate) fn postfix_dsn(to: &str, recipient: &str, action: &str, status: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n\
         To: {to}\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Message-ID: <20261205.{status}.{action}@mx.example.net>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
         --B\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you that your message could not be delivered.\r\n\r\n\
         --B\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; mx.example.net\r\nArrival-Date: Sat,  5 Dec 2026 13:00:00 +0000\r\n\r\n\
         Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n\
         Action: {action}\r\nStatus: {status}\r\nDiagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown\r\n\r\n\
         --B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: herald <herald@localhost>\r\nSubject: Hello\r\n\r\n--B--\r\n"
    )
}

/// A bounce as Gmail sends it: no VERP, the original message attached.
fn gmail_dsn(message_id: &str, recipient: &str) -> String {
    format!(
        "From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\r\n\
         To: herald@localhost\r\n\
         Subject: Delivery Status Notification (Failure)\r\n\
         Message-ID: <gmail-dsn-1@mail.gmail.com>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; boundary=\"G\"; report-type=delivery-status\r\n\r\n\
         --G\r\nContent-Type: multipart/related; boundary=\"R\"\r\n\r\n--R\r\nContent-Type: text/html; charset=\"UTF-8\"\r\n\r\n<p>Address not found</p>\r\n--R--\r\n\
         --G\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; googlemail.com\r\nReceived-From-MTA: dns; herald.example.com\r\n\r\n\
         Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n\
         Diagnostic-Code: smtp; The email account that you tried to reach does not exist.\r\nLast-Attempt-Date: Sat, 05 Dec 2026 05:00:00 -0800 (PST)\r\n\r\n\
         --G\r\nContent-Type: message/rfc822\r\n\r\n\
         From: herald <herald@localhost>\r\nTo: {recipient}\r\nSubject: Hello\r\nMessage-ID: {message_id}\r\n\r\nHi\r\n\r\n--G--\r\n"
    )
}

/// A key with the scope an MTA posting bounces has.
pub(crate) async fn mta_key(app: &TestApp) -> String {
    let (_, key) = app
        .ctx
        .store
        .create_key("mta", &[herald::domain::Scope::FeedbackWrite], None)
        .await
        .expect("key");
    key
}

pub(crate) async fn post_dsn(app: &TestApp, key: &str, dsn: String) -> (u16, Value) {
    answer(
        client_with_key(key)
            .post(app.url("/v1/feedback/dsn"))
            .header("content-type", "message/rfc822")
            .body(dsn),
    )
    .await
}

#[tokio::test]
async fn delivery_status_notifications_bounce_by_verp_or_message_id_and_suppress_the_address() {
    let app = spawn_app_with(TestOptions {
        env: vec![(
            "HERALD__EMAIL__RETURN_PATH".into(),
            "bounces+{delivery_id}@example.com".into(),
        )],
        ..TestOptions::default()
    })
    .await;
    app.put_ana().await;
    let key = mta_key(&app).await;
    let d = send(&app, "email").await;
    let id = d["delivery_id"].as_str().expect("id").to_owned();
    let mail = app.smtp.wait_for(1, 10).await.remove(0);
    let verp = format!("bounces+{id}@example.com");
    assert_eq!(mail.from, verp, "the envelope sender names the delivery");
    let message_id = mail.header("Message-ID").expect("Message-ID");
    assert_eq!(message_id, format!("<{id}@localhost>"));

    // Without the scope: refused.
    let (status, _) = answer(
        reqwest::Client::new()
            .post(app.url("/v1/feedback/dsn"))
            .body(postfix_dsn(&verp, "one@example.com", "failed", "5.1.1")),
    )
    .await;
    assert_eq!(status, 401);
    // A delay is recorded and changes nothing.
    let (status, body) = post_dsn(
        &app,
        &key,
        postfix_dsn(&verp, "one@example.com", "delayed", "4.4.1"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let detail = delivery(&app, &id).await;
    assert_eq!(detail["status"], "sent", "{detail}");
    assert_eq!(detail["feedback"][0]["kind"], "deferred", "{detail}");
    // Postfix's hard bounce to the VERP address.
    let (status, body) = post_dsn(
        &app,
        &key,
        postfix_dsn(&verp, "one@example.com", "failed", "5.1.1"),
    )
    .await;
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
    let (_, s) = app
        .get("/v1/suppressions?channel=email&address=one@example.com")
        .await;
    assert_eq!(s["items"][0]["reason"], "hard_bounce", "{s}");

    // The next email to that address is skipped; lifting the suppression sends again.
    let d = send(&app, "email").await;
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("skipped"), Some("suppressed")),
        "{d}"
    );
    assert_eq!(
        app.delete("/v1/suppressions/email/ONE@example.com").await,
        204
    );
    let d = send(&app, "email").await;
    assert_eq!(d["status"], "sent", "{d}");
    let second = d["delivery_id"].as_str().expect("id").to_owned();

    // Gmail's bounce, matched by the original Message-ID.
    let (status, body) = post_dsn(
        &app,
        &key,
        gmail_dsn(&format!("<{second}@localhost>"), "one@example.com"),
    )
    .await;
    assert_eq!(
        (status, body["delivery_id"].as_str()),
        (200, Some(second.as_str())),
        "{body}"
    );
    assert_eq!(delivery(&app, &second).await["status"], "bounced");
    // Not a DSN at all: a clear 422.
    let (status, body) = post_dsn(&app, &key, "Subject: hi\r\n\r\nhello".into()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("not_a_dsn")),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn operators_suppress_and_lift_addresses_by_hand() {
    let app = spawn_app().await;
    app.put_ana().await;
    let (status, body) = app
        .put(
            "/v1/suppressions/email/One@Example.com",
            &json!({"note": "asked by phone"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["address"], "one@example.com");
    assert_eq!(body["reason"], "manual");
    let (status, _) = app
        .put("/v1/suppressions/email/one@example.com", &json!({}))
        .await;
    assert_eq!(status, 200);
    let d = send(&app, "email").await;
    assert_eq!(d["reason"], "suppressed", "{d}");
    let (status, body) = app.put("/v1/suppressions/fax/x", &json!({})).await;
    assert_eq!(status, 422, "{body}");
    let (_, page) = app.get("/v1/suppressions?reason=manual&limit=1").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(
        app.delete("/v1/suppressions/email/one@example.com").await,
        204
    );
    assert_eq!(
        app.delete("/v1/suppressions/email/one@example.com").await,
        404
    );
    assert_eq!(send(&app, "email").await["status"], "sent");
    app.stop().await;
}

#[tokio::test]
async fn a_callback_that_outruns_the_providers_answer_is_applied_once_the_outcome_commits() {
    // Twilio answers the send two seconds late; its status callback comes before that.
    let (app, twilio) = twilio_app("SM77", std::time::Duration::from_secs(2)).await;
    app.put_user("u1", json!({"phone": "+4915100000001"})).await;
    let delivered = [
        ("MessageSid", "SM77"),
        ("MessageStatus", "delivered"),
        ("AccountSid", "AC123"),
    ];
    let Some(signature) = twilio_signs(&delivered) else {
        return app.stop().await;
    };
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["sms"],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": "hi"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let notification = body["notification_id"].as_str().expect("id").to_owned();
    // The send is under way (Twilio has the request), its answer not yet committed.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while twilio.received_requests().await.map_or(0, |r| r.len()) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Twilio was never called"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, body) = callback(&app, &delivered, Some(&signature)).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (202, Some("unmatched")),
        "{body}"
    );
    app.wait_finished(&notification, 30).await;
    let d = app.deliveries(&notification).await.remove(0);
    let id = d["delivery_id"].as_str().expect("id").to_owned();
    // Tried again once the sid is on record: delivered, applied once.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let d = delivery(&app, &id).await;
        if d["status"] == "delivered" {
            assert_eq!(d["feedback"].as_array().map(Vec::len), Some(1), "{d}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never applied: {d}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (_, unmatched) = app.get("/v1/feedback").await;
    assert_eq!(
        unmatched["items"],
        json!([]),
        "no longer unmatched: {unmatched}"
    );
    let (_, its) = app.get(&format!("/v1/feedback?delivery_id={id}")).await;
    assert_eq!(its["items"][0]["event_id"], "SM77:delivered", "{its}");
    app.assert_metrics(&[
        r#"herald_feedback_events_total{provider="twilio",kind="delivered",result="unmatched"} 1"#,
        r#"herald_feedback_events_total{provider="twilio",kind="delivered",result="applied_late"} 1"#,
    ])
    .await;
    app.stop().await;
}
