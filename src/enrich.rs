//! Enrichment from external services (a profile service, a content service) behind the
//! local collections: timeouts, bounded answers, a bounded cache with a TTL, and
//! "unavailable" as a retryable outcome. Errors name a service's URL without its
//! credentials or query, so neither reaches a log line.

use std::time::Duration;

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

/// An answer larger than this is refused (a profile or a content record is small).
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Content ids of one delivery fetched at once.
const CONTENT_FETCHES: usize = 8;

pub struct Enricher {
    client: reqwest::Client,
    user_url: Option<String>,
    content_url: Option<String>,
    /// Answers by URL, 404s included; least recently used first out, each for the TTL
    /// (`None`: a TTL of 0 caches nothing).
    cache: Option<moka::sync::Cache<String, Option<Value>>>,
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
            cache: (settings.cache_ttl_secs > 0).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(settings.cache_size as u64)
                    .time_to_live(Duration::from_secs(settings.cache_ttl_secs))
                    .build()
            }),
        })
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
        if let Some(hit) = self.cache.as_ref().and_then(|c| c.get(&url)) {
            return Ok(hit);
        }
        // The template, not the URL: its path would name the recipient.
        let shown = redacted(template);
        let unavailable = |why: String| EnrichError::Unavailable(format!("{shown}: {why}"));
        let mut answer = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        let value = match answer.status().as_u16() {
            200 => {
                let mut body = Vec::new();
                while let Some(chunk) = answer
                    .chunk()
                    .await
                    .map_err(|e| unavailable(e.without_url().to_string()))?
                {
                    if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                        return Err(unavailable(format!(
                            "the answer is larger than {MAX_ANSWER_BYTES} bytes"
                        )));
                    }
                    body.extend_from_slice(&chunk);
                }
                let value = serde_json::from_slice::<Value>(&body)
                    .map_err(|e| unavailable(format!("unreadable answer: {e}")))?;
                Some(value)
            }
            404 => None,
            status => return Err(unavailable(format!("HTTP {status}"))),
        };
        if let Some(cache) = &self.cache {
            cache.insert(url, value.clone());
        }
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
        // Ids the collection does not know (their stub has a single field), fetched a
        // few at a time.
        let missing: Vec<usize> = (0..docs.len()).filter(|&i| docs[i].len() <= 1).collect();
        for chunk in missing.chunks(CONTENT_FETCHES) {
            let fetches = chunk
                .iter()
                .map(|&i| self.fetch(template, "{content_id}", &ids[i]));
            let found = futures::future::try_join_all(fetches).await?;
            for (&i, found) in chunk.iter().zip(found) {
                if let Some(Value::Object(found)) = found {
                    let mut d =
                        bson::to_document(&found).map_err(|e| EnrichError::Store(e.into()))?;
                    d.insert("content_id", ids[i].as_str());
                    docs[i] = d;
                }
            }
        }
        Ok(docs)
    }
}

/// A URL as errors and logs may show it: no user, no password, no query.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("…"));
            }
            u.to_string()
        }
        Err(_) => "(an enrichment URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_in_an_error_keeps_no_credentials_and_no_query() {
        // (Errors show the configured template, so no recipient's id reaches them.)
        let shown = redacted("https://svc:s3cret@profiles.example.com/u/42?token=abc");
        assert_eq!(shown, "https://profiles.example.com/u/42?%E2%80%A6");
        assert!(!shown.contains("s3cret") && !shown.contains("abc"));
    }

    #[tokio::test]
    async fn an_unreachable_service_is_named_without_its_secrets() {
        let settings = EnrichmentSettings {
            user_url: "http://svc:s3cret@127.0.0.1:9/u/{user_id}?key=k3y".into(),
            ..crate::config::Settings::load_from(std::path::Path::new("/nonexistent"), &[])
                .expect("defaults")
                .enrichment
        };
        let enricher = Enricher::new(&settings).expect("enricher");
        let Err(EnrichError::Unavailable(why)) = enricher.user(None, "ana@example.com").await
        else {
            panic!("port 9 answers nothing");
        };
        assert!(!why.contains("s3cret") && !why.contains("k3y"), "{why}");
        assert!(!why.contains("ana"), "the recipient stays out of it: {why}");
        assert!(why.contains("127.0.0.1:9/u/"), "{why}");
    }
}
