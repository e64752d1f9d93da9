//! RabbitMQ unreachable, connections lost, relays dead, backlogs full: what is accepted is
//! still delivered, once.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{
    amqp_host_port, greeting_to_u1, mongodb_host_port, spawn_app_with, TcpProxy, TestOptions,
};

/// The connection to MongoDB drops right after a claim reached the server: the claim was
/// made, its answer lost. The worker writes the claim again with the same attempt id,
/// reads which deliveries carry it and sends them, once — instead of leaving them
/// `sending` until the claim timeout records `outcome_unknown` for a message that never
/// went out (seen in the chaos suite's `database-restart`).
#[tokio::test]
async fn a_claim_whose_answer_was_lost_is_still_sent_once() {
    let proxy = TcpProxy::start(mongodb_host_port(), true)
        .await
        .expect("proxy");
    let app = spawn_app_with(TestOptions {
        mongodb_url: Some(format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            proxy.port
        )),
        ..Default::default()
    })
    .await;
    app.put_ana().await;
    // The claim is the first request that names an attempt id.
    proxy.lose_the_answer_to(b"attempt_id");
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": "once"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let n = app
        .wait_finished(body["notification_id"].as_str().expect("id"), 20)
        .await;
    assert!(!proxy.trap_set(), "the claim's answer was lost");
    assert_eq!(n["counts"]["sent"], 1, "{n}");
    assert_eq!(
        app.smtp.wait_for(1, 5).await[0].text().trim(),
        "Hi Ana, once"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.smtp.mails().len(), 1, "sent once");
    app.stop().await;
}

#[tokio::test]
async fn an_event_accepted_while_rabbitmq_is_down_is_delivered_when_it_is_back() {
    let proxy = TcpProxy::start(amqp_host_port(), false)
        .await
        .expect("proxy");
    let app = spawn_app_with(TestOptions {
        amqp_url: Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port)),
        ..Default::default()
    })
    .await;
    app.put_ana().await;

    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": "patience"}}))
        .await;
    assert_eq!(status, 202, "accepted on MongoDB alone: {body}");
    let id = body["notification_id"].as_str().expect("id");
    // The API can accept (it just did): it stays in rotation, and says what is away.
    let (ready, why) = app.get("/ready").await;
    assert_eq!(ready, 200, "{why}");
    assert_eq!(why["checks"]["rabbitmq"], "unreachable");
    assert_eq!(why["checks"]["mongodb"], "ok");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(app.smtp.mails().is_empty());
    assert_eq!(app.count("outbox").await, 1, "waiting in the outbox");

    proxy.set_up(true);
    let n = app.wait_finished(id, 30).await;
    assert_eq!(n["counts"]["sent"], 1);
    assert_eq!(
        app.smtp.wait_for(1, 5).await[0].text().trim(),
        "Hi Ana, patience"
    );
    assert_eq!(app.count("outbox").await, 0);
    let (ready, _) = app.get("/ready").await;
    assert_eq!(ready, 200);

    // Cut again mid-life: the consumers reconnect and the next event still arrives.
    proxy.set_up(false);
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": "again"}}))
        .await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_up(true);
    app.wait_finished(body["notification_id"].as_str().expect("id"), 30)
        .await;
    assert_eq!(app.smtp.wait_for(2, 5).await.len(), 2);
    app.stop().await;
}

/// RabbitMQ stops answering on an open connection (the proxy holds every byte): a request
/// to it that lapin never answers, nor refuses, must not hold anything up. Events are
/// still accepted at once, and the one accepted during the silence is delivered, once,
/// when RabbitMQ answers again. Before every AMQP exchange was bounded, the API's
/// backlog reading waited forever for a channel, and with it every later `POST
/// /v1/events` (a CI run hung on this).
#[tokio::test]
async fn an_event_posted_while_rabbitmq_answers_nothing_is_accepted_and_delivered_once_it_answers()
{
    let proxy = TcpProxy::start(amqp_host_port(), true)
        .await
        .expect("proxy");
    let app = spawn_app_with(TestOptions {
        amqp_url: Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port)),
        env: vec![("HERALD__AMQP__ANSWER_WITHIN_MS".into(), "1000".into())],
        ..Default::default()
    })
    .await;
    app.put_ana().await;
    let event = |note: &str| {
        json!({"event_type": "greeting", "channels": ["email"],
               "recipients": {"user_ids": ["u1"]}, "payload": {"note": note}})
    };
    let (_, first) = app.post_event(&event("before")).await;
    app.wait_finished(first["notification_id"].as_str().expect("id"), 20)
        .await;

    proxy.set_stalled(true);
    // Past the backlog reading's freshness, so this request reads the lanes again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = app.post_event(&event("silence")).await;
    assert_eq!(status, 202, "accepted on MongoDB alone: {body}");
    let id = body["notification_id"].as_str().expect("id");
    // Long enough for the relay's publish to go unanswered and be given up.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(app.smtp.mails().len(), 1);
    let (ready, why) = app.get("/ready").await;
    assert_eq!(ready, 200, "accepting on MongoDB alone: {why}");
    assert_eq!(why["checks"]["rabbitmq"], "unreachable");

    proxy.set_stalled(false);
    let n = app.wait_finished(id, 30).await;
    assert_eq!(n["counts"]["sent"], 1, "{n}");
    let mails = app.smtp.wait_for(2, 5).await;
    assert_eq!(mails[1].text().trim(), "Hi Ana, silence");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.smtp.mails().len(), 2, "sent once");
    assert_eq!(app.count("outbox").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn past_the_backlog_bound_events_are_refused_with_503_and_retry_after_writing_nothing() {
    use crate::helpers::Roles;
    // No worker: jobs stay on the lanes, so the backlog only grows.
    let app = spawn_app_with(TestOptions {
        roles: Roles::ApiOnly,
        env: vec![("HERALD__EVENTS__MAX_BACKLOG".into(), "2".into())],
        ..Default::default()
    })
    .await;
    app.put_user("u1", json!({"email": "one@example.com"}))
        .await;
    let event = |i: usize| {
        json!({"event_id": format!("e{i}"), "event_type": "greeting", "channels": ["email"],
               "recipients": {"user_ids": ["u1"]}, "payload": {"note": "x"}})
    };
    for i in 0..3 {
        assert_eq!(app.post_event(&event(i)).await.0, 202);
    }
    // The relay publishes the three dispatch jobs; the API's reading of the backlog is at
    // most half a second old.
    let mut refused = None;
    for i in 3..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = app
            .http
            .post(app.url("/v1/events"))
            .json(&event(i))
            .send()
            .await
            .expect("answer");
        if response.status() == 503 {
            refused = Some(response);
            break;
        }
    }
    let response = refused.expect("a 503 once three jobs wait");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    let accepted = app.count("notifications").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.count("notifications").await,
        accepted,
        "a refused event writes nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_event_handed_to_a_relay_that_died_is_published_by_another_once_its_lease_ends() {
    let (app, other) = app_and_a_dead_relay().await;

    let event = herald::domain::event::parse_event(
        br#"{"event_type": "greeting", "channels": ["email"],
             "recipients": {"user_ids": ["u1"]}, "payload": {"note": "late"}}"#,
        None,
        other.intake.limits(),
    )
    .expect("event");
    let accepted = other
        .intake
        .accept_event(event, "test")
        .await
        .expect("accepted");
    let herald::ingest::AcceptedAs::Notification(herald::store::Accepted::New(n)) = accepted else {
        panic!("a new notification")
    };
    let entry = app
        .db
        .collection::<mongodb::bson::Document>("outbox")
        .find_one(mongodb::bson::doc! {"notification_id": &n.id})
        .await
        .expect("read")
        .expect("the entry waits in the outbox");
    let token = entry.get_str("lease_token").expect("leased");
    assert!(token.starts_with("handoff:"), "{entry}");

    // The test app's relay skips it while the lease holds, then publishes it.
    let done = app.wait_finished(&n.id, 30).await;
    assert_eq!(done["counts"]["sent"], 1, "{done}");
    assert_eq!(
        app.smtp.wait_for(1, 5).await[0].text().trim(),
        "Hi Ana, late"
    );
    assert_eq!(app.count("outbox").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_group_commit_writes_one_outbox_entry_per_lane_and_each_of_its_notifications_is_dispatched(
) {
    let (app, other) = app_and_a_dead_relay().await;

    use herald::domain::Priority::{High, Normal};
    let batch: Vec<_> = [Normal, High, Normal, Normal, High]
        .into_iter()
        .enumerate()
        .map(|(i, priority)| {
            let (n, mut o) = greeting_to_u1(priority, &format!("n{i}"));
            assert!(other.relay.lease(&mut o), "leased to the relay");
            (n, o)
        })
        .collect();
    let ids: Vec<String> = batch.iter().map(|(n, _)| n.id.clone()).collect();
    let intaken = other.store.accept_many(batch).await.expect("accepted");
    assert_eq!(intaken.answers.len(), 5);
    assert!(intaken
        .answers
        .iter()
        .all(|a| matches!(a, Ok(herald::store::Accepted::New(_)))));
    let mut entries: Vec<(herald::domain::Priority, usize)> = intaken
        .outbox
        .iter()
        .map(|o| (o.lane, 1 + o.also.len()))
        .collect();
    entries.sort_by_key(|(_, n)| *n);
    assert_eq!(entries, [(High, 2), (Normal, 3)]);
    // Written so: two entries stand for five dispatch jobs, and the backlog counts jobs.
    assert_eq!(app.count("outbox").await, 2);
    assert_eq!(app.ctx.store.outbox_backlog().await.expect("backlog"), 5);

    // Once the dead relay's lease ends, the test app's relay publishes every job.
    for id in &ids {
        let done = app.wait_finished(id, 30).await;
        assert_eq!(done["counts"]["sent"], 1, "{done}");
    }
    let mut notes: Vec<String> = app
        .smtp
        .wait_for(5, 5)
        .await
        .iter()
        .map(|m| m.text().trim().to_owned())
        .collect();
    notes.sort();
    assert_eq!(
        notes,
        (0..5).map(|i| format!("Hi Ana, n{i}")).collect::<Vec<_>>()
    );
    assert_eq!(app.count("outbox").await, 0);
    app.stop().await;
}

/// A test app whose user `u1` is Ana, and a second process of the same deployment whose
/// relay started (so that its accepts are handed to it, leased for 2 s) and died at once.
async fn app_and_a_dead_relay() -> (crate::helpers::TestApp, herald::app::Context) {
    let app = spawn_app_with(TestOptions {
        env: vec![("HERALD__OUTBOX__LEASE_SECS".into(), "2".into())],
        ..Default::default()
    })
    .await;
    app.put_ana().await;
    let other = herald::app::Context::build((*app.ctx.settings).clone())
        .await
        .expect("context");
    let relay = tokio::spawn(
        other
            .relay
            .clone()
            .run(tokio_util::sync::CancellationToken::new()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.abort();
    let _ = relay.await;
    (app, other)
}
