//! Typed MongoDB documents: the shape of every record herald stores.

use mongodb::bson::{self, DateTime, Document};
use serde::{Deserialize, Serialize};

use chrono::Utc;

use super::bson_time;
use crate::domain::{Category, Channel, DeliveryStatus, FieldError, NotificationStatus, Priority};

/// Converts a JSON payload to a storable document; what cannot be stored is the
/// payload field's error.
pub fn payload_document(
    payload: &serde_json::Map<String, serde_json::Value>,
) -> Result<Document, Vec<FieldError>> {
    storable_document("payload", payload)
}

/// Converts a JSON object to a storable document. BSON keys are C strings: a key with a
/// NUL byte cannot be stored, and is the field's error rather than a failed write.
pub fn storable_document(
    field: &str,
    object: &serde_json::Map<String, serde_json::Value>,
) -> Result<Document, Vec<FieldError>> {
    fn nul_key(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || nul_key(v)),
            serde_json::Value::Array(a) => a.iter().any(nul_key),
            _ => false,
        }
    }
    if object.iter().any(|(k, v)| k.contains('\0') || nul_key(v)) {
        return Err(vec![FieldError::new(
            field,
            "cannot be stored: a key contains a NUL character",
        )]);
    }
    bson::to_document(object)
        .map_err(|e| vec![FieldError::new(field, format!("cannot be stored: {e}"))])
}

/// Per-status delivery counters on a notification.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Counts {
    pub total: i64,
    pub queued: i64,
    pub sent: i64,
    pub failed: i64,
    pub skipped: i64,
    pub deferred: i64,
    pub retrying: i64,
    pub dead: i64,
    /// Moved here from `sent` by the providers' feedback.
    #[serde(default)]
    pub delivered: i64,
    #[serde(default)]
    pub bounced: i64,
    #[serde(default)]
    pub undelivered: i64,
}

impl Counts {
    /// Deliveries that may still change without an operator's replay.
    pub fn pending(&self) -> i64 {
        self.queued + self.retrying + self.deferred
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecipientsDoc {
    pub user_ids: Vec<String>,
    pub group_id: Option<String>,
    #[serde(default)]
    pub segment: Option<SegmentDoc>,
}

/// Users matching every given field; none given means every user.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentDoc {
    pub locale: Option<String>,
    pub tag: Option<String>,
}

impl From<&crate::domain::event::Recipients> for RecipientsDoc {
    fn from(r: &crate::domain::event::Recipients) -> Self {
        Self {
            user_ids: r.user_ids.iter().map(|u| u.to_string()).collect(),
            group_id: r.group_id.as_ref().map(|g| g.to_string()),
            segment: r.segment.as_ref().map(|s| SegmentDoc {
                locale: s.locale.clone(),
                tag: s.tag.clone(),
            }),
        }
    }
}

/// One accepted event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotificationDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    pub priority: Priority,
    pub status: NotificationStatus,
    pub recipients: RecipientsDoc,
    /// `None`: every channel the event type has a template for.
    pub channels: Option<Vec<Channel>>,
    pub payload: Document,
    /// Where the event came from: `api`, `amqp` or `schedule`.
    pub source: String,
    /// The campaign that fired it, if any.
    #[serde(default)]
    pub schedule_id: Option<String>,
    /// Set by the event or its schedule; `None`: the event type's configured category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Category>,
    pub send_at: Option<DateTime>,
    pub upstream_created_at: Option<DateTime>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
    pub counts: Counts,
    /// Set once every recipient has a delivery record; only then can the notification finish.
    pub fanout_done: bool,
}

/// Work waiting to be published to RabbitMQ; written in the same transaction as its cause.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub notification_id: String,
    /// Set for a delivery job (a retry or a replay); absent for a dispatch job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
    /// Wait this long in a RabbitMQ delay queue before reaching the lane (retries).
    #[serde(default)]
    pub delay_ms: i64,
    /// Which retry this is (picks the delay queue).
    #[serde(default)]
    pub attempt: i32,
    pub lane: Priority,
    /// Not published before this instant (`send_at` for delayed sends).
    pub due_at: DateTime,
    /// A relay holds the entry until then; an expired lease means the relay died.
    pub lease_until: DateTime,
    pub lease_token: Option<String>,
    pub created_at: DateTime,
    /// More notifications this dispatch entry stands for: an accept's group commit writes
    /// one entry for the batch's dispatches its relay already holds, per lane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<String>,
}

/// A recipient's profile.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct UserDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    #[serde(default)]
    pub push_tokens: Vec<String>,
    /// Free-form labels segments can select on.
    #[serde(default)]
    pub tags: Vec<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub birthday_date: Option<String>,
    pub locale: Option<String>,
    pub timezone: Option<String>,
    #[serde(default)]
    pub preferences: Document,
    /// Marketing the user left through an unsubscribe link, from the `unsubscribes`
    /// collection (filled by the reads that need it, never stored here: an opt-out
    /// outlives a profile's replacement and deletion, and a profile herald does not store).
    #[serde(skip)]
    pub unsubscribes: Vec<UnsubscribeDoc>,
    /// The channels whose address of this user is on the suppression list; filled by
    /// the worker's batched read, never stored.
    #[serde(skip)]
    pub suppressed: Vec<Channel>,
    pub created_at: Option<DateTime>,
    pub updated_at: Option<DateTime>,
}

/// One opt-out: of one event type's marketing, or (`event_type: None`) of all of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnsubscribeDoc {
    /// `{user_id}|{event_type or *}`: one opt-out per user and scope.
    #[serde(rename = "_id")]
    pub id: String,
    pub user_id: String,
    pub event_type: Option<String>,
    pub at: DateTime,
}

impl UserDoc {
    /// When the user left marketing of `event_type` (or all marketing), if they did.
    pub fn unsubscribed_from(&self, event_type: &str) -> Option<DateTime> {
        self.unsubscribes
            .iter()
            .find(|u| u.event_type.as_deref().is_none_or(|t| t == event_type))
            .map(|u| u.at)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: String,
    pub member_count: i64,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// The claim a worker puts on a delivery before it calls the provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimDoc {
    pub attempt_id: String,
    /// The status the delivery had before the claim; its counter still holds it.
    pub from: DeliveryStatus,
    pub claimed_at: DateTime,
    pub worker: String,
}

/// A worker's request to claim a delivery that is still in status `from`.
#[derive(Debug, Clone)]
pub struct DeliveryClaim {
    pub delivery_id: String,
    pub from: DeliveryStatus,
    pub worker: String,
}

/// One provider call (or the decision not to make one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptDoc {
    pub attempt_id: String,
    pub provider: Option<String>,
    pub started_at: DateTime,
    pub finished_at: DateTime,
    pub duration_ms: i64,
    pub status: DeliveryStatus,
    pub error: Option<String>,
    /// What the provider answered (message id, recorded text, SMTP reply).
    pub response: Option<Document>,
}

/// One recipient x channel of a notification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub notification_id: String,
    pub event_type: String,
    pub user_id: String,
    pub channel: Channel,
    pub priority: Priority,
    #[serde(default)]
    pub schedule_id: Option<String>,
    pub status: DeliveryStatus,
    pub reason: Option<String>,
    pub provider: Option<String>,
    pub attempt_count: i32,
    /// Left out of log pages (they can be long); read with the single delivery.
    #[serde(default)]
    pub attempts: Vec<AttemptDoc>,
    pub last_error: Option<String>,
    pub claim: Option<ClaimDoc>,
    /// When its notification was accepted: send latency is measured from here.
    #[serde(default)]
    pub accepted_at: Option<DateTime>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
    pub sent_at: Option<DateTime>,
    /// What the providers reported after `sent`, in arrival order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feedback: Vec<super::feedback::FeedbackEntry>,
    /// When the recipient marked it as spam.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complained_at: Option<DateTime>,
    /// When the recipient unsubscribed through this delivery's one-click link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsubscribed_at: Option<DateTime>,
    /// In-app: when the recipient first saw its inbox item, and first read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_at: Option<DateTime>,
    /// Set with a final status; MongoDB's TTL monitor removes the record then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<DateTime>,
}

/// A delivery job to publish: enough to route and find the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedDelivery {
    pub delivery_id: String,
    pub notification_id: String,
    pub lane: Priority,
}

/// What a new notification is made of (from an event or a schedule's fire).
pub struct NotificationSpec {
    /// `None`: a generated id.
    pub event_id: Option<String>,
    pub event_type: String,
    pub priority: Priority,
    pub recipients: RecipientsDoc,
    pub channels: Option<Vec<Channel>>,
    pub payload: Document,
    pub source: String,
    pub schedule_id: Option<String>,
    pub upstream_created_at: Option<chrono::DateTime<Utc>>,
    pub category: Option<Category>,
}

/// Builds a notification and the outbox entry that will dispatch it at `due_at` (now if `None`).
pub fn new_notification(
    spec: NotificationSpec,
    due_at: Option<chrono::DateTime<Utc>>,
) -> (NotificationDoc, OutboxDoc) {
    let now = DateTime::now();
    let id = uuid::Uuid::now_v7().to_string();
    let notification = NotificationDoc {
        id: id.clone(),
        event_id: spec
            .event_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        event_type: spec.event_type,
        priority: spec.priority,
        status: if due_at.is_some() {
            NotificationStatus::Scheduled
        } else {
            NotificationStatus::Accepted
        },
        recipients: spec.recipients,
        channels: spec.channels,
        payload: spec.payload,
        source: spec.source,
        schedule_id: spec.schedule_id,
        category: spec.category,
        send_at: due_at.map(bson_time),
        upstream_created_at: spec.upstream_created_at.map(bson_time),
        created_at: now,
        updated_at: now,
        counts: Counts::default(),
        fanout_done: false,
    };
    let outbox = OutboxDoc {
        id: uuid::Uuid::now_v7().to_string(),
        notification_id: id,
        delivery_id: None,
        delay_ms: 0,
        attempt: 0,
        lane: spec.priority,
        due_at: due_at.map_or(now, bson_time),
        lease_until: now,
        lease_token: None,
        created_at: now,
        also: Vec::new(),
    };
    (notification, outbox)
}
