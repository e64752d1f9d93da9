//! MongoDB: the only module that knows collection names, indexes and transactions.

mod chunks;
mod claims;
pub mod console_sessions;
mod contents;
pub mod dead_letters;
pub mod documents;
mod fanout;
pub mod feedback;
pub mod inbox;
pub mod keys;
pub mod log;
mod notifications;
mod outbox;
mod outcomes;
mod recipients;
pub mod schedules;
pub mod stats;
pub mod status_writes;
pub mod suppressions;
pub mod templates;
mod txn;
pub mod webhook_endpoints;
pub mod webhook_messages;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::TryStreamExt;
use mongodb::bson::{self, doc, DateTime, Document, RawDocumentBuf};
use mongodb::error::ErrorKind;
use mongodb::options::{Acknowledgment, ClientOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};

use crate::config::{MongoSettings, RetentionSettings};
pub use chunks::{ChunkClaim, ChunkDoc, ChunkItem, ChunkResume};
pub use dead_letters::{DeadLetterDoc, DeadLetterFilter};
pub use documents::{
    new_notification, payload_document, storable_document, AttemptDoc, ClaimDoc, Counts,
    DeliveryClaim, DeliveryDoc, GroupDoc, NotificationDoc, NotificationSpec, OutboxDoc,
    QueuedDelivery, RecipientsDoc, SegmentDoc, UserDoc,
};
pub use fanout::FanoutBatch;
pub use keys::ApiKeyDoc;
pub use log::{decode_token, ChangeFilter, DeliveryChange, DeliveryFilter, LogCursor, LogPage};
pub use notifications::{Accepted, Intaken};
pub use outcomes::{Outcome, Precondition, Retry};
pub use schedules::{Claim, RunDoc, RunWrite, ScheduleDoc, ScheduleStatus};
pub use stats::{ChannelSummary, StatDimension, StatRow};
pub use templates::{TemplateDoc, TemplatesVersion};
pub use txn::{is_duplicate_key, is_temporary, is_write_conflict};

const NOTIFICATIONS: &str = "notifications";
const OUTBOX: &str = "outbox";
/// A running fan-out's counts (total and queued), kept off the notification until it ends.
const FANOUT_PROGRESS: &str = "fanout_progress";
pub(crate) const DELIVERIES: &str = "deliveries";
const USERS: &str = "users";
const UNSUBSCRIBES: &str = "unsubscribes";
const GROUPS: &str = "groups";
const GROUP_MEMBERS: &str = "group_members";
const CONTENTS: &str = "contents";

/// Handles to herald's database.
#[derive(Clone)]
pub struct Store {
    client: Client,
    db: Database,
    retention: Arc<RetentionSettings>,
    /// Status webhooks' subscriptions cache and relay wake-up.
    hooks: Arc<webhook_messages::HookShared>,
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
        // Feedback finds its delivery by the id the provider gave the message.
        IndexModel::builder()
            .keys(doc! {"attempts.response.message_id": 1})
            .options(
                IndexOptions::builder()
                    .sparse(true)
                    .name("provider_message_id".to_owned())
                    .build(),
            )
            .build(),
    ];
    all.extend(log::log_index_models());
    all
}

/// A plain index with a name of its own.
fn named_index(keys: Document, name: &str) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_owned()).build())
        .build()
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
            hooks: Arc::default(),
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
    /// The deliveries matching `filter`, without their attempts, as `s`'s transaction
    /// reads them.
    async fn deliveries_in(
        &self,
        s: &mut mongodb::ClientSession,
        filter: Document,
    ) -> mongodb::error::Result<Vec<DeliveryDoc>> {
        self.deliveries()
            .find(filter)
            .projection(doc! {"attempts": 0})
            .session(&mut *s)
            .await?
            .stream(&mut *s)
            .try_collect()
            .await
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
            suppressions::SUPPRESSIONS,
            feedback::FEEDBACK,
            UNSUBSCRIBES,
            inbox::INBOX,
            inbox::INBOX_USERS,
            webhook_endpoints::WEBHOOK_ENDPOINTS,
            webhook_messages::WEBHOOK_MESSAGES,
            webhook_messages::WEBHOOK_ATTEMPTS,
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
        // A segment is read in id order (a fan-out resumes after the last id it wrote).
        self.users()
            .create_indexes([
                plain(doc! {"locale": 1, "_id": 1}, "locale_id"),
                plain(doc! {"tags": 1, "_id": 1}, "tags_id"),
            ])
            .await
            .context("indexing users")?;
        // Replaced by the two above.
        for old in ["locale", "tags"] {
            let _ = self.users().drop_index(old).await;
        }
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
        self.index_suppressions()
            .await
            .context("indexing suppressions")?;
        self.index_feedback().await.context("indexing feedback")?;
        self.index_chunks().await.context("indexing chunks")?;
        self.index_inbox().await.context("indexing inbox")?;
        self.index_hook_messages()
            .await
            .context("indexing webhook_messages")?;
        self.unsubscribes()
            .create_indexes([named_index(doc! {"user_id": 1}, "user_id")])
            .await
            .context("indexing unsubscribes")?;
        Ok(())
    }
}
