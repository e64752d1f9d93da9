//! Fan-out: expands a notification's audience into one delivery per recipient x channel.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use mongodb::bson::DateTime;
use tracing::instrument;

use super::Shared;
use super::Worker;
use crate::domain::{Channel, DeliveryStatus, NotificationStatus};
use crate::queue::messages::Job;
use crate::queue::Outgoing;
use crate::store::{
    ChunkDoc, ChunkItem, ChunkResume, DeliveryDoc, FanoutBatch, NotificationDoc, QueuedDelivery,
};

/// The channels a notification goes out on: the event's own list, else every channel
/// with a template; with neither, email, so the missing template shows on the delivery.
pub fn channels_of(ctx: &Worker, n: &NotificationDoc) -> Vec<Channel> {
    if let Some(c) = &n.channels {
        return c.clone();
    }
    let found = ctx.templates.channels_for(&n.event_type);
    if found.is_empty() {
        vec![Channel::Email]
    } else {
        found
    }
}

/// A `DispatchMany` job's notifications are dispatched this many at a time (their
/// fan-outs share transactions through the lane's batcher).
const DISPATCH_MANY_AT_ONCE: usize = 16;

/// Dispatches several notifications. Those that fail go back to the lane as dispatch
/// jobs of their own, so each is requeued, retried or parked for its own reason, and the
/// others are not dispatched again; only if that publish fails does the whole job fail
/// (dispatch is idempotent, so running it again is safe).
pub async fn dispatch_many(
    ctx: &Worker,
    shared: &Shared,
    notification_ids: &[String],
) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for ids in notification_ids.chunks(DISPATCH_MANY_AT_ONCE) {
        let results =
            futures::future::join_all(ids.iter().map(|id| dispatch(ctx, shared, id))).await;
        for (id, result) in ids.iter().zip(results) {
            let Err(e) = result else { continue };
            tracing::warn!(notification_id = %id, error = format!("{e:#}"),
                "dispatch failed; it goes back to the lane on its own");
            failed.push(Outgoing {
                exchange: ctx.broker.names().jobs_exchange.clone(),
                routing_key: shared.lane.as_str().to_owned(),
                body: Job::Dispatch {
                    notification_id: id.clone(),
                }
                .encode(),
                headers: Vec::new(),
                expiration_ms: None,
            });
        }
    }
    if !failed.is_empty() {
        ctx.broker.publish_confirmed(&failed).await?;
    }
    Ok(())
}

/// Writes and publishes the deliveries of one notification. Idempotent: a redelivered
/// dispatch job writes only what is missing and republishes what is still queued.
#[instrument(skip_all, fields(notification_id = %notification_id))]
pub async fn dispatch(ctx: &Worker, shared: &Shared, notification_id: &str) -> anyhow::Result<()> {
    let Some(n) = ctx.store.get_notification(notification_id).await? else {
        tracing::warn!("dispatch job for an unknown notification; dropping it");
        return Ok(());
    };
    if matches!(
        n.status,
        NotificationStatus::Completed
            | NotificationStatus::PartiallyFailed
            | NotificationStatus::Failed
            | NotificationStatus::Cancelled
    ) {
        return Ok(());
    }
    ctx.store.mark_dispatching(notification_id).await?;
    let channels = channels_of(ctx, &n);
    // A fan-out goes on the way it began, whatever the setting says now. Chunks are for
    // audiences (a group or a segment): an event naming its recipients takes the
    // per-delivery path, whose writes are shared across notifications — a chunk's are
    // its notification's own, and a flood of single-recipient events each writing its
    // own chunk left fan-outs waiting past the claim timeout (docs/reliability.md).
    let at = ctx.store.chunk_resume(notification_id).await?;
    let audience = n.recipients.group_id.is_some() || n.recipients.segment.is_some();
    let chunked = if at.per_delivery {
        false
    } else if at.next_seq > 0 {
        true
    } else if n.fanout_done {
        // Finished, so its progress is gone: whether it was cut into chunks says how it
        // began (the per-delivery path would write records for the chunks' recipients).
        ctx.store.has_chunks(notification_id).await?
    } else {
        ctx.settings.worker.chunked_fanout && audience
    };
    if chunked {
        return dispatch_chunks(ctx, &n, &channels, at).await;
    }
    let batch_size = ctx.settings.worker.fanout_batch_size;

    // Inline users first, then the group, then the segment, each streamed with a cursor.
    // A user in several of them gets one delivery per channel (unique index + dedupe).
    let inline: HashSet<String> = n.recipients.user_ids.iter().cloned().collect();
    let not_inline = move |u: &String| futures::future::ready(!inline.contains(u));
    let inline_stream = futures::stream::iter(n.recipients.user_ids.clone().into_iter().map(Ok));
    let group_stream = match &n.recipients.group_id {
        Some(g) => ctx.store.stream_group_members(g, None).await?.boxed(),
        None => futures::stream::empty().boxed(),
    };
    let segment_stream = match &n.recipients.segment {
        Some(seg) => ctx.store.stream_segment(seg, None).await?.boxed(),
        None => futures::stream::empty().boxed(),
    };
    let mut audience = inline_stream
        .chain(group_stream.chain(segment_stream).try_filter(not_inline))
        .try_chunks(batch_size);
    let mut total = 0usize;
    while let Some(mut users) = audience.try_next().await.map_err(|e| e.1)? {
        let mut seen = HashSet::with_capacity(users.len());
        users.retain(|u| seen.insert(u.clone()));
        let now = DateTime::now();
        let n = &n;
        let planned: Vec<DeliveryDoc> = users
            .iter()
            .flat_map(|user| {
                channels.iter().map(move |channel| DeliveryDoc {
                    id: uuid::Uuid::now_v7().to_string(),
                    notification_id: n.id.clone(),
                    event_type: n.event_type.clone(),
                    user_id: user.clone(),
                    channel: *channel,
                    priority: n.priority,
                    schedule_id: n.schedule_id.clone(),
                    status: DeliveryStatus::Queued,
                    reason: None,
                    provider: None,
                    attempt_count: 0,
                    attempts: Vec::new(),
                    last_error: None,
                    claim: None,
                    accepted_at: Some(n.created_at),
                    created_at: now,
                    updated_at: now,
                    sent_at: None,
                    feedback: Vec::new(),
                    complained_at: None,
                    unsubscribed_at: None,
                    seen_at: None,
                    read_at: None,
                    expire_at: None,
                })
            })
            .collect();
        total += planned.len();
        // Written together with the lane's other fan-outs of the moment.
        let queued = shared
            .fanouts
            .call(FanoutBatch {
                notification_id: notification_id.to_owned(),
                planned,
            })
            .await?;
        publish(ctx, &queued).await?;
    }
    ctx.store.mark_fanout_done(notification_id).await?;
    tracing::info!(deliveries = total, "fan-out done");
    Ok(())
}

/// Publishes delivery jobs to their lane and waits for RabbitMQ's confirms.
pub async fn publish(ctx: &Worker, queued: &[QueuedDelivery]) -> anyhow::Result<()> {
    let exchange = &ctx.broker.names().jobs_exchange;
    let messages: Vec<Outgoing> = queued
        .iter()
        .map(|q| Outgoing {
            exchange: exchange.clone(),
            routing_key: q.lane.as_str().to_owned(),
            body: Job::Deliver {
                delivery_id: q.delivery_id.clone(),
                notification_id: q.notification_id.clone(),
            }
            .encode(),
            headers: Vec::new(),
            expiration_ms: None,
        })
        .collect();
    ctx.broker.publish_confirmed(&messages).await
}

/// Chunks a fan-out writes per transaction.
const CHUNKS_PER_WRITE: usize = 4;

/// Recipient ids merged from streams each in id order, each id once.
struct Merged {
    streams: Vec<futures::stream::BoxStream<'static, anyhow::Result<String>>>,
    heads: Vec<Option<String>>,
    last: Option<String>,
}

impl Merged {
    async fn new(
        mut streams: Vec<futures::stream::BoxStream<'static, anyhow::Result<String>>>,
    ) -> anyhow::Result<Self> {
        let mut heads = Vec::with_capacity(streams.len());
        for s in &mut streams {
            heads.push(s.try_next().await?);
        }
        Ok(Self {
            streams,
            heads,
            last: None,
        })
    }

    async fn next(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            let Some(i) = (0..self.heads.len())
                .filter(|i| self.heads[*i].is_some())
                .min_by(|a, b| self.heads[*a].cmp(&self.heads[*b]))
            else {
                return Ok(None);
            };
            let next = self.streams[i].try_next().await?;
            if next.is_some() && next < self.heads[i] {
                // Each recipient once rests on the order: never go on without it.
                anyhow::bail!("an audience stream is not in id order");
            }
            let id = std::mem::replace(&mut self.heads[i], next);
            if id.is_some() && id != self.last {
                self.last = id.clone();
                return Ok(id);
            }
        }
    }
}

/// The chunked fan-out: the audience in id order (inline ids, the group, the segment,
/// merged, each recipient once), cut into chunks of `worker.fanout_batch_size`
/// recipients written with the fan-out's progress, each published as one job. A dispatch
/// that comes back resumes after the last recipient cut and publishes again the chunks
/// not yet done.
async fn dispatch_chunks(
    ctx: &Worker,
    n: &NotificationDoc,
    channels: &[Channel],
    mut at: ChunkResume,
) -> anyhow::Result<()> {
    let open = ctx.store.open_chunks(&n.id).await?;
    publish_chunks(ctx, n, &open).await?;
    if n.fanout_done {
        return Ok(());
    }
    let after = at.after_user.clone();
    let mut inline: Vec<String> = n
        .recipients
        .user_ids
        .iter()
        .filter(|u| after.as_ref().is_none_or(|a| *u > a))
        .cloned()
        .collect();
    inline.sort();
    let mut streams = vec![futures::stream::iter(inline.into_iter().map(Ok)).boxed()];
    if let Some(g) = &n.recipients.group_id {
        streams.push(
            ctx.store
                .stream_group_members(g, after.as_deref())
                .await?
                .boxed(),
        );
    }
    if let Some(seg) = &n.recipients.segment {
        streams.push(
            ctx.store
                .stream_segment(seg, after.as_deref())
                .await?
                .boxed(),
        );
    }
    let mut audience = Merged::new(streams).await?;
    let batch_size = ctx.settings.worker.fanout_batch_size;
    let mut total = 0usize;
    loop {
        let mut chunks = Vec::with_capacity(CHUNKS_PER_WRITE);
        let mut to = at.clone();
        while chunks.len() < CHUNKS_PER_WRITE {
            let mut users = Vec::with_capacity(batch_size);
            while users.len() < batch_size {
                match audience.next().await? {
                    Some(u) => users.push(u),
                    None => break,
                }
            }
            let Some(last) = users.last().cloned() else {
                break;
            };
            let now = DateTime::now();
            chunks.push(ChunkDoc {
                id: format!("{}:{:06}", n.id, to.next_seq),
                notification_id: n.id.clone(),
                event_type: n.event_type.clone(),
                priority: n.priority,
                schedule_id: n.schedule_id.clone(),
                accepted_at: Some(n.created_at),
                created_at: now,
                items: users
                    .iter()
                    .flat_map(|u| {
                        channels.iter().map(move |c| ChunkItem {
                            delivery_id: uuid::Uuid::now_v7().to_string(),
                            user_id: u.clone(),
                            channel: *c,
                        })
                    })
                    .collect(),
                claim: None,
                started: 0,
                unsent: Vec::new(),
                released_at: None,
                done: false,
                expire_at: None,
            });
            to.next_seq += 1;
            to.after_user = Some(last);
        }
        if chunks.is_empty() {
            break;
        }
        ctx.store.insert_chunks(&at, &chunks, &to).await?;
        total += chunks.iter().map(|c| c.items.len()).sum::<usize>();
        let ids: Vec<String> = chunks.into_iter().map(|c| c.id).collect();
        publish_chunks(ctx, n, &ids).await?;
        at = to;
    }
    ctx.store.mark_fanout_done(&n.id).await?;
    tracing::info!(deliveries = total, "chunked fan-out done");
    Ok(())
}

/// Publishes chunk jobs to the notification's lane and waits for RabbitMQ's confirms.
async fn publish_chunks(ctx: &Worker, n: &NotificationDoc, ids: &[String]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let exchange = &ctx.broker.names().jobs_exchange;
    let messages: Vec<Outgoing> = ids
        .iter()
        .map(|id| Outgoing {
            exchange: exchange.clone(),
            routing_key: n.priority.as_str().to_owned(),
            body: Job::DeliverChunk {
                chunk_id: id.clone(),
                notification_id: n.id.clone(),
            }
            .encode(),
            headers: Vec::new(),
            expiration_ms: None,
        })
        .collect();
    ctx.broker.publish_confirmed(&messages).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> futures::stream::BoxStream<'static, anyhow::Result<String>> {
        let owned: Vec<anyhow::Result<String>> = v.iter().map(|s| Ok((*s).to_owned())).collect();
        futures::stream::iter(owned).boxed()
    }

    #[tokio::test]
    async fn sorted_streams_merge_into_each_id_once_in_order() {
        let mut m = Merged::new(vec![
            ids(&["a", "c", "c", "f"]),
            ids(&[]),
            ids(&["b", "c", "d"]),
            ids(&["a", "f", "g"]),
        ])
        .await
        .expect("merged");
        let mut out = Vec::new();
        while let Some(id) = m.next().await.expect("next") {
            out.push(id);
        }
        assert_eq!(out, ["a", "b", "c", "d", "f", "g"]);
    }
}
