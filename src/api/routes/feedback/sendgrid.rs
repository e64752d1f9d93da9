//! SendGrid's Event Webhook: a batch of events, signed with ECDSA (P-256) over the
//! timestamp header and the body.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;
use utoipa::ToSchema;

use super::{apply_all, message_id, FeedbackAnswer};
use crate::api::error::{read_body, ApiError};
use crate::config::Settings;
use crate::domain::signatures::{p256_public_key, p256_verifies};
use crate::metrics::Metrics;
use crate::store::feedback::{Feedback, FeedbackKind, FeedbackTarget};
use crate::store::suppressions::SuppressionReason;
use crate::store::Store;

const SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
const TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";

/// One event of SendGrid's batch (SendGrid sends more fields; these are the ones read).
#[derive(Debug, Deserialize, ToSchema)]
pub struct SendgridEvent {
    /// `delivered`, `bounce`, `dropped`, `deferred`, `spamreport`; others (`processed`,
    /// `open`, `click`, `unsubscribe`…) change nothing.
    event: String,
    /// Unique per event: a replay carries the same one.
    #[schema(min_length = 1)]
    sg_event_id: String,
    email: Option<String>,
    /// The original message's Message-ID (herald's own).
    #[serde(rename = "smtp-id")]
    #[schema(rename = "smtp-id")]
    smtp_id: Option<String>,
    sg_message_id: Option<String>,
    /// For `bounce`: `bounce` (hard) or `blocked` (soft).
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    kind: Option<String>,
    reason: Option<String>,
    status: Option<String>,
    response: Option<String>,
}

impl SendgridEvent {
    /// What the event does, and the suppression it calls for; `None`: nothing.
    fn mapped(&self) -> Option<(FeedbackKind, Option<SuppressionReason>)> {
        Some(match self.event.as_str() {
            "delivered" => (FeedbackKind::Delivered, None),
            "bounce" if self.kind.as_deref() == Some("blocked") => (FeedbackKind::Deferred, None),
            "bounce" => (FeedbackKind::Bounced, Some(SuppressionReason::HardBounce)),
            "dropped" => (FeedbackKind::Undelivered, None),
            "deferred" => (FeedbackKind::Deferred, None),
            "spamreport" => (FeedbackKind::Complained, Some(SuppressionReason::Complaint)),
            _ => return None,
        })
    }

    /// The message it names: herald's Message-ID, else SendGrid's message id (the part
    /// before the first dot is the id SendGrid answered the send with).
    fn target(&self) -> Option<FeedbackTarget> {
        if let Some(id) = self.smtp_id.as_deref().filter(|s| !s.trim().is_empty()) {
            return Some(FeedbackTarget::MessageId(message_id(id)));
        }
        let sg = self.sg_message_id.as_deref()?;
        let id = sg.split('.').next().unwrap_or(sg);
        (!id.is_empty()).then(|| FeedbackTarget::MessageId(id.to_owned()))
    }

    fn detail(&self) -> Option<String> {
        let parts: Vec<&str> = [&self.status, &self.reason, &self.response]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}

/// `POST /v1/feedback/sendgrid`: a batch of SendGrid events, checked against the
/// configured verification key; each event applied once.
pub async fn sendgrid(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    State(metrics): State<Arc<Metrics>>,
    headers: HeaderMap,
    req: Request,
) -> Result<(StatusCode, Json<FeedbackAnswer>), ApiError> {
    let body = read_body(req, settings.server.body_limit_bytes).await?;
    let Some(key) = settings.feedback.sendgrid.public_key.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "provider_not_configured",
            "SendGrid's events are refused until feedback.sendgrid.public_key is set",
        ));
    };
    let (Some(signature), Some(timestamp)) = (headers.get(SIGNATURE), headers.get(TIMESTAMP))
    else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "signature_missing",
            "X-Twilio-Email-Event-Webhook-Signature and -Timestamp are required",
        ));
    };
    // The key was checked when the configuration was read.
    let valid = p256_public_key(key).is_ok_and(|point| {
        let mut signed = timestamp.as_bytes().to_vec();
        signed.extend_from_slice(&body);
        STANDARD
            .decode(signature.as_bytes())
            .is_ok_and(|sig| p256_verifies(&point, &signed, &sig))
    });
    if !valid {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "signature_invalid",
            "the signature does not match this body, its timestamp and feedback.sendgrid.public_key",
        ));
    }
    let events: Vec<SendgridEvent> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_sendgrid_events",
            format!("the body is not a SendGrid event batch: {e}"),
        )
    })?;
    if events.iter().any(|e| e.sg_event_id.is_empty()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_sendgrid_events",
            "every event needs its sg_event_id",
        ));
    }
    let applied = events.iter().filter_map(|e| {
        let ((kind, suppress), target) = (e.mapped()?, e.target()?);
        Some(Feedback {
            provider: "sendgrid".to_owned(),
            event_id: e.sg_event_id.clone(),
            kind,
            target,
            address: e.email.clone(),
            detail: e.detail(),
            suppress,
        })
    });
    apply_all(&store, &metrics, applied.collect()).await
}
