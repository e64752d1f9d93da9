//! RabbitMQ: the only module that knows AMQP — topology, a confirming publisher, consumers.

pub mod messages;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpSettings, QueueType, Secret};
use crate::domain::Priority;

/// Exchange and queue names, all under the configured prefix.
#[derive(Debug, Clone)]
pub struct Names {
    /// Upstream systems publish events here (topic exchange).
    pub events_exchange: String,
    pub intake_queue: String,
    /// Malformed events land here with the reason in headers.
    pub rejected_queue: String,
    /// Jobs are routed to lanes by priority (direct exchange).
    pub jobs_exchange: String,
    /// Status webhook messages due for a try (published to the default exchange).
    pub webhooks_queue: String,
    lanes: [String; 3],
    prefix: String,
    /// Delay queues per lane: one per retry, so messages in one queue wait about as long
    /// as each other (RabbitMQ expires messages only at a queue's head).
    pub retry_tiers: u32,
}

impl Names {
    pub fn new(prefix: &str, retry_tiers: u32) -> Self {
        Self {
            prefix: prefix.to_owned(),
            retry_tiers: retry_tiers.max(1),
            events_exchange: format!("{prefix}.events"),
            intake_queue: format!("{prefix}.events.intake"),
            rejected_queue: format!("{prefix}.events.rejected"),
            jobs_exchange: format!("{prefix}.jobs"),
            webhooks_queue: format!("{prefix}.webhooks"),
            lanes: Priority::ALL.map(|p| format!("{prefix}.lane.{}", p.as_str())),
        }
    }

    /// The delay queue a retry waits in before its lane.
    pub fn retry_queue(&self, p: Priority, attempt: u32) -> String {
        let tier = attempt.clamp(1, self.retry_tiers);
        format!("{}.retry.{}.{tier}", self.prefix, p.as_str())
    }

    /// What every name starts with (`amqp.prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn lane(&self, p: Priority) -> &str {
        match p {
            Priority::High => &self.lanes[0],
            Priority::Normal => &self.lanes[1],
            Priority::Low => &self.lanes[2],
        }
    }
}

/// True when `e` came from the AMQP connection (RabbitMQ down, unreachable or closing
/// the channel), as opposed to a failure of the request itself.
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.is::<lapin::Error>() || c.is::<tokio::time::error::Elapsed>())
}

/// How often a job may fail for reasons of its own before it is parked with its error.
pub const MAX_JOB_RETRIES: u32 = 5;
/// The header counting those failures.
const RETRIES_HEADER: &str = "x-herald-retries";

/// How long a consumer whose link was lost waits for its running handlers before it
/// reconnects without them.
const DRAIN_AFTER_LOSS: Duration = Duration::from_secs(15);

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// Per-message TTL in milliseconds (for delay queues).
    pub expiration_ms: Option<u64>,
}

/// A message handed to a handler: no AMQP types leak out of this module.
#[derive(Debug)]
pub struct Incoming {
    pub body: Vec<u8>,
    /// RabbitMQ delivered it before to a consumer that did not ack (it died or disconnected).
    pub redelivered: bool,
}

/// What to do with a consumed message once its handler is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done (its outcome is committed).
    Ack,
    /// Could not be handled now (a dependency is down): back to the queue, uncounted.
    Requeue,
    /// Failed for a reason that may be its own: back to the queue with its failure
    /// counted; parked (like `Reject`) with this error after [`MAX_JOB_RETRIES`].
    Retry { error: String },
    /// Never acceptable: move it to the rejected queue with the reason, then ack.
    Reject { code: String, message: String },
}

#[derive(Default)]
struct Live {
    conn: Option<Arc<Connection>>,
    publisher: Option<Channel>,
}

/// One process's link to RabbitMQ: reconnects on demand, declares topology on every
/// new connection, publishes with confirms.
pub struct Broker {
    /// The nodes' addresses, tried in order from the last one that answered.
    urls: Vec<Secret>,
    /// The address the live connection (or the last one) went to.
    current: AtomicUsize,
    queue_type: QueueType,
    names: Names,
    reconnect_max: Duration,
    /// How long one exchange with RabbitMQ (opening a channel, a declare, a batch's
    /// confirms) may take (`amqp.answer_within_ms`). lapin can leave one unanswered
    /// forever when the connection dies under it: a channel asked for just as its I/O
    /// loop stops is never opened nor refused. Past this the connection is taken for
    /// dead, and the next use opens a new one.
    answer_within: Duration,
    live: Mutex<Live>,
    /// Set when an exchange went unanswered: the live connection is not reused.
    silent: AtomicBool,
}

impl Broker {
    pub fn new(settings: &AmqpSettings, retry_tiers: u32) -> Self {
        Self {
            urls: settings.addresses(),
            current: AtomicUsize::new(0),
            queue_type: settings.queue_type,
            names: Names::new(&settings.prefix, retry_tiers),
            reconnect_max: Duration::from_millis(settings.reconnect_max_ms.max(50)),
            answer_within: Duration::from_millis(settings.answer_within_ms.max(100)),
            live: Mutex::new(Live::default()),
            silent: AtomicBool::new(false),
        }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The longest pause between reconnection attempts.
    pub fn reconnect_max(&self) -> Duration {
        self.reconnect_max
    }

    /// `op`, given up after `answer_within` (the connection then counts as dead).
    async fn within<T, E: Into<anyhow::Error>>(
        &self,
        what: &str,
        op: impl Future<Output = Result<T, E>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.answer_within, op).await {
            Ok(result) => result.map_err(|e| e.into().context(what.to_owned())),
            Err(elapsed) => {
                self.silent.store(true, Ordering::SeqCst);
                Err(anyhow::Error::new(elapsed).context(format!("{what}: no answer from RabbitMQ")))
            }
        }
    }

    /// The live connection, opening (and declaring topology on) a new one if needed.
    async fn connection_locked(&self, live: &mut Live) -> anyhow::Result<Arc<Connection>> {
        let silent = self.silent.swap(false, Ordering::SeqCst);
        if let Some(conn) = &live.conn {
            if conn.status().connected() && !silent {
                return Ok(Arc::clone(conn));
            }
        }
        live.conn = None;
        live.publisher = None;
        let props =
            ConnectionProperties::default().with_connection_name(LongString::from("herald"));
        let conn = self.connect(props).await?;
        self.within("declaring the topology", async {
            let channel = conn.create_channel().await?;
            match declare_topology(&channel, &self.names, self.queue_type).await {
                Err(e) if e.downcast_ref::<Mismatch>().is_some() => {
                    return Err(e.context(mismatched(&conn, &self.names, self.queue_type).await));
                }
                result => result?,
            }
            let _ = channel
                .close(200, ShortString::from("topology declared"))
                .await;
            anyhow::Ok(())
        })
        .await?;
        let conn = Arc::new(conn);
        live.conn = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// A connection to the first node that answers, from the one that answered last
    /// (a cluster's node that died is passed over; herald stays on the one it found).
    async fn connect(&self, props: ConnectionProperties) -> anyhow::Result<Connection> {
        let n = self.urls.len().max(1);
        let start = self.current.load(Ordering::SeqCst);
        let mut last = None;
        for i in 0..n {
            let k = (start + i) % n;
            let Some(url) = self.urls.get(k) else { break };
            match self
                .within(
                    "connecting to RabbitMQ",
                    Connection::connect(url.expose(), props.clone()),
                )
                .await
            {
                Ok(conn) => {
                    if k != start {
                        tracing::info!(
                            node = k + 1,
                            of = n,
                            "connected to another RabbitMQ address"
                        );
                    }
                    self.current.store(k, Ordering::SeqCst);
                    return Ok(conn);
                }
                Err(e) => last = Some(e.context(format!("RabbitMQ address {} of {n}", k + 1))),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no RabbitMQ address configured")))
    }

    /// A new channel on the live connection.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let conn = {
            let mut live = self.live.lock().await;
            self.connection_locked(&mut live).await?
        };
        self.within("opening a channel", conn.create_channel())
            .await
    }

    /// Messages ready in a queue (a passive declare: it never creates the queue).
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        let ch = self.channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .within(
                "reading a queue's depth",
                ch.queue_declare(queue.into(), passive, FieldTable::default()),
            )
            .await;
        self.close_channel(&ch, "done").await;
        Ok(q?.message_count())
    }

    /// True when a connection is open (or can be opened now).
    pub async fn ready(&self) -> bool {
        let mut live = self.live.lock().await;
        self.connection_locked(&mut live).await.is_ok()
    }

    async fn publisher(&self) -> anyhow::Result<Channel> {
        let mut live = self.live.lock().await;
        if let Some(ch) = &live.publisher {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let conn = self.connection_locked(&mut live).await?;
        let ch = self
            .within("opening the publisher's channel", async {
                let ch = conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                lapin::Result::Ok(ch)
            })
            .await?;
        live.publisher = Some(ch.clone());
        Ok(ch)
    }

    async fn forget_publisher(&self) {
        self.live.lock().await.publisher = None;
    }

    /// Publishes persistent messages and returns once RabbitMQ confirmed every one of
    /// them (pipelined, not one round trip each). Unroutable messages are an error.
    pub async fn publish_confirmed(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let result = async {
            let ch = self.publisher().await?;
            self.within("publishing to RabbitMQ", publish_on(&ch, messages))
                .await
        }
        .await;
        if result.is_err() {
            self.forget_publisher().await;
        }
        result
    }

    /// Consumes `queue` until `cancel`, running `handler` on each message concurrently
    /// (at most `prefetch` at once) and settling it as the handler says. Reconnects
    /// with backoff; on cancel, waits for running handlers so nothing is cut mid-send.
    pub async fn consume<H, F>(
        self: Arc<Self>,
        queue: String,
        prefetch: u16,
        cancel: CancellationToken,
        handler: H,
    ) where
        H: Fn(Incoming) -> F + Send + Sync + Clone + 'static,
        F: Future<Output = Disposition> + Send + 'static,
    {
        let mut backoff = Duration::from_millis(50);
        while !cancel.is_cancelled() {
            match self
                .consume_session(&queue, prefetch, &cancel, handler.clone())
                .await
            {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(e) => {
                    tracing::warn!(queue = %queue, error = format!("{e:#}"), "consumer lost; reconnecting");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.reconnect_max);
        }
    }

    async fn consume_session<H, F>(
        self: &Arc<Self>,
        queue: &str,
        prefetch: u16,
        cancel: &CancellationToken,
        handler: H,
    ) -> anyhow::Result<()>
    where
        H: Fn(Incoming) -> F + Send + Sync + Clone + 'static,
        F: Future<Output = Disposition> + Send + 'static,
    {
        let channel = self.channel().await?;
        let mut consumer = self
            .within(&format!("consuming {queue}"), async {
                channel
                    .basic_qos(prefetch, BasicQosOptions::default())
                    .await?;
                channel
                    .basic_consume(
                        ShortString::from(queue),
                        ShortString::from(""),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            })
            .await?;
        tracing::debug!(queue, prefetch, "consuming");
        let mut running = JoinSet::new();
        let outcome = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(queue, error = %e, "a message's task failed");
                    }
                }
                next = consumer.next() => {
                    let delivery = match next {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => break Err(anyhow::Error::new(e).context("consumer failed")),
                        None => break Err(anyhow::anyhow!("consumer stream ended")),
                    };
                    let handler = handler.clone();
                    let broker = Arc::clone(self);
                    let queue = queue.to_owned();
                    running.spawn(async move {
                        // A copy republished after a failure is a redelivery too: the
                        // handler that failed may have left work half done.
                        let incoming = Incoming {
                            body: delivery.data.clone(),
                            redelivered: delivery.redelivered || retries(&delivery) > 0,
                        };
                        // A panicking handler settles its message like a failure of
                        // its own (counted, parked after the last retry), never leaves
                        // it unsettled holding a prefetch slot.
                        let handled = AssertUnwindSafe(handler(incoming)).catch_unwind().await;
                        let handled = handled.unwrap_or_else(|panic| {
                            let error = format!("the handler panicked: {}", crate::supervise::panic_message(&*panic));
                            tracing::error!(queue = %queue, error, "message handler panicked");
                            Disposition::Retry { error }
                        });
                        let disposition = match handled {
                            Disposition::Retry { error } => {
                                broker.count_retry(&queue, &delivery, error).await
                            }
                            other => other,
                        };
                        let requeue = match disposition {
                            Disposition::Ack => false,
                            Disposition::Requeue | Disposition::Retry { .. } => true,
                            Disposition::Reject { code, message } => {
                                match broker.reject(&delivery.data, &code, &message).await {
                                    Ok(()) => false,
                                    Err(e) => {
                                        tracing::warn!(error = format!("{e:#}"), "could not park a rejected message; requeueing");
                                        tokio::time::sleep(Duration::from_millis(500)).await;
                                        true
                                    }
                                }
                            }
                        };
                        let settled = async {
                            if requeue {
                                let requeue = BasicNackOptions { requeue: true, ..Default::default() };
                                delivery.acker.nack(requeue).await
                            } else {
                                delivery.acker.ack(BasicAckOptions::default()).await
                            }
                        };
                        // On a channel whose connection died, lapin may never answer a
                        // settle; RabbitMQ redelivers the message either way.
                        if let Err(e) = broker.within("settling a message", settled).await {
                            tracing::debug!(error = format!("{e:#}"), "could not settle a message");
                        }
                    });
                }
            }
        };
        // Let in-flight handlers finish (they never stop mid-send) before leaving. After a
        // lost link they get a bounded wait, then finish in the background: one stuck on
        // the dead connection must not keep the lane from reconnecting (its message comes
        // back to a live consumer; a delivery it holds is `sending`, which no copy re-sends).
        let drain = async move { while running.join_next().await.is_some() {} };
        if outcome.is_err() {
            let mut drain = Box::pin(drain);
            if tokio::time::timeout(DRAIN_AFTER_LOSS, &mut drain)
                .await
                .is_err()
            {
                tracing::warn!(
                    queue,
                    "handlers still running after the link was lost; reconnecting without them"
                );
                tokio::spawn(drain);
            }
        } else {
            drain.await;
        }
        self.close_channel(&channel, "bye").await;
        outcome
    }

    /// Deletes every exchange and queue under this broker's prefix (test clean-up).
    pub async fn delete_topology(&self) -> anyhow::Result<()> {
        let ch = self.channel().await?;
        let mut queues = vec![
            self.names.intake_queue.clone(),
            self.names.rejected_queue.clone(),
            self.names.webhooks_queue.clone(),
        ];
        queues.extend(self.names.lanes.iter().cloned());
        for p in Priority::ALL {
            for tier in 1..=self.names.retry_tiers {
                queues.push(self.names.retry_queue(p, tier));
            }
        }
        let deleted = self
            .within("deleting the topology", async {
                for q in queues {
                    ch.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                        .await?;
                }
                for ex in [&self.names.events_exchange, &self.names.jobs_exchange] {
                    ch.exchange_delete(ShortString::from(ex.as_str()), Default::default())
                        .await?;
                }
                lapin::Result::Ok(())
            })
            .await;
        self.close_channel(&ch, "topology deleted").await;
        deleted
    }

    /// Closes a channel, not waiting long for RabbitMQ's answer (nothing depends on it).
    async fn close_channel(&self, ch: &Channel, why: &str) {
        let _ = self
            .within("closing a channel", ch.close(200, ShortString::from(why)))
            .await;
    }

    /// Closes the connection (on shutdown).
    pub async fn close(&self) {
        let mut live = self.live.lock().await;
        if let Some(ch) = live.publisher.take() {
            self.close_channel(&ch, "shutdown").await;
        }
        if let Some(conn) = live.conn.take() {
            let _ = self
                .within(
                    "closing the connection",
                    conn.close(200, ShortString::from("shutdown")),
                )
                .await;
        }
    }
}

impl Broker {
    /// A failed job's next step: republished to its queue with its failure count (then
    /// `Ack` for this copy), or `Reject` once it failed [`MAX_JOB_RETRIES`] times. If the
    /// copy cannot be published, the message goes back uncounted (`Requeue`).
    async fn count_retry(&self, queue: &str, delivery: &Delivery, error: String) -> Disposition {
        let failed = retries(delivery) + 1;
        if failed >= MAX_JOB_RETRIES {
            return Disposition::Reject {
                code: "retries_exhausted".to_owned(),
                message: format!("failed {failed} times; last: {error}"),
            };
        }
        let copy = Outgoing {
            exchange: String::new(),
            routing_key: queue.to_owned(),
            body: delivery.data.clone(),
            headers: vec![(RETRIES_HEADER.to_owned(), failed.to_string())],
            expiration_ms: None,
        };
        match self.publish_confirmed(&[copy]).await {
            Ok(()) => Disposition::Ack,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not count a retry; requeueing"
                );
                Disposition::Requeue
            }
        }
    }

    /// Parks a message in the rejected queue with its reason; it is never requeued forever
    /// nor dropped silently.
    async fn reject(&self, body: &[u8], code: &str, message: &str) -> anyhow::Result<()> {
        self.publish_confirmed(&[Outgoing {
            exchange: String::new(),
            routing_key: self.names.rejected_queue.clone(),
            body: body.to_vec(),
            headers: vec![
                ("x-herald-error-code".to_owned(), code.to_owned()),
                ("x-herald-error-message".to_owned(), message.to_owned()),
            ],
            expiration_ms: None,
        }])
        .await
    }
}

/// Publishes `messages` on a confirming channel and waits for every confirm.
async fn publish_on(ch: &Channel, messages: &[Outgoing]) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(messages.len());
    for m in messages {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"));
        if !m.headers.is_empty() {
            let mut table = FieldTable::default();
            for (k, v) in &m.headers {
                table.insert(
                    ShortString::from(k.as_str()),
                    AMQPValue::LongString(LongString::from(v.as_str())),
                );
            }
            props = props.with_headers(table);
        }
        if let Some(ms) = m.expiration_ms {
            props = props.with_expiration(ShortString::from(ms.to_string()));
        }
        let confirm = ch
            .basic_publish(
                ShortString::from(m.exchange.as_str()),
                ShortString::from(m.routing_key.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &m.body,
                props,
            )
            .await?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        let c = confirm.await.context("waiting for a publisher confirm")?;
        if !c.is_ack() {
            anyhow::bail!("RabbitMQ refused (nacked) a message");
        }
        if c.take_message().is_some() {
            anyhow::bail!("RabbitMQ returned an unroutable message");
        }
    }
    Ok(())
}

/// How often this message failed for reasons of its own so far.
fn retries(delivery: &Delivery) -> u32 {
    let Some(headers) = delivery.properties.headers() else {
        return 0;
    };
    match headers.inner().get(RETRIES_HEADER) {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// How many times a quorum queue hands out one message before dead-lettering it to the
/// rejected queue: a backstop for a message that kills its consumer's process (herald's own
/// counter parks the others, with a reason, long before), high enough that requeues
/// while MongoDB is away never reach it.
const QUORUM_DELIVERY_LIMIT: i64 = 1000;

/// What a queue of herald's is for, which decides its arguments.
#[derive(Clone, Copy)]
enum QueueRole<'a> {
    /// Consumed by herald; on quorum queues a message handed out too often goes to
    /// `rejected`.
    Consumed { rejected: &'a str },
    /// The rejected queue, where messages are parked for an operator.
    Parking,
    /// A delay queue: expired messages dead-letter to `exchange` with `routing_key`; on
    /// quorum queues at least once (RabbitMQ 3.10+: it needs `overflow = reject-publish`).
    Delay {
        exchange: &'a str,
        routing_key: &'a str,
    },
}

/// A queue of herald's that exists with other arguments than herald declares (another
/// type, above all): RabbitMQ refuses the declaration and cannot change them in place.
#[derive(Debug)]
struct Mismatch {
    queue: String,
    /// RabbitMQ's answer (it names the first argument that differs).
    answer: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue {} exists with other arguments: {}",
            self.queue, self.answer
        )
    }
}

impl std::error::Error for Mismatch {}

/// Declares a queue of herald's; one that exists with other arguments is a [`Mismatch`].
async fn declare_queue(
    ch: &Channel,
    name: &str,
    queue_type: QueueType,
    role: QueueRole<'_>,
) -> anyhow::Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = FieldTable::default();
    let mut text = |k: &str, v: &str| {
        args.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v)),
        );
    };
    let quorum = queue_type == QueueType::Quorum;
    if quorum {
        text("x-queue-type", "quorum");
    }
    match role {
        QueueRole::Consumed { rejected } if quorum => {
            text("x-dead-letter-exchange", "");
            text("x-dead-letter-routing-key", rejected);
            args.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(QUORUM_DELIVERY_LIMIT),
            );
        }
        QueueRole::Consumed { .. } | QueueRole::Parking => {}
        QueueRole::Delay {
            exchange,
            routing_key,
        } => {
            text("x-dead-letter-exchange", exchange);
            text("x-dead-letter-routing-key", routing_key);
            if quorum {
                text("x-dead-letter-strategy", "at-least-once");
                text("x-overflow", "reject-publish");
            }
        }
    }
    match ch
        .queue_declare(ShortString::from(name), options, args)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("inequivalent arg") => Err(Mismatch {
            queue: name.to_owned(),
            answer: e.to_string(),
        }
        .into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("declaring queue {name}"))),
    }
}

/// herald's queues, in the order they are declared (the rejected queue first: the others
/// dead-letter to it), each with its role.
fn herald_queues(names: &Names) -> Vec<(String, QueueRole<'_>)> {
    let consumed = QueueRole::Consumed {
        rejected: &names.rejected_queue,
    };
    let mut queues = vec![
        (names.rejected_queue.clone(), QueueRole::Parking),
        (names.intake_queue.clone(), consumed),
        (names.webhooks_queue.clone(), consumed),
    ];
    for p in Priority::ALL {
        queues.push((names.lane(p).to_owned(), consumed));
        for tier in 1..=names.retry_tiers {
            // Expired messages dead-letter back to the lane they came from.
            let delay = QueueRole::Delay {
                exchange: &names.jobs_exchange,
                routing_key: p.as_str(),
            };
            queues.push((names.retry_queue(p, tier), delay));
        }
    }
    queues
}

/// Declares every exchange, queue and binding; idempotent.
async fn declare_topology(
    ch: &Channel,
    names: &Names,
    queue_type: QueueType,
) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (exchange, kind) in [
        (&names.events_exchange, ExchangeKind::Topic),
        (&names.jobs_exchange, ExchangeKind::Direct),
    ] {
        ch.exchange_declare(
            ShortString::from(exchange.as_str()),
            kind,
            durable,
            FieldTable::default(),
        )
        .await?;
    }
    for (queue, role) in herald_queues(names) {
        declare_queue(ch, &queue, queue_type, role).await?;
    }
    let mut bindings = vec![(names.intake_queue.as_str(), &names.events_exchange, "#")];
    for p in Priority::ALL {
        bindings.push((names.lane(p), &names.jobs_exchange, p.as_str()));
    }
    for (queue, exchange, key) in bindings {
        ch.queue_bind(
            ShortString::from(queue),
            ShortString::from(exchange.as_str()),
            ShortString::from(key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// After a [`Mismatch`]: every herald queue declared otherwise (one channel each, as a
/// refusal closes its channel), and the migration to do.
async fn mismatched(conn: &Connection, names: &Names, queue_type: QueueType) -> String {
    let mut queues = Vec::new();
    for (queue, role) in herald_queues(names) {
        let Ok(ch) = conn.create_channel().await else {
            break;
        };
        match declare_queue(&ch, &queue, queue_type, role).await {
            Ok(()) => {
                let _ = ch.close(200, ShortString::from("checked")).await;
            }
            Err(e) if e.downcast_ref::<Mismatch>().is_some() => queues.push(queue),
            Err(_) => {}
        }
    }
    format!(
        "{} of herald's queues exist with other arguments than herald declares for \
         amqp.queue_type = \"{}\": {}. RabbitMQ cannot change a queue's type or arguments in \
         place: stop herald, let them drain, delete them (rabbitmqctl delete_queue <name>), \
         and start herald again (docs/rabbitmq.md, moving a broker to quorum)",
        queues.len(),
        queue_type.as_str(),
        queues.join(", ")
    )
}
