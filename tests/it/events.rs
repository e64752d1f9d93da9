//! `POST /v1/events`: acceptance, de-duplication, both formats, and every refusal.

use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with, Roles, TestOptions};

#[tokio::test]
async fn an_event_to_two_users_sends_exactly_two_rendered_emails() {
    let app = spawn_app().await;
    app.put_ana().await;
    app.put_user(
        "u2",
        json!({"email": "two@example.com", "first_name": "Bo", "locale": "pt-BR"}),
    )
    .await;

    let (status, body) = app
        .post_event(&json!({
            "event_type": "greeting",
            "recipients": {"user_ids": ["u1", "u2"]},
            "channels": ["email"],
            "payload": {"note": "<b>news</b>"}
        }))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "accepted");
    let id = body["notification_id"].as_str().expect("id").to_owned();

    let n = app.wait_finished(&id, 20).await;
    assert_eq!(n["status"], "completed");
    assert_eq!(n["counts"]["total"], 2);
    assert_eq!(n["counts"]["sent"], 2);
    assert_eq!(n["counts"]["queued"], 0);

    let mut mails = app.smtp.wait_for(2, 5).await;
    mails.sort_by(|a, b| a.to.cmp(&b.to));
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[0].to, ["one@example.com"]);
    assert_eq!(mails[0].from, "herald@localhost");
    assert_eq!(mails[0].subject(), "Hello Ana");
    assert_eq!(mails[0].text().trim(), "Hi Ana, <b>news</b>");
    assert!(
        mails[0].html().contains("Hi Ana, &lt;b&gt;news&lt;/b&gt;"),
        "{}",
        mails[0].html()
    );
    assert_eq!(mails[1].to, ["two@example.com"]);
    assert_eq!(mails[1].subject(), "Olá Bo", "pt-BR falls back to pt");

    let deliveries = app.deliveries(&id).await;
    assert_eq!(deliveries.len(), 2);
    for d in &deliveries {
        assert_eq!(d["status"], "sent");
        assert_eq!(d["provider"], "smtp");
        assert_eq!(d["attempts"], 1);
    }
    // Each message names its delivery, so a duplicate can be told from a second event.
    let mut stamped: Vec<String> = mails
        .iter()
        .map(|m| {
            m.header("X-Herald-Delivery-Id")
                .expect("delivery id header")
        })
        .collect();
    let mut ids: Vec<String> = deliveries
        .iter()
        .map(|d| d["delivery_id"].as_str().expect("id").to_owned())
        .collect();
    stamped.sort();
    ids.sort();
    assert_eq!(stamped, ids);
    let (_, detail) = app
        .get(&format!(
            "/v1/deliveries/{}",
            deliveries[0]["delivery_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(detail["attempt_log"][0]["status"], "sent");
    assert!(detail["attempt_log"][0]["response"]["smtp_code"]
        .as_str()
        .is_some_and(|c| c.starts_with("250")));
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_event_id_answers_the_original_with_200_and_sends_nothing_more() {
    let app = spawn_app().await;
    app.put_ana().await;
    let event = json!({
        "event_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        "event_type": "greeting", "channels": ["email"],
        "recipients": {"user_ids": ["u1"]}, "payload": {"note": "x"}
    });
    let (first_status, first) = app.post_event(&event).await;
    assert_eq!(first_status, 202);
    app.wait_finished(first["notification_id"].as_str().expect("id"), 20)
        .await;

    let (again_status, again) = app.post_event(&event).await;
    assert_eq!(again_status, 200);
    assert_eq!(again, first, "the original answer");

    // The Idempotency-Key header de-duplicates the same way.
    let keyed = json!({"event_type": "greeting", "channels": ["email"],
                       "recipients": {"user_ids": ["u1"]}, "payload": {"note": "y"}});
    let send = || {
        app.http
            .post(app.url("/v1/events"))
            .header("Idempotency-Key", "order-42-shipped")
            .json(&keyed)
            .send()
    };
    let r1 = send().await.expect("request");
    assert_eq!(r1.status(), 202);
    let b1: serde_json::Value = r1.json().await.expect("json");
    assert_eq!(b1["event_id"], "order-42-shipped");
    app.wait_finished(b1["notification_id"].as_str().expect("id"), 20)
        .await;
    let r2 = send().await.expect("request");
    assert_eq!(r2.status(), 200);

    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(app.smtp.mails().len(), 2, "one email per distinct event");
    assert_eq!(app.count("notifications").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn the_seed_format_event_is_delivered_with_enriched_content() {
    let app = spawn_app().await;
    app.put_user(
        "7",
        json!({"email": "seven@example.com", "first_name": "Sete"}),
    )
    .await;
    app.ctx
        .store
        .put_content("m1", mongodb::bson::doc! {"title": "Pilot"})
        .await
        .expect("content");
    let (status, body) = app
        .post_event(&json!({
            "event_type": "episode",
            "created_dt": "2021-07-25 10:00:00",
            "priority": 1,
            "payload": {"user": [7], "content": ["m1", "m9"]}
        }))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["notification_id"].as_str().expect("id");
    let n = app.wait_finished(id, 20).await;
    assert_eq!(n["priority"], "high", "integer 1 is high");
    assert_eq!(n["counts"]["sent"], 1);
    let mails = app.smtp.wait_for(1, 5).await;
    assert_eq!(mails[0].to, ["seven@example.com"]);
    assert_eq!(mails[0].subject(), "New: Pilot");
    assert_eq!(mails[0].text().trim(), "[m1:Pilot][m9:] for Sete");
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_stable_code_and_writes_nothing() {
    let app = spawn_app().await;
    app.put("/v1/groups/g1", &json!({"name": "g", "user_ids": ["u1"]}))
        .await;
    let ok_recipients = json!({"user_ids": ["u1"]});
    let cases: Vec<(&str, Result<serde_json::Value, &str>, u16, &str)> = vec![
        (
            "malformed JSON",
            Err("{\"event_type\": "),
            400,
            "malformed_json",
        ),
        ("not an object", Err("[1,2]"), 422, "validation_failed"),
        (
            "missing event_type",
            Ok(json!({"recipients": ok_recipients})),
            422,
            "validation_failed",
        ),
        (
            "malformed event_type",
            Ok(json!({"event_type": "../../etc", "recipients": ok_recipients})),
            422,
            "validation_failed",
        ),
        (
            "no recipients",
            Ok(json!({"event_type": "greeting"})),
            422,
            "no_recipients",
        ),
        (
            "empty recipients",
            Ok(json!({"event_type": "greeting", "recipients": {"user_ids": []}})),
            422,
            "no_recipients",
        ),
        (
            "unknown group",
            Ok(json!({"event_type": "greeting", "recipients": {"group_id": "nope"}})),
            422,
            "unknown_group",
        ),
        (
            "unknown priority",
            Ok(
                json!({"event_type": "greeting", "recipients": ok_recipients, "priority": "urgent"}),
            ),
            422,
            "validation_failed",
        ),
        (
            "priority out of range",
            Ok(json!({"event_type": "greeting", "recipients": ok_recipients, "priority": 7})),
            422,
            "validation_failed",
        ),
        (
            "unknown channel",
            Ok(json!({"event_type": "greeting", "recipients": ok_recipients, "channels": ["fax"]})),
            422,
            "validation_failed",
        ),
        (
            "payload over 256 KiB",
            Ok(
                json!({"event_type": "greeting", "recipients": ok_recipients, "payload": {"blob": "x".repeat(270 * 1024)}}),
            ),
            413,
            "payload_too_large",
        ),
        (
            "body over the request limit",
            Ok(
                json!({"event_type": "greeting", "recipients": ok_recipients, "payload": {"blob": "x".repeat(1100 * 1024)}}),
            ),
            413,
            "payload_too_large",
        ),
        (
            "unknown field",
            Ok(json!({"event_type": "greeting", "recipients": ok_recipients, "colour": "red"})),
            422,
            "validation_failed",
        ),
        (
            // BSON keys are C strings: this one cannot be stored.
            "a payload key with a NUL",
            Ok(
                json!({"event_type": "greeting", "recipients": ok_recipients, "payload": {"a": {"b\0": 1}}}),
            ),
            422,
            "validation_failed",
        ),
    ];
    let before = app.count("notifications").await;
    for (name, body, want_status, want_code) in cases {
        let (status, answer) = match body {
            Ok(v) => app.post_event(&v).await,
            Err(raw) => app.post_raw(raw.to_owned()).await,
        };
        assert_eq!(status, want_status, "{name}: {answer}");
        assert_eq!(answer["error"]["code"], want_code, "{name}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    let (_, answer) = app
        .post_event(
            &json!({"event_type": "Bad Type", "recipients": ok_recipients, "priority": "urgent"}),
        )
        .await;
    let fields: Vec<&str> = answer["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter_map(|d| d["field"].as_str())
        .collect();
    assert_eq!(
        fields,
        ["event_type", "priority"],
        "every bad field is named"
    );
    assert_eq!(app.count("notifications").await, before, "nothing written");
    assert_eq!(app.count("outbox").await, 0, "nothing queued");
    app.stop().await;
}

/// A process that dies in the middle of accepting an event leaves its transaction, and
/// the event id it inserted, held until the server ends it (60 s by default). The
/// client's retry of that event must be refused for the moment, and must not hold up
/// the events accepted with it.
#[tokio::test]
async fn an_event_id_held_by_an_open_transaction_is_refused_for_the_moment_and_holds_up_nothing_else(
) {
    let app = spawn_app_with(TestOptions {
        roles: Roles::ApiOnly,
        ..TestOptions::default()
    })
    .await;
    let mut held = app.db.client().start_session().await.expect("session");
    held.start_transaction().await.expect("transaction");
    app.db
        .collection::<mongodb::bson::Document>("notifications")
        .insert_one(mongodb::bson::doc! {"_id": "n-of-a-dead-api", "event_id": "held-1"})
        .session(&mut held)
        .await
        .expect("insert in the open transaction");

    let event = |id: &str| {
        json!({"event_id": id, "event_type": "greeting", "channels": ["email"],
               "recipients": {"user_ids": ["u1"]}})
    };
    let send = |body: serde_json::Value| {
        let request = app.http.post(app.url("/v1/events")).json(&body);
        async move {
            let r = request.send().await.expect("request");
            let retry_after = r.headers().get("retry-after").cloned();
            let status = r.status().as_u16();
            (
                status,
                retry_after,
                r.json::<serde_json::Value>().await.expect("json"),
            )
        }
    };
    // Sent at once, so that most share the held one's group commit.
    let all = futures::future::join_all(
        std::iter::once(event("held-1"))
            .chain((0..30).map(|i| event(&format!("free-{i}"))))
            .map(send),
    );
    let answers = tokio::time::timeout(std::time::Duration::from_secs(20), all)
        .await
        .expect("every request answered while the transaction is still open");
    let (status, retry_after, body) = &answers[0];
    assert_eq!(*status, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable");
    assert!(retry_after.is_some(), "a 503 says when to come back");
    for (status, _, body) in &answers[1..] {
        assert_eq!(*status, 202, "{body}");
    }
    assert_eq!(app.count("notifications").await, 30);

    // Once the server has ended the dead transaction, the retry is accepted.
    held.abort_transaction().await.expect("abort");
    let (status, _, body) = send(event("held-1")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(app.count("notifications").await, 31);
    app.stop().await;
}
