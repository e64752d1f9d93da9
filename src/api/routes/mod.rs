//! One file per resource.

pub mod dead_letters;
pub mod deliveries;
pub mod events;
pub mod feedback;
pub mod groups;
pub mod health;
pub mod inbox;
pub mod keys;
pub mod notifications;
pub mod schedules;
pub mod service;
pub mod stats;
pub mod suppressions;
pub mod templates;
pub mod unsubscribe;
pub mod users;
pub mod webhook_endpoints;

use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{KnownFormat, SchemaFormat, Type};
use utoipa::openapi::{ObjectBuilder, RefOr, Schema};

/// An instant as the API shows it: RFC 3339 in UTC, to the millisecond.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Time(String);

impl utoipa::PartialSchema for Time {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .into()
    }
}
impl utoipa::ToSchema for Time {}

/// Timestamps leave the API as RFC 3339 in UTC.
pub fn rfc3339(t: DateTime) -> Time {
    Time(crate::store::chrono_time(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// An IANA time zone name, as `chrono-tz` knows them.
pub struct Zone;

impl utoipa::PartialSchema for Zone {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("an IANA time zone such as Europe/Berlin"))
            .enum_values(Some(chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name())))
            .into()
    }
}
impl utoipa::ToSchema for Zone {}

/// A string of `min..=max` characters.
pub fn bounded_string(min: usize, max: usize) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
        .into()
}
