//! Status webhooks: events to the endpoints of `/v1/webhook-endpoints`, signed by Standard Webhooks (verified by the reference library), retried, disabled, replayed.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::feedback::{mta_key, post_dsn, postfix_dsn, send};
use crate::helpers::{spawn_app_with, TestApp, TestOptions};
use crate::webhooks::{signed, verified_by_the_reference_library, Signed};

/// Loopback receivers allowed, and a quick schedule: two retries after `delays_ms`.
fn config(delays_ms: &[u64], extra: &str) -> String {
    let timeout = if extra.contains("timeout_ms") {
        ""
    } else {
        "timeout_ms = 1000\n"
    };
    format!(
        "[webhook]\nallow_internal_targets = true\n\
         [status_webhooks]\nretry_delays_ms = {delays_ms:?}\n{timeout}poll_interval_ms = 100\n{extra}\n"
    )
}

async fn app_with(toml: String, env: Vec<(String, String)>) -> TestApp {
    spawn_app_with(TestOptions {
        config_toml: Some(toml),
        env,
        ..Default::default()
    })
    .await
}

/// Creates an endpoint; its id and secret.
async fn endpoint(app: &TestApp, url: &str, events: &[&str], contact: bool) -> (String, String) {
    let (s, e) = app
        .post(
            "/v1/webhook-endpoints",
            &json!({"url": url, "events": events, "include_contact": contact}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    (
        e["id"].as_str().expect("id").to_owned(),
        e["secret"].as_str().expect("secret").to_owned(),
    )
}

/// The requests `server` got, once it has at least `n` (within `secs`).
async fn received(server: &MockServer, n: usize, secs: u64) -> Vec<wiremock::Request> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let got = server.received_requests().await.unwrap_or_default();
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} requests within {secs} s: {:?}",
            got.len(),
            got.iter()
                .map(|r| String::from_utf8_lossy(&r.body).into_owned())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn body(r: &wiremock::Request) -> Value {
    serde_json::from_slice(&r.body).expect("JSON body")
}

fn header(r: &wiremock::Request, name: &str) -> String {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Asserts the reference library verifies every request with `secret` (when it runs).
fn verifies(secret: &str, requests: &[wiremock::Request]) {
    let signed: Vec<Signed> = requests.iter().map(signed).collect();
    if let Some(verdict) = verified_by_the_reference_library(secret, &signed) {
        assert_eq!(verdict, Ok(()), "verified by standardwebhooks");
    }
}

/// An endpoint's messages (in `state`), newest first.
async fn messages(app: &TestApp, endpoint: &str, state: &str) -> Vec<Value> {
    let (s, page) = app
        .get(&format!(
            "/v1/webhook-endpoints/{endpoint}/messages?state={state}&limit=200"
        ))
        .await;
    assert_eq!(s, 200, "{page}");
    page["items"].as_array().expect("items").clone()
}

/// Waits until `endpoint` has `n` messages in `state`.
async fn wait_messages(
    app: &TestApp,
    endpoint: &str,
    state: &str,
    n: usize,
    secs: u64,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let got = messages(app, endpoint, state).await;
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} {state} messages within {secs} s",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The endpoint once `holds` of it (herald updates it just after recording the try).
async fn endpoint_once(app: &TestApp, id: &str, holds: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, e) = app.get(&format!("/v1/webhook-endpoints/{id}")).await;
        if holds(&e) {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not as expected: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn receiver(status: u16) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(status))
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn subscribed_endpoints_get_their_events_signed_and_nothing_else() {
    let app = app_with(
        config(&[200, 200], ""),
        vec![(
            "HERALD__EMAIL__RETURN_PATH".into(),
            "bounces+{delivery_id}@example.com".into(),
        )],
    )
    .await;
    app.put_ana().await;
    let key = mta_key(&app).await;
    let all = receiver(200).await;
    let only_delivered = receiver(200).await;
    let (all_id, all_secret) = endpoint(
        &app,
        &format!("{}/hook", all.uri()),
        &[
            "message.sent",
            "message.bounced",
            "message.skipped",
            "notification.completed",
        ],
        true,
    )
    .await;
    endpoint(
        &app,
        &format!("{}/hook", only_delivered.uri()),
        &["message.delivered"],
        false,
    )
    .await;

    let d = send(&app, "email").await;
    let delivery_id = d["delivery_id"].as_str().expect("id").to_owned();
    let got = received(&all, 2, 20).await;
    let types: HashSet<String> = got
        .iter()
        .map(|r| body(r)["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        types,
        HashSet::from(["message.sent".into(), "notification.completed".into()])
    );
    verifies(&all_secret, &got);
    let sent = got
        .iter()
        .map(body)
        .find(|b| b["type"] == "message.sent")
        .expect("sent");
    assert_eq!(sent["data"]["delivery_id"], delivery_id.as_str());
    assert_eq!(sent["data"]["status"], "sent");
    assert_eq!(sent["data"]["channel"], "email");
    assert_eq!(sent["data"]["user_id"], "u1");
    assert!(sent["data"]["updated_at"].is_string(), "{sent}");
    assert!(sent["timestamp"].is_string(), "{sent}");
    for r in &got {
        assert!(header(r, "webhook-id").starts_with("msg_"));
        assert!(header(r, "webhook-signature").starts_with("v1,"));
    }

    // The provider reports it delivered, then bounced: the delivered-only endpoint gets
    // the one event, without the address; the other gets the bounce, with it (opted in).
    let verp = format!("bounces+{delivery_id}@example.com");
    let (s, b) = post_dsn(
        &app,
        &key,
        postfix_dsn(&verp, "one@example.com", "delivered", "2.0.0"),
    )
    .await;
    assert!(s < 300, "{b}");
    let delivered = received(&only_delivered, 1, 20).await;
    assert_eq!(body(&delivered[0])["type"], "message.delivered");
    assert_eq!(
        body(&delivered[0])["data"]["delivery_id"],
        delivery_id.as_str()
    );
    assert!(
        !String::from_utf8_lossy(&delivered[0].body).contains("one@example.com"),
        "no address unless the endpoint opts in"
    );
    let (s, b) = post_dsn(
        &app,
        &key,
        postfix_dsn(&verp, "one@example.com", "failed", "5.1.1"),
    )
    .await;
    assert!(s < 300, "{b}");
    let got = received(&all, 3, 20).await;
    let bounced = got
        .iter()
        .map(body)
        .find(|b| b["type"] == "message.bounced")
        .expect("bounced");
    assert_eq!(bounced["data"]["status"], "bounced");
    assert_eq!(bounced["data"]["address"], "one@example.com");

    // After a rotation both secrets sign; each verifies on its own. (The address is
    // suppressed now: the next send is skipped.)
    let (s, rotated) = app
        .post(
            &format!("/v1/webhook-endpoints/{all_id}/rotate-secret"),
            &json!({}),
        )
        .await;
    assert_eq!(s, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().expect("secret").to_owned();
    send(&app, "email").await;
    let got = received(&all, 5, 20).await;
    let latest: Vec<_> = got[3..].to_vec();
    assert!(latest.iter().any(|r| body(r)["type"] == "message.skipped"));
    for r in &latest {
        assert_eq!(header(r, "webhook-signature").split(' ').count(), 2);
    }
    verifies(&all_secret, &latest);
    verifies(&new_secret, &latest);

    // Nothing else reached the delivered-only endpoint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        only_delivered.received_requests().await.map(|r| r.len()),
        Some(1)
    );
    // Every try is listed.
    let (s, tries) = app
        .get(&format!("/v1/webhook-endpoints/{all_id}/attempts"))
        .await;
    assert_eq!(s, 200, "{tries}");
    assert_eq!(tries["items"].as_array().map(Vec::len), Some(5), "{tries}");
    assert_eq!(tries["items"][0]["status_code"], 200);
    app.assert_metrics(&["herald_status_webhook_attempts_total{result=\"delivered\"} 6"])
        .await;
}

#[tokio::test]
async fn failures_and_timeouts_are_retried_with_the_same_webhook_id() {
    let app = app_with(config(&[200, 200], ""), Vec::new()).await;
    app.put_ana().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(2500)))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .with_priority(3)
        .mount(&server)
        .await;
    let (id, secret) = endpoint(
        &app,
        &format!("{}/hook", server.uri()),
        &["message.sent"],
        false,
    )
    .await;
    send(&app, "email").await;
    let got = received(&server, 3, 20).await;
    let ids: HashSet<String> = got.iter().map(|r| header(r, "webhook-id")).collect();
    assert_eq!(ids.len(), 1, "one webhook-id across the tries");
    verifies(&secret, &got);
    let delivered = wait_messages(&app, &id, "delivered", 1, 10).await;
    assert_eq!(delivered[0]["attempts"], 3);
    assert_eq!(
        Some(delivered[0]["id"].as_str().unwrap_or_default()),
        ids.iter().next().map(String::as_str)
    );
    let (_, tries) = app
        .get(&format!("/v1/webhook-endpoints/{id}/attempts"))
        .await;
    let codes: Vec<Value> = tries["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|t| t["status_code"].clone())
        .collect();
    assert_eq!(codes, vec![json!(204), Value::Null, json!(500)], "{tries}");
    assert!(
        tries["items"][1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no answer within")),
        "{tries}"
    );
    // The receiver recovered: the endpoint is not failing any more.
    endpoint_once(&app, &id, |e| e["failing_since"].is_null()).await;
}

#[tokio::test]
async fn gone_disables_at_once_and_failing_for_too_long_disables_with_the_reason() {
    // disable_after_hours = 0.0003: about a second of nothing but failures.
    let app = app_with(
        config(&[800, 800], "disable_after_hours = 0.0003"),
        Vec::new(),
    )
    .await;
    app.put_ana().await;
    let gone = receiver(410).await;
    let (gone_id, _) = endpoint(
        &app,
        &format!("{}/hook", gone.uri()),
        &["message.sent"],
        false,
    )
    .await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let (down_id, _) = endpoint(
        &app,
        &format!("http://127.0.0.1:{down}/hook"),
        &["message.sent"],
        false,
    )
    .await;
    send(&app, "email").await;
    received(&gone, 1, 20).await;
    let failed = wait_messages(&app, &gone_id, "failed", 1, 10).await;
    assert_eq!(failed[0]["last_status_code"], 410);
    let e = endpoint_once(&app, &gone_id, |e| e["enabled"] == false).await;
    assert!(
        e["disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("410")),
        "{e}"
    );

    let failed = wait_messages(&app, &down_id, "failed", 1, 20).await;
    assert!(failed[0]["last_error"].is_string(), "{failed:?}");
    let e = endpoint_once(&app, &down_id, |e| e["enabled"] == false).await;
    assert!(
        e["disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("every try failed since")),
        "{e}"
    );
    // A disabled endpoint gets nothing new, and is not replayed until enabled.
    send(&app, "email").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gone.received_requests().await.map(|r| r.len()), Some(1));
    assert_eq!(messages(&app, &gone_id, "pending").await.len(), 0);
    let (s, b) = app
        .post(
            &format!("/v1/webhook-endpoints/{gone_id}/replay"),
            &json!({"since": "2026-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("endpoint_disabled"))
    );
}

#[tokio::test]
async fn a_receiver_down_for_the_whole_run_gets_everything_by_replay_and_retry() {
    let app = app_with(config(&[100, 100], ""), Vec::new()).await;
    app.put_ana().await;
    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let (id, secret) = endpoint(
        &app,
        &format!("http://127.0.0.1:{port}/hook"),
        &["message.sent"],
        false,
    )
    .await;
    for _ in 0..3 {
        send(&app, "email").await;
    }
    let failed = wait_messages(&app, &id, "failed", 3, 20).await;
    for m in &failed {
        assert_eq!(m["attempts"], 3, "every try of the schedule: {m}");
    }
    let (_, e) = app.get(&format!("/v1/webhook-endpoints/{id}")).await;
    assert!(e["failing_since"].is_string(), "{e}");
    // Pages go on after the last id of a full one; a cursor not handed out is refused.
    let (_, page) = app
        .get(&format!("/v1/webhook-endpoints/{id}/attempts?limit=5"))
        .await;
    let next = page["next_cursor"].as_str().expect("a full page goes on");
    let (_, rest) = app
        .get(&format!(
            "/v1/webhook-endpoints/{id}/attempts?limit=5&cursor={next}"
        ))
        .await;
    assert_eq!(
        rest["items"].as_array().map(Vec::len),
        Some(4),
        "9 tries: {rest}"
    );
    for bad in ["", "msg_x", "nope"] {
        let (s, b) = app
            .get(&format!("/v1/webhook-endpoints/{id}/attempts?cursor={bad}"))
            .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (400, Some("invalid_cursor")),
            "{bad}"
        );
    }

    // The receiver is back on the same address.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port again");
    let server = MockServer::builder().listener(listener).start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    for (body, field) in [
        (json!({}), "since"),
        (json!({"since": "yesterday"}), "since"),
        (json!({"since": since.to_rfc3339(), "colour": 1}), "colour"),
    ] {
        let (s, b) = app
            .post(&format!("/v1/webhook-endpoints/{id}/replay"), &body)
            .await;
        assert_eq!(s, 422, "{b}");
        assert_eq!(b["error"]["details"][0]["field"], field, "{b}");
    }
    let (s, b) = app
        .post(
            &format!("/v1/webhook-endpoints/{id}/replay"),
            &json!({"since": since.to_rfc3339()}),
        )
        .await;
    assert_eq!((s, b["replayed"].as_u64()), (202, Some(3)), "{b}");
    let got = received(&server, 3, 20).await;
    verifies(&secret, &got);
    let ids: HashSet<String> = got.iter().map(|r| header(r, "webhook-id")).collect();
    let expected: HashSet<String> = failed
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids, expected, "each message once, with its own webhook-id");
    wait_messages(&app, &id, "delivered", 3, 10).await;

    // One message again, by id.
    let one = failed[0]["id"].as_str().expect("id");
    let (s, m) = app
        .post(&format!("/v1/webhook-messages/{one}/retry"), &json!({}))
        .await;
    assert_eq!(s, 202, "{m}");
    let got = received(&server, 4, 20).await;
    assert_eq!(header(&got[3], "webhook-id"), one);
    let (s, _) = app
        .post("/v1/webhook-messages/msg_nope/retry", &json!({}))
        .await;
    assert_eq!(s, 404);
    endpoint_once(&app, &id, |e| e["failing_since"].is_null()).await;
}

#[tokio::test]
async fn a_slow_endpoint_does_not_hold_up_another() {
    let app = app_with(
        config(&[200], "per_endpoint_concurrency = 2\ntimeout_ms = 8000"),
        Vec::new(),
    )
    .await;
    let users: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    for u in &users {
        app.put_user(u, json!({"email": format!("{u}@example.com")}))
            .await;
    }
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(4)))
        .mount(&slow)
        .await;
    let fast = receiver(200).await;
    endpoint(
        &app,
        &format!("{}/hook", slow.uri()),
        &["message.sent"],
        false,
    )
    .await;
    endpoint(
        &app,
        &format!("{}/hook", fast.uri()),
        &["message.sent"],
        false,
    )
    .await;
    let (s, b) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
            "recipients": {"user_ids": users}, "payload": {"note": "hi"}}))
        .await;
    assert_eq!(s, 202, "{b}");
    received(&fast, 12, 30).await;
    let slow_got = slow.received_requests().await.map_or(0, |r| r.len());
    assert!(
        slow_got <= 4,
        "the slow endpoint had {slow_got} tries started: at most its 2 at a time"
    );
}

#[tokio::test]
async fn failures_deaths_unsubscribes_and_inbox_reads_are_reported() {
    let app = app_with(
        config(
            &[100, 100],
            "[event_types.greeting]\ncategory = \"marketing\"",
        ),
        Vec::new(),
    )
    .await;
    app.put_ana().await;
    app.put_user("ana", json!({"first_name": "Ana"})).await;
    let server = receiver(200).await;
    let (id, _) = endpoint(
        &app,
        &format!("{}/hook", server.uri()),
        &[
            "message.failed",
            "message.dead",
            "message.unsubscribed",
            "message.seen",
            "message.read",
        ],
        false,
    )
    .await;
    // Refused for good, then for the moment on every attempt, then sent.
    app.smtp.refuse_next(1, "550 5.1.1 no such mailbox");
    let failed = send(&app, "email").await;
    app.smtp.refuse_next(3, "451 4.3.0 try again later");
    let dead = send(&app, "email").await;
    let sent = send(&app, "email").await;
    assert_eq!(
        (
            failed["status"].as_str(),
            dead["status"].as_str(),
            sent["status"].as_str()
        ),
        (Some("failed"), Some("dead"), Some("sent"))
    );
    // The recipient leaves through the sent mail's one-click link.
    let mail = app.smtp.wait_for(1, 10).await.remove(0);
    let r = reqwest::Client::new()
        .post(app.url(&crate::deliverability::unsubscribe_path(&mail)))
        .form(&[("List-Unsubscribe", "One-Click")])
        .send()
        .await
        .expect("one-click");
    assert_eq!(r.status(), 200);
    // An in-app item, read by its user.
    let nid = crate::inbox::mention(&app, "ana", 1).await;
    let (s, session) = crate::helpers::answer(
        reqwest::Client::new()
            .post(app.url("/v1/inbox/session"))
            .json(&json!({"user_id": "ana", "user_hash": crate::inbox::user_hash(&app, "ana")})),
    )
    .await;
    assert_eq!(s, 200, "{session}");
    let token = session["token"].as_str().expect("token");
    let (_, items) = crate::helpers::answer(
        reqwest::Client::new()
            .get(app.url("/v1/inbox/notifications"))
            .bearer_auth(token),
    )
    .await;
    let item = items["items"][0]["id"].as_str().expect("item").to_owned();
    for _ in 0..2 {
        let (s, b) = crate::helpers::answer(
            reqwest::Client::new()
                .post(app.url(&format!("/v1/inbox/notifications/{item}/read")))
                .bearer_auth(token),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }

    let got = received(&server, 5, 20).await;
    let by_type: std::collections::HashMap<String, Value> = got
        .iter()
        .map(body)
        .map(|b| (b["type"].as_str().unwrap_or_default().to_owned(), b))
        .collect();
    let delivery_of = |t: &str| by_type[t]["data"]["delivery_id"].clone();
    assert_eq!(delivery_of("message.failed"), failed["delivery_id"]);
    assert_eq!(
        by_type["message.failed"]["data"]["reason"],
        "provider_rejected"
    );
    assert_eq!(delivery_of("message.dead"), dead["delivery_id"]);
    assert_eq!(
        by_type["message.dead"]["data"]["reason"],
        "retries_exhausted"
    );
    assert_eq!(delivery_of("message.unsubscribed"), sent["delivery_id"]);
    assert!(by_type["message.unsubscribed"]["data"]["unsubscribed_at"].is_string());
    let in_app = app.deliveries(&nid).await.remove(0);
    assert_eq!(delivery_of("message.seen"), in_app["delivery_id"]);
    assert_eq!(delivery_of("message.read"), in_app["delivery_id"]);
    assert!(by_type["message.read"]["data"]["read_at"].is_string());
    // Each once: a second read is not a first read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.received_requests().await.map(|r| r.len()), Some(5));
    assert_eq!(messages(&app, &id, "delivered").await.len(), 5);
}
