//! Status webhook endpoints: where delivery events go, which events, and the secrets that sign them (a rotated one signs beside the new for a day).

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use serde::{Deserialize, Serialize};

use super::Store;

pub(crate) const WEBHOOK_ENDPOINTS: &str = "webhook_endpoints";
/// A rotation racing others gives up after this many reads.
const ROTATION_TRIES: usize = 5;
/// How long a rotated secret goes on signing beside the new one.
pub const ROTATION_OVERLAP_MS: i64 = 24 * 3600 * 1000;

/// One signing secret (`whsec_…`), and until when it signs (none: the current one).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointSecret {
    pub secret: String,
    pub created_at: DateTime,
    pub expires_at: Option<DateTime>,
}

/// An endpoint as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub url: String,
    /// Event types it receives (`message.delivered`, ...).
    pub events: Vec<String>,
    pub description: String,
    pub enabled: bool,
    /// Why herald disabled it; cleared when re-enabled.
    pub disabled_reason: Option<String>,
    /// Addresses and payload in `data` (off: ids, statuses and times only).
    pub include_contact: bool,
    pub secrets: Vec<EndpointSecret>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
    /// Since when every try has failed (none: the last try succeeded).
    #[serde(default)]
    pub failing_since: Option<DateTime>,
}

impl std::fmt::Debug for EndpointSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSecret")
            .field("secret", &"[redacted]")
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl EndpointDoc {
    /// The secrets that sign at `now`: the current one, and a rotated one within its day.
    pub fn signing_secrets(&self, now: DateTime) -> Vec<&str> {
        self.secrets
            .iter()
            .filter(|s| s.expires_at.is_none_or(|t| t > now))
            .map(|s| s.secret.as_str())
            .collect()
    }
}

/// What a `PATCH` changes (absent: unchanged).
#[derive(Debug, Clone, Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub include_contact: Option<bool>,
}

impl Store {
    pub(crate) fn webhook_endpoints(&self) -> Collection<EndpointDoc> {
        self.db.collection(WEBHOOK_ENDPOINTS)
    }

    pub async fn create_endpoint(&self, endpoint: &EndpointDoc) -> anyhow::Result<()> {
        self.webhook_endpoints().insert_one(endpoint).await?;
        self.forget_subscriptions();
        Ok(())
    }

    pub async fn endpoints(&self) -> anyhow::Result<Vec<EndpointDoc>> {
        Ok(self
            .webhook_endpoints()
            .find(doc! {})
            .sort(doc! {"created_at": 1, "_id": 1})
            .await?
            .try_collect()
            .await?)
    }

    pub async fn endpoint(&self, id: &str) -> anyhow::Result<Option<EndpointDoc>> {
        Ok(self.webhook_endpoints().find_one(doc! {"_id": id}).await?)
    }

    /// Applies a patch; `None` when there is no such endpoint. Enabling clears the reason
    /// herald disabled it for.
    pub async fn patch_endpoint(
        &self,
        id: &str,
        patch: &EndpointPatch,
    ) -> anyhow::Result<Option<EndpointDoc>> {
        let mut set = Document::new();
        set.insert("updated_at", DateTime::now());
        if let Some(url) = &patch.url {
            set.insert("url", url);
        }
        if let Some(events) = &patch.events {
            set.insert("events", events);
        }
        if let Some(d) = &patch.description {
            set.insert("description", d);
        }
        if let Some(i) = patch.include_contact {
            set.insert("include_contact", i);
        }
        if let Some(enabled) = patch.enabled {
            set.insert("enabled", enabled);
            if enabled {
                set.insert("disabled_reason", mongodb::bson::Bson::Null);
                set.insert("failing_since", mongodb::bson::Bson::Null);
            }
        }
        let patched = self
            .webhook_endpoints()
            .find_one_and_update(doc! {"_id": id}, doc! {"$set": set})
            .return_document(ReturnDocument::After)
            .await?;
        self.forget_subscriptions();
        if patched.as_ref().is_some_and(|e| !e.enabled) {
            self.fail_pending_hooks(id, "endpoint disabled").await?;
        }
        Ok(patched)
    }

    /// Deletes an endpoint with its messages and their tries.
    pub async fn delete_endpoint(&self, id: &str) -> anyhow::Result<bool> {
        let deleted = self
            .webhook_endpoints()
            .delete_one(doc! {"_id": id})
            .await?
            .deleted_count
            == 1;
        self.forget_subscriptions();
        if deleted {
            self.delete_hooks_of(id).await?;
        }
        Ok(deleted)
    }

    /// Makes `secret` the endpoint's current secret; the one it replaces signs beside it
    /// for [`ROTATION_OVERLAP_MS`], older ones stop. `None` when there is no such endpoint.
    pub async fn rotate_endpoint_secret(
        &self,
        id: &str,
        secret: &str,
    ) -> anyhow::Result<Option<EndpointDoc>> {
        for _ in 0..ROTATION_TRIES {
            let Some(current) = self.endpoint(id).await? else {
                return Ok(None);
            };
            let guard = current
                .secrets
                .iter()
                .find(|s| s.expires_at.is_none())
                .map(|s| s.secret.clone());
            let now = DateTime::now();
            let until = DateTime::from_millis(now.timestamp_millis() + ROTATION_OVERLAP_MS);
            let mut secrets: Vec<EndpointSecret> = current
                .secrets
                .into_iter()
                .filter(|s| s.expires_at.is_none())
                .map(|s| EndpointSecret {
                    expires_at: Some(until),
                    ..s
                })
                .collect();
            secrets.insert(
                0,
                EndpointSecret {
                    secret: secret.to_owned(),
                    created_at: now,
                    expires_at: None,
                },
            );
            let secrets = mongodb::bson::to_bson(&secrets)?;
            // Over the secrets read above only: of two rotations at once, the later one
            // reads again rather than drop the secret the other made.
            let rotated = self
                .webhook_endpoints()
                .find_one_and_update(
                    doc! {"_id": id, "secrets": {"$elemMatch": {"secret": guard, "expires_at": null}}},
                    doc! {"$set": {"secrets": secrets, "updated_at": now}},
                )
                .return_document(ReturnDocument::After)
                .await?;
            if rotated.is_some() {
                self.forget_subscriptions();
                return Ok(rotated);
            }
        }
        anyhow::bail!("the endpoint's secrets kept changing during {ROTATION_TRIES} rotations")
    }
}
