//! What the MongoDB-compatible server itself sustains on this machine: bulk inserts of
//! delivery-sized documents, and transactions shaped like the worker's outcome commit —
//! the ceiling herald's own figures are compared with.

use std::time::Instant;

use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;

use herald::store::status_writes::{status_write_models, Guard, StatusWrite};
use herald::store::{delivery_indexes, now};

use crate::db::LabDb;

const SCRATCH: &str = "ceiling_deliveries";
const SCRATCH_COUNTERS: &str = "ceiling_counters";

/// Deliveries of one claim round trip share an attempt id; these many, as in a lane of 16.
const CLAIMED_TOGETHER: usize = 16;

#[derive(Debug, Clone, Copy)]
pub struct StoreCeiling {
    pub inserts_per_sec: f64,
    pub transactions_per_sec: f64,
    /// Deliveries given their outcome per second inside those transactions.
    pub outcomes_per_sec: f64,
    /// Deliveries per second written once, with their outcome, in transactions that also
    /// complete their chunk and move a rollup and a counter: the shape of a campaign whose
    /// deliveries are recorded when sent rather than queued, claimed and updated.
    pub written_with_outcome_per_sec: f64,
    /// The database server's CPU seconds per 1,000 documents bulk inserted, and per 1,000
    /// deliveries written with their outcome (when the server is local and seen).
    pub insert_cpu_per_1000: Option<f64>,
    pub written_with_outcome_cpu_per_1000: Option<f64>,
}

/// The CPU seconds per 1,000 units a process used since `before`.
fn cpu_per_1000(database: Option<u32>, before: Option<f64>, units: usize) -> Option<f64> {
    let used = database.and_then(super::cpu::seconds)? - before?;
    Some((used / units.max(1) as f64 * 1000.0 * 1000.0).round() / 1000.0)
}

/// Inserts `docs` delivery-shaped documents (1,000 per bulk write) into a collection
/// with the deliveries' indexes, then runs transactions shaped like an outcome commit
/// of `batch` sent deliveries: read the batch, the status writes exactly as the worker
/// builds them (equal outcomes share an update), one rollup and one counter write.
/// `database` is the server's pid, for its CPU time.
pub async fn measure(
    lab: &LabDb,
    docs: usize,
    batch: usize,
    database: Option<u32>,
) -> anyhow::Result<StoreCeiling> {
    let cpu = || database.and_then(super::cpu::seconds);
    let db = lab.database();
    let coll = db.collection::<Document>(SCRATCH);
    let counters = db.collection::<Document>(SCRATCH_COUNTERS);
    coll.drop().await?;
    counters.drop().await?;
    db.create_collection(SCRATCH).await?;
    db.create_collection(SCRATCH_COUNTERS).await?;
    coll.create_indexes(delivery_indexes()).await?;
    let id = |i: usize| format!("{i:012}");
    let token = |i: usize| format!("attempt-{}", i / CLAIMED_TOGETHER);
    let make = |i: usize| {
        doc! {
            "_id": id(i), "notification_id": "n", "event_type": "order_shipped",
            "user_id": format!("user-{i:07}"), "channel": "email", "priority": "low",
            "schedule_id": null, "status": "sending", "reason": null, "provider": null,
            "attempt_count": 0, "attempts": [], "last_error": null,
            "claim": {"attempt_id": token(i), "from": "queued", "claimed_at": now(), "worker": "w"},
            "accepted_at": now(), "created_at": now(), "updated_at": now(),
        }
    };
    let cpu_before = cpu();
    let started = Instant::now();
    let mut written = 0;
    while written < docs {
        let n = (docs - written).min(1_000);
        coll.insert_many((written..written + n).map(make)).await?;
        written += n;
    }
    let inserts_per_sec = docs as f64 / started.elapsed().as_secs_f64();
    let insert_cpu_per_1000 = cpu_per_1000(database, cpu_before, docs);

    counters
        .insert_many([
            doc! {"_id": "n", "sent": 0},
            doc! {"_id": "rollup", "sent": 0},
        ])
        .await?;
    let started = Instant::now();
    let mut session = lab.client().start_session().await?;
    let mut transactions = 0;
    let client = lab.client().clone();
    for chunk in (0..docs).collect::<Vec<_>>().chunks(batch.max(1)) {
        session
            .start_transaction()
            .and_run(
                (&coll, &counters, &client, chunk),
                |s, (coll, counters, client, chunk)| {
                    async move {
                        let ids: Vec<String> = chunk.iter().map(|i| id(*i)).collect();
                        let read: Vec<Document> = coll
                            .find(doc! {"_id": {"$in": &ids}})
                            .projection(doc! {"attempts": 0})
                            .session(&mut *s)
                            .await?
                            .stream(&mut *s)
                            .try_collect()
                            .await?;
                        if read.len() != ids.len() {
                            return Err(mongodb::error::Error::custom("scratch batch missing"));
                        }
                        let at = now();
                        let writes = chunk
                            .iter()
                            .zip(&ids)
                            .map(|(i, id)| StatusWrite {
                                id,
                                guard: Guard::Claim(token(*i)),
                                set: doc! {"status": "sent", "reason": null, "updated_at": at,
                                "provider": "smtp", "sent_at": at, "expire_at": at,
                                "last_error": null},
                                unset_expiry: false,
                                attempt: Some(Bson::Document(doc! {
                                    "attempt_id": token(*i), "provider": "smtp",
                                    "started_at": at, "finished_at": at, "duration_ms": 3,
                                    "status": "sent", "error": null,
                                    "response": {"reply": "250 2.0.0 Ok: queued"},
                                })),
                            })
                            .collect();
                        let (models, expected) = status_write_models(writes, coll.namespace());
                        let done = client
                            .bulk_write(models)
                            .verbose_results()
                            .session(&mut *s)
                            .await?;
                        let matched: u64 =
                            done.update_results.values().map(|u| u.matched_count).sum();
                        if matched != expected.iter().sum::<u64>() {
                            return Err(mongodb::error::Error::custom("scratch batch changed"));
                        }
                        count_sent(counters, s, chunk.len() as i64, at).await
                    }
                    .boxed()
                },
            )
            .await?;
        transactions += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    coll.drop().await?;
    db.create_collection(SCRATCH).await?;
    coll.create_indexes(delivery_indexes()).await?;
    let cpu_before = cpu();
    let written_with_outcome_per_sec = written_with_outcome(lab, docs, batch).await?;
    let written_with_outcome_cpu_per_1000 = cpu_per_1000(database, cpu_before, docs);
    coll.drop().await?;
    counters.drop().await?;
    Ok(StoreCeiling {
        inserts_per_sec,
        transactions_per_sec: transactions as f64 / secs,
        outcomes_per_sec: docs as f64 / secs,
        written_with_outcome_per_sec,
        insert_cpu_per_1000,
        written_with_outcome_cpu_per_1000,
    })
}

/// Transactions of `batch` deliveries written once with their outcome (`sent`, one
/// attempt with the provider's message id): the chunk's completion (guarded by its
/// claim), the inserts, one rollup and one counter write. Deliveries per second.
async fn written_with_outcome(lab: &LabDb, docs: usize, batch: usize) -> anyhow::Result<f64> {
    let db = lab.database();
    let coll = db.collection::<Document>(SCRATCH);
    let counters = db.collection::<Document>(SCRATCH_COUNTERS);
    let chunks = (0..docs).collect::<Vec<_>>();
    let chunks: Vec<&[usize]> = chunks.chunks(batch.max(1)).collect();
    counters
        .insert_many(
            (0..chunks.len()).map(|c| doc! {"_id": format!("chunk-{c}"), "claim": "attempt"}),
        )
        .await?;
    let started = Instant::now();
    let mut session = lab.client().start_session().await?;
    for (c, chunk) in chunks.iter().enumerate() {
        session
            .start_transaction()
            .and_run(
                (&coll, &counters, c, chunk),
                |s, (coll, counters, c, chunk)| {
                    async move {
                        let at = now();
                        let done = counters
                            .update_one(
                                doc! {"_id": format!("chunk-{c}"), "claim": "attempt"},
                                doc! {"$set": {"claim": null, "done": true}},
                            )
                            .session(&mut *s)
                            .await?;
                        if done.matched_count != 1 {
                            return Err(mongodb::error::Error::custom("scratch chunk changed"));
                        }
                        let records = chunk.iter().map(|i| {
                            doc! {
                                "_id": format!("w{i:012}"), "notification_id": "n",
                                "event_type": "order_shipped", "user_id": format!("user-{i:07}"),
                                "channel": "email", "priority": "low", "schedule_id": null,
                                "status": "sent", "reason": null, "provider": "smtp",
                                "attempt_count": 1, "last_error": null,
                                "attempts": [{"attempt_id": "attempt", "provider": "smtp",
                                    "started_at": at, "finished_at": at, "duration_ms": 3,
                                    "status": "sent", "error": null,
                                    "response": {"message_id": format!("<w{i:012}@example.com>"),
                                        "smtp_code": "250", "smtp_message": "2.0.0 Ok: queued"}}],
                                "accepted_at": at, "created_at": at, "updated_at": at,
                                "sent_at": at, "expire_at": at,
                            }
                        });
                        coll.insert_many(records).session(&mut *s).await?;
                        count_sent(counters, s, chunk.len() as i64, at).await
                    }
                    .boxed()
                },
            )
            .await?;
    }
    Ok(docs as f64 / started.elapsed().as_secs_f64())
}

/// A commit's counting, as herald's: one rollup and one notification counter, read back.
async fn count_sent(
    counters: &mongodb::Collection<Document>,
    s: &mut mongodb::ClientSession,
    n: i64,
    at: mongodb::bson::DateTime,
) -> mongodb::error::Result<()> {
    counters
        .update_one(doc! {"_id": "rollup"}, doc! {"$inc": {"sent": n}})
        .session(&mut *s)
        .await?;
    counters
        .find_one_and_update(
            doc! {"_id": "n"},
            doc! {"$inc": {"sent": n}, "$set": {"updated_at": at}},
        )
        .return_document(ReturnDocument::After)
        .session(&mut *s)
        .await?;
    Ok(())
}
