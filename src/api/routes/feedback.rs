//! `/v1/feedback/*`: what the providers report after `sent` — Twilio's status callbacks
//! (signed by Twilio), delivery status notifications from an MTA (RFC 3464, API key) —
//! mapped onto deliveries; and the feedback log for operators.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use mail_parser::MimeHeaders as _;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use utoipa::{IntoParams, ToSchema};

use super::{rfc3339, Time};
use crate::api::error::{read_body, ApiError, QueryParams};
use crate::config::{ProviderKind, Settings};
use crate::domain::FieldError;
use crate::store::feedback::{Applied, Feedback, FeedbackDoc, FeedbackKind, FeedbackTarget};
use crate::store::suppressions::SuppressionReason;
use crate::store::Store;

/// What herald answers a provider: what it did with the event.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackAnswer {
    /// `applied` (recorded on its delivery), `duplicate` (applied before), `unmatched`
    /// (no delivery has that message; kept for operators) or `ignored` (a status that
    /// changes nothing, such as Twilio's `queued`).
    result: &'static str,
    delivery_id: Option<String>,
}

fn answer(applied: Applied) -> (StatusCode, Json<FeedbackAnswer>) {
    let (status, result, delivery_id) = match applied {
        Applied::Recorded { delivery_id, .. } => (StatusCode::OK, "applied", Some(delivery_id)),
        Applied::Duplicate => (StatusCode::OK, "duplicate", None),
        Applied::Unmatched => (StatusCode::ACCEPTED, "unmatched", None),
    };
    (
        status,
        Json(FeedbackAnswer {
            result,
            delivery_id,
        }),
    )
}

fn ignored() -> (StatusCode, Json<FeedbackAnswer>) {
    (
        StatusCode::OK,
        Json(FeedbackAnswer {
            result: "ignored",
            delivery_id: None,
        }),
    )
}

// ---- Twilio ----------------------------------------------------------------------------

/// A Twilio message status callback (form fields; Twilio may add more).
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct TwilioStatus {
    #[serde(rename = "MessageSid")]
    #[schema(rename = "MessageSid")]
    message_sid: String,
    #[serde(rename = "MessageStatus")]
    #[schema(rename = "MessageStatus")]
    message_status: String,
    #[serde(rename = "AccountSid")]
    #[schema(rename = "AccountSid")]
    account_sid: String,
    #[serde(rename = "To")]
    #[schema(rename = "To")]
    to: Option<String>,
    #[serde(rename = "ErrorCode")]
    #[schema(rename = "ErrorCode")]
    error_code: Option<String>,
}

/// Twilio error codes that say the number itself cannot receive messages: suppressed.
/// 21211 invalid number, 21614 not a mobile number, 30005 unknown destination, 30006
/// landline or unreachable carrier.
const INVALID_NUMBER: [&str; 4] = ["21211", "21614", "30005", "30006"];

/// Twilio's request signature: base64 HMAC-SHA1, keyed with the account's auth token,
/// of the full URL followed by every POST parameter sorted by name, name then value.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<Sha1> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac =
        Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes any key length");
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    mac
}

/// `POST /v1/feedback/twilio`: a message status callback, checked against the signature
/// Twilio made with the auth token of the account it names.
pub async fn twilio(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    headers: HeaderMap,
    req: Request,
) -> Result<(StatusCode, Json<FeedbackAnswer>), ApiError> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/v1/feedback/twilio".to_owned(), |p| p.to_string());
    let body = read_body(req, settings.server.body_limit_bytes).await?;
    let Some(signature) = headers.get("x-twilio-signature") else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "signature_missing",
            "X-Twilio-Signature is required",
        ));
    };
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let account = field("AccountSid").unwrap_or_default();
    let token = settings.sms.providers.iter().find_map(|p| match &p.kind {
        ProviderKind::Twilio {
            account_sid,
            auth_token,
            ..
        } if *account_sid == account => Some(auth_token.expose().to_owned()),
        _ => None,
    });
    // The URL Twilio was given: the public one, not the one a proxy forwarded to.
    let url = format!("{}{path}", settings.server.public_url.trim_end_matches('/'));
    let valid = token.is_some_and(|t| {
        // `verify_slice` compares in constant time.
        STANDARD.decode(signature.as_bytes()).is_ok_and(|given| {
            twilio_signature(&t, &url, &params)
                .verify_slice(&given)
                .is_ok()
        })
    });
    if !valid {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "signature_invalid",
            "the X-Twilio-Signature does not match this request and a configured Twilio account",
        ));
    }
    let (Some(sid), Some(status)) = (field("MessageSid"), field("MessageStatus")) else {
        return Err(ApiError::validation(vec![FieldError::new(
            "MessageSid",
            "MessageSid and MessageStatus are required",
        )]));
    };
    let error_code = field("ErrorCode").filter(|c| !c.is_empty());
    let kind = match status.as_str() {
        "delivered" => FeedbackKind::Delivered,
        "undelivered" | "failed" => FeedbackKind::Undelivered,
        _ => return Ok(ignored()),
    };
    let suppress = error_code
        .as_deref()
        .filter(|c| INVALID_NUMBER.contains(c))
        .map(|_| SuppressionReason::InvalidNumber);
    let applied = store
        .apply_feedback(&Feedback {
            provider: "twilio".to_owned(),
            event_id: format!("{sid}:{status}"),
            kind,
            target: FeedbackTarget::MessageId(sid),
            address: field("To"),
            detail: error_code.map(|c| format!("twilio error {c}")),
            suppress,
        })
        .await?;
    Ok(answer(applied))
}

// ---- Delivery status notifications (RFC 3464) ------------------------------------------

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
fn verp_delivery(pattern: &str, address: &str) -> Option<String> {
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
        (None, Some(mid)) => FeedbackTarget::MessageId(mid.clone()),
        (None, None) => return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "dsn_unmatchable",
            "the DSN names neither a return path of email.return_path nor the original Message-ID",
        )),
    };
    let mut last = Applied::Unmatched;
    let mut any = false;
    for r in &dsn.recipients {
        let permanent = r.action == "failed" && r.status.starts_with('5');
        let kind = if permanent {
            FeedbackKind::Bounced
        } else if r.action == "failed" || r.action == "delayed" || r.status.starts_with('4') {
            FeedbackKind::Deferred
        } else if r.action == "delivered" {
            FeedbackKind::Delivered
        } else {
            continue;
        };
        any = true;
        // A DSN has no event id of its own per recipient: its Message-ID and the recipient.
        let event_id = format!(
            "{}:{}:{}",
            dsn.id.clone().unwrap_or_else(|| digest(&raw)),
            r.recipient.clone().unwrap_or_default(),
            r.status
        );
        last = store
            .apply_feedback(&Feedback {
                provider: "dsn".to_owned(),
                event_id,
                kind,
                target: target.clone(),
                address: r.recipient.clone(),
                detail: Some(match &r.diagnostic {
                    Some(d) => format!("{} {d}", r.status),
                    None => r.status.clone(),
                }),
                suppress: permanent.then_some(SuppressionReason::HardBounce),
            })
            .await?;
    }
    Ok(if any { answer(last) } else { ignored() })
}

/// A stable id for a message that has no Message-ID.
fn digest(raw: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(raw)[..16])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_one_in_twilios_documentation() {
        // Twilio's documented example: auth token 12345 and these parameters.
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let sig = twilio_signature(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            &params,
        );
        assert_eq!(
            STANDARD.encode(sig.finalize().into_bytes()),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
    }

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
