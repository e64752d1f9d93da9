//! One file per resource.

pub mod dead_letters;
pub mod deliveries;
pub mod events;
pub mod groups;
pub mod health;
pub mod keys;
pub mod notifications;
pub mod schedules;
pub mod service;
pub mod stats;
pub mod templates;
pub mod users;

use mongodb::bson::DateTime;

/// Timestamps leave the API as RFC 3339 in UTC.
pub fn rfc3339(t: DateTime) -> String {
    crate::store::chrono_time(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
