//! The worker pool: one consumer per priority lane, each with its own slots, plus the committer.

pub mod committer;
pub mod deliver;
pub mod dispatch;
pub mod gate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::batch::Batcher;
use crate::channels::Channels;
use crate::config::{PolicySettings, Secret, Settings, WebhookSettings, WorkerSettings};
use crate::domain::unsubscribe::Unsubscribe;
use crate::domain::{Category, Channel, EventType, Priority, UserId};
use crate::enrich::Enricher;
use crate::metrics::Metrics;
use crate::outbox::Relay;
use crate::queue::messages::Job;
use crate::queue::Broker;
use crate::queue::{Disposition, Incoming, Outgoing};
use crate::store::suppressions::suppression_id;
use crate::store::Store;
use crate::store::{DeliveryClaim, DeliveryDoc, FanoutBatch, QueuedDelivery, UserDoc};
use crate::supervise::Supervised;
use crate::templates::Templates;
use committer::Committer;
use deliver::NotificationCache;
use gate::{Gate, LaneGate};

/// The worker pool as a handle: what dispatching and delivering need, built by the
/// startup code.
#[derive(Clone)]
pub struct Worker {
    pub store: Store,
    pub broker: Arc<Broker>,
    pub templates: Arc<Templates>,
    pub channels: Channels,
    pub enricher: Arc<Enricher>,
    pub metrics: Arc<Metrics>,
    pub relay: Relay,
    /// Names this process in delivery claims (host:pid:random).
    pub instance: String,
    pub settings: Arc<WorkerConfig>,
}

/// The settings a worker reads.
pub struct WorkerConfig {
    pub worker: WorkerSettings,
    pub policy: PolicySettings,
    pub webhook: WebhookSettings,
    /// Event types configured as marketing (the others are transactional).
    pub marketing: std::collections::HashSet<String>,
    /// Where unsubscribe links point (`server.public_url`, without a trailing slash).
    pub public_url: String,
    /// Signs unsubscribe links.
    pub unsubscribe_secret: Secret,
}

impl WorkerConfig {
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            worker: s.worker.clone(),
            policy: s.policy.clone(),
            webhook: s.webhook.clone(),
            marketing: s
                .event_types
                .iter()
                .filter(|(_, t)| t.category == Category::Marketing)
                .map(|(name, _)| name.clone())
                .collect(),
            public_url: s.server.public_url.trim_end_matches('/').to_owned(),
            unsubscribe_secret: s.email.unsubscribe_secret.clone(),
        }
    }

    /// The category of a notification: its own (from the event or schedule), else its
    /// event type's.
    pub fn category(&self, own: Option<Category>, event_type: &str) -> Category {
        own.unwrap_or(if self.marketing.contains(event_type) {
            Category::Marketing
        } else {
            Category::Transactional
        })
    }

    /// The one-click unsubscribe link in delivery `delivery_id` for `user_id` leaving
    /// `event_type` (`None`: all marketing).
    pub fn unsubscribe_url(
        &self,
        delivery_id: &str,
        user_id: &str,
        event_type: Option<&str>,
    ) -> Option<String> {
        let leave = Unsubscribe {
            user_id: UserId::parse(user_id).ok()?,
            event_type: match event_type {
                Some(t) => Some(EventType::parse(t).ok()?),
                None => None,
            },
            delivery_id: Some(delivery_id.to_owned()),
        };
        let token = leave.token(self.unsubscribe_secret.expose().as_bytes());
        Some(format!("{}/u/{token}", self.public_url))
    }
}

/// Fan-out batches (each up to `worker.fanout_batch_size` deliveries) one transaction
/// writes at most: many single-recipient events share one, a campaign's long inserts do not
/// pile up into one long transaction.
const FANOUTS_PER_TRANSACTION: usize = 16;

/// What a lane's delivery jobs share: the process's notification cache and the lane's
/// own batched round trips (reads, claims, commits). Each lane batches on its own, so a
/// high-priority delivery never waits for a round trip of the low lane's backlog.
pub struct Shared {
    /// The lane these jobs come from.
    pub lane: Priority,
    /// The high lane goes first at the database, before the process's other lanes.
    pub gate: LaneGate,
    pub notifications: Arc<NotificationCache>,
    /// A record that exists but cannot be decoded answers `Err` (for its job alone).
    pub deliveries: Batcher<String, Result<Option<DeliveryDoc>, String>>,
    pub users: Batcher<String, Result<Option<UserDoc>, String>>,
    /// The attempt id, when this worker got the delivery.
    pub claims: Batcher<DeliveryClaim, Option<String>>,
    /// Fan-out batches of the lane's notifications written together: each answers the
    /// deliveries to publish.
    pub fanouts: Batcher<FanoutBatch, Vec<QueuedDelivery>>,
    pub commits: Committer,
    /// Chunk deliveries this lane has started at once, one permit each (as many as its
    /// slots, at least a window of [`CHUNK_WINDOW`]): a worker that stops leaves at most
    /// that many `outcome_unknown`.
    pub chunk_sends: Arc<tokio::sync::Semaphore>,
}

/// A chunk's deliveries are sent this many at a time, each window marked on the chunk
/// before its sends.
pub const CHUNK_WINDOW: usize = 32;

impl Shared {
    /// Starts one lane's batching tasks; they end when the last `Shared` is dropped.
    pub fn start(
        ctx: &Worker,
        lane: Priority,
        gate: Arc<Gate>,
        notifications: Arc<NotificationCache>,
    ) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let max = ctx.settings.worker.commit_batch_max;
        // A lower lane's round trips wait while a high-priority job is at work.
        let gate = LaneGate::new(gate, lane);
        let (store, g) = (ctx.store.clone(), gate.clone());
        let (deliveries, t1) = Batcher::start("deliveries", max, move |ids: Vec<String>| {
            let (store, gate) = (store.clone(), g.clone());
            async move {
                gate.turn().await;
                let found = store.get_deliveries(&ids).await?;
                Ok(ids
                    .iter()
                    .map(|id| found.get(id).cloned().transpose())
                    .collect())
            }
        });
        let (store, g) = (ctx.store.clone(), gate.clone());
        let (users, t2) = Batcher::start("users", max, move |ids: Vec<String>| {
            let (store, gate) = (store.clone(), g.clone());
            async move {
                gate.turn().await;
                // One batch often asks for a user several times (one delivery per channel).
                let mut found = store.get_users(&ids).await?;
                mark_suppressed(&store, &mut found).await?;
                Ok(ids
                    .iter()
                    .map(|id| found.get(id).cloned().transpose())
                    .collect())
            }
        });
        let (store, g) = (ctx.store.clone(), gate.clone());
        let (claims, t3) = Batcher::start("claims", max, move |claims: Vec<DeliveryClaim>| {
            let (store, gate) = (store.clone(), g.clone());
            async move {
                gate.turn().await;
                store.claim_deliveries(&claims).await
            }
        });
        let (commits, t4) = committer::start(
            ctx.store.clone(),
            ctx.metrics.clone(),
            max,
            lane,
            gate.clone(),
        );
        let (store, g) = (ctx.store.clone(), gate.clone());
        let (fanouts, t5) = Batcher::start(
            "fanouts",
            FANOUTS_PER_TRANSACTION,
            move |batches: Vec<FanoutBatch>| {
                let (store, gate) = (store.clone(), g.clone());
                async move {
                    gate.turn().await;
                    store.insert_delivery_batches(&batches).await
                }
            },
        );
        let w = &ctx.settings.worker;
        let slots = match lane {
            Priority::High => w.high_concurrency,
            Priority::Normal => w.normal_concurrency,
            Priority::Low => w.low_concurrency,
        } as usize;
        let shared = Self {
            chunk_sends: Arc::new(tokio::sync::Semaphore::new(slots.max(CHUNK_WINDOW))),
            lane,
            gate,
            notifications,
            deliveries,
            users,
            claims,
            commits,
            fanouts,
        };
        (Arc::new(shared), vec![t1, t2, t3, t4, t5])
    }
}

/// Handles one job message; the queue layer settles the message as this returns.
pub async fn handle(ctx: &Worker, shared: &Shared, message: Incoming) -> Disposition {
    let job = match Job::decode(&message.body) {
        Ok(job) => job,
        Err(why) => {
            return Disposition::Reject {
                code: "malformed_job".to_owned(),
                message: why,
            }
        }
    };
    let result = {
        // Not through the pauses below: a job put back is not at work.
        let _at_work = shared.gate.job();
        match &job {
            Job::Dispatch { notification_id } => {
                dispatch::dispatch(ctx, shared, notification_id).await
            }
            Job::DispatchMany { notification_ids } => {
                dispatch::dispatch_many(ctx, shared, notification_ids).await
            }
            Job::Deliver { delivery_id, .. } => {
                deliver::deliver(ctx, shared, delivery_id, message.redelivered).await
            }
            Job::DeliverChunk { chunk_id, .. } => {
                deliver::deliver_chunk(ctx, shared, chunk_id, message.redelivered).await
            }
        }
    };
    match result {
        Ok(()) => Disposition::Ack,
        Err(e) if e.is::<Unprocessable>() => {
            tracing::error!(
                error = format!("{e:#}"),
                ?job,
                "job can never be handled; parking it"
            );
            Disposition::Reject {
                code: "unprocessable_job".to_owned(),
                message: format!("{e:#}"),
            }
        }
        Err(e) if e.is::<Later>() => {
            tracing::debug!(error = format!("{e:#}"), ?job, "job must wait; requeueing");
            tokio::time::sleep(Duration::from_millis(500)).await;
            Disposition::Requeue
        }
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), ?job, "job failed; requeueing");
            tokio::time::sleep(Duration::from_millis(500)).await;
            if crate::batch::is_temporary(&e) {
                // MongoDB or RabbitMQ is down, or another transaction holds the documents
                // (a killed worker's, until the server expires it): no fault of the job's;
                // it waits, uncounted.
                Disposition::Requeue
            } else {
                // Maybe the job's own fault: counted, and parked once it keeps failing.
                Disposition::Retry {
                    error: format!("{e:#}"),
                }
            }
        }
    }
}

/// Resolves deliveries left `sending` past the claim timeout that no job will bring back
/// (a commit lost with its job already acked, a job parked): `failed`/`outcome_unknown`,
/// never re-sent; dispatches again notifications whose fan-out went idle unfinished (a
/// lost dispatch job); and finishes notifications whose finishing step was cut off (a
/// process killed between a commit and finalizing). Every worker sweeps; the claim precondition
/// and the guarded finalize make it idempotent.
async fn sweep_stale_claims(ctx: Worker, commits: Committer, cancel: CancellationToken) {
    let timeout_ms = ctx.settings.worker.claim_timeout_secs.max(1) * 1000;
    let every = Duration::from_millis((timeout_ms / 2) as u64);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let cutoff = mongodb::bson::DateTime::from_millis(
            mongodb::bson::DateTime::now().timestamp_millis() - timeout_ms,
        );
        let stale = match ctx.store.stale_claims(cutoff, 500).await {
            Ok(stale) => stale,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "could not look for stale claims");
                continue;
            }
        };
        for d in &stale {
            let Some(claim) = &d.claim else { continue };
            tracing::warn!(delivery_id = %d.id, worker = %claim.worker, "delivery `sending` past the claim timeout; recording outcome_unknown");
            if let Err(e) = commits
                .call(deliver::outcome_unknown(
                    d,
                    claim,
                    "still `sending` past the claim timeout",
                ))
                .await
            {
                tracing::warn!(error = format!("{e:#}"), "could not resolve a stale claim");
            }
        }
        match ctx.store.stale_chunks(cutoff, 100).await {
            Ok(chunks) => {
                for chunk in &chunks {
                    match deliver::recover_chunk(
                        &ctx,
                        &commits,
                        chunk,
                        "still claimed past the claim timeout",
                    )
                    .await
                    {
                        // Deliveries not yet started: another worker sends them.
                        Ok(true) => {
                            let job = Outgoing {
                                exchange: ctx.broker.names().jobs_exchange.clone(),
                                routing_key: chunk.priority.as_str().to_owned(),
                                body: Job::DeliverChunk {
                                    chunk_id: chunk.id.clone(),
                                    notification_id: chunk.notification_id.clone(),
                                }
                                .encode(),
                                headers: Vec::new(),
                                expiration_ms: None,
                            };
                            if let Err(e) = ctx.broker.publish_confirmed(&[job]).await {
                                tracing::warn!(
                                    error = format!("{e:#}"),
                                    "could not publish a resumed chunk"
                                );
                            }
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(
                            error = format!("{e:#}"),
                            "could not resolve a stale chunk"
                        ),
                    }
                }
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "could not look for stale chunks"),
        }
        let undispatched = ctx.store.undispatched_notifications(cutoff, 100).await;
        let jobs: Vec<Outgoing> = undispatched
            .unwrap_or_default()
            .into_iter()
            .map(|(id, lane)| {
                tracing::warn!(notification_id = %id, "fan-out idle past the claim timeout; dispatching again");
                Outgoing {
                    exchange: ctx.broker.names().jobs_exchange.clone(),
                    routing_key: lane.as_str().to_owned(),
                    body: Job::Dispatch {
                        notification_id: id,
                    }
                    .encode(),
                    headers: Vec::new(),
                    expiration_ms: None,
                }
            })
            .collect();
        if let Err(e) = ctx.broker.publish_confirmed(&jobs).await {
            tracing::warn!(error = format!("{e:#}"), "could not dispatch again");
        }
        let unfinished = ctx.store.unfinished_notifications(cutoff, 500).await;
        for id in unfinished.unwrap_or_default() {
            tracing::warn!(notification_id = %id, "finishing a notification left dispatching");
            if let Err(e) = ctx.store.finalize_notification(&id).await {
                tracing::warn!(error = format!("{e:#}"), "could not finish a notification");
            }
        }
    }
}

/// A job that cannot be decided yet (another worker may still be sending its delivery):
/// back to the queue after a pause, uncounted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Later(pub String);

/// A job that will fail the same way however often it is tried (its record cannot be
/// read): parked with the reason at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unprocessable(pub String);

/// Runs the pool until cancelled; in-flight jobs finish and commit before it returns.
pub async fn run(ctx: Worker, cancel: CancellationToken) -> anyhow::Result<()> {
    let notifications = Arc::new(NotificationCache::default());
    let gate = Arc::new(Gate::default());
    let w = &ctx.settings.worker;
    // Lanes, batchers and the sweep run until `cancel`; one that ends before it (or
    // panics) stops the worker, and with it the process, instead of leaving a lane dead.
    let mut tasks = Supervised::new(cancel.clone());
    let mut sweeper_commits = None;
    for (priority, slots) in [
        (Priority::High, w.high_concurrency),
        (Priority::Normal, w.normal_concurrency),
        (Priority::Low, w.low_concurrency),
    ] {
        let (lane, batching) = match priority {
            Priority::High => ("the high lane", "the high lane's batchers"),
            Priority::Normal => ("the normal lane", "the normal lane's batchers"),
            Priority::Low => ("the low lane", "the low lane's batchers"),
        };
        let (shared, batchers) = Shared::start(
            &ctx,
            priority,
            Arc::clone(&gate),
            Arc::clone(&notifications),
        );
        for batcher in batchers {
            tasks.spawn(batching, async move {
                batcher.await.map_err(|e| anyhow::anyhow!("{e}"))
            });
        }
        sweeper_commits.get_or_insert_with(|| shared.commits.clone());
        let queue = ctx.broker.names().lane(priority).to_owned();
        let (ctx2, shared2) = (ctx.clone(), Arc::clone(&shared));
        let handler = move |m: Incoming| {
            let (ctx, shared) = (ctx2.clone(), Arc::clone(&shared2));
            async move { handle(&ctx, &shared, m).await }
        };
        let consume = Arc::clone(&ctx.broker).consume(queue, slots, cancel.clone(), handler);
        tasks.spawn(lane, async move {
            consume.await;
            Ok(())
        });
    }
    // The sweep commits through the high lane's batcher: it is rarely busy.
    let Some(commits) = sweeper_commits else {
        anyhow::bail!("the worker has no lanes");
    };
    let sweep = sweep_stale_claims(ctx.clone(), commits, cancel.clone());
    tasks.spawn("the stale-claim sweep", async move {
        sweep.await;
        Ok(())
    });
    tracing::info!("worker pool running");
    tasks.wait().await
}

/// The suppression keys of a user's addresses, per channel.
pub fn suppression_keys(u: &UserDoc) -> Vec<(Channel, String)> {
    let mut keys = Vec::new();
    if let Some(e) = u.email.as_deref().filter(|e| !e.trim().is_empty()) {
        keys.push((Channel::Email, suppression_id(Channel::Email, e)));
    }
    if let Some(p) = u.phone.as_deref().filter(|p| !p.trim().is_empty()) {
        keys.push((Channel::Sms, suppression_id(Channel::Sms, p)));
    }
    for t in &u.push_tokens {
        keys.push((Channel::Push, suppression_id(Channel::Push, t)));
    }
    keys
}

/// Marks each user's suppressed channels and opt-outs: one query for the batch's
/// addresses and one for its users, side by side, riding on the batch's user read.
async fn mark_suppressed(
    store: &Store,
    users: &mut HashMap<String, Result<UserDoc, String>>,
) -> anyhow::Result<()> {
    let found: Vec<&UserDoc> = users.values().filter_map(|u| u.as_ref().ok()).collect();
    let keys: Vec<String> = found
        .iter()
        .flat_map(|u| suppression_keys(u))
        .map(|(_, k)| k)
        .collect();
    let ids: Vec<String> = found.iter().map(|u| u.id.clone()).collect();
    let (suppressed, opt_outs) =
        tokio::try_join!(store.suppressed_among(&keys), store.unsubscribes_of(&ids))?;
    for u in users.values_mut().filter_map(|u| u.as_mut().ok()) {
        u.suppressed = suppression_keys(u)
            .into_iter()
            .filter(|(_, k)| suppressed.contains(k))
            .map(|(c, _)| c)
            .collect();
        u.unsubscribes = opt_outs
            .iter()
            .filter(|o| o.user_id == u.id)
            .cloned()
            .collect();
    }
    Ok(())
}

/// The same for one user the batch did not read (a profile from the enrichment service).
pub async fn mark_one(store: &Store, user: &mut UserDoc) -> anyhow::Result<()> {
    let mut one = HashMap::from([(user.id.clone(), Ok(std::mem::take(user)))]);
    mark_suppressed(store, &mut one).await?;
    if let Some(Ok(marked)) = one.into_values().next() {
        *user = marked;
    }
    Ok(())
}
