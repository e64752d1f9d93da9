//! `/v1/dead-letters`: deliveries that failed for good, to inspect and replay.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::rfc3339;
use crate::api::error::{ApiError, JsonBody, QueryParams};
use crate::app::Context;
use crate::domain::{Channel, FieldError};
use crate::store::{DeadLetterDoc, DeadLetterFilter};

/// Most dead letters one bulk replay touches.
const BULK_REPLAY_MAX: i64 = 10_000;

fn letter_json(d: &DeadLetterDoc) -> Value {
    json!({
        "dead_letter_id": d.id,
        "delivery_id": d.id,
        "notification_id": d.notification_id,
        "event_type": d.event_type,
        "user_id": d.user_id,
        "channel": d.channel,
        "status": d.status,
        "reason": d.reason,
        "last_error": d.last_error,
        "attempts": d.attempts,
        "created_at": rfc3339(d.created_at),
        "replayed_at": d.replayed_at.map(rfc3339),
        "replay_count": d.replay_count,
    })
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FilterQuery {
    notification_id: Option<String>,
    channel: Option<String>,
    reason: Option<String>,
    include_replayed: Option<bool>,
    limit: Option<i64>,
}

impl FilterQuery {
    fn filter(&self) -> Result<DeadLetterFilter, ApiError> {
        let channel = match &self.channel {
            None => None,
            Some(c) => Some(
                c.parse::<Channel>()
                    .map_err(|e| ApiError::validation(vec![FieldError::new("channel", e)]))?,
            ),
        };
        Ok(DeadLetterFilter {
            notification_id: self.notification_id.clone(),
            channel,
            reason: self.reason.clone(),
            include_replayed: self.include_replayed.unwrap_or(false),
        })
    }
}

pub async fn list(
    State(ctx): State<Context>,
    QueryParams(q): QueryParams<FilterQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation(vec![FieldError::new(
            "limit",
            "must be between 1 and 1000",
        )]));
    }
    let items = ctx.store.list_dead_letters(&q.filter()?, limit).await?;
    Ok(Json(
        json!({"items": items.iter().map(letter_json).collect::<Vec<_>>()}),
    ))
}

/// Re-enqueues one dead letter's delivery.
pub async fn replay(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let letter = ctx
        .store
        .replay_dead_letter(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("pending dead letter", &id))?;
    ctx.relay.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"replayed": 1, "delivery_id": letter.id})),
    ))
}

/// Re-enqueues every pending dead letter matching a filter (`notification_id`,
/// `channel`, `reason`), up to 10,000 at a time.
pub async fn replay_many(
    State(ctx): State<Context>,
    JsonBody(q): JsonBody<FilterQuery>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if q.include_replayed.is_some() || q.limit.is_some() {
        return Err(ApiError::validation(vec![FieldError::new(
            "body",
            "filter with notification_id, channel and reason",
        )]));
    }
    let letters = ctx
        .store
        .list_dead_letters(&q.filter()?, BULK_REPLAY_MAX)
        .await?;
    let mut replayed = 0;
    for l in &letters {
        if ctx.store.replay_dead_letter(&l.id).await?.is_some() {
            replayed += 1;
        }
    }
    ctx.relay.wake();
    Ok((StatusCode::ACCEPTED, Json(json!({"replayed": replayed}))))
}
