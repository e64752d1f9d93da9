//! Delivery channels: a small provider trait each transport implements; nothing here knows queues.

pub mod chain;
pub mod email;
pub mod fcm;
pub mod http;
pub mod record;
pub mod smtp_pool;
pub mod sns;
pub mod twilio;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::Document;

use crate::config::{ChannelSettings, ProviderKind, Settings};
use crate::domain::{Channel, Rate};
use crate::templates::Rendered;
use chain::{Breaker, Chain, Member, TokenBucket};
use std::collections::BTreeMap;

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Email {
        address: String,
        name: Option<String>,
    },
    Phone(String),
    PushTokens(Vec<String>),
    /// The webhook channel's URL for the event type.
    Url(String),
    /// The recipient's herald inbox.
    Inbox,
}

/// One message, ready to send.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    /// Providers that take an idempotency key get this.
    pub delivery_id: String,
    pub destination: Destination,
    pub content: Rendered,
    /// Marketing: the one-click unsubscribe link, which email carries in
    /// `List-Unsubscribe` (RFC 8058).
    pub unsubscribe_url: Option<String>,
}

/// What a provider answered on success.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub provider: String,
    pub response: Document,
    /// Push tokens the provider says are dead; the worker removes them from the user.
    pub invalid_tokens: Vec<String>,
}

/// Why a send failed; the variant carries the retry meaning.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DeliveryError {
    /// Worth trying again later (timeouts, connection errors, 4xx SMTP, 5xx/429 HTTP).
    #[error("{provider}: transient failure: {message}")]
    Transient {
        provider: String,
        message: String,
        /// The provider's `Retry-After`.
        retry_after: Option<std::time::Duration>,
        /// The provider said to slow down (HTTP 429).
        throttled: bool,
    },
    /// Will fail again (invalid address, 5xx SMTP, unregistered token).
    #[error("{provider}: permanent failure: {message}")]
    Permanent {
        provider: String,
        message: String,
        /// Push tokens the provider says are dead (every one of the user's, here).
        invalid_tokens: Vec<String>,
    },
    /// The message may or may not have reached the provider (the connection broke or
    /// timed out after it was handed over): sending again could deliver it twice, so it
    /// is neither retried nor failed over, but recorded `failed`/`outcome_unknown`.
    #[error("{provider}: outcome unknown: {message}")]
    Unknown { provider: String, message: String },
    /// No provider was called: every one's circuit breaker is open. Not an attempt; worth
    /// trying again when the soonest of them lets a trial through (`retry_after`; `None`
    /// while a trial is under way).
    #[error("{provider}: circuit breaker open")]
    CircuitOpen {
        provider: String,
        retry_after: Option<std::time::Duration>,
    },
}

impl DeliveryError {
    pub fn provider(&self) -> &str {
        match self {
            DeliveryError::Transient { provider, .. }
            | DeliveryError::Permanent { provider, .. }
            | DeliveryError::Unknown { provider, .. }
            | DeliveryError::CircuitOpen { provider, .. } => provider,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            DeliveryError::Transient { message, .. }
            | DeliveryError::Permanent { message, .. }
            | DeliveryError::Unknown { message, .. } => message,
            DeliveryError::CircuitOpen { .. } => "circuit breaker open",
        }
    }
    /// Push tokens to remove from the user.
    pub fn invalid_tokens(&self) -> &[String] {
        match self {
            DeliveryError::Permanent { invalid_tokens, .. } => invalid_tokens,
            _ => &[],
        }
    }

    /// An HTTP request that failed without an answer: transient if it never connected,
    /// otherwise (a timeout, a reset after the request was written) of unknown outcome.
    pub fn from_request(provider: &str, e: &reqwest::Error) -> Self {
        if e.is_connect() || e.is_builder() {
            DeliveryError::transient(provider, format!("request failed: {e}"))
        } else {
            DeliveryError::Unknown {
                provider: provider.to_owned(),
                message: format!("no answer to a request that was sent: {e}"),
            }
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DeliveryError::Transient { .. } | DeliveryError::CircuitOpen { .. }
        )
    }

    /// How long the provider asked us to wait (HTTP `Retry-After`), or until an open
    /// breaker's trial.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            DeliveryError::Transient { retry_after, .. }
            | DeliveryError::CircuitOpen { retry_after, .. } => *retry_after,
            DeliveryError::Permanent { .. } | DeliveryError::Unknown { .. } => None,
        }
    }

    pub fn transient(provider: &str, message: impl Into<String>) -> Self {
        DeliveryError::Transient {
            provider: provider.to_owned(),
            message: message.into(),
            retry_after: None,
            throttled: false,
        }
    }

    pub fn permanent(provider: &str, message: impl Into<String>) -> Self {
        DeliveryError::Permanent {
            provider: provider.to_owned(),
            message: message.into(),
            invalid_tokens: Vec::new(),
        }
    }
}

/// A transport for one channel (SMTP, a file, an HTTP provider...).
#[async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> &str;
    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError>;
}

/// The providers of each channel, built once at start.
#[derive(Clone)]
pub struct Channels {
    pub email: Arc<Chain>,
    pub sms: Arc<Chain>,
    pub push: Arc<Chain>,
    pub webhook: Arc<Chain>,
}

fn chain(channel: Channel, settings: &ChannelSettings, all: &Settings) -> anyhow::Result<Chain> {
    let hooks = &all.webhook;
    let public_url = all.server.public_url.trim_end_matches('/');
    anyhow::ensure!(
        !settings.providers.is_empty(),
        "{channel}.providers: at least one provider is needed"
    );
    let mut members = Vec::new();
    for p in &settings.providers {
        let timeout = Duration::from_millis(p.timeout_ms);
        let provider: Box<dyn Provider> = match &p.kind {
            ProviderKind::Record => Box::new(record::RecordProvider::new(
                &p.name,
                channel,
                &settings.record_dir,
            )?),
            ProviderKind::Webhook {
                url,
                secret,
                headers,
                body_template,
            } => Box::new(webhook::Webhook::new(
                &p.name,
                webhook::Target {
                    url: Some(url.clone()),
                    secret: secret.clone(),
                    headers: headers.clone(),
                    body_template: body_template.clone(),
                },
                timeout,
                hooks,
            )?),
            ProviderKind::Fcm {
                service_account_file,
                base_url,
                token_uri,
            } => {
                anyhow::ensure!(
                    channel == Channel::Push,
                    "{channel}.providers.{}: fcm sends push only",
                    p.name
                );
                Box::new(fcm::Fcm::new(
                    &p.name,
                    service_account_file,
                    base_url,
                    token_uri.as_deref(),
                    timeout,
                )?)
            }
            ProviderKind::Twilio {
                base_url,
                account_sid,
                auth_token,
                from,
            } => {
                anyhow::ensure!(
                    channel == Channel::Sms,
                    "{channel}.providers.{}: twilio sends SMS only",
                    p.name
                );
                Box::new(twilio::Twilio::new(
                    &p.name,
                    base_url,
                    account_sid,
                    auth_token.clone(),
                    from,
                    format!("{public_url}/v1/feedback/twilio"),
                    timeout,
                )?)
            }
        };
        members.push(Member {
            provider,
            // 0 = unlimited; anything else was checked to be a `Rate` when settings loaded.
            limiter: Rate::new(p.rate_per_sec)
                .ok()
                .map(|rate| TokenBucket::new(rate, p.burst)),
            breaker: Breaker::new(
                p.breaker_failures,
                Duration::from_millis(p.breaker_cooldown_ms),
            ),
        });
    }
    Ok(Chain::new(members))
}

impl Channels {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let email = Member {
            provider: email::build(&settings.email)?,
            limiter: None,
            breaker: Breaker::new(5, Duration::from_secs(30)),
        };
        Ok(Self {
            email: Arc::new(Chain::new(vec![email])),
            sms: Arc::new(chain(Channel::Sms, &settings.sms, settings)?),
            push: Arc::new(chain(Channel::Push, &settings.push, settings)?),
            webhook: Arc::new(Chain::new(vec![Member {
                provider: Box::new(webhook::Webhook::new(
                    "webhook",
                    webhook::Target {
                        url: None,
                        secret: settings.webhook.secret.clone(),
                        headers: BTreeMap::new(),
                        body_template: None,
                    },
                    Duration::from_millis(settings.webhook.timeout_ms),
                    &settings.webhook,
                )?),
                limiter: None,
                breaker: Breaker::new(5, Duration::from_secs(30)),
            }])),
        })
    }

    /// The providers of a channel; `None` for the in-app channel, which herald delivers
    /// itself (the inbox item is written with the outcome).
    pub fn provider(&self, channel: Channel) -> Option<&Chain> {
        match channel {
            Channel::Email => Some(&self.email),
            Channel::Sms => Some(&self.sms),
            Channel::Push => Some(&self.push),
            Channel::Webhook => Some(&self.webhook),
            Channel::InApp => None,
        }
    }
}
