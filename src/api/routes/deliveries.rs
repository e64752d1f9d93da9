//! `/v1/deliveries`: the delivery log — filtered cursor pages, one delivery with every
//! attempt, and a live stream of status changes (server-sent events).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::templates::RenderedBody;
use super::{rfc3339, Time};
use crate::api::error::{ApiError, QueryParams};
use crate::config::Settings;
use crate::domain::{Channel, DeliveryStatus, FieldError, Priority};
use crate::store::feedback::FeedbackKind;
use crate::store::{decode_token, ChangeFilter, DeliveryDoc, DeliveryFilter, LogCursor, Store};
use crate::worker::Worker;

/// Most items one page holds.
pub const PAGE_MAX: i64 = 500;

/// One delivery (recipient x channel) in the log.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    delivery_id: String,
    notification_id: String,
    event_type: String,
    user_id: String,
    channel: Channel,
    priority: Priority,
    /// The campaign that made it, if one did.
    schedule_id: Option<String>,
    status: DeliveryStatus,
    /// Why it was skipped, deferred or failed (a stable code).
    reason: Option<String>,
    provider: Option<String>,
    attempts: i32,
    last_error: Option<String>,
    created_at: Time,
    updated_at: Time,
    sent_at: Option<Time>,
    /// When the recipient marked it as spam.
    complained_at: Option<Time>,
    unsubscribed_at: Option<Time>,
    /// In-app: when the recipient first saw the inbox item, and first read it.
    seen_at: Option<Time>,
    read_at: Option<Time>,
}

impl From<&DeliveryDoc> for Delivery {
    fn from(d: &DeliveryDoc) -> Self {
        Self {
            delivery_id: d.id.clone(),
            notification_id: d.notification_id.clone(),
            event_type: d.event_type.clone(),
            user_id: d.user_id.clone(),
            channel: d.channel,
            priority: d.priority,
            schedule_id: d.schedule_id.clone(),
            status: d.status,
            reason: d.reason.clone(),
            provider: d.provider.clone(),
            attempts: d.attempt_count,
            last_error: d.last_error.clone(),
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
            sent_at: d.sent_at.map(rfc3339),
            complained_at: d.complained_at.map(rfc3339),
            unsubscribed_at: d.unsubscribed_at.map(rfc3339),
            seen_at: d.seen_at.map(rfc3339),
            read_at: d.read_at.map(rfc3339),
        }
    }
}

/// One page of the log.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    items: Vec<Delivery>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// One delivery with every attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryDetail {
    #[serde(flatten)]
    delivery: Delivery,
    attempt_log: Vec<Attempt>,
    /// What the providers reported after `sent`, in arrival order.
    feedback: Vec<FeedbackNote>,
}

/// One provider report on a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackNote {
    kind: FeedbackKind,
    provider: String,
    event_id: String,
    at: Time,
    detail: Option<String>,
}

/// One try at a provider.
#[derive(Debug, Serialize, ToSchema)]
pub struct Attempt {
    attempt_id: String,
    provider: Option<String>,
    status: DeliveryStatus,
    started_at: Time,
    finished_at: Time,
    duration_ms: i64,
    error: Option<String>,
    /// What the provider answered (message id, SMTP reply…).
    #[schema(value_type = Option<Object>)]
    response: Option<Value>,
}

/// A delivery's message rendered now.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPreview {
    delivery_id: String,
    channel: Channel,
    rendered: RenderedBody,
}

fn parse_status(s: Option<&str>, errors: &mut Vec<FieldError>) -> Option<DeliveryStatus> {
    let s = s?;
    serde_json::from_value::<DeliveryStatus>(json!(s))
        .map_err(|_| {
            errors.push(FieldError::new(
                "status",
                format!("unknown status `{s}` (queued, sending, sent, failed, retrying, dead, skipped, deferred)"),
            ))
        })
        .ok()
}

fn parse_channel(c: Option<&str>, errors: &mut Vec<FieldError>) -> Option<Channel> {
    c?.parse::<Channel>()
        .map_err(|e| errors.push(FieldError::new("channel", e)))
        .ok()
}

/// An RFC 3339 instant from a query parameter.
pub fn parse_instant(
    field: &str,
    v: Option<&str>,
    errors: &mut Vec<FieldError>,
) -> Option<mongodb::bson::DateTime> {
    let v = v?;
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| crate::store::bson_time(t.to_utc()))
        .map_err(|_| {
            errors.push(FieldError::new(
                field,
                format!("`{v}` is not an RFC 3339 time (e.g. 2026-11-22T09:00:00Z)"),
            ))
        })
        .ok()
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// One notification's deliveries.
    notification_id: Option<String>,
    /// One recipient's deliveries.
    user_id: Option<String>,
    #[param(value_type = Option<DeliveryStatus>, inline)]
    status: Option<String>,
    #[param(value_type = Option<Channel>, inline)]
    channel: Option<String>,
    /// One event type.
    event_type: Option<String>,
    /// Deliveries of one campaign.
    schedule_id: Option<String>,
    /// Created at or after.
    #[param(value_type = Option<String>, format = DateTime)]
    since: Option<String>,
    /// Created before (a window that ends before it starts is empty).
    #[param(value_type = Option<String>, format = DateTime)]
    until: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(min_length = 1)]
    cursor: Option<String>,
}

/// The delivery log, newest first, one index walk per page.
pub async fn list(
    State(store): State<Store>,
    QueryParams(q): QueryParams<LogQuery>,
) -> Result<Json<DeliveryPage>, ApiError> {
    let mut errors = Vec::new();
    let filter = DeliveryFilter {
        status: parse_status(q.status.as_deref(), &mut errors),
        channel: parse_channel(q.channel.as_deref(), &mut errors),
        since: parse_instant("since", q.since.as_deref(), &mut errors),
        until: parse_instant("until", q.until.as_deref(), &mut errors),
        notification_id: q.notification_id,
        user_id: q.user_id,
        event_type: q.event_type,
        schedule_id: q.schedule_id,
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=PAGE_MAX).contains(&limit) {
        errors.push(FieldError::new(
            "limit",
            format!("must be between 1 and {PAGE_MAX}"),
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(LogCursor::decode(c).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_cursor",
                "the cursor is not one this API handed out; start again without it",
            )
        })?),
    };
    let page = store
        .find_deliveries(&filter, cursor.as_ref(), limit)
        .await?;
    Ok(Json(DeliveryPage {
        items: page.items.iter().map(Delivery::from).collect(),
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

async fn load(store: &Store, id: &str) -> Result<DeliveryDoc, ApiError> {
    store
        .get_delivery(id)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery", id))
}

/// One delivery with every attempt and what the provider answered.
pub async fn get(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<DeliveryDetail>, ApiError> {
    let d = load(&store, &id).await?;
    let attempt_log = d
        .attempts
        .iter()
        .map(|a| Attempt {
            attempt_id: a.attempt_id.clone(),
            provider: a.provider.clone(),
            status: a.status,
            started_at: rfc3339(a.started_at),
            finished_at: rfc3339(a.finished_at),
            duration_ms: a.duration_ms,
            error: a.error.clone(),
            response: a
                .response
                .as_ref()
                .map(|r| mongodb::bson::Bson::Document(r.clone()).into_relaxed_extjson()),
        })
        .collect();
    let feedback = d
        .feedback
        .iter()
        .map(|f| FeedbackNote {
            kind: f.kind,
            provider: f.provider.clone(),
            event_id: f.event_id.clone(),
            at: rfc3339(f.at),
            detail: f.detail.clone(),
        })
        .collect();
    Ok(Json(DeliveryDetail {
        delivery: Delivery::from(&d),
        attempt_log,
        feedback,
    }))
}

/// The delivery's message rendered now (current template, current profile), as the
/// worker would render it; a template that fails says why instead.
pub async fn preview(
    State(store): State<Store>,
    State(worker): State<Worker>,
    Path(id): Path<String>,
) -> Result<Json<DeliveryPreview>, ApiError> {
    let d = load(&store, &id).await?;
    let rendered = crate::worker::deliver::render_now(&worker, &d)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "recipient_gone",
                "the delivery's notification or recipient no longer exists; nothing to render",
            )
        })?
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.reason(), e.to_string()))?;
    Ok(Json(DeliveryPreview {
        delivery_id: d.id,
        channel: d.channel,
        rendered: RenderedBody::from(rendered),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Only changes to this status.
    #[param(value_type = Option<DeliveryStatus>, inline)]
    status: Option<String>,
    #[param(value_type = Option<Channel>, inline)]
    channel: Option<String>,
    /// One event type.
    event_type: Option<String>,
}

/// Server-sent events: one `delivery` event per status change, its id a resume point.
/// A client that reconnects with `Last-Event-ID` gets every change after that one.
pub async fn stream(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<StreamQuery>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    let filter = ChangeFilter {
        status: parse_status(q.status.as_deref(), &mut errors),
        channel: parse_channel(q.channel.as_deref(), &mut errors),
        event_type: q.event_type,
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let resume = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(decode_token).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_cursor",
                "Last-Event-ID is not an event id this stream sent",
            )
        })?),
    };
    let resuming = resume.is_some();
    let changes = store.watch_deliveries(&filter, resume)
        .await
        .map_err(|e| match resuming {
            true => ApiError {
                cause: Some(e),
                ..ApiError::new(
                    StatusCode::GONE,
                    "resume_point_lost",
                    "the stream cannot resume from Last-Event-ID (too old or unknown); reconnect without it",
                )
            },
            false => ApiError::from(e),
        })?;
    // After a failure the stream ends; the client reconnects with the last id it saw.
    let events = changes.scan(false, |failed, change| {
        if *failed {
            return futures::future::ready(None);
        }
        let event = match change {
            Ok(c) => Event::default()
                .event("delivery")
                .id(c.resume)
                .json_data(Delivery::from(&c.delivery))
                .unwrap_or_else(|_| Event::default().comment("unencodable change")),
            Err(e) => {
                *failed = true;
                tracing::error!(error = format!("{e:#}"), "delivery change stream failed");
                Event::default()
                    .event("error")
                    .data("the change stream stopped; reconnect with Last-Event-ID")
            }
        };
        futures::future::ready(Some(Ok::<_, Infallible>(event)))
    });
    let heartbeat = Duration::from_secs(settings.server.sse_heartbeat_secs.max(1));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
        .into_response())
}
