//! Recipient policy: opt-outs, mutes (and the high-priority bypass), quiet hours.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn opt_outs_and_mutes_skip_with_a_reason_and_security_codes_bypass_mutes() {
    let app = spawn_app().await;
    app.put_user("u1", json!({"email": "u1@example.com", "phone": "+4915112345678", "first_name": "A",
        "preferences": {"channels": {"sms": false}, "muted_event_types": ["greeting", "security_code"]}}))
        .await;
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email", "sms"], "recipients": {"user_ids": ["u1"]}, "payload": {"note": "x"}}))
        .await;
    let id = body["notification_id"].as_str().expect("id");
    let n = app.wait_finished(id, 20).await;
    assert_eq!(n["counts"]["skipped"], 2);
    let mut reasons: Vec<String> = app
        .deliveries(id)
        .await
        .iter()
        .map(|d| {
            format!(
                "{}:{}",
                d["channel"].as_str().unwrap_or_default(),
                d["reason"].as_str().unwrap_or_default()
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["email:muted", "sms:opted_out"]);

    // A high-priority security code ignores the mute (config: policy.bypass_event_types) ...
    let (_, body) = app
        .post_event(&json!({"event_type": "security_code", "priority": "high", "channels": ["email", "sms"], "recipients": {"user_ids": ["u1"]}, "payload": {"code": "4711"}}))
        .await;
    let n = app
        .wait_finished(body["notification_id"].as_str().expect("id"), 20)
        .await;
    assert_eq!(
        (
            n["counts"]["sent"].as_i64(),
            n["counts"]["skipped"].as_i64()
        ),
        (Some(1), Some(1)),
        "{n}"
    );
    assert_eq!(app.smtp.wait_for(1, 10).await[0].text().trim(), "Code 4711");
    // ... but a normal-priority one does not.
    let (_, body) = app
        .post_event(&json!({"event_type": "security_code", "channels": ["email"], "recipients": {"user_ids": ["u1"]}, "payload": {"code": "1"}}))
        .await;
    let n = app
        .wait_finished(body["notification_id"].as_str().expect("id"), 20)
        .await;
    assert_eq!(n["counts"]["skipped"], 1);

    let (status, bad) = app
        .put(
            "/v1/users/u2",
            &json!({"preferences": {"quiet_hours": {"start": "22:00"}}}),
        )
        .await;
    assert_eq!(
        (status, bad["error"]["details"][0]["field"].as_str()),
        (422, Some("preferences.quiet_hours"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_inside_quiet_hours_is_deferred_and_sent_when_they_end() {
    let app = spawn_app().await;
    let now = Utc::now();
    let end = now + chrono::Duration::seconds(3);
    app.put_user("night-owl", json!({"email": "owl@example.com", "first_name": "O", "timezone": "UTC",
        "preferences": {"quiet_hours": {"start": (now - chrono::Duration::minutes(5)).format("%H:%M:%S").to_string(),
                                        "end": end.format("%H:%M:%S").to_string()}}}))
        .await;
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"], "recipients": {"user_ids": ["night-owl"]}, "payload": {"note": "morning"}}))
        .await;
    let id = body["notification_id"].as_str().expect("id").to_owned();
    let mut deferred = false;
    for _ in 0..40 {
        let d = app.deliveries(&id).await;
        if d.first().is_some_and(|d| d["status"] == "deferred") {
            assert_eq!(d[0]["reason"], "quiet_hours");
            deferred = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(deferred, "deferred while quiet");
    let (_, n) = app.get(&format!("/v1/notifications/{id}")).await;
    assert_eq!(n["counts"]["deferred"], 1);
    let mail = app.smtp.wait_for(1, 20).await;
    assert!(
        Utc::now() >= end - chrono::Duration::milliseconds(1000),
        "not sent before the quiet hours end"
    );
    assert!(mail[0].text().contains("morning"));
    let n = app.wait_finished(&id, 10).await;
    assert_eq!(
        (
            n["counts"]["sent"].as_i64(),
            n["counts"]["deferred"].as_i64()
        ),
        (Some(1), Some(0))
    );
    app.stop().await;
}
