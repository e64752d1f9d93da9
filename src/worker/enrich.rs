//! Enrichment from external services (a profile service, a content service) behind the
//! local collections: timeouts, a bounded cache, and "unavailable" as a retryable outcome.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mongodb::bson::{self, Document};
use serde_json::Value;

use crate::config::EnrichmentSettings;
use crate::store::{Store, UserDoc};

/// A source that did not answer; the delivery is retried later, not dropped.
#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("enrichment source unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

pub struct Enricher {
    client: reqwest::Client,
    user_url: Option<String>,
    content_url: Option<String>,
    ttl: Duration,
    capacity: usize,
    cache: Mutex<HashMap<String, (Instant, Option<Value>)>>,
}

impl Enricher {
    pub fn new(settings: &EnrichmentSettings) -> anyhow::Result<Self> {
        let url = |u: &str| (!u.is_empty()).then(|| u.to_owned());
        Ok(Self {
            client: crate::channels::http::client(
                Duration::from_millis(settings.timeout_ms),
                true,
            )?,
            user_url: url(&settings.user_url),
            content_url: url(&settings.content_url),
            ttl: Duration::from_secs(settings.cache_ttl_secs),
            capacity: settings.cache_size.max(1),
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, key: &str) -> Option<Option<Value>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    fn remember(&self, key: String, value: Option<Value>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.capacity {
            cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if cache.len() >= self.capacity {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), value));
    }

    /// GETs a record: `Some` on 200, `None` on 404, unavailable otherwise.
    async fn fetch(
        &self,
        template: &str,
        placeholder: &str,
        id: &str,
    ) -> Result<Option<Value>, EnrichError> {
        let url = template.replace(
            placeholder,
            &url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>(),
        );
        if let Some(hit) = self.cached(&url) {
            return Ok(hit);
        }
        let answer = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| EnrichError::Unavailable(format!("{url}: {e}")))?;
        let value =
            match answer.status().as_u16() {
                200 => Some(answer.json::<Value>().await.map_err(|e| {
                    EnrichError::Unavailable(format!("{url}: unreadable answer: {e}"))
                })?),
                404 => None,
                status => return Err(EnrichError::Unavailable(format!("{url}: HTTP {status}"))),
            };
        self.remember(url, value.clone());
        Ok(value)
    }

    /// The recipient: `local` (from the users collection) if found, else the profile service.
    pub async fn user(
        &self,
        local: Option<UserDoc>,
        id: &str,
    ) -> Result<Option<UserDoc>, EnrichError> {
        if local.is_some() {
            return Ok(local);
        }
        let Some(template) = &self.user_url else {
            return Ok(None);
        };
        let Some(profile) = self.fetch(template, "{user_id}", id).await? else {
            return Ok(None);
        };
        let text = |k: &str| profile.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(Some(UserDoc {
            id: id.to_owned(),
            email: text("email"),
            phone: text("phone"),
            push_tokens: profile
                .get("push_tokens")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            first_name: text("first_name"),
            last_name: text("last_name"),
            birthday_date: text("birthday_date"),
            locale: text("locale"),
            timezone: text("timezone"),
            ..Default::default()
        }))
    }

    /// Content records for `payload.content` ids: the contents collection first, then the
    /// content service; unknown ids stay `{content_id}`.
    pub async fn contents(
        &self,
        store: &Store,
        ids: &[String],
    ) -> Result<Vec<Document>, EnrichError> {
        let mut docs = store.get_contents(ids).await?;
        let Some(template) = &self.content_url else {
            return Ok(docs);
        };
        for (doc, id) in docs.iter_mut().zip(ids) {
            // Only the stub of an id the collection does not know has a single field.
            if doc.len() > 1 {
                continue;
            }
            if let Some(Value::Object(found)) = self.fetch(template, "{content_id}", id).await? {
                let mut d = bson::to_document(&found).map_err(|e| EnrichError::Store(e.into()))?;
                d.insert("content_id", id);
                *doc = d;
            }
        }
        Ok(docs)
    }
}
