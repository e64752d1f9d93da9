//! The lab's own view of herald's database: whole-collection reads, bulk loads, poison
//! records and dropping a throw-away database — things the product never does.
//!
//! It reads herald's collections by name (`deliveries`, `schedules`, `schedule_runs`):
//! the product's store keeps those names private, and a renamed collection fails the
//! fault suite's accounting in CI, not silently.

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::{Client, Database};

use herald::config::MongoSettings;
use herald::store::{DeliveryDoc, RunDoc, ScheduleDoc};

/// A connection of the lab's own to the database a herald under test uses.
#[derive(Clone)]
pub struct LabDb {
    client: Client,
    db: Database,
}

/// A delivery record as an audit reads it: tolerant of records herald cannot decode.
#[derive(Debug, Clone)]
pub struct AuditedDelivery {
    pub id: String,
    pub notification_id: String,
    pub schedule_id: Option<String>,
    /// The stored status, or `?` when it is not a string.
    pub status: String,
    pub reason: Option<String>,
    pub last_error: Option<String>,
}

impl AuditedDelivery {
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "sent" | "skipped" | "failed" | "dead")
    }
}

impl LabDb {
    pub async fn connect(settings: &MongoSettings) -> anyhow::Result<Self> {
        let client = Client::with_uri_str(settings.uri.expose()).await?;
        let db = client.database(&settings.database);
        Ok(Self { client, db })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Every delivery record, whatever its shape (the fault suite's accounting).
    pub async fn delivery_audit(&self) -> anyhow::Result<Vec<AuditedDelivery>> {
        let raw: Vec<Document> = self
            .db
            .collection::<Document>("deliveries")
            .find(doc! {})
            .projection(doc! {"notification_id": 1, "schedule_id": 1, "status": 1, "reason": 1, "last_error": 1})
            .await?
            .try_collect()
            .await?;
        let text = |d: &Document, k: &str| d.get_str(k).ok().map(str::to_owned);
        Ok(raw
            .iter()
            .map(|d| AuditedDelivery {
                id: text(d, "_id").unwrap_or_default(),
                notification_id: text(d, "notification_id").unwrap_or_default(),
                schedule_id: text(d, "schedule_id"),
                status: text(d, "status").unwrap_or_else(|| "?".into()),
                reason: text(d, "reason"),
                last_error: text(d, "last_error"),
            })
            .collect())
    }

    /// Status webhook messages waiting for a try.
    pub async fn webhooks_waiting(&self) -> anyhow::Result<u64> {
        Ok(self
            .db
            .collection::<Document>("webhook_messages")
            .count_documents(doc! {"state": "pending"})
            .await?)
    }

    /// Writes a delivery record no herald would write (its status is a number): poison,
    /// for checking that a job about it is parked, not retried forever.
    pub async fn insert_unreadable_delivery(&self, id: &str) -> anyhow::Result<()> {
        self.db
            .collection::<Document>("deliveries")
            .insert_one(doc! {"_id": id, "notification_id": "poison", "status": 42})
            .await?;
        Ok(())
    }

    /// Writes delivery records as they are; counters and statistics are not touched
    /// (`herald rebuild-stats` recomputes them).
    pub async fn load_deliveries(&self, docs: &[DeliveryDoc]) -> anyhow::Result<()> {
        if !docs.is_empty() {
            self.db
                .collection::<DeliveryDoc>("deliveries")
                .insert_many(docs)
                .ordered(false)
                .await?;
        }
        Ok(())
    }

    /// Stores many schedules at once.
    pub async fn insert_schedules(&self, all: &[ScheduleDoc]) -> anyhow::Result<()> {
        let schedules = self.db.collection::<ScheduleDoc>("schedules");
        for chunk in all.chunks(1000) {
            schedules.insert_many(chunk).await?;
        }
        Ok(())
    }

    /// Every run record of the (fresh) database.
    pub async fn all_runs(&self) -> anyhow::Result<Vec<RunDoc>> {
        Ok(self
            .db
            .collection::<RunDoc>("schedule_runs")
            .find(doc! {})
            .await?
            .try_collect()
            .await?)
    }

    /// Drops the throw-away database, then closes the connection.
    pub async fn drop_and_close(self) -> anyhow::Result<()> {
        let dropped = self.db.drop().await;
        self.client.shutdown().await;
        Ok(dropped?)
    }
}
