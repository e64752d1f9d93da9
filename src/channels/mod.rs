//! Delivery channels: a small provider trait each transport implements; nothing here knows queues.

pub mod email;
pub mod record;

use std::sync::Arc;

use async_trait::async_trait;
use mongodb::bson::Document;

use crate::config::Settings;
use crate::domain::Channel;
use crate::templates::Rendered;

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Email {
        address: String,
        name: Option<String>,
    },
    Phone(String),
    PushTokens(Vec<String>),
}

/// One message, ready to send.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    /// Providers that take an idempotency key get this.
    pub delivery_id: String,
    pub destination: Destination,
    pub content: Rendered,
}

/// What a provider answered on success.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub provider: String,
    pub response: Document,
}

/// Why a send failed; the variant carries the retry meaning.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DeliveryError {
    /// Worth trying again later (timeouts, connection errors, 4xx SMTP, 5xx/429 HTTP).
    #[error("{provider}: transient failure: {message}")]
    Transient { provider: String, message: String },
    /// Will fail again (invalid address, 5xx SMTP, unregistered token).
    #[error("{provider}: permanent failure: {message}")]
    Permanent { provider: String, message: String },
}

impl DeliveryError {
    pub fn provider(&self) -> &str {
        match self {
            DeliveryError::Transient { provider, .. }
            | DeliveryError::Permanent { provider, .. } => provider,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            DeliveryError::Transient { message, .. } | DeliveryError::Permanent { message, .. } => {
                message
            }
        }
    }
    pub fn is_transient(&self) -> bool {
        matches!(self, DeliveryError::Transient { .. })
    }

    /// How long the provider asked us to wait (HTTP `Retry-After`); SMTP has none.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A transport for one channel (SMTP, a file, an HTTP provider...).
#[async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> &str;
    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError>;
}

/// The provider of each channel, built once at start.
#[derive(Clone)]
pub struct Channels {
    pub email: Arc<dyn Provider>,
    pub sms: Arc<dyn Provider>,
    pub push: Arc<dyn Provider>,
}

impl Channels {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            email: email::build(&settings.email)?,
            sms: Arc::new(record::RecordProvider::new(
                Channel::Sms,
                &settings.sms.record_dir,
            )?),
            push: Arc::new(record::RecordProvider::new(
                Channel::Push,
                &settings.push.record_dir,
            )?),
        })
    }

    pub fn provider(&self, channel: Channel) -> &Arc<dyn Provider> {
        match channel {
            Channel::Email => &self.email,
            Channel::Sms => &self.sms,
            Channel::Push => &self.push,
        }
    }
}
