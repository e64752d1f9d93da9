//! The worker pool: one consumer per priority lane, each with its own slots, plus the committer.

pub mod committer;
pub mod deliver;
pub mod dispatch;
pub mod enrich;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::Context;
use crate::batch::Batcher;
use crate::domain::Priority;
use crate::queue::messages::Job;
use crate::queue::{Disposition, Incoming};
use crate::store::{DeliveryClaim, DeliveryDoc, UserDoc};
use committer::Committer;
use deliver::NotificationCache;

/// What every delivery job of this process shares: the notification cache and the
/// batched round trips (reads, claims, commits).
pub struct Shared {
    pub notifications: NotificationCache,
    pub deliveries: Batcher<String, Option<DeliveryDoc>>,
    pub users: Batcher<String, Option<UserDoc>>,
    pub claims: Batcher<DeliveryClaim, bool>,
    pub commits: Committer,
}

impl Shared {
    /// Starts the batching tasks; they end when the last `Shared` is dropped.
    fn start(ctx: &Context) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let max = ctx.settings.worker.commit_batch_max;
        let store = ctx.store.clone();
        let (deliveries, t1) = Batcher::start("deliveries", max, move |ids: Vec<String>| {
            let store = store.clone();
            async move {
                let found = store.get_deliveries(&ids).await?;
                Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
            }
        });
        let store = ctx.store.clone();
        let (users, t2) = Batcher::start("users", max, move |ids: Vec<String>| {
            let store = store.clone();
            async move {
                // One batch often asks for a user several times (one delivery per channel).
                let found = store.get_users(&ids).await?;
                Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
            }
        });
        let store = ctx.store.clone();
        let (claims, t3) = Batcher::start("claims", max, move |claims: Vec<DeliveryClaim>| {
            let store = store.clone();
            async move { store.claim_deliveries(&claims).await }
        });
        let (commits, t4) = committer::start(ctx.store.clone(), ctx.metrics.clone(), max);
        let shared = Self {
            notifications: NotificationCache::default(),
            deliveries,
            users,
            claims,
            commits,
        };
        (Arc::new(shared), vec![t1, t2, t3, t4])
    }
}

/// Handles one job message; the queue layer settles the message as this returns.
pub async fn handle(ctx: &Context, shared: &Shared, message: Incoming) -> Disposition {
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
            deliver::deliver(ctx, shared, delivery_id, message.redelivered).await
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
    let (shared, batch_tasks) = Shared::start(&ctx);
    let w = &ctx.settings.worker;
    let mut lanes = Vec::new();
    for (priority, slots) in [
        (Priority::High, w.high_concurrency),
        (Priority::Normal, w.normal_concurrency),
        (Priority::Low, w.low_concurrency),
    ] {
        let queue = ctx.broker.names().lane(priority).to_owned();
        let (ctx2, shared2) = (ctx.clone(), Arc::clone(&shared));
        let handler = move |m: Incoming| {
            let (ctx, shared) = (ctx2.clone(), Arc::clone(&shared2));
            async move { handle(&ctx, &shared, m).await }
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
    drop(shared);
    for task in batch_tasks {
        let _ = task.await;
    }
    Ok(())
}
