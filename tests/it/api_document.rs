//! The OpenAPI document against the API it describes, checked by schemathesis (PyPI):
//! every check, positive and negative data, on every operation but the live tail.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// The schemathesis command: `HERALD_SCHEMATHESIS`, or `schemathesis` on the PATH.
fn schemathesis() -> Option<PathBuf> {
    let candidate = std::env::var("HERALD_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let runs = std::process::Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    runs.then(|| PathBuf::from(candidate))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_difference_between_the_document_and_the_api() {
    let Some(st) = schemathesis() else {
        // scripts/test installs it and sets this, so CI cannot skip it.
        assert!(
            std::env::var("HERALD_PYTHON_TESTS").as_deref() != Ok("require"),
            "schemathesis cannot run: set HERALD_SCHEMATHESIS or put it on the PATH"
        );
        eprintln!("skipping the API document test: no schemathesis");
        return;
    };
    let app = spawn_app().await;
    // The group the hooks point generated recipients at.
    let (status, body) = app
        .put(
            "/v1/groups/everyone",
            &json!({"name": "Everyone", "user_ids": ["u1"]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, key) = app
        .ctx
        .store
        .create_key(
            "schemathesis",
            &[herald::domain::Scope::Admin],
            Some(herald::domain::Rate::new(1e6).expect("rate")),
        )
        .await
        .expect("key");
    // The inbox routes' user: a profile (for preferences) and a session.
    app.put_user("u1", json!({"first_name": "Ana"})).await;
    let hash = {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(
            app.settings.inbox.secret.expose().as_bytes(),
        )
        .expect("key");
        mac.update(b"u1");
        hex::encode(mac.finalize().into_bytes())
    };
    let (status, session) = app
        .post(
            "/v1/inbox/session",
            &json!({"user_id": "u1", "user_hash": hash}),
        )
        .await;
    assert_eq!(status, 200, "{session}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api");
    let run = tokio::process::Command::new(st)
        .current_dir(&dir)
        .args(["run", &format!("{}/openapi.json", app.address)])
        .args(["--checks", "all", "--max-examples", "30", "--no-color"])
        .env("HERALD_KEY", &key)
        .env(
            "HERALD_INBOX_TOKEN",
            session["token"].as_str().expect("token"),
        )
        .env("HERALD_INBOX_HASH", &hash)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("schemathesis finished within 10 minutes")
        .expect("schemathesis ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.contains(" in ") && l.starts_with('='))
        .unwrap_or_default()
        .to_owned();
    app.stop().await;
    assert!(
        output.status.success() && !summary.contains("fail") && !summary.contains("error"),
        "schemathesis: {summary}\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("schemathesis: {summary}");
}
