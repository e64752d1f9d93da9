//! The delivery log as ops read it: filtered keyset pages on the index each filter picks,
//! and a change stream of status changes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures::{Stream, StreamExt, TryStreamExt};
use mongodb::bson::{self, doc, DateTime, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::options::FullDocumentType;
use mongodb::IndexModel;
use serde::{Deserialize, Serialize};

use super::{DeliveryDoc, Store};
use crate::domain::{Channel, DeliveryStatus};

/// Delivery-log filters; every combination is served by one of [`LOG_INDEXES`].
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub notification_id: Option<String>,
    pub user_id: Option<String>,
    pub status: Option<DeliveryStatus>,
    pub channel: Option<Channel>,
    pub event_type: Option<String>,
    pub schedule_id: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime>,
    /// Created before.
    pub until: Option<DateTime>,
}

/// Where the previous page ended: the log is ordered by (created_at, _id), newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCursor {
    #[serde(rename = "t")]
    pub created_at_ms: i64,
    #[serde(rename = "i")]
    pub id: String,
}

impl LogCursor {
    /// Opaque to clients: they hand back what they were given.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(s: &str) -> Option<Self> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).ok()?).ok()
    }
}

/// One page of the log and where the next one starts.
#[derive(Debug)]
pub struct LogPage {
    pub items: Vec<DeliveryDoc>,
    pub next: Option<LogCursor>,
}

/// Every log index: (name, leading equality fields). Each ends in `created_at: -1, _id: -1`,
/// so a page is a bounded walk of one index, never a sort. The planner picks among them;
/// herald does not hint (on SecantusDB a hinted find ran ~490 ms at 1M deliveries where
/// the planner's choice of the same index ran in 1 ms).
pub const LOG_INDEXES: &[(&str, &[&str])] = &[
    ("log_notification", &["notification_id"]),
    ("log_user", &["user_id"]),
    ("log_schedule", &["schedule_id"]),
    ("log_status_channel", &["status", "channel"]),
    ("log_status", &["status"]),
    ("log_event_type", &["event_type"]),
    ("log_channel", &["channel"]),
    ("log_created", &[]),
];

/// The index of each of [`LOG_INDEXES`].
pub(super) fn log_index_models() -> impl Iterator<Item = IndexModel> {
    LOG_INDEXES.iter().map(|(name, fields)| {
        let mut keys = Document::new();
        for f in *fields {
            keys.insert(*f, 1);
        }
        keys.insert("created_at", -1);
        keys.insert("_id", -1);
        IndexModel::builder()
            .keys(keys)
            .options(
                mongodb::options::IndexOptions::builder()
                    .name((*name).to_owned())
                    .build(),
            )
            .build()
    })
}

/// The query document of a filter and a cursor.
pub fn log_query(f: &DeliveryFilter, after: Option<&LogCursor>) -> Document {
    let mut q = Document::new();
    let eq = [
        ("notification_id", f.notification_id.as_deref()),
        ("user_id", f.user_id.as_deref()),
        ("schedule_id", f.schedule_id.as_deref()),
        ("status", f.status.map(|s| s.as_str())),
        ("channel", f.channel.map(|c| c.as_str())),
        ("event_type", f.event_type.as_deref()),
    ];
    for (field, value) in eq {
        if let Some(v) = value {
            q.insert(field, v);
        }
    }
    let mut range = Document::new();
    if let Some(since) = f.since {
        range.insert("$gte", since);
    }
    let until = f.until.map(|u| u.timestamp_millis());
    match (after, until) {
        // The index bound is `<=` the cursor's instant; ties are split on `_id` below.
        (Some(c), Some(u)) if u <= c.created_at_ms => {
            range.insert("$lt", DateTime::from_millis(u));
        }
        (Some(c), _) => {
            range.insert("$lte", DateTime::from_millis(c.created_at_ms));
            let at = DateTime::from_millis(c.created_at_ms);
            q.insert(
                "$or",
                vec![
                    doc! {"created_at": {"$lt": at}},
                    doc! {"created_at": at, "_id": {"$lt": &c.id}},
                ],
            );
        }
        (None, Some(u)) => {
            range.insert("$lt", DateTime::from_millis(u));
        }
        (None, None) => {}
    }
    if !range.is_empty() {
        q.insert("created_at", range);
    }
    q
}

/// A delivery's status change, as the change stream reports it.
#[derive(Debug)]
pub struct DeliveryChange {
    /// Hand back to [`Store::watch_deliveries`] to resume after this change.
    pub resume: String,
    /// The delivery as it is now, with the status this change set.
    pub delivery: DeliveryDoc,
}

/// Which status changes a stream reports.
#[derive(Debug, Clone, Default)]
pub struct ChangeFilter {
    pub status: Option<DeliveryStatus>,
    pub channel: Option<Channel>,
    pub event_type: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct TokenBox {
    t: ResumeToken,
}

fn encode_token(token: &ResumeToken) -> Option<String> {
    let bytes = bson::to_vec(&TokenBox { t: token.clone() }).ok()?;
    Some(URL_SAFE_NO_PAD.encode(bytes))
}

/// A resume point handed out by [`DeliveryChange::resume`]; `None` when it is not one.
pub fn decode_token(s: &str) -> Option<ResumeToken> {
    let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
    bson::from_slice::<TokenBox>(&bytes).ok().map(|b| b.t)
}

impl Store {
    /// One page of the delivery log, newest first, through the filter's index.
    pub async fn find_deliveries(
        &self,
        f: &DeliveryFilter,
        after: Option<&LogCursor>,
        limit: i64,
    ) -> anyhow::Result<LogPage> {
        let mut items: Vec<DeliveryDoc> = self
            .deliveries()
            .find(log_query(f, after))
            .sort(doc! {"created_at": -1, "_id": -1})
            .projection(doc! {"attempts": 0, "claim": 0})
            .limit(limit + 1)
            .await?
            .try_collect()
            .await?;
        let next = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|d| LogCursor {
                created_at_ms: d.created_at.timestamp_millis(),
                id: d.id.clone(),
            })
        } else {
            None
        };
        Ok(LogPage { items, next })
    }

    /// MongoDB's `explain` of a log query (tests check that every shape walks an index).
    pub async fn explain_deliveries(
        &self,
        f: &DeliveryFilter,
        after: Option<&LogCursor>,
    ) -> anyhow::Result<Document> {
        let command = doc! {
            "explain": {
                "find": super::DELIVERIES,
                "filter": log_query(f, after),
                "sort": {"created_at": -1, "_id": -1},
                "limit": 51,
            },
            "verbosity": "queryPlanner",
        };
        Ok(self.db.run_command(command).await?)
    }

    /// Status changes of deliveries from now on (or after `resume`), filtered.
    pub async fn watch_deliveries(
        &self,
        f: &ChangeFilter,
        resume: Option<ResumeToken>,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<DeliveryChange>> + Send + 'static> {
        let mut conditions = vec![
            doc! {"operationType": {"$in": ["insert", "update", "replace"]}},
            doc! {"fullDocument": {"$ne": null}},
            // Only updates that set a status are status changes.
            doc! {"$or": [
                {"operationType": {"$ne": "update"}},
                {"updateDescription.updatedFields.status": {"$exists": true}},
            ]},
        ];
        if let Some(s) = f.status {
            conditions.push(doc! {"$or": [
                {"operationType": {"$ne": "update"}, "fullDocument.status": s.as_str()},
                {"updateDescription.updatedFields.status": s.as_str()},
            ]});
        }
        if let Some(c) = f.channel {
            conditions.push(doc! {"fullDocument.channel": c.as_str()});
        }
        if let Some(e) = &f.event_type {
            conditions.push(doc! {"fullDocument.event_type": e});
        }
        let stream = self
            .deliveries()
            .watch()
            .pipeline([doc! {"$match": {"$and": conditions}}])
            .full_document(FullDocumentType::UpdateLookup)
            .resume_after(resume)
            .await?;
        Ok(stream.filter_map(|event| async move {
            match event {
                Err(e) => Some(Err(anyhow::Error::from(e))),
                Ok(e) => change_of(e).map(Ok),
            }
        }))
    }
}

fn change_of(e: ChangeStreamEvent<DeliveryDoc>) -> Option<DeliveryChange> {
    let resume = encode_token(&e.id)?;
    let mut delivery = e.full_document?;
    // The looked-up document may already be further along; report this change's status.
    if e.operation_type == OperationType::Update {
        if let Some(status) = e
            .update_description
            .as_ref()
            .and_then(|u| u.updated_fields.get("status"))
            .and_then(|s| bson::from_bson::<DeliveryStatus>(s.clone()).ok())
        {
            delivery.status = status;
        }
    }
    Some(DeliveryChange { resume, delivery })
}

impl Store {
    /// Deliveries still `sending` under a claim made before `cutoff` (at most `limit`):
    /// their worker stopped, or their job was lost, between the provider call and the commit.
    pub async fn stale_claims(
        &self,
        cutoff: DateTime,
        limit: i64,
    ) -> anyhow::Result<Vec<DeliveryDoc>> {
        Ok(self
            .deliveries()
            .find(doc! {"status": "sending", "claim.claimed_at": {"$lt": cutoff}})
            .projection(doc! {"attempts": 0})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = LogCursor {
            created_at_ms: 1_700_000_000_123,
            id: "0192-abc".into(),
        };
        assert_eq!(LogCursor::decode(&c.encode()), Some(c));
        assert_eq!(LogCursor::decode("not a cursor"), None);
        assert_eq!(LogCursor::decode(""), None);
    }
}
