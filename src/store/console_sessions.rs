//! Console sign-ins: a random session id in the browser's cookie, only its SHA-256 here,
//! tied to the API key it signed in with; ended at sign-out, with its key, or when it expires.

use std::time::Duration;

use mongodb::bson::{doc, DateTime};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{now, ApiKeyDoc, Store};

pub(super) const CONSOLE_SESSIONS: &str = "console_sessions";
/// Every session id starts with this (and is never an API key, which starts `hrld_`).
const PREFIX: &str = "hcs_";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionDoc {
    /// Hex SHA-256 of the session id: a copy of the database signs nobody in.
    #[serde(rename = "_id")]
    hash: String,
    key_id: String,
    created_at: DateTime,
    /// MongoDB's TTL monitor removes the record after this; reads check it too.
    expires_at: DateTime,
}

fn digest(session: &str) -> String {
    hex::encode(Sha256::digest(session.as_bytes()))
}

impl Store {
    fn console_sessions(&self) -> Collection<SessionDoc> {
        self.db.collection(CONSOLE_SESSIONS)
    }

    pub(super) async fn index_console_sessions(&self) -> anyhow::Result<()> {
        self.console_sessions()
            .create_indexes([
                IndexModel::builder()
                    .keys(doc! {"expires_at": 1})
                    .options(
                        IndexOptions::builder()
                            .name("expires_at_ttl".to_owned())
                            .expire_after(Duration::ZERO)
                            .build(),
                    )
                    .build(),
                IndexModel::builder().keys(doc! {"key_id": 1}).build(),
            ])
            .await?;
        Ok(())
    }

    /// Starts a session for a live key; returns the session id (shown only to the browser).
    pub async fn start_console_session(
        &self,
        key_id: &str,
        lasts: Duration,
    ) -> anyhow::Result<String> {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let session = format!("{PREFIX}{}", hex::encode(secret));
        let at = now();
        let expires = DateTime::from_millis(at.timestamp_millis() + lasts.as_millis() as i64);
        self.console_sessions()
            .insert_one(SessionDoc {
                hash: digest(&session),
                key_id: key_id.to_owned(),
                created_at: at,
                expires_at: expires,
            })
            .await?;
        Ok(session)
    }

    /// The live key behind a session id: `None` when the session is unknown, ended or
    /// expired, or its key was revoked.
    pub async fn console_session_key(&self, session: &str) -> anyhow::Result<Option<ApiKeyDoc>> {
        if !session.starts_with(PREFIX) || session.len() != PREFIX.len() + 64 {
            return Ok(None);
        }
        let Some(s) = self
            .console_sessions()
            .find_one(doc! {"_id": digest(session), "expires_at": {"$gt": now()}})
            .await?
        else {
            return Ok(None);
        };
        self.live_key(&s.key_id).await
    }

    /// Ends a session (sign-out); ending one that is gone is not an error.
    pub async fn end_console_session(&self, session: &str) -> anyhow::Result<()> {
        self.console_sessions()
            .delete_one(doc! {"_id": digest(session)})
            .await?;
        Ok(())
    }

    /// Ends every session signed in with a key (the key was revoked).
    pub async fn end_console_sessions_of(&self, key_id: &str) -> anyhow::Result<()> {
        self.console_sessions()
            .delete_many(doc! {"key_id": key_id})
            .await?;
        Ok(())
    }
}
