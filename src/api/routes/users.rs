//! `PUT/GET/DELETE /v1/users/{user_id}`: recipient profiles.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use mongodb::bson;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::openapi::{RefOr, Schema};
use utoipa::ToSchema;

use super::{rfc3339, Time, Zone};
use crate::api::error::{ApiError, JsonBody};
use crate::config::Settings;
use crate::domain::{FieldError, UserId};
use crate::store::{Store, UserDoc};

/// A recipient's profile (`PUT` replaces the whole of it).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    #[schema(format = Email)]
    email: Option<String>,
    /// E.164, e.g. +4915112345678.
    #[schema(pattern = r"^\+?[0-9]{6,15}$")]
    phone: Option<String>,
    #[serde(default)]
    #[schema(max_items = 20, value_type = Vec<PushToken>)]
    push_tokens: Vec<String>,
    #[serde(default)]
    #[schema(max_items = 50, value_type = Vec<Tag>)]
    tags: Vec<String>,
    #[schema(max_length = 200)]
    first_name: Option<String>,
    #[schema(max_length = 200)]
    last_name: Option<String>,
    #[schema(format = Date)]
    birthday_date: Option<String>,
    #[schema(pattern = "^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")]
    locale: Option<String>,
    #[schema(value_type = Option<Zone>)]
    timezone: Option<String>,
    /// Per channel and per event type: `{"channels": {"sms": false}, "event_types":
    /// {"promo": {"email": false}}, "quiet_hours": {...}}`.
    #[serde(default)]
    #[schema(value_type = Preferences)]
    preferences: Map<String, Value>,
}

/// What a user agreed to receive (read by `domain::preferences::Preferences::parse`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Preferences {
    /// `false` opts the user out of a channel.
    #[serde(default)]
    channels: ChannelSwitches,
    /// Event types the user never receives.
    #[serde(default)]
    muted_event_types: Vec<String>,
    /// No deliveries between these local times (they are deferred to the end).
    #[serde(default)]
    quiet_hours: QuietHours,
}

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ChannelSwitches {
    #[serde(default)]
    email: bool,
    #[serde(default)]
    sms: bool,
    #[serde(default)]
    push: bool,
    #[serde(default)]
    webhook: bool,
    #[serde(default)]
    in_app: bool,
}

/// Two different local times, `HH:MM`; the span may cross midnight.
#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct QuietHours {
    #[schema(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    start: String,
    #[schema(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    end: String,
}

/// A device's push token: 1-4096 characters.
pub struct PushToken;

impl utoipa::PartialSchema for PushToken {
    fn schema() -> RefOr<Schema> {
        super::bounded_string(1, 4096)
    }
}
impl ToSchema for PushToken {}

/// A tag: 1-64 characters.
pub struct Tag;

impl utoipa::PartialSchema for Tag {
    fn schema() -> RefOr<Schema> {
        super::bounded_string(1, 64)
    }
}
impl ToSchema for Tag {}

/// A stored profile.
#[derive(Debug, Serialize, ToSchema)]
pub struct User {
    user_id: String,
    email: Option<String>,
    phone: Option<String>,
    push_tokens: Vec<String>,
    tags: Vec<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    birthday_date: Option<String>,
    locale: Option<String>,
    timezone: Option<String>,
    #[schema(value_type = Object)]
    preferences: Value,
    /// Marketing the user left through an unsubscribe link.
    unsubscribes: Vec<Unsubscribed>,
    created_at: Option<Time>,
    updated_at: Option<Time>,
}

/// One opt-out: of one event type's marketing, or (null) of all marketing.
#[derive(Debug, Serialize, ToSchema)]
pub struct Unsubscribed {
    event_type: Option<String>,
    at: Time,
}

/// What an import did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportReport {
    received: usize,
    created: u64,
    updated: u64,
    failed: usize,
    /// Up to 1,000 of the refused lines.
    errors: Vec<ImportError>,
}

/// One refused line of an import.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportError {
    line: u64,
    user_id: Option<String>,
    message: String,
}

fn parse_id(id: &str) -> Result<UserId, ApiError> {
    UserId::parse(id).map_err(|e| ApiError::validation(vec![FieldError::new("user_id", e)]))
}

fn valid_phone(p: &str) -> bool {
    let digits = p.strip_prefix('+').unwrap_or(p);
    (6..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit())
}

/// Validates a profile (a PUT body or an import record) into a document.
pub fn parse_user(id: &str, body: Value) -> Result<UserDoc, Vec<FieldError>> {
    let id = UserId::parse(id).map_err(|e| vec![FieldError::new("user_id", e)])?;
    let body: UserBody =
        serde_json::from_value(body).map_err(|e| vec![FieldError::new("body", e.to_string())])?;
    body.into_doc(&id)
}

impl UserBody {
    fn into_doc(self, id: &UserId) -> Result<UserDoc, Vec<FieldError>> {
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
                .any(|t| t.is_empty() || t.chars().count() > 4096)
        {
            errors.push(FieldError::new(
                "push_tokens",
                "at most 20 non-empty tokens of up to 4096 characters",
            ));
        }
        if self.tags.len() > 50
            || self
                .tags
                .iter()
                .any(|t| t.is_empty() || t.chars().count() > 64)
        {
            errors.push(FieldError::new(
                "tags",
                "at most 50 non-empty tags of up to 64 characters",
            ));
        }
        if let Some(l) = &self.locale {
            if !crate::templates::valid_locale(l) {
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
        if let Err(e) =
            crate::domain::preferences::Preferences::parse(&Value::Object(self.preferences.clone()))
        {
            errors.extend(e);
        }
        let preferences = crate::store::storable_document("preferences", &self.preferences)?;
        if !errors.is_empty() {
            return Err(errors);
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
            unsubscribes: Vec::new(),
            suppressed: Vec::new(),
            created_at: None,
            updated_at: None,
        })
    }
}

impl From<UserDoc> for User {
    fn from(u: UserDoc) -> Self {
        Self {
            preferences: bson::Bson::Document(u.preferences).into_relaxed_extjson(),
            user_id: u.id,
            email: u.email,
            phone: u.phone,
            push_tokens: u.push_tokens,
            tags: u.tags,
            first_name: u.first_name,
            last_name: u.last_name,
            birthday_date: u.birthday_date,
            locale: u.locale,
            timezone: u.timezone,
            unsubscribes: u
                .unsubscribes
                .into_iter()
                .map(|o| Unsubscribed {
                    event_type: o.event_type,
                    at: rfc3339(o.at),
                })
                .collect(),
            created_at: u.created_at.map(rfc3339),
            updated_at: u.updated_at.map(rfc3339),
        }
    }
}

pub async fn put_user(
    State(store): State<Store>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UserBody>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let doc = body.into_doc(&id).map_err(ApiError::validation)?;
    let created = store.put_user(doc).await?;
    let stored = store
        .get_user(id.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found("user", id.as_str()))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(User::from(stored))).into_response())
}

pub async fn get_user(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<User>, ApiError> {
    let u = store
        .get_user(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("user", &id))?;
    Ok(Json(User::from(u)))
}

pub async fn delete_user(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if store.delete_user(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("user", &id))
    }
}

/// Records per bulk write.
const IMPORT_BATCH: usize = 1000;
/// Per-line errors reported back (the counts cover all of them).
const IMPORT_ERRORS_SHOWN: usize = 1000;
const CSV_COLUMNS: [&str; 10] = [
    "user_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "birthday_date",
    "locale",
    "timezone",
    "push_tokens",
    "tags",
];

/// A CSV import's header row: known columns, `user_id` among them.
pub const CSV_HEADER: &str = "^((email|phone|first_name|last_name|birthday_date|locale|timezone|push_tokens|tags),)*user_id(,(email|phone|first_name|last_name|birthday_date|locale|timezone|push_tokens|tags))*(\\r?\\n|$)";

/// One record of an import, as JSON, with its line.
type Record = (u64, Result<Map<String, Value>, String>);

fn ndjson_records(body: &[u8]) -> Vec<Record> {
    body.split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| {
            let parsed = serde_json::from_slice::<Value>(line)
                .map_err(|e| format!("not JSON: {e}"))
                .and_then(|v| match v {
                    Value::Object(m) => Ok(m),
                    _ => Err("must be a JSON object".to_owned()),
                });
            (i as u64 + 1, parsed)
        })
        .collect()
}

fn csv_records(body: &[u8]) -> Result<Vec<Record>, ApiError> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| ApiError::validation(vec![FieldError::new("header", e.to_string())]))?
        .clone();
    let unknown: Vec<&str> = headers
        .iter()
        .filter(|h| !CSV_COLUMNS.contains(h))
        .collect();
    if !unknown.is_empty() || !headers.iter().any(|h| h == "user_id") {
        return Err(ApiError::validation(vec![FieldError::new(
            "header",
            format!(
                "columns must include user_id and be among {}; unknown: {}",
                CSV_COLUMNS.join(", "),
                unknown.join(", ")
            ),
        )]));
    }
    Ok(reader
        .records()
        .map(|row| match row {
            Err(e) => (e.position().map_or(0, |p| p.line()), Err(e.to_string())),
            Ok(row) => {
                let line = row.position().map_or(0, |p| p.line());
                let mut m = Map::new();
                for (h, v) in headers.iter().zip(row.iter()) {
                    if v.is_empty() {
                        continue;
                    }
                    let value = if h == "push_tokens" || h == "tags" {
                        json!(v
                            .split(';')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .collect::<Vec<_>>())
                    } else {
                        json!(v)
                    };
                    m.insert(h.to_owned(), value);
                }
                (line, Ok(m))
            }
        })
        .collect())
}

/// `POST /v1/users/import`: NDJSON (`application/x-ndjson`) or CSV (`text/csv`, header
/// row, `;` between push tokens and tags). Idempotent upserts in bulk writes; every bad
/// line is reported with its number and nothing of it is written.
pub async fn import(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    headers: axum::http::HeaderMap,
    req: axum::extract::Request,
) -> Result<Json<ImportReport>, ApiError> {
    let kind = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let body = crate::api::error::read_body(req, settings.server.import_limit_bytes).await?;
    let records = match kind.as_str() {
        "application/x-ndjson" | "application/jsonl" | "application/json" => ndjson_records(&body),
        "text/csv" => csv_records(&body)?,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send application/x-ndjson or text/csv",
            ))
        }
    };
    let received = records.len();
    let mut errors = Vec::new();
    let mut failed = 0usize;
    let (mut created, mut updated) = (0u64, 0u64);
    let mut batch: Vec<UserDoc> = Vec::with_capacity(IMPORT_BATCH);
    let mut fail = |line: u64, user_id: Option<&str>, message: String| {
        failed += 1;
        if errors.len() < IMPORT_ERRORS_SHOWN {
            errors.push(ImportError {
                line,
                user_id: user_id.map(str::to_owned),
                message,
            });
        }
    };
    for (line, record) in records {
        let mut fields = match record {
            Ok(f) => f,
            Err(message) => {
                fail(line, None, message);
                continue;
            }
        };
        let id = match fields.remove("user_id") {
            Some(Value::String(id)) => id,
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                fail(line, None, "user_id: is required".to_owned());
                continue;
            }
        };
        match parse_user(&id, Value::Object(fields)) {
            Ok(u) => batch.push(u),
            Err(e) => fail(line, Some(&id), crate::domain::describe(&e)),
        }
        if batch.len() >= IMPORT_BATCH {
            let (c, u) = store.upsert_users(&batch).await?;
            created += c;
            updated += u;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        let (c, u) = store.upsert_users(&batch).await?;
        created += c;
        updated += u;
    }
    Ok(Json(ImportReport {
        received,
        created,
        updated,
        failed,
        errors,
    }))
}
