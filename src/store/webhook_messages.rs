//! Status webhook messages: one per event per subscribed endpoint, written in the transaction of the status change (the outbox), then leased, tried and recorded with each attempt.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::{ReturnDocument, UpdateOneModel, WriteModel};
use mongodb::{ClientSession, Collection};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::documents::DeliveryDoc;
use super::webhook_endpoints::EndpointDoc;
use super::{chrono_time, Store};
use crate::domain::DeliveryStatus;

pub(crate) const WEBHOOK_MESSAGES: &str = "webhook_messages";
pub(crate) const WEBHOOK_ATTEMPTS: &str = "webhook_attempts";
/// How long a process goes on using the endpoints' subscriptions it read: an endpoint
/// created or changed elsewhere receives the events of status changes committed from
/// at most this long after.
const SUBSCRIPTIONS_TTL: Duration = Duration::from_secs(1);
/// `lease_until` of a message nobody holds.
const EPOCH: DateTime = DateTime::from_millis(0);
/// The most a page of attempts or messages holds.
pub const PAGE_MAX: i64 = 200;

/// Where a message is: waiting for its (next) try, delivered, or failed for good.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    Pending,
    Delivered,
    Failed,
}

impl MessageState {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Pending => "pending",
            MessageState::Delivered => "delivered",
            MessageState::Failed => "failed",
        }
    }
}

/// One event for one endpoint. `_id` is the `webhook-id` (the same on every try and
/// replay); `body` is signed and sent as it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookMessageDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub endpoint_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub body: String,
    pub delivery_id: Option<String>,
    pub state: MessageState,
    /// Tries made since it was created, replayed or retried.
    pub attempts: i32,
    pub due_at: DateTime,
    /// Who holds it now (a relay's batch, or a sender's try) and until when.
    pub lease: Option<String>,
    pub lease_until: DateTime,
    pub created_at: DateTime,
    pub last_attempt_at: Option<DateTime>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime>,
    pub expire_at: Option<DateTime>,
}

/// One try of a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookAttemptDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub endpoint_id: String,
    pub message_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub at: DateTime,
    /// The HTTP status answered; none when no answer came (refused, timed out).
    pub status_code: Option<i32>,
    pub duration_ms: i64,
    pub error: Option<String>,
    /// The start of the answer's body.
    pub response: String,
    pub expire_at: Option<DateTime>,
}

/// After a try: what becomes of the message.
#[derive(Debug, Clone, Copy)]
pub enum Next {
    Delivered,
    RetryAt(DateTime),
    Failed,
}

/// A status change to report: its type (`message.sent`, ...), the public `data`, and what
/// only endpoints that opted in get (addresses, provider texts).
#[derive(Debug, Clone)]
pub struct HookEvent {
    pub kind: &'static str,
    pub at: DateTime,
    pub delivery_id: Option<String>,
    pub data: Map<String, Value>,
    pub contact: Map<String, Value>,
}

/// An instant as the events write it (RFC 3339, milliseconds, UTC).
pub fn iso(t: DateTime) -> Value {
    Value::String(chrono_time(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn iso_opt(t: Option<DateTime>) -> Value {
    t.map_or(Value::Null, iso)
}

impl HookEvent {
    /// A delivery's change to `status` at `at` (`d` as it was before, or after).
    pub fn delivery(
        kind: &'static str,
        d: &DeliveryDoc,
        status: DeliveryStatus,
        reason: Option<&str>,
        provider: Option<&str>,
        at: DateTime,
    ) -> Self {
        let data = json!({
            "delivery_id": d.id,
            "notification_id": d.notification_id,
            "event_type": d.event_type,
            "user_id": d.user_id,
            "channel": d.channel.as_str(),
            "schedule_id": d.schedule_id,
            "status": status.as_str(),
            "reason": reason,
            "provider": provider.or(d.provider.as_deref()),
            "created_at": iso(d.created_at),
            "sent_at": iso_opt(if status == DeliveryStatus::Sent { Some(at) } else { d.sent_at }),
            "updated_at": iso(at),
        });
        Self {
            kind,
            at,
            delivery_id: Some(d.id.clone()),
            data: match data {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            contact: Map::new(),
        }
    }

    /// The event type reporting a delivery's move to `status`, if one does.
    pub fn kind_of(status: DeliveryStatus) -> Option<&'static str> {
        Some(match status {
            DeliveryStatus::Sent => "message.sent",
            DeliveryStatus::Delivered => "message.delivered",
            DeliveryStatus::Bounced => "message.bounced",
            DeliveryStatus::Undelivered => "message.undelivered",
            DeliveryStatus::Failed => "message.failed",
            DeliveryStatus::Dead => "message.dead",
            DeliveryStatus::Skipped => "message.skipped",
            _ => return None,
        })
    }

    /// Adds a field to `data`.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.data.insert(key.to_owned(), value.into());
        self
    }

    /// Adds a field only endpoints with `include_contact` get.
    pub fn with_contact(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.contact.insert(key.to_owned(), value.into());
        self
    }

    /// The Standard Webhooks body: `{"type", "timestamp", "data"}`.
    fn body(&self, include_contact: bool) -> String {
        let mut data = self.data.clone();
        if include_contact {
            data.extend(self.contact.clone());
        }
        json!({"type": self.kind, "timestamp": iso(self.at), "data": data}).to_string()
    }
}

/// An enabled endpoint's subscription, as the status writers read it.
#[derive(Debug)]
pub struct Subscriber {
    pub id: String,
    pub events: HashSet<String>,
    pub include_contact: bool,
}

/// The enabled endpoints' subscriptions, read at most once per [`SUBSCRIPTIONS_TTL`].
#[derive(Clone)]
pub struct Subscriptions(Arc<Vec<Subscriber>>);

impl Subscriptions {
    /// Whether any endpoint receives `kind`: when none does, writers skip building events.
    pub fn wants(&self, kind: &str) -> bool {
        self.0.iter().any(|s| s.events.contains(kind))
    }
}

/// The subscriptions and endpoints caches and what wakes this process's relay, shared by
/// a store's clones. A change made in this process clears them at once; one made by
/// another process is seen within [`SUBSCRIPTIONS_TTL`].
pub struct HookShared {
    cache: moka::sync::Cache<(), Subscriptions>,
    endpoints: moka::sync::Cache<String, Arc<EndpointDoc>>,
    wake: tokio::sync::Notify,
}

impl Default for HookShared {
    fn default() -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(1)
                .time_to_live(SUBSCRIPTIONS_TTL)
                .build(),
            endpoints: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(SUBSCRIPTIONS_TTL)
                .build(),
            wake: tokio::sync::Notify::new(),
        }
    }
}

impl Store {
    pub(crate) fn hook_messages(&self) -> Collection<HookMessageDoc> {
        self.db.collection(WEBHOOK_MESSAGES)
    }

    fn hook_attempts(&self) -> Collection<HookAttemptDoc> {
        self.db.collection(WEBHOOK_ATTEMPTS)
    }

    pub(super) async fn index_hook_messages(&self) -> mongodb::error::Result<()> {
        self.hook_messages()
            .create_indexes([
                super::named_index(doc! {"state": 1, "due_at": 1}, "state_due"),
                super::named_index(doc! {"lease": 1}, "lease"),
                super::named_index(doc! {"endpoint_id": 1, "_id": -1}, "endpoint_id"),
                super::expiry_index(),
            ])
            .await?;
        self.hook_attempts()
            .create_indexes([
                super::named_index(doc! {"endpoint_id": 1, "_id": -1}, "endpoint_id"),
                super::named_index(doc! {"message_id": 1}, "message_id"),
                super::expiry_index(),
            ])
            .await?;
        Ok(())
    }

    /// The enabled endpoints and what they receive (cached briefly).
    pub async fn subscriptions(&self) -> mongodb::error::Result<Subscriptions> {
        if let Some(s) = self.hooks.cache.get(&()) {
            return Ok(s);
        }
        let subscribers: Vec<Subscriber> = self
            .webhook_endpoints()
            .find(doc! {"enabled": true})
            .await?
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .map(|e| Subscriber {
                id: e.id,
                events: e.events.into_iter().collect(),
                include_contact: e.include_contact,
            })
            .collect();
        let s = Subscriptions(Arc::new(subscribers));
        self.hooks.cache.insert((), s.clone());
        Ok(s)
    }

    /// Forgets the cached subscriptions and endpoints (one changed in this process).
    pub fn forget_subscriptions(&self) {
        self.hooks.cache.invalidate_all();
        self.hooks.endpoints.invalidate_all();
    }

    /// An endpoint as read at most [`SUBSCRIPTIONS_TTL`] ago (what the senders use).
    pub async fn endpoint_cached(&self, id: &str) -> anyhow::Result<Option<Arc<EndpointDoc>>> {
        if let Some(e) = self.hooks.endpoints.get(id) {
            return Ok(Some(e));
        }
        let Some(e) = self.endpoint(id).await? else {
            return Ok(None);
        };
        let e = Arc::new(e);
        self.hooks.endpoints.insert(id.to_owned(), e.clone());
        Ok(Some(e))
    }

    /// What wakes this process's status webhook relay.
    pub fn hook_wake(&self) -> &tokio::sync::Notify {
        &self.hooks.wake
    }

    /// Wakes the relay when a committed transaction `staged` messages.
    pub(super) fn staged_hooks(&self, staged: bool) {
        if staged {
            self.hooks.wake.notify_one();
        }
    }

    /// Writes, inside `s`'s transaction, a message per event per endpoint subscribed to
    /// its type: committed with the status change, or not at all. Returns whether it wrote
    /// any (then wake the relay once the transaction committed: [`Store::hook_wake`]).
    pub(super) async fn stage_hooks(
        &self,
        s: &mut ClientSession,
        subs: &Subscriptions,
        events: &[HookEvent],
    ) -> mongodb::error::Result<bool> {
        let now = DateTime::now();
        let expire_at = super::expires(self.retention.webhook_days);
        let mut docs = Vec::new();
        for e in events {
            for sub in subs.0.iter().filter(|s| s.events.contains(e.kind)) {
                docs.push(HookMessageDoc {
                    id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
                    endpoint_id: sub.id.clone(),
                    kind: e.kind.to_owned(),
                    body: e.body(sub.include_contact),
                    delivery_id: e.delivery_id.clone(),
                    state: MessageState::Pending,
                    attempts: 0,
                    due_at: now,
                    lease: None,
                    lease_until: EPOCH,
                    created_at: now,
                    last_attempt_at: None,
                    last_status_code: None,
                    last_error: None,
                    delivered_at: None,
                    expire_at,
                });
            }
        }
        if docs.is_empty() {
            return Ok(false);
        }
        self.hook_messages()
            .insert_many(docs)
            .session(&mut *s)
            .await?;
        Ok(true)
    }

    /// [`Store::stage_hooks`] of the events `make` builds, when an endpoint wants `kind`.
    pub(super) async fn stage_hooks_of(
        &self,
        s: &mut ClientSession,
        kinds: &[&str],
        make: impl FnOnce() -> Vec<HookEvent>,
    ) -> mongodb::error::Result<bool> {
        let subs = self.subscriptions().await?;
        if !kinds.iter().any(|k| subs.wants(k)) {
            return Ok(false);
        }
        self.stage_hooks(s, &subs, &make()).await
    }

    /// Leases up to `limit` due messages to one relay batch for `lease`; their ids and
    /// the batch's token (a sender's claim must name it).
    pub async fn lease_hook_messages(
        &self,
        limit: i64,
        lease: Duration,
    ) -> anyhow::Result<(String, Vec<String>)> {
        let now = DateTime::now();
        let due = doc! {"state": "pending", "due_at": {"$lte": now}, "lease_until": {"$lte": now}};
        let ids: Vec<String> = super::ids_found(
            self.hook_messages()
                .clone_with_type::<Document>()
                .find(due.clone())
                .sort(doc! {"due_at": 1})
                .limit(limit),
        )
        .await?;
        let token = format!("relay:{}", uuid::Uuid::new_v4().simple());
        if ids.is_empty() {
            return Ok((token, ids));
        }
        let until = DateTime::from_millis(now.timestamp_millis() + lease.as_millis() as i64);
        let mut filter = due;
        filter.insert("_id", doc! {"$in": &ids});
        self.hook_messages()
            .update_many(
                filter,
                doc! {"$set": {"lease": &token, "lease_until": until}},
            )
            .await?;
        // Only those this batch took (another relay may have taken some meanwhile).
        let taken = super::ids_found(
            self.hook_messages()
                .clone_with_type::<Document>()
                .find(doc! {"lease": &token}),
        )
        .await?;
        Ok((token, taken))
    }

    /// Gives a relay batch back (it could not be published): due at once again.
    pub async fn release_hook_messages(&self, token: &str) -> anyhow::Result<()> {
        self.hook_messages()
            .update_many(
                doc! {"lease": token},
                doc! {"$set": released(Document::new())},
            )
            .await?;
        Ok(())
    }

    /// The messages of published tickets `(id, lease)`, each if the relay batch its ticket
    /// names still holds it (a stale copy of a ticket, or a message replayed or retried
    /// since, is none); one read for them all. The lease is the try's hold: the try's
    /// record must find it (see [`Store::record_hook_attempts`]).
    pub async fn leased_hook_messages(
        &self,
        tickets: &[(String, String)],
    ) -> anyhow::Result<Vec<Option<HookMessageDoc>>> {
        if tickets.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = tickets.iter().map(|(id, _)| id.as_str()).collect();
        let mut found: HashMap<String, HookMessageDoc> = self
            .hook_messages()
            .find(doc! {"_id": {"$in": ids}, "state": "pending"})
            .await?
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect();
        Ok(tickets
            .iter()
            .map(|(id, lease)| {
                found
                    .remove(id)
                    .filter(|m| m.lease.as_deref() == Some(lease.as_str()))
            })
            .collect())
    }

    /// Records tries and what becomes of their messages (each held by its token), in one
    /// round trip for the tries and one for the messages. Per try: false when the claim had
    /// lapsed meanwhile (the message was replayed, retried or leased again: the try is
    /// listed, the message goes its new way).
    pub async fn record_hook_attempts(
        &self,
        tries: &[(HookAttemptDoc, String, Next)],
    ) -> anyhow::Result<Vec<bool>> {
        if tries.is_empty() {
            return Ok(Vec::new());
        }
        self.hook_attempts()
            .insert_many(tries.iter().map(|(a, _, _)| a))
            .await?;
        let namespace = self.hook_messages().namespace();
        let models: Vec<WriteModel> = tries
            .iter()
            .map(|(attempt, token, next)| {
                let mut set = released(doc! {
                    "last_attempt_at": attempt.at,
                    "last_status_code": attempt.status_code,
                    "last_error": &attempt.error,
                });
                match next {
                    Next::Delivered => {
                        set.insert("state", "delivered");
                        set.insert("delivered_at", attempt.at);
                    }
                    Next::RetryAt(at) => {
                        set.insert("due_at", *at);
                    }
                    Next::Failed => {
                        set.insert("state", "failed");
                    }
                }
                WriteModel::UpdateOne(
                    UpdateOneModel::builder()
                        .namespace(namespace.clone())
                        .filter(doc! {"_id": &attempt.message_id, "lease": token})
                        .update(doc! {"$set": set, "$inc": {"attempts": 1}})
                        .build(),
                )
            })
            .collect();
        let written = self.client.bulk_write(models).verbose_results().await?;
        Ok((0..tries.len())
            .map(|k| {
                written
                    .update_results
                    .get(&k)
                    .is_some_and(|u| u.matched_count == 1)
            })
            .collect())
    }

    /// Puts a claimed message back untried, due at `at` (its endpoint is busy).
    pub async fn postpone_hook_message(
        &self,
        id: &str,
        token: &str,
        at: DateTime,
    ) -> anyhow::Result<()> {
        self.hook_messages()
            .update_one(
                doc! {"_id": id, "lease": token},
                doc! {"$set": released(doc! {"due_at": at})},
            )
            .await?;
        Ok(())
    }

    /// Fails a claimed message without a try (its endpoint is disabled or gone).
    pub async fn fail_hook_message(
        &self,
        id: &str,
        token: &str,
        error: &str,
    ) -> anyhow::Result<()> {
        self.hook_messages()
            .update_one(
                doc! {"_id": id, "lease": token},
                doc! {"$set": released(doc! {"state": "failed", "last_error": error})},
            )
            .await?;
        Ok(())
    }

    /// Disables an endpoint with the reason and fails what waits for it; false when it was
    /// disabled already (or is gone).
    pub async fn disable_endpoint(&self, id: &str, reason: &str) -> anyhow::Result<bool> {
        let now = DateTime::now();
        let disabled = self
            .webhook_endpoints()
            .update_one(
                doc! {"_id": id, "enabled": true},
                doc! {"$set": {"enabled": false, "disabled_reason": reason, "updated_at": now}},
            )
            .await?
            .modified_count
            == 1;
        self.forget_subscriptions();
        self.fail_pending_hooks(id, &format!("endpoint disabled: {reason}"))
            .await?;
        Ok(disabled)
    }

    /// Fails the messages waiting for an endpoint (it was disabled).
    pub async fn fail_pending_hooks(&self, endpoint_id: &str, error: &str) -> anyhow::Result<()> {
        self.hook_messages()
            .update_many(
                doc! {"endpoint_id": endpoint_id, "state": "pending"},
                doc! {"$set": released(doc! {"state": "failed", "last_error": error})},
            )
            .await?;
        Ok(())
    }

    /// Notes a failed try of an endpoint; returns since when it has been failing.
    pub async fn endpoint_failing(&self, id: &str, now: DateTime) -> anyhow::Result<DateTime> {
        self.hooks.endpoints.invalidate(id);
        let e = self
            .webhook_endpoints()
            .find_one_and_update(
                doc! {"_id": id, "failing_since": null},
                doc! {"$set": {"failing_since": now}},
            )
            .await?;
        if e.is_some() {
            return Ok(now);
        }
        Ok(self
            .endpoint(id)
            .await?
            .and_then(|e| e.failing_since)
            .unwrap_or(now))
    }

    /// Notes a successful try of an endpoint that was failing.
    pub async fn endpoint_recovered(&self, id: &str) -> anyhow::Result<()> {
        self.hooks.endpoints.invalidate(id);
        self.webhook_endpoints()
            .update_one(
                doc! {"_id": id, "failing_since": {"$ne": null}},
                doc! {"$set": {"failing_since": null}},
            )
            .await?;
        Ok(())
    }

    /// An endpoint's tries, newest first, after the `cursor` attempt id.
    pub async fn hook_attempts_page(
        &self,
        endpoint_id: &str,
        cursor: Option<&str>,
        limit: i64,
    ) -> anyhow::Result<Vec<HookAttemptDoc>> {
        newest_first(
            &self.hook_attempts(),
            doc! {"endpoint_id": endpoint_id},
            cursor,
            limit,
        )
        .await
    }

    /// An endpoint's messages, newest first, after the `cursor` message id, in `state`.
    pub async fn hook_messages_page(
        &self,
        endpoint_id: &str,
        state: Option<MessageState>,
        cursor: Option<&str>,
        limit: i64,
    ) -> anyhow::Result<Vec<HookMessageDoc>> {
        let mut filter = doc! {"endpoint_id": endpoint_id};
        if let Some(s) = state {
            filter.insert("state", s.as_str());
        }
        newest_first(&self.hook_messages(), filter, cursor, limit).await
    }

    /// Sends again, from a fresh schedule, an endpoint's messages created in
    /// `[since, until)` — those not delivered, or all of them; how many.
    pub async fn replay_hooks(
        &self,
        endpoint_id: &str,
        since: DateTime,
        until: DateTime,
        include_delivered: bool,
    ) -> anyhow::Result<u64> {
        let mut filter = doc! {"endpoint_id": endpoint_id,
        "created_at": {"$gte": since, "$lt": until}};
        if !include_delivered {
            filter.insert("state", doc! {"$ne": "delivered"});
        }
        let n = self
            .hook_messages()
            .update_many(filter, again())
            .await?
            .modified_count;
        self.hooks.wake.notify_one();
        Ok(n)
    }

    /// Sends one message again, from a fresh schedule; `None` when there is none.
    pub async fn retry_hook_message(&self, id: &str) -> anyhow::Result<Option<HookMessageDoc>> {
        let m = self
            .hook_messages()
            .find_one_and_update(doc! {"_id": id}, again())
            .return_document(ReturnDocument::After)
            .await?;
        self.hooks.wake.notify_one();
        Ok(m)
    }

    /// One message.
    pub async fn hook_message(&self, id: &str) -> anyhow::Result<Option<HookMessageDoc>> {
        Ok(self.hook_messages().find_one(doc! {"_id": id}).await?)
    }

    /// Removes an endpoint's messages and tries (the endpoint was deleted).
    pub(super) async fn delete_hooks_of(&self, endpoint_id: &str) -> anyhow::Result<()> {
        self.hook_messages()
            .delete_many(doc! {"endpoint_id": endpoint_id})
            .await?;
        self.hook_attempts()
            .delete_many(doc! {"endpoint_id": endpoint_id})
            .await?;
        Ok(())
    }
}

/// A page of `filter`'s documents by time-ordered id, newest first, after `cursor`.
async fn newest_first<T>(
    collection: &Collection<T>,
    mut filter: Document,
    cursor: Option<&str>,
    limit: i64,
) -> anyhow::Result<Vec<T>>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    if let Some(c) = cursor {
        filter.insert("_id", doc! {"$lt": c});
    }
    Ok(collection
        .find(filter)
        .sort(doc! {"_id": -1})
        .limit(limit)
        .await?
        .try_collect()
        .await?)
}

/// The fields of a message nobody holds, with `more` set beside them.
fn released(mut more: Document) -> Document {
    more.insert("lease", mongodb::bson::Bson::Null);
    more.insert("lease_until", EPOCH);
    more
}

/// The update that makes a message due now, from a fresh schedule.
fn again() -> Document {
    doc! {"$set": released(doc! {"state": "pending", "attempts": 0, "due_at": DateTime::now()})}
}
