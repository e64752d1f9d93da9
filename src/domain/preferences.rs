//! A recipient's preferences: channel opt-outs, muted event types, quiet hours in their time zone.

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use super::{Channel, FieldError};

/// Quiet hours: a daily wall-clock window (it may wrap midnight), in the user's zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

/// Parsed preferences.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preferences {
    pub opted_out: Vec<Channel>,
    pub muted_event_types: Vec<String>,
    pub quiet_hours: Option<QuietHours>,
}

/// What the preferences say about one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Skipped with this reason.
    Skip(&'static str),
    /// Inside quiet hours: wait until this instant.
    DeferUntil(DateTime<Utc>),
}

fn time(s: &str) -> Option<NaiveTime> {
    NaiveTime::parse_from_str(s, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M"))
        .ok()
}

impl Preferences {
    /// Parses `{"channels": {"sms": false}, "muted_event_types": [...],
    /// "quiet_hours": {"start": "22:00", "end": "08:00"}}`, naming every bad field.
    pub fn parse(v: &Value) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut p = Preferences::default();
        let Some(obj) = v.as_object() else {
            return Err(vec![FieldError::new("preferences", "must be an object")]);
        };
        for (k, v) in obj {
            match k.as_str() {
                "channels" => match v.as_object() {
                    Some(m) => {
                        for (c, on) in m {
                            match (c.parse::<Channel>(), on) {
                                (Ok(c), Value::Bool(false)) => p.opted_out.push(c),
                                (Ok(_), Value::Bool(true)) => {}
                                (Err(e), _) => {
                                    errors.push(FieldError::new("preferences.channels", e))
                                }
                                (Ok(_), _) => errors.push(FieldError::new(
                                    format!("preferences.channels.{c}"),
                                    "must be true or false",
                                )),
                            }
                        }
                    }
                    None => errors.push(FieldError::new(
                        "preferences.channels",
                        "must be an object such as {\"sms\": false}",
                    )),
                },
                "muted_event_types" => match v.as_array() {
                    Some(a) if a.iter().all(Value::is_string) => {
                        p.muted_event_types = a
                            .iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect();
                    }
                    _ => errors.push(FieldError::new(
                        "preferences.muted_event_types",
                        "must be an array of event types",
                    )),
                },
                "quiet_hours" => {
                    let start = v.get("start").and_then(Value::as_str).and_then(time);
                    let end = v.get("end").and_then(Value::as_str).and_then(time);
                    let only_those = v.as_object().is_some_and(|o| o.len() == 2);
                    match (start, end) {
                        (Some(start), Some(end)) if start != end && only_those => p.quiet_hours = Some(QuietHours { start, end }),
                        _ => errors.push(FieldError::new("preferences.quiet_hours", "must be {\"start\": \"HH:MM\", \"end\": \"HH:MM\"} with different times")),
                    }
                }
                other => errors.push(FieldError::new(
                    format!("preferences.{}", super::truncate(other, 32)),
                    "unknown field (channels, muted_event_types, quiet_hours)",
                )),
            }
        }
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors)
        }
    }

    /// Decides a delivery: opt-outs always hold; mutes and quiet hours yield to a
    /// `bypass` (high priority of an event type config allows, such as security codes).
    pub fn verdict(
        &self,
        channel: Channel,
        event_type: &str,
        bypass: bool,
        tz: Tz,
        now: DateTime<Utc>,
    ) -> Verdict {
        if self.opted_out.contains(&channel) {
            return Verdict::Skip("opted_out");
        }
        if bypass {
            return Verdict::Send;
        }
        if self.muted_event_types.iter().any(|m| m == event_type) {
            return Verdict::Skip("muted");
        }
        match self.quiet_hours.and_then(|q| q.ends_after(tz, now)) {
            Some(end) => Verdict::DeferUntil(end),
            None => Verdict::Send,
        }
    }
}

impl QuietHours {
    fn contains(&self, t: NaiveTime) -> bool {
        if self.start < self.end {
            t >= self.start && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// When `now` falls inside the window, the instant it ends.
    pub fn ends_after(&self, tz: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&tz);
        if !self.contains(local.time()) {
            return None;
        }
        let mut day = local.date_naive();
        if local.time() >= self.end {
            day = day.succ_opt()?;
        }
        let end = day.and_time(self.end);
        // An end inside a DST gap ends at the first instant after it.
        (0..180)
            .find_map(|m| {
                tz.from_local_datetime(&(end + Duration::minutes(m)))
                    .earliest()
            })
            .map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("t")
            .with_timezone(&Utc)
    }

    #[test]
    fn opt_outs_hold_even_for_bypassing_events() {
        let p =
            Preferences::parse(&json!({"channels": {"sms": false, "email": true}})).expect("valid");
        assert_eq!(
            p.verdict(Channel::Sms, "x", true, Tz::UTC, at("2026-01-01T12:00:00Z")),
            Verdict::Skip("opted_out")
        );
        assert_eq!(
            p.verdict(
                Channel::Email,
                "x",
                false,
                Tz::UTC,
                at("2026-01-01T12:00:00Z")
            ),
            Verdict::Send
        );
    }

    #[test]
    fn mutes_skip_unless_bypassed() {
        let p = Preferences::parse(&json!({"muted_event_types": ["promo", "security_code"]}))
            .expect("valid");
        assert_eq!(
            p.verdict(
                Channel::Email,
                "promo",
                false,
                Tz::UTC,
                at("2026-01-01T12:00:00Z")
            ),
            Verdict::Skip("muted")
        );
        assert_eq!(
            p.verdict(
                Channel::Email,
                "security_code",
                true,
                Tz::UTC,
                at("2026-01-01T12:00:00Z")
            ),
            Verdict::Send
        );
    }

    #[test]
    fn quiet_hours_wrap_midnight_in_the_users_zone() {
        let p = Preferences::parse(&json!({"quiet_hours": {"start": "22:00", "end": "08:00"}}))
            .expect("valid");
        let berlin: Tz = "Europe/Berlin".parse().expect("tz");
        // 23:30 in Berlin (UTC+1 in January) -> deferred to 08:00 Berlin = 07:00 UTC.
        assert_eq!(
            p.verdict(
                Channel::Push,
                "x",
                false,
                berlin,
                at("2026-01-01T22:30:00Z")
            ),
            Verdict::DeferUntil(at("2026-01-02T07:00:00Z"))
        );
        // 06:00 Berlin -> the same morning.
        assert_eq!(
            p.verdict(
                Channel::Push,
                "x",
                false,
                berlin,
                at("2026-01-02T05:00:00Z")
            ),
            Verdict::DeferUntil(at("2026-01-02T07:00:00Z"))
        );
        assert_eq!(
            p.verdict(
                Channel::Push,
                "x",
                false,
                berlin,
                at("2026-01-02T12:00:00Z")
            ),
            Verdict::Send
        );
        assert_eq!(
            p.verdict(Channel::Push, "x", true, berlin, at("2026-01-01T22:30:00Z")),
            Verdict::Send
        );
    }

    #[test]
    fn bad_preferences_are_named() {
        let errors = Preferences::parse(
            &json!({"channels": {"fax": false}, "quiet_hours": {"start": "25:00"}, "colour": 1}),
        )
        .expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "preferences.channels",
                "preferences.quiet_hours",
                "preferences.colour"
            ]
        );
    }
}
