//! `/v1/stats/deliveries`: counts by day, hour, channel, status, event type and provider,
//! with success rates and send-latency percentiles per channel.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use mongodb::bson::Bson;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::deliveries::parse_instant;
use super::{rfc3339, Time};
use crate::api::error::{ApiError, QueryParams};
use crate::domain::FieldError;
use crate::store::stats::floor_hour;
use crate::store::{StatDimension, Store};

const PERCENTILES: [(f64, &str); 3] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")];

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Default: 7 days before `until`. A window that ends before it starts is empty.
    #[param(value_type = Option<String>, format = DateTime)]
    since: Option<String>,
    /// Default: now.
    #[param(value_type = Option<String>, format = DateTime)]
    until: Option<String>,
    /// Comma-separated dimensions: day, hour, channel, status, event_type, provider
    /// (default `day,channel,status`).
    #[param(
        pattern = r"^\s*((day|hour|channel|status|event_type|provider)\s*)?(,\s*((day|hour|channel|status|event_type|provider)\s*)?)*$"
    )]
    group_by: Option<String>,
}

/// Delivery counts in a window.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stats {
    /// The window's start, floored to the hour.
    since: Time,
    until: Time,
    /// Always `hour`.
    resolution: &'static str,
    group_by: Vec<&'static str>,
    total: i64,
    /// One row per combination of the `group_by` dimensions, with its `count`.
    #[schema(value_type = Vec<Object>)]
    rows: Vec<Map<String, Value>>,
    channels: BTreeMap<String, ChannelSummary>,
}

/// One channel's outcomes in the window, with each provider's.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelSummary {
    #[serde(flatten)]
    outcomes: Outcomes,
    /// Milliseconds from acceptance to the provider's answer: p50, p90, p99.
    send_latency_ms: BTreeMap<String, i64>,
    /// The same counts and rates per provider (deliveries a provider took or refused).
    providers: BTreeMap<String, Outcomes>,
}

/// Delivery outcomes and what recipients and providers reported about them.
#[derive(Debug, Serialize, ToSchema)]
pub struct Outcomes {
    sent: i64,
    failed: i64,
    dead: i64,
    skipped: i64,
    pending: i64,
    /// Reported by the providers after `sent`.
    delivered: i64,
    bounced: i64,
    undelivered: i64,
    /// Deliveries reported as spam by their recipient (beside their status).
    complained: i64,
    /// Deliveries whose one-click unsubscribe link was used (beside their status).
    unsubscribed: i64,
    /// (sent + delivered) over every provider-decided outcome; null when none.
    success_rate: Option<f64>,
    /// (bounced + undelivered) over every handed-over delivery; null when none.
    bounce_rate: Option<f64>,
    /// complained over every handed-over delivery (keep it under 0.003); null when none.
    complaint_rate: Option<f64>,
}

impl From<&crate::store::stats::Outcomes> for Outcomes {
    fn from(o: &crate::store::stats::Outcomes) -> Self {
        Self {
            sent: o.sent,
            failed: o.failed,
            dead: o.dead,
            skipped: o.skipped,
            pending: o.pending,
            delivered: o.delivered,
            bounced: o.bounced,
            undelivered: o.undelivered,
            complained: o.complained,
            unsubscribed: o.unsubscribed,
            success_rate: o.success_rate(),
            bounce_rate: o.bounce_rate(),
            complaint_rate: o.complaint_rate(),
        }
    }
}

fn key_json(dimension: &str, v: &Bson) -> Value {
    match (dimension, v) {
        ("day", Bson::DateTime(t)) => {
            json!(crate::store::chrono_time(*t).format("%Y-%m-%d").to_string())
        }
        (_, Bson::DateTime(t)) => json!(rfc3339(*t)),
        (_, Bson::String(s)) if s.is_empty() => Value::Null,
        (_, other) => other.clone().into_relaxed_extjson(),
    }
}

/// Deliveries created in `[since, until)` (default: the last 7 days), at hour resolution.
pub async fn deliveries(
    State(store): State<Store>,
    QueryParams(q): QueryParams<StatsQuery>,
) -> Result<Json<Stats>, ApiError> {
    let mut errors = Vec::new();
    let until =
        parse_instant("until", q.until.as_deref(), &mut errors).unwrap_or_else(crate::store::now);
    let since = parse_instant("since", q.since.as_deref(), &mut errors).unwrap_or_else(|| {
        mongodb::bson::DateTime::from_millis(until.timestamp_millis() - 7 * 86_400_000)
    });
    let mut by = Vec::new();
    for name in q
        .group_by
        .as_deref()
        .unwrap_or("day,channel,status")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match StatDimension::parse(name) {
            Some(d) if !by.contains(&d) => by.push(d),
            Some(_) => {}
            None => errors.push(FieldError::new(
                "group_by",
                format!(
                    "unknown dimension `{name}` (day, hour, channel, status, event_type, provider)"
                ),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let percentiles: Vec<f64> = PERCENTILES.iter().map(|(p, _)| *p).collect();
    let (rows, channels) = tokio::try_join!(
        store.delivery_stats(since, until, &by),
        store.channel_summaries(since, until, &percentiles),
    )?;
    let total: i64 = rows.iter().map(|r| r.count).sum();
    let rows = rows
        .iter()
        .map(|r| {
            let mut o = Map::new();
            for (k, v) in &r.key {
                o.insert((*k).to_owned(), key_json(k, v));
            }
            o.insert("count".into(), json!(r.count));
            o
        })
        .collect();
    let channels = channels
        .into_iter()
        .map(|(channel, s)| {
            let send_latency_ms = s
                .latency_ms
                .iter()
                .filter_map(|(p, ms)| {
                    let name = PERCENTILES.iter().find(|(q, _)| q == p)?.1;
                    Some((name.to_owned(), *ms))
                })
                .collect();
            let summary = ChannelSummary {
                outcomes: Outcomes::from(&s.outcomes),
                send_latency_ms,
                providers: s
                    .providers
                    .iter()
                    .map(|(p, o)| (p.clone(), o.into()))
                    .collect(),
            };
            (channel, summary)
        })
        .collect();
    Ok(Json(Stats {
        since: rfc3339(floor_hour(since)),
        until: rfc3339(until),
        resolution: "hour",
        group_by: by.iter().map(|d| d.name()).collect(),
        total,
        rows,
        channels,
    }))
}
