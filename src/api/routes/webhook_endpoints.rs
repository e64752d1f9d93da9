//! `/v1/webhook-endpoints`: endpoints for delivery status events (Standard Webhooks), which events, and their secrets (shown once). herald does not post to them yet.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{rfc3339, Time};
use crate::api::error::{ApiError, JsonBody};
use crate::config::Settings;
use crate::domain::standard_webhooks::{SigningKey, EVENT_TYPES};
use crate::domain::FieldError;
use crate::store::webhook_endpoints::{EndpointDoc, EndpointPatch, EndpointSecret};
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
