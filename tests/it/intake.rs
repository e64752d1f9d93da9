//! Events published by upstream systems to the events exchange.

use std::time::Duration;

use herald::queue::Outgoing;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use serde_json::json;

use crate::helpers::spawn_app;

fn header(props: &lapin::BasicProperties, name: &str) -> String {
    match props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name}: {other:?}"),
    }
}

#[tokio::test]
async fn events_from_the_exchange_share_the_rest_path_and_bad_ones_are_parked_with_a_reason() {
    let app = spawn_app().await;
    app.put_ana().await;
    let exchange = app.ctx.broker.names().events_exchange.clone();
    let publish = |body: Vec<u8>| Outgoing {
        exchange: exchange.clone(),
        routing_key: "upstream.billing".into(),
        body,
        headers: vec![],
        expiration_ms: None,
    };
    let good = json!({"event_id": "amqp-evt-1", "event_type": "greeting", "channels": ["email"],
                      "recipients": {"user_ids": ["u1"]}, "payload": {"note": "via amqp"}});
    app.ctx
        .broker
        .publish_confirmed(&[
            publish(good.to_string().into_bytes()),
            publish(good.to_string().into_bytes()), // a repeat: sent once
            publish(b"{not json".to_vec()),
            publish(json!({"event_type": "greeting", "recipients": {"user_ids": ["u1"]}}).to_string().into_bytes()),
            publish(json!({"event_id": "amqp-evt-2", "event_type": "greeting", "recipients": {"group_id": "missing"}}).to_string().into_bytes()),
        ])
        .await
        .expect("publish");

    let mails = app.smtp.wait_for(1, 20).await;
    assert!(mails[0].text().contains("via amqp"));

    // The three bad messages are parked, each with its code.
    let ch = app.ctx.broker.channel().await.expect("channel");
    let rejected = app.ctx.broker.names().rejected_queue.clone();
    let mut codes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while codes.len() < 3 && tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(rejected.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            Some(m) => {
                assert!(!header(&m.delivery.properties, "x-herald-error-message").is_empty());
                codes.push(header(&m.delivery.properties, "x-herald-error-code"));
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    codes.sort();
    assert_eq!(
        codes,
        ["malformed_json", "unknown_group", "validation_failed"]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.smtp.mails().len(),
        1,
        "the repeated event_id sent nothing more"
    );
    assert_eq!(app.count("notifications").await, 1);
    app.stop().await;
}
