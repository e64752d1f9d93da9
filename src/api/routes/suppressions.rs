//! `/v1/suppressions`: the addresses herald no longer sends to — added by hard bounces,
//! complaints and invalid numbers, or by an operator — and lifting them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{rfc3339, Time};
use crate::api::error::{ApiError, JsonBody, QueryParams};
use crate::domain::{Channel, FieldError};
use crate::store::suppressions::{SuppressionDoc, SuppressionFilter, SuppressionReason};
use crate::store::Store;

/// A suppressed address.
#[derive(Debug, Serialize, ToSchema)]
pub struct Suppression {
    channel: Channel,
    /// Normalised: an email lower-cased, a phone number's digits with its `+`.
    address: String,
    reason: SuppressionReason,
    /// The delivery whose feedback caused it, if one did.
    delivery_id: Option<String>,
    note: Option<String>,
    created_at: Time,
}

impl From<SuppressionDoc> for Suppression {
    fn from(s: SuppressionDoc) -> Self {
        Self {
            channel: s.channel,
            address: s.address,
            reason: s.reason,
            delivery_id: s.delivery_id,
            note: s.note,
            created_at: rfc3339(s.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SuppressionPage {
    items: Vec<Suppression>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SuppressionQuery {
    #[param(value_type = Option<Channel>, inline)]
    channel: Option<String>,
    /// One address (with `channel`, normalised as the list keys it).
    address: Option<String>,
    #[param(value_type = Option<SuppressionReason>, inline)]
    reason: Option<String>,
    /// `next_cursor` of the previous page.
    #[param(min_length = 1)]
    cursor: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// An operator's suppression.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuppressionBody {
    /// Why (kept with it).
    #[schema(max_length = 500)]
    note: Option<String>,
}

fn channel_of(c: &str) -> Result<Channel, ApiError> {
    c.parse::<Channel>()
        .map_err(|e| ApiError::validation(vec![FieldError::new("channel", e)]))
}

fn address_of(a: &str) -> Result<&str, ApiError> {
    let a = a.trim();
    if a.is_empty() || a.chars().count() > 4096 {
        return Err(ApiError::validation(vec![FieldError::new(
            "address",
            "must be 1-4096 characters",
        )]));
    }
    Ok(a)
}

/// `GET /v1/suppressions`: in key order, cursor pages.
pub async fn list(
    State(store): State<Store>,
    QueryParams(q): QueryParams<SuppressionQuery>,
) -> Result<Json<SuppressionPage>, ApiError> {
    let mut errors = Vec::new();
    let channel = q
        .channel
        .as_deref()
        .map(|c| c.parse::<Channel>())
        .transpose()
        .map_err(|e| errors.push(FieldError::new("channel", e)))
        .ok()
        .flatten();
    let reason = q
        .reason
        .as_deref()
        .map(|r| serde_json::from_value::<SuppressionReason>(serde_json::json!(r)))
        .transpose()
        .map_err(|_| {
            errors.push(FieldError::new(
                "reason",
                "hard_bounce, complaint, unsubscribe, manual or invalid_number",
            ))
        })
        .ok()
        .flatten();
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        errors.push(FieldError::new("limit", "must be between 1 and 1000"));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    if q.cursor.as_deref() == Some("") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            "the cursor is empty; start again without it",
        ));
    }
    let filter = SuppressionFilter {
        channel,
        address: q.address,
        reason,
    };
    let (items, next) = store
        .list_suppressions(&filter, q.cursor.as_deref(), limit)
        .await?;
    Ok(Json(SuppressionPage {
        items: items.into_iter().map(Suppression::from).collect(),
        next_cursor: next,
    }))
}

/// `PUT /v1/suppressions/{channel}/{address}`: suppress by hand (201 new, 200 replaced).
pub async fn put(
    State(store): State<Store>,
    Path((channel, address)): Path<(String, String)>,
    JsonBody(body): JsonBody<SuppressionBody>,
) -> Result<(StatusCode, Json<Suppression>), ApiError> {
    let channel = channel_of(&channel)?;
    let address = address_of(&address)?;
    if body.note.as_ref().is_some_and(|n| n.chars().count() > 500) {
        return Err(ApiError::validation(vec![FieldError::new(
            "note",
            "must be at most 500 characters",
        )]));
    }
    let doc = SuppressionDoc::new(channel, address, SuppressionReason::Manual, None, body.note);
    let created = store.put_suppression(&doc).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(Suppression::from(doc))))
}

/// `DELETE /v1/suppressions/{channel}/{address}`: lift it; herald sends there again.
pub async fn delete(
    State(store): State<Store>,
    Path((channel, address)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let channel = channel_of(&channel)?;
    let address = address_of(&address)?;
    if store.lift_suppression(channel, address).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("suppression", address))
    }
}
