//! Enrichment from external profile and content services (servers playing Auth and UGC).

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{spawn_app_with, TestApp, TestOptions};

async fn app_with(services: &MockServer) -> TestApp {
    spawn_app_with(TestOptions {
        config_toml: Some(format!(
            "[enrichment]\nuser_url = \"{0}/api/users/{{user_id}}\"\ncontent_url = \"{0}/api/content/{{content_id}}\"\ntimeout_ms = 1000\ncache_size = 100\ncache_ttl_secs = 60\n",
            services.uri()
        )),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn profiles_and_content_come_from_the_services_when_the_collections_lack_them() {
    let services = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/users/remote-7"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"email": "r7@example.com", "first_name": "Remota"})),
        )
        .expect(1)
        .mount(&services)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/content/m7"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"title": "From UGC"})))
        .expect(1)
        .mount(&services)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/users/nobody"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&services)
        .await;
    let app = app_with(&services).await;
    let (_, body) = app
        .post_event(&json!({"event_type": "episode", "channels": ["email"], "payload": {"user": ["remote-7", "nobody"], "content": ["m7"]}}))
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
    let mail = &app.smtp.wait_for(1, 10).await[0];
    assert_eq!(mail.to, ["r7@example.com"]);
    assert_eq!(mail.subject(), "New: From UGC");
    assert_eq!(mail.text().trim(), "[m7:From UGC] for Remota");
    app.stop().await;
}

#[tokio::test]
async fn a_profile_service_that_is_down_delays_the_delivery_without_losing_it() {
    let services = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/users/remote-8"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(&services)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/users/remote-8"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"email": "r8@example.com", "first_name": "Oito"})),
        )
        .mount(&services)
        .await;
    let app = app_with(&services).await;
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"], "recipients": {"user_ids": ["remote-8"]}, "payload": {"note": "late"}}))
        .await;
    let id = body["notification_id"].as_str().expect("id");
    let n = app.wait_finished(id, 30).await;
    assert_eq!(n["counts"]["sent"], 1, "{n}");
    assert_eq!(app.smtp.wait_for(1, 10).await[0].to, ["r8@example.com"]);
    assert_eq!(
        services.received_requests().await.map(|r| r.len()),
        Some(3),
        "two failures, then the answer"
    );
    app.stop().await;
}
