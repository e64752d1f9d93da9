//! The outbox relay: publishes committed outbox entries to RabbitMQ with confirms, then removes them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::DateTime;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::OutboxSettings;
use crate::queue::messages::Job;
use crate::queue::{Broker, Names, Outgoing};
use crate::store::{OutboxDoc, Store};

/// This process's relay, as a handle: what writes outbox entries wakes it or hands
/// entries to it; the process's relay task runs it.
#[derive(Clone)]
pub struct Relay {
    store: Store,
    broker: Arc<Broker>,
    settings: OutboxSettings,
    /// Names this process in the leases of the entries handed to it.
    instance: Arc<str>,
    handoff: Arc<Handoff>,
    wake: Arc<Notify>,
}

/// Entries this process accepted, handed straight to its own running relay. They are
/// written already leased to it, so no other relay races for them and this one skips the
/// poll, the lease write and the read-back; if this process dies first, the lease expires
/// and any relay publishes them.
#[derive(Default)]
struct Handoff(Mutex<Option<mpsc::UnboundedSender<OutboxDoc>>>);

impl Handoff {
    fn sender(&self) -> Option<mpsc::UnboundedSender<OutboxDoc>> {
        // A poisoned lock only loses the shortcut: entries then wait for the poll.
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, tx: Option<mpsc::UnboundedSender<OutboxDoc>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }
}

impl Relay {
    pub fn new(
        store: Store,
        broker: Arc<Broker>,
        settings: &OutboxSettings,
        instance: &str,
    ) -> Self {
        Self {
            store,
            broker,
            settings: settings.clone(),
            instance: instance.into(),
            handoff: Arc::default(),
            wake: Arc::default(),
        }
    }

    /// An outbox entry was written that is due now (or soon): look without waiting
    /// for the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Leases `entry` to this process's relay when one runs and the entry is due now;
    /// returns whether it did (then [`Relay::pass`] the entry once it is committed).
    pub fn lease(&self, entry: &mut OutboxDoc) -> bool {
        let now = DateTime::now();
        if entry.due_at > now || entry.delay_ms > 0 || self.handoff.sender().is_none() {
            return false;
        }
        let lease = self.settings.lease_secs.max(1) * 1000;
        entry.lease_until = DateTime::from_millis(now.timestamp_millis() + lease);
        entry.lease_token = Some(format!("handoff:{}", self.instance));
        true
    }

    /// Hands committed entries to the relay: those leased to it (see [`Relay::lease`])
    /// directly, and wakes it for the others. If the relay stopped meanwhile, the leased
    /// entries wait for their lease to expire.
    pub fn pass(&self, entries: Vec<OutboxDoc>) {
        let sender = self.handoff.sender();
        let mut waiting = false;
        for entry in entries {
            if entry.lease_token.is_none() {
                waiting = true;
            } else if sender.as_ref().is_none_or(|tx| tx.send(entry).is_err()) {
                tracing::debug!("outbox relay stopped; the entry waits for its lease");
            }
        }
        if waiting {
            self.wake();
        }
    }

    /// Publishes one batch of due entries; returns how many were published.
    /// Entries are removed only after RabbitMQ confirmed them, so a crash or a broker
    /// outage leaves them to be published later (at least once; consumers are idempotent).
    pub async fn relay_once(&self) -> anyhow::Result<usize> {
        let lease = Duration::from_secs(self.settings.lease_secs as u64);
        let entries = self
            .store
            .claim_outbox(self.settings.batch_size, lease)
            .await?;
        self.publish(entries).await
    }

    /// Publishes leased entries and removes them once RabbitMQ confirmed; on failure hands
    /// them back for the next poll.
    async fn publish(&self, entries: Vec<OutboxDoc>) -> anyhow::Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        let names = self.broker.names();
        let messages: Vec<Outgoing> = entries.iter().map(|e| message(names, e)).collect();
        let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
        if let Err(e) = self.broker.publish_confirmed(&messages).await {
            if let Err(release) = self.store.release_outbox(&ids).await {
                tracing::warn!(
                    error = format!("{release:#}"),
                    "could not release outbox entries; they wait for their lease"
                );
            }
            return Err(e);
        }
        self.store.complete_outbox(&ids).await?;
        Ok(ids.len())
    }

    /// Runs the relay until cancelled: publishing what this process's accepts hand it,
    /// woken by its other outbox writes, and polling for entries written by other
    /// processes or left by a failed attempt.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let batch = self.settings.batch_size.max(1) as usize;
        let (tx, mut handed) = mpsc::unbounded_channel();
        self.handoff.set(Some(tx));
        let mut buffer = Vec::with_capacity(batch);
        let mut backoff = poll;
        let mut next_poll = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_poll {
                match self.relay_once().await {
                    Ok(n) if n >= batch => continue,
                    Ok(_) => backoff = poll,
                    Err(e) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "outbox relay failed; entries wait"
                        );
                        backoff = (backoff * 2).min(self.broker.reconnect_max().max(poll));
                    }
                }
                next_poll = tokio::time::Instant::now() + backoff;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => next_poll = tokio::time::Instant::now(),
                _ = tokio::time::sleep_until(next_poll) => {}
                _ = handed.recv_many(&mut buffer, batch) => {
                    if let Err(e) = self.publish(std::mem::take(&mut buffer)).await {
                        tracing::warn!(error = format!("{e:#}"), "outbox relay failed; entries wait");
                    }
                }
            }
        }
        // Entries handed over but not yet published go out now rather than after their lease.
        self.handoff.set(None);
        handed.close();
        while handed.recv_many(&mut buffer, batch).await > 0 {
            if let Err(e) = self.publish(std::mem::take(&mut buffer)).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "outbox relay failed at shutdown; entries wait for their lease"
                );
                break;
            }
        }
        Ok(())
    }
}

/// The job an entry stands for: a dispatch to its lane (of all its notifications, in one
/// message), or a delivery — through a delay queue when it must wait (a retry's
/// backoff), straight to its lane otherwise.
fn message(names: &Names, e: &OutboxDoc) -> Outgoing {
    let body = match &e.delivery_id {
        Some(d) => Job::Deliver {
            delivery_id: d.clone(),
            notification_id: e.notification_id.clone(),
        },
        None if e.also.is_empty() => Job::Dispatch {
            notification_id: e.notification_id.clone(),
        },
        None => Job::DispatchMany {
            notification_ids: std::iter::once(&e.notification_id)
                .chain(&e.also)
                .cloned()
                .collect(),
        },
    }
    .encode();
    if e.delay_ms > 0 {
        Outgoing {
            exchange: String::new(),
            routing_key: names.retry_queue(e.lane, e.attempt.max(1) as u32),
            body,
            headers: Vec::new(),
            expiration_ms: Some(e.delay_ms as u64),
        }
    } else {
        Outgoing {
            exchange: names.jobs_exchange.clone(),
            routing_key: e.lane.as_str().to_owned(),
            body,
            headers: Vec::new(),
            expiration_ms: None,
        }
    }
}
