//! Marketing mail inboxes accept: DKIM signatures (checked by dkimpy, not by the code that
//! signs), one-click unsubscribe (RFC 8058) in marketing mail only, and opt-outs honoured.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::helpers::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dkim")
        .join(name)
}

/// `greeting` is marketing; every message is signed with the test key for example.com.
async fn marketing_app() -> TestApp {
    spawn_app_with(TestOptions {
        config_toml: Some(format!(
            "[event_types.greeting]\ncategory = \"marketing\"\n\n\
             [email]\nunsubscribe_mailbox = \"leave@example.com\"\n\n\
             [email.dkim]\ndomain = \"example.com\"\nselector = \"herald\"\n\
             private_key_file = \"{}\"\n",
            fixture("test-rsa.pem").display()
        )),
        ..TestOptions::default()
    })
    .await
}

/// dkimpy's verdict on a raw message, the public key handed to it as the DNS answer.
fn dkimpy_verifies(raw: &str) -> Option<bool> {
    let python = python_checker("dkimpy")?;
    let key = std::fs::read_to_string(fixture("test-rsa.pub.b64")).expect("public key");
    let script = r#"
import sys, dkim
record = ("v=DKIM1; k=rsa; p=" + sys.argv[1].strip()).encode()
def dns(name, timeout=5):
    assert name == b"herald._domainkey.example.com.", name
    return record
print("valid" if dkim.verify(sys.stdin.buffer.read(), dnsfunc=dns) else "invalid")
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script, key.trim()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(raw.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("dkimpy");
    let verdict = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success(), "dkimpy failed: {verdict}");
    Some(verdict == "valid")
}

async fn send(app: &TestApp, event: Value) -> Value {
    let (status, body) = app.post_event(&event).await;
    assert_eq!(status, 202, "{body}");
    let id = body["notification_id"].as_str().expect("id").to_owned();
    app.wait_finished(&id, 30).await;
    app.deliveries(&id).await.remove(0)
}

fn greeting(user: &str) -> Value {
    json!({"event_type": "greeting", "channels": ["email"],
           "recipients": {"user_ids": [user]}, "payload": {"note": "hello"}})
}

#[tokio::test]
async fn marketing_mail_is_signed_and_carries_one_click_unsubscribe_and_transactional_mail_does_not(
) {
    let app = marketing_app().await;
    app.put_ana().await;
    // The fixture's template: text and HTML, multipart/alternative.
    let d = send(&app, greeting("u1")).await;
    assert_eq!(d["status"], "sent", "{d}");
    let multipart = app.smtp.wait_for(1, 10).await.remove(0);
    assert!(
        multipart
            .header("Content-Type")
            .is_some_and(|c| c.starts_with("multipart/alternative")),
        "{}",
        multipart.data
    );
    // One template for both kinds: the link is null in transactional mail.
    let (status, body) = app
        .put(
            "/v1/templates/greeting/email",
            &json!({"subject": "Hi {{user.first_name}}", "text": "Leave: {{unsubscribe_url}}"}),
        )
        .await;
    assert_eq!(status, 200, "overrides the fixture's files: {body}");
    let d = send(&app, greeting("u1")).await;
    assert_eq!(d["status"], "sent", "{d}");
    let mut transactional = greeting("u1");
    transactional["category"] = json!("transactional");
    let d = send(&app, transactional).await;
    assert_eq!(d["status"], "sent", "{d}");
    let mails = app.smtp.wait_for(3, 10).await;
    let (marketing, transactional) = (&mails[1], &mails[2]);

    // (Unfolded: a long header may be folded onto continuation lines.)
    let list = marketing
        .header("List-Unsubscribe")
        .expect("List-Unsubscribe")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        list.starts_with("<http://127.0.0.1:8080/u/")
            && list.ends_with(", <mailto:leave@example.com?subject=unsubscribe>"),
        "{list}"
    );
    assert_eq!(
        marketing.header("List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    assert!(
        marketing
            .text()
            .contains(&format!("Leave: {}", &list[1..list.find('>').expect(">")])),
        "templates get the link as unsubscribe_url: {}",
        marketing.text()
    );
    assert!(
        transactional.text().trim_end().ends_with("Leave:"),
        "{}",
        transactional.text()
    );
    assert_eq!(transactional.header("List-Unsubscribe"), None);
    assert_eq!(transactional.header("List-Unsubscribe-Post"), None);

    for mail in [&multipart, marketing, transactional] {
        let signature = mail.header("DKIM-Signature").expect("signed");
        for tag in ["d=example.com", "s=herald", "a=rsa-sha256"] {
            assert!(signature.contains(tag), "{tag} in {signature}");
        }
        let covered = signature.to_ascii_lowercase();
        for header in [
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "mime-version",
            "content-type",
            "list-unsubscribe",
            "list-unsubscribe-post",
        ] {
            assert!(covered.contains(header), "{header} is signed: {signature}");
        }
        if let Some(valid) = dkimpy_verifies(&mail.data) {
            assert!(valid, "dkimpy verifies the signature");
            // The same check fails once a signed header is changed on the way.
            let tampered = mail.data.replacen("Subject: ", "Subject: Re: ", 1);
            assert_eq!(dkimpy_verifies(&tampered), Some(false));
        }
    }
    app.stop().await;
}

/// The path and token of a marketing mail's one-click link.
pub(crate) fn unsubscribe_path(mail: &Mail) -> String {
    let list = mail.header("List-Unsubscribe").expect("List-Unsubscribe");
    let url = list
        .trim_start_matches('<')
        .split('>')
        .next()
        .expect("url")
        .to_owned();
    url.trim_start_matches("http://127.0.0.1:8080").to_owned()
}

#[tokio::test]
async fn one_click_unsubscribe_records_the_opt_out_once_and_later_marketing_is_skipped() {
    let app = marketing_app().await;
    app.put_ana().await;
    let first = send(&app, greeting("u1")).await;
    let first = format!(
        "/v1/deliveries/{}",
        first["delivery_id"].as_str().expect("id")
    );
    let mail = app.smtp.wait_for(1, 10).await.remove(0);
    let path = unsubscribe_path(&mail);
    let anonymous = reqwest::Client::new();

    // A link followed (a mail scanner, a preview) changes nothing.
    let page = anonymous.get(app.url(&path)).send().await.expect("get");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    assert!(
        html.contains("List-Unsubscribe") && html.contains("“greeting”"),
        "{html}"
    );
    let (_, user) = app.get("/v1/users/u1").await;
    assert_eq!(user["unsubscribes"], json!([]), "{user}");
    assert_eq!(app.get(&first).await.1["unsubscribed_at"], Value::Null);

    // A forged token, and a POST without the one-click field, write nothing.
    let forged = format!("{}x", path);
    let r = anonymous
        .post(app.url(&forged))
        .form(&[("List-Unsubscribe", "One-Click")])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 404);
    let r = anonymous.post(app.url(&path)).send().await.expect("post");
    assert_eq!(r.status(), 400);
    let (_, user) = app.get("/v1/users/u1").await;
    assert_eq!(user["unsubscribes"], json!([]), "{user}");

    // The mail client's one-click POST, twice: one opt-out, the first time kept.
    for _ in 0..2 {
        let r = anonymous
            .post(app.url(&path))
            .form(&[("List-Unsubscribe", "One-Click")])
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200);
    }
    let (_, user) = app.get("/v1/users/u1").await;
    let opt_outs = user["unsubscribes"].as_array().expect("unsubscribes");
    assert_eq!(opt_outs.len(), 1, "{user}");
    assert_eq!(opt_outs[0]["event_type"], "greeting");
    // The delivery whose link it was is marked, and counted once.
    let (_, detail) = app.get(&first).await;
    assert!(detail["unsubscribed_at"].is_string(), "{detail}");
    let (_, stats) = app.get("/v1/stats/deliveries").await;
    assert_eq!(stats["channels"]["email"]["unsubscribed"], 1, "{stats}");
    // A profile replace keeps it.
    app.put_ana().await;
    let (_, user) = app.get("/v1/users/u1").await;
    assert_eq!(
        user["unsubscribes"].as_array().map(Vec::len),
        Some(1),
        "{user}"
    );

    let d = send(&app, greeting("u1")).await;
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("skipped"), Some("unsubscribed")),
        "{d}"
    );
    // The opt-out outlives the profile: deleted and created again, still unsubscribed.
    assert_eq!(app.delete("/v1/users/u1").await, 204);
    app.put_ana().await;
    let d = send(&app, greeting("u1")).await;
    assert_eq!(d["reason"], "unsubscribed", "{d}");
    // Transactional mail of the same type still goes out.
    let mut transactional = greeting("u1");
    transactional["category"] = json!("transactional");
    let d = send(&app, transactional).await;
    assert_eq!(d["status"], "sent", "{d}");
    app.stop().await;
}

#[tokio::test]
async fn a_multipart_one_click_post_works_as_mail_providers_send_it() {
    let app = marketing_app().await;
    app.put_ana().await;
    send(&app, greeting("u1")).await;
    let mail = app.smtp.wait_for(1, 10).await.remove(0);
    let form = reqwest::multipart::Form::new().text("List-Unsubscribe", "One-Click");
    let r = reqwest::Client::new()
        .post(app.url(&unsubscribe_path(&mail)))
        .multipart(form)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let (_, user) = app.get("/v1/users/u1").await;
    assert_eq!(user["unsubscribes"][0]["event_type"], "greeting", "{user}");
    app.stop().await;
}
