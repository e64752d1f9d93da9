//! `/v1/keys`: API keys for `admin` callers (a key is shown once, when created).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{rfc3339, Time};
use crate::api::auth::Auth;
use crate::api::error::{ApiError, JsonBody};
use crate::domain::{FieldError, Rate, Scope};
use crate::store::{ApiKeyDoc, Store};

/// An API key (never its secret, except in the answer to its creation).
#[derive(Debug, Serialize, ToSchema)]
pub struct Key {
    key_id: String,
    name: String,
    scopes: Vec<Scope>,
    /// Requests per second this key may make (null: the configured default).
    rate_per_sec: Option<f64>,
    created_at: Time,
    revoked_at: Option<Time>,
    /// The secret: only in the answer to the key's creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

impl From<&ApiKeyDoc> for Key {
    fn from(k: &ApiKeyDoc) -> Self {
        Self {
            key_id: k.id.clone(),
            name: k.name.clone(),
            scopes: k.scopes.clone(),
            rate_per_sec: k.rate_per_sec,
            created_at: rfc3339(k.created_at),
            revoked_at: k.revoked_at.map(rfc3339),
            key: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    items: Vec<Key>,
}

/// A key to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    name: String,
    #[schema(value_type = Vec<Scope>, min_items = 1)]
    scopes: Vec<String>,
    /// Requests per second (default: the configured rate).
    #[schema(minimum = 0.001, maximum = 1000000000.0)]
    rate_per_sec: Option<f64>,
}

pub async fn create(
    State(store): State<Store>,
    JsonBody(body): JsonBody<NewKey>,
) -> Result<(StatusCode, Json<Key>), ApiError> {
    let mut errors = Vec::new();
    let name = body.name.trim();
    if name.is_empty() || body.name.chars().count() > 100 {
        errors.push(FieldError::new(
            "name",
            "give a name of 1 to 100 characters",
        ));
    }
    let scopes = Scope::parse_list(&body.scopes.join(","))
        .map_err(|e| errors.push(FieldError::new("scopes", e)))
        .unwrap_or_default();
    let rate = body
        .rate_per_sec
        .map(Rate::new)
        .transpose()
        .map_err(|e| errors.push(FieldError::new("rate_per_sec", e)))
        .unwrap_or_default();
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let (key, plain) = store.create_key(name, &scopes, rate).await?;
    let created = Key {
        key: Some(plain),
        ..Key::from(&key)
    };
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(State(store): State<Store>) -> Result<Json<KeyList>, ApiError> {
    let keys = store.list_keys().await?;
    Ok(Json(KeyList {
        items: keys.iter().map(Key::from).collect(),
    }))
}

pub async fn revoke(
    State(store): State<Store>,
    Extension(auth): Extension<Arc<Auth>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !store.revoke_key(&id).await? {
        return Err(ApiError::not_found("API key", &id));
    }
    auth.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}
