//! Campaign chunks: a fan-out's recipients cut into small records, each sent by one
//! worker under one claim and its deliveries written once, with their outcomes. A chunk
//! claimed by a worker that stopped is resolved like a `sending` delivery: whatever of it
//! has no record is `failed` / `outcome_unknown`, never re-sent.

use std::collections::HashSet;

use anyhow::Context as _;
use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use serde::{Deserialize, Serialize};

use super::documents::{ClaimDoc, DeliveryDoc};
use super::stats::StatMoves;
use super::txn::conflict_retried;
use super::{now, Store};
use crate::domain::{Channel, DeliveryStatus, Priority};

pub const CHUNKS: &str = "chunks";

/// One recipient × channel of a chunk, with the id its delivery record will have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkItem {
    pub delivery_id: String,
    pub user_id: String,
    pub channel: Channel,
}

/// A chunk of one notification's deliveries (`_id`: the notification id and the chunk's
/// number in its fan-out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub notification_id: String,
    pub event_type: String,
    pub priority: Priority,
    #[serde(default)]
    pub schedule_id: Option<String>,
    pub accepted_at: Option<DateTime>,
    /// The deliveries' `created_at` (their statistics' hour).
    pub created_at: DateTime,
    pub items: Vec<ChunkItem>,
    /// The worker sending it; `from` is always `queued`.
    pub claim: Option<ClaimDoc>,
    /// Items (from the first) that may have been handed to a provider: marked a window
    /// at a time before their sends, so a chunk whose worker stopped is resumed after them
    /// and only they can be `outcome_unknown`.
    #[serde(default)]
    pub started: u32,
    /// Started items whose attempt failed before their provider call (a database error
    /// reading the recipient, say): sent when the chunk is resumed, not `outcome_unknown`.
    #[serde(default)]
    pub unsent: Vec<String>,
    /// When a stopped worker's claim was released: a chunk left released (its job lost)
    /// is published again by the sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<DateTime>,
    /// Every item has its record.
    pub done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<DateTime>,
}

impl ChunkDoc {
    /// The delivery an item will be, still `queued` and unwritten.
    pub fn delivery(&self, item: &ChunkItem) -> DeliveryDoc {
        DeliveryDoc {
            id: item.delivery_id.clone(),
            notification_id: self.notification_id.clone(),
            event_type: self.event_type.clone(),
            user_id: item.user_id.clone(),
            channel: item.channel,
            priority: self.priority,
            schedule_id: self.schedule_id.clone(),
            status: DeliveryStatus::Queued,
            reason: None,
            provider: None,
            attempt_count: 0,
            attempts: Vec::new(),
            last_error: None,
            claim: None,
            accepted_at: self.accepted_at,
            created_at: self.created_at,
            updated_at: self.created_at,
            sent_at: None,
            feedback: Vec::new(),
            complained_at: None,
            unsubscribed_at: None,
            seen_at: None,
            read_at: None,
            expire_at: None,
        }
    }
}

/// Where a chunked fan-out stands: the next chunk's number and the last recipient cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkResume {
    pub next_seq: i64,
    pub after_user: Option<String>,
    /// The fan-out began writing one record per delivery (before chunks were turned on):
    /// it goes on that way.
    pub per_delivery: bool,
}

/// What a worker found when it went to claim a chunk.
#[derive(Debug)]
pub enum ChunkClaim {
    /// Claimed: send it under this attempt id.
    Claimed {
        chunk: Box<ChunkDoc>,
        attempt_id: String,
    },
    /// Another attempt holds it.
    Held(Box<ChunkDoc>),
    /// Finished, or gone.
    Nothing,
}

impl Store {
    fn chunks(&self) -> Collection<ChunkDoc> {
        self.db.collection(CHUNKS)
    }

    pub(super) async fn index_chunks(&self) -> anyhow::Result<()> {
        self.chunks()
            .create_indexes([
                super::named_index(doc! {"notification_id": 1, "done": 1}, "notification_open"),
                super::named_index(doc! {"claim.claimed_at": 1}, "claimed_at"),
                super::named_index(doc! {"released_at": 1}, "released_at"),
                super::expiry_index(),
            ])
            .await?;
        Ok(())
    }

    /// Where the notification's chunked fan-out stands (from its progress document).
    pub async fn chunk_resume(&self, notification_id: &str) -> anyhow::Result<ChunkResume> {
        let p = self
            .fanout_progress()
            .find_one(doc! {"_id": notification_id})
            .await?;
        Ok(ChunkResume {
            next_seq: p
                .as_ref()
                .and_then(|p| p.get_i64("next_seq").ok())
                .unwrap_or(0),
            per_delivery: p.as_ref().is_some_and(|p| !p.contains_key("next_seq")),
            after_user: p.and_then(|p| p.get_str("after_user").ok().map(str::to_owned)),
        })
    }

    /// Writes a fan-out's next chunks with their counts (the progress document, where
    /// the fan-out now stands, and the `queued` statistics), in one transaction. Fails
    /// when the progress moved since `from` was read (another dispatch of the same
    /// notification cut them first).
    pub async fn insert_chunks(
        &self,
        from: &ChunkResume,
        chunks: &[ChunkDoc],
        to: &ChunkResume,
    ) -> anyhow::Result<()> {
        let Some(first) = chunks.first() else {
            return Ok(());
        };
        let notification_id = first.notification_id.clone();
        let n: i64 = chunks.iter().map(|c| c.items.len() as i64).sum();
        conflict_retried(|| async {
            let mut session = self.client.start_session().await?;
            session
                .start_transaction()
                .and_run((self, &notification_id), |s, (store, id)| {
                    async move {
                        let mut at = doc! {"_id": &**id};
                        match &from.after_user {
                            Some(u) => at.insert("after_user", u),
                            // A progress document without chunks is another kind of fan-out's.
                            None => at.insert("next_seq", doc! {"$exists": false}),
                        };
                        let moved = store
                            .fanout_progress()
                            .update_one(
                                at,
                                doc! {"$inc": {"total": n, "queued": n},
                                "$set": {"updated_at": now(), "next_seq": to.next_seq,
                                "after_user": to.after_user.as_deref()}},
                            )
                            .upsert(from.after_user.is_none())
                            .session(&mut *s)
                            .await?;
                        if moved.matched_count + u64::from(moved.upserted_id.is_some()) != 1 {
                            return Err(mongodb::error::Error::custom(
                                "another dispatch moved this fan-out on",
                            ));
                        }
                        let mut moves = StatMoves::sharded("fanout", first.priority);
                        for c in chunks {
                            for item in &c.items {
                                moves.add(&c.delivery(item), DeliveryStatus::Queued, None, 1, None);
                            }
                        }
                        moves
                            .write(&store.db, s, store.retention.stats_days)
                            .await?;
                        store.chunks().insert_many(chunks).session(&mut *s).await?;
                        Ok(())
                    }
                    .boxed()
                })
                .await
                .context("writing a fan-out's chunks")
        })
        .await
    }

    /// The chunks of a notification not yet done (to publish again after an interruption).
    pub async fn open_chunks(&self, notification_id: &str) -> anyhow::Result<Vec<String>> {
        let docs: Vec<Document> = self
            .chunks()
            .clone_with_type::<Document>()
            .find(doc! {"notification_id": notification_id, "done": false})
            .projection(doc! {"_id": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect())
    }

    /// True when the notification's fan-out was cut into chunks.
    pub async fn has_chunks(&self, notification_id: &str) -> anyhow::Result<bool> {
        Ok(self
            .chunks()
            .clone_with_type::<Document>()
            .find_one(doc! {"notification_id": notification_id})
            .projection(doc! {"_id": 1})
            .await?
            .is_some())
    }

    /// Claims chunk `id` for `worker` if it is neither done nor held.
    pub async fn claim_chunk(&self, id: &str, worker: &str) -> anyhow::Result<ChunkClaim> {
        let attempt_id = uuid::Uuid::now_v7().to_string();
        let claim = ClaimDoc {
            attempt_id: attempt_id.clone(),
            from: DeliveryStatus::Queued,
            claimed_at: now(),
            worker: worker.to_owned(),
        };
        let claimed = self
            .chunks()
            .find_one_and_update(
                doc! {"_id": id, "done": false, "claim": null},
                doc! {"$set": {"claim": mongodb::bson::to_bson(&claim)?}},
            )
            .return_document(ReturnDocument::After)
            .await?;
        if let Some(chunk) = claimed {
            return Ok(ChunkClaim::Claimed {
                chunk: Box::new(chunk),
                attempt_id,
            });
        }
        Ok(match self.chunks().find_one(doc! {"_id": id}).await? {
            Some(c) if !c.done && c.claim.is_some() => ChunkClaim::Held(Box::new(c)),
            _ => ChunkClaim::Nothing,
        })
    }

    /// Which of these deliveries have a record.
    pub async fn written(&self, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        let docs: Vec<Document> = self
            .deliveries()
            .clone_with_type::<Document>()
            .find(doc! {"_id": {"$in": ids}})
            .projection(doc! {"_id": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect())
    }

    /// Applies `update` to chunk `id` if `attempt_id` still holds it; `false`: it does not.
    async fn update_held(
        &self,
        id: &str,
        attempt_id: &str,
        update: Document,
    ) -> anyhow::Result<bool> {
        let r = self
            .chunks()
            .update_one(doc! {"_id": id, "claim.attempt_id": attempt_id}, update)
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Marks items up to `through` as possibly handed to a provider, and the claim as
    /// alive now (a chunk's age is its current window's), if `attempt_id` still holds the
    /// chunk; `false`: it does not (the chunk was resolved as stopped).
    pub async fn start_window(
        &self,
        id: &str,
        attempt_id: &str,
        through: u32,
    ) -> anyhow::Result<bool> {
        self.update_held(
            id,
            attempt_id,
            doc! {"$max": {"started": through}, "$set": {"claim.claimed_at": now()}},
        )
        .await
    }

    /// Records started items that failed before their provider call, if `attempt_id`
    /// still holds the chunk.
    pub async fn mark_unsent(
        &self,
        id: &str,
        attempt_id: &str,
        ids: &[String],
    ) -> anyhow::Result<()> {
        self.update_held(
            id,
            attempt_id,
            doc! {"$addToSet": {"unsent": {"$each": ids}}},
        )
        .await?;
        Ok(())
    }

    /// Takes started items that had failed before their provider call back from the
    /// unsent list, before they are tried again, if `attempt_id` still holds the chunk.
    pub async fn retake_unsent(
        &self,
        id: &str,
        attempt_id: &str,
        ids: &[String],
    ) -> anyhow::Result<bool> {
        self.update_held(
            id,
            attempt_id,
            doc! {"$pullAll": {"unsent": ids}, "$set": {"claim.claimed_at": now()}},
        )
        .await
    }

    /// Ends a stopped worker's hold on a chunk, as read in `chunk`: done, or released for
    /// another claim. `false`: the chunk moved on since it was read (that worker is
    /// alive, or another resolved it) and must be looked at again.
    pub async fn end_stopped_claim(
        &self,
        chunk: &ChunkDoc,
        attempt_id: &str,
        done: bool,
    ) -> anyhow::Result<bool> {
        let set = if done {
            doc! {"done": true, "expire_at": super::expires(self.retention.notification_days)}
        } else {
            doc! {"claim": null, "released_at": now()}
        };
        let r = self
            .chunks()
            .update_one(
                doc! {"_id": &chunk.id, "claim.attempt_id": attempt_id,
                "started": i64::from(chunk.started),
                "unsent": {"$size": chunk.unsent.len() as i64}},
                doc! {"$set": set},
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Marks a chunk done: every item has its record.
    pub async fn finish_chunk(&self, id: &str) -> anyhow::Result<()> {
        self.chunks()
            .update_one(
                doc! {"_id": id},
                doc! {"$set": {"done": true, "expire_at": super::expires(self.retention.notification_days)}},
            )
            .await?;
        Ok(())
    }

    /// Chunks still claimed since before `cutoff` (their worker stopped), or released
    /// before it and never claimed again (their job was lost); at most `limit`.
    pub async fn stale_chunks(
        &self,
        cutoff: DateTime,
        limit: i64,
    ) -> anyhow::Result<Vec<ChunkDoc>> {
        Ok(self
            .chunks()
            .find(doc! {"done": false, "$or": [
                {"claim.claimed_at": {"$lt": cutoff}},
                {"claim": null, "released_at": {"$lt": cutoff}},
            ]})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }
}
