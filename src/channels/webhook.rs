//! Webhooks: the webhook channel (rendered JSON to a URL per event type) and the generic
//! JSON provider for SMS/push gateways; both signed with HMAC and guarded against SSRF.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::doc;
use serde_json::json;

use super::http::retry_after;
use super::http::{bounded_body, check_target, client, signature};
use super::{DeliveryError, Destination, OutboundMessage, Provider, Receipt};
use crate::config::{Secret, WebhookSettings};
use crate::domain::standard_webhooks::SigningKey;
use crate::templates::Rendered;

/// Where a webhook provider sends, and how it signs and shapes the body.
pub struct Target {
    /// A gateway's URL; `None` for the webhook channel, whose URL is the destination.
    pub url: Option<String>,
    pub secret: Secret,
    pub headers: BTreeMap<String, String>,
    pub body_template: Option<String>,
}

pub struct Webhook {
    name: String,
    client: reqwest::Client,
    /// A gateway's URL; `None` for the webhook channel, whose URL is the destination.
    url: Option<String>,
    secret: Secret,
    /// The secret as a Standard Webhooks key; `None` when no secret is set.
    key: Option<SigningKey>,
    headers: BTreeMap<String, String>,
    allow_internal: bool,
    max_response_bytes: usize,
    /// A gateway's body, rendered from the message fields (strict, not escaped).
    body_template: Option<handlebars::Handlebars<'static>>,
}

impl Webhook {
    pub fn new(
        name: &str,
        target: Target,
        timeout: Duration,
        rules: &WebhookSettings,
    ) -> anyhow::Result<Self> {
        let Target {
            url,
            secret,
            headers,
            body_template,
        } = target;
        let allow_internal = rules.allow_internal_targets;
        let body_template = match body_template {
            None => None,
            Some(source) => {
                let mut hb = handlebars::Handlebars::new();
                hb.set_strict_mode(true);
                hb.register_escape_fn(handlebars::no_escape);
                hb.register_template_string("body", source)
                    .map_err(|e| anyhow::anyhow!("{name}.body_template: {e}"))?;
                Some(hb)
            }
        };
        if let Some(u) = &url {
            let parsed = reqwest::Url::parse(u).map_err(|e| anyhow::anyhow!("{name}.url: {e}"))?;
            check_target(&parsed, allow_internal)
                .map_err(|e| anyhow::anyhow!("{name}.url: {e}"))?;
        }
        let key = match secret.expose() {
            "" => None,
            text => {
                Some(SigningKey::parse(text).map_err(|e| anyhow::anyhow!("{name}.secret: {e}"))?)
            }
        };
        Ok(Self {
            name: name.to_owned(),
            client: client(timeout, allow_internal)?,
            url,
            key,
            secret,
            headers,
            allow_internal,
            max_response_bytes: rules.max_response_bytes,
            body_template,
        })
    }

    /// The JSON a gateway gets for an SMS or a push: the fields below, or what the
    /// provider's `body_template` makes of them (it must render JSON).
    fn gateway_body(&self, message: &OutboundMessage) -> Result<Vec<u8>, DeliveryError> {
        let fields = match (&message.destination, &message.content) {
            (Destination::Phone(to), Rendered::Sms { text }) => {
                json!({"delivery_id": message.delivery_id, "channel": "sms", "to": [to], "text": text})
            }
            (Destination::PushTokens(tokens), Rendered::Push { title, body, data }) => {
                json!({"delivery_id": message.delivery_id, "channel": "push", "to": tokens, "title": title, "body": body, "data": data})
            }
            _ => {
                return Err(DeliveryError::permanent(
                    &self.name,
                    "this gateway takes SMS and push only",
                ))
            }
        };
        let Some(template) = &self.body_template else {
            return Ok(fields.to_string().into_bytes());
        };
        let out = template
            .render("body", &fields)
            .map_err(|e| DeliveryError::permanent(&self.name, format!("body_template: {e}")))?;
        serde_json::from_str::<serde_json::Value>(&out).map_err(|e| {
            DeliveryError::permanent(
                &self.name,
                format!("body_template did not render JSON: {e}"),
            )
        })?;
        Ok(out.into_bytes())
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
            (_, _, Some(url)) => match self.gateway_body(message).map(Some)? {
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
            .header("webhook-id", &message.delivery_id)
            .header("webhook-timestamp", timestamp.to_string())
            // The earlier scheme, kept so receivers built on it go on verifying.
            .header("x-herald-delivery-id", &message.delivery_id)
            .header("x-herald-timestamp", timestamp.to_string());
        if let Some(key) = &self.key {
            request = request
                .header(
                    "webhook-signature",
                    key.sign(&message.delivery_id, timestamp, &body),
                )
                .header(
                    "x-herald-signature",
                    signature(self.secret.expose(), timestamp, &body),
                );
        }
        for (k, v) in &self.headers {
            request = request.header(k, v);
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError::from_request(&self.name, &e))?;
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
