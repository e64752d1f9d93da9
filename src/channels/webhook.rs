//! Webhooks: the webhook channel (rendered JSON to a URL per event type) and the generic
//! JSON provider for SMS/push gateways; both signed with HMAC and guarded against SSRF.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::doc;
use serde_json::json;

use super::http::{bounded_body, check_target, client, signature};
use super::twilio::retry_after;
use super::{DeliveryError, Destination, OutboundMessage, Provider, Receipt};
use crate::config::Secret;
use crate::templates::Rendered;

pub struct Webhook {
    name: String,
    client: reqwest::Client,
    /// A gateway's URL; `None` for the webhook channel, whose URL is the destination.
    url: Option<String>,
    secret: Secret,
    headers: BTreeMap<String, String>,
    allow_internal: bool,
    max_response_bytes: usize,
}

impl Webhook {
    pub fn new(
        name: &str,
        url: Option<String>,
        secret: Secret,
        headers: BTreeMap<String, String>,
        timeout: Duration,
        allow_internal: bool,
        max_response_bytes: usize,
    ) -> anyhow::Result<Self> {
        if let Some(u) = &url {
            let parsed = reqwest::Url::parse(u).map_err(|e| anyhow::anyhow!("{name}.url: {e}"))?;
            check_target(&parsed, allow_internal)
                .map_err(|e| anyhow::anyhow!("{name}.url: {e}"))?;
        }
        Ok(Self {
            name: name.to_owned(),
            client: client(timeout, allow_internal)?,
            url,
            secret,
            headers,
            allow_internal,
            max_response_bytes,
        })
    }

    /// The JSON a gateway gets for an SMS or a push.
    fn gateway_body(message: &OutboundMessage) -> Option<Vec<u8>> {
        let body = match (&message.destination, &message.content) {
            (Destination::Phone(to), Rendered::Sms { text }) => {
                json!({"delivery_id": message.delivery_id, "channel": "sms", "to": [to], "text": text})
            }
            (Destination::PushTokens(tokens), Rendered::Push { title, body }) => {
                json!({"delivery_id": message.delivery_id, "channel": "push", "to": tokens, "title": title, "body": body})
            }
            _ => return None,
        };
        serde_json::to_vec(&body).ok()
    }
}

#[async_trait]
impl Provider for Webhook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        let (url, body) = match (&message.destination, &message.content, &self.url) {
            (Destination::Url(url), Rendered::Webhook { body }, None) => {
                (url.clone(), body.clone().into_bytes())
            }
            (_, _, Some(url)) => match Self::gateway_body(message) {
                Some(body) => (url.clone(), body),
                None => {
                    return Err(DeliveryError::permanent(
                        &self.name,
                        "this gateway takes SMS and push only",
                    ))
                }
            },
            _ => {
                return Err(DeliveryError::permanent(
                    &self.name,
                    "a webhook needs a URL and a JSON body",
                ))
            }
        };
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| DeliveryError::permanent(&self.name, format!("invalid URL: {e}")))?;
        check_target(&parsed, self.allow_internal)
            .map_err(|e| DeliveryError::permanent(&self.name, format!("target refused: {e}")))?;
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = self
            .client
            .post(parsed)
            .header("content-type", "application/json")
            .header("x-herald-delivery-id", &message.delivery_id)
            .header("x-herald-timestamp", timestamp.to_string());
        if !self.secret.expose().is_empty() {
            request = request.header(
                "x-herald-signature",
                signature(self.secret.expose(), timestamp, &body),
            );
        }
        for (k, v) in &self.headers {
            request = request.header(k, v);
        }
        let response =
            request.body(body).send().await.map_err(|e| {
                DeliveryError::transient(&self.name, format!("request failed: {e}"))
            })?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let answer = bounded_body(response, self.max_response_bytes).await;
        let text: String = String::from_utf8_lossy(&answer).chars().take(200).collect();
        if status.is_success() {
            return Ok(Receipt {
                provider: self.name.clone(),
                invalid_tokens: Vec::new(),
                response: doc! {"http_status": i32::from(status.as_u16()), "body": text},
            });
        }
        let message = format!("HTTP {}: {text}", status.as_u16());
        if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
            Err(DeliveryError::Transient {
                provider: self.name.clone(),
                message,
                retry_after: wait,
                throttled: status.as_u16() == 429,
            })
        } else if status.is_redirection() {
            Err(DeliveryError::permanent(
                &self.name,
                format!("{message} (redirects are not followed)"),
            ))
        } else {
            Err(DeliveryError::permanent(&self.name, message))
        }
    }
}
