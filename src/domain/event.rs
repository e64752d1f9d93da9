//! Parsing an incoming event (REST body or AMQP message, both formats) into a trusted `NewEvent`.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{truncate, Category, Channel, EventType, FieldError, GroupId, Priority, UserId};

/// Who receives a notification: inline user ids, a group and/or a segment of all users.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipients {
    pub user_ids: Vec<UserId>,
    pub group_id: Option<GroupId>,
    pub segment: Option<Segment>,
}

impl Recipients {
    pub fn is_empty(&self) -> bool {
        self.user_ids.is_empty() && self.group_id.is_none() && self.segment.is_none()
    }
}

/// Users matching every given filter; no filter (`{"all": true}`) means every user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segment {
    pub locale: Option<String>,
    pub tag: Option<String>,
}

/// The seed format's recurring schedule (`schedule` + `start_dt` + `timezone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecurringSpec {
    pub cron: String,
    pub start_at: Option<DateTime<Utc>>,
    pub timezone: Option<String>,
}

/// A validated event, ready to be accepted.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The de-duplication key: `event_id`, else the `Idempotency-Key` header, else generated.
    pub event_id: Option<String>,
    pub event_type: EventType,
    pub priority: Priority,
    pub recipients: Recipients,
    /// `None`: every channel the event type has a template for.
    pub channels: Option<Vec<Channel>>,
    pub payload: Map<String, Value>,
    pub send_at: Option<DateTime<Utc>>,
    pub upstream_created_at: Option<DateTime<Utc>>,
    pub recurring: Option<RecurringSpec>,
    /// Overrides the event type's configured category.
    pub category: Option<Category>,
}

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct EventLimits {
    pub max_payload_bytes: usize,
    pub max_inline_recipients: usize,
}

/// Why an event was refused; each maps to one stable error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    MalformedJson(String),
    Invalid(Vec<FieldError>),
    NoRecipients,
    PayloadTooLarge { size: usize, limit: usize },
}

impl EventError {
    pub fn code(&self) -> &'static str {
        match self {
            EventError::MalformedJson(_) => "malformed_json",
            EventError::Invalid(_) => "validation_failed",
            EventError::NoRecipients => "no_recipients",
            EventError::PayloadTooLarge { .. } => "payload_too_large",
        }
    }

    pub fn message(&self) -> String {
        match self {
            EventError::MalformedJson(why) => format!("the body is not valid JSON: {why}"),
            EventError::Invalid(errors) => match errors.as_slice() {
                [one] => format!("{}: {}", one.field, one.message),
                _ => format!("{} fields are invalid", errors.len()),
            },
            EventError::NoRecipients => {
                "the event names no recipients: give recipients.user_ids, recipients.group_id, recipients.segment or payload.user".to_owned()
            }
            EventError::PayloadTooLarge { size, limit } => {
                format!("payload is {size} bytes; the limit is {limit} bytes")
            }
        }
    }
}

/// Both accepted shapes share one struct; every field is checked by hand so a
/// client hears about every bad field at once, by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    event_id: Option<Value>,
    event_type: Option<Value>,
    priority: Option<Value>,
    recipients: Option<Value>,
    channels: Option<Value>,
    payload: Option<Value>,
    send_at: Option<Value>,
    category: Option<Value>,
    // The original notification design's fields.
    created_dt: Option<Value>,
    schedule: Option<Value>,
    start_dt: Option<Value>,
    timezone: Option<Value>,
}

/// Parses and validates an event body. `idempotency_key` is the REST header, if any.
///
/// Long on purpose: it checks every field of both accepted formats in one pass and
/// collects every problem, so a client learns all that is wrong with a body at once.
pub fn parse_event(
    body: &[u8],
    idempotency_key: Option<&str>,
    limits: EventLimits,
) -> Result<NewEvent, EventError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| EventError::MalformedJson(e.to_string()))?;
    if !value.is_object() {
        return Err(EventError::Invalid(vec![FieldError::new(
            "body",
            "must be a JSON object",
        )]));
    }
    let raw: RawEvent = serde_json::from_value(value)
        .map_err(|e| EventError::Invalid(vec![FieldError::new("body", e.to_string())]))?;
    let mut errors = Vec::new();

    let event_id = match (&raw.event_id, idempotency_key) {
        (Some(Value::String(s)), _) => check_key("event_id", s, &mut errors),
        (Some(Value::Null) | None, Some(key)) => check_key("Idempotency-Key", key, &mut errors),
        (Some(Value::Null) | None, None) => None,
        (Some(_), _) => {
            errors.push(FieldError::new("event_id", "must be a string"));
            None
        }
    };

    let event_type = match &raw.event_type {
        Some(Value::String(s)) => EventType::parse(s)
            .map_err(|e| errors.push(FieldError::new("event_type", e)))
            .ok(),
        None | Some(Value::Null) => {
            errors.push(FieldError::new("event_type", "is required"));
            None
        }
        Some(_) => {
            errors.push(FieldError::new("event_type", "must be a string"));
            None
        }
    };

    let priority = match &raw.priority {
        None | Some(Value::Null) => Priority::Normal,
        Some(v) => Priority::from_json(v).unwrap_or_else(|e| {
            errors.push(FieldError::new("priority", e));
            Priority::Normal
        }),
    };

    let payload = match raw.payload {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => {
            errors.push(FieldError::new("payload", "must be a JSON object"));
            Map::new()
        }
    };
    let payload_size = serde_json::to_vec(&payload).map(|v| v.len()).unwrap_or(0);
    if payload_size > limits.max_payload_bytes {
        return Err(EventError::PayloadTooLarge {
            size: payload_size,
            limit: limits.max_payload_bytes,
        });
    }

    let mut recipients = parse_recipients(raw.recipients.as_ref(), &mut errors);
    // The seed format names recipients in payload.user.
    if let Some(users) = payload.get("user") {
        let ids = parse_user_ids("payload.user", users, &mut errors);
        recipients.user_ids.extend(ids);
    }
    let mut seen = BTreeSet::new();
    recipients.user_ids.retain(|id| seen.insert(id.clone()));
    if recipients.user_ids.len() > limits.max_inline_recipients {
        errors.push(FieldError::new(
            "recipients.user_ids",
            format!(
                "at most {} inline recipients; use a group for more",
                limits.max_inline_recipients
            ),
        ));
    }
    if let Some(content) = payload.get("content") {
        let ok = content
            .as_array()
            .is_some_and(|a| a.iter().all(|v| v.is_string() || v.is_number()));
        if !ok {
            errors.push(FieldError::new(
                "payload.content",
                "must be an array of content ids",
            ));
        }
    }

    let channels = parse_channels(raw.channels.as_ref(), &mut errors);
    let category = parse_category(raw.category.as_ref(), &mut errors);

    let send_at = parse_time("send_at", raw.send_at.as_ref(), &mut errors);
    let upstream_created_at = parse_time("created_dt", raw.created_dt.as_ref(), &mut errors);
    let start_at = parse_time("start_dt", raw.start_dt.as_ref(), &mut errors);
    let timezone = match &raw.timezone {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new("timezone", "must be a string"));
            None
        }
    };
    let recurring = match &raw.schedule {
        None | Some(Value::Null) => None,
        Some(Value::String(cron)) => Some(RecurringSpec {
            cron: cron.clone(),
            start_at,
            timezone,
        }),
        Some(_) => {
            errors.push(FieldError::new(
                "schedule",
                "must be a cron expression string",
            ));
            None
        }
    };
    if recurring.is_some() && send_at.is_some() {
        errors.push(FieldError::new(
            "send_at",
            "give either schedule (recurring) or send_at (one-off), not both",
        ));
    }

    if !errors.is_empty() {
        return Err(EventError::Invalid(errors));
    }
    if recipients.is_empty() {
        return Err(EventError::NoRecipients);
    }
    Ok(NewEvent {
        event_id,
        // Present whenever `errors` is empty.
        event_type: event_type.ok_or(EventError::Invalid(vec![]))?,
        priority,
        recipients,
        channels,
        payload,
        send_at,
        upstream_created_at,
        recurring,
        category,
    })
}

/// `category`: `transactional` or `marketing`; `None` leaves it to the event type's.
pub fn parse_category(v: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<Category> {
    match v {
        None | Some(Value::Null) => None,
        Some(v) => Category::parse(v)
            .map_err(|e| errors.push(FieldError::new("category", e)))
            .ok(),
    }
}

/// `recipients`: `{"user_ids": [...], "group_id": "...", "segment": {...}}`.
pub fn parse_recipients(v: Option<&Value>, errors: &mut Vec<FieldError>) -> Recipients {
    let mut recipients = Recipients::default();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(r)) => {
            for key in r.keys() {
                if !["user_ids", "group_id", "segment"].contains(&key.as_str()) {
                    errors.push(FieldError::new(
                        format!("recipients.{}", truncate(key, 32)),
                        "unknown field (user_ids, group_id, segment)",
                    ));
                }
            }
            if let Some(ids) = r.get("user_ids") {
                recipients.user_ids = parse_user_ids("recipients.user_ids", ids, errors);
            }
            match r.get("group_id") {
                None | Some(Value::Null) => {}
                Some(Value::String(g)) => match GroupId::parse(g) {
                    Ok(g) => recipients.group_id = Some(g),
                    Err(e) => errors.push(FieldError::new("recipients.group_id", e)),
                },
                Some(_) => errors.push(FieldError::new("recipients.group_id", "must be a string")),
            }
            match r.get("segment") {
                None | Some(Value::Null) => {}
                Some(seg) => recipients.segment = parse_segment(seg, errors),
            }
        }
        Some(_) => errors.push(FieldError::new("recipients", "must be an object")),
    }
    recipients
}

fn parse_segment(v: &Value, errors: &mut Vec<FieldError>) -> Option<Segment> {
    let field = "recipients.segment";
    let Some(obj) = v.as_object() else {
        errors.push(FieldError::new(
            field,
            "must be an object such as {\"all\": true} or {\"locale\": \"pt-BR\"}",
        ));
        return None;
    };
    let mut seg = Segment::default();
    let mut all = false;
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("all", Value::Bool(b)) => all = *b,
            ("locale", Value::String(s)) if !s.is_empty() && s.chars().count() <= 35 => {
                seg.locale = Some(s.clone())
            }
            ("tag", Value::String(s)) if !s.is_empty() && s.chars().count() <= 64 => {
                seg.tag = Some(s.clone())
            }
            ("all" | "locale" | "tag", _) => {
                errors.push(FieldError::new(
                    format!("{field}.{k}"),
                    "has the wrong type or length",
                ));
                return None;
            }
            _ => {
                errors.push(FieldError::new(
                    format!("{field}.{}", truncate(k, 32)),
                    "unknown field (all, locale, tag)",
                ));
                return None;
            }
        }
    }
    if !all && seg.locale.is_none() && seg.tag.is_none() {
        errors.push(FieldError::new(field, "give all: true, a locale or a tag"));
        return None;
    }
    Some(seg)
}

/// `channels`: a non-empty list of channel names; `None` means every templated channel.
pub fn parse_channels(v: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<Vec<Channel>> {
    match v {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if items.is_empty() => {
            errors.push(FieldError::new("channels", "must not be empty when given"));
            None
        }
        Some(Value::Array(items)) => {
            let mut out: Vec<Channel> = Vec::new();
            for item in items {
                match item.as_str().map(str::parse::<Channel>) {
                    Some(Ok(c)) if !out.contains(&c) => out.push(c),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => errors.push(FieldError::new("channels", e)),
                    None => errors.push(FieldError::new("channels", "must be an array of strings")),
                }
            }
            Some(out)
        }
        Some(_) => {
            errors.push(FieldError::new("channels", "must be an array of strings"));
            None
        }
    }
}

fn check_key(field: &str, key: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    if key.is_empty() || key.chars().count() > 200 || key.chars().any(char::is_control) {
        errors.push(FieldError::new(
            field,
            "must be 1-200 printable characters (a UUID is recommended)",
        ));
        return None;
    }
    Some(key.to_owned())
}

pub fn parse_user_ids(field: &str, v: &Value, errors: &mut Vec<FieldError>) -> Vec<UserId> {
    let Some(items) = v.as_array() else {
        errors.push(FieldError::new(field, "must be an array of user ids"));
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        // The seed format's ids may be integers.
        let text = match item {
            Value::String(s) => s.clone(),
            Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
            // JSON has one number type: 7.0 is the integer 7.
            Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                format!("{:.0}", n.as_f64().unwrap_or_default())
            }
            _ => {
                errors.push(FieldError::new(field, "must contain strings"));
                continue;
            }
        };
        match UserId::parse(&text) {
            Ok(id) => out.push(id),
            Err(e) => errors.push(FieldError::new(field, e)),
        }
    }
    out
}

/// Accepts RFC 3339, and the seed format's `YYYY-MM-DD HH:MM:SS` / `YYYY-MM-DD` (as UTC).
pub fn parse_time(
    field: &str,
    v: Option<&Value>,
    errors: &mut Vec<FieldError>,
) -> Option<DateTime<Utc>> {
    let s = match v {
        None | Some(Value::Null) => return None,
        Some(Value::String(s)) => s,
        Some(_) => {
            errors.push(FieldError::new(
                field,
                "must be an RFC 3339 timestamp string",
            ));
            return None;
        }
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    errors.push(FieldError::new(
        field,
        format!("`{}` is not an RFC 3339 timestamp", truncate(s, 40)),
    ));
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: EventLimits = EventLimits {
        max_payload_bytes: 1024,
        max_inline_recipients: 10,
    };

    fn parse(v: Value) -> Result<NewEvent, EventError> {
        parse_event(v.to_string().as_bytes(), None, LIMITS)
    }

    #[test]
    fn the_contract_format_parses() {
        let e = parse(json!({
            "event_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "event_type": "new_episode", "priority": "high",
            "recipients": {"user_ids": ["u1", "u2", "u1"], "group_id": "g1"},
            "channels": ["email", "sms"], "payload": {"content": ["m1"]},
            "send_at": "2026-11-22T10:00:00Z"
        }))
        .expect("valid");
        assert_eq!(e.priority, Priority::High);
        assert_eq!(e.recipients.user_ids.len(), 2, "duplicates removed");
        assert_eq!(e.channels, Some(vec![Channel::Email, Channel::Sms]));
        assert!(e.send_at.is_some());
    }

    #[test]
    fn the_seed_format_parses() {
        let e = parse(json!({
            "event_type": "new_episode", "created_dt": "2021-07-25 10:00:00",
            "priority": 1, "payload": {"user": [1, "u2"], "content": ["m1"]}
        }))
        .expect("valid");
        assert_eq!(e.priority, Priority::High);
        assert_eq!(e.recipients.user_ids[0].as_str(), "1");
        assert!(e.upstream_created_at.is_some());
    }

    #[test]
    fn every_bad_field_is_named() {
        let Err(EventError::Invalid(errs)) = parse(json!({
            "event_type": "Bad Type", "priority": "urgent", "channels": ["fax"],
            "recipients": {"user_ids": ["ok"]}
        })) else {
            panic!("must be invalid")
        };
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["event_type", "priority", "channels"]);
    }

    #[test]
    fn refusals_have_their_own_codes() {
        assert_eq!(
            parse_event(b"{nope", None, LIMITS)
                .expect_err("refused")
                .code(),
            "malformed_json"
        );
        assert_eq!(
            parse(json!({"event_type": "x"}))
                .expect_err("refused")
                .code(),
            "no_recipients"
        );
        let big = "x".repeat(2000);
        assert_eq!(
            parse(
                json!({"event_type": "x", "recipients": {"user_ids": ["u"]}, "payload": {"b": big}})
            )
            .expect_err("refused")
            .code(),
            "payload_too_large"
        );
        assert_eq!(
            parse(json!({"event_type": "x", "recipients": {"user_ids": ["u"]}, "colour": 1}))
                .expect_err("refused")
                .code(),
            "validation_failed"
        );
    }

    #[test]
    fn the_idempotency_key_stands_in_for_a_missing_event_id() {
        let body = json!({"event_type": "x", "recipients": {"user_ids": ["u"]}}).to_string();
        let e = parse_event(body.as_bytes(), Some("key-1"), LIMITS).expect("valid");
        assert_eq!(e.event_id.as_deref(), Some("key-1"));
    }
}

/// Properties over arbitrary input: the parser never panics, and every refusal carries one
/// of the stable codes (the API maps each to a 4xx).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::{parse_event, EventLimits};

    const LIMITS: EventLimits = EventLimits {
        max_payload_bytes: 4096,
        max_inline_recipients: 50,
    };
    const CODES: [&str; 4] = [
        "malformed_json",
        "validation_failed",
        "no_recipients",
        "payload_too_large",
    ];

    /// Any JSON value, a few levels deep.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,40}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
                prop::collection::btree_map(".{0,12}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An event whose known fields hold arbitrary values (the shapes a client gets wrong).
    fn event_like() -> impl Strategy<Value = Value> {
        let field = prop_oneof![
            Just("event_type"),
            Just("event_id"),
            Just("priority"),
            Just("channels"),
            Just("recipients"),
            Just("payload"),
            Just("locale"),
            Just("send_at"),
            Just("recurring"),
            Just("timezone"),
        ];
        prop::collection::btree_map(field, any_json(), 0..10)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_refusals_have_a_stable_code(body in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = parse_event(&body, None, LIMITS) {
                prop_assert!(CODES.contains(&e.code()));
            }
        }

        #[test]
        fn arbitrary_event_shapes_never_panic_and_refusals_have_a_stable_code(
            event in event_like(),
            key in proptest::option::of(".{0,80}"),
        ) {
            let body = serde_json::to_vec(&event).expect("serializable");
            match parse_event(&body, key.as_deref(), LIMITS) {
                Err(e) => {
                    prop_assert!(CODES.contains(&e.code()));
                    prop_assert!(!e.message().is_empty());
                }
                Ok(parsed) => {
                    prop_assert!(!parsed.recipients.is_empty() || parsed.recurring.is_some());
                }
            }
        }
    }
}
