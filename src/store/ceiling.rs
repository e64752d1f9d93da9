//! What the MongoDB-compatible server itself sustains on this machine: bulk inserts of
//! delivery-sized documents, and transactions shaped like the worker's outcome commit —
//! the ceiling herald's own figures are compared with.

use std::time::Instant;

use futures::FutureExt;
use mongodb::bson::{doc, Document};

use super::{now, Store};

const SCRATCH: &str = "ceiling_deliveries";
const SCRATCH_COUNTERS: &str = "ceiling_counters";

#[derive(Debug, Clone, Copy)]
pub struct StoreCeiling {
    pub inserts_per_sec: f64,
    pub transactions_per_sec: f64,
    /// Documents updated per second inside those transactions.
    pub updates_per_sec: f64,
}

impl Store {
    /// Inserts `docs` delivery-sized documents (1,000 per bulk write), then runs
    /// transactions that each update `batch` of them plus one counter document, as an
    /// outcome batch does.
    pub async fn measure_ceiling(&self, docs: usize, batch: usize) -> anyhow::Result<StoreCeiling> {
        let coll = self.db.collection::<Document>(SCRATCH);
        let counters = self.db.collection::<Document>(SCRATCH_COUNTERS);
        coll.drop().await?;
        counters.drop().await?;
        self.db.create_collection(SCRATCH).await?;
        self.db.create_collection(SCRATCH_COUNTERS).await?;
        let make = |i: usize| {
            doc! {
                "_id": format!("{i:012}"), "notification_id": "n", "event_type": "order_shipped",
                "user_id": format!("user-{i:07}"), "channel": "email", "priority": "normal",
                "status": "queued", "reason": null, "provider": null, "attempt_count": 0,
                "attempts": [], "created_at": now(), "updated_at": now(),
            }
        };
        let started = Instant::now();
        let mut written = 0;
        while written < docs {
            let n = (docs - written).min(1_000);
            coll.insert_many((written..written + n).map(make)).await?;
            written += n;
        }
        let inserts_per_sec = docs as f64 / started.elapsed().as_secs_f64();

        counters.insert_one(doc! {"_id": "n", "sent": 0}).await?;
        let started = Instant::now();
        let mut session = self.client.start_session().await?;
        let mut transactions = 0;
        for chunk in (0..docs).collect::<Vec<_>>().chunks(batch.max(1)) {
            session
                .start_transaction()
                .and_run((&coll, &counters, chunk), |s, (coll, counters, chunk)| {
                    async move {
                        for i in chunk.iter() {
                            coll.find_one_and_update(
                                doc! {"_id": format!("{i:012}"), "status": "queued"},
                                doc! {"$set": {"status": "sent", "updated_at": now()},
                                "$inc": {"attempt_count": 1}},
                            )
                            .session(&mut *s)
                            .await?;
                        }
                        counters
                            .update_one(
                                doc! {"_id": "n"},
                                doc! {"$inc": {"sent": chunk.len() as i64}},
                            )
                            .session(&mut *s)
                            .await?;
                        Ok(())
                    }
                    .boxed()
                })
                .await?;
            transactions += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        coll.drop().await?;
        counters.drop().await?;
        Ok(StoreCeiling {
            inserts_per_sec,
            transactions_per_sec: transactions as f64 / secs,
            updates_per_sec: docs as f64 / secs,
        })
    }
}
