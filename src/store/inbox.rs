//! The in-app inbox: items written with their delivery's outcome, numbered per user, read and changed only by their user.

use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use mongodb::bson::{doc, DateTime, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::options::{FullDocumentType, ReturnDocument};
use mongodb::{ClientSession, Collection};
use serde::{Deserialize, Serialize};

use super::txn::conflict_retried;
use super::webhook_messages::{iso, HookEvent};
use super::{expires, named_index, DeliveryDoc, Store};

pub(crate) const INBOX: &str = "inbox";
/// Per user: the number of the last item written (`seq`), so items are numbered in the
/// order they commit and a reconnecting socket resumes after the last one it saw.
pub(crate) const INBOX_USERS: &str = "inbox_users";
/// A bulk mark changes at most this many items per transaction.
const MARK_BATCH: i64 = 500;

/// What an in-app delivery puts in the inbox (the rest comes from its delivery).
#[derive(Debug, Clone, PartialEq)]
pub struct InboxContent {
    pub title: String,
    pub body: String,
    pub url: Option<String>,
    pub data: Option<Document>,
}

/// One inbox item as stored. `seen_at`, `read_at` and `archived_at` are always present
/// (null when not), so a filter on null finds exactly the unset ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InboxItemDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub user_id: String,
    /// The item's number among its user's items (1, 2, ...), in commit order.
    pub seq: i64,
    pub delivery_id: String,
    pub notification_id: String,
    pub event_type: String,
    pub title: String,
    pub body: String,
    pub url: Option<String>,
    pub data: Option<Document>,
    pub created_at: DateTime,
    pub seen_at: Option<DateTime>,
    pub read_at: Option<DateTime>,
    pub archived_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<DateTime>,
}

/// Which items a page lists by read state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadFilter {
    Unread,
    Read,
    #[default]
    All,
}

/// A page request: newest first, before item number `before` when given.
#[derive(Debug, Clone, Default)]
pub struct InboxQuery {
    pub read: ReadFilter,
    pub archived: bool,
    pub limit: i64,
    pub before: Option<i64>,
}

/// The user's counts over items not archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InboxCounts {
    pub unread: i64,
    pub unseen: i64,
    pub total: i64,
}

/// What one item's action changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemAction {
    Read,
    Unread,
    Archive,
    Unarchive,
}

/// What a bulk mark changes: every item seen, or every item (of one event type) read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkAll {
    Seen,
    Read { event_type: Option<String> },
}

/// A change to someone's inbox, from whichever process made it.
#[derive(Debug, Clone)]
pub enum InboxChange {
    /// A new item.
    Received(Box<InboxItemDoc>),
    /// An item's state changed (read, seen, archived...): its user's counts may have.
    Changed { user_id: String },
}

impl InboxChange {
    pub fn user_id(&self) -> &str {
        match self {
            InboxChange::Received(item) => &item.user_id,
            InboxChange::Changed { user_id } => user_id,
        }
    }
}

impl Store {
    pub(crate) fn inbox(&self) -> Collection<InboxItemDoc> {
        self.db.collection(INBOX)
    }

    /// The inbox read at majority: what a socket sends (pages after a number, the newest
    /// number) is only what a change stream could also have shown, never a write a
    /// failover may roll back.
    fn inbox_majority(&self) -> Collection<InboxItemDoc> {
        self.db.collection_with_options(
            INBOX,
            mongodb::options::CollectionOptions::builder()
                .read_concern(mongodb::options::ReadConcern::majority())
                .build(),
        )
    }

    fn inbox_users(&self) -> Collection<Document> {
        self.db.collection(INBOX_USERS)
    }

    pub(super) async fn index_inbox(&self) -> anyhow::Result<()> {
        let unique = mongodb::options::IndexOptions::builder().unique(true);
        self.inbox()
            .create_indexes([
                mongodb::IndexModel::builder()
                    .keys(doc! {"user_id": 1, "seq": -1})
                    .options(unique.clone().name("user_seq".to_owned()).build())
                    .build(),
                // One item per delivery, whatever happens to its outcome commit.
                mongodb::IndexModel::builder()
                    .keys(doc! {"delivery_id": 1})
                    .options(unique.name("delivery_unique".to_owned()).build())
                    .build(),
                named_index(
                    doc! {"user_id": 1, "archived_at": 1, "read_at": 1},
                    "user_archived_read",
                ),
                super::expiry_index(),
            ])
            .await?;
        Ok(())
    }

    /// Writes the item of a `sent` in-app delivery inside its outcome transaction, with
    /// the next number of its user.
    pub(super) async fn write_inbox_item(
        &self,
        s: &mut ClientSession,
        delivery: &DeliveryDoc,
        content: &InboxContent,
        now: DateTime,
    ) -> mongodb::error::Result<()> {
        let counter = self
            .inbox_users()
            .find_one_and_update(
                doc! {"_id": &delivery.user_id},
                doc! {"$inc": {"seq": 1_i64}},
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .session(&mut *s)
            .await?;
        let seq = counter
            .and_then(|c| c.get_i64("seq").ok())
            .ok_or_else(|| mongodb::error::Error::custom("the inbox counter was not written"))?;
        let item = InboxItemDoc {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: delivery.user_id.clone(),
            seq,
            delivery_id: delivery.id.clone(),
            notification_id: delivery.notification_id.clone(),
            event_type: delivery.event_type.clone(),
            title: content.title.clone(),
            body: content.body.clone(),
            url: content.url.clone(),
            data: content.data.clone(),
            created_at: now,
            seen_at: None,
            read_at: None,
            archived_at: None,
            expire_at: expires(self.retention.inbox_days),
        };
        self.inbox().insert_one(item).session(&mut *s).await?;
        Ok(())
    }

    /// A page of `user_id`'s items, newest first: at most `q.limit` + 1 (the extra one
    /// tells that there is a next page).
    pub async fn inbox_items(
        &self,
        user_id: &str,
        q: &InboxQuery,
    ) -> anyhow::Result<Vec<InboxItemDoc>> {
        let mut filter = doc! {"user_id": user_id};
        filter.insert(
            "archived_at",
            if q.archived {
                doc! {"$ne": null}.into()
            } else {
                mongodb::bson::Bson::Null
            },
        );
        match q.read {
            ReadFilter::Unread => {
                filter.insert("read_at", mongodb::bson::Bson::Null);
            }
            ReadFilter::Read => {
                filter.insert("read_at", doc! {"$ne": null});
            }
            ReadFilter::All => {}
        }
        if let Some(before) = q.before {
            filter.insert("seq", doc! {"$lt": before});
        }
        Ok(self
            .inbox()
            .find(filter)
            .sort(doc! {"seq": -1})
            .limit(q.limit + 1)
            .await?
            .try_collect()
            .await?)
    }

    /// `user_id`'s items numbered after `seq`, oldest first, at most `limit`: what a
    /// reconnecting socket missed.
    pub async fn inbox_items_after(
        &self,
        user_id: &str,
        seq: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<InboxItemDoc>> {
        Ok(self
            .inbox_majority()
            .find(doc! {"user_id": user_id, "seq": {"$gt": seq}})
            .sort(doc! {"seq": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// The number of `user_id`'s newest item (0: none).
    pub async fn inbox_latest_seq(&self, user_id: &str) -> anyhow::Result<i64> {
        Ok(self
            .inbox_majority()
            .find_one(doc! {"user_id": user_id})
            .sort(doc! {"seq": -1})
            .await?
            .map_or(0, |i| i.seq))
    }

    /// Replaces a user's preferences; false when herald has no profile of theirs.
    pub async fn set_preferences(
        &self,
        user_id: &str,
        preferences: Document,
    ) -> anyhow::Result<bool> {
        let r = self
            .users()
            .update_one(
                doc! {"_id": user_id},
                doc! {"$set": {"preferences": preferences, "updated_at": DateTime::now()}},
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// One of `user_id`'s items; `None` when it is not theirs or does not exist.
    pub async fn inbox_item(
        &self,
        user_id: &str,
        id: &str,
    ) -> anyhow::Result<Option<InboxItemDoc>> {
        Ok(self
            .inbox_majority()
            .find_one(doc! {"_id": id, "user_id": user_id})
            .await?)
    }

    /// `user_id`'s counts, read from the items themselves (one indexed aggregation), so
    /// they can never disagree with what a page lists.
    pub async fn inbox_counts(&self, user_id: &str) -> anyhow::Result<InboxCounts> {
        let unset = |field: &str| doc! {"$cond": [{"$gt": [format!("${field}"), null]}, 0, 1]};
        let row = self
            .inbox()
            .aggregate([
                doc! {"$match": {"user_id": user_id, "archived_at": null}},
                doc! {"$group": {
                    "_id": null,
                    "total": {"$sum": 1},
                    "unread": {"$sum": unset("read_at")},
                    "unseen": {"$sum": unset("seen_at")},
                }},
            ])
            .await?
            .try_next()
            .await?;
        let count = |d: &Document, k: &str| match d.get(k) {
            Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
            Some(mongodb::bson::Bson::Int64(n)) => *n,
            Some(mongodb::bson::Bson::Double(n)) => *n as i64,
            _ => 0,
        };
        Ok(row.map_or_else(InboxCounts::default, |d| InboxCounts {
            unread: count(&d, "unread"),
            unseen: count(&d, "unseen"),
            total: count(&d, "total"),
        }))
    }

    /// Applies `action` to one of `user_id`'s items, and the first read to its delivery
    /// (the ops log's engagement), in one transaction. `None`: no such item of theirs.
    pub async fn inbox_act(
        &self,
        user_id: &str,
        id: &str,
        action: ItemAction,
    ) -> anyhow::Result<Option<InboxItemDoc>> {
        conflict_retried(|| async {
            let mut session = self.client.start_session().await?;
            let item = session
                .start_transaction()
                .and_run((self, user_id, id), |s, (store, user_id, id)| {
                    async move {
                        let now = DateTime::now();
                        let set = match action {
                            ItemAction::Read => doc! {"read_at": now},
                            ItemAction::Unread => doc! {"read_at": null},
                            ItemAction::Archive => doc! {"archived_at": now},
                            ItemAction::Unarchive => doc! {"archived_at": null},
                        };
                        let mut filter = doc! {"_id": *id, "user_id": *user_id};
                        // Reading an item also sees it; a read keeps its first time.
                        let update = match action {
                            ItemAction::Read => {
                                let Some(item) = store
                                    .inbox()
                                    .find_one(filter.clone())
                                    .session(&mut *s)
                                    .await?
                                else {
                                    return Ok(None);
                                };
                                if item.read_at.is_some() && item.seen_at.is_some() {
                                    return Ok(Some(item));
                                }
                                filter.insert("read_at", item.read_at);
                                doc! {"$set": {
                                    "read_at": item.read_at.unwrap_or(now),
                                    "seen_at": item.seen_at.unwrap_or(now),
                                }}
                            }
                            _ => doc! {"$set": set},
                        };
                        let item = store
                            .inbox()
                            .find_one_and_update(filter, update)
                            .return_document(ReturnDocument::After)
                            .session(&mut *s)
                            .await?;
                        if let (Some(item), ItemAction::Read) = (&item, action) {
                            store
                                .engage(s, std::slice::from_ref(&item.delivery_id), true, now)
                                .await?;
                        }
                        Ok(item)
                    }
                    .boxed()
                })
                .await?;
            Ok(item)
        })
        .await
    }

    /// Marks every one of `user_id`'s items seen, or read (of one event type, when
    /// given), a batch per transaction with the deliveries' engagement; returns how many
    /// items changed.
    pub async fn inbox_mark_all(&self, user_id: &str, mark: &MarkAll) -> anyhow::Result<u64> {
        let mut changed = 0;
        loop {
            let n = conflict_retried(|| async {
                let mut session = self.client.start_session().await?;
                let n = session
                    .start_transaction()
                    .and_run((self, user_id, mark), |s, (store, user_id, mark)| {
                        async move { store.mark_batch(s, user_id, mark).await }.boxed()
                    })
                    .await?;
                Ok(n)
            })
            .await?;
            changed += n;
            if n < MARK_BATCH as u64 {
                return Ok(changed);
            }
        }
    }

    async fn mark_batch(
        &self,
        s: &mut ClientSession,
        user_id: &str,
        mark: &MarkAll,
    ) -> mongodb::error::Result<u64> {
        let now = DateTime::now();
        let (mut filter, set, read) = match mark {
            MarkAll::Seen => (
                doc! {"user_id": user_id, "seen_at": null},
                doc! {"seen_at": now},
                false,
            ),
            MarkAll::Read { event_type } => {
                let mut f = doc! {"user_id": user_id, "read_at": null};
                if let Some(t) = event_type {
                    f.insert("event_type", t);
                }
                (f, doc! {"read_at": now}, true)
            }
        };
        let batch: Vec<InboxItemDoc> = self
            .inbox()
            .find(filter.clone())
            .limit(MARK_BATCH)
            .session(&mut *s)
            .await?
            .stream(&mut *s)
            .try_collect()
            .await?;
        if batch.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = batch.iter().map(|i| i.id.clone()).collect();
        filter.insert("_id", doc! {"$in": &ids});
        self.inbox()
            .update_many(filter, doc! {"$set": set})
            .session(&mut *s)
            .await?;
        if read {
            // A read item has been seen.
            self.inbox()
                .update_many(
                    doc! {"_id": {"$in": &ids}, "seen_at": null},
                    doc! {"$set": {"seen_at": now}},
                )
                .session(&mut *s)
                .await?;
        }
        let deliveries: Vec<String> = batch.into_iter().map(|i| i.delivery_id).collect();
        let ids = ids.len();
        self.engage(s, &deliveries, read, now).await?;
        Ok(ids as u64)
    }

    /// Records on deliveries when their items were first seen (and read, if `read`).
    async fn engage(
        &self,
        s: &mut ClientSession,
        delivery_ids: &[String],
        read: bool,
        now: DateTime,
    ) -> mongodb::error::Result<()> {
        let mut fields = vec![("seen_at", "message.seen")];
        if read {
            fields.push(("read_at", "message.read"));
        }
        let subs = self.subscriptions().await?;
        for (field, kind) in fields {
            let first = doc! {"_id": {"$in": delivery_ids}, field: null};
            // The deliveries this marks for the first time, each reported once.
            let events: Vec<HookEvent> = if subs.wants(kind) {
                self.deliveries_in(s, first.clone())
                    .await?
                    .iter()
                    .map(|d| {
                        HookEvent::delivery(kind, d, d.status, d.reason.as_deref(), None, now)
                            .with(field, iso(now))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            self.deliveries()
                .update_many(first, doc! {"$set": {field: now}})
                .session(&mut *s)
                .await?;
            self.stage_hooks(s, &subs, &events).await?;
        }
        Ok(())
    }

    /// Every change to any inbox from now on, whichever process made it: one change
    /// stream, to be shared by all of a process's sockets.
    pub async fn watch_inbox(
        &self,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<InboxChange>> + Send + 'static> {
        let stream = self
            .inbox()
            .watch()
            .pipeline([
                doc! {"$match": {"operationType": {"$in": ["insert", "update", "replace"]}}},
            ])
            .full_document(FullDocumentType::UpdateLookup)
            .await?;
        Ok(stream.filter_map(|event| async move {
            match event {
                Err(e) => Some(Err(anyhow::Error::from(e))),
                Ok(e) => inbox_change(e).map(Ok),
            }
        }))
    }
}

fn inbox_change(e: ChangeStreamEvent<InboxItemDoc>) -> Option<InboxChange> {
    let item = e.full_document?;
    Some(match e.operation_type {
        OperationType::Insert => InboxChange::Received(Box::new(item)),
        _ => InboxChange::Changed {
            user_id: item.user_id,
        },
    })
}
