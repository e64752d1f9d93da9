//! `POST /v1/events`: validate, de-duplicate, and durably accept before answering.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use crate::api::error::{read_body, ApiError, BodyLimit};
use crate::app::Context;
use crate::domain::event::{parse_event, EventError};
use crate::ingest::{AcceptError, AcceptedAs};
use crate::store::Accepted;

impl From<EventError> for ApiError {
    fn from(e: EventError) -> Self {
        let status = match e {
            EventError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            EventError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            EventError::Invalid(_) | EventError::NoRecipients => StatusCode::UNPROCESSABLE_ENTITY,
        };
        match e {
            EventError::Invalid(details) => ApiError::validation(details),
            other => ApiError::new(status, other.code(), other.message()),
        }
    }
}

impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::UnknownGroup(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string())
            }
            AcceptError::Invalid(details) => ApiError::validation(details),
            AcceptError::Schedule(e) => ApiError::from(e),
            AcceptError::Store(cause) => ApiError::from(cause),
        }
    }
}

/// How long a client refused for overload is asked to wait.
const OVERLOAD_RETRY_SECS: u64 = 2;

pub async fn post_event(
    State(ctx): State<Context>,
    Extension(limit): Extension<BodyLimit>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                "Idempotency-Key must be printable ASCII",
            )
        })?),
    };
    let key = key.map(str::to_owned);
    let body = read_body(req, limit.0).await?;
    let event = parse_event(&body, key.as_deref(), ctx.intake.limits())?;
    if let Err(waiting) = ctx.intake.admit().await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{waiting} deliveries are waiting (the bound is {}); nothing was written, retry after the given seconds",
                ctx.settings.events.max_backlog
            ),
        )
        .retry_after(OVERLOAD_RETRY_SECS));
    }
    let (status, n) = match ctx.intake.accept_event(event, "api").await? {
        AcceptedAs::Notification(Accepted::New(n)) => (StatusCode::ACCEPTED, n),
        AcceptedAs::Notification(Accepted::Duplicate(n)) => (StatusCode::OK, n),
        AcceptedAs::Schedule { schedule, created } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            return Ok((
                status,
                Json(json!({
                    "schedule_id": schedule.id,
                    "next_fire_at": schedule.next_fire_at.map(super::rfc3339),
                })),
            )
                .into_response());
        }
    };
    Ok((
        status,
        Json(json!({"notification_id": n.id, "event_id": n.event_id, "status": "accepted"})),
    )
        .into_response())
}
