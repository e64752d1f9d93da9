//! `/v1/webhook-endpoints` and `/v1/webhook-messages`: endpoints for delivery status events (Standard Webhooks), their secrets (shown once), their messages and tries, replay and retry.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::deliveries::parse_instant;
use super::{rfc3339, Time};
use crate::api::error::{ApiError, JsonBody, QueryParams};
use crate::config::Settings;
use crate::domain::standard_webhooks::{SigningKey, EVENT_TYPES};
use crate::domain::FieldError;
use crate::store::webhook_endpoints::{EndpointDoc, EndpointPatch, EndpointSecret};
use crate::store::webhook_messages::{HookAttemptDoc, HookMessageDoc, MessageState, PAGE_MAX};
use crate::store::Store;

/// The event types an endpoint can receive.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
pub enum WebhookEventType {
    #[serde(rename = "message.sent")]
    Sent,
    #[serde(rename = "message.delivered")]
    Delivered,
    #[serde(rename = "message.bounced")]
    Bounced,
    #[serde(rename = "message.undelivered")]
    Undelivered,
    #[serde(rename = "message.failed")]
    Failed,
    #[serde(rename = "message.dead")]
    Dead,
    #[serde(rename = "message.skipped")]
    Skipped,
    #[serde(rename = "message.complained")]
    Complained,
    #[serde(rename = "message.unsubscribed")]
    Unsubscribed,
    #[serde(rename = "message.seen")]
    Seen,
    #[serde(rename = "message.read")]
    Read,
    #[serde(rename = "notification.completed")]
    Completed,
}

/// An endpoint; `secret` only in the answers to its creation and to a rotation. (No
/// `Debug`: it may hold the secret.)
#[derive(Serialize, ToSchema)]
pub struct Endpoint {
    id: String,
    url: String,
    #[schema(value_type = Vec<WebhookEventType>)]
    events: Vec<String>,
    description: String,
    enabled: bool,
    /// Why herald disabled it (null while enabled, or disabled through the API).
    disabled_reason: Option<String>,
    /// Since when every try has failed (null: the last try succeeded).
    failing_since: Option<Time>,
    /// Whether `data` carries addresses and the payload (off: ids, statuses, times).
    include_contact: bool,
    created_at: Time,
    updated_at: Time,
    /// `whsec_…`: verify with any Standard Webhooks library. Shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    /// After a rotation: until when the previous secret also signs.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_secret_expires_at: Option<Time>,
}

impl From<&EndpointDoc> for Endpoint {
    fn from(e: &EndpointDoc) -> Self {
        Self {
            id: e.id.clone(),
            url: e.url.clone(),
            events: e.events.clone(),
            description: e.description.clone(),
            enabled: e.enabled,
            disabled_reason: e.disabled_reason.clone(),
            failing_since: e.failing_since.map(rfc3339),
            include_contact: e.include_contact,
            created_at: rfc3339(e.created_at),
            updated_at: rfc3339(e.updated_at),
            secret: None,
            previous_secret_expires_at: None,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct EndpointList {
    items: Vec<Endpoint>,
}

/// An endpoint to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct NewEndpoint {
    /// An absolute http(s) URL on a public address.
    #[schema(pattern = "^https?://", max_length = 2048)]
    url: String,
    #[schema(value_type = Vec<WebhookEventType>, min_items = 1)]
    events: Vec<String>,
    #[serde(default)]
    #[schema(max_length = 200)]
    description: String,
    /// Default true.
    enabled: Option<bool>,
    /// Default false.
    include_contact: Option<bool>,
}

/// A change to an endpoint: any of the fields of a new one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct EndpointChange {
    #[schema(pattern = "^https?://", max_length = 2048)]
    url: Option<String>,
    #[schema(value_type = Option<Vec<WebhookEventType>>, min_items = 1)]
    events: Option<Vec<String>>,
    #[schema(max_length = 200)]
    description: Option<String>,
    enabled: Option<bool>,
    include_contact: Option<bool>,
}

/// The checked fields of a body (a new endpoint's, or a change's), naming every bad one.
fn checked(
    body: &Map<String, Value>,
    settings: &Settings,
    creating: bool,
) -> Result<EndpointPatch, ApiError> {
    let mut errors = Vec::new();
    let mut patch = EndpointPatch::default();
    for (k, v) in body {
        match (k.as_str(), v) {
            ("url", Value::String(u)) => match url::Url::parse(u) {
                Ok(parsed) if u.len() <= 2048 => {
                    match crate::channels::http::check_target(
                        &parsed,
                        settings.webhook.allow_internal_targets,
                    ) {
                        Ok(()) => patch.url = Some(u.clone()),
                        Err(why) => errors.push(FieldError::new("url", why)),
                    }
                }
                _ => errors.push(FieldError::new(
                    "url",
                    "must be an absolute http(s) URL of at most 2048 characters",
                )),
            },
            ("events", Value::Array(list)) => {
                let mut events = Vec::new();
                for e in list {
                    match e.as_str().filter(|e| EVENT_TYPES.contains(e)) {
                        Some(e) if !events.iter().any(|x| x == e) => events.push(e.to_owned()),
                        Some(_) => {}
                        None => errors.push(FieldError::new(
                            "events",
                            format!("unknown event type {e} ({})", EVENT_TYPES.join(", ")),
                        )),
                    }
                }
                if list.is_empty() {
                    errors.push(FieldError::new("events", "name at least one event type"));
                }
                patch.events = Some(events);
            }
            ("description", Value::String(d)) if d.chars().count() <= 200 => {
                patch.description = Some(d.clone())
            }
            ("description", Value::String(_)) => {
                errors.push(FieldError::new("description", "is over 200 characters"))
            }
            ("enabled", Value::Bool(b)) => patch.enabled = Some(*b),
            ("include_contact", Value::Bool(b)) => patch.include_contact = Some(*b),
            // Null: unchanged (a new endpoint still needs its url and events, below).
            ("url" | "events" | "description" | "enabled" | "include_contact", Value::Null) => {}
            ("url" | "events" | "description" | "enabled" | "include_contact", _) => {
                errors.push(FieldError::new(k.clone(), "has the wrong type"))
            }
            _ => errors.push(FieldError::new(
                k.clone(),
                "unknown field (url, events, description, enabled, include_contact)",
            )),
        }
    }
    if creating {
        if patch.url.is_none() && !errors.iter().any(|e| e.field == "url") {
            errors.push(FieldError::new("url", "is required"));
        }
        if patch.events.is_none() {
            errors.push(FieldError::new("events", "is required"));
        }
    }
    if errors.is_empty() {
        Ok(patch)
    } else {
        Err(ApiError::validation(errors))
    }
}

/// `POST /v1/webhook-endpoints`.
pub async fn create(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<(StatusCode, Json<Endpoint>), ApiError> {
    let p = checked(&body, &settings, true)?;
    let now = mongodb::bson::DateTime::now();
    let secret = SigningKey::generate().to_text();
    let doc = EndpointDoc {
        id: format!("ep_{}", uuid::Uuid::now_v7().simple()),
        url: p.url.unwrap_or_default(),
        events: p.events.unwrap_or_default(),
        description: p.description.unwrap_or_default(),
        enabled: p.enabled.unwrap_or(true),
        disabled_reason: None,
        include_contact: p.include_contact.unwrap_or(false),
        secrets: vec![EndpointSecret {
            secret: secret.clone(),
            created_at: now,
            expires_at: None,
        }],
        created_at: now,
        updated_at: now,
        failing_since: None,
    };
    store.create_endpoint(&doc).await?;
    let mut shown = Endpoint::from(&doc);
    shown.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(shown)))
}

/// `GET /v1/webhook-endpoints`.
pub async fn list(State(store): State<Store>) -> Result<Json<EndpointList>, ApiError> {
    let items = store.endpoints().await?;
    Ok(Json(EndpointList {
        items: items.iter().map(Endpoint::from).collect(),
    }))
}

/// `GET /v1/webhook-endpoints/{id}`.
pub async fn get(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    store
        .endpoint(&id)
        .await?
        .map(|e| Json(Endpoint::from(&e)))
        .ok_or_else(|| ApiError::not_found("webhook endpoint", &id))
}

/// `PATCH /v1/webhook-endpoints/{id}`.
pub async fn patch(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<Endpoint>, ApiError> {
    let p = checked(&body, &settings, false)?;
    store
        .patch_endpoint(&id, &p)
        .await?
        .map(|e| Json(Endpoint::from(&e)))
        .ok_or_else(|| ApiError::not_found("webhook endpoint", &id))
}

/// `DELETE /v1/webhook-endpoints/{id}`.
pub async fn delete(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if store.delete_endpoint(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("webhook endpoint", &id))
    }
}

/// `POST /v1/webhook-endpoints/{id}/rotate-secret`: a new secret (shown once); the
/// previous one signs beside it for 24 hours.
pub async fn rotate(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    let secret = SigningKey::generate().to_text();
    let e = store
        .rotate_endpoint_secret(&id, &secret)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint", &id))?;
    let mut shown = Endpoint::from(&e);
    shown.previous_secret_expires_at = e
        .secrets
        .iter()
        .filter_map(|s| s.expires_at)
        .max()
        .map(rfc3339);
    shown.secret = Some(secret);
    Ok(Json(shown))
}

/// A status event for one endpoint, as sent (`id` is its `webhook-id`).
#[derive(Serialize, ToSchema)]
pub struct WebhookMessage {
    id: String,
    endpoint_id: String,
    #[schema(value_type = WebhookEventType)]
    r#type: String,
    /// The body as signed and sent: `{"type", "timestamp", "data"}`.
    payload: Value,
    #[schema(value_type = MessageStateName)]
    state: MessageState,
    /// Tries since it was created, replayed or retried.
    attempts: i32,
    /// When the next try is due (pending only).
    next_attempt_at: Option<Time>,
    last_attempt_at: Option<Time>,
    last_status_code: Option<i32>,
    last_error: Option<String>,
    delivered_at: Option<Time>,
    created_at: Time,
}

/// Where a message is.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "snake_case")]
pub enum MessageStateName {
    Pending,
    Delivered,
    Failed,
}

impl From<&HookMessageDoc> for WebhookMessage {
    fn from(m: &HookMessageDoc) -> Self {
        Self {
            id: m.id.clone(),
            endpoint_id: m.endpoint_id.clone(),
            r#type: m.kind.clone(),
            payload: serde_json::from_str(&m.body).unwrap_or(Value::Null),
            state: m.state,
            attempts: m.attempts,
            next_attempt_at: (m.state == MessageState::Pending).then(|| rfc3339(m.due_at)),
            last_attempt_at: m.last_attempt_at.map(rfc3339),
            last_status_code: m.last_status_code,
            last_error: m.last_error.clone(),
            delivered_at: m.delivered_at.map(rfc3339),
            created_at: rfc3339(m.created_at),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct WebhookMessagePage {
    items: Vec<WebhookMessage>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// One try of a message.
#[derive(Serialize, ToSchema)]
pub struct WebhookAttempt {
    id: String,
    message_id: String,
    #[schema(value_type = WebhookEventType)]
    r#type: String,
    at: Time,
    /// The HTTP status answered; null when none came (refused, timed out).
    status_code: Option<i32>,
    duration_ms: i64,
    error: Option<String>,
    /// The start of the answer's body.
    response: String,
}

impl From<&HookAttemptDoc> for WebhookAttempt {
    fn from(a: &HookAttemptDoc) -> Self {
        Self {
            id: a.id.clone(),
            message_id: a.message_id.clone(),
            r#type: a.kind.clone(),
            at: rfc3339(a.at),
            status_code: a.status_code,
            duration_ms: a.duration_ms,
            error: a.error.clone(),
            response: a.response.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct WebhookAttemptPage {
    items: Vec<WebhookAttempt>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page (a try's id).
    #[param(pattern = "^att_.+")]
    cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MessageQuery {
    /// Only messages in this state.
    #[param(value_type = Option<MessageStateName>, inline)]
    state: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page (a message's id).
    #[param(pattern = "^msg_.+")]
    cursor: Option<String>,
}

/// The page size asked for, checked.
fn page_limit(limit: Option<i64>, errors: &mut Vec<FieldError>) -> i64 {
    let limit = limit.unwrap_or(50);
    if !(1..=PAGE_MAX).contains(&limit) {
        errors.push(FieldError::new(
            "limit",
            format!("must be between 1 and {PAGE_MAX}"),
        ));
    }
    limit
}

/// A cursor as handed out (the last id of a page: `prefix` and more), or 400.
fn cursor<'a>(given: Option<&'a str>, prefix: &str) -> Result<Option<&'a str>, ApiError> {
    match given {
        None => Ok(None),
        Some(c) if c.len() > prefix.len() && c.starts_with(prefix) => Ok(Some(c)),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            "the cursor is not one this API handed out; start again without it",
        )),
    }
}

/// A full page's last id, to go on after; none after a short page.
fn next_cursor<T>(items: &[T], limit: i64, id: impl Fn(&T) -> &String) -> Option<String> {
    (items.len() as i64 == limit)
        .then(|| items.last().map(|x| id(x).clone()))
        .flatten()
}

/// The endpoint named in the path, or 404.
async fn existing(store: &Store, id: &str) -> Result<EndpointDoc, ApiError> {
    store
        .endpoint(id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint", id))
}

/// `GET /v1/webhook-endpoints/{id}/messages`: its messages, newest first.
pub async fn messages(
    State(store): State<Store>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<MessageQuery>,
) -> Result<Json<WebhookMessagePage>, ApiError> {
    let mut errors = Vec::new();
    let state = match q.state.as_deref() {
        None => None,
        Some("pending") => Some(MessageState::Pending),
        Some("delivered") => Some(MessageState::Delivered),
        Some("failed") => Some(MessageState::Failed),
        Some(_) => {
            errors.push(FieldError::new(
                "state",
                "is one of pending, delivered, failed",
            ));
            None
        }
    };
    let limit = page_limit(q.limit, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    existing(&store, &id).await?;
    let after = cursor(q.cursor.as_deref(), "msg_")?;
    let items = store.hook_messages_page(&id, state, after, limit).await?;
    let next_cursor = next_cursor(&items, limit, |m| &m.id);
    Ok(Json(WebhookMessagePage {
        items: items.iter().map(WebhookMessage::from).collect(),
        next_cursor,
    }))
}

/// `GET /v1/webhook-endpoints/{id}/attempts`: its tries, newest first.
pub async fn attempts(
    State(store): State<Store>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Result<Json<WebhookAttemptPage>, ApiError> {
    let mut errors = Vec::new();
    let limit = page_limit(q.limit, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    existing(&store, &id).await?;
    let after = cursor(q.cursor.as_deref(), "att_")?;
    let items = store.hook_attempts_page(&id, after, limit).await?;
    let next_cursor = next_cursor(&items, limit, |a| &a.id);
    Ok(Json(WebhookAttemptPage {
        items: items.iter().map(WebhookAttempt::from).collect(),
        next_cursor,
    }))
}

/// A time range of an endpoint's messages to send again.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ReplayBody {
    /// Messages created at or after.
    #[schema(value_type = String, format = DateTime)]
    since: String,
    /// Messages created before (default: now).
    #[schema(value_type = Option<String>, format = DateTime)]
    until: Option<String>,
    /// Also those delivered already (default: only the failed and the waiting).
    include_delivered: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct WebhooksReplayed {
    /// Messages due again now (each keeps its `webhook-id`).
    replayed: u64,
}

/// `POST /v1/webhook-endpoints/{id}/replay`: sends again what it did not get.
pub async fn replay(
    State(store): State<Store>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<(StatusCode, Json<WebhooksReplayed>), ApiError> {
    let mut errors = Vec::new();
    let text = |k: &str, errors: &mut Vec<FieldError>| match body.get(k) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(k, "has the wrong type"));
            None
        }
    };
    let since_text = text("since", &mut errors);
    let until_text = text("until", &mut errors);
    let include_delivered = match body.get("include_delivered") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.push(FieldError::new("include_delivered", "has the wrong type"));
            false
        }
    };
    for k in body.keys() {
        if !["since", "until", "include_delivered"].contains(&k.as_str()) {
            errors.push(FieldError::new(
                k.clone(),
                "unknown field (since, until, include_delivered)",
            ));
        }
    }
    if since_text.is_none() && !errors.iter().any(|e| e.field == "since") {
        errors.push(FieldError::new("since", "is required"));
    }
    let since = parse_instant("since", since_text.as_deref(), &mut errors);
    let until = parse_instant("until", until_text.as_deref(), &mut errors)
        .unwrap_or_else(mongodb::bson::DateTime::now);
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let endpoint = existing(&store, &id).await?;
    if !endpoint.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "endpoint_disabled",
            "the endpoint is disabled; enable it (PATCH enabled: true) before replaying",
        ));
    }
    let replayed = match since {
        Some(since) => {
            store
                .replay_hooks(&id, since, until, include_delivered)
                .await?
        }
        None => 0,
    };
    Ok((StatusCode::ACCEPTED, Json(WebhooksReplayed { replayed })))
}

/// `POST /v1/webhook-messages/{id}/retry`: sends one message again, from a fresh schedule.
pub async fn retry(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<WebhookMessage>), ApiError> {
    let m = store
        .hook_message(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook message", &id))?;
    if !existing(&store, &m.endpoint_id).await?.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "endpoint_disabled",
            "the message's endpoint is disabled; enable it (PATCH enabled: true) first",
        ));
    }
    let m = store
        .retry_hook_message(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook message", &id))?;
    Ok((StatusCode::ACCEPTED, Json(WebhookMessage::from(&m))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_event_types_are_exactly_the_ones_accepted() {
        for t in EVENT_TYPES {
            let parsed: WebhookEventType =
                serde_json::from_value(Value::String(t.into())).expect("in the document");
            assert_eq!(
                serde_json::to_value(parsed).ok(),
                Some(Value::String(t.into()))
            );
        }
        assert!(
            serde_json::from_value::<WebhookEventType>(Value::String("message.nope".into()))
                .is_err()
        );
    }
}
