//! `/v1/schedules`: marketing's recurring campaigns.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::events::{PriorityIn, RecipientsBody};
use super::{rfc3339, Time, Zone};
use crate::api::error::{ApiError, JsonBody, QueryParams};
use crate::domain::cron::{parse_tz, CronSpec};
use crate::domain::plan::{MisfirePolicy, RunKind};
use crate::domain::{Category, Channel, EventType, FieldError, NotificationStatus, Priority};
use crate::ingest::schedule::{self as definition, parse_schedule, ScheduleError, ScheduleInput};
use crate::scheduler as sched;
use crate::scheduler::Scheduler;
use crate::store::{Counts, RecipientsDoc, ScheduleDoc, ScheduleStatus, Store};
use crate::templates::Templates;

// `ScheduleBody`, `SchedulePatch` and `CronPreviewBody` document what `parse_schedule`
// and `preview` accept (see `events::EventBody`): they are never built.

/// A recurring campaign to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ScheduleBody {
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: String,
    /// Five fields (minute hour day-of-month month day-of-week) or `@daily`, `@hourly`…
    #[schema(format = "cron")]
    cron: String,
    /// The zone the cron fires in (default UTC).
    #[schema(value_type = Option<Zone>)]
    timezone: Option<String>,
    start_at: Option<Time>,
    /// After `start_at`.
    end_at: Option<Time>,
    /// An event type with a template for every channel the campaign sends on.
    event_type: EventType,
    priority: Option<PriorityIn>,
    recipients: RecipientsBody,
    #[schema(min_items = 1)]
    channels: Option<Vec<Channel>>,
    payload: Option<Map<String, Value>>,
    misfire_policy: Option<MisfirePolicy>,
    /// Overrides the event type's configured category.
    category: Option<Category>,
}

/// Changes to a schedule: any fields of a create body, merged into the definition.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct SchedulePatch {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: String,
    #[serde(default)]
    #[schema(format = "cron")]
    cron: String,
    #[schema(value_type = Option<Zone>)]
    timezone: Option<String>,
    start_at: Option<Time>,
    end_at: Option<Time>,
    #[serde(default)]
    #[schema(value_type = EventType)]
    event_type: String,
    priority: Option<PriorityIn>,
    #[serde(default)]
    #[schema(value_type = RecipientsBody)]
    recipients: Value,
    #[schema(min_items = 1)]
    channels: Option<Vec<Channel>>,
    payload: Option<Map<String, Value>>,
    misfire_policy: Option<MisfirePolicy>,
    /// Overrides the event type's configured category.
    category: Option<Category>,
}

/// A cron expression to try before saving.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct CronPreviewBody {
    #[schema(format = "cron")]
    cron: String,
    #[schema(value_type = Option<Zone>)]
    timezone: Option<String>,
    start_at: Option<Time>,
    end_at: Option<Time>,
    /// How many fire times (default 5).
    #[schema(minimum = 1, maximum = 100)]
    count: Option<u32>,
}

/// Who a campaign sends to.
#[derive(Debug, Serialize, ToSchema)]
pub struct Recipients {
    user_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segment: Option<SegmentOut>,
}

/// A segment: every user, or those with a locale and/or a tag.
#[derive(Debug, Serialize, ToSchema)]
pub struct SegmentOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    all: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    locale: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

/// The definition, as a create body would give it (PATCH merges into this).
#[derive(Debug, Serialize, ToSchema)]
pub struct Definition {
    name: String,
    cron: String,
    timezone: String,
    start_at: Option<Time>,
    end_at: Option<Time>,
    event_type: String,
    priority: Priority,
    recipients: Recipients,
    channels: Option<Vec<Channel>>,
    #[schema(value_type = Object)]
    payload: Value,
    misfire_policy: MisfirePolicy,
    /// Null: the event type's configured category.
    category: Option<Category>,
}

/// A campaign and where it stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct Schedule {
    #[serde(flatten)]
    definition: Definition,
    schedule_id: String,
    status: ScheduleStatus,
    next_fire_at: Option<Time>,
    last_fire_at: Option<Time>,
    fire_count: i64,
    created_at: Time,
    updated_at: Time,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    items: Vec<Schedule>,
}

/// A created campaign.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleCreated {
    schedule_id: String,
    next_fire_at: Option<Time>,
    status: ScheduleStatus,
}

/// A manual fire.
#[derive(Debug, Serialize, ToSchema)]
pub struct Triggered {
    run_id: String,
    notification_id: Option<String>,
    /// Why nothing was sent (`empty_audience`), if nothing was.
    reason: Option<String>,
}

/// One run of a campaign, with its notification's progress.
#[derive(Debug, Serialize, ToSchema)]
pub struct Run {
    run_id: String,
    fire_time: Time,
    kind: RunKind,
    slots: i32,
    claimed_at: Time,
    lag_ms: i64,
    notification_id: Option<String>,
    reason: Option<String>,
    status: Option<NotificationStatus>,
    deliveries: i64,
    counts: Option<Counts>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    items: Vec<Run>,
}

/// One fire time, in UTC and in the schedule's zone.
#[derive(Debug, Serialize, ToSchema)]
pub struct Fire {
    #[schema(format = DateTime)]
    at: String,
    #[schema(format = DateTime)]
    local: String,
}

/// The next fire times.
#[derive(Debug, Serialize, ToSchema)]
pub struct Fires {
    timezone: String,
    items: Vec<Fire>,
}

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

fn recipients(r: &RecipientsDoc) -> Recipients {
    Recipients {
        user_ids: r.user_ids.clone(),
        group_id: r.group_id.clone(),
        segment: r.segment.as_ref().map(|s| SegmentOut {
            all: (s.locale.is_none() && s.tag.is_none()).then_some(true),
            locale: s.locale.clone(),
            tag: s.tag.clone(),
        }),
    }
}

/// The definition as a create body would give it (PATCH merges into this).
fn definition(s: &ScheduleDoc) -> Definition {
    Definition {
        name: s.name.clone(),
        cron: s.cron.clone(),
        timezone: s.timezone.clone(),
        start_at: s.start_at.map(rfc3339),
        end_at: s.end_at.map(rfc3339),
        event_type: s.event_type.clone(),
        priority: s.priority,
        recipients: recipients(&s.recipients),
        channels: s.channels.clone(),
        payload: mongodb::bson::Bson::Document(s.payload.clone()).into_relaxed_extjson(),
        misfire_policy: s.misfire_policy,
        category: s.category,
    }
}

fn definition_json(s: &ScheduleDoc) -> Value {
    serde_json::to_value(definition(s)).unwrap_or_default()
}

fn schedule(s: &ScheduleDoc) -> Schedule {
    Schedule {
        definition: definition(s),
        schedule_id: s.id.clone(),
        status: s.status,
        next_fire_at: s.next_fire_at.map(rfc3339),
        last_fire_at: s.last_fire_at.map(rfc3339),
        fire_count: s.fire_count,
        created_at: rfc3339(s.created_at),
        updated_at: rfc3339(s.updated_at),
    }
}

async fn load(store: &Store, id: &str) -> Result<ScheduleDoc, ApiError> {
    store
        .get_schedule(id)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule", id))
}

/// A schedule that can still be paused or resumed.
async fn load_live(store: &Store, id: &str) -> Result<ScheduleDoc, ApiError> {
    let s = load(store, id).await?;
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
    State(store): State<Store>,
    State(templates): State<Arc<Templates>>,
    State(scheduler): State<Scheduler>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let input = parse_schedule(&body)?;
    definition::check_references(&store, &templates, &input).await?;
    let doc = definition::to_document(&input, None, None, Utc::now())?;
    store.insert_schedule(&doc).await?;
    scheduler.wake();
    let created = ScheduleCreated {
        schedule_id: doc.id,
        next_fire_at: doc.next_fire_at.map(rfc3339),
        status: doc.status,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[param(value_type = Option<ScheduleStatus>, inline)]
    status: Option<String>,
    /// Most schedules to list (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

pub async fn list(
    State(store): State<Store>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<ScheduleList>, ApiError> {
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
    let items = store.list_schedules(status, limit).await?;
    Ok(Json(ScheduleList {
        items: items.iter().map(schedule).collect(),
    }))
}

pub async fn get(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    Ok(Json(schedule(&load(&store, &id).await?)))
}

pub async fn patch(
    State(store): State<Store>,
    State(templates): State<Arc<Templates>>,
    State(scheduler): State<Scheduler>,
    Path(id): Path<String>,
    JsonBody(changes): JsonBody<Value>,
) -> Result<Json<Schedule>, ApiError> {
    let existing = load(&store, &id).await?;
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
    definition::check_references(&store, &templates, &input).await?;
    // A retired schedule whose new cron or end_at has slots left becomes active again.
    let doc = definition::to_document(&input, Some(&existing), None, Utc::now())?;
    let stored = store
        .replace_schedule(&doc)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule", &id))?;
    scheduler.wake();
    Ok(Json(schedule(&stored)))
}

pub async fn delete(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if store.delete_schedule(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("schedule", &id))
    }
}

pub async fn pause(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    let s = load_live(&store, &id).await?;
    let stored = store
        .set_schedule_state(&id, ScheduleStatus::Paused, s.next_fire_at)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule", &id))?;
    Ok(Json(schedule(&stored)))
}

pub async fn resume(
    State(store): State<Store>,
    State(scheduler): State<Scheduler>,
    Path(id): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    let s = load_live(&store, &id).await?;
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
    let stored = store
        .set_schedule_state(&id, doc.status, doc.next_fire_at)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule", &id))?;
    scheduler.wake();
    Ok(Json(schedule(&stored)))
}

pub async fn trigger(
    State(store): State<Store>,
    State(scheduler): State<Scheduler>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = load(&store, &id).await?;
    let run = sched::trigger(&scheduler, &s, Utc::now()).await?;
    let triggered = Triggered {
        run_id: run.id,
        notification_id: run.notification_id,
        reason: run.reason,
    };
    Ok((StatusCode::ACCEPTED, Json(triggered)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    /// Most runs to show, newest first (default 50; taken as 1 to 500).
    limit: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct NextQuery {
    /// How many fire times (default 5).
    #[param(minimum = 1, maximum = 100)]
    count: Option<usize>,
}

pub async fn runs(
    State(store): State<Store>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<RunsQuery>,
) -> Result<Json<RunList>, ApiError> {
    load(&store, &id).await?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let runs = store.list_runs(&id, limit).await?;
    let ids: Vec<String> = runs
        .iter()
        .filter_map(|r| r.notification_id.clone())
        .collect();
    let notifications = store.notifications_by_ids(&ids).await?;
    let items = runs
        .iter()
        .map(|r| {
            let n = notifications
                .iter()
                .find(|n| Some(&n.id) == r.notification_id.as_ref());
            Run {
                run_id: r.id.clone(),
                fire_time: rfc3339(r.fire_time),
                kind: r.kind,
                slots: r.slots,
                claimed_at: rfc3339(r.claimed_at),
                lag_ms: r.lag_ms,
                notification_id: r.notification_id.clone(),
                reason: r.reason.clone(),
                status: n.map(|n| n.status),
                deliveries: n.map_or(0, |n| n.counts.total),
                counts: n.map(|n| n.counts),
            }
        })
        .collect();
    Ok(Json(RunList { items }))
}

pub async fn next(
    State(store): State<Store>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<NextQuery>,
) -> Result<Json<Fires>, ApiError> {
    let count = q.count.unwrap_or(5);
    if !(1..=100).contains(&count) {
        return Err(ApiError::validation(vec![FieldError::new(
            "count",
            "must be between 1 and 100",
        )]));
    }
    let s = load(&store, &id).await?;
    let input = input_of(&s)?;
    let items = fires(&input.cron, input.tz, input.start_at, input.end_at, count);
    Ok(Json(Fires {
        timezone: s.timezone,
        items,
    }))
}

/// The next `count` fire times from now (or `start_at`), none after `end_at`, each in UTC
/// and in the schedule's zone.
fn fires(
    spec: &CronSpec,
    tz: Tz,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
    count: usize,
) -> Vec<Fire> {
    let from = start_at.map_or(Utc::now(), |t| t.max(Utc::now()));
    spec.next_after(tz, from - chrono::Duration::milliseconds(1), count)
        .into_iter()
        .filter(|t| end_at.is_none_or(|e| *t <= e))
        .map(|t| Fire {
            at: t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            local: t
                .with_timezone(&tz)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        })
        .collect()
}

/// `POST /v1/schedules/preview`: `{cron, timezone?, start_at?, end_at?, count?}` → the next
/// fire times, or the same field errors (and codes) a create would give. Writes nothing.
pub async fn preview(JsonBody(body): JsonBody<Value>) -> Result<Json<Fires>, ApiError> {
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
        // JSON has one number type: 5 and 5.0 are the same count.
        Some(v) => match v
            .as_f64()
            .filter(|c| c.fract() == 0.0 && (1.0..=100.0).contains(c))
        {
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
            Ok(Json(Fires { timezone, items }))
        }
        _ => {
            let mut err = ApiError::validation(errors);
            err.code = code;
            Err(err)
        }
    }
}
