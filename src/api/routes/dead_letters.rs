//! `/v1/dead-letters`: deliveries that failed for good, to inspect and replay.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{rfc3339, Time};
use crate::api::error::{ApiError, JsonBody, QueryParams};
use crate::domain::{Channel, DeliveryStatus, FieldError};
use crate::outbox::Relay;
use crate::store::{DeadLetterDoc, DeadLetterFilter, Store};

/// Most dead letters one bulk replay touches.
const BULK_REPLAY_MAX: i64 = 10_000;

/// A delivery that failed for good.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetter {
    dead_letter_id: String,
    delivery_id: String,
    notification_id: String,
    event_type: String,
    user_id: String,
    channel: Channel,
    status: DeliveryStatus,
    reason: Option<String>,
    last_error: Option<String>,
    attempts: i32,
    created_at: Time,
    replayed_at: Option<Time>,
    replay_count: i32,
}

impl From<&DeadLetterDoc> for DeadLetter {
    fn from(d: &DeadLetterDoc) -> Self {
        Self {
            dead_letter_id: d.id.clone(),
            delivery_id: d.id.clone(),
            notification_id: d.notification_id.clone(),
            event_type: d.event_type.clone(),
            user_id: d.user_id.clone(),
            channel: d.channel,
            status: d.status,
            reason: d.reason.clone(),
            last_error: d.last_error.clone(),
            attempts: d.attempts,
            created_at: rfc3339(d.created_at),
            replayed_at: d.replayed_at.map(rfc3339),
            replay_count: d.replay_count,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    items: Vec<DeadLetter>,
}

/// What a replay re-enqueued.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    replayed: u64,
    /// The delivery sent again (one letter's replay).
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_id: Option<String>,
}

/// Which pending dead letters to replay: those matching every given field.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilter {
    notification_id: Option<String>,
    #[schema(value_type = Option<Channel>)]
    channel: Option<String>,
    reason: Option<String>,
}

#[derive(Debug, Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FilterQuery {
    /// One notification's letters.
    notification_id: Option<String>,
    #[param(value_type = Option<Channel>, inline)]
    channel: Option<String>,
    /// One reason.
    reason: Option<String>,
    /// Include letters already replayed (default false).
    include_replayed: Option<bool>,
    /// Most letters to list (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// The store's filter from the given fields.
fn filter(
    notification_id: &Option<String>,
    channel: &Option<String>,
    reason: &Option<String>,
    include_replayed: bool,
) -> Result<DeadLetterFilter, ApiError> {
    let channel = match channel {
        None => None,
        Some(c) => Some(
            c.parse::<Channel>()
                .map_err(|e| ApiError::validation(vec![FieldError::new("channel", e)]))?,
        ),
    };
    Ok(DeadLetterFilter {
        notification_id: notification_id.clone(),
        channel,
        reason: reason.clone(),
        include_replayed,
    })
}

impl FilterQuery {
    fn filter(&self) -> Result<DeadLetterFilter, ApiError> {
        filter(
            &self.notification_id,
            &self.channel,
            &self.reason,
            self.include_replayed.unwrap_or(false),
        )
    }
}

pub async fn list(
    State(store): State<Store>,
    QueryParams(q): QueryParams<FilterQuery>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation(vec![FieldError::new(
            "limit",
            "must be between 1 and 1000",
        )]));
    }
    let items = store.list_dead_letters(&q.filter()?, limit).await?;
    Ok(Json(DeadLetterList {
        items: items.iter().map(DeadLetter::from).collect(),
    }))
}

/// Re-enqueues one dead letter's delivery.
pub async fn replay(
    State(store): State<Store>,
    State(relay): State<Relay>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Replayed>), ApiError> {
    let letter = store
        .replay_dead_letter(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("pending dead letter", &id))?;
    relay.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(Replayed {
            replayed: 1,
            delivery_id: Some(letter.id),
        }),
    ))
}

/// Re-enqueues every pending dead letter matching a filter (`notification_id`,
/// `channel`, `reason`), up to 10,000 at a time.
pub async fn replay_many(
    State(store): State<Store>,
    State(relay): State<Relay>,
    JsonBody(q): JsonBody<ReplayFilter>,
) -> Result<(StatusCode, Json<Replayed>), ApiError> {
    let filter = filter(&q.notification_id, &q.channel, &q.reason, false)?;
    let letters = store.list_dead_letters(&filter, BULK_REPLAY_MAX).await?;
    let mut replayed = 0;
    for l in &letters {
        if store.replay_dead_letter(&l.id).await?.is_some() {
            replayed += 1;
        }
    }
    relay.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(Replayed {
            replayed,
            delivery_id: None,
        }),
    ))
}
