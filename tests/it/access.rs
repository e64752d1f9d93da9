//! API keys (401/403/429, CLI and API), `/metrics`, `/openapi.json` and `/docs`.

use std::collections::BTreeSet;

use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

use crate::helpers::{answer, client_with_key, spawn_app, spawn_app_with, TestApp, TestOptions};

async fn key(app: &TestApp, scopes: &[&str], rate: Option<f64>) -> String {
    let mut body = json!({"name": "t", "scopes": scopes});
    if let Some(r) = rate {
        body["rate_per_sec"] = json!(r);
    }
    let (status, created) = app.post("/v1/keys", &body).await;
    assert_eq!(status, 201, "{created}");
    created["key"].as_str().expect("key").to_owned()
}

async fn get_with(
    app: &TestApp,
    key: Option<&str>,
    path: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let client = match key {
        Some(k) => client_with_key(k),
        None => reqwest::Client::new(),
    };
    let r = client.get(app.url(path)).send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

async fn post_event_with(app: &TestApp, key: &str) -> u16 {
    let event = json!({"event_type": "greeting", "recipients": {"user_ids": ["u1"]}});
    answer(
        client_with_key(key)
            .post(app.url("/v1/events"))
            .json(&event),
    )
    .await
    .0
}

#[tokio::test]
async fn requests_without_a_valid_key_are_401_and_without_the_scope_403() {
    let app = spawn_app().await;
    let (status, body, headers) = get_with(&app, None, "/v1/deliveries").await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "missing_api_key");
    assert_eq!(headers["www-authenticate"], "Bearer");
    for bad in ["hrld_000000000000_00", "nonsense", "hrld_"] {
        let (status, body, _) = get_with(&app, Some(bad), "/v1/deliveries").await;
        assert_eq!(status, 401, "{bad}");
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
    let events_only = key(&app, &["events:write"], None).await;
    let (status, body, _) = get_with(&app, Some(&events_only), "/v1/deliveries").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "insufficient_scope");
    assert!(body["error"]["message"]
        .as_str()
        .expect("msg")
        .contains("logs:read"));
    let (status, _, _) = get_with(&app, Some(&events_only), "/v1/keys").await;
    assert_eq!(status, 403, "only admin keys manage keys");
    // The right scope passes; writing with it leaves nothing behind when refused.
    let reader = key(&app, &["logs:read"], None).await;
    let (status, _, _) = get_with(&app, Some(&reader), "/v1/deliveries").await;
    assert_eq!(status, 200);
    assert_eq!(post_event_with(&app, &reader).await, 403);
    assert_eq!(
        app.db
            .collection::<Document>("notifications")
            .count_documents(doc! {})
            .await
            .expect("count"),
        0
    );
    assert_eq!(post_event_with(&app, &events_only).await, 202);
    // Health and readiness stay open; so does /metrics by default.
    for open in ["/health", "/ready", "/metrics", "/openapi.json", "/docs"] {
        let r = reqwest::get(app.url(open)).await.expect("request");
        assert!(r.status().is_success(), "{open}: {}", r.status());
    }
    app.stop().await;
}

#[tokio::test]
async fn keys_are_shown_once_stored_as_hashes_and_revocable() {
    let app = spawn_app().await;
    let (status, created) = app
        .post(
            "/v1/keys",
            &json!({"name": "billing", "scopes": ["events:write", "logs:read"]}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let plain = created["key"].as_str().expect("key").to_owned();
    let id = created["key_id"].as_str().expect("id").to_owned();
    let stored = app
        .db
        .collection::<Document>("api_keys")
        .find_one(doc! {"_id": &id})
        .await
        .expect("find")
        .expect("stored");
    assert!(
        !stored.to_string().contains(&plain[plain.len() - 20..]),
        "the secret is not stored"
    );
    assert_eq!(stored.get_str("hash").expect("hash").len(), 64);
    let (_, list) = app.get("/v1/keys").await;
    let listed = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|k| k["key_id"] == id.as_str())
        .expect("listed")
        .clone();
    assert!(
        listed.get("key").is_none() && listed.get("hash").is_none(),
        "{listed}"
    );
    assert_eq!(listed["scopes"], json!(["events:write", "logs:read"]));

    let (status, _, _) = get_with(&app, Some(&plain), "/v1/deliveries").await;
    assert_eq!(status, 200);
    assert_eq!(app.delete(&format!("/v1/keys/{id}")).await, 204);
    let (status, body, _) = get_with(&app, Some(&plain), "/v1/deliveries").await;
    assert_eq!(status, 401, "a revoked key stops working at once: {body}");
    assert_eq!(app.delete(&format!("/v1/keys/{id}")).await, 404);

    let (status, body) = app
        .post("/v1/keys", &json!({"name": "x", "scopes": ["root"]}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "scopes");
    app.stop().await;
}

#[tokio::test]
async fn a_key_created_by_the_cli_works_and_replace_revokes_the_old_one() {
    let app = spawn_app().await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(args)
            .env("MONGODB_URI", crate::helpers::mongodb_uri())
            .env("HERALD__MONGODB__DATABASE", app.ctx.store.database_name())
            .env("HERALD__LOG__LEVEL", "warn")
            .output()
            .expect("herald runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    let first = run(&[
        "keys",
        "create",
        "--name",
        "ops",
        "--scopes",
        "logs:read",
        "--quiet",
    ])
    .trim()
    .to_owned();
    let (status, _, _) = get_with(&app, Some(&first), "/v1/deliveries").await;
    assert_eq!(status, 200);
    let second = run(&[
        "keys",
        "create",
        "--name",
        "ops",
        "--scopes",
        "logs:read",
        "--replace",
        "--quiet",
    ])
    .trim()
    .to_owned();
    assert_ne!(first, second);
    let (status, _, _) = get_with(&app, Some(&second), "/v1/deliveries").await;
    assert_eq!(status, 200);
    let listed = run(&["keys", "list"]);
    assert_eq!(
        listed
            .lines()
            .filter(|l| l.contains("\tops\t") && l.contains("\tlive\t"))
            .count(),
        1,
        "{listed}"
    );
    assert_eq!(
        listed
            .lines()
            .filter(|l| l.contains("\tops\t") && l.contains("\trevoked\t"))
            .count(),
        1,
        "{listed}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_rate_no_bucket_can_honour_is_refused_and_one_stored_earlier_panics_nothing() {
    let app = spawn_app().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["keys", "create", "--name", "z", "--scopes", "logs:read"])
        .args(["--rate-per-sec", "0"])
        .env("MONGODB_URI", crate::helpers::mongodb_uri())
        .env("HERALD__MONGODB__DATABASE", app.ctx.store.database_name())
        .env("HERALD__LOG__LEVEL", "warn")
        .output()
        .expect("herald runs");
    assert!(!out.status.success(), "a zero rate is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rate-per-sec"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in [json!(0), json!(-1), json!(1e-30)] {
        let (status, body) = app
            .post(
                "/v1/keys",
                &json!({"name": "z", "scopes": ["logs:read"], "rate_per_sec": bad}),
            )
            .await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["error"]["details"][0]["field"], "rate_per_sec");
    }

    // A key stored with rate 0 before rates were checked: its bucket used to panic on
    // the request after the burst (1 request), resetting the connection.
    let (_, plain) = app
        .ctx
        .store
        .create_key("legacy", &[herald::domain::Scope::LogsRead], None)
        .await
        .expect("key");
    let id = plain.split('_').nth(1).expect("id").to_owned();
    app.db
        .collection::<Document>("api_keys")
        .update_one(doc! {"_id": &id}, doc! {"$set": {"rate_per_sec": 0.0}})
        .await
        .expect("stored");
    for _ in 0..3 {
        let (status, body, _) = get_with(&app, Some(&plain), "/v1/deliveries").await;
        assert_eq!(status, 200, "the configured rate applies: {body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_process_told_to_stop_drains_and_exits_cleanly() {
    let app = spawn_app().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let files = std::env::temp_dir().join(format!("herald-exit-{port}"));
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("all")
        .env("MONGODB_URI", crate::helpers::mongodb_uri())
        .env("AMQP_URL", crate::helpers::amqp_url())
        .env("HERALD__MONGODB__DATABASE", app.ctx.store.database_name())
        .env("HERALD__AMQP__PREFIX", app.ctx.broker.names().prefix())
        // The same retry tiers as the test app's, so its clean-up deletes them all.
        .env(
            "HERALD__WORKER__MAX_ATTEMPTS",
            app.ctx.settings.worker.max_attempts.to_string(),
        )
        .env("HERALD__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("HERALD__EMAIL__FILE_DIR", files.join("email"))
        .env("HERALD__SMS__RECORD_DIR", &files)
        .env("HERALD__PUSH__RECORD_DIR", &files)
        .env("HERALD__LOG__LEVEL", "warn")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("herald starts");
    let mut up = false;
    for _ in 0..100 {
        if reqwest::get(format!("http://127.0.0.1:{port}/health"))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(up, "herald all answered /health");
    let pid = child.id().expect("pid").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(signalled.success());
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("it stops within its drain deadline")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(&files);
    app.stop().await;
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let app = spawn_app().await;
    let slow = key(&app, &["logs:read"], Some(0.5)).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..3 {
        let (status, body, headers) = get_with(&app, Some(&slow), "/v1/deliveries").await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited");
            retry_after = headers
                .get("retry-after")
                .map(|v| v.to_str().expect("ascii").to_owned());
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        vec![200, 429, 429],
        "a burst of one at 0.5/s, then refused"
    );
    let secs: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
    assert!((1..=2).contains(&secs), "{secs}");
    // Other keys are not slowed by it.
    let (status, _) = app.get("/v1/deliveries").await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn metrics_can_require_a_key() {
    let app = spawn_app_with(TestOptions {
        env: vec![("HERALD__AUTH__OPEN_METRICS".into(), "false".into())],
        ..Default::default()
    })
    .await;
    let r = reqwest::get(app.url("/metrics")).await.expect("request");
    assert_eq!(r.status(), 401);
    let r = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_deliveries_requests_and_report_queue_depth() {
    let app = spawn_app().await;
    app.put_user("m1", json!({"email": "m1@example.com", "first_name": "M"}))
        .await;
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
            "recipients": {"user_ids": ["m1"]}, "payload": {"note": "x"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_finished(body["notification_id"].as_str().expect("id"), 20)
        .await;
    let r = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("request");
    assert!(r.headers()["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("application/openmetrics-text"));
    let text = r.text().await.expect("text");
    for needle in [
        r#"herald_deliveries_total{channel="email",status="sent",provider="smtp"} 1"#,
        r#"herald_events_accepted_total{source="api"} 1"#,
        r#"herald_http_request_duration_seconds_count{method="POST",route="/v1/events",status="202"} 1"#,
        r#"herald_attempt_duration_seconds_count{channel="email",provider="smtp"} 1"#,
        r#"herald_queue_depth{lane="high"} 0"#,
        "herald_outbox_backlog 0",
        "herald_scheduler_lag_seconds_count",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_worker_without_the_api_serves_its_metrics_on_metrics_bind() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let app = spawn_app_with(TestOptions {
        roles: crate::helpers::Roles::NoScheduler,
        env: vec![(
            "HERALD__SERVER__METRICS_BIND".into(),
            format!("127.0.0.1:{port}"),
        )],
        ..Default::default()
    })
    .await;
    app.put_user("w1", json!({"email": "w1@example.com", "first_name": "W"}))
        .await;
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
            "recipients": {"user_ids": ["w1"]}, "payload": {"note": "x"}}))
        .await;
    app.wait_finished(body["notification_id"].as_str().expect("id"), 20)
        .await;
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains(
            r#"herald_deliveries_total{channel="email",status="sent",provider="smtp"} 1"#
        ),
        "{text}"
    );
    // A worker's readiness needs both servers; it is served beside its metrics.
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/ready"))
        .await
        .expect("ready");
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["checks"]["rabbitmq"], "ok", "{body}");
    assert_eq!(body["checks"]["mongodb"], "ok", "{body}");
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes_served() {
    let app = spawn_app().await;
    let (status, spec) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(spec["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, methods) in spec["paths"].as_object().expect("paths") {
        for (method, op) in methods.as_object().expect("methods") {
            documented.insert((method.to_uppercase(), path.clone()));
            assert!(
                op["summary"].is_string() && op["responses"].is_object(),
                "{method} {path}"
            );
            let concrete = path
                .replace("{id}", "nothing-here")
                .replace("{event_type}", "greeting")
                .replace("{channel}", "email");
            let method =
                reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let r = app
                .http
                .request(method.clone(), app.url(&concrete))
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            let body: Value = if r
                .headers()
                .get("content-type")
                .is_some_and(|c| c.to_str().unwrap_or("").contains("json"))
            {
                r.json().await.unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            assert_ne!(status, 405, "{method} {path} is documented but not served");
            assert_ne!(
                body["error"]["message"], "no such route",
                "{method} {path} is documented but not served"
            );
        }
    }
    for wanted in [
        ("GET", "/v1/deliveries"),
        ("GET", "/v1/deliveries/stream"),
        ("GET", "/v1/stats/deliveries"),
        ("POST", "/v1/events"),
        ("POST", "/v1/schedules"),
        ("DELETE", "/v1/keys/{id}"),
        ("GET", "/metrics"),
    ] {
        assert!(
            documented.contains(&(wanted.0.to_owned(), wanted.1.to_owned())),
            "{wanted:?} missing"
        );
    }
    assert_eq!(
        spec["paths"]["/v1/deliveries"]["get"]["x-required-scope"],
        "logs:read"
    );
    assert_eq!(
        spec["paths"]["/v1/events"]["post"]["x-required-scope"],
        "events:write"
    );
    assert!(spec["paths"]["/health"]["get"].get("security").is_none());
    // Routes can only be added through the route table, so none can miss the spec.
    let api = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    for file in walk(&api) {
        let text = std::fs::read_to_string(&file).expect("read");
        // The console's pages (`/ui`) are not API routes and are not documented.
        if file.ends_with("spec.rs") || file.starts_with(api.join("console")) {
            continue;
        }
        assert!(
            !text.contains(".route("),
            "{} registers a route outside the route table",
            file.display()
        );
    }
    let docs = reqwest::get(app.url("/docs"))
        .await
        .expect("docs")
        .text()
        .await
        .expect("html");
    assert!(
        docs.contains("/openapi.json") && !docs.contains("https://"),
        "docs are self-contained"
    );
    app.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}
