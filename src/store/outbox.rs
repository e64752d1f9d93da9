//! The outbox: leasing due entries to a relay, completing and releasing them, and the backlog they make.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};

use super::documents::OutboxDoc;
use super::stats;
use super::{ids_found, now, Store};

impl Store {
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
}
