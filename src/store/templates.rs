//! Templates stored through the API (they override the files of their event type, channel and locale).

use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{doc, DateTime, Document};
use mongodb::Collection;
use serde::{Deserialize, Serialize};

use super::{now, Store};
use crate::domain::Channel;

pub(super) const TEMPLATES: &str = "templates";

/// One stored template part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateDoc {
    /// `<event_type>/<channel>/<locale or _>/<part>`.
    #[serde(rename = "_id")]
    pub id: String,
    pub event_type: String,
    pub channel: Channel,
    pub locale: Option<String>,
    pub part: String,
    pub source: String,
    pub updated_at: DateTime,
}

/// Changes whenever a stored template is written or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplatesVersion {
    pub count: u64,
    pub last_update: Option<DateTime>,
}

impl Store {
    fn templates(&self) -> Collection<TemplateDoc> {
        self.db.collection(TEMPLATES)
    }

    pub async fn list_templates(&self) -> anyhow::Result<Vec<TemplateDoc>> {
        Ok(self.templates().find(doc! {}).await?.try_collect().await?)
    }

    pub async fn templates_version(&self) -> anyhow::Result<TemplatesVersion> {
        let count = self.templates().count_documents(doc! {}).await?;
        let last = self
            .templates()
            .clone_with_type::<Document>()
            .find_one(doc! {})
            .sort(doc! {"updated_at": -1})
            .projection(doc! {"updated_at": 1})
            .await?;
        Ok(TemplatesVersion {
            count,
            last_update: last.and_then(|d| d.get_datetime("updated_at").ok().copied()),
        })
    }

    /// Replaces every stored part of (event type, channel, locale) at once.
    pub async fn put_templates(
        &self,
        event_type: &str,
        channel: Channel,
        locale: Option<&str>,
        parts: &[(String, String)],
    ) -> anyhow::Result<Vec<TemplateDoc>> {
        let stamp = now();
        let docs: Vec<TemplateDoc> = parts
            .iter()
            .map(|(part, source)| TemplateDoc {
                id: format!("{event_type}/{channel}/{}/{part}", locale.unwrap_or("_")),
                event_type: event_type.to_owned(),
                channel,
                locale: locale.map(str::to_owned),
                part: part.clone(),
                source: source.clone(),
                updated_at: stamp,
            })
            .collect();
        let filter = doc! {"event_type": event_type, "channel": channel.as_str(), "locale": locale};
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .and_run(
                (self.templates(), &docs, &filter),
                |s, (coll, docs, filter)| {
                    async move {
                        coll.delete_many((*filter).clone()).session(&mut *s).await?;
                        coll.insert_many(docs.iter()).session(&mut *s).await?;
                        Ok(())
                    }
                    .boxed()
                },
            )
            .await?;
        Ok(docs)
    }

    /// Removes the stored parts of (event type, channel, locale); the files apply again.
    pub async fn delete_templates(
        &self,
        event_type: &str,
        channel: Channel,
        locale: Option<&str>,
    ) -> anyhow::Result<u64> {
        Ok(self
            .templates()
            .delete_many(
                doc! {"event_type": event_type, "channel": channel.as_str(), "locale": locale},
            )
            .await?
            .deleted_count)
    }
}
