//! The recording transport for SMS and push on a single machine: appends each message to an NDJSON file.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use async_trait::async_trait;
use mongodb::bson::doc;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{DeliveryError, Destination, OutboundMessage, Provider, Receipt};
use crate::domain::Channel;
use crate::templates::Rendered;

/// Writes `<dir>/<channel>.ndjson`; the delivery log records the text as well.
pub struct RecordProvider {
    name: String,
    path: PathBuf,
    file: Mutex<Option<tokio::fs::File>>,
}

impl RecordProvider {
    pub fn new(name: &str, channel: Channel, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} record dir {}", channel, dir.display()))?;
        Ok(Self {
            name: name.to_owned(),
            path: dir.join(format!("{channel}.ndjson")),
            file: Mutex::new(None),
        })
    }
}

#[async_trait]
impl Provider for RecordProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        let fail = |e: std::io::Error| DeliveryError::transient(self.name(), e.to_string());
        let (to, text) = match (&message.destination, &message.content) {
            (Destination::Phone(p), Rendered::Sms { text }) => (vec![p.clone()], text.clone()),
            (Destination::PushTokens(t), Rendered::Push { title, body, .. }) => {
                (t.clone(), format!("{title}\n{body}"))
            }
            _ => {
                return Err(DeliveryError::permanent(
                    self.name(),
                    "destination and message do not match",
                ))
            }
        };
        let line = serde_json::json!({
            "delivery_id": message.delivery_id,
            "to": to,
            "text": text,
            "at": chrono::Utc::now().to_rfc3339(),
        });
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await
                .map_err(fail)?;
            *guard = Some(f);
        }
        if let Some(f) = guard.as_mut() {
            let mut bytes = line.to_string().into_bytes();
            bytes.push(b'\n');
            f.write_all(&bytes).await.map_err(fail)?;
            f.flush().await.map_err(fail)?;
        }
        Ok(Receipt {
            provider: self.name.clone(),
            invalid_tokens: Vec::new(),
            response: doc! {
                "recorded_to": self.path.display().to_string(),
                "to": to,
                "text": text,
            },
        })
    }
}
