//! Outcomes: a batch of deliveries' statuses, attempts and counters, committed in one transaction.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use futures::FutureExt;
use mongodb::bson::{self, doc, DateTime, Document};
use mongodb::options::{InsertOneModel, ReturnDocument, WriteModel};
use mongodb::ClientSession;

use super::documents::{AttemptDoc, DeliveryDoc, OutboxDoc};
use super::notifications::may_finish;
use super::stats;
use super::stats::StatMoves;
use super::status_writes::{status_write_models, Guard, StatusWrite};
use super::txn::conflict_retried;
use super::webhook_messages::HookEvent;
use super::{bson_time, chrono_time, now, Store};
use crate::config::RetentionSettings;
use crate::domain::{DeliveryStatus, Priority};

/// What must hold for an outcome to be written.
#[derive(Debug, Clone)]
pub enum Precondition {
    /// Decided before any provider call: the delivery must still be waiting.
    Unclaimed,
    /// After a provider call: the delivery must still carry this attempt's claim.
    Claimed { attempt_id: String },
    /// A chunk's delivery, written once with its outcome: it must have no record yet
    /// (this is the record, still `queued`).
    Unwritten(Box<DeliveryDoc>),
}

/// A delivery's outcome, committed with its attempt and the notification counters.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub delivery_id: String,
    pub notification_id: String,
    pub channel: crate::domain::Channel,
    pub precondition: Precondition,
    pub status: DeliveryStatus,
    pub reason: Option<String>,
    pub provider: Option<String>,
    pub attempt: Option<AttemptDoc>,
    /// For `retrying`: when and through which delay queue the next attempt comes.
    pub retry: Option<Retry>,
    /// A `sent` in-app delivery's inbox item, written with the outcome.
    pub inbox: Option<Box<super::inbox::InboxContent>>,
}

/// When a `retrying` or `deferred` delivery comes back.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Wait in a RabbitMQ delay queue this long (retry backoff).
    pub delay_ms: i64,
    /// The number of the coming attempt's retry (1 for the first retry).
    pub retry_number: i32,
    pub lane: Priority,
    /// Not published before this instant (the end of quiet hours).
    pub not_before: Option<DateTime>,
}

impl Store {
    /// Writes a batch of outcomes — each delivery's status and attempt, and every
    /// touched notification's counters once — in ONE transaction (retried on transient
    /// errors), then finishes notifications that have nothing pending. Returns, per
    /// outcome, whether it was written (false: its precondition no longer held).
    /// `lane` is the priority lane whose committer writes the batch; the batch is counted
    /// on that lane's rollup documents (see [`stats::StatMoves::sharded`]), so the lanes'
    /// commits do not conflict on them.
    pub async fn commit_outcomes(
        &self,
        outcomes: &[Outcome],
        lane: Priority,
    ) -> anyhow::Result<Vec<bool>> {
        conflict_retried(|| self.commit_outcomes_once(outcomes, lane)).await
    }

    /// One try of the outcome transaction: read the batch's deliveries, decide each
    /// outcome against that snapshot, write the statuses in one bulk write, then what the
    /// applied outcomes bring along (outbox entries, dead letters, statistics) and every
    /// touched notification's counters once.
    async fn commit_outcomes_once(
        &self,
        outcomes: &[Outcome],
        lane: Priority,
    ) -> anyhow::Result<Vec<bool>> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut session = self.client.start_session().await?;
        let (finished, applied, staged): (Vec<String>, Vec<bool>, bool) = session
            .start_transaction()
            .and_run((self, outcomes), |s, (store, outcomes)| {
                async move {
                    // The transaction's snapshot of every delivery in the batch: a
                    // concurrent change to one of them makes the writes below conflict
                    // (and the whole transaction retry), so what is decided here holds.
                    let ids: Vec<&str> = outcomes.iter().map(|o| o.delivery_id.as_str()).collect();
                    let mut current: HashMap<String, DeliveryDoc> = store
                        .deliveries_in(s, doc! {"_id": {"$in": &ids}})
                        .await?
                        .into_iter()
                        .map(|d| (d.id.clone(), d))
                        .collect();
                    // One instant for the whole batch, so that equal outcomes write
                    // equal fields and share one update.
                    let now = now();
                    let (writes, inserts, plans) =
                        plan_writes(outcomes, &mut current, now, &store.retention)?;
                    store.write_statuses(s, writes, &inserts).await?;
                    let mut moves = StatMoves::sharded("commit", lane);
                    let mut counters = BTreeMap::new();
                    let mut applied = vec![false; outcomes.len()];
                    let subs = store.subscriptions().await?;
                    let mut events = Vec::new();
                    for (i, before) in plans {
                        applied[i] = true;
                        let o = &outcomes[i];
                        store.follow_up(s, o, &before, now).await?;
                        count_move(o, &before, now, &mut moves, &mut counters);
                        if let Some(kind) = HookEvent::kind_of(o.status).filter(|k| subs.wants(k)) {
                            events.push(status_event(kind, o, &before, now));
                        }
                    }
                    let staged = store.stage_hooks(s, &subs, &events).await?;
                    moves
                        .write(&store.db, s, store.retention.stats_days)
                        .await?;
                    let finished = store.move_counters(s, &counters, now).await?;
                    Ok((finished, applied, staged))
                }
                .boxed()
            })
            .await
            .context("committing delivery outcomes")?;
        self.staged_hooks(staged);
        for id in finished {
            self.finalize_notification(&id).await?;
        }
        Ok(applied)
    }

    /// Every status change of a batch, and the records written once with their outcome,
    /// in one round trip; equal changes as one update of many deliveries. Any delivery
    /// that no longer matches its guard fails the transaction (it is tried again on a
    /// fresh snapshot).
    async fn write_statuses(
        &self,
        s: &mut ClientSession,
        writes: Vec<StatusWrite<'_>>,
        inserts: &[DeliveryDoc],
    ) -> mongodb::error::Result<()> {
        if writes.is_empty() && inserts.is_empty() {
            return Ok(());
        }
        let namespace = self.deliveries().namespace();
        let (mut models, expected) = status_write_models(writes, namespace.clone());
        // After the updates, so the updates' result indexes stay theirs.
        for d in inserts {
            models.push(WriteModel::InsertOne(
                InsertOneModel::builder()
                    .namespace(namespace.clone())
                    .document(bson::to_document(d)?)
                    .build(),
            ));
        }
        let written = self
            .client
            .bulk_write(models)
            .verbose_results()
            .session(&mut *s)
            .await?;
        for (k, n) in expected.into_iter().enumerate() {
            let matched = written
                .update_results
                .get(&k)
                .map_or(0, |u| u.matched_count);
            if matched != n {
                return Err(mongodb::error::Error::custom(
                    "a delivery changed inside its outcome transaction",
                ));
            }
        }
        Ok(())
    }

    /// What an applied outcome brings along in its transaction: a retry or deferral is
    /// published through the outbox (never lost); a delivery that failed for good is
    /// kept as a dead letter.
    async fn follow_up(
        &self,
        s: &mut ClientSession,
        o: &Outcome,
        before: &DeliveryDoc,
        now: DateTime,
    ) -> mongodb::error::Result<()> {
        if let (DeliveryStatus::Retrying | DeliveryStatus::Deferred, Some(r)) = (o.status, o.retry)
        {
            self.outbox()
                .insert_one(OutboxDoc {
                    id: uuid::Uuid::now_v7().to_string(),
                    notification_id: o.notification_id.clone(),
                    delivery_id: Some(o.delivery_id.clone()),
                    delay_ms: r.delay_ms,
                    attempt: r.retry_number,
                    lane: r.lane,
                    due_at: r.not_before.unwrap_or(now),
                    lease_until: now,
                    lease_token: None,
                    created_at: now,
                    also: Vec::new(),
                })
                .session(&mut *s)
                .await?;
        }
        if let (DeliveryStatus::Sent, Some(content)) = (o.status, &o.inbox) {
            self.write_inbox_item(s, before, content, now).await?;
        }
        if matches!(o.status, DeliveryStatus::Failed | DeliveryStatus::Dead) {
            Store::write_dead_letter(
                &self.dead_letter_collection(),
                s,
                before,
                o,
                self.retention.dead_letter_days,
            )
            .await?;
        }
        Ok(())
    }

    /// Moves each touched notification's counters once; returns the notifications this
    /// commit may have finished, told by the counter write itself (no read after it).
    async fn move_counters(
        &self,
        s: &mut ClientSession,
        counters: &Counters,
        now: DateTime,
    ) -> mongodb::error::Result<Vec<String>> {
        let mut finished = Vec::new();
        for (id, deltas) in counters {
            let mut inc = Document::new();
            for (name, delta) in deltas {
                if *delta != 0 {
                    inc.insert(format!("counts.{name}"), *delta);
                }
            }
            if inc.is_empty() {
                continue;
            }
            let after = self
                .notifications()
                .clone_with_type::<Document>()
                .find_one_and_update(
                    doc! {"_id": id},
                    doc! {"$inc": inc, "$set": {"updated_at": now}},
                )
                .projection(doc! {"status": 1, "fanout_done": 1, "counts": 1})
                .return_document(ReturnDocument::After)
                .session(&mut *s)
                .await?;
            if after.as_ref().is_some_and(may_finish) {
                finished.push(id.clone());
            }
        }
        Ok(finished)
    }
}

/// The outcomes a batch applies: each one's index, and its delivery as it was before.
type Applied = Vec<(usize, DeliveryDoc)>;

/// Counter changes per notification: counter name -> delta.
type Counters = BTreeMap<String, BTreeMap<&'static str, i64>>;

/// What must hold of a delivery, as the transaction read it, for `o` to be written;
/// `None`: the outcome no longer applies (another attempt holds it, or it is final).
fn guard_for(o: &Outcome, state: &DeliveryDoc) -> Option<Guard> {
    let waiting = matches!(
        state.status,
        DeliveryStatus::Queued | DeliveryStatus::Retrying | DeliveryStatus::Deferred
    );
    match &o.precondition {
        Precondition::Unclaimed => waiting.then_some(Guard::Waiting),
        Precondition::Unwritten(_) => None,
        Precondition::Claimed { attempt_id } => match &state.claim {
            Some(c) => (&c.attempt_id == attempt_id).then(|| Guard::Claim(attempt_id.clone())),
            // Unclaimed although this attempt claimed it: the database lost the claim's
            // acknowledged write (a crash). The send happened, so its outcome counts.
            None if waiting => {
                tracing::warn!(delivery_id = %o.delivery_id, "the delivery's claim was lost by the database; recording the outcome anyway");
                Some(Guard::LostClaim(state.status))
            }
            None => None,
        },
    }
}

/// Decides each outcome against the transaction's snapshot (`current`, updated as it
/// goes, so a later outcome for the same delivery sees an earlier one's effect): the
/// status writes, and for each applied outcome its index and the delivery as it was.
fn plan_writes<'a>(
    outcomes: &'a [Outcome],
    current: &mut HashMap<String, DeliveryDoc>,
    now: DateTime,
    retention: &RetentionSettings,
) -> mongodb::error::Result<(Vec<StatusWrite<'a>>, Vec<DeliveryDoc>, Applied)> {
    let mut writes = Vec::new();
    let mut plans = Vec::new();
    let mut inserts = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        if let Precondition::Unwritten(queued) = &o.precondition {
            // Written by an earlier try, or resolved as unknown meanwhile: not again.
            if current.contains_key(&o.delivery_id) {
                continue;
            }
            let record = written_with(queued, o, now, retention)?;
            plans.push((i, (**queued).clone()));
            current.insert(o.delivery_id.clone(), record.clone());
            inserts.push(record);
            continue;
        }
        let Some(state) = current.get_mut(&o.delivery_id) else {
            continue;
        };
        let Some(guard) = guard_for(o, state) else {
            continue;
        };
        let mut set = doc! {
            "status": o.status.as_str(),
            "reason": o.reason.as_deref(),
            "updated_at": now,
        };
        if let Some(p) = &o.provider {
            set.insert("provider", p);
        }
        if o.status == DeliveryStatus::Sent {
            set.insert("sent_at", now);
        }
        let expire_at = retention.delivery_expiry(o.status, chrono_time(now));
        if let Some(at) = expire_at {
            set.insert("expire_at", bson_time(at));
        }
        let attempt = match &o.attempt {
            Some(a) => {
                set.insert("last_error", a.error.as_deref());
                Some(bson::to_bson(a).map_err(mongodb::error::Error::custom)?)
            }
            None => None,
        };
        writes.push(StatusWrite {
            id: o.delivery_id.as_str(),
            guard,
            set,
            unset_expiry: expire_at.is_none(),
            attempt,
        });
        plans.push((i, state.clone()));
        state.status = o.status;
        if let Some(p) = &o.provider {
            state.provider = Some(p.clone());
        }
    }
    Ok((writes, inserts, plans))
}

/// A chunk's delivery as first written: `queued` with `o` applied.
fn written_with(
    queued: &DeliveryDoc,
    o: &Outcome,
    now: DateTime,
    retention: &RetentionSettings,
) -> mongodb::error::Result<DeliveryDoc> {
    let mut d = queued.clone();
    d.status = o.status;
    d.reason = o.reason.clone();
    if let Some(p) = &o.provider {
        d.provider = Some(p.clone());
    }
    if o.status == DeliveryStatus::Sent {
        d.sent_at = Some(now);
    }
    d.updated_at = now;
    d.expire_at = retention
        .delivery_expiry(o.status, chrono_time(now))
        .map(bson_time);
    if let Some(a) = &o.attempt {
        d.last_error = a.error.clone();
        d.attempt_count = 1;
        d.attempts = vec![a.clone()];
    }
    Ok(d)
}

/// The status webhook event of an applied outcome; the attempt's error and the
/// provider's answer (which may name the address) only for endpoints that opt in.
fn status_event(kind: &'static str, o: &Outcome, before: &DeliveryDoc, now: DateTime) -> HookEvent {
    let mut e = HookEvent::delivery(
        kind,
        before,
        o.status,
        o.reason.as_deref(),
        o.provider.as_deref(),
        now,
    );
    if let Some(a) = &o.attempt {
        e = e.with_contact("error", a.error.clone());
        if let Some(r) = &a.response {
            e = e.with_contact(
                "response",
                bson::Bson::Document(r.clone()).into_relaxed_extjson(),
            );
        }
    }
    e
}

/// An applied outcome's moves: -1 under the delivery's old (status, provider) in the
/// statistics and +1 under the new (with the accept-to-sent latency of a `sent`), and
/// its notification's counters from the old status to the new.
fn count_move(
    o: &Outcome,
    before: &DeliveryDoc,
    now: DateTime,
    moves: &mut StatMoves,
    counters: &mut Counters,
) {
    // A claimed delivery counts under the status it was claimed from.
    let from = match (before.status, &before.claim) {
        (DeliveryStatus::Sending, Some(c)) => c.from,
        (status, _) => status,
    };
    let to_provider = o.provider.as_deref().or(before.provider.as_deref());
    if from == o.status && to_provider == before.provider.as_deref() {
        return;
    }
    moves.add(before, from, before.provider.as_deref(), -1, None);
    let latency = (o.status == DeliveryStatus::Sent)
        .then(|| stats::latency_of(before, Some(now)))
        .flatten();
    moves.add(before, o.status, to_provider, 1, latency);
    if from == o.status {
        return;
    }
    let entry = counters.entry(o.notification_id.clone()).or_default();
    if let Some(old) = from.counter() {
        *entry.entry(old).or_default() -= 1;
    }
    if let Some(new) = o.status.counter() {
        *entry.entry(new).or_default() += 1;
    }
}
