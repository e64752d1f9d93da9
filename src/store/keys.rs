//! API keys: only a SHA-256 of each secret is stored; a key is shown once, at creation.

use anyhow::Context as _;
use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime};
use mongodb::{Collection, IndexModel};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{now, Store};
use crate::domain::{Rate, Scope};

pub(crate) const API_KEYS: &str = "api_keys";
/// Every key starts with this, so leaked keys are easy to find in code and logs.
const PREFIX: &str = "hrld";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyDoc {
    /// The public part of the key (`hrld_<id>_<secret>`).
    #[serde(rename = "_id")]
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    /// Hex SHA-256 of the whole key. Keys are 256 random bits, so a fast hash is enough.
    pub hash: String,
    /// Requests per second for this key; `None` takes the configured default.
    #[serde(default)]
    pub rate_per_sec: Option<f64>,
    pub created_at: DateTime,
    pub revoked_at: Option<DateTime>,
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The id part of a presented key, if it has our shape.
fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?.strip_prefix('_')?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// Compares without stopping at the first difference (no timing hint about the hash).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Store {
    fn keys(&self) -> Collection<ApiKeyDoc> {
        self.db.collection(API_KEYS)
    }

    pub(super) async fn index_keys(&self) -> anyhow::Result<()> {
        self.keys()
            .create_index(IndexModel::builder().keys(doc! {"name": 1}).build())
            .await?;
        Ok(())
    }

    /// Creates a key and returns it with the plain key, which is never stored.
    pub async fn create_key(
        &self,
        name: &str,
        scopes: &[Scope],
        rate: Option<Rate>,
    ) -> anyhow::Result<(ApiKeyDoc, String)> {
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        {
            let mut rng = rand::rng();
            rng.fill_bytes(&mut id);
            rng.fill_bytes(&mut secret);
        }
        let id = hex::encode(id);
        let plain = format!("{PREFIX}_{id}_{}", hex::encode(secret));
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        let key = ApiKeyDoc {
            id,
            name: name.to_owned(),
            scopes,
            hash: digest(&plain),
            rate_per_sec: rate.map(Rate::per_sec),
            created_at: now(),
            revoked_at: None,
        };
        self.keys()
            .insert_one(&key)
            .await
            .context("storing the API key")?;
        Ok((key, plain))
    }

    /// The live key a request presented; `None` for unknown, malformed or revoked keys.
    pub async fn verify_key(&self, presented: &str) -> anyhow::Result<Option<ApiKeyDoc>> {
        let Some(id) = key_id(presented) else {
            return Ok(None);
        };
        let key = self
            .keys()
            .find_one(doc! {"_id": id, "revoked_at": null})
            .await?;
        Ok(key.filter(|k| same(&k.hash, &digest(presented))))
    }

    /// A key by id, if it is not revoked.
    pub async fn live_key(&self, id: &str) -> anyhow::Result<Option<ApiKeyDoc>> {
        Ok(self
            .keys()
            .find_one(doc! {"_id": id, "revoked_at": null})
            .await?)
    }

    /// Every key, newest first (hashes included; callers show what they choose).
    pub async fn list_keys(&self) -> anyhow::Result<Vec<ApiKeyDoc>> {
        Ok(self
            .keys()
            .find(doc! {})
            .sort(doc! {"created_at": -1})
            .await?
            .try_collect()
            .await?)
    }

    /// Revokes a key and ends the console sessions it signed in; false when there is no
    /// live key with this id.
    pub async fn revoke_key(&self, id: &str) -> anyhow::Result<bool> {
        let r = self
            .keys()
            .update_one(
                doc! {"_id": id, "revoked_at": null},
                doc! {"$set": {"revoked_at": now()}},
            )
            .await?;
        // Its sessions stop working with the key (a session's key must be live); ending
        // them here only tidies up, so a failure is not the revocation's.
        if let Err(e) = self.end_console_sessions_of(id).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not end a revoked key's console sessions"
            );
        }
        Ok(r.modified_count == 1)
    }

    /// Revokes every live key with this name (a key being replaced); returns how many.
    pub async fn revoke_keys_named(&self, name: &str) -> anyhow::Result<u64> {
        let live: Vec<ApiKeyDoc> = self
            .keys()
            .find(doc! {"name": name, "revoked_at": null})
            .await?
            .try_collect()
            .await?;
        let mut revoked = 0;
        for key in live {
            revoked += u64::from(self.revoke_key(&key.id).await?);
        }
        Ok(revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_keys_have_an_id() {
        assert_eq!(key_id("hrld_0a1b2c_deadbeef"), Some("0a1b2c"));
        for bad in [
            "",
            "hrld",
            "hrld_",
            "hrld_abc",
            "hrld__x",
            "hrld_abc_",
            "xx_abc_def",
        ] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn comparison_needs_equal_strings() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }
}
