//! SMS through Twilio's Messages API (form POST, basic auth, JSON answer).

use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::doc;
use serde::Deserialize;

use super::http::retry_after;
use super::{DeliveryError, Destination, OutboundMessage, Provider, Receipt};
use crate::config::Secret;
use crate::templates::Rendered;

/// Twilio error codes that are about the recipient: sending again will not help.
/// 21211 invalid To, 21214 To not reachable, 21408 region not enabled, 21610 unsubscribed
/// recipient, 21612 cannot route, 21614 not a mobile number.
const PERMANENT_CODES: [i64; 6] = [21211, 21214, 21408, 21610, 21612, 21614];

pub struct Twilio {
    name: String,
    client: reqwest::Client,
    url: String,
    account_sid: String,
    auth_token: Secret,
    from: String,
    /// Where Twilio reports the message's delivery (`StatusCallback`).
    status_callback: String,
}

#[derive(Deserialize)]
struct Created {
    sid: String,
    status: Option<String>,
}

#[derive(Deserialize)]
struct Failure {
    code: Option<i64>,
    message: Option<String>,
}

impl Twilio {
    pub fn new(
        name: &str,
        base_url: &str,
        account_sid: &str,
        auth_token: Secret,
        from: &str,
        status_callback: String,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.to_owned(),
            client: super::http::client(timeout, true)?,
            url: format!(
                "{}/2010-04-01/Accounts/{account_sid}/Messages.json",
                base_url.trim_end_matches('/')
            ),
            account_sid: account_sid.to_owned(),
            auth_token,
            from: from.to_owned(),
            status_callback,
        })
    }
}

#[async_trait]
impl Provider for Twilio {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        let (Destination::Phone(to), Rendered::Sms { text }) =
            (&message.destination, &message.content)
        else {
            return Err(DeliveryError::permanent(
                &self.name,
                "twilio sends SMS only",
            ));
        };
        let response = self
            .client
            .post(&self.url)
            .basic_auth(&self.account_sid, Some(self.auth_token.expose()))
            .form(&[
                ("To", to.as_str()),
                ("From", self.from.as_str()),
                ("Body", text.as_str()),
                ("StatusCallback", self.status_callback.as_str()),
            ])
            .send()
            .await
            .map_err(|e| DeliveryError::from_request(&self.name, &e))?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            let created: Created = serde_json::from_slice(&body).map_err(|e| {
                DeliveryError::transient(&self.name, format!("unreadable answer: {e}"))
            })?;
            return Ok(Receipt {
                provider: self.name.clone(),
                invalid_tokens: Vec::new(),
                response: doc! {"http_status": i32::from(status.as_u16()),
                "message_id": &created.sid, "sid": created.sid, "status": created.status},
            });
        }
        let failure: Option<Failure> = serde_json::from_slice(&body).ok();
        let code = failure.as_ref().and_then(|f| f.code);
        let text = format!(
            "HTTP {}{}: {}",
            status.as_u16(),
            code.map(|c| format!(" code {c}")).unwrap_or_default(),
            failure
                .and_then(|f| f.message)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect())
        );
        let permanent = code.is_some_and(|c| PERMANENT_CODES.contains(&c))
            || (status.is_client_error() && !matches!(status.as_u16(), 401 | 403 | 408 | 429));
        if permanent {
            Err(DeliveryError::permanent(&self.name, text))
        } else {
            Err(DeliveryError::Transient {
                provider: self.name.clone(),
                message: text,
                retry_after: wait,
                throttled: status.as_u16() == 429,
            })
        }
    }
}
