//! Content records that templates show (`payload.content` ids).

use std::collections::HashMap;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};

use super::{Store, CONTENTS};

impl Store {
    /// Content records for `payload.content` ids, in the order asked; unknown ids
    /// stand as `{content_id}` so templates can still name them.
    pub async fn get_contents(&self, ids: &[String]) -> anyhow::Result<Vec<Document>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found: HashMap<String, Document> = self
            .db
            .collection::<Document>(CONTENTS)
            .find(doc! {"_id": {"$in": ids}})
            .await?
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .filter_map(|mut d| {
                let id = d.get_str("_id").ok()?.to_owned();
                d.remove("_id");
                d.insert("content_id", &id);
                Some((id, d))
            })
            .collect();
        Ok(ids
            .iter()
            .map(|id| {
                found
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| doc! {"content_id": id})
            })
            .collect())
    }

    /// Creates or replaces a content record (demo data and tests).
    pub async fn put_content(&self, id: &str, mut fields: Document) -> anyhow::Result<()> {
        fields.insert("_id", id);
        self.db
            .collection::<Document>(CONTENTS)
            .replace_one(doc! {"_id": id}, fields)
            .upsert(true)
            .await?;
        Ok(())
    }
}
