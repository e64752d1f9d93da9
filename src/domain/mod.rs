//! Domain types that parse at the edges and are trusted inside: ids, channels, priorities, statuses.

pub mod cron;
pub mod event;
pub mod plan;
pub mod preferences;
pub mod signatures;
pub mod standard_webhooks;
pub mod unsubscribe;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A field-level validation problem, reported to clients in `details`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `field: message; field: message` for logs and AMQP reject headers.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A sustained rate in events per second that a token bucket can honour: finite, at
/// least one per 1,000 s (so a wait for the next token is bounded) and at most 10⁹.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Rate(f64);

impl Rate {
    pub const MIN: f64 = 0.001;
    pub const MAX: f64 = 1e9;

    pub fn new(per_sec: f64) -> Result<Self, String> {
        if per_sec.is_finite() && (Self::MIN..=Self::MAX).contains(&per_sec) {
            Ok(Self(per_sec))
        } else {
            Err(format!(
                "must be a number of requests per second between {} and {} (got {per_sec})",
                Self::MIN,
                Self::MAX
            ))
        }
    }

    pub fn per_sec(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Rate {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        Self::new(v)
    }
}

impl From<Rate> for f64 {
    fn from(r: Rate) -> f64 {
        r.0
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not a number", truncate(s, 32)))?;
        Self::new(v)
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@' | '+')
}

/// An upstream system's user id: 1-128 characters of `[A-Za-z0-9-_.:@+]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

/// A string schema with the rule `parse` enforces, for the API document.
fn string_schema(
    pattern: &str,
    max_length: usize,
    description: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(pattern))
        .min_length(Some(1))
        .max_length(Some(max_length))
        .description(Some(description))
        .into()
}

impl utoipa::PartialSchema for UserId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "^[A-Za-z0-9._:@+-]+$",
            128,
            "1-128 letters, digits and -_.:@+",
        )
    }
}
impl utoipa::ToSchema for UserId {}

impl UserId {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 128 || !s.chars().all(is_id_char) {
            return Err(format!(
                "`{}` is not a user id (1-128 characters of letters, digits and -_.:@+)",
                truncate(s, 64)
            ));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> String {
        id.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A group id follows the same rules as a user id.
pub type GroupId = UserId;

/// An event type names a template folder, so it is a safe path component:
/// `[a-z0-9][a-z0-9_.-]{0,63}` without `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventType(String);

impl utoipa::PartialSchema for EventType {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        // No `..`: every dot is followed by another character or ends the name.
        string_schema(
            r"^[a-z0-9](\.?[a-z0-9_-])*\.?$",
            64,
            "a-z, 0-9, _ - ., starting with a letter or digit, without `..`",
        )
    }
}
impl utoipa::ToSchema for EventType {}

impl EventType {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
        if !first_ok || !rest_ok || s.len() > 64 || s.contains("..") {
            return Err(format!(
                "`{}` is not an event type (1-64 characters of a-z, 0-9, _ - ., starting with a letter or digit)",
                truncate(s, 64)
            ));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EventType {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<EventType> for String {
    fn from(t: EventType) -> String {
        t.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A delivery channel.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Sms,
    Push,
    Webhook,
    /// An item in the user's herald inbox, read through the inbox API and widget.
    InApp,
}

impl Channel {
    pub const ALL: [Channel; 5] = [
        Channel::Email,
        Channel::Sms,
        Channel::Push,
        Channel::Webhook,
        Channel::InApp,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Push => "push",
            Channel::Webhook => "webhook",
            Channel::InApp => "in_app",
        }
    }
}

impl FromStr for Channel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Channel::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown channel `{}` (email, sms, push, webhook, in_app)",
                    truncate(s, 32)
                )
            })
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an API key may do; `admin` may do everything.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub enum Scope {
    #[serde(rename = "events:write")]
    EventsWrite,
    #[serde(rename = "campaigns:write")]
    CampaignsWrite,
    #[serde(rename = "logs:read")]
    LogsRead,
    /// Posting delivery status notifications (an MTA's bounce pipe).
    #[serde(rename = "feedback:write")]
    FeedbackWrite,
    /// Managing the endpoints herald posts status webhooks to.
    #[serde(rename = "webhooks:write")]
    WebhooksWrite,
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::EventsWrite,
        Scope::CampaignsWrite,
        Scope::LogsRead,
        Scope::FeedbackWrite,
        Scope::WebhooksWrite,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::EventsWrite => "events:write",
            Scope::CampaignsWrite => "campaigns:write",
            Scope::LogsRead => "logs:read",
            Scope::FeedbackWrite => "feedback:write",
            Scope::WebhooksWrite => "webhooks:write",
            Scope::Admin => "admin",
        }
    }

    /// A comma-separated list (`events:write,logs:read`); at least one scope.
    pub fn parse_list(s: &str) -> Result<Vec<Scope>, String> {
        let scopes = s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Scope>, String>>()?;
        if scopes.is_empty() {
            return Err("give at least one scope".to_owned());
        }
        Ok(scopes)
    }

    /// True when a key holding `held` may use something that needs `self`.
    pub fn granted_by(self, held: &[Scope]) -> bool {
        held.iter().any(|h| *h == self || *h == Scope::Admin)
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                format!("unknown scope `{s}` (events:write, campaigns:write, logs:read, feedback:write, webhooks:write, admin)")
            })
    }
}

/// A priority lane. `high` is never stuck behind `low`: each lane has its own queue and slots.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Parses the API's names and the seed format's integers (1 high, 2 normal, 3 low).
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        match v {
            serde_json::Value::String(s) => match s.as_str() {
                "high" => Ok(Priority::High),
                "normal" => Ok(Priority::Normal),
                "low" => Ok(Priority::Low),
                other => Err(format!(
                    "unknown priority `{}` (high, normal, low or 1, 2, 3)",
                    truncate(other, 32)
                )),
            },
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(1) => Ok(Priority::High),
                Some(2) => Ok(Priority::Normal),
                Some(3) => Ok(Priority::Low),
                _ => Err(format!(
                    "unknown priority {n} (high, normal, low or 1, 2, 3)"
                )),
            },
            _ => Err("priority must be a string or an integer".to_owned()),
        }
    }
}

/// What kind of message an event type sends: marketing mail carries one-click
/// unsubscribe and is not sent to those who left it; transactional mail is always sent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    #[default]
    Transactional,
    Marketing,
}

impl Category {
    pub fn parse(v: &serde_json::Value) -> Result<Self, String> {
        serde_json::from_value(v.clone())
            .map_err(|_| "must be transactional or marketing".to_owned())
    }
}

/// Where a notification stands as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotificationStatus {
    Accepted,
    Dispatching,
    Completed,
    PartiallyFailed,
    Failed,
    Scheduled,
    Cancelled,
}

/// Where one delivery (recipient x channel) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Queued,
    Sending,
    Sent,
    Failed,
    Retrying,
    Dead,
    Skipped,
    Deferred,
    /// The provider reports it reached the recipient (after `sent`).
    Delivered,
    /// The recipient's server refused it for good (a hard bounce), after `sent`.
    Bounced,
    /// The carrier or push service could not deliver it, after `sent`.
    Undelivered,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sending => "sending",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Skipped => "skipped",
            DeliveryStatus::Deferred => "deferred",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Bounced => "bounced",
            DeliveryStatus::Undelivered => "undelivered",
        }
    }

    /// Statuses only a provider's feedback sets, after `sent`.
    pub fn is_feedback(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Delivered | DeliveryStatus::Bounced | DeliveryStatus::Undelivered
        )
    }

    /// Final statuses never change again without an explicit replay.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Sent
                | DeliveryStatus::Failed
                | DeliveryStatus::Dead
                | DeliveryStatus::Skipped
                | DeliveryStatus::Delivered
                | DeliveryStatus::Bounced
                | DeliveryStatus::Undelivered
        )
    }

    /// The notification counter a delivery in this status is counted under;
    /// `sending` is still counted where it came from (see the delivery's claim).
    pub fn counter(self) -> Option<&'static str> {
        match self {
            DeliveryStatus::Sending => None,
            other => Some(other.as_str()),
        }
    }
}

/// At most `max` characters of `s`, with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_safe_path_components() {
        assert!(EventType::parse("new_episode").is_ok());
        assert!(EventType::parse("billing.invoice-paid").is_ok());
        for bad in ["", "../etc", "a..b", "Caps", "_x", "a/b", &"x".repeat(65)] {
            assert!(EventType::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn priorities_accept_names_and_seed_integers() {
        use serde_json::json;
        assert_eq!(Priority::from_json(&json!(1)), Ok(Priority::High));
        assert_eq!(Priority::from_json(&json!("low")), Ok(Priority::Low));
        assert!(Priority::from_json(&json!(4)).is_err());
        assert!(Priority::from_json(&json!("urgent")).is_err());
    }
}
