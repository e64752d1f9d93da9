//! Push through an HTTP server playing FCM v1: the OAuth2 token exchange and the send endpoint.

use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{spawn_app_with, TestApp, TestOptions};

const SEND: &str = "/v1/projects/herald-test/messages:send";

async fn fcm_app(fcm: &MockServer) -> TestApp {
    let key = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fcm/service-account.json"
    );
    spawn_app_with(TestOptions {
        config_toml: Some(format!(
            "[push]\nrecord_dir = \"unused\"\n[[push.providers]]\nname = \"fcm\"\nkind = \"fcm\"\nservice_account_file = \"{key}\"\nbase_url = \"{0}\"\ntoken_uri = \"{0}/token\"\n",
            fcm.uri()
        )),
        ..Default::default()
    })
    .await
}

async fn mount_token(fcm: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"access_token": "ya29.test", "expires_in": 3600, "token_type": "Bearer"}),
        ))
        .expect(1)
        .mount(fcm)
        .await;
}

fn unregistered() -> ResponseTemplate {
    ResponseTemplate::new(404).set_body_json(json!({"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}))
}

async fn push_to(app: &TestApp, user: &str) -> Value {
    let (_, body) = app
        .post_event(&json!({"event_type": "episode", "channels": ["push"], "recipients": {"user_ids": [user]}, "payload": {"content": ["m1"]}}))
        .await;
    let id = body["notification_id"].as_str().expect("id").to_owned();
    app.wait_finished(&id, 20).await;
    let did = app.deliveries(&id).await[0]["delivery_id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.get(&format!("/v1/deliveries/{did}")).await.1
}

#[tokio::test]
async fn push_goes_through_fcm_with_a_cached_token_and_dead_tokens_are_removed() {
    let fcm = MockServer::start().await;
    mount_token(&fcm).await;
    Mock::given(method("POST"))
        .and(path(SEND))
        .and(header("authorization", "Bearer ya29.test"))
        .and(body_partial_json(json!({"message": {"token": "good-token", "notification": {"title": "New: The Pilot"}}})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"name": "projects/herald-test/messages/1"})))
        .expect(2)
        .mount(&fcm)
        .await;
    Mock::given(method("POST"))
        .and(path(SEND))
        .and(body_partial_json(
            json!({"message": {"token": "dead-token"}}),
        ))
        .respond_with(unregistered())
        .mount(&fcm)
        .await;
    let app = fcm_app(&fcm).await;
    app.ctx
        .store
        .put_content("m1", mongodb::bson::doc! {"title": "The Pilot"})
        .await
        .expect("content");
    app.put_user(
        "phone",
        json!({"first_name": "P", "push_tokens": ["good-token", "dead-token"]}),
    )
    .await;

    let d = push_to(&app, "phone").await;
    assert_eq!(d["status"], "sent", "{d}");
    assert_eq!(d["provider"], "fcm");
    assert_eq!(d["attempt_log"][0]["response"]["removed_tokens"], 1);
    let (_, user) = app.get("/v1/users/phone").await;
    assert_eq!(
        user["push_tokens"],
        json!(["good-token"]),
        "the unregistered token is gone"
    );

    let sent = fcm.received_requests().await.expect("recorded");
    let first_send: Value = serde_json::from_slice(
        &sent
            .iter()
            .find(|r| r.url.path() == SEND)
            .expect("send")
            .body,
    )
    .expect("json");
    assert_eq!(
        first_send["message"]["data"]["episode"], "The Pilot",
        "push.data renders into FCM data"
    );
    assert_eq!(
        first_send["message"]["data"]["deeplink"],
        "app://episodes/m1"
    );
    assert!(first_send["message"]["data"]["delivery_id"].is_string());

    // A second push reuses the cached access token (the token endpoint expects one call).
    assert_eq!(push_to(&app, "phone").await["status"], "sent");

    // The token request is a JWT signed with the service account's key.
    let requests = fcm.received_requests().await.expect("recorded");
    let form = String::from_utf8_lossy(
        &requests
            .iter()
            .find(|r| r.url.path() == "/token")
            .expect("token request")
            .body,
    )
    .into_owned();
    let jwt = form
        .split("assertion=")
        .nth(1)
        .expect("assertion")
        .split('&')
        .next()
        .expect("jwt");
    let public = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fcm/test-service-account-public.pem"
    ))
    .expect("key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[format!("{}/token", fcm.uri())]);
    let claims = jsonwebtoken::decode::<Value>(
        jwt,
        &jsonwebtoken::DecodingKey::from_rsa_pem(&public).expect("pem"),
        &validation,
    )
    .expect("a valid RS256 JWT")
    .claims;
    assert_eq!(claims["iss"], "herald@herald-test.iam.gserviceaccount.com");
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_user_whose_every_token_is_dead_fails_then_is_skipped() {
    let fcm = MockServer::start().await;
    mount_token(&fcm).await;
    Mock::given(method("POST"))
        .and(path(SEND))
        .respond_with(unregistered())
        .mount(&fcm)
        .await;
    let app = fcm_app(&fcm).await;
    app.ctx
        .store
        .put_content("m1", mongodb::bson::doc! {"title": "The Pilot"})
        .await
        .expect("content");
    app.put_user(
        "old-phone",
        json!({"first_name": "O", "push_tokens": ["dead-token"]}),
    )
    .await;
    let d = push_to(&app, "old-phone").await;
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("failed"), Some("provider_rejected")),
        "{d}"
    );
    assert!(
        d["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("UNREGISTERED")),
        "{d}"
    );
    let (_, user) = app.get("/v1/users/old-phone").await;
    assert_eq!(user["push_tokens"], json!([]));
    let d = push_to(&app, "old-phone").await;
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("skipped"), Some("no_address"))
    );
    app.stop().await;
}
