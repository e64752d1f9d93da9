//! Users, groups and the service endpoints.

use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn users_are_created_replaced_read_and_deleted() {
    let app = spawn_app().await;
    let (status, u) = app
        .put("/v1/users/u-1", &json!({"email": "a@example.com", "first_name": "A", "locale": "pt-BR",
                                      "timezone": "Europe/Berlin", "preferences": {"channels": {"sms": false}}}))
        .await;
    assert_eq!(status, 201, "{u}");
    assert_eq!(u["user_id"], "u-1");
    assert_eq!(u["preferences"]["channels"]["sms"], false);
    let (status, _) = app
        .put("/v1/users/u-1", &json!({"email": "b@example.com"}))
        .await;
    assert_eq!(status, 200, "replaced");
    let (status, u) = app.get("/v1/users/u-1").await;
    assert_eq!(status, 200);
    assert_eq!(u["email"], "b@example.com");
    assert_eq!(
        u["first_name"],
        serde_json::Value::Null,
        "PUT replaces the whole profile"
    );
    assert_eq!(app.delete("/v1/users/u-1").await, 204);
    let (status, body) = app.get("/v1/users/u-1").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(app.delete("/v1/users/u-1").await, 404);
    app.stop().await;
}

#[tokio::test]
async fn invalid_profiles_are_refused_field_by_field_and_write_nothing() {
    let app = spawn_app().await;
    let (status, body) = app
        .put("/v1/users/u-1", &json!({"email": "not-an-address", "phone": "12", "timezone": "Mars/Base", "locale": "!!"}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], "validation_failed");
    let fields: Vec<&str> = body["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter_map(|d| d["field"].as_str())
        .collect();
    assert_eq!(fields, ["email", "phone", "locale", "timezone"]);
    let (status, body) = app.put("/v1/users/bad%20id", &json!({})).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = app
        .put("/v1/users/u-1", &json!({"emial": "x@example.com"}))
        .await;
    assert_eq!(status, 422, "unknown fields are refused: {body}");
    let r = app
        .http
        .put(app.url("/v1/users/u-1"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    // BSON keys are C strings: a key with a NUL is the field's error, not a failed write.
    let (status, body) = app
        .put(
            "/v1/users/u-1",
            &json!({"preferences": {"quiet_hours": {"start": "22:00", "end": "07:00", "x\0": 1}}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = app
        .post(
            "/v1/schedules",
            &json!({"name": "n", "cron": "@daily", "event_type": "greeting",
                    "recipients": {"user_ids": ["u-1"]}, "payload": {"\0": true}}),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (422, &json!("validation_failed")),
        "{body}"
    );
    assert_eq!(app.count("users").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn groups_hold_their_members_and_can_be_replaced_and_deleted() {
    let app = spawn_app().await;
    let (status, g) = app
        .put(
            "/v1/groups/g1",
            &json!({"name": "Beta", "user_ids": ["b", "a", "a"]}),
        )
        .await;
    assert_eq!(status, 201, "{g}");
    assert_eq!(g["member_count"], 2);
    assert_eq!(g["user_ids"], json!(["a", "b"]));
    let (status, g) = app
        .put(
            "/v1/groups/g1",
            &json!({"name": "Beta 2", "user_ids": ["c"]}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, g2) = app.get("/v1/groups/g1").await;
    assert_eq!(g2["user_ids"], json!(["c"]));
    assert_eq!(g2["name"], g["name"]);
    let (status, body) = app
        .put(
            "/v1/groups/g2",
            &json!({"name": "", "user_ids": ["ok", "not ok"]}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(app.delete("/v1/groups/g1").await, 204);
    assert_eq!(app.get("/v1/groups/g1").await.0, 404);
    assert_eq!(app.count("group_members").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn health_is_open_and_ready_checks_both_dependencies() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health").await.0, 200);
    let (status, body) = app.get("/ready").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["mongodb"], "ok");
    assert_eq!(body["checks"]["rabbitmq"], "ok");
    let (status, body) = app.get("/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = app.get("/v1/notifications/does-not-exist").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    app.stop().await;
}
