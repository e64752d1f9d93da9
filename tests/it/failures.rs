//! When providers fail: retries through delay queues, dead letters and replay.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp};

async fn one_email(app: &TestApp) -> String {
    app.put_ana().await;
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": "x"}}))
        .await;
    assert_eq!(status, 202);
    body["notification_id"].as_str().expect("id").to_owned()
}

async fn only_delivery(app: &TestApp, notification_id: &str) -> Value {
    let id = app.deliveries(notification_id).await[0]["delivery_id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.get(&format!("/v1/deliveries/{id}")).await.1
}

#[tokio::test]
async fn a_transient_smtp_failure_is_retried_with_backoff_then_sent() {
    let app = spawn_app().await;
    app.smtp.refuse_next(2, "451 4.3.0 try again later");
    let nid = one_email(&app).await;
    let n = app.wait_finished(&nid, 30).await;
    assert_eq!(n["status"], "completed");
    assert_eq!(n["counts"]["sent"], 1);
    assert_eq!(n["counts"]["retrying"], 0);
    assert_eq!(app.smtp.offered(), 3, "two refusals and the success");
    assert_eq!(app.smtp.mails().len(), 1);
    let d = only_delivery(&app, &nid).await;
    assert_eq!(d["status"], "sent");
    assert_eq!(d["attempts"], 3);
    let log = d["attempt_log"].as_array().expect("log");
    assert_eq!(log[0]["status"], "retrying");
    assert!(
        log[0]["error"].as_str().is_some_and(|e| e.contains("451")),
        "{}",
        log[0]
    );
    assert_eq!(log[2]["status"], "sent");
    // Backoff: the second retry waited longer than the first (200 ms, then 400 ms, ±20%).
    let at = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(log[i]["started_at"].as_str().expect("t")).expect("t")
    };
    let first = (at(1) - at(0)).num_milliseconds();
    let second = (at(2) - at(1)).num_milliseconds();
    assert!(first >= 160, "first retry after {first} ms");
    assert!(second >= 320, "second retry after {second} ms");
    app.stop().await;
}

#[tokio::test]
async fn a_permanent_failure_is_not_retried_and_becomes_a_dead_letter() {
    let app = spawn_app().await;
    app.smtp.refuse_next(1, "550 5.1.1 no such mailbox");
    let nid = one_email(&app).await;
    let n = app.wait_finished(&nid, 30).await;
    assert_eq!(n["status"], "failed");
    let d = only_delivery(&app, &nid).await;
    assert_eq!(
        (
            d["status"].as_str(),
            d["reason"].as_str(),
            d["attempts"].as_i64()
        ),
        (Some("failed"), Some("provider_rejected"), Some(1))
    );
    assert_eq!(app.smtp.offered(), 1, "no retry");
    let (_, letters) = app
        .get(&format!("/v1/dead-letters?notification_id={nid}"))
        .await;
    let items = letters["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["reason"], "provider_rejected");
    assert!(items[0]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("550")));
    app.stop().await;
}

#[tokio::test]
async fn exhausted_retries_go_dead_and_a_replay_sends_them() {
    let app = spawn_app().await;
    app.smtp.refuse_next(3, "421 4.7.0 overloaded");
    let nid = one_email(&app).await;
    let n = app.wait_finished(&nid, 30).await;
    assert_eq!(n["status"], "failed");
    assert_eq!(n["counts"]["dead"], 1);
    let d = only_delivery(&app, &nid).await;
    assert_eq!(
        (
            d["status"].as_str(),
            d["reason"].as_str(),
            d["attempts"].as_i64()
        ),
        (Some("dead"), Some("retries_exhausted"), Some(3))
    );

    let (_, letters) = app.get("/v1/dead-letters").await;
    let letter = letters["items"][0].clone();
    assert_eq!(letter["status"], "dead");
    assert_eq!(letter["attempts"], 3);
    let (status, _) = app
        .post(
            &format!(
                "/v1/dead-letters/{}/replay",
                letter["dead_letter_id"].as_str().expect("id")
            ),
            &json!({}),
        )
        .await;
    assert_eq!(status, 202);
    let mails = app.smtp.wait_for(1, 20).await;
    assert_eq!(mails.len(), 1);
    let n = app.wait_finished(&nid, 20).await;
    assert_eq!(n["status"], "completed", "{n}");
    assert_eq!(
        (n["counts"]["sent"].as_i64(), n["counts"]["dead"].as_i64()),
        (Some(1), Some(0))
    );
    let (_, pending) = app.get("/v1/dead-letters").await;
    assert_eq!(
        pending["items"].as_array().map(Vec::len),
        Some(0),
        "replayed letters are no longer pending"
    );
    let (status, _) = app
        .post(
            &format!(
                "/v1/dead-letters/{}/replay",
                letter["dead_letter_id"].as_str().expect("id")
            ),
            &json!({}),
        )
        .await;
    assert_eq!(status, 404, "a replayed letter is not replayed twice");
    app.stop().await;
}

#[tokio::test]
async fn a_bulk_replay_re_enqueues_every_matching_dead_letter() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.put_user(
            &format!("b{i}"),
            json!({"email": format!("b{i}@example.com"), "first_name": "B"}),
        )
        .await;
    }
    app.smtp.refuse_next(3, "550 5.7.1 rejected");
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["b0", "b1", "b2"]}, "payload": {"note": "x"}}))
        .await;
    let nid = body["notification_id"].as_str().expect("id");
    app.wait_finished(nid, 30).await;
    let (status, replayed) = app
        .post(
            "/v1/dead-letters/replay",
            &json!({"notification_id": nid, "reason": "provider_rejected"}),
        )
        .await;
    assert_eq!(status, 202, "{replayed}");
    assert_eq!(replayed["replayed"], 3);
    assert_eq!(app.smtp.wait_for(3, 20).await.len(), 3);
    let n = app.wait_finished(nid, 20).await;
    assert_eq!(n["counts"]["sent"], 3);
    app.stop().await;
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_while_idle_is_replaced_without_a_retry() {
    let app = spawn_app().await;
    app.smtp
        .set_idle_close(Some(std::time::Duration::from_millis(150)));
    let first = one_email(&app).await;
    assert_eq!(app.wait_finished(&first, 20).await["counts"]["sent"], 1);
    // The pooled connection is reused within the pool's idle check, but the server has
    // closed it by now: nothing was sent on it, so a new connection sends at once.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": "y"}}))
        .await;
    assert_eq!(status, 202);
    let second = body["notification_id"].as_str().expect("id").to_owned();
    assert_eq!(app.wait_finished(&second, 20).await["counts"]["sent"], 1);
    let d = only_delivery(&app, &second).await;
    assert_eq!(d["attempts"], 1, "sent on the first attempt: {d}");
    assert_eq!(app.smtp.mails().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_handler_that_panics_settles_its_message_and_the_lane_goes_on() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use herald::domain::Priority;
    use herald::queue::{Disposition, Incoming, Outgoing};

    // No worker consumes the lanes here; this test's consumer is the only one.
    let app = crate::helpers::spawn_app_with(crate::helpers::TestOptions {
        roles: crate::helpers::Roles::ApiOnly,
        ..Default::default()
    })
    .await;
    let broker = Arc::clone(&app.ctx.broker);
    let lane = broker.names().lane(Priority::Low).to_owned();
    let message = |body: &[u8]| Outgoing {
        exchange: String::new(),
        routing_key: lane.clone(),
        body: body.to_vec(),
        headers: Vec::new(),
        expiration_ms: None,
    };
    broker
        .publish_confirmed(&[message(b"boom"), message(b"ok")])
        .await
        .expect("published");
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let cancel = tokio_util::sync::CancellationToken::new();
    // One message at a time: a message left unsettled would hold the lane's only slot.
    let consumer = tokio::spawn(Arc::clone(&broker).consume(
        lane.clone(),
        1,
        cancel.clone(),
        move |m: Incoming| {
            let counter = Arc::clone(&counter);
            async move {
                assert_ne!(m.body, b"boom", "a poison message");
                counter.fetch_add(1, Ordering::SeqCst);
                Disposition::Ack
            }
        },
    ));
    let mut parked = 0;
    for _ in 0..200 {
        parked = broker
            .queue_depth(&broker.names().rejected_queue)
            .await
            .expect("depth");
        if handled.load(Ordering::SeqCst) == 1 && parked == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(handled.load(Ordering::SeqCst), 1, "the lane went on");
    assert_eq!(
        parked, 1,
        "the panicking message was parked after its retries"
    );
    cancel.cancel();
    let _ = consumer.await;
    app.stop().await;
}

/// A relay that takes the message and then loses the connection before answering: the
/// send's outcome is unknown, so it is recorded `failed`/`outcome_unknown` and never sent
/// again — over plain SMTP and over implicit TLS alike.
#[tokio::test]
async fn a_connection_lost_after_the_message_went_out_is_outcome_unknown_over_plain_and_implicit_tls(
) {
    for tls in [false, true] {
        let (server, ca) = if tls {
            let (server, ca) = herald_testbed::SmtpServer::start_tls()
                .await
                .expect("tls smtp");
            (server, Some(ca))
        } else {
            let server = herald_testbed::SmtpServer::start().await.expect("smtp");
            (server, None)
        };
        server.set_cut_after_data(true);
        let ca_file = std::env::temp_dir().join(format!("herald-ca-{}.pem", server.port));
        let mut env = vec![
            ("HERALD__EMAIL__SMTP__PORT".into(), server.port.to_string()),
            ("HERALD__EMAIL__SMTP__TIMEOUT_SECS".into(), "5".into()),
        ];
        if let Some(ca) = &ca {
            std::fs::write(&ca_file, ca).expect("ca file");
            env.push(("HERALD__EMAIL__SMTP__SECURITY".into(), "tls".into()));
            env.push((
                "HERALD__EMAIL__SMTP__CA_FILE".into(),
                ca_file.display().to_string(),
            ));
        }
        let app = crate::helpers::spawn_app_with(crate::helpers::TestOptions {
            env,
            ..Default::default()
        })
        .await;
        let nid = one_email(&app).await;
        let n = app.wait_finished(&nid, 30).await;
        assert_eq!(n["counts"]["failed"], 1, "tls={tls}: {n}");
        let d = only_delivery(&app, &nid).await;
        assert_eq!(d["status"], "failed", "tls={tls}: {d}");
        assert_eq!(d["reason"], "outcome_unknown", "tls={tls}: {d}");
        // Past the retry backoff: the message the relay took is not sent again.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert_eq!(server.mails().len(), 1, "tls={tls}: sent exactly once");
        let _ = std::fs::remove_file(&ca_file);
        app.stop().await;
    }
}
