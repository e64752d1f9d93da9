//! Marketing's tools: stored templates and previews, bulk user import, segment audiences.

use serde_json::json;

use crate::helpers::{answer, spawn_app, TestApp};

async fn import(app: &TestApp, content_type: &str, body: String) -> (u16, serde_json::Value) {
    answer(
        app.http
            .post(app.url("/v1/users/import"))
            .header("content-type", content_type)
            .body(body),
    )
    .await
}

#[tokio::test]
async fn a_stored_template_overrides_the_file_and_is_used_for_delivery() {
    let app = spawn_app().await;
    app.put_ana().await;
    let (status, body) = app
        .put("/v1/templates/greeting/email", &json!({"subject": "Stored hello {{user.first_name}}", "text": "stored {{payload.note}}"}))
        .await;
    assert_eq!(status, 200, "the file existed: {body}");
    assert_eq!(body["origin"], "api");

    let (_, list) = app.get("/v1/templates").await;
    let greeting: Vec<_> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|t| {
            t["event_type"] == "greeting" && t["channel"] == "email" && t["locale"].is_null()
        })
        .cloned()
        .collect();
    assert_eq!(greeting.len(), 1);
    assert_eq!(greeting[0]["origin"], "api");
    assert_eq!(greeting[0]["parts"], json!(["email.subject", "email.txt"]));

    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"], "recipients": {"user_ids": ["u1"]}, "payload": {"note": "n"}}))
        .await;
    app.wait_finished(body["notification_id"].as_str().expect("id"), 20)
        .await;
    let mail = &app.smtp.wait_for(1, 10).await[0];
    assert_eq!(mail.subject(), "Stored hello Ana");
    assert_eq!(mail.text().trim(), "stored n");
    assert!(
        !mail.data.contains("text/html"),
        "the file's html part is replaced too"
    );

    // Removing the stored one brings the file back.
    assert_eq!(app.delete("/v1/templates/greeting/email").await, 204);
    let (status, preview) = app
        .post("/v1/templates/preview", &json!({"event_type": "greeting", "channel": "email", "locale": "pt-BR",
                                               "user": {"first_name": "Bia"}, "payload": {"note": "x"}}))
        .await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["rendered"]["subject"], "Olá Bia");
    app.stop().await;
}

#[tokio::test]
async fn templates_that_do_not_compile_or_render_are_refused_with_where() {
    let app = spawn_app().await;
    let (status, body) = app
        .put(
            "/v1/templates/promo/email",
            &json!({"subject": "ok", "html": "<p>\n{{#if x}}never closed</p>"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "template_invalid");
    assert_eq!(body["error"]["details"][0]["field"], "html");
    assert!(
        body["error"]["details"][0]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("line ")),
        "{body}"
    );
    let (status, body) = app
        .put(
            "/v1/templates/promo/email",
            &json!({"html": "<p>no subject</p>"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("validation_failed"))
    );
    let (status, _) = app
        .put("/v1/templates/promo/fax", &json!({"text": "x"}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(app.count("templates").await, 0);

    let (status, body) = app
        .put(
            "/v1/templates/promo/sms",
            &json!({"text": "Hi {{user.first_name}}, {{payload.code}}", "locale": "pt-BR"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, preview) = app
        .post("/v1/templates/preview", &json!({"event_type": "promo", "channel": "sms", "locale": "pt-BR", "user": {"first_name": "A"}}))
        .await;
    assert_eq!(status, 422, "strict: payload.code is missing: {preview}");
    assert_eq!(preview["error"]["code"], "template_error");
    let (_, preview) = app
        .post("/v1/templates/preview", &json!({"event_type": "promo", "channel": "sms", "locale": "pt-BR", "user": {"first_name": "A"}, "payload": {"code": "123"}}))
        .await;
    assert_eq!(preview["rendered"]["text"], "Hi A, 123");
    assert_eq!(preview["rendered"]["segments"], 1);
    let (status, preview) = app
        .post(
            "/v1/templates/preview",
            &json!({"event_type": "promo", "channel": "email"}),
        )
        .await;
    assert_eq!(
        (status, preview["error"]["code"].as_str()),
        (422, Some("template_missing"))
    );
    app.stop().await;
}

#[tokio::test]
async fn users_import_in_bulk_from_ndjson_and_csv_reporting_each_bad_line() {
    let app = spawn_app().await;
    let mut ndjson = String::new();
    for i in 0..2500 {
        ndjson.push_str(&json!({"user_id": format!("n{i}"), "email": format!("n{i}@example.com"), "locale": "pt-BR", "tags": ["beta"]}).to_string());
        ndjson.push('\n');
    }
    ndjson.push_str("{not json\n");
    ndjson.push_str(&json!({"user_id": "bad", "email": "nope"}).to_string());
    ndjson.push('\n');
    let (status, report) = import(&app, "application/x-ndjson", ndjson.clone()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["received"], 2502);
    assert_eq!(report["created"], 2500);
    assert_eq!(report["failed"], 2);
    assert_eq!(report["errors"][0]["line"], 2501);
    assert_eq!(report["errors"][1]["line"], 2502);
    assert_eq!(report["errors"][1]["user_id"], "bad");
    // Idempotent: the same import again creates nothing.
    let (_, again) = import(&app, "application/x-ndjson", ndjson).await;
    assert_eq!(
        (again["created"].as_u64(), again["updated"].as_u64()),
        (Some(0), Some(2500))
    );
    assert_eq!(app.count("users").await, 2500);

    let csv = "user_id,email,first_name,tags,push_tokens\nc1,c1@example.com,\"Smith, Jo\",beta;vip,tok1;tok2\nc2,not-an-email,X,,\n";
    let (status, report) = import(&app, "text/csv", csv.to_owned()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["created"], 1);
    assert_eq!(report["errors"][0]["line"], 3);
    let (_, u) = app.get("/v1/users/c1").await;
    assert_eq!(u["first_name"], "Smith, Jo");
    assert_eq!(u["tags"], json!(["beta", "vip"]));
    assert_eq!(u["push_tokens"], json!(["tok1", "tok2"]));
    let (status, _) = import(&app, "text/plain", "x".to_owned()).await;
    assert_eq!(status, 415);
    app.stop().await;
}

#[tokio::test]
async fn a_segment_audience_is_streamed_to_every_matching_user() {
    let app = spawn_app().await;
    let mut ndjson = String::new();
    for i in 0..30 {
        let locale = if i % 3 == 0 { "pt-BR" } else { "en" };
        let tags = if i % 2 == 0 {
            json!(["vip"])
        } else {
            json!([])
        };
        ndjson.push_str(&json!({"user_id": format!("s{i}"), "email": format!("s{i}@example.com"), "first_name": "S", "locale": locale, "tags": tags}).to_string());
        ndjson.push('\n');
    }
    import(&app, "application/x-ndjson", ndjson).await;
    let send = |segment: serde_json::Value| {
        let app = &app;
        async move {
            let (status, body) = app
                .post_event(&json!({"event_type": "greeting", "channels": ["email"], "recipients": {"segment": segment}, "payload": {"note": "seg"}}))
                .await;
            assert_eq!(status, 202, "{body}");
            app.wait_finished(body["notification_id"].as_str().expect("id"), 30)
                .await["counts"]["sent"]
                .as_i64()
        }
    };
    assert_eq!(send(json!({"locale": "pt-BR"})).await, Some(10));
    assert_eq!(
        send(json!({"tag": "vip", "locale": "pt-BR"})).await,
        Some(5)
    );
    assert_eq!(send(json!({"all": true})).await, Some(30));
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "recipients": {"segment": {}}}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("validation_failed"))
    );
    app.stop().await;
}
