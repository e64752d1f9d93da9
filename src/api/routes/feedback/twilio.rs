//! Twilio's message status callbacks, signed with the account's auth token.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha1::Sha1;
use utoipa::ToSchema;

use super::{answer, apply, ignored, FeedbackAnswer};
use crate::api::error::{read_body, ApiError};
use crate::config::{ProviderKind, Settings};
use crate::domain::FieldError;
use crate::metrics::Metrics;
use crate::store::feedback::{Feedback, FeedbackKind, FeedbackTarget};
use crate::store::suppressions::SuppressionReason;
use crate::store::Store;

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
    State(metrics): State<Arc<Metrics>>,
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
    let applied = apply(
        &store,
        &metrics,
        &Feedback {
            provider: "twilio".to_owned(),
            event_id: format!("{sid}:{status}"),
            kind,
            target: FeedbackTarget::MessageId(sid),
            address: field("To"),
            detail: error_code.map(|c| format!("twilio error {c}")),
            suppress,
        },
    )
    .await?;
    Ok(answer(applied))
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
}
