//! Providers' feedback (delivered, bounced, complained…): each provider event kept once,
//! applied to its delivery with the counters and statistics in one transaction, and
//! suppressing the address when it calls for it. Feedback for no known message is kept
//! too, as unmatched, for operators to see.

use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{self, doc, DateTime, Document};
use mongodb::error::ErrorKind;
use mongodb::Collection;
use serde::{Deserialize, Serialize};

use super::documents::DeliveryDoc;
use super::stats::{Mark, StatMoves};
use super::suppressions::{SuppressionDoc, SuppressionReason};
use super::txn::conflict_retried;
use super::webhook_messages::{iso, HookEvent};
use super::{bson_time, chrono_time, Store};
use crate::domain::{DeliveryStatus, Priority};

pub const FEEDBACK: &str = "feedback";

/// What a provider reported about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackKind {
    /// It reached the recipient's server, phone or device.
    Delivered,
    /// Refused for good (a hard bounce).
    Bounced,
    /// Refused for now (a soft bounce, a delay): recorded, no status change.
    Deferred,
    /// The carrier or service could not deliver it.
    Undelivered,
    /// The recipient marked it as spam.
    Complained,
}

impl FeedbackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Bounced => "bounced",
            Self::Deferred => "deferred",
            Self::Undelivered => "undelivered",
            Self::Complained => "complained",
        }
    }
}

/// How feedback names its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedbackTarget {
    /// herald's delivery id (a VERP return path, or herald's own Message-ID).
    Delivery(String),
    /// The id the provider gave the message (Twilio's sid, SES's message id…).
    MessageId(String),
}

/// One provider event, mapped.
#[derive(Debug, Clone)]
pub struct Feedback {
    /// `twilio`, `ses`, `dsn`, `postmark`…
    pub provider: String,
    /// The provider's id for this event: a replay carries the same one.
    pub event_id: String,
    pub kind: FeedbackKind,
    pub target: FeedbackTarget,
    /// The recipient address the event names, if it names one.
    pub address: Option<String>,
    /// The provider's code or diagnostic.
    pub detail: Option<String>,
    /// The suppression the event calls for (with `address`).
    pub suppress: Option<SuppressionReason>,
}

/// A feedback event as kept (`_id`: provider and event id, so each is applied once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedbackDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub provider: String,
    pub event_id: String,
    pub kind: FeedbackKind,
    /// `None`: unmatched (no delivery has the message it names).
    pub delivery_id: Option<String>,
    /// The message id or delivery id the event named.
    pub target: String,
    pub address: Option<String>,
    pub detail: Option<String>,
    pub received_at: DateTime,
    /// The suppression the event calls for, applied with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress: Option<SuppressionReason>,
    /// Set while the event waits for its delivery (feedback can outrun the commit of the
    /// provider's answer): tried again until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_until: Option<DateTime>,
    /// While it waits: when it is tried next, backing off from two seconds to five
    /// minutes, so a few events that never match do not hold up the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_try: Option<DateTime>,
    #[serde(default)]
    pub tries: u32,
    /// Kept as long as failed deliveries (`retention.failed_days`), then removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<DateTime>,
}

/// How long feedback waits for its delivery to be committed before it stays unmatched.
const WAIT_FOR_DELIVERY_MS: i64 = 3_600_000;
/// The first pause before waiting feedback is tried again, doubled each try up to the most.
const FIRST_RETRY_MS: i64 = 2_000;
const MOST_RETRY_MS: i64 = 300_000;

/// When waiting feedback tried `tries` times is tried next.
fn next_try(now: DateTime, tries: u32) -> DateTime {
    let pause = FIRST_RETRY_MS
        .saturating_mul(1 << tries.min(20))
        .min(MOST_RETRY_MS);
    DateTime::from_millis(now.timestamp_millis() + pause)
}

impl FeedbackDoc {
    fn feedback(&self) -> Feedback {
        Feedback {
            provider: self.provider.clone(),
            event_id: self.event_id.clone(),
            kind: self.kind,
            target: FeedbackTarget::MessageId(self.target.clone()),
            address: self.address.clone(),
            detail: self.detail.clone(),
            suppress: self.suppress,
        }
    }
}

/// One feedback event on its delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackEntry {
    pub kind: FeedbackKind,
    pub provider: String,
    pub event_id: String,
    pub at: DateTime,
    pub detail: Option<String>,
}

/// What applying one feedback event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Recorded on its delivery; `Some` when the delivery's status changed to it.
    Recorded {
        delivery_id: String,
        /// The delivery's channel and provider.
        channel: &'static str,
        provider: Option<String>,
        status: Option<DeliveryStatus>,
    },
    /// This provider event was applied before: nothing changed.
    Duplicate,
    /// No delivery has the message it names (yet: feedback can outrun the commit of the
    /// provider's answer): kept as unmatched, and tried again for an hour.
    Unmatched,
    /// Its delivery is still being sent: applied once its outcome is committed.
    Pending { delivery_id: String },
}

/// Whether feedback of `kind` must wait for a delivery in `status`: one not yet handed
/// over cannot take a provider's status, but will once its outcome is committed.
fn must_wait(status: DeliveryStatus, kind: FeedbackKind) -> bool {
    use DeliveryStatus as S;
    matches!(status, S::Queued | S::Sending | S::Retrying | S::Deferred)
        && kind != FeedbackKind::Deferred
}

/// The status feedback moves a delivery to from `current`, if any. Order-independent: a
/// bounce after `delivered` wins; a late `delivered` never overwrites a bounce.
pub fn transition(current: DeliveryStatus, kind: FeedbackKind) -> Option<DeliveryStatus> {
    use DeliveryStatus as S;
    match (kind, current) {
        (FeedbackKind::Delivered, S::Sent) => Some(S::Delivered),
        (FeedbackKind::Bounced, S::Sent | S::Delivered) => Some(S::Bounced),
        (FeedbackKind::Undelivered, S::Sent | S::Delivered) => Some(S::Undelivered),
        _ => None,
    }
}

/// The reason a feedback status carries.
fn reason_of(status: DeliveryStatus) -> Option<&'static str> {
    match status {
        DeliveryStatus::Bounced => Some("hard_bounce"),
        DeliveryStatus::Undelivered => Some("undelivered"),
        _ => None,
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

impl Store {
    fn feedback(&self) -> Collection<FeedbackDoc> {
        self.db.collection(FEEDBACK)
    }

    pub(super) async fn index_feedback(&self) -> anyhow::Result<()> {
        let model = super::named_index;
        self.feedback()
            .create_indexes([
                model(
                    doc! {"delivery_id": 1, "received_at": -1},
                    "delivery_received",
                ),
                model(doc! {"received_at": -1}, "received_at"),
                model(doc! {"next_try": 1}, "next_try"),
                super::expiry_index(),
            ])
            .await?;
        Ok(())
    }

    /// The delivery a feedback event names, by delivery id or by provider message id.
    async fn feedback_delivery(&self, target: &FeedbackTarget) -> anyhow::Result<Option<String>> {
        let filter = match target {
            FeedbackTarget::Delivery(id) => doc! {"_id": id},
            FeedbackTarget::MessageId(id) => doc! {"attempts.response.message_id": id},
        };
        Ok(self
            .deliveries()
            .clone_with_type::<Document>()
            .find_one(filter)
            .projection(doc! {"_id": 1})
            .await?
            .and_then(|d| d.get_str("_id").ok().map(str::to_owned)))
    }

    /// Keeps a feedback event once and applies it to its delivery: the feedback entry,
    /// the status it moves to (with the notification's counters and the statistics), and
    /// the suppression it calls for — all in one transaction.
    pub async fn apply_feedback(&self, fb: &Feedback) -> anyhow::Result<Applied> {
        let delivery_id = self.feedback_delivery(&fb.target).await?;
        conflict_retried(|| self.apply_feedback_once(fb, delivery_id.as_deref())).await
    }

    async fn apply_feedback_once(
        &self,
        fb: &Feedback,
        delivery_id: Option<&str>,
    ) -> anyhow::Result<Applied> {
        let now = DateTime::now();
        let record = FeedbackDoc {
            id: format!("{}:{}", fb.provider, fb.event_id),
            provider: fb.provider.clone(),
            event_id: fb.event_id.clone(),
            kind: fb.kind,
            delivery_id: delivery_id.map(str::to_owned),
            target: match &fb.target {
                FeedbackTarget::Delivery(id) | FeedbackTarget::MessageId(id) => id.clone(),
            },
            address: fb.address.clone(),
            detail: fb.detail.clone(),
            received_at: now,
            suppress: fb.suppress,
            retry_until: None,
            next_try: None,
            tries: 0,
            expire_at: super::expires(self.retention.failed_days),
        };
        // Applied before: nothing to do. (A concurrent twin fails its insert below, and
        // its transaction with it; that error is the same answer.)
        if self
            .feedback()
            .find_one(doc! {"_id": &record.id})
            .await?
            .is_some()
        {
            return Ok(Applied::Duplicate);
        }
        let mut session = self.client.start_session().await?;
        let applied = session
            .start_transaction()
            .and_run((self, fb, record), |s, (store, fb, record)| {
                async move {
                    let delivery = match &record.delivery_id {
                        Some(id) => {
                            store
                                .deliveries()
                                .find_one(doc! {"_id": id})
                                .projection(doc! {"attempts": 0})
                                .session(&mut *s)
                                .await?
                        }
                        None => None,
                    };
                    // A message id may yet be recorded (its send is being committed); a
                    // delivery id that names no delivery never will be.
                    let waits = match &delivery {
                        Some(d) => must_wait(d.status, fb.kind),
                        None => matches!(fb.target, FeedbackTarget::MessageId(_)),
                    };
                    let mut record = record.clone();
                    if waits {
                        record.retry_until = Some(DateTime::from_millis(
                            now.timestamp_millis() + WAIT_FOR_DELIVERY_MS,
                        ));
                        record.next_try = Some(next_try(now, 0));
                    }
                    store
                        .feedback()
                        .insert_one(&record)
                        .session(&mut *s)
                        .await?;
                    match delivery {
                        None => Ok(Applied::Unmatched),
                        Some(d) if waits => Ok(Applied::Pending { delivery_id: d.id }),
                        Some(d) => store.apply_to(s, &d, fb, now).await,
                    }
                }
                .boxed()
            })
            .await;
        let applied = match applied {
            Err(e) if is_duplicate_key(&e) => Applied::Duplicate,
            other => other?,
        };
        if let Applied::Recorded {
            delivery_id,
            status: Some(_),
            ..
        } = &applied
        {
            tracing::debug!(%delivery_id, provider = %fb.provider, "feedback applied");
        }
        Ok(applied)
    }

    /// Applies `fb` to delivery `d` inside `s`'s transaction: its entry, the status it
    /// moves to, and the suppression it calls for.
    async fn apply_to(
        &self,
        s: &mut mongodb::ClientSession,
        d: &DeliveryDoc,
        fb: &Feedback,
        now: DateTime,
    ) -> mongodb::error::Result<Applied> {
        let status = transition(d.status, fb.kind);
        self.record_feedback(s, d, fb, status, now).await?;
        if let (Some(reason), Some(address)) = (fb.suppress, &fb.address) {
            let suppression = SuppressionDoc::new(
                d.channel,
                address,
                reason,
                Some(d.id.clone()),
                fb.detail.clone(),
            );
            self.suppress_in(s, &suppression).await?;
        }
        Ok(Applied::Recorded {
            delivery_id: d.id.clone(),
            channel: d.channel.as_str(),
            provider: d.provider.clone(),
            status,
        })
    }

    /// Tries again the feedback whose turn it is (up to `limit`), and lets what waited
    /// its hour stay as it is; what it applied, with the events.
    pub async fn retry_feedback(&self, limit: i64) -> anyhow::Result<Vec<(Feedback, Applied)>> {
        let now = DateTime::now();
        self.feedback()
            .update_many(
                doc! {"next_try": {"$lte": now}, "retry_until": {"$lt": now}},
                doc! {"$unset": {"retry_until": 1, "next_try": 1}},
            )
            .await?;
        let due: Vec<FeedbackDoc> = self
            .feedback()
            .find(doc! {"next_try": {"$lte": now}})
            .sort(doc! {"next_try": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        let mut done = Vec::new();
        for w in due {
            match self.retry_one(&w).await {
                Ok(Some(applied)) => done.push((w.feedback(), applied)),
                Ok(None) => {
                    let later = doc! {"$set": {"next_try": next_try(now, w.tries + 1)},
                    "$inc": {"tries": 1}};
                    if let Err(e) = self
                        .feedback()
                        .update_one(doc! {"_id": &w.id, "next_try": {"$exists": true}}, later)
                        .await
                    {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "could not postpone waiting feedback"
                        );
                    }
                }
                // One event that cannot be tried now does not hold up the others.
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    provider = %w.provider,
                    "could not retry waiting feedback"
                ),
            }
        }
        Ok(done)
    }

    /// Applies waiting feedback `w` if its delivery is found and handed over now.
    async fn retry_one(&self, w: &FeedbackDoc) -> anyhow::Result<Option<Applied>> {
        let fb = w.feedback();
        let id = match &w.delivery_id {
            Some(id) => Some(id.clone()),
            None => self.feedback_delivery(&fb.target).await?,
        };
        let Some(id) = id else {
            return Ok(None);
        };
        conflict_retried(|| self.retry_once(w, &fb, &id)).await
    }

    /// Applies waiting feedback `w` to delivery `id` if its outcome is committed now.
    async fn retry_once(
        &self,
        w: &FeedbackDoc,
        fb: &Feedback,
        id: &str,
    ) -> anyhow::Result<Option<Applied>> {
        let mut session = self.client.start_session().await?;
        Ok(session
            .start_transaction()
            .and_run((self, w, fb, id), |s, (store, w, fb, id)| {
                async move {
                    let Some(d) = store
                        .deliveries()
                        .find_one(doc! {"_id": *id})
                        .projection(doc! {"attempts": 0})
                        .session(&mut *s)
                        .await?
                    else {
                        return Ok(None);
                    };
                    if must_wait(d.status, fb.kind) {
                        return Ok(None);
                    }
                    // Taken by this transaction only (another process may retry too).
                    let taken = store
                        .feedback()
                        .update_one(
                            doc! {"_id": &w.id, "next_try": {"$exists": true}},
                            doc! {"$set": {"delivery_id": *id},
                            "$unset": {"retry_until": 1, "next_try": 1}},
                        )
                        .session(&mut *s)
                        .await?;
                    if taken.modified_count != 1 {
                        return Ok(None);
                    }
                    store.apply_to(s, &d, fb, DateTime::now()).await.map(Some)
                }
                .boxed()
            })
            .await?)
    }

    /// The delivery's feedback entry and, with `status`, its move (guarded by the status
    /// the transaction read), the notification's counters and the statistics.
    async fn record_feedback(
        &self,
        s: &mut mongodb::ClientSession,
        d: &DeliveryDoc,
        fb: &Feedback,
        status: Option<DeliveryStatus>,
        now: DateTime,
    ) -> mongodb::error::Result<()> {
        let entry = FeedbackEntry {
            kind: fb.kind,
            provider: fb.provider.clone(),
            event_id: fb.event_id.clone(),
            at: now,
            detail: fb.detail.clone(),
        };
        let mut set = doc! {"updated_at": now};
        // The first complaint marks the delivery (and counts); later ones are entries.
        let complained = fb.kind == FeedbackKind::Complained && d.complained_at.is_none();
        if complained {
            set.insert("complained_at", now);
        }
        if let Some(to) = status {
            set.insert("status", to.as_str());
            set.insert("reason", reason_of(to));
            if let Some(at) = self.retention.delivery_expiry(to, chrono_time(now)) {
                set.insert("expire_at", bson_time(at));
            }
        }
        let written = self
            .deliveries()
            .update_one(
                doc! {"_id": &d.id, "status": d.status.as_str()},
                doc! {"$set": set, "$push": {"feedback": bson::to_bson(&entry)
                .map_err(mongodb::error::Error::custom)?}},
            )
            .session(&mut *s)
            .await?;
        if written.matched_count != 1 {
            return Err(mongodb::error::Error::custom(
                "a delivery changed inside its feedback transaction",
            ));
        }
        // (type, status, reason) of each event: the move, and a first complaint.
        let mut events = Vec::new();
        if let Some(to) = status {
            if let Some(kind) = HookEvent::kind_of(to) {
                events.push((kind, to, reason_of(to)));
            }
        }
        if complained {
            events.push(("message.complained", d.status, d.reason.as_deref()));
        }
        let kinds: Vec<&str> = events.iter().map(|(k, _, _)| *k).collect();
        self.stage_hooks_of(s, &kinds, || {
            events
                .iter()
                .map(|(kind, to, reason)| {
                    let mut e = HookEvent::delivery(kind, d, *to, *reason, None, now)
                        .with("feedback", fb.kind.as_str())
                        .with_contact("address", fb.address.clone())
                        .with_contact("detail", fb.detail.clone());
                    if *kind == "message.complained" {
                        e = e.with("complained_at", iso(now));
                    }
                    e
                })
                .collect()
        })
        .await?;
        let mut moves = StatMoves::sharded("feedback", Priority::Normal);
        if complained {
            moves.mark(d, Mark::Complained, d.provider.as_deref(), 1);
        }
        if let Some(to) = status {
            moves.add(d, d.status, d.provider.as_deref(), -1, None);
            moves.add(d, to, d.provider.as_deref(), 1, None);
        }
        moves.write(&self.db, s, self.retention.stats_days).await?;
        let Some(to) = status else {
            return Ok(());
        };
        let (Some(old), Some(new)) = (d.status.counter(), to.counter()) else {
            return Ok(());
        };
        self.notifications()
            .update_one(
                doc! {"_id": &d.notification_id},
                doc! {"$inc": {format!("counts.{old}"): -1, format!("counts.{new}"): 1},
                "$set": {"updated_at": now}},
            )
            .session(&mut *s)
            .await?;
        Ok(())
    }

    /// Marks the delivery whose unsubscribe link `user_id` used (the first use counts).
    pub async fn mark_unsubscribed(&self, delivery_id: &str, user_id: &str) -> anyhow::Result<()> {
        conflict_retried(|| async {
            let mut session = self.client.start_session().await?;
            session
                .start_transaction()
                .and_run(self, |s, store| {
                    async move {
                        let now = DateTime::now();
                        let Some(d) = store
                            .deliveries()
                            .find_one_and_update(
                                doc! {"_id": delivery_id, "user_id": user_id,
                                "unsubscribed_at": null},
                                doc! {"$set": {"unsubscribed_at": now, "updated_at": now}},
                            )
                            .projection(doc! {"attempts": 0})
                            .session(&mut *s)
                            .await?
                        else {
                            return Ok(());
                        };
                        store
                            .stage_hooks_of(s, &["message.unsubscribed"], || {
                                vec![HookEvent::delivery(
                                    "message.unsubscribed",
                                    &d,
                                    d.status,
                                    d.reason.as_deref(),
                                    None,
                                    now,
                                )
                                .with("unsubscribed_at", iso(now))]
                            })
                            .await?;
                        let mut moves = StatMoves::sharded("feedback", Priority::Normal);
                        moves.mark(&d, Mark::Unsubscribed, d.provider.as_deref(), 1);
                        moves.write(&store.db, s, store.retention.stats_days).await
                    }
                    .boxed()
                })
                .await?;
            Ok(())
        })
        .await
    }

    /// Feedback events, newest first: those of one delivery, or those that matched none.
    pub async fn list_feedback(
        &self,
        delivery_id: Option<&str>,
        limit: i64,
    ) -> anyhow::Result<Vec<FeedbackDoc>> {
        Ok(self
            .feedback()
            .find(doc! {"delivery_id": delivery_id})
            .sort(doc! {"received_at": -1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeliveryStatus as S;
    use FeedbackKind as K;

    #[test]
    fn feedback_moves_a_sent_delivery_once_and_a_bounce_wins_in_any_order() {
        assert_eq!(transition(S::Sent, K::Delivered), Some(S::Delivered));
        assert_eq!(transition(S::Sent, K::Bounced), Some(S::Bounced));
        assert_eq!(transition(S::Delivered, K::Bounced), Some(S::Bounced));
        assert_eq!(
            transition(S::Delivered, K::Undelivered),
            Some(S::Undelivered)
        );
        // A late `delivered` never overwrites a bounce.
        assert_eq!(transition(S::Bounced, K::Delivered), None);
        assert_eq!(transition(S::Undelivered, K::Delivered), None);
        assert_eq!(transition(S::Delivered, K::Delivered), None);
        // Soft bounces and complaints are recorded, not statuses.
        assert_eq!(transition(S::Sent, K::Deferred), None);
        assert_eq!(transition(S::Delivered, K::Complained), None);
        // Feedback for a delivery still being sent waits for its outcome; a soft bounce
        // need not.
        assert!(must_wait(S::Sending, K::Delivered) && must_wait(S::Queued, K::Bounced));
        assert!(must_wait(S::Retrying, K::Delivered) && must_wait(S::Deferred, K::Undelivered));
        assert!(must_wait(S::Sending, K::Complained) && !must_wait(S::Sending, K::Deferred));
        assert_eq!(
            next_try(DateTime::from_millis(0), 0).timestamp_millis(),
            2_000
        );
        assert_eq!(
            next_try(DateTime::from_millis(0), 3).timestamp_millis(),
            16_000
        );
        assert_eq!(
            next_try(DateTime::from_millis(0), 40).timestamp_millis(),
            300_000
        );
        assert!(!must_wait(S::Sent, K::Delivered) && !must_wait(S::Failed, K::Delivered));
        // Nothing moves a delivery that was never handed over.
        for s in [S::Queued, S::Sending, S::Failed, S::Dead, S::Skipped] {
            for k in [K::Delivered, K::Bounced, K::Undelivered] {
                assert_eq!(transition(s, k), None, "{s:?} {k:?}");
            }
        }
    }
}
