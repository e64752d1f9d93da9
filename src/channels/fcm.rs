//! Push through Firebase Cloud Messaging HTTP v1: a service-account JWT exchanged for an
//! OAuth2 access token (cached until it expires), one request per device token.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mongodb::bson::doc;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::http::retry_after;
use super::{DeliveryError, Destination, OutboundMessage, Provider, Receipt};
use crate::templates::Rendered;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    token_uri: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

pub struct Fcm {
    name: String,
    client: reqwest::Client,
    send_url: String,
    token_uri: String,
    client_email: String,
    key: EncodingKey,
    token: Mutex<Option<(String, Instant)>>,
}

/// One device token's answer.
enum TokenResult {
    Sent(String),
    /// UNREGISTERED or INVALID_ARGUMENT: the token is dead.
    Invalid(String),
    /// Not sent: transient, or of unknown outcome.
    Failed(DeliveryError),
}

impl Fcm {
    /// `token_uri` overrides the service account's (tests point it at a local server).
    pub fn new(
        name: &str,
        service_account_file: &Path,
        base_url: &str,
        token_uri: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let raw = std::fs::read(service_account_file)
            .with_context(|| format!("{name}: reading {}", service_account_file.display()))?;
        let sa: ServiceAccount = serde_json::from_slice(&raw).with_context(|| {
            format!(
                "{name}: {} is not a service-account key",
                service_account_file.display()
            )
        })?;
        let key = EncodingKey::from_rsa_pem(sa.private_key.as_bytes())
            .with_context(|| format!("{name}: the service account's private_key"))?;
        Ok(Self {
            name: name.to_owned(),
            client: super::http::client(timeout, true)?,
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                base_url.trim_end_matches('/'),
                sa.project_id
            ),
            token_uri: token_uri.map_or(sa.token_uri, str::to_owned),
            client_email: sa.client_email,
            key,
            token: Mutex::new(None),
        })
    }

    /// A cached access token, or a new one from a freshly signed JWT.
    async fn access_token(&self, renew: bool) -> Result<String, DeliveryError> {
        let mut cached = self.token.lock().await;
        if let (false, Some((token, until))) = (renew, cached.as_ref()) {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let now = chrono::Utc::now().timestamp();
        let claims = json!({"iss": self.client_email, "scope": SCOPE, "aud": self.token_uri,
                            "iat": now, "exp": now + 3600});
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| {
                DeliveryError::transient(&self.name, format!("signing the token request: {e}"))
            })?;
        let answer = self
            .client
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", jwt.as_str()),
            ])
            .send()
            .await
            .map_err(|e| {
                DeliveryError::transient(&self.name, format!("token request failed: {e}"))
            })?;
        if !answer.status().is_success() {
            return Err(DeliveryError::transient(
                &self.name,
                format!("token request answered HTTP {}", answer.status().as_u16()),
            ));
        }
        let t: TokenAnswer = answer.json().await.map_err(|e| {
            DeliveryError::transient(&self.name, format!("unreadable token answer: {e}"))
        })?;
        // Renew a minute early so no request carries an expiring token.
        let until = Instant::now() + Duration::from_secs(t.expires_in.saturating_sub(60));
        *cached = Some((t.access_token.clone(), until));
        Ok(t.access_token)
    }

    async fn send_one(
        &self,
        device: &str,
        title: &str,
        body: &str,
        data: &BTreeMap<String, String>,
        delivery_id: &str,
    ) -> TokenResult {
        let mut data = data.clone();
        data.insert("delivery_id".to_owned(), delivery_id.to_owned());
        let message = json!({"message": {
            "token": device,
            "notification": {"title": title, "body": body},
            "data": data,
        }});
        for renew in [false, true] {
            let token = match self.access_token(renew).await {
                Ok(t) => t,
                Err(e) => return TokenResult::Failed(e),
            };
            let answer = match self
                .client
                .post(&self.send_url)
                .bearer_auth(token)
                .json(&message)
                .send()
                .await
            {
                Ok(a) => a,
                Err(e) => return TokenResult::Failed(DeliveryError::from_request(&self.name, &e)),
            };
            let status = answer.status().as_u16();
            let wait = retry_after(answer.headers());
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            if status == 200 {
                return TokenResult::Sent(body["name"].as_str().unwrap_or_default().to_owned());
            }
            let code = body["error"]["details"]
                .as_array()
                .and_then(|d| d.iter().find_map(|x| x["errorCode"].as_str()))
                .or_else(|| body["error"]["status"].as_str())
                .unwrap_or_default()
                .to_owned();
            match (status, code.as_str()) {
                (401, _) if !renew => continue,
                (_, "UNREGISTERED" | "INVALID_ARGUMENT") | (404, _) => {
                    return TokenResult::Invalid(code)
                }
                _ => {
                    return TokenResult::Failed(DeliveryError::Transient {
                        provider: self.name.clone(),
                        message: format!("HTTP {status} {code}"),
                        retry_after: wait,
                        throttled: status == 429,
                    })
                }
            }
        }
        TokenResult::Failed(DeliveryError::transient(
            &self.name,
            "unauthorized after renewing the token",
        ))
    }
}

#[async_trait]
impl Provider for Fcm {
    fn name(&self) -> &str {
        &self.name
    }

    /// Sends to every device token; a success on any is a success. Dead tokens are
    /// reported so the worker removes them from the user.
    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        let (Destination::PushTokens(tokens), Rendered::Push { title, body, data }) =
            (&message.destination, &message.content)
        else {
            return Err(DeliveryError::permanent(&self.name, "FCM sends push only"));
        };
        let (mut sent, mut invalid, mut reasons, mut failed) =
            (Vec::new(), Vec::new(), Vec::new(), None);
        for device in tokens {
            match self
                .send_one(device, title, body, data, &message.delivery_id)
                .await
            {
                TokenResult::Sent(name) => sent.push(name),
                TokenResult::Invalid(why) => {
                    invalid.push(device.clone());
                    reasons.push(why);
                }
                // An unknown outcome outweighs a transient failure: no retry may repeat it.
                TokenResult::Failed(e) => {
                    if !matches!(failed, Some(DeliveryError::Unknown { .. })) {
                        failed = Some(e);
                    }
                }
            }
        }
        if !sent.is_empty() {
            return Ok(Receipt {
                provider: self.name.clone(),
                response: doc! {"message_id": &sent, "message_ids": &sent, "removed_tokens": invalid.len() as i32, "removed_because": &reasons},
                invalid_tokens: invalid,
            });
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Err(DeliveryError::Permanent {
            provider: self.name.clone(),
            message: format!(
                "every push token is invalid ({}); removed from the user",
                reasons.join(", ")
            ),
            invalid_tokens: invalid,
        })
    }
}
