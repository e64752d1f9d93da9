//! `PUT/GET/DELETE /v1/users/{user_id}`: recipient profiles.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use mongodb::bson;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::rfc3339;
use crate::api::error::{ApiError, JsonBody};
use crate::app::Context;
use crate::domain::{FieldError, UserId};
use crate::store::UserDoc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    email: Option<String>,
    phone: Option<String>,
    #[serde(default)]
    push_tokens: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    birthday_date: Option<String>,
    locale: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    preferences: Map<String, Value>,
}

fn parse_id(id: &str) -> Result<UserId, ApiError> {
    UserId::parse(id).map_err(|e| ApiError::validation(vec![FieldError::new("user_id", e)]))
}

fn valid_phone(p: &str) -> bool {
    let digits = p.strip_prefix('+').unwrap_or(p);
    (6..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit())
}

fn valid_locale(l: &str) -> bool {
    let mut parts = l.split('-');
    parts
        .next()
        .is_some_and(|p| (2..=3).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphabetic()))
        && parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

impl UserBody {
    fn into_doc(self, id: &UserId) -> Result<UserDoc, ApiError> {
        let mut errors = Vec::new();
        let short = |field: &str, v: &Option<String>, errors: &mut Vec<FieldError>| {
            if v.as_ref().is_some_and(|s| s.chars().count() > 200) {
                errors.push(FieldError::new(field, "must be at most 200 characters"));
            }
        };
        short("first_name", &self.first_name, &mut errors);
        short("last_name", &self.last_name, &mut errors);
        if let Some(e) = &self.email {
            if e.parse::<lettre::Address>().is_err() {
                errors.push(FieldError::new("email", "is not an email address"));
            }
        }
        if let Some(p) = &self.phone {
            if !valid_phone(p) {
                errors.push(FieldError::new(
                    "phone",
                    "must be an E.164 number such as +4915112345678",
                ));
            }
        }
        if self.push_tokens.len() > 20
            || self
                .push_tokens
                .iter()
                .any(|t| t.is_empty() || t.len() > 4096)
        {
            errors.push(FieldError::new(
                "push_tokens",
                "at most 20 non-empty tokens of up to 4096 bytes",
            ));
        }
        if self.tags.len() > 50 || self.tags.iter().any(|t| t.is_empty() || t.len() > 64) {
            errors.push(FieldError::new(
                "tags",
                "at most 50 non-empty tags of up to 64 bytes",
            ));
        }
        if let Some(l) = &self.locale {
            if !valid_locale(l) {
                errors.push(FieldError::new(
                    "locale",
                    "must be a language tag such as pt-BR",
                ));
            }
        }
        if let Some(tz) = &self.timezone {
            if tz.parse::<chrono_tz::Tz>().is_err() {
                errors.push(FieldError::new(
                    "timezone",
                    "must be an IANA time zone such as Europe/Berlin",
                ));
            }
        }
        if let Some(b) = &self.birthday_date {
            if chrono::NaiveDate::parse_from_str(b, "%Y-%m-%d").is_err() {
                errors.push(FieldError::new(
                    "birthday_date",
                    "must be a date YYYY-MM-DD",
                ));
            }
        }
        let preferences = bson::to_document(&self.preferences).map_err(|e| {
            ApiError::validation(vec![FieldError::new("preferences", e.to_string())])
        })?;
        if !errors.is_empty() {
            return Err(ApiError::validation(errors));
        }
        Ok(UserDoc {
            id: id.to_string(),
            email: self.email,
            phone: self.phone,
            push_tokens: self.push_tokens,
            tags: self.tags,
            first_name: self.first_name,
            last_name: self.last_name,
            birthday_date: self.birthday_date,
            locale: self.locale,
            timezone: self.timezone,
            preferences,
            created_at: None,
            updated_at: None,
        })
    }
}

fn user_json(u: &UserDoc) -> Value {
    json!({
        "user_id": u.id,
        "email": u.email,
        "phone": u.phone,
        "push_tokens": u.push_tokens,
        "tags": u.tags,
        "first_name": u.first_name,
        "last_name": u.last_name,
        "birthday_date": u.birthday_date,
        "locale": u.locale,
        "timezone": u.timezone,
        "preferences": bson::Bson::Document(u.preferences.clone()).into_relaxed_extjson(),
        "created_at": u.created_at.map(rfc3339),
        "updated_at": u.updated_at.map(rfc3339),
    })
}

pub async fn put_user(
    State(ctx): State<Context>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UserBody>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let doc = body.into_doc(&id)?;
    let created = ctx.store.put_user(doc).await?;
    let stored = ctx
        .store
        .get_user(id.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found("user", id.as_str()))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(user_json(&stored))).into_response())
}

pub async fn get_user(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let u = ctx
        .store
        .get_user(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("user", &id))?;
    Ok(Json(user_json(&u)))
}

pub async fn delete_user(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if ctx.store.delete_user(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("user", &id))
    }
}
