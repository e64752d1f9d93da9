//! Accepting an event — one code path for REST and the `herald.events` exchange.

use std::time::Duration;

use chrono::Utc;
use mongodb::bson::{self, DateTime};

use crate::app::Context;
use crate::domain::event::{parse_event, EventError, NewEvent};
use crate::domain::{FieldError, NotificationStatus};
use crate::queue::{Disposition, Incoming};
use crate::store::{Accepted, Counts, NotificationDoc, OutboxDoc, RecipientsDoc};

/// Why an otherwise well-formed event was refused.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("group `{0}` does not exist")]
    UnknownGroup(String),
    #[error("{}", crate::domain::describe(.0))]
    Invalid(Vec<FieldError>),
    #[error("{0} is not available yet")]
    NotImplemented(&'static str),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl AcceptError {
    pub fn code(&self) -> &'static str {
        match self {
            AcceptError::UnknownGroup(_) => "unknown_group",
            AcceptError::Invalid(_) => "validation_failed",
            AcceptError::NotImplemented(_) => "not_implemented",
            AcceptError::Store(_) => "internal_error",
        }
    }
}

/// Accepts a validated event: checks references, then writes the notification and its
/// outbox entry in one transaction. Only after that commit may the caller answer 2xx.
pub async fn accept(ctx: &Context, event: NewEvent, source: &str) -> Result<Accepted, AcceptError> {
    if event.recurring.is_some() {
        return Err(AcceptError::NotImplemented(
            "a recurring `schedule` on an event",
        ));
    }
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
    let payload = bson::to_document(&event.payload).map_err(|e| {
        AcceptError::Invalid(vec![FieldError::new(
            "payload",
            format!("cannot be stored: {e}"),
        )])
    })?;
    let now = DateTime::now();
    let due_at = event
        .send_at
        .filter(|t| *t > Utc::now())
        .map(|t| DateTime::from_millis(t.timestamp_millis()));
    let id = uuid::Uuid::now_v7().to_string();
    let notification = NotificationDoc {
        id: id.clone(),
        event_id: event
            .event_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        event_type: event.event_type.to_string(),
        priority: event.priority,
        status: if due_at.is_some() {
            NotificationStatus::Scheduled
        } else {
            NotificationStatus::Accepted
        },
        recipients: RecipientsDoc {
            user_ids: event
                .recipients
                .user_ids
                .iter()
                .map(|u| u.to_string())
                .collect(),
            group_id: event.recipients.group_id.map(|g| g.to_string()),
        },
        channels: event.channels,
        payload,
        source: source.to_owned(),
        send_at: event
            .send_at
            .map(|t| DateTime::from_millis(t.timestamp_millis())),
        upstream_created_at: event
            .upstream_created_at
            .map(|t| DateTime::from_millis(t.timestamp_millis())),
        created_at: now,
        updated_at: now,
        counts: Counts::default(),
        fanout_done: false,
    };
    let outbox = OutboxDoc {
        id: uuid::Uuid::now_v7().to_string(),
        notification_id: id,
        lane: event.priority,
        due_at: due_at.unwrap_or(now),
        lease_until: now,
        lease_token: None,
        created_at: now,
    };
    let accepted = ctx.store.accept(notification, outbox).await?;
    if matches!(accepted, Accepted::New(_)) {
        ctx.outbox_wake.notify_one();
    }
    Ok(accepted)
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
    match accept(&ctx, event, "amqp").await {
        Ok(Accepted::New(n)) => {
            tracing::info!(notification_id = %n.id, "event accepted from the exchange");
            Disposition::Ack
        }
        Ok(Accepted::Duplicate(n)) => {
            tracing::debug!(notification_id = %n.id, "repeated event from the exchange");
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
