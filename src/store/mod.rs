//! MongoDB: the only module that knows collection names, indexes and transactions.

pub mod console_sessions;
pub mod dead_letters;
pub mod documents;
pub mod keys;
pub mod log;
pub mod schedules;
pub mod stats;
pub mod status_writes;
pub mod templates;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt, Stream, TryStreamExt};
use mongodb::bson::{self, doc, DateTime, Document, RawDocumentBuf};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{Acknowledgment, ClientOptions, IndexOptions, ReturnDocument, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};

use crate::config::{MongoSettings, RetentionSettings};
use crate::domain::{Channel, DeliveryStatus, NotificationStatus, Priority};
pub use dead_letters::*;
pub use documents::*;
pub use keys::*;
pub use log::*;
pub use schedules::*;
pub use stats::*;
use status_writes::{status_write_models, Guard, StatusWrite};
pub use templates::*;

const NOTIFICATIONS: &str = "notifications";
const OUTBOX: &str = "outbox";
/// A running fan-out's counts (total and queued), kept off the notification until it ends.
const FANOUT_PROGRESS: &str = "fanout_progress";
pub(crate) const DELIVERIES: &str = "deliveries";
const USERS: &str = "users";
const GROUPS: &str = "groups";
const GROUP_MEMBERS: &str = "group_members";
const CONTENTS: &str = "contents";

/// One fan-out's next deliveries to write (see [`Store::insert_delivery_batches`]).
#[derive(Debug, Clone)]
pub struct FanoutBatch {
    pub notification_id: String,
    pub planned: Vec<DeliveryDoc>,
}

/// Handles to herald's database.
#[derive(Clone)]
pub struct Store {
    client: Client,
    db: Database,
    retention: Arc<RetentionSettings>,
}

/// The result of accepting an event.
#[derive(Debug)]
pub enum Accepted {
    New(Box<NotificationDoc>),
    /// The event id was seen before: the original notification.
    Duplicate(Box<NotificationDoc>),
}

/// What a group commit did: each request's answer in order, and the outbox entries it
/// wrote for the new notifications.
pub struct Intaken {
    pub answers: Vec<anyhow::Result<Accepted>>,
    pub outbox: Vec<OutboxDoc>,
}

/// Folds the dispatch entries already leased to a relay (handed off: due now, no delay)
/// into one entry per lane, so that a group commit writes, and the relay removes, one
/// outbox entry per lane instead of one per event. The relay publishes the entry as one
/// `DispatchMany` job and removes it once RabbitMQ confirmed it.
fn bundled<'a>(entries: impl Iterator<Item = &'a OutboxDoc>) -> Vec<OutboxDoc> {
    let mut out: Vec<OutboxDoc> = Vec::new();
    let mut heads: HashMap<Priority, usize> = HashMap::new();
    for e in entries {
        let foldable = e.delivery_id.is_none() && e.delay_ms == 0 && e.lease_token.is_some();
        match heads.get(&e.lane) {
            Some(&i) if foldable && out[i].lease_token == e.lease_token => {
                let head = &mut out[i];
                head.due_at = head.due_at.min(e.due_at);
                head.also.push(e.notification_id.clone());
            }
            _ => {
                if foldable {
                    heads.insert(e.lane, out.len());
                }
                out.push(e.clone());
            }
        }
    }
    out
}

/// What must hold for an outcome to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Decided before any provider call: the delivery must still be waiting.
    Unclaimed,
    /// After a provider call: the delivery must still carry this attempt's claim.
    Claimed { attempt_id: String },
}

/// A delivery's outcome, committed with its attempt and the notification counters.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub delivery_id: String,
    pub notification_id: String,
    pub channel: crate::domain::Channel,
    pub precondition: Precondition,
    pub status: DeliveryStatus,
    pub reason: Option<String>,
    pub provider: Option<String>,
    pub attempt: Option<AttemptDoc>,
    /// For `retrying`: when and through which delay queue the next attempt comes.
    pub retry: Option<Retry>,
}

/// When a `retrying` or `deferred` delivery comes back.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Wait in a RabbitMQ delay queue this long (retry backoff).
    pub delay_ms: i64,
    /// The number of the coming attempt's retry (1 for the first retry).
    pub retry_number: i32,
    pub lane: Priority,
    /// Not published before this instant (the end of quiet hours).
    pub not_before: Option<DateTime>,
}

pub fn now() -> DateTime {
    DateTime::now()
}

/// A chrono instant as stored (millisecond precision, as BSON keeps it).
pub fn bson_time(t: chrono::DateTime<chrono::Utc>) -> DateTime {
    DateTime::from_millis(t.timestamp_millis())
}

/// A stored instant as chrono.
pub fn chrono_time(t: DateTime) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or_default()
}

/// The TTL index every expiring collection has: MongoDB removes a document once the
/// instant in its `expire_at` has passed (documents without one stay).
pub(crate) fn expiry_index() -> IndexModel {
    IndexModel::builder()
        .keys(doc! {"expire_at": 1})
        .options(
            IndexOptions::builder()
                .name("expire_at_ttl".to_owned())
                .expire_after(Duration::ZERO)
                .build(),
        )
        .build()
}

/// Every index of the deliveries collection: the recipient key that keeps a fan-out from
/// writing a delivery twice, the retention TTL and the delivery log's indexes.
pub fn delivery_indexes() -> Vec<IndexModel> {
    let mut all = vec![
        IndexModel::builder()
            .keys(doc! {"notification_id": 1, "user_id": 1, "channel": 1})
            .options(
                IndexOptions::builder()
                    .unique(true)
                    .name("notification_user_channel_unique".to_owned())
                    .build(),
            )
            .build(),
        expiry_index(),
    ];
    all.extend(log::log_index_models());
    all
}

/// A retention's expiry instant as stored, counted from now.
pub(crate) fn expires(days: u32) -> Option<DateTime> {
    crate::config::expiry(days, chrono::Utc::now()).map(bson_time)
}

/// The documents with these `_id`s, in one `$in` query, keyed by id; each decoded on its
/// own, so one record herald cannot read fails only itself, not the whole batch.
async fn by_ids<T>(
    collection: &Collection<T>,
    ids: &[String],
) -> anyhow::Result<HashMap<String, Result<T, String>>>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    let raw: Vec<RawDocumentBuf> = collection
        .clone_with_type::<RawDocumentBuf>()
        .find(doc! {"_id": {"$in": ids}})
        .await?
        .try_collect()
        .await?;
    Ok(raw
        .into_iter()
        .filter_map(|d| {
            let id = d.get_str("_id").ok()?.to_owned();
            let decoded = bson::from_slice::<T>(d.as_bytes())
                .map_err(|e| format!("record `{id}` cannot be read: {e}"));
            Some((id, decoded))
        })
        .collect())
}

/// True when MongoDB could not do it now — unreachable, switching over, or the documents
/// held by another transaction — as opposed to a failure of the request itself.
pub fn is_temporary(e: &anyhow::Error) -> bool {
    is_write_conflict(e) || is_unreachable(e)
}

/// True when `e` says MongoDB could not be reached or is switching over.
fn is_unreachable(e: &anyhow::Error) -> bool {
    // Server codes for "not now": host unreachable/not found, network timeout, shutdown,
    // stepdown, not primary, interrupted at shutdown, socket exception.
    const NOT_NOW: [i32; 12] = [
        6, 7, 89, 91, 189, 9001, 10107, 11600, 11602, 13435, 13436, 262,
    ];
    e.chain()
        .filter_map(|c| c.downcast_ref::<mongodb::error::Error>())
        .any(|m| {
            [
                "TransientTransactionError",
                "RetryableWriteError",
                "UnknownTransactionCommitResult",
            ]
            .iter()
            .any(|l| m.contains_label(l))
                || match m.kind.as_ref() {
                    ErrorKind::ServerSelection { .. }
                    | ErrorKind::Io(_)
                    | ErrorKind::ConnectionPoolCleared { .. }
                    | ErrorKind::DnsResolve { .. } => true,
                    ErrorKind::Command(c) => NOT_NOW.contains(&c.code),
                    _ => false,
                }
        })
}

/// MongoDB's WriteConflict: another transaction touched the same document first.
const WRITE_CONFLICT: i32 = 112;
/// A transaction that keeps conflicting is tried again for this long (and at least
/// `CONFLICT_TRIES` times). Every conflict means another transaction committed, so this
/// is progress, not a livelock; and giving up is costly: an outcome commit that fails
/// leaves its delivery `sending` although the worker knows what the provider answered,
/// until the claim timeout turns it into `outcome_unknown` (the chaos suite's `overload`
/// saw 80 so, with 10 tries in ~1 s on documents every transaction increments). Kept
/// under the claim timeout the chaos bed uses (30 s; the default is 300 s).
const CONFLICT_BUDGET: Duration = Duration::from_secs(20);
const CONFLICT_TRIES: u32 = 10;

/// True when `e` is (or, in a bulk write, holds only) write conflicts. MongoDB reports one
/// inside a transaction as a `TransientTransactionError`, which the driver's `and_run`
/// retries; SecantusDB reports it as a per-operation error of the bulk write, which it
/// does not, so herald retries those itself.
pub fn is_write_conflict(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<mongodb::error::Error>())
        .any(conflicted)
}

/// True when the driver's error is (or, in a bulk write, holds only) write conflicts.
fn conflicted(m: &mongodb::error::Error) -> bool {
    match m.kind.as_ref() {
        ErrorKind::Command(c) => c.code == WRITE_CONFLICT,
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == WRITE_CONFLICT,
        ErrorKind::BulkWrite(b) => {
            !b.write_errors.is_empty() && b.write_errors.values().all(|w| w.code == WRITE_CONFLICT)
        }
        ErrorKind::InsertMany(i) => i
            .write_errors
            .as_ref()
            .is_some_and(|errs| !errs.is_empty() && errs.iter().all(|w| w.code == WRITE_CONFLICT)),
        _ => false,
    }
}

/// Commits the session's transaction if `written` succeeded (committing again while the
/// commit's result is unknown: a commit is safe to repeat), and aborts it otherwise. One
/// attempt of the transaction: a write conflict is returned, not retried as the driver's
/// `and_run` does until the other transaction ends.
async fn commit_or_abort(
    session: &mut mongodb::ClientSession,
    written: mongodb::error::Result<()>,
) -> mongodb::error::Result<()> {
    if let Err(e) = written {
        let _ = session.abort_transaction().await;
        return Err(e);
    }
    let mut tries = 0;
    loop {
        match session.commit_transaction().await {
            Err(e) if e.contains_label("UnknownTransactionCommitResult") && tries < 3 => tries += 1,
            result => return result,
        }
    }
}

/// A short pause, growing with `round` (to at most ~250 ms) and jittered, before trying a
/// conflicting write again.
async fn conflict_pause(round: u32) {
    let ms = 2u64 << round.min(6);
    tokio::time::sleep(Duration::from_millis(ms + rand::random::<u64>() % ms)).await;
}

/// Runs a transaction again (after short pauses, for up to `CONFLICT_BUDGET`) while it
/// fails on a write conflict; any other outcome is returned as it is.
async fn conflict_retried<T, F, Fut>(attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    conflict_retried_for(CONFLICT_TRIES, CONFLICT_BUDGET, attempt).await
}

/// Tries of an intake transaction whose event id another transaction holds: ~60 ms of
/// pauses in all, enough for a live transaction to end.
const ACCEPT_CONFLICT_TRIES: u32 = 5;

/// Runs a transaction again while it fails on a write conflict, at least `tries` times
/// in all and for as long as `budget` lasts; any other outcome is returned as it is.
async fn conflict_retried_for<T, F, Fut>(
    tries: u32,
    budget: Duration,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let started = std::time::Instant::now();
    let mut round = 0;
    loop {
        match attempt().await {
            Err(e)
                if is_write_conflict(&e) && (round + 1 < tries || started.elapsed() < budget) =>
            {
                tracing::debug!(
                    error = format!("{e:#}"),
                    round,
                    "transaction conflicted; again"
                );
                conflict_pause(round).await;
                round += 1;
            }
            result => return result,
        }
    }
}

/// `n` with a running fan-out's `progress` counted in (nothing once the fan-out is done:
/// its counts have moved onto the notification).
fn add_progress(mut n: NotificationDoc, progress: Option<&Document>) -> NotificationDoc {
    if let (false, Some(p)) = (n.fanout_done, progress) {
        n.counts.total += stats::number(p.get("total"));
        n.counts.queued += stats::number(p.get("queued"));
    }
    n
}

/// The ids of the documents `find` finds.
async fn ids_found<C: FromIterator<String>>(
    find: mongodb::action::Find<'_, Document>,
) -> anyhow::Result<C> {
    Ok(find
        .projection(doc! {"_id": 1})
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .iter()
        .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
        .collect())
}

/// True when a write failed on a unique index.
pub fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    const DUPLICATE_KEY: i32 = 11000;
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().any(|w| w.code == DUPLICATE_KEY)),
        _ => false,
    }
}

impl Store {
    /// Builds the client; the driver connects lazily, so this succeeds while MongoDB is down.
    pub async fn connect(
        settings: &MongoSettings,
        retention: &RetentionSettings,
    ) -> anyhow::Result<Self> {
        let mut options = ClientOptions::parse(settings.uri.expose())
            .await
            .context("parsing mongodb.uri")?;
        options.app_name = Some("herald".to_owned());
        options
            .server_selection_timeout
            .get_or_insert(Duration::from_secs(5));
        // An acknowledged write must survive the server crashing right after: a claim or
        // an outcome lost after its email went out would be sent again or never accounted
        // for. Majority + journal, unless the URI says otherwise.
        options.write_concern.get_or_insert(
            WriteConcern::builder()
                .w(Acknowledgment::Majority)
                .journal(true)
                .build(),
        );
        let client = Client::with_options(options).context("building the MongoDB client")?;
        let db = client.database(&settings.database);
        Ok(Self {
            client,
            db,
            retention: Arc::new(retention.clone()),
        })
    }

    /// Ends the client's sessions and closes its connections; the last thing a process
    /// does with the database. Without it the driver ends its sessions from a task it
    /// spawns while the runtime is being torn down.
    pub async fn close(&self) {
        let shutdown = self.client.clone().shutdown().immediate(true);
        if tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .is_err()
        {
            tracing::warn!("the MongoDB client did not close within 5 s");
        }
    }

    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    fn notifications(&self) -> Collection<NotificationDoc> {
        self.db.collection(NOTIFICATIONS)
    }
    fn outbox(&self) -> Collection<OutboxDoc> {
        self.db.collection(OUTBOX)
    }
    fn fanout_progress(&self) -> Collection<Document> {
        self.db.collection(FANOUT_PROGRESS)
    }
    fn deliveries(&self) -> Collection<DeliveryDoc> {
        self.db.collection(DELIVERIES)
    }
    fn users(&self) -> Collection<UserDoc> {
        self.db.collection(USERS)
    }
    fn groups(&self) -> Collection<GroupDoc> {
        self.db.collection(GROUPS)
    }
    fn members(&self) -> Collection<Document> {
        self.db.collection(GROUP_MEMBERS)
    }

    /// Answers when MongoDB does.
    pub async fn ping(&self) -> anyhow::Result<()> {
        self.db.run_command(doc! {"ping": 1}).await?;
        Ok(())
    }

    /// Creates collections and indexes; safe to run any number of times.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let existing: HashSet<String> = self
            .db
            .list_collection_names()
            .await
            .context("listing collections")?
            .into_iter()
            .collect();
        // Collections must exist before a transaction writes to them.
        for name in [
            NOTIFICATIONS,
            OUTBOX,
            FANOUT_PROGRESS,
            DELIVERIES,
            USERS,
            GROUPS,
            GROUP_MEMBERS,
            CONTENTS,
            schedules::SCHEDULES,
            schedules::RUNS,
            templates::TEMPLATES,
            dead_letters::DEAD_LETTERS,
        ] {
            if !existing.contains(name) {
                if let Err(e) = self.db.create_collection(name).await {
                    // Another instance may have created it meanwhile (NamespaceExists).
                    if !matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 48) {
                        return Err(e).context(format!("creating collection {name}"));
                    }
                }
            }
        }
        let unique = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(
                    IndexOptions::builder()
                        .unique(true)
                        .name(name.to_owned())
                        .build(),
                )
                .build()
        };
        let plain = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        self.notifications()
            .create_indexes([
                unique(doc! {"event_id": 1}, "event_id_unique"),
                plain(doc! {"created_at": -1}, "created_at"),
                // The sweeps for notifications left undispatched or unfinished.
                plain(doc! {"status": 1, "updated_at": 1}, "status_updated_at"),
                expiry_index(),
            ])
            .await
            .context("indexing notifications")?;
        self.outbox()
            .create_indexes([
                plain(doc! {"due_at": 1}, "due_at"),
                plain(doc! {"lease_token": 1}, "lease_token"),
            ])
            .await
            .context("indexing outbox")?;
        self.deliveries()
            .create_indexes(delivery_indexes())
            .await
            .context("indexing deliveries")?;
        // Replaced by the log indexes (they also order ties on `_id`).
        for old in ["notification_created", "user_created", "status_created"] {
            let _ = self.deliveries().drop_index(old).await;
        }
        self.users()
            .create_indexes([
                plain(doc! {"locale": 1}, "locale"),
                plain(doc! {"tags": 1}, "tags"),
            ])
            .await
            .context("indexing users")?;
        self.members()
            .create_indexes([unique(
                doc! {"group_id": 1, "user_id": 1},
                "group_user_unique",
            )])
            .await
            .context("indexing group_members")?;
        self.index_dead_letters()
            .await
            .context("indexing dead_letters")?;
        self.index_schedules().await.context("indexing schedules")?;
        self.index_stats()
            .await
            .context("indexing delivery_stats")?;
        self.index_keys().await.context("indexing api_keys")?;
        self.index_console_sessions()
            .await
            .context("indexing console_sessions")?;
        Ok(())
    }

    // ---- notifications -------------------------------------------------------------------

    pub async fn find_notification_by_event_id(
        &self,
        event_id: &str,
    ) -> anyhow::Result<Option<NotificationDoc>> {
        let found = self
            .notifications()
            .find_one(doc! {"event_id": event_id})
            .await?;
        self.with_progress(found).await
    }

    pub async fn get_notification(&self, id: &str) -> anyhow::Result<Option<NotificationDoc>> {
        // The progress first: if the fan-out ends in between, the notification read next
        // already holds the moved counts and says `fanout_done`, so nothing is counted
        // twice or missed.
        let progress = self.fanout_progress().find_one(doc! {"_id": id}).await?;
        let found = self.notifications().find_one(doc! {"_id": id}).await?;
        Ok(found.map(|n| add_progress(n, progress.as_ref())))
    }

    /// A notification's counts as readers see them: while its fan-out runs, the deliveries
    /// it has written so far are counted on a document of their own (see
    /// [`Store::mark_fanout_done`]) and added here. Read after the notification, a fan-out
    /// that ends in between is missed for this one read ([`Store::get_notification`],
    /// which decisions rely on, reads the other way round).
    pub(crate) async fn with_progress(
        &self,
        n: Option<NotificationDoc>,
    ) -> anyhow::Result<Option<NotificationDoc>> {
        let Some(n) = n else { return Ok(None) };
        if n.fanout_done {
            return Ok(Some(n));
        }
        let progress = self.fanout_progress().find_one(doc! {"_id": &n.id}).await?;
        Ok(Some(add_progress(n, progress.as_ref())))
    }

    /// Accepts many notifications in one transaction (concurrent requests' group commit),
    /// answering each on its own; its immediate dispatches share outbox entries
    /// ([`bundled`]). If an event id is taken, or held by another transaction, the batch
    /// falls back to one transaction per notification so that each one learns its own
    /// answer and one held id does not hold up the others.
    pub async fn accept_many(
        &self,
        batch: Vec<(NotificationDoc, OutboxDoc)>,
    ) -> anyhow::Result<Intaken> {
        if batch.len() > 1 {
            let entries = bundled(batch.iter().map(|(_, o)| o));
            let notifications = batch.iter().map(|(n, _)| n);
            match self.insert_accepted(notifications, &entries).await {
                Ok(()) => {
                    return Ok(Intaken {
                        answers: batch
                            .into_iter()
                            .map(|(n, _)| Ok(Accepted::New(Box::new(n))))
                            .collect(),
                        outbox: entries,
                    })
                }
                Err(e) if is_duplicate_key(&e) || conflicted(&e) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("accepting notifications")),
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut outbox = Vec::new();
        for (n, o) in batch {
            let answer = self.accept(n, o.clone()).await;
            if matches!(answer, Ok(Accepted::New(_))) {
                outbox.push(o);
            }
            answers.push(answer);
        }
        Ok(Intaken { answers, outbox })
    }

    /// Accepts one notification (its outbox entry in the same transaction); an event id
    /// already taken answers with the original. An event id held by another transaction
    /// (the same event accepted at the same moment elsewhere, or by a process that died
    /// mid-transaction, until the server ends that transaction) is tried again only
    /// briefly, then answered as a failure of the moment: the driver's own retry would
    /// hold the request, and with it the whole intake, for as long as the other
    /// transaction lives.
    pub async fn accept(
        &self,
        notification: NotificationDoc,
        outbox: OutboxDoc,
    ) -> anyhow::Result<Accepted> {
        let result = conflict_retried_for(ACCEPT_CONFLICT_TRIES, Duration::ZERO, || async {
            let entries = std::slice::from_ref(&outbox);
            Ok(self.insert_accepted([&notification], entries).await?)
        })
        .await;
        match result {
            Ok(()) => Ok(Accepted::New(Box::new(notification))),
            Err(e)
                if e.chain()
                    .filter_map(|c| c.downcast_ref::<mongodb::error::Error>())
                    .any(is_duplicate_key) =>
            {
                let existing = self
                    .find_notification_by_event_id(&notification.event_id)
                    .await?
                    .context("event id conflicted but the original is gone")?;
                Ok(Accepted::Duplicate(Box::new(existing)))
            }
            Err(e) => Err(e.context("accepting a notification")),
        }
    }

    /// Inserts notifications and their outbox entries in one transaction, tried once
    /// (see [`commit_or_abort`]).
    async fn insert_accepted<'a>(
        &self,
        notifications: impl IntoIterator<Item = &'a NotificationDoc> + Send,
        entries: &[OutboxDoc],
    ) -> mongodb::error::Result<()> {
        let mut session = self.client.start_session().await?;
        session.start_transaction().await?;
        let written = async {
            self.notifications()
                .insert_many(notifications)
                .session(&mut session)
                .await?;
            self.outbox()
                .insert_many(entries)
                .session(&mut session)
                .await?;
            Ok(())
        }
        .await;
        commit_or_abort(&mut session, written).await
    }

    /// Moves an accepted notification to `dispatching` (idempotent).
    pub async fn mark_dispatching(&self, id: &str) -> anyhow::Result<()> {
        self.notifications()
            .update_one(
                doc! {"_id": id, "status": {"$in": ["accepted", "scheduled"]}},
                doc! {"$set": {"status": "dispatching", "updated_at": now()}},
            )
            .await?;
        Ok(())
    }

    /// Records that every recipient now has a delivery, then finishes the notification if
    /// it can. The fan-out's counts move onto the notification in the same transaction:
    /// while it ran they were kept apart, since outcome commits change the notification's
    /// counts all the time and two transactions writing one document conflict.
    pub async fn mark_fanout_done(&self, id: &str) -> anyhow::Result<()> {
        conflict_retried(|| async {
            let mut session = self.client.start_session().await?;
            session
                .start_transaction()
                .and_run(
                    (self.notifications(), self.fanout_progress(), id),
                    |s, (notifications, progress, id)| {
                        async move {
                            let found = progress
                                .find_one_and_delete(doc! {"_id": &**id})
                                .session(&mut *s)
                                .await?;
                            let mut update =
                                doc! {"$set": {"fanout_done": true, "updated_at": now()}};
                            if let Some(p) = found {
                                update.insert(
                                    "$inc",
                                    doc! {"counts.total": stats::number(p.get("total")),
                                    "counts.queued": stats::number(p.get("queued"))},
                                );
                            }
                            notifications
                                .update_one(doc! {"_id": &**id}, update)
                                .session(&mut *s)
                                .await?;
                            Ok(())
                        }
                        .boxed()
                    },
                )
                .await
                .context("ending a fan-out")
        })
        .await?;
        self.finalize_notification(id).await
    }

    /// Notifications still `dispatching` though their fan-out is done and nothing is
    /// pending, untouched since `cutoff`: the process that would have finished them
    /// stopped in between (at most `limit` ids).
    pub async fn unfinished_notifications(
        &self,
        cutoff: DateTime,
        limit: i64,
    ) -> anyhow::Result<Vec<String>> {
        let notifications = self.notifications().clone_with_type::<Document>();
        ids_found(
            notifications
                .find(
                    doc! {"status": "dispatching", "updated_at": {"$lt": cutoff},
                    "fanout_done": true, "counts.queued": 0, "counts.retrying": 0,
                    "counts.deferred": 0},
                )
                .limit(limit),
        )
        .await
    }

    /// Notifications whose fan-out has not finished and that nothing has touched since
    /// `cutoff` (a fan-out batch touches its progress document): their dispatch job was
    /// lost (at most `limit`, with their lanes). Dispatch is idempotent, so running it
    /// again is safe.
    pub async fn undispatched_notifications(
        &self,
        cutoff: DateTime,
        limit: i64,
    ) -> anyhow::Result<Vec<(String, Priority)>> {
        let found: Vec<NotificationDoc> = self
            .notifications()
            .find(doc! {"status": {"$in": ["accepted", "dispatching"]},
            "updated_at": {"$lt": cutoff}, "fanout_done": {"$ne": true}})
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = found.iter().map(|n| n.id.as_str()).collect();
        let running: HashSet<String> = ids_found(
            self.fanout_progress()
                .find(doc! {"_id": {"$in": ids}, "updated_at": {"$gte": cutoff}}),
        )
        .await?;
        Ok(found
            .into_iter()
            .filter(|n| !running.contains(&n.id))
            .map(|n| (n.id, n.priority))
            .collect())
    }

    /// Sets the final status once nothing is pending; guarded so it can run any number of times.
    pub async fn finalize_notification(&self, id: &str) -> anyhow::Result<()> {
        let Some(n) = self.get_notification(id).await? else {
            return Ok(());
        };
        if !n.fanout_done || n.counts.pending() > 0 || n.status != NotificationStatus::Dispatching {
            return Ok(());
        }
        let c = n.counts;
        let status = if c.failed + c.dead == 0 {
            "completed"
        } else if c.sent > 0 || c.skipped > 0 {
            "partially_failed"
        } else {
            "failed"
        };
        self.notifications()
            .update_one(
                doc! {"_id": id, "status": "dispatching", "fanout_done": true,
                "counts.queued": 0, "counts.retrying": 0, "counts.deferred": 0},
                doc! {"$set": {"status": status, "updated_at": now(),
                "expire_at": expires(self.retention.notification_days)}},
            )
            .await?;
        Ok(())
    }

    // ---- outbox --------------------------------------------------------------------------

    /// Leases up to `limit` due entries to this relay; other relays skip leased ones.
    pub async fn claim_outbox(
        &self,
        limit: i64,
        lease: Duration,
    ) -> anyhow::Result<Vec<OutboxDoc>> {
        let now = now();
        let due = doc! {"due_at": {"$lte": now}, "lease_until": {"$lte": now}};
        let outbox = self.outbox().clone_with_type::<Document>();
        let ids: Vec<String> = ids_found(
            outbox
                .find(due.clone())
                .sort(doc! {"due_at": 1})
                .limit(limit),
        )
        .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let token = uuid::Uuid::new_v4().to_string();
        let until = DateTime::from_millis(now.timestamp_millis() + lease.as_millis() as i64);
        let mut filter = due;
        filter.insert("_id", doc! {"$in": &ids});
        self.outbox()
            .update_many(
                filter,
                doc! {"$set": {"lease_until": until, "lease_token": &token}},
            )
            .await?;
        Ok(self
            .outbox()
            .find(doc! {"lease_token": &token})
            .await?
            .try_collect()
            .await?)
    }

    /// Removes entries whose publication RabbitMQ confirmed.
    pub async fn complete_outbox(&self, ids: &[String]) -> anyhow::Result<()> {
        if !ids.is_empty() {
            self.outbox()
                .delete_many(doc! {"_id": {"$in": ids}})
                .await?;
        }
        Ok(())
    }

    /// Hands entries back at once (publishing failed) instead of waiting for the lease.
    pub async fn release_outbox(&self, ids: &[String]) -> anyhow::Result<()> {
        if !ids.is_empty() {
            self.outbox()
                .update_many(
                    doc! {"_id": {"$in": ids}},
                    doc! {"$set": {"lease_until": now(), "lease_token": null}},
                )
                .await?;
        }
        Ok(())
    }

    /// The jobs waiting in the outbox (an entry may stand for several dispatches).
    pub async fn outbox_backlog(&self) -> anyhow::Result<u64> {
        let jobs = doc! {"$add": [1, {"$size": {"$ifNull": ["$also", []]}}]};
        let total = self
            .outbox()
            .aggregate([doc! {"$group": {"_id": null, "jobs": {"$sum": jobs}}}])
            .await?
            .try_next()
            .await?;
        Ok(total.map_or(0, |d| stats::number(d.get("jobs")).max(0) as u64))
    }

    // ---- users, groups, content ----------------------------------------------------------

    /// Creates or replaces a user; returns true when it was created.
    pub async fn put_user(&self, mut user: UserDoc) -> anyhow::Result<bool> {
        let now = now();
        let existing = self
            .users()
            .clone_with_type::<Document>()
            .find_one(doc! {"_id": &user.id})
            .projection(doc! {"created_at": 1})
            .await?;
        user.created_at = Some(
            existing
                .as_ref()
                .and_then(|u| u.get_datetime("created_at").ok().copied())
                .unwrap_or(now),
        );
        user.updated_at = Some(now);
        self.users()
            .replace_one(doc! {"_id": &user.id}, &user)
            .upsert(true)
            .await?;
        Ok(existing.is_none())
    }

    pub async fn get_user(&self, id: &str) -> anyhow::Result<Option<UserDoc>> {
        Ok(self.users().find_one(doc! {"_id": id}).await?)
    }

    pub async fn delete_user(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .users()
            .delete_one(doc! {"_id": id})
            .await?
            .deleted_count
            > 0)
    }

    /// Creates or replaces many users in one bulk write (`created_at` survives a
    /// replace); returns (created, updated).
    pub async fn upsert_users(&self, users: &[UserDoc]) -> anyhow::Result<(u64, u64)> {
        if users.is_empty() {
            return Ok((0, 0));
        }
        let now = now();
        let mut updates = Vec::with_capacity(users.len());
        for u in users {
            let mut set = bson::to_document(u)?;
            set.remove("_id");
            set.remove("created_at");
            set.insert("updated_at", now);
            updates.push(doc! {
                "q": {"_id": &u.id},
                "u": {"$set": set, "$setOnInsert": {"created_at": now}},
                "upsert": true,
            });
        }
        let reply = self
            .db
            .run_command(doc! {"update": USERS, "updates": updates, "ordered": false})
            .await
            .context("bulk upsert of users")?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            anyhow::bail!(
                "bulk upsert of users: {} write errors, first: {:?}",
                errors.len(),
                errors.first()
            );
        }
        let n = reply
            .get_i32("n")
            .map(i64::from)
            .or_else(|_| reply.get_i64("n"))
            .unwrap_or(0) as u64;
        let created = reply.get_array("upserted").map_or(0, |a| a.len()) as u64;
        Ok((created, n.saturating_sub(created)))
    }

    /// Removes push tokens a provider reported dead.
    pub async fn remove_push_tokens(&self, user_id: &str, tokens: &[String]) -> anyhow::Result<()> {
        self.users()
            .update_one(
                doc! {"_id": user_id},
                doc! {"$pull": {"push_tokens": {"$in": tokens}}, "$set": {"updated_at": now()}},
            )
            .await?;
        Ok(())
    }

    /// Users by id, in one query.
    pub async fn get_users(
        &self,
        ids: &[String],
    ) -> anyhow::Result<HashMap<String, Result<UserDoc, String>>> {
        by_ids(&self.users(), ids).await
    }

    /// Creates or replaces a group and its whole membership, atomically.
    pub async fn put_group(
        &self,
        id: &str,
        name: &str,
        user_ids: &[String],
    ) -> anyhow::Result<(GroupDoc, bool)> {
        let now = now();
        let existing = self.get_group(id).await?;
        let group = GroupDoc {
            id: id.to_owned(),
            name: name.to_owned(),
            member_count: user_ids.len() as i64,
            created_at: existing.as_ref().map(|g| g.created_at).unwrap_or(now),
            updated_at: now,
        };
        let members: Vec<Document> = user_ids
            .iter()
            .map(|u| doc! {"group_id": id, "user_id": u})
            .collect();
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .and_run(
                (self.groups(), self.members(), &group, &members),
                |s, (groups, members_coll, group, members)| {
                    async move {
                        groups
                            .replace_one(doc! {"_id": &group.id}, &**group)
                            .upsert(true)
                            .session(&mut *s)
                            .await?;
                        members_coll
                            .delete_many(doc! {"group_id": &group.id})
                            .session(&mut *s)
                            .await?;
                        if !members.is_empty() {
                            members_coll
                                .insert_many(members.iter())
                                .session(&mut *s)
                                .await?;
                        }
                        Ok(())
                    }
                    .boxed()
                },
            )
            .await
            .context("writing a group")?;
        Ok((group, existing.is_none()))
    }

    pub async fn get_group(&self, id: &str) -> anyhow::Result<Option<GroupDoc>> {
        Ok(self.groups().find_one(doc! {"_id": id}).await?)
    }

    /// A group's member ids, sorted; for display, bounded by `limit`.
    pub async fn group_member_ids(&self, id: &str, limit: i64) -> anyhow::Result<Vec<String>> {
        let docs: Vec<Document> = self
            .members()
            .find(doc! {"group_id": id})
            .sort(doc! {"user_id": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("user_id").ok().map(str::to_owned))
            .collect())
    }

    /// Streams a group's members with a cursor; a large audience is never loaded whole.
    pub async fn stream_group_members(
        &self,
        id: &str,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<String>> + Send + use<>> {
        let cursor = self
            .members()
            .find(doc! {"group_id": id})
            .sort(doc! {"user_id": 1})
            .projection(doc! {"user_id": 1, "_id": 0})
            .batch_size(1000)
            .await?;
        Ok(cursor
            .map_err(anyhow::Error::from)
            .and_then(|d| async move {
                d.get_str("user_id")
                    .map(str::to_owned)
                    .context("group member without user_id")
            }))
    }

    /// Streams the ids of users in a segment with a cursor (index-backed on locale and tags).
    pub async fn stream_segment(
        &self,
        segment: &SegmentDoc,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<String>> + Send + use<>> {
        let mut filter = Document::new();
        if let Some(l) = &segment.locale {
            filter.insert("locale", l);
        }
        if let Some(t) = &segment.tag {
            filter.insert("tags", t);
        }
        let cursor = self
            .users()
            .clone_with_type::<Document>()
            .find(filter)
            .projection(doc! {"_id": 1})
            .batch_size(1000)
            .await?;
        Ok(cursor
            .map_err(anyhow::Error::from)
            .and_then(|d| async move {
                d.get_str("_id")
                    .map(str::to_owned)
                    .context("user without _id")
            }))
    }

    /// True when a segment selects at least one user.
    pub async fn segment_has_users(&self, segment: &SegmentDoc) -> anyhow::Result<bool> {
        use futures::StreamExt;
        let mut s = Box::pin(self.stream_segment(segment).await?);
        Ok(s.next().await.transpose()?.is_some())
    }

    pub async fn delete_group(&self, id: &str) -> anyhow::Result<bool> {
        let mut session = self.client.start_session().await?;
        let deleted = session
            .start_transaction()
            .and_run((self.groups(), self.members()), |s, (groups, members)| {
                let id = id.to_owned();
                async move {
                    let r = groups
                        .delete_one(doc! {"_id": &id})
                        .session(&mut *s)
                        .await?;
                    members
                        .delete_many(doc! {"group_id": &id})
                        .session(&mut *s)
                        .await?;
                    Ok(r.deleted_count > 0)
                }
                .boxed()
            })
            .await?;
        Ok(deleted)
    }

    /// Content records for `payload.content` ids, in the order asked; unknown ids
    /// stand as `{content_id}` so templates can still name them.
    pub async fn get_contents(&self, ids: &[String]) -> anyhow::Result<Vec<Document>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found: HashMap<String, Document> = self
            .db
            .collection::<Document>(CONTENTS)
            .find(doc! {"_id": {"$in": ids}})
            .await?
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .filter_map(|mut d| {
                let id = d.get_str("_id").ok()?.to_owned();
                d.remove("_id");
                d.insert("content_id", &id);
                Some((id, d))
            })
            .collect();
        Ok(ids
            .iter()
            .map(|id| {
                found
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| doc! {"content_id": id})
            })
            .collect())
    }

    /// Creates or replaces a content record (demo data and tests).
    pub async fn put_content(&self, id: &str, mut fields: Document) -> anyhow::Result<()> {
        fields.insert("_id", id);
        self.db
            .collection::<Document>(CONTENTS)
            .replace_one(doc! {"_id": id}, fields)
            .upsert(true)
            .await?;
        Ok(())
    }

    // ---- deliveries ----------------------------------------------------------------------

    pub async fn get_delivery(&self, id: &str) -> anyhow::Result<Option<DeliveryDoc>> {
        Ok(self.deliveries().find_one(doc! {"_id": id}).await?)
    }

    /// Writes the missing deliveries of one fan-out batch and counts them on the
    /// notification, in one transaction; returns every delivery of the batch still
    /// `queued` (new or left by an earlier, interrupted fan-out) for publishing.
    pub async fn insert_delivery_batch(
        &self,
        notification_id: &str,
        planned: Vec<DeliveryDoc>,
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut all = self
            .insert_delivery_batches(&[FanoutBatch {
                notification_id: notification_id.to_owned(),
                planned,
            }])
            .await?;
        Ok(all.pop().unwrap_or_default())
    }

    /// [`Store::insert_delivery_batch`] for the batches of several fan-outs at once, in ONE
    /// transaction: concurrent fan-outs of one lane would otherwise conflict on the lane's
    /// rollup document (the driver retries them at once, again and again: seen as a
    /// single-recipient fan-out taking 300–600 ms while others ran). Answers per batch.
    pub async fn insert_delivery_batches(
        &self,
        batches: &[FanoutBatch],
    ) -> anyhow::Result<Vec<Vec<QueuedDelivery>>> {
        match conflict_retried(|| self.insert_delivery_batches_once(batches)).await {
            Err(e)
                if e.chain()
                    .filter_map(|c| c.downcast_ref::<mongodb::error::Error>())
                    .any(is_duplicate_key) =>
            {
                // Another process's fan-out of one of these notifications wrote a recipient
                // since the read: written again, the read finds it. Without this, the
                // other fan-outs of the batch would fail with it.
                conflict_retried(|| self.insert_delivery_batches_once(batches)).await
            }
            result => result,
        }
    }

    async fn insert_delivery_batches_once(
        &self,
        batches: &[FanoutBatch],
    ) -> anyhow::Result<Vec<Vec<QueuedDelivery>>> {
        if batches.iter().all(|b| b.planned.is_empty()) {
            return Ok(vec![Vec::new(); batches.len()]);
        }
        // Who is asked for, per notification: deliveries that already exist are found by it.
        let mut asked: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for b in batches {
            for d in &b.planned {
                asked
                    .entry(b.notification_id.as_str())
                    .or_default()
                    .insert(d.user_id.as_str());
            }
        }
        let mut existing_filter: Vec<Document> = asked
            .iter()
            .map(|(n, users)| doc! {"notification_id": *n, "user_id": {"$in": users.iter().collect::<Vec<_>>()}})
            .collect();
        let existing_filter = match existing_filter.len() {
            1 => existing_filter.remove(0),
            _ => doc! {"$or": existing_filter},
        };
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .and_run(
                (
                    self.deliveries(),
                    self.fanout_progress(),
                    self.db.clone(),
                    batches,
                    &existing_filter,
                    self.retention.stats_days,
                ),
                |s, (deliveries, progress, db, batches, existing_filter, stats_days)| {
                    async move {
                        let existing: Vec<DeliveryDoc> = deliveries
                            .find((*existing_filter).clone())
                            .session(&mut *s)
                            .await?
                            .stream(&mut *s)
                            .try_collect()
                            .await?;
                        // Every delivery of the asked recipients after this transaction:
                        // those found, then the fresh ones in order (a later batch asking for
                        // the same recipient and channel gets the earlier one's delivery).
                        let mut by_key: HashMap<(&str, &str, Channel), &DeliveryDoc> = existing
                            .iter()
                            .map(|d| {
                                (
                                    (d.notification_id.as_str(), d.user_id.as_str(), d.channel),
                                    d,
                                )
                            })
                            .collect();
                        let mut fresh: Vec<&DeliveryDoc> = Vec::new();
                        let mut fresh_per_notification: BTreeMap<&str, i64> = BTreeMap::new();
                        for b in batches.iter() {
                            for d in &b.planned {
                                let key =
                                    (b.notification_id.as_str(), d.user_id.as_str(), d.channel);
                                if let std::collections::hash_map::Entry::Vacant(v) =
                                    by_key.entry(key)
                                {
                                    v.insert(d);
                                    fresh.push(d);
                                    *fresh_per_notification.entry(key.0).or_default() += 1;
                                }
                            }
                        }
                        if !fresh.is_empty() {
                            // The counts go to documents no outcome commit writes (the
                            // fan-out's progress, the fan-out's rollup shard): a transaction
                            // writing a document another one changed meanwhile aborts.
                            for (id, n) in &fresh_per_notification {
                                progress
                                    .update_one(
                                        doc! {"_id": *id},
                                        doc! {"$inc": {"total": n, "queued": n},
                                        "$set": {"updated_at": now()}},
                                    )
                                    .upsert(true)
                                    .session(&mut *s)
                                    .await?;
                            }
                            let mut moves = StatMoves::sharded("fanout", fresh[0].priority);
                            for d in &fresh {
                                moves.add(d, DeliveryStatus::Queued, None, 1, None);
                            }
                            moves.write(db, s, *stats_days).await?;
                            deliveries
                                .insert_many(fresh.iter().copied())
                                .session(&mut *s)
                                .await?;
                        }
                        // Per batch, every delivery of its recipients still `queued`.
                        Ok(batches
                            .iter()
                            .map(|b| {
                                let users: HashSet<&str> =
                                    b.planned.iter().map(|d| d.user_id.as_str()).collect();
                                by_key
                                    .iter()
                                    .filter(|((n, u, _), d)| {
                                        *n == b.notification_id
                                            && users.contains(u)
                                            && d.status == DeliveryStatus::Queued
                                    })
                                    .map(|(_, d)| QueuedDelivery {
                                        delivery_id: d.id.clone(),
                                        notification_id: d.notification_id.clone(),
                                        lane: d.priority,
                                    })
                                    .collect()
                            })
                            .collect())
                    }
                    .boxed()
                },
            )
            .await
            .context("writing a fan-out batch")
    }

    /// Claims a waiting delivery for one attempt; `None` when another worker holds it or
    /// it is no longer waiting, else the attempt's id.
    pub async fn claim_delivery(
        &self,
        id: &str,
        from: DeliveryStatus,
        worker: &str,
    ) -> anyhow::Result<Option<String>> {
        let claim = DeliveryClaim {
            delivery_id: id.to_owned(),
            from,
            worker: worker.to_owned(),
        };
        Ok(self.claim_deliveries(&[claim]).await?.remove(0))
    }

    /// Claims many deliveries; returns, per claim, the attempt id when this worker got the
    /// delivery. Claims that expect the same status share one conditional `update_many`
    /// and one attempt id (an attempt is identified by delivery and attempt id together):
    /// on SecantusDB one multi-document update costs about a third of as many single ones.
    pub async fn claim_deliveries(
        &self,
        claims: &[DeliveryClaim],
    ) -> anyhow::Result<Vec<Option<String>>> {
        let mut groups: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
        // Two copies of one delivery's job (a dispatch republished after a lost link) can
        // ask in the same round trip: only the first may claim, or both would read the
        // shared attempt id back as theirs and send.
        let mut asked = HashSet::new();
        for (i, c) in claims.iter().enumerate() {
            if !asked.insert(c.delivery_id.as_str()) {
                continue;
            }
            groups
                .entry((c.from.as_str(), c.worker.as_str()))
                .or_default()
                .push(i);
        }
        let mut claimed = vec![None; claims.len()];
        for ((from, worker), members) in groups {
            let ids: Vec<&str> = members
                .iter()
                .map(|&i| claims[i].delivery_id.as_str())
                .collect();
            let token = uuid::Uuid::now_v7().to_string();
            let got = self.claim_group(&ids, from, worker, &token).await?;
            for (&i, id) in members.iter().zip(&ids) {
                if got.contains(id) {
                    claimed[i] = Some(token.clone());
                }
            }
        }
        Ok(claimed)
    }

    /// One group of [`Store::claim_deliveries`]: the ids that now carry `token`.
    async fn claim_group<'a>(
        &self,
        ids: &[&'a str],
        from: &str,
        worker: &str,
        token: &str,
    ) -> anyhow::Result<HashSet<&'a str>> {
        let at = now();
        let claim = doc! {"attempt_id": token, "from": from, "claimed_at": at, "worker": worker};
        let mut round = 0;
        let modified = loop {
            // A write conflict may leave some of the group claimed, and a lost connection
            // may have taken the answer of a claim the server made: writing again claims
            // the rest (the claimed ones no longer match), and the read below says which.
            // Given up, the claimed ones would wait out the claim timeout and be recorded
            // `outcome_unknown`, although nothing was sent.
            match self
                .deliveries()
                .update_many(
                    doc! {"_id": {"$in": ids}, "status": from},
                    doc! {"$set": {"status": "sending", "claim": &claim, "updated_at": at}},
                )
                .await
            {
                Ok(r) if round == 0 => break r.modified_count,
                Ok(_) => break 0,
                Err(e) => {
                    let e = anyhow::Error::new(e);
                    if !is_temporary(&e) || round + 1 >= CONFLICT_TRIES {
                        return Err(e.context("claiming deliveries"));
                    }
                    conflict_pause(round).await;
                    round += 1;
                }
            }
        };
        if modified == ids.len() as u64 {
            return Ok(ids.iter().copied().collect());
        }
        let deliveries = self.deliveries().clone_with_type::<Document>();
        let mine: HashSet<String> =
            ids_found(deliveries.find(doc! {"_id": {"$in": ids}, "claim.attempt_id": token}))
                .await?;
        Ok(ids
            .iter()
            .copied()
            .filter(|id| mine.contains(*id))
            .collect())
    }

    /// Deliveries by id, in one round trip.
    pub async fn get_deliveries(
        &self,
        ids: &[String],
    ) -> anyhow::Result<HashMap<String, Result<DeliveryDoc, String>>> {
        by_ids(&self.deliveries(), ids).await
    }

    /// Writes a batch of outcomes — each delivery's status and attempt, and every
    /// touched notification's counters once — in ONE transaction (retried on transient
    /// errors), then finishes notifications that have nothing pending. Returns, per
    /// outcome, whether it was written (false: its precondition no longer held).
    /// `lane` is the priority lane whose committer writes the batch; the batch is counted
    /// on that lane's rollup documents (see [`stats::StatMoves::sharded`]), so the lanes'
    /// commits do not conflict on them.
    pub async fn commit_outcomes(
        &self,
        outcomes: &[Outcome],
        lane: Priority,
    ) -> anyhow::Result<Vec<bool>> {
        conflict_retried(|| self.commit_outcomes_once(outcomes, lane)).await
    }

    async fn commit_outcomes_once(
        &self,
        outcomes: &[Outcome],
        lane: Priority,
    ) -> anyhow::Result<Vec<bool>> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut session = self.client.start_session().await?;
        let (finished, applied): (Vec<String>, Vec<bool>) =
            session
                .start_transaction()
                .and_run(
                    (
                        self.deliveries(),
                        self.notifications(),
                        self.outbox(),
                        self.dead_letter_collection(),
                        self.db.clone(),
                        outcomes,
                        &*self.retention,
                        self.client.clone(),
                    ),
                    |s,
                     (
                        deliveries,
                        notifications,
                        outbox,
                        letters,
                        db,
                        outcomes,
                        retention,
                        client,
                    )| {
                        async move {
                            let mut incs: BTreeMap<String, BTreeMap<&'static str, i64>> =
                                BTreeMap::new();
                            let mut moves = StatMoves::sharded("commit", lane);
                            let mut applied = vec![false; outcomes.len()];
                            // The transaction's snapshot of every delivery in the batch: a
                            // concurrent change to one of them makes the writes below conflict
                            // (and the whole transaction retry), so what is decided here holds.
                            let ids: Vec<&str> =
                                outcomes.iter().map(|o| o.delivery_id.as_str()).collect();
                            let mut current: HashMap<String, DeliveryDoc> = deliveries
                                .find(doc! {"_id": {"$in": &ids}})
                                .projection(doc! {"attempts": 0})
                                .session(&mut *s)
                                .await?
                                .stream(&mut *s)
                                .try_collect::<Vec<_>>()
                                .await?
                                .into_iter()
                                .map(|d| (d.id.clone(), d))
                                .collect();
                            let mut writes = Vec::new();
                            let mut plans = Vec::new();
                            // One instant for the whole batch, so that equal outcomes write
                            // equal fields and share one update below.
                            let now = now();
                            for (i, o) in outcomes.iter().enumerate() {
                                let Some(state) = current.get_mut(&o.delivery_id) else {
                                    continue;
                                };
                                let guard = match &o.precondition {
                                    Precondition::Unclaimed => matches!(
                                        state.status,
                                        DeliveryStatus::Queued
                                            | DeliveryStatus::Retrying
                                            | DeliveryStatus::Deferred
                                    )
                                    .then_some(Guard::Waiting),
                                    Precondition::Claimed { attempt_id } => match &state.claim {
                                        Some(c) => (&c.attempt_id == attempt_id)
                                            .then(|| Guard::Claim(attempt_id.clone())),
                                        // Unclaimed although this attempt claimed it: the
                                        // database lost the claim's acknowledged write (a
                                        // crash). The send happened, so its outcome counts.
                                        None if matches!(
                                            state.status,
                                            DeliveryStatus::Queued
                                                | DeliveryStatus::Retrying
                                                | DeliveryStatus::Deferred
                                        ) =>
                                        {
                                            tracing::warn!(delivery_id = %o.delivery_id, "the delivery's claim was lost by the database; recording the outcome anyway");
                                            Some(Guard::LostClaim(state.status))
                                        }
                                        None => None,
                                    },
                                };
                                let Some(guard) = guard else {
                                    continue;
                                };
                                let mut set = doc! {
                                    "status": o.status.as_str(),
                                    "reason": o.reason.as_deref(),
                                    "updated_at": now,
                                };
                                if let Some(p) = &o.provider {
                                    set.insert("provider", p);
                                }
                                if o.status == DeliveryStatus::Sent {
                                    set.insert("sent_at", now);
                                }
                                let expire_at = retention.delivery_expiry(o.status, chrono_time(now));
                                if let Some(at) = expire_at {
                                    set.insert("expire_at", bson_time(at));
                                }
                                let attempt = match &o.attempt {
                                    Some(a) => {
                                        set.insert("last_error", a.error.as_deref());
                                        Some(
                                            bson::to_bson(a)
                                                .map_err(mongodb::error::Error::custom)?,
                                        )
                                    }
                                    None => None,
                                };
                                writes.push(StatusWrite {
                                    id: o.delivery_id.as_str(),
                                    guard,
                                    set,
                                    unset_expiry: expire_at.is_none(),
                                    attempt,
                                });
                                plans.push((i, state.clone()));
                                // A later outcome for the same delivery sees this one's effect.
                                state.status = o.status;
                                if let Some(p) = &o.provider {
                                    state.provider = Some(p.clone());
                                }
                            }
                            // Every status change of the batch in one round trip; equal
                            // changes as one update of many deliveries.
                            if !writes.is_empty() {
                                let (models, expected) =
                                    status_write_models(writes, deliveries.namespace());
                                let written = client
                                    .bulk_write(models)
                                    .verbose_results()
                                    .session(&mut *s)
                                    .await?;
                                for (k, n) in expected.into_iter().enumerate() {
                                    let matched = written
                                        .update_results
                                        .get(&k)
                                        .map_or(0, |u| u.matched_count);
                                    if matched != n {
                                        return Err(mongodb::error::Error::custom(
                                            "a delivery changed inside its outcome transaction",
                                        ));
                                    }
                                }
                            }
                            for (i, before) in plans {
                                let o = &outcomes[i];
                                applied[i] = true;
                                // A retry is published through the outbox (never lost); a
                                // delivery that failed for good is kept as a dead letter.
                                if let (
                                    DeliveryStatus::Retrying | DeliveryStatus::Deferred,
                                    Some(r),
                                ) = (o.status, o.retry)
                                {
                                    let stamp = now;
                                    outbox
                                        .insert_one(OutboxDoc {
                                            id: uuid::Uuid::now_v7().to_string(),
                                            notification_id: o.notification_id.clone(),
                                            delivery_id: Some(o.delivery_id.clone()),
                                            delay_ms: r.delay_ms,
                                            attempt: r.retry_number,
                                            lane: r.lane,
                                            due_at: r.not_before.unwrap_or(stamp),
                                            lease_until: stamp,
                                            lease_token: None,
                                            created_at: stamp,
                                            also: Vec::new(),
                                        })
                                        .session(&mut *s)
                                        .await?;
                                }
                                if matches!(o.status, DeliveryStatus::Failed | DeliveryStatus::Dead)
                                {
                                    Store::write_dead_letter(
                                        letters,
                                        s,
                                        &before,
                                        o,
                                        retention.dead_letter_days,
                                    )
                                    .await?;
                                }
                                let from = match (before.status, &before.claim) {
                                    (DeliveryStatus::Sending, Some(c)) => c.from,
                                    (status, _) => status,
                                };
                                let to_provider =
                                    o.provider.as_deref().or(before.provider.as_deref());
                                if from == o.status && to_provider == before.provider.as_deref() {
                                    continue;
                                }
                                moves.add(&before, from, before.provider.as_deref(), -1, None);
                                let latency = (o.status == DeliveryStatus::Sent)
                                    .then(|| stats::latency_of(&before, Some(now)))
                                    .flatten();
                                moves.add(&before, o.status, to_provider, 1, latency);
                                if from == o.status {
                                    continue;
                                }
                                let entry = incs.entry(o.notification_id.clone()).or_default();
                                if let Some(old) = from.counter() {
                                    *entry.entry(old).or_default() -= 1;
                                }
                                if let Some(new) = o.status.counter() {
                                    *entry.entry(new).or_default() += 1;
                                }
                            }
                            moves.write(db, s, retention.stats_days).await?;
                            // Notifications this commit may have finished, told by the
                            // counter write itself (no read after the commit).
                            let mut finished = Vec::new();
                            for (id, counters) in &incs {
                                let mut inc = Document::new();
                                for (name, delta) in counters {
                                    if *delta != 0 {
                                        inc.insert(format!("counts.{name}"), *delta);
                                    }
                                }
                                if inc.is_empty() {
                                    continue;
                                }
                                let after = notifications
                                    .clone_with_type::<Document>()
                                    .find_one_and_update(
                                        doc! {"_id": id},
                                        doc! {"$inc": inc, "$set": {"updated_at": now}},
                                    )
                                    .projection(
                                        doc! {"status": 1, "fanout_done": 1, "counts": 1},
                                    )
                                    .return_document(ReturnDocument::After)
                                    .session(&mut *s)
                                    .await?;
                                if after.as_ref().is_some_and(may_finish) {
                                    finished.push(id.clone());
                                }
                            }
                            Ok((finished, applied))
                        }
                        .boxed()
                    },
                )
                .await
                .context("committing delivery outcomes")?;
        for id in finished {
            self.finalize_notification(&id).await?;
        }
        Ok(applied)
    }
}

/// Whether a notification (status, fan-out flag and counts, as just written) has nothing
/// left pending, so [`Store::finalize_notification`] may give it its final status. A
/// fan-out marked done after this write finalizes on its own.
fn may_finish(n: &Document) -> bool {
    let counts: Counts = n
        .get_document("counts")
        .ok()
        .and_then(|c| bson::from_document(c.clone()).ok())
        .unwrap_or_default();
    n.get_str("status") == Ok("dispatching")
        && n.get_bool("fanout_done") == Ok(true)
        && counts.pending() == 0
}
