//! Dead letters: deliveries that failed for good or ran out of retries, kept for inspection and replay.

use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{ClientSession, Collection};
use serde::{Deserialize, Serialize};

use super::stats::StatMoves;
use super::{now, DeliveryDoc, OutboxDoc, Store};
use crate::domain::{Channel, DeliveryStatus};

pub(super) const DEAD_LETTERS: &str = "dead_letters";

/// One per delivery (`_id` is the delivery id); written again if a replay fails again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub notification_id: String,
    pub event_type: String,
    pub user_id: String,
    pub channel: Channel,
    /// `failed` (permanent) or `dead` (retries exhausted).
    pub status: DeliveryStatus,
    pub reason: Option<String>,
    pub last_error: Option<String>,
    pub attempts: i32,
    pub created_at: DateTime,
    /// Set when replayed; a replay that fails again writes a fresh dead letter.
    pub replayed_at: Option<DateTime>,
    #[serde(default)]
    pub replay_count: i32,
    /// MongoDB's TTL monitor removes the letter then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<DateTime>,
}

/// Which dead letters to list or replay.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub notification_id: Option<String>,
    pub channel: Option<Channel>,
    pub reason: Option<String>,
    pub include_replayed: bool,
}

impl DeadLetterFilter {
    fn to_document(&self) -> Document {
        let mut f = Document::new();
        if let Some(n) = &self.notification_id {
            f.insert("notification_id", n);
        }
        if let Some(c) = self.channel {
            f.insert("channel", c.as_str());
        }
        if let Some(r) = &self.reason {
            f.insert("reason", r);
        }
        if !self.include_replayed {
            f.insert("replayed_at", mongodb::bson::Bson::Null);
        }
        f
    }
}

impl Store {
    fn dead_letters(&self) -> Collection<DeadLetterDoc> {
        self.db.collection(DEAD_LETTERS)
    }

    pub(super) async fn index_dead_letters(&self) -> anyhow::Result<()> {
        let model = super::named_index;
        self.dead_letters()
            .create_indexes([
                model(doc! {"replayed_at": 1, "created_at": -1}, "pending_created"),
                model(
                    doc! {"notification_id": 1, "created_at": -1},
                    "notification_created",
                ),
                super::expiry_index(),
            ])
            .await?;
        Ok(())
    }

    /// Records (or re-records) a delivery's dead letter inside an outcome transaction.
    pub(super) async fn write_dead_letter(
        coll: &Collection<DeadLetterDoc>,
        s: &mut ClientSession,
        before: &DeliveryDoc,
        outcome: &super::Outcome,
        retention_days: u32,
    ) -> mongodb::error::Result<()> {
        let attempt_error = outcome.attempt.as_ref().and_then(|a| a.error.as_deref());
        let letter = DeadLetterDoc {
            id: before.id.clone(),
            notification_id: before.notification_id.clone(),
            event_type: before.event_type.clone(),
            user_id: before.user_id.clone(),
            channel: before.channel,
            status: outcome.status,
            reason: outcome.reason.clone(),
            last_error: attempt_error
                .map(str::to_owned)
                .or_else(|| before.last_error.clone()),
            attempts: before.attempt_count + i32::from(outcome.attempt.is_some()),
            created_at: now(),
            replayed_at: None,
            replay_count: 0,
            expire_at: super::expires(retention_days),
        };
        let previous = coll
            .find_one_and_replace(doc! {"_id": &before.id}, &letter)
            .upsert(true)
            .session(&mut *s)
            .await?;
        if let Some(p) = previous {
            coll.update_one(
                doc! {"_id": &before.id},
                doc! {"$set": {"replay_count": p.replay_count}},
            )
            .session(&mut *s)
            .await?;
        }
        Ok(())
    }

    pub(super) fn dead_letter_collection(&self) -> Collection<DeadLetterDoc> {
        self.dead_letters()
    }

    /// Dead letters, newest first.
    pub async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        limit: i64,
    ) -> anyhow::Result<Vec<DeadLetterDoc>> {
        Ok(self
            .dead_letters()
            .find(filter.to_document())
            .sort(doc! {"created_at": -1, "_id": -1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// Puts a dead-lettered delivery back in its queue, in ONE transaction: the delivery
    /// returns to `queued` (counters follow), its notification is open again, the dead
    /// letter is marked replayed, and an outbox entry will publish the job.
    /// `None` when there is no pending dead letter with this id.
    pub async fn replay_dead_letter(&self, id: &str) -> anyhow::Result<Option<DeadLetterDoc>> {
        let mut session = self.client.start_session().await?;
        let replayed = session
            .start_transaction()
            .and_run(
                (
                    self.dead_letters(),
                    self.deliveries(),
                    self.notifications(),
                    self.outbox(),
                    self.db.clone(),
                    self.retention.stats_days,
                ),
                |s, (letters, deliveries, notifications, outbox, db, stats_days)| {
                    let id = id.to_owned();
                    async move {
                        let Some(letter) = letters
                            .find_one_and_update(
                                doc! {"_id": &id, "replayed_at": null},
                                doc! {"$set": {"replayed_at": now()}, "$inc": {"replay_count": 1}},
                            )
                            .return_document(ReturnDocument::After)
                            .session(&mut *s)
                            .await?
                        else {
                            return Ok(None);
                        };
                        let Some(before) = deliveries
                            .find_one_and_update(
                                doc! {"_id": &letter.id, "status": {"$in": ["failed", "dead"]}},
                                doc! {"$set": {"status": "queued", "reason": null, "claim": null,
                                "updated_at": now()}, "$unset": {"expire_at": ""}},
                            )
                            .session(&mut *s)
                            .await?
                        else {
                            return Ok(Some(letter));
                        };
                        let old = format!("counts.{}", before.status.as_str());
                        notifications
                            .update_one(
                                doc! {"_id": &before.notification_id},
                                doc! {"$inc": {old: -1, "counts.queued": 1},
                                "$set": {"updated_at": now()}},
                            )
                            .session(&mut *s)
                            .await?;
                        notifications
                            .update_one(
                                doc! {"_id": &before.notification_id,
                                "status": {"$in": ["completed", "partially_failed", "failed"]}},
                                doc! {"$set": {"status": "dispatching"}, "$unset": {"expire_at": ""}},
                            )
                            .session(&mut *s)
                            .await?;
                        let mut moves = StatMoves::default();
                        let provider = before.provider.as_deref();
                        moves.add(&before, before.status, provider, -1, None);
                        moves.add(&before, DeliveryStatus::Queued, provider, 1, None);
                        moves.write(db, s, *stats_days).await?;
                        let stamp = now();
                        outbox
                            .insert_one(OutboxDoc {
                                id: uuid::Uuid::now_v7().to_string(),
                                notification_id: before.notification_id.clone(),
                                delivery_id: Some(before.id.clone()),
                                delay_ms: 0,
                                attempt: 0,
                                lane: before.priority,
                                due_at: stamp,
                                lease_until: stamp,
                                lease_token: None,
                                created_at: stamp,
                                also: Vec::new(),
                            })
                            .session(&mut *s)
                            .await?;
                        Ok(Some(letter))
                    }
                    .boxed()
                },
            )
            .await?;
        Ok(replayed)
    }
}
