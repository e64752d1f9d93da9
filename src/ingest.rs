//! Accepting an event — one code path for REST and the `herald.events` exchange.

use std::time::{Duration, Instant};

use chrono::Utc;
use mongodb::bson::{self, DateTime, Document};

use crate::app::Context;
use crate::domain::event::{parse_event, EventError, NewEvent};
use crate::domain::{Channel, FieldError, NotificationStatus, Priority};
use crate::queue::{Disposition, Incoming};
use crate::scheduler::definition::{self, ScheduleError};
use crate::store::{
    bson_time, Accepted, Counts, NotificationDoc, OutboxDoc, RecipientsDoc, ScheduleDoc,
};

/// A backlog reading is reused for this long, so a burst of requests costs one look.
const BACKLOG_FRESH: Duration = Duration::from_millis(500);
/// How long the lanes' depths may take to read: requests wait for the reading.
const LANES_READ_WITHIN: Duration = Duration::from_secs(1);

/// How much delivery work waits — jobs ready on the three lanes plus outbox entries not
/// yet relayed — as this process last read it.
#[derive(Default)]
pub struct Backlog(tokio::sync::Mutex<Option<(Instant, u64)>>);

impl Backlog {
    /// The current backlog (at most `BACKLOG_FRESH` old). A part that cannot be read, or
    /// not within `LANES_READ_WITHIN`, counts as empty: an unreachable RabbitMQ is the
    /// outbox's job, not a reason to refuse.
    pub async fn current(&self, ctx: &Context) -> u64 {
        let mut cached = self.0.lock().await;
        if let Some((at, n)) = *cached {
            if at.elapsed() < BACKLOG_FRESH {
                return n;
            }
        }
        let lanes = async {
            let mut n = 0;
            for p in [Priority::High, Priority::Normal, Priority::Low] {
                let lane = ctx.broker.names().lane(p);
                n += u64::from(ctx.broker.queue_depth(lane).await.unwrap_or(0));
            }
            n
        };
        let n = ctx.store.outbox_backlog().await.unwrap_or(0)
            + tokio::time::timeout(LANES_READ_WITHIN, lanes)
                .await
                .unwrap_or(0);
        *cached = Some((Instant::now(), n));
        n
    }

    /// `Err(backlog)` while the backlog is past `events.max_backlog` (0: never).
    pub async fn admit(&self, ctx: &Context) -> Result<(), u64> {
        let bound = ctx.settings.events.max_backlog;
        if bound == 0 {
            return Ok(());
        }
        match self.current(ctx).await {
            n if n > bound => Err(n),
            _ => Ok(()),
        }
    }
}

/// Why an otherwise well-formed event was refused.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("group `{0}` does not exist")]
    UnknownGroup(String),
    #[error("{}", crate::domain::describe(.0))]
    Invalid(Vec<FieldError>),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl AcceptError {
    pub fn code(&self) -> &'static str {
        match self {
            AcceptError::UnknownGroup(_) => "unknown_group",
            AcceptError::Invalid(_) => "validation_failed",
            AcceptError::Schedule(e) => e.code(),
            AcceptError::Store(_) => "internal_error",
        }
    }
}

/// What an accepted event became.
#[derive(Debug)]
pub enum Intake {
    Notification(Accepted),
    /// The seed format's `schedule`: a recurring campaign (`created` false for a repeat).
    Schedule {
        schedule: Box<ScheduleDoc>,
        created: bool,
    },
}

/// Accepts a validated event: a recurring one becomes a schedule; any other is written
/// as a notification with its outbox entry in one transaction. Only after that commit
/// may the caller answer 2xx.
pub async fn accept_event(
    ctx: &Context,
    event: NewEvent,
    source: &str,
) -> Result<Intake, AcceptError> {
    let Some(spec) = &event.recurring else {
        return Ok(Intake::Notification(accept(ctx, event, source).await?));
    };
    if let Some(id) = &event.event_id {
        if let Some(s) = ctx.store.schedule_by_event_id(id).await? {
            return Ok(Intake::Schedule {
                schedule: Box::new(s),
                created: false,
            });
        }
    }
    let input = definition::from_event(
        spec,
        &event.event_type,
        event.priority,
        &event.recipients,
        &event.channels,
        &event.payload,
    )?;
    definition::check_references(ctx, &input).await?;
    let doc = definition::to_document(&input, None, event.event_id.clone(), Utc::now())?;
    Ok(match ctx.store.insert_schedule(&doc).await? {
        Some(original) => Intake::Schedule {
            schedule: Box::new(original),
            created: false,
        },
        None => {
            ctx.schedule_wake.notify_one();
            Intake::Schedule {
                schedule: Box::new(doc),
                created: true,
            }
        }
    })
}

/// Accepts a one-off event (`send_at` delays it): notification + outbox in one transaction.
pub async fn accept(ctx: &Context, event: NewEvent, source: &str) -> Result<Accepted, AcceptError> {
    if let Some(event_id) = &event.event_id {
        // A repeat is answered before anything else is checked or written.
        if let Some(existing) = ctx.store.find_notification_by_event_id(event_id).await? {
            return Ok(Accepted::Duplicate(Box::new(existing)));
        }
    }
    if let Some(group) = &event.recipients.group_id {
        if ctx.store.get_group(group.as_str()).await?.is_none() {
            return Err(AcceptError::UnknownGroup(group.to_string()));
        }
    }
    let payload = payload_document(&event.payload)?;
    let due_at = event.send_at.filter(|t| *t > Utc::now());
    let (notification, mut outbox) = new_notification(
        NotificationSpec {
            event_id: event.event_id,
            event_type: event.event_type.to_string(),
            priority: event.priority,
            recipients: RecipientsDoc::from(&event.recipients),
            channels: event.channels,
            payload,
            source: source.to_owned(),
            schedule_id: None,
            upstream_created_at: event.upstream_created_at,
        },
        due_at,
    );
    ctx.handoff.lease(ctx, &mut outbox);
    // The intake hands the committed outbox entries to this process's relay.
    let accepted = ctx.intake.call((notification, outbox)).await??;
    if matches!(accepted, Accepted::New(_)) {
        ctx.metrics.accepted(source);
    }
    Ok(accepted)
}

/// Converts a JSON payload to a storable document.
pub fn payload_document(
    payload: &serde_json::Map<String, serde_json::Value>,
) -> Result<Document, AcceptError> {
    bson::to_document(payload).map_err(|e| {
        AcceptError::Invalid(vec![FieldError::new(
            "payload",
            format!("cannot be stored: {e}"),
        )])
    })
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

/// Handles one message from the `herald.events` exchange: the same parsing and accept
/// path as REST; malformed events are rejected with their reason, never retried forever.
pub async fn handle_amqp_event(ctx: Context, message: Incoming) -> Disposition {
    let event = match parse_event(&message.body, None, ctx.event_limits()) {
        Ok(e) => e,
        Err(e) => return reject(&e),
    };
    if event.event_id.is_none() {
        return Disposition::Reject {
            code: "validation_failed".to_owned(),
            message: "event_id: is required on messages published to the events exchange"
                .to_owned(),
        };
    }
    match accept_event(&ctx, event, "amqp").await {
        Ok(Intake::Notification(Accepted::New(n))) => {
            tracing::info!(notification_id = %n.id, "event accepted from the exchange");
            Disposition::Ack
        }
        Ok(Intake::Notification(Accepted::Duplicate(n))) => {
            tracing::debug!(notification_id = %n.id, "repeated event from the exchange");
            Disposition::Ack
        }
        Ok(Intake::Schedule { schedule, .. }) => {
            tracing::info!(schedule_id = %schedule.id, "schedule created from the exchange");
            Disposition::Ack
        }
        Err(AcceptError::Store(e)) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not accept an event from the exchange; requeueing"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            Disposition::Requeue
        }
        Err(e) => Disposition::Reject {
            code: e.code().to_owned(),
            message: e.to_string(),
        },
    }
}

fn reject(e: &EventError) -> Disposition {
    let message = match e {
        EventError::Invalid(errors) => crate::domain::describe(errors),
        other => other.message(),
    };
    Disposition::Reject {
        code: e.code().to_owned(),
        message,
    }
}
