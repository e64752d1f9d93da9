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
    // The first try is refused for now: the retry waits in a quorum delay queue, whose
    // expired message is dead-lettered (at least once) back to its lane.
    app.smtp.refuse_next(1, "451 4.3.0 try again later");
    greet(&app, "on quorum queues").await;
    assert_eq!(app.smtp.offered(), 2, "the refusal and the retry");
    assert_eq!(app.smtp.wait_for(1, 5).await.len(), 1);
    // …and that delay queue is a quorum one: declared as classic mode declares it (its
    // dead-letter target, no type), RabbitMQ refuses an argument only quorum mode sets.
    let names = app.ctx.broker.names();
    let delay = names.retry_queue(herald::domain::Priority::Normal, 1);
    let mut classic_args = lapin::types::FieldTable::default();
    for (k, v) in [
        ("x-dead-letter-exchange", names.jobs_exchange.as_str()),
        ("x-dead-letter-routing-key", "normal"),
    ] {
        classic_args.insert(k.into(), lapin::types::AMQPValue::LongString(v.into()));
    }
    let ch = app.ctx.broker.channel().await.expect("channel");
    let refused = ch
        .queue_declare(
            delay.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            classic_args,
        )
        .await
        .expect_err("a classic declare of the quorum delay queue")
        .to_string();
    assert!(
        refused.contains("inequivalent arg")
            && ["x-queue-type", "x-dead-letter-strategy", "x-overflow"]
                .iter()
                .any(|a| refused.contains(a)),
        "{refused}"
    );

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
    // Every one of them is named at once, delay queues included, with the way out.
    let names = broker.names();
    let all = 3 + 3 * (1 + names.retry_tiers) as usize;
    assert!(
        why.contains(&format!(
            "{all} of herald's queues exist with other arguments than herald declares for amqp.queue_type = \"classic\""
        )) && why.contains(&names.retry_queue(herald::domain::Priority::Low, names.retry_tiers))
            && why.contains(&names.rejected_queue)
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
