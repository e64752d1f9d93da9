//! `/v1/notifications/{id}`: one accepted event and its delivery counters.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::rfc3339;
use crate::api::error::ApiError;
use crate::app::Context;

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
