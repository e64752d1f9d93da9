//! Amazon SES notifications through SNS: a signed SNS message from an allowed topic,
//! whose `Message` is SES's bounce, complaint or delivery notification.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::dsn::verp_delivery;
use super::{apply_all, ignored, message_id, result, FeedbackAnswer};
use crate::api::error::{read_body, ApiError};
use crate::channels::sns::{SnsError, SnsMessage, SnsType, SnsVerifier};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::store::feedback::{Feedback, FeedbackKind, FeedbackTarget};
use crate::store::suppressions::SuppressionReason;
use crate::store::Store;

/// SES's notification (`notificationType`) or event (`eventType`, through a
/// configuration set): the parts herald reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesNotification {
    notification_type: Option<String>,
    event_type: Option<String>,
    mail: SesMail,
    bounce: Option<SesBounce>,
    complaint: Option<SesComplaint>,
    delivery: Option<SesDelivery>,
    delivery_delay: Option<SesDelay>,
    reject: Option<SesReject>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesMail {
    /// SES's own id for the message.
    message_id: String,
    /// The envelope sender: herald's VERP return path, when it sets one.
    #[serde(default)]
    source: String,
    #[serde(default)]
    common_headers: Option<SesCommonHeaders>,
    #[serde(default)]
    headers: Vec<SesHeader>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesCommonHeaders {
    message_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SesHeader {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesBounce {
    /// `Permanent`, `Transient` or `Undetermined`.
    bounce_type: String,
    #[serde(default)]
    bounce_sub_type: String,
    bounced_recipients: Vec<SesRecipient>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesRecipient {
    email_address: String,
    status: Option<String>,
    diagnostic_code: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesComplaint {
    complained_recipients: Vec<SesRecipient>,
    complaint_feedback_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesDelivery {
    recipients: Vec<String>,
    smtp_response: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesDelay {
    delay_type: Option<String>,
    delayed_recipients: Vec<SesRecipient>,
}

#[derive(Debug, Deserialize)]
struct SesReject {
    reason: Option<String>,
}

/// One recipient's event: what happened, to whom, why, and the suppression it calls for.
struct Mapped {
    kind: FeedbackKind,
    address: Option<String>,
    detail: Option<String>,
    suppress: Option<SuppressionReason>,
}

/// SES's notification, one event per recipient it names; empty for types herald does not
/// act on (sends, opens, clicks…).
fn map(n: &SesNotification) -> Vec<Mapped> {
    let kind = n
        .notification_type
        .as_deref()
        .or(n.event_type.as_deref())
        .unwrap_or_default();
    let each =
        |recipients: &[SesRecipient], kind, suppress, why: &dyn Fn(&SesRecipient) -> String| {
            recipients
                .iter()
                .map(|r| Mapped {
                    kind,
                    address: Some(r.email_address.clone()),
                    detail: Some(why(r)),
                    suppress,
                })
                .collect()
        };
    match (kind, n) {
        (
            "Bounce",
            SesNotification {
                bounce: Some(b), ..
            },
        ) => {
            let permanent = b.bounce_type == "Permanent";
            let why = |r: &SesRecipient| {
                let mut d = format!("{} {}", b.bounce_type, b.bounce_sub_type);
                for part in [&r.status, &r.diagnostic_code].into_iter().flatten() {
                    d.push(' ');
                    d.push_str(part);
                }
                d
            };
            if permanent {
                each(
                    &b.bounced_recipients,
                    FeedbackKind::Bounced,
                    Some(SuppressionReason::HardBounce),
                    &why,
                )
            } else {
                each(&b.bounced_recipients, FeedbackKind::Deferred, None, &why)
            }
        }
        (
            "Complaint",
            SesNotification {
                complaint: Some(c), ..
            },
        ) => {
            let why = |_: &SesRecipient| {
                c.complaint_feedback_type
                    .clone()
                    .unwrap_or_else(|| "complaint".to_owned())
            };
            each(
                &c.complained_recipients,
                FeedbackKind::Complained,
                Some(SuppressionReason::Complaint),
                &why,
            )
        }
        (
            "Delivery",
            SesNotification {
                delivery: Some(d), ..
            },
        ) => d
            .recipients
            .iter()
            .map(|r| Mapped {
                kind: FeedbackKind::Delivered,
                address: Some(r.clone()),
                detail: d.smtp_response.clone(),
                suppress: None,
            })
            .collect(),
        (
            "DeliveryDelay",
            SesNotification {
                delivery_delay: Some(d),
                ..
            },
        ) => {
            let why = |_: &SesRecipient| d.delay_type.clone().unwrap_or_else(|| "delayed".into());
            each(&d.delayed_recipients, FeedbackKind::Deferred, None, &why)
        }
        ("Reject", SesNotification { reject, .. }) => vec![Mapped {
            kind: FeedbackKind::Undelivered,
            address: None,
            detail: Some(format!(
                "rejected by SES: {}",
                reject
                    .as_ref()
                    .and_then(|r| r.reason.as_deref())
                    .unwrap_or("no reason given")
            )),
            suppress: None,
        }],
        _ => Vec::new(),
    }
}

/// The message a notification names: herald's VERP return path if it is one, else the
/// original Message-ID (herald's own, which SES reports), else SES's message id.
fn target(settings: &Settings, mail: &SesMail) -> FeedbackTarget {
    if let Some(id) = settings
        .email
        .return_path
        .as_deref()
        .and_then(|pattern| verp_delivery(pattern, &mail.source))
    {
        return FeedbackTarget::Delivery(id);
    }
    let header = mail
        .common_headers
        .as_ref()
        .and_then(|h| h.message_id.clone())
        .or_else(|| {
            mail.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("message-id"))
                .map(|h| h.value.clone())
        });
    match header {
        Some(h) => FeedbackTarget::MessageId(message_id(&h)),
        None => FeedbackTarget::MessageId(mail.message_id.clone()),
    }
}

fn refused(e: &SnsError) -> ApiError {
    match e {
        SnsError::Unreachable(_) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "certificate_unreachable",
            e.to_string(),
        ),
        SnsError::HostNotAllowed(_) => {
            ApiError::new(StatusCode::FORBIDDEN, "host_not_allowed", e.to_string())
        }
        SnsError::BadCertificate(_) | SnsError::BadSignature => {
            ApiError::new(StatusCode::FORBIDDEN, "signature_invalid", e.to_string())
        }
    }
}

/// `POST /v1/feedback/ses`: an SNS message from an allowed topic, signed by SNS. A
/// subscription is confirmed; a notification's bounces, complaints and deliveries are
/// applied one recipient at a time.
pub async fn ses(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    State(metrics): State<Arc<Metrics>>,
    State(sns): State<Arc<SnsVerifier>>,
    req: Request,
) -> Result<(StatusCode, Json<FeedbackAnswer>), ApiError> {
    let body = read_body(req, settings.server.body_limit_bytes).await?;
    let m: SnsMessage = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_an_sns_message",
            format!("the body is not an SNS message: {e}"),
        )
    })?;
    let ses = &settings.feedback.ses;
    if !ses.topic_arns.contains(&m.topic_arn) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "topic_not_allowed",
            "the message's TopicArn is not in feedback.ses.topic_arns",
        ));
    }
    sns.verify(&ses.cert_hosts, &m)
        .await
        .map_err(|e| refused(&e))?;
    match m.kind {
        SnsType::SubscriptionConfirmation => {
            let url = m.subscribe_url.as_deref().unwrap_or_default();
            sns.confirm(&ses.cert_hosts, url)
                .await
                .map_err(|e| refused(&e))?;
            tracing::info!(topic = %m.topic_arn, "SNS subscription confirmed");
            return Ok(result("confirmed"));
        }
        SnsType::UnsubscribeConfirmation => return Ok(ignored()),
        SnsType::Notification => {}
    }
    let notification: SesNotification = serde_json::from_str(&m.message).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_an_ses_notification",
            format!("the SNS message is not an SES notification: {e}"),
        )
    })?;
    let target = target(&settings, &notification.mail);
    // SNS keeps a message's id on every retry: with the recipient, each event's id.
    let events = map(&notification).into_iter().map(|event| Feedback {
        provider: "ses".to_owned(),
        event_id: format!(
            "{}:{}",
            m.message_id,
            event.address.as_deref().unwrap_or_default()
        ),
        kind: event.kind,
        target: target.clone(),
        address: event.address,
        detail: event.detail,
        suppress: event.suppress,
    });
    apply_all(&store, &metrics, events.collect()).await
}
