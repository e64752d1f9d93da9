//! The outbox relay: publishes committed outbox entries to RabbitMQ with confirms, then removes them.

use std::sync::Mutex;
use std::time::Duration;

use mongodb::bson::DateTime;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::app::Context;
use crate::queue::messages::Job;
use crate::queue::Outgoing;
use crate::store::OutboxDoc;

/// Entries this process accepted, handed straight to its own running relay. They are
/// written already leased to it, so no other relay races for them and this one skips the
/// poll, the lease write and the read-back; if this process dies first, the lease expires
/// and any relay publishes them.
#[derive(Default)]
pub struct Handoff(Mutex<Option<mpsc::UnboundedSender<OutboxDoc>>>);

impl Handoff {
    fn sender(&self) -> Option<mpsc::UnboundedSender<OutboxDoc>> {
        // A poisoned lock only loses the shortcut: entries then wait for the poll.
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, tx: Option<mpsc::UnboundedSender<OutboxDoc>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }

    /// Leases `entry` to this process's relay when one runs and the entry is due now;
    /// returns whether it did (then [`Handoff::pass`] the entry once it is committed).
    pub fn lease(&self, ctx: &Context, entry: &mut OutboxDoc) -> bool {
        let now = DateTime::now();
        if entry.due_at > now || entry.delay_ms > 0 || self.sender().is_none() {
            return false;
        }
        let lease = ctx.settings.outbox.lease_secs.max(1) * 1000;
        entry.lease_until = DateTime::from_millis(now.timestamp_millis() + lease);
        entry.lease_token = Some(format!("handoff:{}", ctx.instance));
        true
    }

    /// Hands committed entries to the relay: those leased to it (see [`Handoff::lease`])
    /// directly, and wakes it for the others. If the relay stopped meanwhile, the leased
    /// entries wait for their lease to expire.
    pub fn pass(&self, entries: Vec<OutboxDoc>, wake: &Notify) {
        let sender = self.sender();
        let mut waiting = false;
        for entry in entries {
            if entry.lease_token.is_none() {
                waiting = true;
            } else if sender.as_ref().is_none_or(|tx| tx.send(entry).is_err()) {
                tracing::debug!("outbox relay stopped; the entry waits for its lease");
            }
        }
        if waiting {
            wake.notify_one();
        }
    }
}

/// The job an entry stands for: a dispatch to its lane (of all its notifications, in one
/// message), or a delivery — through a delay queue when it must wait (a retry's
/// backoff), straight to its lane otherwise.
fn message(ctx: &Context, e: &OutboxDoc) -> Outgoing {
    let names = ctx.broker.names();
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

/// Publishes one batch of due entries; returns how many were published.
/// Entries are removed only after RabbitMQ confirmed them, so a crash or a broker
/// outage leaves them to be published later (at least once; consumers are idempotent).
pub async fn relay_once(ctx: &Context) -> anyhow::Result<usize> {
    let lease = Duration::from_secs(ctx.settings.outbox.lease_secs as u64);
    let entries = ctx
        .store
        .claim_outbox(ctx.settings.outbox.batch_size, lease)
        .await?;
    publish(ctx, entries).await
}

/// Publishes leased entries and removes them once RabbitMQ confirmed; on failure hands
/// them back for the next poll.
async fn publish(ctx: &Context, entries: Vec<OutboxDoc>) -> anyhow::Result<usize> {
    if entries.is_empty() {
        return Ok(0);
    }
    let messages: Vec<Outgoing> = entries.iter().map(|e| message(ctx, e)).collect();
    let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
    if let Err(e) = ctx.broker.publish_confirmed(&messages).await {
        if let Err(release) = ctx.store.release_outbox(&ids).await {
            tracing::warn!(
                error = format!("{release:#}"),
                "could not release outbox entries; they wait for their lease"
            );
        }
        return Err(e);
    }
    ctx.store.complete_outbox(&ids).await?;
    Ok(ids.len())
}

/// Runs the relay until cancelled: publishing what this process's accepts hand it,
/// woken by its other outbox writes, and polling for entries written by other processes
/// or left by a failed attempt.
pub async fn run(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    let poll = Duration::from_millis(ctx.settings.outbox.poll_interval_ms);
    let batch = ctx.settings.outbox.batch_size.max(1) as usize;
    let (tx, mut handed) = mpsc::unbounded_channel();
    ctx.handoff.set(Some(tx));
    let mut buffer = Vec::with_capacity(batch);
    let mut backoff = poll;
    let mut next_poll = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_poll {
            match relay_once(&ctx).await {
                Ok(n) if n >= batch => continue,
                Ok(_) => backoff = poll,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "outbox relay failed; entries wait"
                    );
                    backoff = (backoff * 2).min(ctx.broker.reconnect_max().max(poll));
                }
            }
            next_poll = tokio::time::Instant::now() + backoff;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.outbox_wake.notified() => next_poll = tokio::time::Instant::now(),
            _ = tokio::time::sleep_until(next_poll) => {}
            _ = handed.recv_many(&mut buffer, batch) => {
                if let Err(e) = publish(&ctx, std::mem::take(&mut buffer)).await {
                    tracing::warn!(error = format!("{e:#}"), "outbox relay failed; entries wait");
                }
            }
        }
    }
    // Entries handed over but not yet published go out now rather than after their lease.
    ctx.handoff.set(None);
    handed.close();
    while handed.recv_many(&mut buffer, batch).await > 0 {
        if let Err(e) = publish(&ctx, std::mem::take(&mut buffer)).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "outbox relay failed at shutdown; entries wait for their lease"
            );
            break;
        }
    }
    Ok(())
}
