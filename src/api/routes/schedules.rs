//! `/v1/schedules`: marketing's recurring campaigns.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{json, Value};

use super::rfc3339;
use crate::api::error::{ApiError, JsonBody, QueryParams};
use crate::app::Context;
use crate::domain::cron::{parse_tz, CronSpec};
use crate::domain::FieldError;
use crate::ingest::schedule::{self as definition, parse_schedule, ScheduleError, ScheduleInput};
use crate::scheduler as sched;
use crate::store::{RecipientsDoc, ScheduleDoc, ScheduleStatus};

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> Self {
        match e {
            ScheduleError::Invalid(code, details) => {
                let mut err = ApiError::validation(details);
                err.code = code;
                err
            }
            ScheduleError::Store(cause) => ApiError::from(cause),
            other => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                other.code(),
                other.to_string(),
            ),
        }
    }
}

fn recipients_json(r: &RecipientsDoc) -> Value {
    let mut v = json!({"user_ids": r.user_ids});
    if let Some(g) = &r.group_id {
        v["group_id"] = json!(g);
    }
    if let Some(s) = &r.segment {
        let mut seg = json!({});
        match (&s.locale, &s.tag) {
            (None, None) => seg["all"] = json!(true),
            (l, t) => {
                if let Some(l) = l {
                    seg["locale"] = json!(l);
                }
                if let Some(t) = t {
                    seg["tag"] = json!(t);
                }
            }
        }
        v["segment"] = seg;
    }
    v
}

/// The definition as a create body would give it (PATCH merges into this).
fn definition_json(s: &ScheduleDoc) -> Value {
    json!({
        "name": s.name,
        "cron": s.cron,
        "timezone": s.timezone,
        "start_at": s.start_at.map(rfc3339),
        "end_at": s.end_at.map(rfc3339),
        "event_type": s.event_type,
        "priority": s.priority,
        "recipients": recipients_json(&s.recipients),
        "channels": s.channels,
        "payload": mongodb::bson::Bson::Document(s.payload.clone()).into_relaxed_extjson(),
        "misfire_policy": s.misfire_policy,
    })
}

fn schedule_json(s: &ScheduleDoc) -> Value {
    let mut v = definition_json(s);
    v["schedule_id"] = json!(s.id);
    v["status"] = json!(s.status);
    v["next_fire_at"] = json!(s.next_fire_at.map(rfc3339));
    v["last_fire_at"] = json!(s.last_fire_at.map(rfc3339));
    v["fire_count"] = json!(s.fire_count);
    v["created_at"] = json!(rfc3339(s.created_at));
    v["updated_at"] = json!(rfc3339(s.updated_at));
    v
}

async fn load(ctx: &Context, id: &str) -> Result<ScheduleDoc, ApiError> {
    ctx.store
        .get_schedule(id)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule", id))
}

/// A schedule that can still be paused or resumed.
async fn load_live(ctx: &Context, id: &str) -> Result<ScheduleDoc, ApiError> {
    let s = load(ctx, id).await?;
    if s.status == ScheduleStatus::Retired {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "schedule_retired",
            "the schedule has ended; PATCH its end_at to revive it",
        ));
    }
    Ok(s)
}

fn input_of(s: &ScheduleDoc) -> Result<ScheduleInput, ApiError> {
    parse_schedule(&definition_json(s)).map_err(|e| {
        ApiError::internal(anyhow::anyhow!(
            "stored schedule {} does not parse: {e}",
            s.id
        ))
    })
}

pub async fn create(
    State(ctx): State<Context>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let input = parse_schedule(&body)?;
    definition::check_references(&ctx.store, &ctx.templates, &input).await?;
    let doc = definition::to_document(&input, None, None, Utc::now())?;
    ctx.store.insert_schedule(&doc).await?;
    ctx.scheduler.wake();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "schedule_id": doc.id,
            "next_fire_at": doc.next_fire_at.map(rfc3339),
            "status": doc.status,
        })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
}

pub async fn list(
    State(ctx): State<Context>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<ScheduleStatus>(json!(s)).map_err(|_| {
                ApiError::validation(vec![FieldError::new(
                    "status",
                    "must be active, paused or retired",
                )])
            })?,
        ),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation(vec![FieldError::new(
            "limit",
            "must be between 1 and 1000",
        )]));
    }
    let items = ctx.store.list_schedules(status, limit).await?;
    Ok(Json(
        json!({"items": items.iter().map(schedule_json).collect::<Vec<_>>()}),
    ))
}

pub async fn get(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(schedule_json(&load(&ctx, &id).await?)))
}

pub async fn patch(
    State(ctx): State<Context>,
    Path(id): Path<String>,
    JsonBody(changes): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let existing = load(&ctx, &id).await?;
    let Some(changes) = changes.as_object() else {
        return Err(ApiError::validation(vec![FieldError::new(
            "body",
            "must be a JSON object",
        )]));
    };
    let mut merged = definition_json(&existing);
    for (k, v) in changes {
        merged[k] = v.clone();
    }
    let input = parse_schedule(&merged)?;
    definition::check_references(&ctx.store, &ctx.templates, &input).await?;
    // A retired schedule whose new cron or end_at has slots left becomes active again.
    let doc = definition::to_document(&input, Some(&existing), None, Utc::now())?;
    let stored = ctx
        .store
        .replace_schedule(&doc)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule", &id))?;
    ctx.scheduler.wake();
    Ok(Json(schedule_json(&stored)))
}

pub async fn delete(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if ctx.store.delete_schedule(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("schedule", &id))
    }
}

pub async fn pause(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = load_live(&ctx, &id).await?;
    let stored = ctx
        .store
        .set_schedule_state(&id, ScheduleStatus::Paused, s.next_fire_at)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule", &id))?;
    Ok(Json(schedule_json(&stored)))
}

pub async fn resume(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = load_live(&ctx, &id).await?;
    // Slots that passed while paused are not fired: the schedule resumes at its next slot.
    let doc = definition::to_document(
        &input_of(&s)?,
        Some(&ScheduleDoc {
            status: ScheduleStatus::Active,
            ..s
        }),
        None,
        Utc::now(),
    )?;
    let stored = ctx
        .store
        .set_schedule_state(&id, doc.status, doc.next_fire_at)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule", &id))?;
    ctx.scheduler.wake();
    Ok(Json(schedule_json(&stored)))
}

pub async fn trigger(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = load(&ctx, &id).await?;
    let run = sched::trigger(&ctx.scheduler, &s, Utc::now()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "run_id": run.id,
            "notification_id": run.notification_id,
            "reason": run.reason,
        })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitQuery {
    limit: Option<i64>,
    count: Option<usize>,
}

pub async fn runs(
    State(ctx): State<Context>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LimitQuery>,
) -> Result<Json<Value>, ApiError> {
    load(&ctx, &id).await?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let runs = ctx.store.list_runs(&id, limit).await?;
    let ids: Vec<String> = runs
        .iter()
        .filter_map(|r| r.notification_id.clone())
        .collect();
    let notifications = ctx.store.notifications_by_ids(&ids).await?;
    let items: Vec<Value> = runs
        .iter()
        .map(|r| {
            let n = notifications
                .iter()
                .find(|n| Some(&n.id) == r.notification_id.as_ref());
            json!({
                "run_id": r.id,
                "fire_time": rfc3339(r.fire_time),
                "kind": r.kind,
                "slots": r.slots,
                "claimed_at": rfc3339(r.claimed_at),
                "lag_ms": r.lag_ms,
                "notification_id": r.notification_id,
                "reason": r.reason,
                "status": n.map(|n| json!(n.status)),
                "deliveries": n.map_or(json!(0), |n| json!(n.counts.total)),
                "counts": n.map(|n| json!(n.counts)),
            })
        })
        .collect();
    Ok(Json(json!({"items": items})))
}

pub async fn next(
    State(ctx): State<Context>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LimitQuery>,
) -> Result<Json<Value>, ApiError> {
    let count = q.count.unwrap_or(5);
    if !(1..=100).contains(&count) {
        return Err(ApiError::validation(vec![FieldError::new(
            "count",
            "must be between 1 and 100",
        )]));
    }
    let s = load(&ctx, &id).await?;
    let input = input_of(&s)?;
    let items = fires(&input.cron, input.tz, input.start_at, input.end_at, count);
    Ok(Json(json!({"timezone": s.timezone, "items": items})))
}

/// The next `count` fire times from now (or `start_at`), none after `end_at`, each in UTC
/// and in the schedule's zone.
fn fires(
    spec: &CronSpec,
    tz: Tz,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
    count: usize,
) -> Vec<Value> {
    let from = start_at.map_or(Utc::now(), |t| t.max(Utc::now()));
    spec.next_after(tz, from - chrono::Duration::milliseconds(1), count)
        .into_iter()
        .filter(|t| end_at.is_none_or(|e| *t <= e))
        .map(|t| {
            json!({
                "at": t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "local": t.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            })
        })
        .collect()
}

/// `POST /v1/schedules/preview`: `{cron, timezone?, start_at?, end_at?, count?}` → the next
/// fire times, or the same field errors (and codes) a create would give. Writes nothing.
pub async fn preview(JsonBody(body): JsonBody<Value>) -> Result<Json<Value>, ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::validation(vec![FieldError::new(
            "body",
            "must be a JSON object",
        )]));
    };
    let mut errors = Vec::new();
    for key in obj.keys() {
        if !["cron", "timezone", "start_at", "end_at", "count"].contains(&key.as_str()) {
            errors.push(FieldError::new(
                crate::domain::truncate(key, 32),
                "unknown field (cron, timezone, start_at, end_at, count)",
            ));
        }
    }
    let mut code = "validation_failed";
    let cron = match obj.get("cron") {
        Some(Value::String(c)) => c
            .parse::<CronSpec>()
            .map_err(|e| {
                code = "invalid_cron";
                errors.push(FieldError::new("cron", e));
            })
            .ok(),
        _ => {
            code = "invalid_cron";
            errors.push(FieldError::new("cron", "is required (a string)"));
            None
        }
    };
    let timezone = match obj.get("timezone") {
        None | Some(Value::Null) => "UTC".to_owned(),
        Some(Value::String(t)) => t.clone(),
        Some(_) => {
            errors.push(FieldError::new("timezone", "must be a string"));
            String::new()
        }
    };
    // (Not a string: already refused above.)
    let tz = match obj.get("timezone") {
        Some(v) if !v.is_string() && !v.is_null() => None,
        _ => parse_tz(&timezone)
            .map_err(|e| {
                if code == "validation_failed" {
                    code = "unknown_timezone";
                }
                errors.push(FieldError::new("timezone", e));
            })
            .ok(),
    };
    let (start_at, end_at) = definition::parse_window(obj, &mut errors);
    let count = match obj.get("count") {
        None | Some(Value::Null) => 5,
        Some(v) => match v.as_u64().filter(|c| (1..=100).contains(c)) {
            Some(c) => c as usize,
            None => {
                errors.push(FieldError::new("count", "must be between 1 and 100"));
                0
            }
        },
    };
    match (cron, tz) {
        (Some(cron), Some(tz)) if errors.is_empty() => {
            let items = fires(&cron, tz, start_at, end_at, count);
            Ok(Json(json!({"timezone": timezone, "items": items})))
        }
        _ => {
            let mut err = ApiError::validation(errors);
            err.code = code;
            Err(err)
        }
    }
}
