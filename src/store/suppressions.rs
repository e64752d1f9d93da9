//! The suppression list: addresses herald no longer sends to, per channel, and why.

use std::collections::HashSet;

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::{ClientSession, Collection};
use serde::{Deserialize, Serialize};

use super::Store;
use crate::domain::Channel;

pub const SUPPRESSIONS: &str = "suppressions";

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    /// The recipient's server refused it for good.
    HardBounce,
    /// The recipient marked a message as spam.
    Complaint,
    /// The recipient left through an unsubscribe link or mailbox.
    Unsubscribe,
    /// An operator added it.
    Manual,
    /// The carrier says the number does not exist or cannot receive messages.
    InvalidNumber,
}

/// One suppressed (channel, address).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuppressionDoc {
    /// `{channel}:{normalised address}`.
    #[serde(rename = "_id")]
    pub id: String,
    pub channel: Channel,
    pub address: String,
    pub reason: SuppressionReason,
    /// The delivery whose feedback caused it, if one did.
    pub delivery_id: Option<String>,
    pub note: Option<String>,
    pub created_at: DateTime,
}

/// An address as the suppression list keys it: email lower-cased, a phone number's
/// digits with its `+`, anything else trimmed.
pub fn normalise(channel: Channel, address: &str) -> String {
    let a = address.trim();
    match channel {
        Channel::Email => a.to_lowercase(),
        Channel::Sms => {
            let digits: String = a.chars().filter(char::is_ascii_digit).collect();
            if a.starts_with('+') {
                format!("+{digits}")
            } else {
                digits
            }
        }
        Channel::Push | Channel::Webhook | Channel::InApp => a.to_owned(),
    }
}

/// The key of a (channel, address).
pub fn suppression_id(channel: Channel, address: &str) -> String {
    format!("{channel}:{}", normalise(channel, address))
}

/// Which suppressions a list shows.
#[derive(Debug, Clone, Default)]
pub struct SuppressionFilter {
    pub channel: Option<Channel>,
    pub address: Option<String>,
    pub reason: Option<SuppressionReason>,
}

impl SuppressionDoc {
    pub fn new(
        channel: Channel,
        address: &str,
        reason: SuppressionReason,
        delivery_id: Option<String>,
        note: Option<String>,
    ) -> Self {
        Self {
            id: suppression_id(channel, address),
            channel,
            address: normalise(channel, address),
            reason,
            delivery_id,
            note,
            created_at: DateTime::now(),
        }
    }
}

impl Store {
    pub(super) fn suppressions(&self) -> Collection<SuppressionDoc> {
        self.db.collection(SUPPRESSIONS)
    }

    pub(super) async fn index_suppressions(&self) -> anyhow::Result<()> {
        let model = super::named_index;
        self.suppressions()
            .create_indexes([model(doc! {"reason": 1, "_id": 1}, "reason_id")])
            .await?;
        Ok(())
    }

    /// Adds or replaces a suppression (an operator's `PUT`); true when it is new.
    pub async fn put_suppression(&self, s: &SuppressionDoc) -> anyhow::Result<bool> {
        let result = self
            .suppressions()
            .replace_one(doc! {"_id": &s.id}, s)
            .upsert(true)
            .await?;
        Ok(result.upserted_id.is_some())
    }

    /// Adds a suppression unless the address already has one (the first reason stays),
    /// inside a feedback transaction.
    pub(super) async fn suppress_in(
        &self,
        session: &mut ClientSession,
        s: &SuppressionDoc,
    ) -> mongodb::error::Result<()> {
        self.suppressions()
            .update_one(
                doc! {"_id": &s.id},
                doc! {"$setOnInsert": mongodb::bson::to_document(s)
                .map_err(mongodb::error::Error::custom)?},
            )
            .upsert(true)
            .session(session)
            .await?;
        Ok(())
    }

    /// Lifts a suppression; false when there was none.
    pub async fn lift_suppression(&self, channel: Channel, address: &str) -> anyhow::Result<bool> {
        let id = suppression_id(channel, address);
        Ok(self
            .suppressions()
            .delete_one(doc! {"_id": id})
            .await?
            .deleted_count
            == 1)
    }

    pub async fn get_suppression(
        &self,
        channel: Channel,
        address: &str,
    ) -> anyhow::Result<Option<SuppressionDoc>> {
        let id = suppression_id(channel, address);
        Ok(self.suppressions().find_one(doc! {"_id": id}).await?)
    }

    /// A page of suppressions in key order after `after` (a key), and the next key.
    pub async fn list_suppressions(
        &self,
        filter: &SuppressionFilter,
        after: Option<&str>,
        limit: i64,
    ) -> anyhow::Result<(Vec<SuppressionDoc>, Option<String>)> {
        let mut query = Document::new();
        let mut id = Document::new();
        if let Some(c) = filter.channel {
            match &filter.address {
                Some(a) => {
                    id.insert("$eq", suppression_id(c, a));
                }
                None => {
                    // Keys of one channel share its prefix; `;` sorts right after `:`.
                    id.insert("$gte", format!("{c}:"));
                    id.insert("$lt", format!("{c};"));
                }
            }
        } else if let Some(a) = &filter.address {
            query.insert("address", a.trim().to_lowercase());
        }
        if let Some(after) = after {
            id.insert("$gt", after);
        }
        if !id.is_empty() {
            query.insert("_id", id);
        }
        if let Some(r) = filter.reason {
            query.insert("reason", mongodb::bson::to_bson(&r)?);
        }
        let mut items: Vec<SuppressionDoc> = self
            .suppressions()
            .find(query)
            .sort(doc! {"_id": 1})
            .limit(limit + 1)
            .await?
            .try_collect()
            .await?;
        let next = (items.len() as i64 > limit).then(|| {
            items.truncate(limit as usize);
            items.last().map(|s| s.id.clone())
        });
        Ok((items, next.flatten()))
    }

    /// Which of `keys` (suppression ids) are suppressed: one query for a whole batch.
    pub async fn suppressed_among(&self, keys: &[String]) -> anyhow::Result<HashSet<String>> {
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        super::ids_found(
            self.suppressions()
                .clone_with_type::<Document>()
                .find(doc! {"_id": {"$in": keys}}),
        )
        .await
    }
}
