//! Each role as a library function, so `herald all` and the tests run what production runs.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Context;
use crate::{api, ingest, scheduler, shutdown, worker};

/// How long in-flight work gets after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(15);

/// Prefetch of the `herald.events` intake consumer.
const INTAKE_PREFETCH: u16 = 64;

async fn intake(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    let queue = ctx.broker.names().intake_queue.clone();
    let intake = ctx.intake.clone();
    ctx.broker
        .clone()
        .consume(queue, INTAKE_PREFETCH, cancel, move |m| {
            ingest::handle_amqp_event(intake.clone(), m)
        })
        .await;
    Ok(())
}

/// Follows templates stored through the API by other processes.
async fn refresh_templates(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    let every = Duration::from_millis(ctx.settings.templates.refresh_ms);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = ctx.sync_templates().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not refresh stored templates"
            );
        }
    }
}

/// Runs `work` until it ends or `cancel` fires plus the drain deadline, then closes RabbitMQ.
async fn finish<F>(ctx: &Context, work: F, cancel: CancellationToken) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let r = shutdown::drain(work, cancel.clone(), DRAIN).await;
    if r.is_err() {
        // Whatever else of this process still runs stops too: it exits non-zero and
        // its supervisor starts it again.
        cancel.cancel();
    }
    ctx.broker.close().await;
    r
}

/// The edge: REST API, the `herald.events` intake, an outbox relay woken by accepts, and
/// provider feedback that waits for its delivery.
pub async fn api(
    ctx: Context,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    ctx.prepare_store().await?;
    let work = async {
        tokio::try_join!(
            api::serve(ctx.clone(), listener, cancel.clone()),
            intake(ctx.clone(), cancel.clone()),
            ctx.relay.clone().run(cancel.clone()),
            refresh_templates(ctx.clone(), cancel.clone()),
            api::retry_feedback(ctx.store.clone(), ctx.metrics.clone(), cancel.clone()),
        )?;
        Ok(())
    };
    finish(&ctx, work, cancel.clone()).await
}

/// The worker pool: dispatch and delivery on every lane, a relay for its retries, and
/// the status webhooks.
pub async fn worker(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    ctx.prepare_store().await?;
    let work = async {
        tokio::try_join!(
            worker::run(ctx.worker.clone(), cancel.clone()),
            ctx.relay.clone().run(cancel.clone()),
            ctx.hooks.clone().run(cancel.clone()),
            refresh_templates(ctx.clone(), cancel.clone()),
            api::serve_metrics(ctx.clone(), api::ProbeRole::Worker, cancel.clone()),
        )?;
        Ok(())
    };
    finish(&ctx, work, cancel.clone()).await
}

/// Cron campaigns and the outbox sweep.
pub async fn scheduler(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    ctx.prepare_store().await?;
    let work = async {
        tokio::try_join!(
            scheduler::run(ctx.scheduler.clone(), cancel.clone()),
            ctx.relay.clone().run(cancel.clone()),
            refresh_templates(ctx.clone(), cancel.clone()),
            api::serve_metrics(ctx.clone(), api::ProbeRole::Scheduler, cancel.clone()),
        )?;
        Ok(())
    };
    finish(&ctx, work, cancel.clone()).await
}

/// Every role in one process (the default for a single machine).
pub async fn all(
    ctx: Context,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    ctx.prepare_store().await?;
    let work = async {
        tokio::try_join!(
            api::serve(ctx.clone(), listener, cancel.clone()),
            intake(ctx.clone(), cancel.clone()),
            ctx.relay.clone().run(cancel.clone()),
            scheduler::run(ctx.scheduler.clone(), cancel.clone()),
            worker::run(ctx.worker.clone(), cancel.clone()),
            ctx.hooks.clone().run(cancel.clone()),
            refresh_templates(ctx.clone(), cancel.clone()),
            api::retry_feedback(ctx.store.clone(), ctx.metrics.clone(), cancel.clone()),
        )?;
        Ok(())
    };
    finish(&ctx, work, cancel.clone()).await
}
