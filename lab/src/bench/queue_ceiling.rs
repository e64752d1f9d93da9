//! What RabbitMQ itself sustains on this machine: herald's publishing path (persistent
//! messages, publisher confirms) and a manual-ack consumer on one queue, with nothing else
//! in the loop — the ceiling herald's own figures are compared with.

use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use herald::config::QueueType;
use herald::queue::{Broker, Outgoing};

/// Messages per second each way.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub publish_per_sec: f64,
    pub consume_per_sec: f64,
}

/// Publishes `messages` persistent messages of `size` bytes to a scratch queue of
/// `queue_type` with confirms (in batches, as the outbox relay does), then consumes and
/// acks each.
pub async fn measure(
    broker: &Broker,
    messages: usize,
    size: usize,
    queue_type: QueueType,
) -> anyhow::Result<Ceiling> {
    let queue = format!(
        "{}.ceiling.{}",
        broker.names().prefix(),
        queue_type.as_str()
    );
    let ch = broker.channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .context("declaring the ceiling queue")?;
    let body = vec![b'x'; size];
    let started = Instant::now();
    let mut sent = 0;
    while sent < messages {
        let n = (messages - sent).min(500);
        let batch: Vec<Outgoing> = (0..n)
            .map(|_| Outgoing {
                exchange: String::new(),
                routing_key: queue.clone(),
                body: body.clone(),
                headers: Vec::new(),
                expiration_ms: None,
            })
            .collect();
        broker.publish_confirmed(&batch).await?;
        sent += n;
    }
    let publish_secs = started.elapsed().as_secs_f64();

    ch.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut received = 0;
    while received < messages {
        let delivery = consumer
            .next()
            .await
            .context("the ceiling consumer ended")??;
        delivery.ack(BasicAckOptions::default()).await?;
        received += 1;
    }
    let consume_secs = started.elapsed().as_secs_f64();
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = ch.close(200, "done".into()).await;
    Ok(Ceiling {
        publish_per_sec: messages as f64 / publish_secs,
        consume_per_sec: messages as f64 / consume_secs,
    })
}
