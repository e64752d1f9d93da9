//! Notifications: the group commit that accepts events (notification + outbox entry in
//! one transaction), dispatch progress, and finishing a notification when nothing is pending.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{self, doc, DateTime, Document};
use mongodb::options::ReturnDocument;

use super::documents::{Counts, NotificationDoc, OutboxDoc};
use super::stats;
use super::txn::{
    commit_or_abort, conflict_retried, conflict_retried_for, conflicted, is_duplicate_key,
    ACCEPT_CONFLICT_TRIES,
};
use super::webhook_messages::{iso, HookEvent};
use super::{expires, ids_found, now, Store};
use crate::domain::{NotificationStatus, Priority};

/// The result of accepting an event.
#[derive(Debug)]
pub enum Accepted {
    New(Box<NotificationDoc>),
    /// The event id was seen before: the original notification.
    Duplicate(Box<NotificationDoc>),
}

/// What a group commit did: each request's answer in order, and the outbox entries it
/// wrote for the new notifications.
pub struct Intaken {
    pub answers: Vec<anyhow::Result<Accepted>>,
    pub outbox: Vec<OutboxDoc>,
}

/// Folds the dispatch entries already leased to a relay (handed off: due now, no delay)
/// into one entry per lane, so that a group commit writes, and the relay removes, one
/// outbox entry per lane instead of one per event. The relay publishes the entry as one
/// `DispatchMany` job and removes it once RabbitMQ confirmed it.
fn bundled<'a>(entries: impl Iterator<Item = &'a OutboxDoc>) -> Vec<OutboxDoc> {
    let mut out: Vec<OutboxDoc> = Vec::new();
    let mut heads: HashMap<Priority, usize> = HashMap::new();
    for e in entries {
        let foldable = e.delivery_id.is_none() && e.delay_ms == 0 && e.lease_token.is_some();
        match heads.get(&e.lane) {
            Some(&i) if foldable && out[i].lease_token == e.lease_token => {
                let head = &mut out[i];
                head.due_at = head.due_at.min(e.due_at);
                head.also.push(e.notification_id.clone());
            }
            _ => {
                if foldable {
                    heads.insert(e.lane, out.len());
                }
                out.push(e.clone());
            }
        }
    }
    out
}

/// `n` with a running fan-out's `progress` counted in (nothing once the fan-out is done:
/// its counts have moved onto the notification).
fn add_progress(mut n: NotificationDoc, progress: Option<&Document>) -> NotificationDoc {
    if let (false, Some(p)) = (n.fanout_done, progress) {
        n.counts.total += stats::number(p.get("total"));
        n.counts.queued += stats::number(p.get("queued"));
    }
    n
}

impl Store {
    pub async fn find_notification_by_event_id(
        &self,
        event_id: &str,
    ) -> anyhow::Result<Option<NotificationDoc>> {
        let found = self
            .notifications()
            .find_one(doc! {"event_id": event_id})
            .await?;
        self.with_progress(found).await
    }

    pub async fn get_notification(&self, id: &str) -> anyhow::Result<Option<NotificationDoc>> {
        // The progress first: if the fan-out ends in between, the notification read next
        // already holds the moved counts and says `fanout_done`, so nothing is counted
        // twice or missed.
        let progress = self.fanout_progress().find_one(doc! {"_id": id}).await?;
        let found = self.notifications().find_one(doc! {"_id": id}).await?;
        Ok(found.map(|n| add_progress(n, progress.as_ref())))
    }

    /// A notification's counts as readers see them: while its fan-out runs, the deliveries
    /// it has written so far are counted on a document of their own (see
    /// [`Store::mark_fanout_done`]) and added here. Read after the notification, a fan-out
    /// that ends in between is missed for this one read ([`Store::get_notification`],
    /// which decisions rely on, reads the other way round).
    pub(crate) async fn with_progress(
        &self,
        n: Option<NotificationDoc>,
    ) -> anyhow::Result<Option<NotificationDoc>> {
        let Some(n) = n else { return Ok(None) };
        if n.fanout_done {
            return Ok(Some(n));
        }
        let progress = self.fanout_progress().find_one(doc! {"_id": &n.id}).await?;
        Ok(Some(add_progress(n, progress.as_ref())))
    }

    /// Accepts many notifications in one transaction (concurrent requests' group commit),
    /// answering each on its own; its immediate dispatches share outbox entries
    /// ([`bundled`]). If an event id is taken, or held by another transaction, the batch
    /// falls back to one transaction per notification so that each one learns its own
    /// answer and one held id does not hold up the others.
    pub async fn accept_many(
        &self,
        batch: Vec<(NotificationDoc, OutboxDoc)>,
    ) -> anyhow::Result<Intaken> {
        if batch.len() > 1 {
            let entries = bundled(batch.iter().map(|(_, o)| o));
            let notifications = batch.iter().map(|(n, _)| n);
            match self.insert_accepted(notifications, &entries).await {
                Ok(()) => {
                    return Ok(Intaken {
                        answers: batch
                            .into_iter()
                            .map(|(n, _)| Ok(Accepted::New(Box::new(n))))
                            .collect(),
                        outbox: entries,
                    })
                }
                Err(e) if is_duplicate_key(&e) || conflicted(&e) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("accepting notifications")),
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut outbox = Vec::new();
        for (n, o) in batch {
            let answer = self.accept(n, o.clone()).await;
            if matches!(answer, Ok(Accepted::New(_))) {
                outbox.push(o);
            }
            answers.push(answer);
        }
        Ok(Intaken { answers, outbox })
    }

    /// Accepts one notification (its outbox entry in the same transaction); an event id
    /// already taken answers with the original. An event id held by another transaction
    /// (the same event accepted at the same moment elsewhere, or by a process that died
    /// mid-transaction, until the server ends that transaction) is tried again only
    /// briefly, then answered as a failure of the moment: the driver's own retry would
    /// hold the request, and with it the whole intake, for as long as the other
    /// transaction lives.
    pub async fn accept(
        &self,
        notification: NotificationDoc,
        outbox: OutboxDoc,
    ) -> anyhow::Result<Accepted> {
        let result = conflict_retried_for(ACCEPT_CONFLICT_TRIES, Duration::ZERO, || async {
            let entries = std::slice::from_ref(&outbox);
            Ok(self.insert_accepted([&notification], entries).await?)
        })
        .await;
        match result {
            Ok(()) => Ok(Accepted::New(Box::new(notification))),
            Err(e)
                if e.chain()
                    .filter_map(|c| c.downcast_ref::<mongodb::error::Error>())
                    .any(is_duplicate_key) =>
            {
                let existing = self
                    .find_notification_by_event_id(&notification.event_id)
                    .await?
                    .context("event id conflicted but the original is gone")?;
                Ok(Accepted::Duplicate(Box::new(existing)))
            }
            Err(e) => Err(e.context("accepting a notification")),
        }
    }

    /// Inserts notifications and their outbox entries in one transaction, tried once
    /// (see [`commit_or_abort`]).
    async fn insert_accepted<'a>(
        &self,
        notifications: impl IntoIterator<Item = &'a NotificationDoc> + Send,
        entries: &[OutboxDoc],
    ) -> mongodb::error::Result<()> {
        let mut session = self.client.start_session().await?;
        session.start_transaction().await?;
        let written = async {
            self.notifications()
                .insert_many(notifications)
                .session(&mut session)
                .await?;
            self.outbox()
                .insert_many(entries)
                .session(&mut session)
                .await?;
            Ok(())
        }
        .await;
        commit_or_abort(&mut session, written).await
    }

    /// Moves an accepted notification to `dispatching` (idempotent).
    pub async fn mark_dispatching(&self, id: &str) -> anyhow::Result<()> {
        self.notifications()
            .update_one(
                doc! {"_id": id, "status": {"$in": ["accepted", "scheduled"]}},
                doc! {"$set": {"status": "dispatching", "updated_at": now()}},
            )
            .await?;
        Ok(())
    }

    /// Records that every recipient now has a delivery, then finishes the notification if
    /// it can. The fan-out's counts move onto the notification in the same transaction:
    /// while it ran they were kept apart, since outcome commits change the notification's
    /// counts all the time and two transactions writing one document conflict.
    pub async fn mark_fanout_done(&self, id: &str) -> anyhow::Result<()> {
        conflict_retried(|| async {
            let mut session = self.client.start_session().await?;
            session
                .start_transaction()
                .and_run(
                    (self.notifications(), self.fanout_progress(), id),
                    |s, (notifications, progress, id)| {
                        async move {
                            let found = progress
                                .find_one_and_delete(doc! {"_id": &**id})
                                .session(&mut *s)
                                .await?;
                            let mut update =
                                doc! {"$set": {"fanout_done": true, "updated_at": now()}};
                            if let Some(p) = found {
                                update.insert(
                                    "$inc",
                                    doc! {"counts.total": stats::number(p.get("total")),
                                    "counts.queued": stats::number(p.get("queued"))},
                                );
                            }
                            notifications
                                .update_one(doc! {"_id": &**id}, update)
                                .session(&mut *s)
                                .await?;
                            Ok(())
                        }
                        .boxed()
                    },
                )
                .await
                .context("ending a fan-out")
        })
        .await?;
        self.finalize_notification(id).await
    }

    /// Notifications still `dispatching` though their fan-out is done and nothing is
    /// pending, untouched since `cutoff`: the process that would have finished them
    /// stopped in between (at most `limit` ids).
    pub async fn unfinished_notifications(
        &self,
        cutoff: DateTime,
        limit: i64,
    ) -> anyhow::Result<Vec<String>> {
        let notifications = self.notifications().clone_with_type::<Document>();
        ids_found(
            notifications
                .find(
                    doc! {"status": "dispatching", "updated_at": {"$lt": cutoff},
                    "fanout_done": true, "counts.queued": 0, "counts.retrying": 0,
                    "counts.deferred": 0},
                )
                .limit(limit),
        )
        .await
    }

    /// Notifications whose fan-out has not finished and that nothing has touched since
    /// `cutoff` (a fan-out batch touches its progress document): their dispatch job was
    /// lost (at most `limit`, with their lanes). Dispatch is idempotent, so running it
    /// again is safe.
    pub async fn undispatched_notifications(
        &self,
        cutoff: DateTime,
        limit: i64,
    ) -> anyhow::Result<Vec<(String, Priority)>> {
        let found: Vec<NotificationDoc> = self
            .notifications()
            .find(doc! {"status": {"$in": ["accepted", "dispatching"]},
            "updated_at": {"$lt": cutoff}, "fanout_done": {"$ne": true}})
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = found.iter().map(|n| n.id.as_str()).collect();
        let running: HashSet<String> = ids_found(
            self.fanout_progress()
                .find(doc! {"_id": {"$in": ids}, "updated_at": {"$gte": cutoff}}),
        )
        .await?;
        Ok(found
            .into_iter()
            .filter(|n| !running.contains(&n.id))
            .map(|n| (n.id, n.priority))
            .collect())
    }

    /// Sets the final status once nothing is pending; guarded so it can run any number of times.
    pub async fn finalize_notification(&self, id: &str) -> anyhow::Result<()> {
        let Some(n) = self.get_notification(id).await? else {
            return Ok(());
        };
        if !n.fanout_done || n.counts.pending() > 0 || n.status != NotificationStatus::Dispatching {
            return Ok(());
        }
        let c = n.counts;
        let status = if c.failed + c.dead + c.bounced + c.undelivered == 0 {
            "completed"
        } else if c.sent + c.delivered > 0 || c.skipped > 0 {
            "partially_failed"
        } else {
            "failed"
        };
        let filter = doc! {"_id": id, "status": "dispatching", "fanout_done": true,
        "counts.queued": 0, "counts.retrying": 0, "counts.deferred": 0};
        let at = now();
        let update = doc! {"$set": {"status": status, "updated_at": at,
        "expire_at": expires(self.retention.notification_days)}};
        const KIND: &str = "notification.completed";
        if !self.subscriptions().await?.wants(KIND) {
            self.notifications().update_one(filter, update).await?;
            return Ok(());
        }
        // With its `notification.completed` event, in one transaction (the counts as the
        // transaction reads them).
        let staged = conflict_retried(|| async {
            let mut session = self.client.start_session().await?;
            let staged = session
                .start_transaction()
                .and_run((&filter, &update), |s, (filter, update)| {
                    async move {
                        let Some(done) = self
                            .notifications()
                            .find_one_and_update((*filter).clone(), (*update).clone())
                            .return_document(ReturnDocument::After)
                            .session(&mut *s)
                            .await?
                        else {
                            return Ok(false);
                        };
                        self.stage_hooks_of(s, &[KIND], || vec![completed_event(&done, status, at)])
                            .await
                    }
                    .boxed()
                })
                .await?;
            Ok(staged)
        })
        .await?;
        self.staged_hooks(staged);
        Ok(())
    }
}

/// A finished notification's `notification.completed` event: its final status and counts.
fn completed_event(n: &NotificationDoc, status: &str, at: DateTime) -> HookEvent {
    let c = &n.counts;
    let mut data = serde_json::Map::new();
    data.insert("notification_id".into(), n.id.clone().into());
    data.insert("event_id".into(), n.event_id.clone().into());
    data.insert("event_type".into(), n.event_type.clone().into());
    data.insert("schedule_id".into(), n.schedule_id.clone().into());
    data.insert("status".into(), status.into());
    data.insert(
        "counts".into(),
        serde_json::json!({
            "total": c.total, "sent": c.sent, "delivered": c.delivered, "failed": c.failed,
            "dead": c.dead, "skipped": c.skipped, "bounced": c.bounced,
            "undelivered": c.undelivered,
        }),
    );
    data.insert("created_at".into(), iso(n.created_at));
    data.insert("updated_at".into(), iso(at));
    HookEvent {
        kind: "notification.completed",
        at,
        delivery_id: None,
        data,
        contact: serde_json::Map::new(),
    }
}

/// Whether a notification (status, fan-out flag and counts, as just written) has nothing
/// left pending, so [`Store::finalize_notification`] may give it its final status. A
/// fan-out marked done after this write finalizes on its own.
pub(super) fn may_finish(n: &Document) -> bool {
    let counts: Counts = n
        .get_document("counts")
        .ok()
        .and_then(|c| bson::from_document(c.clone()).ok())
        .unwrap_or_default();
    n.get_str("status") == Ok("dispatching")
        && n.get_bool("fanout_done") == Ok(true)
        && counts.pending() == 0
}
