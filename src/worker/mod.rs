//! The worker pool: one consumer per priority lane, each with its own slots, plus the committer.

pub mod committer;
pub mod deliver;
pub mod dispatch;
pub mod enrich;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::Context;
use crate::domain::Priority;
use crate::queue::messages::Job;
use crate::queue::{Disposition, Incoming};
use committer::Committer;
use deliver::NotificationCache;

/// Handles one job message; the queue layer settles the message as this returns.
pub async fn handle(
    ctx: &Context,
    cache: &NotificationCache,
    committer: &Committer,
    message: Incoming,
) -> Disposition {
    let job = match Job::decode(&message.body) {
        Ok(job) => job,
        Err(why) => {
            return Disposition::Reject {
                code: "malformed_job".to_owned(),
                message: why,
            }
        }
    };
    let result = match &job {
        Job::Dispatch { notification_id } => dispatch::dispatch(ctx, notification_id).await,
        Job::Deliver { delivery_id, .. } => {
            deliver::deliver(ctx, cache, committer, delivery_id, message.redelivered).await
        }
    };
    match result {
        Ok(()) => Disposition::Ack,
        Err(e) => {
            // MongoDB or RabbitMQ is unreachable: the job goes back and is tried again.
            tracing::warn!(error = format!("{e:#}"), ?job, "job failed; requeueing");
            tokio::time::sleep(Duration::from_millis(500)).await;
            Disposition::Requeue
        }
    }
}

/// Runs the pool until cancelled; in-flight jobs finish and commit before it returns.
pub async fn run(ctx: Context, cancel: CancellationToken) -> anyhow::Result<()> {
    let (committer, committer_task) = Committer::start(
        ctx.store.clone(),
        ctx.metrics.clone(),
        ctx.settings.worker.commit_batch_max,
    );
    let cache = Arc::new(NotificationCache::default());
    let w = &ctx.settings.worker;
    let mut lanes = Vec::new();
    for (priority, slots) in [
        (Priority::High, w.high_concurrency),
        (Priority::Normal, w.normal_concurrency),
        (Priority::Low, w.low_concurrency),
    ] {
        let queue = ctx.broker.names().lane(priority).to_owned();
        let (ctx2, cache, committer) = (ctx.clone(), Arc::clone(&cache), committer.clone());
        let handler = move |m: Incoming| {
            let (ctx, cache, committer) = (ctx2.clone(), Arc::clone(&cache), committer.clone());
            async move { handle(&ctx, &cache, &committer, m).await }
        };
        lanes.push(tokio::spawn(Arc::clone(&ctx.broker).consume(
            queue,
            slots,
            cancel.clone(),
            handler,
        )));
    }
    tracing::info!("worker pool running");
    for lane in lanes {
        let _ = lane.await;
    }
    drop(committer);
    let _ = committer_task.await;
    Ok(())
}
