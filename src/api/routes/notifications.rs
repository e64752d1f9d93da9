//! `/v1/notifications/{id}`: one accepted event and its delivery counters.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{rfc3339, Time};
use crate::api::error::ApiError;
use crate::domain::{NotificationStatus, Priority};
use crate::store::{Counts, Store};

/// An accepted event and its deliveries' counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct Notification {
    notification_id: String,
    event_id: String,
    event_type: String,
    priority: Priority,
    status: NotificationStatus,
    created_at: Time,
    send_at: Option<Time>,
    counts: Counts,
}

pub async fn get_notification(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<Notification>, ApiError> {
    let n = store
        .get_notification(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("notification", &id))?;
    Ok(Json(Notification {
        notification_id: n.id,
        event_id: n.event_id,
        event_type: n.event_type,
        priority: n.priority,
        status: n.status,
        created_at: rfc3339(n.created_at),
        send_at: n.send_at.map(rfc3339),
        counts: n.counts,
    }))
}
