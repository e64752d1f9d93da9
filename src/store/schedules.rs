//! Schedules and their runs: the documents and the transactions that claim a slot exactly once.

use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{self, doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use serde::{Deserialize, Serialize};

use super::{is_duplicate_key, now, NotificationDoc, OutboxDoc, RecipientsDoc, Store};
use crate::domain::plan::{MisfirePolicy, RunKind};
use crate::domain::{Category, Channel, Priority};

pub(super) const SCHEDULES: &str = "schedules";
pub(super) const RUNS: &str = "schedule_runs";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleStatus {
    Active,
    Paused,
    /// Past `end_at`: never fires again.
    Retired,
}

/// A recurring campaign.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub start_at: Option<DateTime>,
    pub end_at: Option<DateTime>,
    pub event_type: String,
    pub priority: Priority,
    pub recipients: RecipientsDoc,
    pub channels: Option<Vec<Channel>>,
    pub payload: Document,
    pub misfire_policy: MisfirePolicy,
    /// `None`: the event type's configured category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Category>,
    pub status: ScheduleStatus,
    /// The slot to fire next (indexed with `status`); `None` once retired.
    pub next_fire_at: Option<DateTime>,
    pub last_fire_at: Option<DateTime>,
    pub fire_count: i64,
    /// The seed-format event that created it, for de-duplication. Absent (not null)
    /// otherwise: the unique index is sparse, and a sparse index still indexes nulls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// One claimed slot (unique per schedule and fire time) or a record of skipped slots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub schedule_id: String,
    pub fire_time: DateTime,
    pub kind: RunKind,
    /// Slots this run stands for.
    pub slots: i32,
    pub claimed_at: DateTime,
    /// `claimed_at - fire_time`.
    pub lag_ms: i64,
    pub notification_id: Option<String>,
    /// Why nothing was sent (`empty_audience`, `misfire_skipped`).
    pub reason: Option<String>,
    pub instance: String,
}

/// A run to record, with the notification it sends (if any).
pub struct RunWrite {
    pub run: RunDoc,
    pub send: Option<(NotificationDoc, OutboxDoc)>,
}

/// How a claim attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Fired,
    /// Another instance advanced the schedule first (or it was paused/deleted).
    LostRace,
    /// A run for one of these slots already exists (e.g. a resume recomputed a fired slot).
    SlotTaken,
}

#[derive(Debug)]
struct LostRace;

impl std::fmt::Display for LostRace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("schedule advanced by another instance")
    }
}

impl std::error::Error for LostRace {}

impl Store {
    fn schedules(&self) -> Collection<ScheduleDoc> {
        self.db.collection(SCHEDULES)
    }
    fn runs(&self) -> Collection<RunDoc> {
        self.db.collection(RUNS)
    }

    pub(super) async fn index_schedules(&self) -> anyhow::Result<()> {
        use mongodb::options::IndexOptions;
        use mongodb::IndexModel;
        let model = |keys: Document, name: &str, unique: bool, sparse: bool| {
            IndexModel::builder()
                .keys(keys)
                .options(
                    IndexOptions::builder()
                        .name(name.to_owned())
                        .unique(unique)
                        .sparse(sparse)
                        .build(),
                )
                .build()
        };
        self.schedules()
            .create_indexes([
                model(
                    doc! {"status": 1, "next_fire_at": 1},
                    "status_next_fire",
                    false,
                    false,
                ),
                model(doc! {"event_id": 1}, "event_id_unique", true, true),
            ])
            .await?;
        self.runs()
            .create_indexes([
                model(
                    doc! {"schedule_id": 1, "fire_time": 1},
                    "schedule_slot_unique",
                    true,
                    false,
                ),
                model(
                    doc! {"schedule_id": 1, "claimed_at": -1},
                    "schedule_claimed",
                    false,
                    false,
                ),
            ])
            .await?;
        Ok(())
    }

    /// Stores a new schedule; a repeated seed-format event id returns the original.
    pub async fn insert_schedule(&self, s: &ScheduleDoc) -> anyhow::Result<Option<ScheduleDoc>> {
        match self.schedules().insert_one(s).await {
            Ok(_) => Ok(None),
            Err(e) if is_duplicate_key(&e) && s.event_id.is_some() => {
                let original = self
                    .schedules()
                    .find_one(doc! {"event_id": &s.event_id})
                    .await?;
                Ok(original)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn schedule_by_event_id(
        &self,
        event_id: &str,
    ) -> anyhow::Result<Option<ScheduleDoc>> {
        Ok(self
            .schedules()
            .find_one(doc! {"event_id": event_id})
            .await?)
    }

    pub async fn get_schedule(&self, id: &str) -> anyhow::Result<Option<ScheduleDoc>> {
        Ok(self.schedules().find_one(doc! {"_id": id}).await?)
    }

    /// Schedules, newest first, optionally of one status.
    pub async fn list_schedules(
        &self,
        status: Option<ScheduleStatus>,
        limit: i64,
    ) -> anyhow::Result<Vec<ScheduleDoc>> {
        let filter = match status {
            Some(s) => doc! {"status": bson::to_bson(&s)?},
            None => doc! {},
        };
        Ok(self
            .schedules()
            .find(filter)
            .sort(doc! {"created_at": -1, "_id": -1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// Replaces a schedule's definition (PATCH, pause, resume); returns the stored result.
    pub async fn replace_schedule(&self, s: &ScheduleDoc) -> anyhow::Result<Option<ScheduleDoc>> {
        let mut set = bson::to_document(s)?;
        set.remove("_id");
        set.remove("created_at");
        set.remove("fire_count");
        set.remove("last_fire_at");
        set.insert("updated_at", now());
        Ok(self
            .schedules()
            .find_one_and_update(doc! {"_id": &s.id}, doc! {"$set": set})
            .return_document(ReturnDocument::After)
            .await?)
    }

    /// Pauses, resumes or retires a schedule.
    pub async fn set_schedule_state(
        &self,
        id: &str,
        status: ScheduleStatus,
        next_fire_at: Option<DateTime>,
    ) -> anyhow::Result<Option<ScheduleDoc>> {
        Ok(self
            .schedules()
            .find_one_and_update(
                doc! {"_id": id},
                doc! {"$set": {"status": bson::to_bson(&status)?, "next_fire_at": next_fire_at,
                "updated_at": now()}},
            )
            .return_document(ReturnDocument::After)
            .await?)
    }

    pub async fn delete_schedule(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .schedules()
            .delete_one(doc! {"_id": id})
            .await?
            .deleted_count
            > 0)
    }

    /// Active schedules whose slot has come, oldest slot first.
    pub async fn due_schedules(
        &self,
        now: DateTime,
        limit: i64,
    ) -> anyhow::Result<Vec<ScheduleDoc>> {
        Ok(self
            .schedules()
            .find(doc! {"status": "active", "next_fire_at": {"$lte": now}})
            .sort(doc! {"next_fire_at": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// The earliest slot any active schedule waits for.
    pub async fn next_slot(&self) -> anyhow::Result<Option<DateTime>> {
        let s = self
            .schedules()
            .clone_with_type::<Document>()
            .find_one(doc! {"status": "active", "next_fire_at": {"$ne": null}})
            .sort(doc! {"next_fire_at": 1})
            .projection(doc! {"next_fire_at": 1})
            .await?;
        Ok(s.and_then(|d| d.get_datetime("next_fire_at").ok().copied()))
    }

    /// Claims the slots of a due schedule in ONE transaction: advances `next_fire_at` (only
    /// if it still is `due`), inserts the run records (unique per slot) and the
    /// notifications with their outbox entries. Exactly one instance wins a slot.
    pub async fn claim_slots(
        &self,
        schedule_id: &str,
        due: DateTime,
        next: Option<DateTime>,
        runs: &[RunWrite],
    ) -> anyhow::Result<Claim> {
        let fired = runs.iter().filter(|r| r.send.is_some()).count() as i64;
        let last_fire = runs.iter().map(|r| r.run.fire_time).max();
        let mut session = self.client.start_session().await?;
        let result = session
            .start_transaction()
            .and_run(
                (
                    self.schedules(),
                    self.runs(),
                    self.notifications(),
                    self.outbox(),
                    runs,
                ),
                |s, (schedules, runs_coll, notifications, outbox, runs)| {
                    async move {
                        let mut set = doc! {"next_fire_at": next, "updated_at": now()};
                        if next.is_none() {
                            set.insert("status", "retired");
                        }
                        if let Some(t) = last_fire {
                            set.insert("last_fire_at", t);
                        }
                        let r = schedules
                            .update_one(
                                doc! {"_id": schedule_id, "status": "active", "next_fire_at": due},
                                doc! {"$set": set, "$inc": {"fire_count": fired}},
                            )
                            .session(&mut *s)
                            .await?;
                        if r.matched_count == 0 {
                            return Err(mongodb::error::Error::custom(LostRace));
                        }
                        for w in runs.iter() {
                            runs_coll.insert_one(&w.run).session(&mut *s).await?;
                            if let Some((n, o)) = &w.send {
                                notifications.insert_one(n).session(&mut *s).await?;
                                outbox.insert_one(o).session(&mut *s).await?;
                            }
                        }
                        Ok(())
                    }
                    .boxed()
                },
            )
            .await;
        match result {
            Ok(()) => Ok(Claim::Fired),
            Err(e) if e.get_custom::<LostRace>().is_some() => Ok(Claim::LostRace),
            Err(e) if is_duplicate_key(&e) => Ok(Claim::SlotTaken),
            Err(e) => Err(anyhow::Error::new(e).context("claiming schedule slots")),
        }
    }

    /// Moves a schedule past slots that already have runs, without firing them again.
    pub async fn advance_schedule(
        &self,
        schedule_id: &str,
        due: DateTime,
        next: Option<DateTime>,
    ) -> anyhow::Result<()> {
        let mut set = doc! {"next_fire_at": next, "updated_at": now()};
        if next.is_none() {
            set.insert("status", "retired");
        }
        self.schedules()
            .update_one(
                doc! {"_id": schedule_id, "next_fire_at": due},
                doc! {"$set": set},
            )
            .await?;
        Ok(())
    }

    /// Records a manual run and its notification in one transaction (the schedule's
    /// own slots are untouched).
    pub async fn record_manual_run(&self, w: &RunWrite) -> anyhow::Result<()> {
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .and_run(
                (self.runs(), self.notifications(), self.outbox(), w),
                |s, (runs, notifications, outbox, w)| {
                    async move {
                        runs.insert_one(&w.run).session(&mut *s).await?;
                        if let Some((n, o)) = &w.send {
                            notifications.insert_one(n).session(&mut *s).await?;
                            outbox.insert_one(o).session(&mut *s).await?;
                        }
                        Ok(())
                    }
                    .boxed()
                },
            )
            .await?;
        Ok(())
    }

    /// A schedule's runs, newest slot first.
    pub async fn list_runs(&self, schedule_id: &str, limit: i64) -> anyhow::Result<Vec<RunDoc>> {
        Ok(self
            .runs()
            .find(doc! {"schedule_id": schedule_id})
            .sort(doc! {"fire_time": -1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// Notifications by id (for run history), in one query.
    pub async fn notifications_by_ids(
        &self,
        ids: &[String],
    ) -> anyhow::Result<Vec<NotificationDoc>> {
        let found: Vec<NotificationDoc> = self
            .notifications()
            .find(doc! {"_id": {"$in": ids}})
            .await?
            .try_collect()
            .await?;
        let mut out = Vec::with_capacity(found.len());
        for n in found {
            out.extend(self.with_progress(Some(n)).await?);
        }
        Ok(out)
    }
}
