//! Each role as a library function, so `herald all` and the tests run what production runs.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Context;
use crate::{api, ingest, outbox, scheduler, shutdown, worker};

/// How long in-flight work gets after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(15);

/// Prefetch of the `herald.events` intake consumer.
const INTAKE_PREFETCH: u16 = 64;

async fn intake(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    let queue = ctx.broker.names().intake_queue.clone();
    let c = ctx.clone();
    ctx.broker
        .clone()
        .consume(queue, INTAKE_PREFETCH, cancel, move |m| {
            ingest::handle_amqp_event(c.clone(), m)
        })
        .await;
    Ok(())
}

/// The edge: REST API, the `herald.events` intake, and an outbox relay woken by accepts.
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
            outbox::run(ctx.clone(), cancel.clone()),
        )?;
        Ok(())
    };
    let r = shutdown::drain(work, cancel.clone(), DRAIN).await;
    ctx.broker.close().await;
    r
}

/// The worker pool: dispatch and delivery on every lane.
pub async fn worker(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    ctx.prepare_store().await?;
    let r = shutdown::drain(
        worker::run(ctx.clone(), cancel.clone()),
        cancel.clone(),
        DRAIN,
    )
    .await;
    ctx.broker.close().await;
    r
}

/// Periodic work: the outbox sweep. Cron campaigns are not built yet.
pub async fn scheduler(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    ctx.prepare_store().await?;
    tracing::warn!("cron campaigns are not built yet; this role runs the outbox relay only");
    let r = shutdown::drain(
        outbox::run(ctx.clone(), cancel.clone()),
        cancel.clone(),
        DRAIN,
    )
    .await;
    ctx.broker.close().await;
    r
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
            outbox::run(ctx.clone(), cancel.clone()),
            scheduler::run(ctx.clone(), cancel.clone()),
            worker::run(ctx.clone(), cancel.clone()),
        )?;
        Ok(())
    };
    let r = shutdown::drain(work, cancel.clone(), DRAIN).await;
    ctx.broker.close().await;
    r
}
