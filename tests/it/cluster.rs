//! herald on a RabbitMQ cluster's terms: quorum queues, and several node addresses with failover when one is lost.

use serde_json::json;

use crate::helpers::{amqp_host_port, spawn_app_with, TcpProxy, TestApp, TestOptions};

async fn greet(app: &TestApp, note: &str) {
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": note}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let n = app
        .wait_finished(body["notification_id"].as_str().expect("id"), 30)
        .await;
    assert_eq!(n["counts"]["sent"], 1, "{n}");
}

#[tokio::test]
async fn quorum_queues_carry_the_work_and_another_type_is_refused_with_the_migration() {
    let app = spawn_app_with(TestOptions {
        env: vec![("HERALD__AMQP__QUEUE_TYPE".into(), "quorum".into())],
        ..Default::default()
    })
    .await;
    app.put_ana().await;
    greet(&app, "on quorum queues").await;
    assert_eq!(app.smtp.wait_for(1, 5).await.len(), 1);

    // The same queues asked for as classic: RabbitMQ refuses (they are quorum queues),
    // and herald says what to do.
    let mut classic = app.settings.amqp.clone();
    classic.queue_type = herald::config::QueueType::Classic;
    let broker = herald::queue::Broker::new(&classic, app.settings.worker.max_attempts);
    let refused = broker
        .channel()
        .await
        .expect_err("a classic declare of a quorum queue");
    let why = format!("{refused:#}");
    assert!(
        why.contains("exists with another type than amqp.queue_type = \"classic\"")
            && why.contains("rabbitmqctl delete_queue"),
        "{why}"
    );
    broker.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_lost_node_address_is_passed_over_for_the_next() {
    // Two addresses of one broker, each through a proxy that can be taken down.
    let first = TcpProxy::start(amqp_host_port(), true)
        .await
        .expect("proxy");
    let second = TcpProxy::start(amqp_host_port(), true)
        .await
        .expect("proxy");
    let app = spawn_app_with(TestOptions {
        amqp_urls: [&first, &second]
            .map(|p| format!("amqp://guest:guest@127.0.0.1:{}/%2f", p.port))
            .to_vec(),
        ..Default::default()
    })
    .await;
    app.put_ana().await;
    greet(&app, "through the first").await;
    // The first node is lost for good: herald moves on to the second, consumers included.
    first.set_up(false);
    greet(&app, "through the second").await;
    assert_eq!(app.smtp.wait_for(2, 5).await.len(), 2);
    let (ready, checks) = app.get("/ready").await;
    assert_eq!(ready, 200, "{checks}");
    app.stop().await;
}
