//! The in-app channel and the end user's inbox: items written with their delivery, each
//! endpoint for its own user only, counts that equal the items, and the live socket.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the customer's server computes: hex(HMAC-SHA256(secret, user id)).
pub(crate) fn user_hash(app: &TestApp, user: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(app.settings.inbox.secret.expose().as_bytes()).expect("key");
    mac.update(user.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// An end user's client: their session token on every request, no API key.
struct EndUser {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl EndUser {
    async fn start(app: &TestApp, user: &str) -> Self {
        Self::start_at(app, &app.address, user).await
    }

    async fn start_at(app: &TestApp, base: &str, user: &str) -> Self {
        let (status, session) = answer(
            reqwest::Client::new()
                .post(format!("{base}/v1/inbox/session"))
                .json(&json!({"user_id": user, "user_hash": user_hash(app, user)})),
        )
        .await;
        assert_eq!(status, 200, "{session}");
        Self {
            base: base.to_owned(),
            token: session["token"].as_str().expect("token").to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        answer(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(&self.token),
        )
        .await
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        answer(
            self.http
                .post(format!("{}{path}", self.base))
                .bearer_auth(&self.token),
        )
        .await
    }

    async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(
            self.http
                .put(format!("{}{path}", self.base))
                .bearer_auth(&self.token)
                .json(body),
        )
        .await
    }

    async fn items(&self, query: &str) -> Vec<Value> {
        let (status, page) = self.get(&format!("/v1/inbox/notifications{query}")).await;
        assert_eq!(status, 200, "{page}");
        page["items"].as_array().cloned().unwrap_or_default()
    }

    async fn counts(&self) -> Value {
        let (status, counts) = self.get("/v1/inbox/counts").await;
        assert_eq!(status, 200, "{counts}");
        counts
    }

    async fn socket(&self, after: Option<&str>) -> Socket {
        let mut url = format!(
            "{}/v1/inbox/ws?token={}",
            self.base.replacen("http", "ws", 1),
            self.token
        );
        if let Some(id) = after {
            url.push_str(&format!("&after={id}"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("socket opens");
        ws
    }
}

/// Posts a mention to `user` and waits for its notification to finish.
pub(crate) async fn mention(app: &TestApp, user: &str, n: usize) -> String {
    let (status, body) = app
        .post_event(&json!({"event_type": "mention", "recipients": {"user_ids": [user]},
            "payload": {"author": "Grace", "excerpt": format!("note {n}"), "post_id": format!("p{n}")}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["notification_id"].as_str().expect("id").to_owned();
    app.wait_finished(&id, 30).await;
    id
}

/// The next JSON message of a socket of the given type, skipping others.
async fn next_of(ws: &mut Socket, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} message within 15 s"))
            .expect("socket open")
            .expect("message");
        if let Message::Text(text) = m {
            let v: Value = serde_json::from_str(&text).expect("JSON message");
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// Every item message the socket sends within `window`.
async fn items_within(ws: &mut Socket, window: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Text(text) = m {
            let v: Value = serde_json::from_str(&text).expect("JSON");
            if v["type"] == "notification_received" {
                got.push(v["item"].clone());
            }
        }
    }
    got
}

#[tokio::test]
async fn an_in_app_delivery_is_an_item_its_user_alone_can_read_mark_and_archive() {
    let app = spawn_app().await;
    app.put_user("ana", json!({"first_name": "Ana"})).await;
    app.put_user("bob", json!({"first_name": "Bob"})).await;

    // A wrong hash, another user's hash, a malformed id: no session.
    let sessions = reqwest::Client::new();
    for (body, status, code) in [
        (
            json!({"user_id": "ana", "user_hash": "00".repeat(32)}),
            401,
            "invalid_user_hash",
        ),
        (
            json!({"user_id": "ana", "user_hash": user_hash(&app, "bob")}),
            401,
            "invalid_user_hash",
        ),
        (
            json!({"user_id": "a b", "user_hash": user_hash(&app, "a b")}),
            422,
            "validation_failed",
        ),
    ] {
        let (s, b) = answer(sessions.post(app.url("/v1/inbox/session")).json(&body)).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{b}"
        );
    }
    let ana = EndUser::start(&app, "ana").await;
    let bob = EndUser::start(&app, "bob").await;
    // No token, a forged one, an API key: refused.
    for auth in [
        None,
        Some("not-a-token"),
        Some("admin-key-is-not-a-session"),
    ] {
        let mut r = reqwest::Client::new().get(app.url("/v1/inbox/counts"));
        if let Some(t) = auth {
            r = r.bearer_auth(t);
        }
        let (s, b) = answer(r).await;
        assert_eq!(s, 401, "{b}");
    }

    let nid = mention(&app, "ana", 1).await;
    let deliveries = app.deliveries(&nid).await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0]["channel"], "in_app");
    assert_eq!(deliveries[0]["status"], "sent");
    assert_eq!(deliveries[0]["provider"], "inbox");

    let items = ana.items("").await;
    assert_eq!(items.len(), 1, "{items:?}");
    let item = &items[0];
    assert_eq!(item["title"], "Grace mentioned you");
    assert_eq!(item["body"], "note 1");
    assert_eq!(item["url"], "https://app.example.com/posts/p1");
    assert_eq!(item["data"], json!({"post_id": "p1", "kind": "mention"}));
    assert_eq!(item["event_type"], "mention");
    assert_eq!(item["notification_id"], nid.as_str());
    assert_eq!(item["delivery_id"], deliveries[0]["delivery_id"]);
    assert_eq!(item["read_at"], Value::Null);
    let id = item["id"].as_str().expect("id").to_owned();
    assert_eq!(
        ana.counts().await,
        json!({"unread": 1, "unseen": 1, "total": 1})
    );

    // Bob sees nothing of Ana's, and every action on her item answers as if it did not exist.
    assert!(bob.items("").await.is_empty());
    assert_eq!(
        bob.counts().await,
        json!({"unread": 0, "unseen": 0, "total": 0})
    );
    for action in ["read", "unread", "archive", "unarchive"] {
        let (s, b) = bob
            .post(&format!("/v1/inbox/notifications/{id}/{action}"))
            .await;
        assert_eq!(s, 404, "{action}: {b}");
    }
    assert_eq!(bob.post("/v1/inbox/read").await.1["changed"], 0);
    assert_eq!(bob.post("/v1/inbox/seen").await.1["changed"], 0);
    assert_eq!(
        ana.counts().await["unread"],
        1,
        "Bob changed nothing of Ana's"
    );

    // Read: the item and its delivery (the ops log's engagement).
    let (s, read) = ana
        .post(&format!("/v1/inbox/notifications/{id}/read"))
        .await;
    assert_eq!(s, 200, "{read}");
    assert!(
        read["read_at"].is_string() && read["seen_at"].is_string(),
        "{read}"
    );
    assert_eq!(
        ana.counts().await,
        json!({"unread": 0, "unseen": 0, "total": 1})
    );
    let (_, delivery) = app
        .get(&format!(
            "/v1/deliveries/{}",
            item["delivery_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(delivery["read_at"], read["read_at"], "{delivery}");
    assert_eq!(delivery["seen_at"], read["seen_at"], "{delivery}");
    // A second read keeps the first time.
    let (_, again) = ana
        .post(&format!("/v1/inbox/notifications/{id}/read"))
        .await;
    assert_eq!(again["read_at"], read["read_at"]);

    let (_, unread) = ana
        .post(&format!("/v1/inbox/notifications/{id}/unread"))
        .await;
    assert_eq!(unread["read_at"], Value::Null);
    assert_eq!(ana.items("?status=unread").await.len(), 1);
    assert!(ana.items("?status=read").await.is_empty());

    let (_, archived) = ana
        .post(&format!("/v1/inbox/notifications/{id}/archive"))
        .await;
    assert!(archived["archived_at"].is_string());
    assert!(
        ana.items("").await.is_empty(),
        "archived items leave the list"
    );
    assert_eq!(ana.items("?archived=true").await.len(), 1);
    assert_eq!(
        ana.counts().await,
        json!({"unread": 0, "unseen": 0, "total": 0})
    );
    ana.post(&format!("/v1/inbox/notifications/{id}/unarchive"))
        .await;
    assert_eq!(ana.counts().await["total"], 1);

    // Pages: newest first, a keyset cursor, nothing twice.
    for n in 2..=5 {
        mention(&app, "ana", n).await;
    }
    let mut seen = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let (_, page) = ana.get(&format!("/v1/inbox/notifications{query}")).await;
        for i in page["items"].as_array().expect("items") {
            seen.push(i["body"].as_str().expect("body").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["note 5", "note 4", "note 3", "note 2", "note 1"]);
    for bad in [
        "?limit=0",
        "?limit=101",
        "?cursor=abc",
        "?status=maybe",
        "?colour=red",
    ] {
        let (s, b) = ana.get(&format!("/v1/inbox/notifications{bad}")).await;
        assert_eq!(s, 422, "{bad}: {b}");
    }

    // Seen, then read by event type.
    let (_, seen_all) = ana.post("/v1/inbox/seen").await;
    assert_eq!(seen_all["changed"], 4, "{seen_all}");
    assert_eq!(seen_all["unseen"], 0);
    let (_, other_type) = ana.post("/v1/inbox/read?event_type=welcome").await;
    assert_eq!(other_type["changed"], 0);
    let (_, all_read) = ana.post("/v1/inbox/read?event_type=mention").await;
    assert_eq!(all_read["changed"], 5, "{all_read}");
    assert_eq!(
        ana.counts().await,
        json!({"unread": 0, "unseen": 0, "total": 5})
    );

    // Preferences: the user's own, applied by the worker.
    assert_eq!(ana.get("/v1/inbox/preferences").await.1, json!({}));
    let (s, b) = ana
        .put(
            "/v1/inbox/preferences",
            &json!({"channels": {"fax": false}}),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = ana
        .put(
            "/v1/inbox/preferences",
            &json!({"channels": {"in_app": false}, "muted_event_types": ["promo"]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        ana.get("/v1/inbox/preferences").await.1["channels"]["in_app"],
        false
    );
    let (_, user) = app.get("/v1/users/ana").await;
    assert_eq!(user["preferences"]["muted_event_types"], json!(["promo"]));
    let nid = mention(&app, "ana", 6).await;
    let skipped = app.deliveries(&nid).await;
    assert_eq!(
        (skipped[0]["status"].as_str(), skipped[0]["reason"].as_str()),
        (Some("skipped"), Some("opted_out"))
    );
    assert_eq!(
        ana.counts().await["total"],
        5,
        "an opted-out delivery writes no item"
    );
    // A user herald has no profile of keeps none here.
    let ghost = EndUser::start(&app, "ghost").await;
    let (s, b) = ghost.put("/v1/inbox/preferences", &json!({})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("user_not_found"))
    );
    app.stop().await;
}

#[tokio::test]
async fn counts_equal_the_items_after_concurrent_reads_from_two_sessions() {
    let app = spawn_app().await;
    app.put_user("ana", json!({"first_name": "Ana"})).await;
    let (_, body) = app
        .post_event(
            &json!({"event_type": "mention", "recipients": {"user_ids": ["ana"]},
            "payload": {"author": "A", "excerpt": "first", "post_id": "p0"}}),
        )
        .await;
    app.wait_finished(body["notification_id"].as_str().expect("id"), 30)
        .await;
    for n in 1..30 {
        app.post_event(
            &json!({"event_type": "mention", "recipients": {"user_ids": ["ana"]},
            "payload": {"author": "A", "excerpt": format!("n{n}"), "post_id": format!("p{n}")}}),
        )
        .await;
    }
    let phone = EndUser::start(&app, "ana").await;
    let laptop = EndUser::start(&app, "ana").await;
    for _ in 0..300 {
        if phone.counts().await["total"] == 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let items = phone.items("?limit=100").await;
    assert_eq!(items.len(), 30);
    let ids: Vec<String> = items
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_owned())
        .collect();
    // Both sessions at once: one reads, unreads and archives items one by one, the other
    // marks everything seen and read in bulk.
    let one = async {
        for (k, id) in ids.iter().enumerate() {
            let action = ["read", "unread", "read", "archive"][k % 4];
            let (s, b) = phone
                .post(&format!("/v1/inbox/notifications/{id}/{action}"))
                .await;
            assert_eq!(s, 200, "{b}");
        }
    };
    let other = async {
        for _ in 0..3 {
            assert_eq!(laptop.post("/v1/inbox/seen").await.0, 200);
            assert_eq!(laptop.post("/v1/inbox/read").await.0, 200);
        }
    };
    tokio::join!(one, other);
    let live = laptop.items("?limit=100").await;
    let unread = live.iter().filter(|i| i["read_at"].is_null()).count();
    let unseen = live.iter().filter(|i| i["seen_at"].is_null()).count();
    assert_eq!(
        phone.counts().await,
        json!({"unread": unread, "unseen": unseen, "total": live.len()}),
        "the counts say what the items say"
    );
    assert_eq!(
        live.len() + laptop.items("?archived=true&limit=100").await.len(),
        30
    );
    app.stop().await;
}

#[tokio::test]
async fn the_socket_pushes_new_items_and_counts_changed_by_another_session() {
    let app = spawn_app().await;
    app.put_user("ana", json!({"first_name": "Ana"})).await;
    let ana = EndUser::start(&app, "ana").await;
    let other_tab = EndUser::start(&app, "ana").await;
    let mut ws = ana.socket(None).await;
    let first = next_of(&mut ws, "counts_changed").await;
    assert_eq!(first["unread"], 0, "{first}");
    app.assert_metrics(&["herald_inbox_sockets 1", "herald_inbox_following 1"])
        .await;

    mention(&app, "ana", 1).await;
    let got = next_of(&mut ws, "notification_received").await;
    assert_eq!(got["item"]["body"], "note 1", "{got}");
    let counts = next_of(&mut ws, "counts_changed").await;
    assert_eq!(
        (counts["unread"].as_i64(), counts["unseen"].as_i64()),
        (Some(1), Some(1))
    );

    // Another tab reads it: this socket hears of it.
    let id = got["item"]["id"].as_str().expect("id");
    other_tab
        .post(&format!("/v1/inbox/notifications/{id}/read"))
        .await;
    let counts = next_of(&mut ws, "counts_changed").await;
    assert_eq!(
        (counts["unread"].as_i64(), counts["unseen"].as_i64()),
        (Some(0), Some(0))
    );

    // Pings arrive; an answered socket stays open.
    ws.send(Message::Text("{}".into())).await.expect("send");
    ws.close(None).await.expect("close");

    // Not a socket, or no valid token: refused with our codes.
    let (s, b) =
        answer(reqwest::Client::new().get(app.url(&format!("/v1/inbox/ws?token={}", ana.token))))
            .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (426, Some("upgrade_required"))
    );
    let refused = tokio_tungstenite::connect_async(
        app.url("/v1/inbox/ws?token=forged")
            .replacen("http", "ws", 1),
    )
    .await;
    assert!(refused.is_err(), "a forged token opens no socket");
    app.stop().await;
}

#[tokio::test]
async fn a_resumed_socket_gets_what_it_missed_exactly_once() {
    let app = spawn_app().await;
    app.put_user("ana", json!({"first_name": "Ana"})).await;
    let ana = EndUser::start(&app, "ana").await;
    let bodies = |items: &[Value]| -> Vec<String> {
        items
            .iter()
            .map(|i| i["body"].as_str().expect("body").to_owned())
            .collect()
    };
    let mut ws = ana.socket(None).await;
    mention(&app, "ana", 1).await;
    let seen = next_of(&mut ws, "notification_received").await["item"].clone();
    drop(ws); // the connection drops
    for n in 2..=4 {
        mention(&app, "ana", n).await;
    }
    // Meanwhile another device archived one of them: it is not sent as new.
    let note3 = ana
        .items("")
        .await
        .into_iter()
        .find(|i| i["body"] == "note 3")
        .expect("note 3");
    ana.post(&format!(
        "/v1/inbox/notifications/{}/archive",
        note3["id"].as_str().expect("id")
    ))
    .await;
    let mut ws = ana.socket(Some(seen["id"].as_str().expect("id"))).await;
    let missed = items_within(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(
        bodies(&missed),
        ["note 2", "note 4"],
        "in order, each once, the archived one left out"
    );
    // Live again after the catch-up, still once.
    mention(&app, "ana", 5).await;
    let more = items_within(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(bodies(&more), ["note 5"]);
    drop(ws);
    // By number: a page's `latest_seq` (the newest item, listed or not) resumes after it.
    let (_, page) = ana.get("/v1/inbox/notifications?limit=1").await;
    assert_eq!(page["latest_seq"], 5, "{page}");
    assert_eq!(page["items"][0]["seq"], 5);
    mention(&app, "ana", 6).await;
    let url = format!(
        "{}/v1/inbox/ws?token={}&after_seq=4",
        app.address.replacen("http", "ws", 1),
        ana.token
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("socket");
    let missed = items_within(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(bodies(&missed), ["note 5", "note 6"]);
    app.stop().await;
}

#[tokio::test]
async fn a_process_that_did_not_write_the_item_pushes_it_to_its_sockets() {
    let app = spawn_app().await;
    app.put_user("ana", json!({"first_name": "Ana"})).await;
    let other = app.second_api().await;
    let ana = EndUser::start_at(&app, &other.address, "ana").await;
    let mut ws = ana.socket(None).await;
    next_of(&mut ws, "counts_changed").await;
    // Posted to the first process and delivered by its worker; the socket is on the second.
    mention(&app, "ana", 1).await;
    let got = next_of(&mut ws, "notification_received").await;
    assert_eq!(got["item"]["body"], "note 1");
    drop(ws);
    other.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn browsers_of_allowed_origins_alone_may_call_the_inbox() {
    let app = spawn_app_with(TestOptions {
        env: vec![(
            "HERALD__INBOX__ALLOWED_ORIGINS".into(),
            "https://app.example.com".into(),
        )],
        ..Default::default()
    })
    .await;
    let preflight = |origin: &'static str, path: &'static str| {
        reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, app.url(path))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com", "/v1/inbox/session")
        .await
        .expect("preflight");
    assert_eq!(
        allowed
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().ok()),
        Some(Some("https://app.example.com"))
    );
    for (origin, path) in [
        ("https://evil.example.net", "/v1/inbox/session"),
        ("https://app.example.com", "/v1/events"),
    ] {
        let r = preflight(origin, path).await.expect("preflight");
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{origin} {path}"
        );
    }
    // The socket checks the Origin itself (CORS does not cover WebSockets).
    app.put_user("ana", json!({"first_name": "Ana"})).await;
    let ana = EndUser::start(&app, "ana").await;
    let url = format!(
        "{}/v1/inbox/ws?token={}",
        app.address.replacen("http", "ws", 1),
        ana.token
    );
    for (origin, opens) in [
        ("https://app.example.com", true),
        ("https://evil.example.net", false),
    ] {
        let mut request = url.as_str().into_client_request().expect("request");
        request
            .headers_mut()
            .insert("Origin", origin.parse().expect("header"));
        let opened = tokio_tungstenite::connect_async(request).await;
        assert_eq!(opened.is_ok(), opens, "{origin}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widget_works_in_a_real_browser() {
    if !crate::console::browser_ready() {
        return;
    }
    let app = spawn_app().await;
    let user = app.settings.inbox.demo_user.clone();
    app.put_user(&user, json!({"first_name": "Ada"})).await;
    let (_, body) = app
        .post_event(
            &json!({"event_type": "note", "recipients": {"user_ids": [user]},
            "payload": {"title": "Welcome", "text": "before the page opened"}}),
        )
        .await;
    app.wait_finished(body["notification_id"].as_str().expect("id"), 30)
        .await;
    let (_, key) = app
        .ctx
        .store
        .create_key(
            "inbox-e2e",
            &[herald::domain::Scope::Admin],
            Some(herald::domain::Rate::new(1e6).expect("rate")),
        )
        .await
        .expect("key");
    let shots = crate::console::screenshots().display().to_string();
    crate::console::run_in_browser(
        "inbox.mjs",
        &[
            ("HERALD_URL", &app.address),
            ("HERALD_KEY", &key),
            ("INBOX_USER", &user),
            ("SCREENSHOTS", &shots),
        ],
    )
    .await;
    // What the clicks did, read back from herald: the read item's delivery shows it.
    let (_, log) = app
        .get(&format!("/v1/deliveries?user_id={user}&limit=100"))
        .await;
    let items = log["items"].as_array().expect("items");
    assert_eq!(items.len(), 23, "every note was delivered in-app");
    assert!(
        items
            .iter()
            .all(|d| d["channel"] == "in_app" && d["status"] == "sent"),
        "{log}"
    );
    assert!(
        items.iter().filter(|d| d["read_at"].is_string()).count() >= 2,
        "the clicked item and mark-all-read show on the deliveries"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_socket_is_pinged_a_silent_one_closed_and_a_lapsed_session_ends_with_4001() {
    let app = spawn_app_with(TestOptions {
        env: vec![("HERALD__INBOX__PING_SECS".into(), "1".into())],
        ..Default::default()
    })
    .await;
    app.put_user("ana", json!({"first_name": "Ana"})).await;
    let ana = EndUser::start(&app, "ana").await;

    // Pings come every second; answering them (tungstenite does, while read) keeps it open.
    let mut ws = ana.socket(None).await;
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(4_500);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
        match m {
            Message::Ping(_) => pings += 1,
            Message::Close(c) => panic!("an answering socket was closed: {c:?}"),
            _ => {}
        }
    }
    assert!(pings >= 3, "{pings} pings in 4.5 s");
    // A peer that stops answering (not read, so no pongs) is closed after three pings.
    tokio::time::sleep(Duration::from_secs(5)).await;
    app.assert_metrics(&["herald_inbox_sockets 0"]).await;
    drop(ws);

    // A token that lapses closes its socket with 4001, and is refused by the routes.
    let key = {
        use hmac::Mac;
        let mut derive =
            Hmac::<Sha256>::new_from_slice(app.settings.inbox.secret.expose().as_bytes())
                .expect("key");
        derive.update(b"herald inbox session tokens v1");
        derive.finalize().into_bytes()
    };
    let now = chrono::Utc::now().timestamp();
    let short = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "ana", "aud": "herald-inbox", "iat": now, "exp": now + 2}),
        &jsonwebtoken::EncodingKey::from_secret(&key),
    )
    .expect("token");
    let lapsing = EndUser {
        base: app.address.clone(),
        token: short,
        http: reqwest::Client::new(),
    };
    assert_eq!(
        lapsing.get("/v1/inbox/counts").await.0,
        200,
        "herald's own signature"
    );
    let mut ws = lapsing.socket(None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let code = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                assert!(
                    chrono::Utc::now().timestamp() > now + 2,
                    "closed while the token was still good"
                );
                break u16::from(frame.code);
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, 4001);
    let (s, b) = lapsing.get("/v1/inbox/counts").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("invalid_session"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_campaign_to_a_segment_writes_each_members_item_once() {
    let app = spawn_app().await;
    for u in ["ana", "bob", "cy"] {
        app.put_user(u, json!({"first_name": u, "tags": ["beta"]}))
            .await;
    }
    // Groups and segments go through campaign chunks, whose records are written with
    // their outcomes: the item comes with them.
    let (status, body) = app
        .post_event(
            &json!({"event_type": "mention", "recipients": {"segment": {"tag": "beta"}},
            "payload": {"author": "Grace", "excerpt": "to all", "post_id": "p1"}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let nid = body["notification_id"].as_str().expect("id").to_owned();
    app.wait_finished(&nid, 30).await;
    for u in ["ana", "bob", "cy"] {
        let user = EndUser::start(&app, u).await;
        let items = user.items("").await;
        assert_eq!(items.len(), 1, "{u}: {items:?}");
        assert_eq!(items[0]["notification_id"], nid.as_str());
    }
    assert_eq!(app.count("inbox").await, 3);
    let deliveries = app.deliveries(&nid).await;
    assert!(
        deliveries
            .iter()
            .all(|d| d["status"] == "sent" && d["provider"] == "inbox"),
        "{deliveries:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn each_user_has_a_request_budget_of_their_own() {
    let app = spawn_app_with(TestOptions {
        env: vec![
            ("HERALD__INBOX__RATE_PER_SEC".into(), "0.2".into()),
            ("HERALD__INBOX__BURST".into(), "3".into()),
        ],
        ..Default::default()
    })
    .await;
    let ana = EndUser::start(&app, "ana").await;
    let laptop = EndUser::start(&app, "ana").await;
    let bob = EndUser::start(&app, "bob").await;
    // Every tab and device of one user draws on one budget.
    for _ in 0..2 {
        assert_eq!(ana.get("/v1/inbox/counts").await.0, 200);
    }
    assert_eq!(laptop.get("/v1/inbox/counts").await.0, 200);
    let r = reqwest::Client::new()
        .get(app.url("/v1/inbox/counts"))
        .bearer_auth(&laptop.token)
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status().as_u16(), 429);
    let wait: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=5).contains(&wait), "{wait}");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limited");
    // Opening a socket counts too; another user is not held back.
    let refused = tokio_tungstenite::connect_async(format!(
        "{}/v1/inbox/ws?token={}",
        app.address.replacen("http", "ws", 1),
        ana.token
    ))
    .await;
    assert!(refused.is_err(), "a socket over the budget is refused");
    assert_eq!(bob.get("/v1/inbox/counts").await.0, 200);
    app.stop().await;
}
