//! Fan-out: one transaction writes a batch of missing deliveries and counts them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::Context as _;
use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{doc, Document};

use super::documents::{DeliveryDoc, QueuedDelivery};
use super::stats::StatMoves;
use super::txn::{conflict_retried, is_duplicate_key};
use super::{now, Store};
use crate::domain::{Channel, DeliveryStatus};

/// One fan-out's next deliveries to write (see [`Store::insert_delivery_batches`]).
#[derive(Debug, Clone)]
pub struct FanoutBatch {
    pub notification_id: String,
    pub planned: Vec<DeliveryDoc>,
}

impl Store {
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
}
