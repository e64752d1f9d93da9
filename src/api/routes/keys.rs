//! `/v1/keys`: API keys for `admin` callers (a key is shown once, when created).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::rfc3339;
use crate::api::auth::Auth;
use crate::api::error::{ApiError, JsonBody};
use crate::app::Context;
use crate::domain::{FieldError, Rate, Scope};
use crate::store::ApiKeyDoc;

pub fn key_json(k: &ApiKeyDoc) -> Value {
    json!({
        "key_id": k.id,
        "name": k.name,
        "scopes": k.scopes,
        "rate_per_sec": k.rate_per_sec,
        "created_at": rfc3339(k.created_at),
        "revoked_at": k.revoked_at.map(rfc3339),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    name: String,
    scopes: Vec<String>,
    rate_per_sec: Option<f64>,
}

pub async fn create(
    State(ctx): State<Context>,
    JsonBody(body): JsonBody<NewKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut errors = Vec::new();
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
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
    let (key, plain) = ctx.store.create_key(name, &scopes, rate).await?;
    let mut out = key_json(&key);
    out["key"] = json!(plain);
    Ok((StatusCode::CREATED, Json(out)))
}

pub async fn list(State(ctx): State<Context>) -> Result<Json<Value>, ApiError> {
    let keys = ctx.store.list_keys().await?;
    Ok(Json(
        json!({"items": keys.iter().map(key_json).collect::<Vec<_>>()}),
    ))
}

pub async fn revoke(
    State(ctx): State<Context>,
    Extension(auth): Extension<Arc<Auth>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !ctx.store.revoke_key(&id).await? {
        return Err(ApiError::not_found("API key", &id));
    }
    auth.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}
