//! The web console: its sign-in and what it adds to the API, then the whole console in
//! headless Chromium (tests/ui/console.mjs) against a seeded herald.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn admin_key(app: &TestApp, name: &str) -> String {
    app.ctx
        .store
        .create_key(
            name,
            &[herald::domain::Scope::Admin],
            Some(herald::domain::Rate::new(1e6).expect("rate")),
        )
        .await
        .expect("key")
        .1
}

/// Signs in through the form; returns the cookie pair to send back.
async fn sign_in(app: &TestApp, key: &str) -> reqwest::Response {
    no_redirects()
        .post(app.url("/ui/login"))
        .form(&[("key", key)])
        .send()
        .await
        .expect("login")
}

#[tokio::test]
async fn the_console_signs_in_with_a_server_side_session_kept_in_an_http_only_cookie() {
    let app = spawn_app().await;
    let http = no_redirects();
    let r = http.get(app.url("/ui")).send().await.expect("ui");
    assert_eq!(r.status(), 303, "not signed in: to the sign-in page");
    assert_eq!(r.headers()["location"], "/ui/login");
    let r = http.get(app.url("/ui/login")).send().await.expect("login");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-security-policy"]
        .to_str()
        .expect("as expected")
        .contains("default-src 'self'"));

    let r = sign_in(&app, "hrld_nope_0000").await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r
        .text()
        .await
        .expect("as expected")
        .contains("unknown or revoked"));
    let r = sign_in(&app, "<b>\r\nx").await;
    assert_eq!(
        r.status(),
        401,
        "not a key's shape: refused without a lookup"
    );

    let key = admin_key(&app, "console").await;
    let r = sign_in(&app, &key).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui");
    let set = r.headers()["set-cookie"]
        .to_str()
        .expect("as expected")
        .to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "served over plain HTTP: {set}");
    let cookie = set.split(';').next().expect("as expected").to_owned();
    assert!(
        !cookie.contains(&key),
        "the cookie holds a session id, not the key"
    );
    let secret = key.rsplit('_').next().expect("the key's secret");
    assert!(!cookie.contains(secret), "{cookie}");

    let r = http
        .get(app.url("/ui"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("ui");
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .expect("as expected")
        .contains("/ui/assets/app.js"));
    let (status, me) = answer(http.get(app.url("/ui/session")).header("cookie", &cookie)).await;
    assert_eq!((status, me["name"].as_str()), (200, Some("console")));
    for (asset, media) in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
    ] {
        let r = http
            .get(app.url(&format!("/ui/assets/{asset}")))
            .send()
            .await
            .expect("asset");
        assert_eq!(r.status(), 200, "{asset}");
        assert!(r.headers()["content-type"]
            .to_str()
            .expect("as expected")
            .starts_with(media));
    }

    // The cookie works on the API; a change needs the console's header too.
    let (status, _) = answer(
        http.get(app.url("/v1/deliveries"))
            .header("cookie", &cookie),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = answer(
        http.post(app.url("/v1/schedules/nope/pause"))
            .header("cookie", &cookie),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("console_header_missing"))
    );
    let (status, body) = answer(
        http.post(app.url("/v1/schedules/nope/pause"))
            .header("cookie", &cookie)
            .header("x-herald-console", "1"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    // Revoking the key signs the console out.
    let key_id = me["key_id"].as_str().expect("as expected");
    assert_eq!(app.delete(&format!("/v1/keys/{key_id}")).await, 204);
    let r = http
        .get(app.url("/ui"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("ui");
    assert_eq!(r.status(), 303);

    let r = http
        .post(app.url("/ui/logout"))
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .expect("as expected")
        .contains("Max-Age=0"));

    // Behind an HTTPS proxy the cookie is `Secure`; signing out ends the session on the
    // server, so a copy of the cookie kept elsewhere stops working too.
    let key = admin_key(&app, "console-2").await;
    let r = no_redirects()
        .post(app.url("/ui/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("key", key.as_str())])
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(set.contains("; Secure"), "{set}");
    let cookie = set.split(';').next().expect("as expected").to_owned();
    let (status, _) = answer(http.get(app.url("/ui/session")).header("cookie", &cookie)).await;
    assert_eq!(status, 200);
    let r = http
        .post(app.url("/ui/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 303);
    let (status, _) = answer(http.get(app.url("/ui/session")).header("cookie", &cookie)).await;
    assert_eq!(status, 401, "the session ended on the server");
    let (status, body) = answer(
        http.get(app.url("/v1/deliveries"))
            .header("cookie", &cookie),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    app.stop().await;
}

#[tokio::test]
async fn the_cron_preview_gives_the_next_fires_or_the_create_errors_and_writes_nothing() {
    let app = spawn_app().await;
    let (status, body) = app
        .post(
            "/v1/schedules/preview",
            &json!({"cron": "30 8 * * MON-FRI", "timezone": "Europe/Paris",
                    "start_at": "2031-01-01T00:00:00Z", "count": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let at: Vec<&str> = body["items"]
        .as_array()
        .expect("as expected")
        .iter()
        .map(|i| i["at"].as_str().expect("as expected"))
        .collect();
    assert_eq!(
        at,
        [
            "2031-01-01T07:30:00Z",
            "2031-01-02T07:30:00Z",
            "2031-01-03T07:30:00Z"
        ]
    );
    assert_eq!(body["items"][0]["local"], "2031-01-01T08:30:00+01:00");

    let (status, body) = app
        .post("/v1/schedules/preview", &json!({"cron": "61 * * * *"}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_cron"))
    );
    assert_eq!(body["error"]["details"][0]["field"], "cron");
    let (status, body) = app
        .post(
            "/v1/schedules/preview",
            &json!({"cron": "0 9 * * *", "timezone": "Mars/Olympus"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("unknown_timezone"))
    );
    let (status, body) = app
        .post(
            "/v1/schedules/preview",
            &json!({"cron": "0 9 * * *", "count": 0, "extra": 1}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(
        body["error"]["details"]
            .as_array()
            .expect("as expected")
            .len(),
        2
    );
    assert_eq!(app.count("schedules").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_template_draft_renders_before_it_is_saved_and_its_source_can_be_read() {
    let app = spawn_app().await;
    let (status, t) = app.get("/v1/templates/greeting/email").await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["origin"], "file");
    assert_eq!(
        t["parts"]["subject"].as_str().map(str::trim),
        Some("Hello {{user.first_name}}")
    );
    assert!(t["parts"]["html"]
        .as_str()
        .expect("as expected")
        .contains("payload.note"));
    let (status, pt) = app.get("/v1/templates/greeting/email?locale=pt").await;
    assert_eq!(status, 200);
    assert_eq!(
        pt["parts"].as_object().expect("as expected").len(),
        1,
        "only the subject"
    );
    let (status, _) = app.get("/v1/templates/greeting/push").await;
    assert_eq!(status, 404);

    let preview = |draft: Value| {
        json!({"event_type": "greeting", "channel": "email", "user": {"first_name": "Ana"},
               "payload": {"note": "n"}, "draft": draft})
    };
    let (status, body) = app
        .post(
            "/v1/templates/preview",
            &preview(
                json!({"subject": "Draft for {{user.first_name}}", "text": "t {{payload.note}}"}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rendered"]["subject"], "Draft for Ana");
    assert_eq!(body["rendered"]["text"], "t n");
    assert_eq!(
        body["rendered"]["html"],
        Value::Null,
        "only the draft's parts"
    );
    let (status, body) = app
        .post(
            "/v1/templates/preview",
            &preview(json!({"subject": "{{#if}", "text": "x"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("template_invalid"))
    );
    assert_eq!(body["error"]["details"][0]["field"], "subject");
    // The stored template did not change.
    let (_, body) = app
        .post(
            "/v1/templates/preview",
            &json!({"event_type": "greeting", "channel": "email", "user": {"first_name": "Ana"}, "payload": {"note": "n"}}),
        )
        .await;
    assert_eq!(body["rendered"]["subject"], "Hello Ana");
    assert_eq!(app.count("templates").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_preview_renders_its_message_and_queues_report_each_lane() {
    let app = spawn_app().await;
    app.put_user(
        "ana",
        json!({"email": "ana@example.com", "first_name": "Ana"}),
    )
    .await;
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["ana"]}, "payload": {"note": "hi"}}))
        .await;
    assert_eq!(status, 202);
    let nid = body["notification_id"]
        .as_str()
        .expect("as expected")
        .to_owned();
    app.wait_finished(&nid, 30).await;
    let id = app.deliveries(&nid).await[0]["delivery_id"]
        .as_str()
        .expect("as expected")
        .to_owned();
    let (status, p) = app.get(&format!("/v1/deliveries/{id}/preview")).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["rendered"]["subject"], "Hello Ana");
    assert_eq!(
        p["rendered"]["html"].as_str().map(str::trim),
        Some("<p>Hi Ana, hi</p>")
    );
    let (status, _) = app.get("/v1/deliveries/nope/preview").await;
    assert_eq!(status, 404);

    let (status, q) = app.get("/v1/queues").await;
    assert_eq!(status, 200, "{q}");
    for lane in ["high", "normal", "low"] {
        assert!(q["lanes"][lane].is_u64(), "{q}");
    }
    assert!(q["outbox"].is_u64());
    app.stop().await;
}

/// What the browser test needs: node, Chromium and the installed playwright-core.
pub(crate) fn browser_missing(ui: &Path) -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!("no Chromium at {chromium}"));
    }
    if !ui.join("node_modules/playwright-core").exists() {
        return Some("tests/ui has no node_modules (npm ci --prefix tests/ui)".into());
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no node on PATH".into()),
    }
}

/// True when the browser tests can run here; else says why (and fails where
/// `HERALD_BROWSER_TESTS=require`, as scripts/test sets, so CI cannot skip them).
pub(crate) fn browser_ready() -> bool {
    let ui = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let Some(why) = browser_missing(&ui) else {
        return true;
    };
    assert!(
        std::env::var("HERALD_BROWSER_TESTS").as_deref() != Ok("require"),
        "the browser test cannot run: {why}"
    );
    eprintln!("skipping the browser test: {why}");
    false
}

/// Where the browser tests put their screenshots.
pub(crate) fn screenshots() -> PathBuf {
    std::env::var("HERALD_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("var/screenshots"))
}

/// Runs `tests/ui/<script>` in node (it drives headless Chromium) with `env`; fails the
/// test with its log unless it succeeds within 4 minutes.
pub(crate) async fn run_in_browser(script: &str, env: &[(&str, &str)]) {
    let ui = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let mut command = tokio::process::Command::new("node");
    command.arg(ui.join(script)).kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(240), command.output())
        .await
        .expect("the browser test finishes within 4 minutes")
        .expect("node runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{log}");
    assert!(out.status.success(), "the browser test failed:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    if !browser_ready() {
        return;
    }
    let app = spawn_app_with(TestOptions {
        env: vec![(
            "HERALD__WEBHOOK__ALLOW_INTERNAL_TARGETS".into(),
            "true".into(),
        )],
        ..TestOptions::default()
    })
    .await;
    let receiver = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    for (id, name) in [("ana", "Ana"), ("bruno", "Bruno")] {
        app.put_user(
            id,
            json!({"email": format!("{id}@example.com"), "first_name": name}),
        )
        .await;
    }
    // Bruno's mailbox refuses the message for good: a dead letter to replay.
    app.smtp.refuse_next(1, "550 5.1.1 no such mailbox");
    let mut notifications = Vec::new();
    for user in ["bruno", "ana"] {
        let (status, body) = app
            .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                                "recipients": {"user_ids": [user]}, "payload": {"note": "seed"}}))
            .await;
        assert_eq!(status, 202);
        let nid = body["notification_id"]
            .as_str()
            .expect("as expected")
            .to_owned();
        app.wait_finished(&nid, 30).await;
        notifications.push(nid);
    }
    let key = admin_key(&app, "console-e2e").await;
    let shots = screenshots();
    const SHOTS: [&str; 12] = [
        "login",
        "deliveries",
        "delivery",
        "live",
        "overview",
        "dead-letters",
        "campaign-new",
        "campaign",
        "campaigns",
        "template",
        "webhooks",
        "webhook",
    ];
    for shot in SHOTS {
        let _ = std::fs::remove_file(shots.join(format!("{shot}.png")));
    }
    let campaign = "E2E weekday digest";
    run_in_browser(
        "console.mjs",
        &[
            ("HERALD_URL", &app.address),
            ("HERALD_KEY", &key),
            ("SCREENSHOTS", &shots.display().to_string()),
            ("FIND_USER", "ana"),
            ("DEAD_USER", "bruno"),
            ("CAMPAIGN_NAME", campaign),
            ("HOOK_URL", &format!("{}/hooks", receiver.uri())),
        ],
    )
    .await;

    // What the clicks did, read back from herald.
    let (_, letters) = app
        .get(&format!(
            "/v1/dead-letters?notification_id={}&include_replayed=true",
            notifications[0]
        ))
        .await;
    assert_eq!(letters["items"][0]["replay_count"], 1, "{letters}");
    let (_, schedules) = app.get("/v1/schedules").await;
    let created: Vec<&Value> = schedules["items"]
        .as_array()
        .expect("as expected")
        .iter()
        .filter(|s| s["name"] == campaign)
        .collect();
    assert_eq!(created.len(), 1, "{schedules}");
    assert_eq!(created[0]["status"], "paused");
    assert_eq!(created[0]["cron"], "30 8 * * MON-FRI");
    assert_eq!(created[0]["timezone"], "Europe/Paris");
    let (_, t) = app.get("/v1/templates/greeting/email").await;
    assert_eq!(t["origin"], "api");
    assert_eq!(t["parts"]["subject"], "Welcome aboard, {{user.first_name}}");
    // The endpoint's event, then its replay: twice, under one webhook-id.
    let hooks = receiver.received_requests().await.unwrap_or_default();
    let ids: Vec<_> = hooks
        .iter()
        .filter_map(|r| r.headers.get("webhook-id").and_then(|v| v.to_str().ok()))
        .collect();
    assert!(
        ids.len() >= 2 && ids.iter().all(|i| *i == ids[0]),
        "{ids:?}"
    );
    for shot in SHOTS {
        assert!(shots.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
    app.stop().await;
}
