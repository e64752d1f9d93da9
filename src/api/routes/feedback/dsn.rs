//! Delivery status notifications (RFC 3464) as an MTA's bounce pipe forwards them.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Json;
use mail_parser::MimeHeaders as _;

use super::{apply_all, message_id, FeedbackAnswer};
use crate::api::error::{read_body, ApiError};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::store::feedback::{Feedback, FeedbackKind, FeedbackTarget};
use crate::store::suppressions::SuppressionReason;
use crate::store::Store;

/// One recipient's block of a DSN.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DsnRecipient {
    pub recipient: Option<String>,
    pub action: String,
    pub status: String,
    pub diagnostic: Option<String>,
}

/// The parts of a DSN herald uses: its own id, who it was sent to (the return path), the
/// original message's id and each recipient's block.
#[derive(Debug, Default)]
pub struct Dsn {
    pub id: Option<String>,
    pub sent_to: Vec<String>,
    pub original_message_id: Option<String>,
    pub recipients: Vec<DsnRecipient>,
}

/// Parses a whole DSN message; `None` when it is not one.
pub fn parse_dsn(raw: &[u8]) -> Option<Dsn> {
    let message = mail_parser::MessageParser::default().parse(raw)?;
    let mut dsn = Dsn {
        id: message.message_id().map(|id| format!("<{id}>")),
        ..Dsn::default()
    };
    for name in ["To", "Delivered-To", "X-Original-To"] {
        for value in message.header_values(name) {
            if let Some(list) = value.as_address() {
                dsn.sent_to
                    .extend(list.iter().filter_map(|a| a.address().map(str::to_owned)));
            } else if let Some(text) = value.as_text() {
                dsn.sent_to
                    .push(text.trim().trim_matches(['<', '>']).to_owned());
            }
        }
    }
    let mut status_fields = None;
    for part in message.parts.iter() {
        let kind = part
            .content_type()
            .map(|c| {
                format!("{}/{}", c.ctype(), c.subtype().unwrap_or_default()).to_ascii_lowercase()
            })
            .unwrap_or_default();
        match kind.as_str() {
            "message/delivery-status" => {
                status_fields = Some(String::from_utf8_lossy(part.contents()).into_owned());
            }
            "message/rfc822" | "text/rfc822-headers" | "message/rfc822-headers" => {
                let text = String::from_utf8_lossy(part.contents()).into_owned();
                if let Some(id) = header_in(&text, "message-id") {
                    dsn.original_message_id = Some(id);
                }
            }
            _ => {}
        }
    }
    // A nested message is its own part in mail-parser: its Message-ID is found there.
    if dsn.original_message_id.is_none() {
        dsn.original_message_id = message
            .attachments()
            .filter_map(|a| a.message())
            .find_map(|m| m.message_id().map(|id| format!("<{id}>")));
    }
    let fields = status_fields?;
    // The per-message block first, then one block per recipient, blank-line separated.
    for block in fields.replace("\r\n", "\n").split("\n\n").skip(1) {
        let action = header_in(block, "action")
            .unwrap_or_default()
            .to_ascii_lowercase();
        if action.is_empty() {
            continue;
        }
        let recipient = header_in(block, "final-recipient")
            .or_else(|| header_in(block, "original-recipient"))
            .map(|r| {
                r.split_once(';')
                    .map_or(r.clone(), |(_, a)| a.trim().to_owned())
            });
        dsn.recipients.push(DsnRecipient {
            recipient,
            action,
            status: header_in(block, "status").unwrap_or_default(),
            diagnostic: header_in(block, "diagnostic-code"),
        });
    }
    Some(dsn)
}

/// The value of header `name` (case-insensitive, unfolded) in a block of header lines.
fn header_in(block: &str, name: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in block.lines() {
        if let Some(v) = value.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case(name) {
                value = Some(v.trim().to_owned());
            }
        }
    }
    value.filter(|v| !v.is_empty())
}

/// The delivery a VERP return path names, given the configured pattern.
pub(super) fn verp_delivery(pattern: &str, address: &str) -> Option<String> {
    let (prefix, suffix) = pattern.split_once("{delivery_id}")?;
    let a = address.to_ascii_lowercase();
    let id = a
        .strip_prefix(&prefix.to_ascii_lowercase())?
        .strip_suffix(&suffix.to_ascii_lowercase())?;
    (!id.is_empty()).then(|| id.to_owned())
}

/// `POST /v1/feedback/dsn`: a delivery status notification, whole, as an MTA's bounce
/// pipe forwards it. Matched by the VERP return path it was sent to, else by the original
/// message's Message-ID; a permanent failure (`failed`, 5.x.x) bounces the delivery and
/// suppresses the address, a temporary one (`delayed`, 4.x.x) is recorded.
pub async fn dsn(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    State(metrics): State<Arc<Metrics>>,
    req: Request,
) -> Result<(StatusCode, Json<FeedbackAnswer>), ApiError> {
    let raw = read_body(req, settings.server.body_limit_bytes).await?;
    let Some(dsn) = parse_dsn(&raw) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_a_dsn",
            "the body is not a delivery status notification (RFC 3464: a multipart/report with a message/delivery-status part)",
        ));
    };
    let verp = settings
        .email
        .return_path
        .as_deref()
        .and_then(|pattern| dsn.sent_to.iter().find_map(|a| verp_delivery(pattern, a)));
    let target = match (verp, &dsn.original_message_id) {
        (Some(id), _) => FeedbackTarget::Delivery(id),
        (None, Some(mid)) => FeedbackTarget::MessageId(message_id(mid)),
        (None, None) => return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "dsn_unmatchable",
            "the DSN names neither a return path of email.return_path nor the original Message-ID",
        )),
    };
    // A DSN has no event id of its own per recipient: its Message-ID and the recipient.
    let dsn_id = dsn.id.clone().unwrap_or_else(|| digest(&raw));
    let events = dsn.recipients.iter().filter_map(|r| {
        let permanent = r.action == "failed" && r.status.starts_with('5');
        let kind = if permanent {
            FeedbackKind::Bounced
        } else if r.action == "failed" || r.action == "delayed" || r.status.starts_with('4') {
            FeedbackKind::Deferred
        } else if r.action == "delivered" {
            FeedbackKind::Delivered
        } else {
            return None;
        };
        Some(Feedback {
            provider: "dsn".to_owned(),
            event_id: format!(
                "{dsn_id}:{}:{}",
                r.recipient.clone().unwrap_or_default(),
                r.status
            ),
            kind,
            target: target.clone(),
            address: r.recipient.clone(),
            detail: Some(match &r.diagnostic {
                Some(d) => format!("{} {d}", r.status),
                None => r.status.clone(),
            }),
            suppress: permanent.then_some(SuppressionReason::HardBounce),
        })
    });
    apply_all(&store, &metrics, events.collect()).await
}

/// A stable id for a message that has no Message-ID.
fn digest(raw: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(raw)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verp_address_names_its_delivery() {
        let p = "bounces+{delivery_id}@example.com";
        assert_eq!(
            verp_delivery(p, "Bounces+01a2-x@Example.com").as_deref(),
            Some("01a2-x")
        );
        assert_eq!(verp_delivery(p, "someone@example.com"), None);
        assert_eq!(verp_delivery(p, "bounces+@example.com"), None);
    }
}
