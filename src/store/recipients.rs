//! Users, groups (with their members) and segments: who a notification goes to.

use std::collections::HashMap;

use anyhow::Context as _;
use futures::{FutureExt, Stream, TryStreamExt};
use mongodb::bson::{self, doc, Document};

use super::documents::{GroupDoc, SegmentDoc, UnsubscribeDoc, UserDoc};
use super::{by_ids, now, Store, UNSUBSCRIBES, USERS};

impl Store {
    /// Creates or replaces a user's profile (its opt-outs stay); returns true when it
    /// was created.
    pub async fn put_user(&self, user: UserDoc) -> anyhow::Result<bool> {
        let (created, _) = self.upsert_users(std::slice::from_ref(&user)).await?;
        Ok(created == 1)
    }

    /// Records that `user_id` left marketing of `event_type` (`None`: all of it), once:
    /// a repeat keeps the first time. Kept apart from the profile, so it holds for a
    /// user known only to the enrichment service and survives the profile's deletion.
    pub async fn unsubscribe(&self, user_id: &str, event_type: Option<&str>) -> anyhow::Result<()> {
        let entry = UnsubscribeDoc {
            id: format!("{user_id}|{}", event_type.unwrap_or("*")),
            user_id: user_id.to_owned(),
            event_type: event_type.map(str::to_owned),
            at: now(),
        };
        self.unsubscribes()
            .update_one(
                doc! {"_id": &entry.id},
                doc! {"$setOnInsert": bson::to_document(&entry)?},
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Every opt-out of these users: one query for a batch.
    pub async fn unsubscribes_of(
        &self,
        user_ids: &[String],
    ) -> anyhow::Result<Vec<UnsubscribeDoc>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .unsubscribes()
            .find(doc! {"user_id": {"$in": user_ids}})
            .await?
            .try_collect()
            .await?)
    }

    /// A user's profile with their opt-outs.
    pub async fn get_user(&self, id: &str) -> anyhow::Result<Option<UserDoc>> {
        let Some(mut user) = self.users().find_one(doc! {"_id": id}).await? else {
            return Ok(None);
        };
        user.unsubscribes = self.unsubscribes_of(&[id.to_owned()]).await?;
        Ok(Some(user))
    }

    pub(super) fn unsubscribes(&self) -> mongodb::Collection<UnsubscribeDoc> {
        self.db.collection(UNSUBSCRIBES)
    }

    pub async fn delete_user(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .users()
            .delete_one(doc! {"_id": id})
            .await?
            .deleted_count
            > 0)
    }

    /// Creates or replaces many users in one bulk write (`created_at` survives a
    /// replace); returns (created, updated).
    pub async fn upsert_users(&self, users: &[UserDoc]) -> anyhow::Result<(u64, u64)> {
        if users.is_empty() {
            return Ok((0, 0));
        }
        let now = now();
        let mut updates = Vec::with_capacity(users.len());
        for u in users {
            let mut set = bson::to_document(u)?;
            set.remove("_id");
            set.remove("created_at");
            set.insert("updated_at", now);
            updates.push(doc! {
                "q": {"_id": &u.id},
                "u": {"$set": set, "$setOnInsert": {"created_at": now}},
                "upsert": true,
            });
        }
        let reply = self
            .db
            .run_command(doc! {"update": USERS, "updates": updates, "ordered": false})
            .await
            .context("bulk upsert of users")?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            anyhow::bail!(
                "bulk upsert of users: {} write errors, first: {:?}",
                errors.len(),
                errors.first()
            );
        }
        let n = reply
            .get_i32("n")
            .map(i64::from)
            .or_else(|_| reply.get_i64("n"))
            .unwrap_or(0) as u64;
        let created = reply.get_array("upserted").map_or(0, |a| a.len()) as u64;
        Ok((created, n.saturating_sub(created)))
    }

    /// Removes push tokens a provider reported dead.
    pub async fn remove_push_tokens(&self, user_id: &str, tokens: &[String]) -> anyhow::Result<()> {
        self.users()
            .update_one(
                doc! {"_id": user_id},
                doc! {"$pull": {"push_tokens": {"$in": tokens}}, "$set": {"updated_at": now()}},
            )
            .await?;
        Ok(())
    }

    /// Users by id, in one query.
    pub async fn get_users(
        &self,
        ids: &[String],
    ) -> anyhow::Result<HashMap<String, Result<UserDoc, String>>> {
        by_ids(&self.users(), ids).await
    }

    /// Creates or replaces a group and its whole membership, atomically.
    pub async fn put_group(
        &self,
        id: &str,
        name: &str,
        user_ids: &[String],
    ) -> anyhow::Result<(GroupDoc, bool)> {
        let now = now();
        let existing = self.get_group(id).await?;
        let group = GroupDoc {
            id: id.to_owned(),
            name: name.to_owned(),
            member_count: user_ids.len() as i64,
            created_at: existing.as_ref().map(|g| g.created_at).unwrap_or(now),
            updated_at: now,
        };
        let members: Vec<Document> = user_ids
            .iter()
            .map(|u| doc! {"group_id": id, "user_id": u})
            .collect();
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .and_run(
                (self.groups(), self.members(), &group, &members),
                |s, (groups, members_coll, group, members)| {
                    async move {
                        groups
                            .replace_one(doc! {"_id": &group.id}, &**group)
                            .upsert(true)
                            .session(&mut *s)
                            .await?;
                        members_coll
                            .delete_many(doc! {"group_id": &group.id})
                            .session(&mut *s)
                            .await?;
                        if !members.is_empty() {
                            members_coll
                                .insert_many(members.iter())
                                .session(&mut *s)
                                .await?;
                        }
                        Ok(())
                    }
                    .boxed()
                },
            )
            .await
            .context("writing a group")?;
        Ok((group, existing.is_none()))
    }

    pub async fn get_group(&self, id: &str) -> anyhow::Result<Option<GroupDoc>> {
        Ok(self.groups().find_one(doc! {"_id": id}).await?)
    }

    /// A group's member ids, sorted; for display, bounded by `limit`.
    pub async fn group_member_ids(&self, id: &str, limit: i64) -> anyhow::Result<Vec<String>> {
        let docs: Vec<Document> = self
            .members()
            .find(doc! {"group_id": id})
            .sort(doc! {"user_id": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("user_id").ok().map(str::to_owned))
            .collect())
    }

    /// Streams a group's members with a cursor; a large audience is never loaded whole.
    pub async fn stream_group_members(
        &self,
        id: &str,
        after: Option<&str>,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<String>> + Send + use<>> {
        let mut filter = doc! {"group_id": id};
        if let Some(a) = after {
            filter.insert("user_id", doc! {"$gt": a});
        }
        let cursor = self
            .members()
            .find(filter)
            .sort(doc! {"user_id": 1})
            .projection(doc! {"user_id": 1, "_id": 0})
            .batch_size(1000)
            .await?;
        Ok(cursor
            .map_err(anyhow::Error::from)
            .and_then(|d| async move {
                d.get_str("user_id")
                    .map(str::to_owned)
                    .context("group member without user_id")
            }))
    }

    /// Streams the ids of users in a segment with a cursor (index-backed on locale and
    /// tags), in id order, those after `after` only.
    pub async fn stream_segment(
        &self,
        segment: &SegmentDoc,
        after: Option<&str>,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<String>> + Send + use<>> {
        let cursor = self
            .users()
            .clone_with_type::<Document>()
            .find(segment_query(segment, after))
            .projection(doc! {"_id": 1})
            .sort(doc! {"_id": 1})
            .batch_size(1000)
            .await?;
        Ok(cursor
            .map_err(anyhow::Error::from)
            .and_then(|d| async move {
                d.get_str("_id")
                    .map(str::to_owned)
                    .context("user without _id")
            }))
    }

    /// The plan the database picks for reading a segment (tests: it walks an index in id
    /// order, never sorting in memory).
    pub async fn explain_segment(
        &self,
        segment: &SegmentDoc,
        after: Option<&str>,
    ) -> anyhow::Result<Document> {
        let command = doc! {
            "explain": {
                "find": self.users().name(),
                "filter": segment_query(segment, after),
                "projection": {"_id": 1},
                "sort": {"_id": 1},
            },
            "verbosity": "queryPlanner",
        };
        Ok(self.db.run_command(command).await?)
    }

    /// True when a segment selects at least one user.
    pub async fn segment_has_users(&self, segment: &SegmentDoc) -> anyhow::Result<bool> {
        use futures::StreamExt;
        let mut s = Box::pin(self.stream_segment(segment, None).await?);
        Ok(s.next().await.transpose()?.is_some())
    }

    pub async fn delete_group(&self, id: &str) -> anyhow::Result<bool> {
        let mut session = self.client.start_session().await?;
        let deleted = session
            .start_transaction()
            .and_run((self.groups(), self.members()), |s, (groups, members)| {
                let id = id.to_owned();
                async move {
                    let r = groups
                        .delete_one(doc! {"_id": &id})
                        .session(&mut *s)
                        .await?;
                    members
                        .delete_many(doc! {"group_id": &id})
                        .session(&mut *s)
                        .await?;
                    Ok(r.deleted_count > 0)
                }
                .boxed()
            })
            .await?;
        Ok(deleted)
    }
}

/// The users of a segment, those after `after` only.
fn segment_query(segment: &SegmentDoc, after: Option<&str>) -> Document {
    let mut filter = Document::new();
    if let Some(a) = after {
        filter.insert("_id", doc! {"$gt": a});
    }
    if let Some(l) = &segment.locale {
        filter.insert("locale", l);
    }
    if let Some(t) = &segment.tag {
        filter.insert("tags", t);
    }
    filter
}
