//! The outbox relay: publishes committed outbox entries to RabbitMQ with confirms, then removes them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::Context;
use crate::queue::messages::Job;
use crate::queue::Outgoing;
use crate::store::OutboxDoc;

/// The job an entry stands for: a dispatch to its lane, or a delivery — through a delay
/// queue when it must wait (a retry's backoff), straight to its lane otherwise.
fn message(ctx: &Context, e: &OutboxDoc) -> Outgoing {
    let names = ctx.broker.names();
    let body = match &e.delivery_id {
        Some(d) => Job::Deliver {
            delivery_id: d.clone(),
            notification_id: e.notification_id.clone(),
        },
        None => Job::Dispatch {
            notification_id: e.notification_id.clone(),
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

/// Runs the relay until cancelled: woken by accepts in this process, and polling for
/// entries written by other processes or left by a failed attempt.
pub async fn run(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    let poll = Duration::from_millis(ctx.settings.outbox.poll_interval_ms);
    let mut backoff = poll;
    loop {
        match relay_once(&ctx).await {
            Ok(n) if n as i64 >= ctx.settings.outbox.batch_size => continue,
            Ok(_) => backoff = poll,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "outbox relay failed; entries wait"
                );
                backoff = (backoff * 2).min(ctx.broker.reconnect_max().max(poll));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = ctx.outbox_wake.notified() => {}
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}
