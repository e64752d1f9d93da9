//! `/v1/feedback/*`: what the providers report after `sent`, each checked by the
//! provider's own authentication and mapped onto deliveries — Twilio's status callbacks,
//! Amazon SES through SNS, SendGrid's event webhook, delivery status notifications from
//! an MTA (RFC 3464) — and the feedback log for operators.

mod dsn;
mod sendgrid;
mod ses;
mod twilio;

pub use dsn::dsn;
pub use sendgrid::{sendgrid, SendgridEvent};
pub use ses::ses;
pub use twilio::{twilio, TwilioStatus};

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

use super::{rfc3339, Time};
use crate::api::error::{ApiError, QueryParams};
use crate::domain::FieldError;
use crate::metrics::Metrics;
use crate::store::feedback::{Applied, Feedback, FeedbackDoc, FeedbackKind};
use crate::store::Store;
/// What herald answers a provider: what it did with the event.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackAnswer {
    /// `applied` (recorded on its delivery), `duplicate` (applied before), `unmatched`
    /// (no delivery has that message; kept for operators, and tried again for an hour in
    /// case the message's delivery is still being committed), `pending` (its delivery is
    /// still being sent: applied when its outcome is committed), `ignored` (an event that
    /// changes nothing, such as Twilio's `queued`) or `confirmed` (an SNS subscription).
    result: &'static str,
    delivery_id: Option<String>,
}

fn answer(applied: Applied) -> (StatusCode, Json<FeedbackAnswer>) {
    let (status, result, delivery_id) = match applied {
        Applied::Recorded { delivery_id, .. } => (StatusCode::OK, "applied", Some(delivery_id)),
        Applied::Duplicate => (StatusCode::OK, "duplicate", None),
        Applied::Unmatched => (StatusCode::ACCEPTED, "unmatched", None),
        Applied::Pending { delivery_id } => (StatusCode::ACCEPTED, "pending", Some(delivery_id)),
    };
    (
        status,
        Json(FeedbackAnswer {
            result,
            delivery_id,
        }),
    )
}

/// Applies one provider event and counts it.
async fn apply(store: &Store, metrics: &Metrics, fb: &Feedback) -> Result<Applied, ApiError> {
    let applied = store.apply_feedback(fb).await?;
    count(metrics, fb, &applied, false);
    Ok(applied)
}

/// Applies a provider's events in order; the answer says what the last one did
/// (`ignored` when there were none).
async fn apply_all(
    store: &Store,
    metrics: &Metrics,
    events: Vec<Feedback>,
) -> Result<(StatusCode, Json<FeedbackAnswer>), ApiError> {
    let mut last = None;
    for fb in &events {
        last = Some(apply(store, metrics, fb).await?);
    }
    Ok(last.map_or_else(ignored, answer))
}

/// Counts a feedback event by its result in `/metrics` (`late`: a waiting event applied
/// now, counted as received before), and the status it moved its delivery to.
fn count(metrics: &Metrics, fb: &Feedback, applied: &Applied, late: bool) {
    let result = match applied {
        Applied::Recorded {
            channel,
            provider,
            status,
            ..
        } => {
            if let Some(status) = status {
                metrics.delivery(channel, status.as_str(), provider.as_deref());
            }
            if late {
                "applied_late"
            } else {
                "applied"
            }
        }
        Applied::Duplicate => "duplicate",
        Applied::Unmatched => "unmatched",
        Applied::Pending { .. } => "pending",
    };
    metrics.feedback(&fb.provider, fb.kind.as_str(), result);
}

/// How often feedback waiting for its delivery is tried again.
const RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Applies the feedback that outran the commit of its delivery's outcome, every two
/// seconds until `cancel`.
pub async fn retry_waiting(
    store: Store,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
        match store.retry_feedback(100).await {
            Ok(done) => {
                for (fb, applied) in &done {
                    count(&metrics, fb, applied, true);
                }
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not retry feedback waiting for its delivery"
            ),
        }
    }
}

/// A Message-ID as herald records it: in angle brackets, however the provider quotes it.
fn message_id(id: &str) -> String {
    format!("<{}>", id.trim().trim_matches(['<', '>']))
}

/// An answer that applied nothing: `ignored` (a status that changes nothing, such as
/// Twilio's `queued`) or `confirmed` (an SNS subscription).
fn result(result: &'static str) -> (StatusCode, Json<FeedbackAnswer>) {
    (
        StatusCode::OK,
        Json(FeedbackAnswer {
            result,
            delivery_id: None,
        }),
    )
}

fn ignored() -> (StatusCode, Json<FeedbackAnswer>) {
    result("ignored")
}

// ---- The feedback log ------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FeedbackQuery {
    /// One delivery's feedback; absent: the feedback that matched no delivery.
    delivery_id: Option<String>,
    /// Most events to list, newest first (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// One feedback event as received.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackEvent {
    provider: String,
    event_id: String,
    kind: FeedbackKind,
    delivery_id: Option<String>,
    /// The message id or delivery id the event named.
    target: String,
    address: Option<String>,
    detail: Option<String>,
    received_at: Time,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackList {
    items: Vec<FeedbackEvent>,
}

impl From<FeedbackDoc> for FeedbackEvent {
    fn from(f: FeedbackDoc) -> Self {
        Self {
            provider: f.provider,
            event_id: f.event_id,
            kind: f.kind,
            delivery_id: f.delivery_id,
            target: f.target,
            address: f.address,
            detail: f.detail,
            received_at: rfc3339(f.received_at),
        }
    }
}

/// `GET /v1/feedback`: one delivery's feedback events, or the unmatched ones.
pub async fn list(
    State(store): State<Store>,
    QueryParams(q): QueryParams<FeedbackQuery>,
) -> Result<Json<FeedbackList>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation(vec![FieldError::new(
            "limit",
            "must be between 1 and 1000",
        )]));
    }
    let items = store.list_feedback(q.delivery_id.as_deref(), limit).await?;
    Ok(Json(FeedbackList {
        items: items.into_iter().map(FeedbackEvent::from).collect(),
    }))
}
