//! Notifications and their deliveries, as ops and upstream systems see them.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::rfc3339;
use crate::api::error::ApiError;
use crate::app::Context;
use crate::domain::{Channel, DeliveryStatus, FieldError};
use crate::store::{DeliveryDoc, DeliveryFilter};

pub async fn get_notification(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let n = ctx
        .store
        .get_notification(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("notification", &id))?;
    Ok(Json(json!({
        "notification_id": n.id,
        "event_id": n.event_id,
        "event_type": n.event_type,
        "priority": n.priority,
        "status": n.status,
        "created_at": rfc3339(n.created_at),
        "send_at": n.send_at.map(rfc3339),
        "counts": n.counts,
    })))
}

fn delivery_json(d: &DeliveryDoc) -> Value {
    json!({
        "delivery_id": d.id,
        "notification_id": d.notification_id,
        "event_type": d.event_type,
        "user_id": d.user_id,
        "channel": d.channel,
        "status": d.status,
        "reason": d.reason,
        "provider": d.provider,
        "attempts": d.attempt_count,
        "last_error": d.last_error,
        "created_at": rfc3339(d.created_at),
        "updated_at": rfc3339(d.updated_at),
        "sent_at": d.sent_at.map(rfc3339),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    notification_id: Option<String>,
    user_id: Option<String>,
    status: Option<String>,
    channel: Option<String>,
    limit: Option<i64>,
}

/// The delivery log, newest first. Full filtering and cursors come with the ops surface.
pub async fn list_deliveries(
    State(ctx): State<Context>,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::validation(vec![FieldError::new("query", e.body_text())]))?;
    let mut errors = Vec::new();
    let status = q.status.as_deref().and_then(|s| {
        serde_json::from_value::<DeliveryStatus>(json!(s))
            .map_err(|_| errors.push(FieldError::new("status", format!("unknown status `{s}`"))))
            .ok()
    });
    let channel = q.channel.as_deref().and_then(|c| {
        c.parse::<Channel>()
            .map_err(|e| errors.push(FieldError::new("channel", e)))
            .ok()
    });
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        errors.push(FieldError::new("limit", "must be between 1 and 500"));
    }
    if q.notification_id.is_none() && q.user_id.is_none() {
        errors.push(FieldError::new(
            "notification_id",
            "give notification_id or user_id",
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let items = ctx
        .store
        .find_deliveries(
            &DeliveryFilter {
                notification_id: q.notification_id,
                user_id: q.user_id,
                status,
                channel,
            },
            limit,
        )
        .await?;
    Ok(Json(json!({
        "items": items.iter().map(delivery_json).collect::<Vec<_>>(),
        "next_cursor": Value::Null,
    })))
}

pub async fn get_delivery(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let d = ctx
        .store
        .get_delivery(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery", &id))?;
    let mut body = delivery_json(&d);
    body["attempt_log"] = d
        .attempts
        .iter()
        .map(|a| {
            json!({
                "attempt_id": a.attempt_id,
                "provider": a.provider,
                "status": a.status,
                "started_at": rfc3339(a.started_at),
                "finished_at": rfc3339(a.finished_at),
                "duration_ms": a.duration_ms,
                "error": a.error,
                "response": a.response.as_ref().map(|r| mongodb::bson::Bson::Document(r.clone()).into_relaxed_extjson()),
            })
        })
        .collect();
    Ok(Json(body))
}
