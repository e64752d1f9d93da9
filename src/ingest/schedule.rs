//! A schedule's definition: parsed from JSON (create, PATCH merge, seed-format events), checked, stored.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value};

use crate::domain::cron::{parse_tz, CronSpec};
use crate::domain::event::{
    parse_category, parse_channels, parse_recipients, parse_time, NewEvent, Recipients,
    RecurringSpec,
};
use crate::domain::plan::{first_slot, MisfirePolicy};
use crate::domain::{Category, Channel, EventType, FieldError, Priority};
use crate::store::{
    bson_time, payload_document, RecipientsDoc, ScheduleDoc, ScheduleStatus, Store,
};
use crate::templates::Templates;

/// A validated schedule definition.
#[derive(Debug, Clone)]
pub struct ScheduleInput {
    pub name: String,
    pub cron: CronSpec,
    pub tz: Tz,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
    pub event_type: EventType,
    pub priority: Priority,
    pub recipients: Recipients,
    pub channels: Option<Vec<Channel>>,
    pub payload: Map<String, Value>,
    pub misfire_policy: MisfirePolicy,
    pub category: Option<Category>,
}

/// Why a definition was refused; each has one stable code.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{}", crate::domain::describe(.1))]
    Invalid(&'static str, Vec<FieldError>),
    #[error("the schedule names no recipients: give recipients.user_ids, recipients.group_id or recipients.segment")]
    NoRecipients,
    #[error("group `{0}` does not exist")]
    UnknownGroup(String),
    #[error("event type `{0}` has no template for {1}")]
    TemplateMissing(String, String),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl ScheduleError {
    pub fn code(&self) -> &'static str {
        match self {
            ScheduleError::Invalid(code, _) => code,
            ScheduleError::NoRecipients => "no_recipients",
            ScheduleError::UnknownGroup(_) => "unknown_group",
            ScheduleError::TemplateMissing(..) => "template_missing",
            ScheduleError::Store(_) => "internal_error",
        }
    }
}

const FIELDS: [&str; 12] = [
    "name",
    "cron",
    "timezone",
    "start_at",
    "end_at",
    "event_type",
    "priority",
    "recipients",
    "channels",
    "payload",
    "misfire_policy",
    "category",
];

/// `start_at` and `end_at` of a definition, the end after the start.
pub fn parse_window(
    obj: &Map<String, Value>,
    errors: &mut Vec<FieldError>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let start_at = parse_time("start_at", obj.get("start_at"), errors);
    let end_at = parse_time("end_at", obj.get("end_at"), errors);
    if let (Some(s), Some(e)) = (start_at, end_at) {
        if e <= s {
            errors.push(FieldError::new("end_at", "must be after start_at"));
        }
    }
    (start_at, end_at)
}

/// Parses a whole definition (a create body, or a stored schedule with a PATCH merged in).
pub fn parse_schedule(body: &Value) -> Result<ScheduleInput, ScheduleError> {
    let Some(obj) = body.as_object() else {
        return Err(ScheduleError::Invalid(
            "validation_failed",
            vec![FieldError::new("body", "must be a JSON object")],
        ));
    };
    let mut errors = Vec::new();
    for key in obj.keys() {
        if !FIELDS.contains(&key.as_str()) {
            errors.push(FieldError::new(
                crate::domain::truncate(key, 32),
                format!("unknown field ({})", FIELDS.join(", ")),
            ));
        }
    }
    let text = |field: &str, errors: &mut Vec<FieldError>| match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
    };
    let name = text("name", &mut errors).unwrap_or_default();
    if name.trim().is_empty() || name.chars().count() > 200 {
        errors.push(FieldError::new("name", "is required (1-200 characters)"));
    }
    let mut cron_error = false;
    let cron = match text("cron", &mut errors) {
        Some(c) => c
            .parse::<CronSpec>()
            .map_err(|e| {
                cron_error = true;
                errors.push(FieldError::new("cron", e));
            })
            .ok(),
        None => {
            cron_error = true;
            errors.push(FieldError::new("cron", "is required"));
            None
        }
    };
    let mut tz_error = false;
    let tz = match text("timezone", &mut errors) {
        None => Some(Tz::UTC),
        Some(name) => parse_tz(&name)
            .map_err(|e| {
                tz_error = true;
                errors.push(FieldError::new("timezone", e));
            })
            .ok(),
    };
    let (start_at, end_at) = parse_window(obj, &mut errors);
    let event_type = match text("event_type", &mut errors) {
        Some(t) => EventType::parse(&t)
            .map_err(|e| errors.push(FieldError::new("event_type", e)))
            .ok(),
        None => {
            errors.push(FieldError::new("event_type", "is required"));
            None
        }
    };
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => Priority::Normal,
        Some(v) => Priority::from_json(v).unwrap_or_else(|e| {
            errors.push(FieldError::new("priority", e));
            Priority::Normal
        }),
    };
    let recipients = parse_recipients(obj.get("recipients"), &mut errors);
    let channels = parse_channels(obj.get("channels"), &mut errors);
    let payload = match obj.get("payload") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            errors.push(FieldError::new("payload", "must be a JSON object"));
            Map::new()
        }
    };
    let misfire_policy = match obj.get("misfire_policy") {
        None | Some(Value::Null) => MisfirePolicy::default(),
        Some(v) => serde_json::from_value(v.clone()).unwrap_or_else(|_| {
            errors.push(FieldError::new(
                "misfire_policy",
                "must be skip, fire_once or fire_all",
            ));
            MisfirePolicy::default()
        }),
    };
    let category = parse_category(obj.get("category"), &mut errors);
    if !errors.is_empty() {
        let code = if cron_error {
            "invalid_cron"
        } else if tz_error {
            "unknown_timezone"
        } else {
            "validation_failed"
        };
        return Err(ScheduleError::Invalid(code, errors));
    }
    if recipients.is_empty() {
        return Err(ScheduleError::NoRecipients);
    }
    match (cron, tz, event_type) {
        (Some(cron), Some(tz), Some(event_type)) => Ok(ScheduleInput {
            name: name.trim().to_owned(),
            cron,
            tz,
            start_at,
            end_at,
            event_type,
            priority,
            recipients,
            channels,
            payload,
            misfire_policy,
            category,
        }),
        _ => Err(ScheduleError::Invalid("validation_failed", Vec::new())),
    }
}

/// The seed format's `schedule` on an event, as a definition.
pub fn from_event(spec: &RecurringSpec, event: &NewEvent) -> Result<ScheduleInput, ScheduleError> {
    let mut errors = Vec::new();
    let cron = spec
        .cron
        .parse::<CronSpec>()
        .map_err(|e| errors.push(FieldError::new("schedule", e)))
        .ok();
    let tz = parse_tz(spec.timezone.as_deref().unwrap_or("UTC"))
        .map_err(|e| errors.push(FieldError::new("timezone", e)))
        .ok();
    match (cron, tz) {
        (Some(cron), Some(tz)) => Ok(ScheduleInput {
            name: format!("{} (from an event)", event.event_type),
            cron,
            tz,
            start_at: spec.start_at,
            end_at: None,
            event_type: event.event_type.clone(),
            priority: event.priority,
            recipients: event.recipients.clone(),
            channels: event.channels.clone(),
            payload: event.payload.clone(),
            misfire_policy: MisfirePolicy::default(),
            category: event.category,
        }),
        (None, _) => Err(ScheduleError::Invalid("invalid_cron", errors)),
        _ => Err(ScheduleError::Invalid("unknown_timezone", errors)),
    }
}

/// Checks what only the database and templates can tell: the group exists and the
/// event type has a template for every channel it will use.
pub async fn check_references(
    store: &Store,
    templates: &Templates,
    input: &ScheduleInput,
) -> Result<(), ScheduleError> {
    if let Some(g) = &input.recipients.group_id {
        if store.get_group(g.as_str()).await?.is_none() {
            return Err(ScheduleError::UnknownGroup(g.to_string()));
        }
    }
    let available = templates.channels_for(input.event_type.as_str());
    match &input.channels {
        None if available.is_empty() => Err(ScheduleError::TemplateMissing(
            input.event_type.to_string(),
            "any channel".to_owned(),
        )),
        Some(wanted) => match wanted.iter().find(|c| !available.contains(c)) {
            Some(c) => Err(ScheduleError::TemplateMissing(
                input.event_type.to_string(),
                c.to_string(),
            )),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

/// The first slot an active schedule waits for, from `from` on.
pub fn first_fire(input: &ScheduleInput, from: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let from = input.start_at.map_or(from, |s| s.max(from));
    first_slot(&input.cron, input.tz, from, input.end_at)
}

/// Builds the stored document for a definition (`existing` keeps id, history and status).
pub fn to_document(
    input: &ScheduleInput,
    existing: Option<&ScheduleDoc>,
    event_id: Option<String>,
    now: DateTime<Utc>,
) -> Result<ScheduleDoc, ScheduleError> {
    let payload = payload_document(&input.payload)
        .map_err(|d| ScheduleError::Invalid("validation_failed", d))?;
    // A slot that already fired is never offered again.
    let from = existing
        .and_then(|s| s.last_fire_at)
        .map(|t| {
            let after = DateTime::from_timestamp_millis(t.timestamp_millis() + 1).unwrap_or(now);
            after.max(now)
        })
        .unwrap_or(now);
    let next = first_fire(input, from);
    let paused = existing.is_some_and(|s| s.status == ScheduleStatus::Paused);
    let status = match (paused, next) {
        (true, _) => ScheduleStatus::Paused,
        (false, Some(_)) => ScheduleStatus::Active,
        (false, None) => ScheduleStatus::Retired,
    };
    let stamp = bson_time(now);
    Ok(ScheduleDoc {
        id: existing.map_or_else(|| uuid::Uuid::now_v7().to_string(), |s| s.id.clone()),
        name: input.name.clone(),
        cron: input.cron.source().to_owned(),
        timezone: input.tz.name().to_owned(),
        start_at: input.start_at.map(bson_time),
        end_at: input.end_at.map(bson_time),
        event_type: input.event_type.to_string(),
        priority: input.priority,
        recipients: RecipientsDoc::from(&input.recipients),
        channels: input.channels.clone(),
        payload,
        misfire_policy: input.misfire_policy,
        category: input.category,
        status,
        next_fire_at: next.map(bson_time),
        last_fire_at: existing.and_then(|s| s.last_fire_at),
        fire_count: existing.map_or(0, |s| s.fire_count),
        event_id: existing.map_or(event_id, |s| s.event_id.clone()),
        created_at: existing.map_or(stamp, |s| s.created_at),
        updated_at: stamp,
    })
}
