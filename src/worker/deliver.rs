//! One delivery: enrich, render, claim, send, and hand the outcome to the committer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::{self, DateTime, Document};
use serde_json::{json, Value};
use tracing::instrument;

use super::committer::Committer;
use super::Shared;
use super::Worker;
use crate::channels::{DeliveryError, Destination, OutboundMessage, Provider};
use crate::domain::preferences::{Preferences, Verdict};
use crate::domain::{Category, Channel, DeliveryStatus, Priority};
use crate::enrich::EnrichError;
use crate::store::inbox::InboxContent;
use crate::store::{
    AttemptDoc, ChunkClaim, ChunkDoc, ChunkItem, ClaimDoc, DeliveryClaim, DeliveryDoc,
    NotificationDoc, Outcome, Precondition, Retry, UserDoc,
};
use crate::templates::{Rendered, TemplateError};

/// What a delivery shares with every other delivery of its notification, loaded once.
pub struct NotificationContext {
    pub event_type: String,
    pub category: Category,
    pub payload: Value,
    pub content: Value,
}

/// A small bounded cache: a 100,000-recipient campaign loads its payload and content
/// once, even when many of its deliveries start at the same moment (single flight).
/// The least recently used notification goes first; none stays past `CACHE_TTL`.
pub struct NotificationCache {
    entries: moka::sync::Cache<String, Arc<Slot>>,
}

type Slot = tokio::sync::OnceCell<Option<Arc<NotificationContext>>>;

const CACHE_MAX: u64 = 256;
const CACHE_TTL: Duration = Duration::from_secs(600);

impl Default for NotificationCache {
    fn default() -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(CACHE_MAX)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }
}

impl NotificationCache {
    async fn get(
        &self,
        ctx: &Worker,
        id: &str,
    ) -> Result<Option<Arc<NotificationContext>>, EnrichError> {
        // One slot per id even when many ask at once: `get_with` inserts atomically.
        let slot = self.entries.get_with_by_ref(id, Arc::default);
        let loaded = slot
            .get_or_try_init(|| async {
                match ctx.store.get_notification(id).await? {
                    Some(n) => Ok::<_, EnrichError>(Some(Arc::new(load_context(ctx, &n).await?))),
                    None => Ok(None),
                }
            })
            .await?;
        Ok(loaded.clone())
    }
}

async fn load_context(
    ctx: &Worker,
    n: &NotificationDoc,
) -> Result<NotificationContext, EnrichError> {
    let content_ids: Vec<String> = n
        .payload
        .get_array("content")
        .map(|a| {
            a.iter()
                .filter_map(|v| match v {
                    bson::Bson::String(s) => Some(s.clone()),
                    bson::Bson::Int32(i) => Some(i.to_string()),
                    bson::Bson::Int64(i) => Some(i.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let contents = ctx.enricher.contents(&ctx.store, &content_ids).await?;
    Ok(NotificationContext {
        event_type: n.event_type.clone(),
        category: ctx.settings.category(n.category, &n.event_type),
        payload: to_json(&n.payload),
        content: Value::Array(contents.iter().map(to_json).collect()),
    })
}

fn to_json(d: &Document) -> Value {
    bson::Bson::Document(d.clone()).into_relaxed_extjson()
}

fn user_json(u: &UserDoc) -> Value {
    json!({
        "user_id": u.id, "email": u.email, "phone": u.phone,
        "first_name": u.first_name, "last_name": u.last_name,
        "birthday_date": u.birthday_date, "locale": u.locale, "timezone": u.timezone,
    })
}

/// A marketing delivery's one-click unsubscribe links: this event type's, and all
/// marketing's; `None` for transactional ones.
struct UnsubscribeLinks {
    this: Option<String>,
    all: Option<String>,
}

fn unsubscribe_links(
    ctx: &Worker,
    d: &DeliveryDoc,
    n: &NotificationContext,
    user: &UserDoc,
) -> UnsubscribeLinks {
    if n.category != Category::Marketing {
        return UnsubscribeLinks {
            this: None,
            all: None,
        };
    }
    UnsubscribeLinks {
        this: ctx
            .settings
            .unsubscribe_url(&d.id, &user.id, Some(&d.event_type)),
        all: ctx.settings.unsubscribe_url(&d.id, &user.id, None),
    }
}

/// The message of delivery `d` for `user`, as the worker renders it.
fn render(
    ctx: &Worker,
    d: &DeliveryDoc,
    n: &NotificationContext,
    user: &UserDoc,
    links: &UnsubscribeLinks,
) -> Result<Rendered, TemplateError> {
    // The links are null in transactional mail, so one template can serve both
    // (`{{#if unsubscribe_url}}`) under strict mode.
    let render_ctx = json!({
        "user": user_json(user),
        "payload": n.payload,
        "content": n.content,
        "event_type": n.event_type,
        "notification_id": d.notification_id,
        "unsubscribe_url": links.this,
        "unsubscribe_all_url": links.all,
    });
    ctx.templates.render(
        &d.event_type,
        d.channel,
        user.locale.as_deref(),
        &render_ctx,
    )
}

/// What delivery `d` renders to now, from the current templates and the recipient's
/// current profile (for the log's preview; nothing is stored or sent). `Ok(None)`: the
/// notification or the recipient no longer exists.
pub async fn render_now(
    ctx: &Worker,
    d: &DeliveryDoc,
) -> anyhow::Result<Option<Result<Rendered, TemplateError>>> {
    let Some(n) = ctx.store.get_notification(&d.notification_id).await? else {
        return Ok(None);
    };
    let n = load_context(ctx, &n).await.map_err(anyhow::Error::from)?;
    let local = ctx.store.get_user(&d.user_id).await?;
    let Some(user) = ctx
        .enricher
        .user(local, &d.user_id)
        .await
        .map_err(anyhow::Error::from)?
    else {
        return Ok(None);
    };
    let links = unsubscribe_links(ctx, d, &n, &user);
    Ok(Some(render(ctx, d, &n, &user, &links)))
}

fn destination(
    ctx: &Worker,
    event_type: &str,
    channel: Channel,
    u: &UserDoc,
) -> Option<Destination> {
    let present = |s: &Option<String>| s.as_ref().filter(|v| !v.trim().is_empty()).cloned();
    match channel {
        Channel::Webhook => ctx
            .settings
            .webhook
            .endpoints
            .get(event_type)
            .map(|url| Destination::Url(url.clone())),
        Channel::Email => present(&u.email).map(|address| Destination::Email {
            address,
            name: match (&u.first_name, &u.last_name) {
                (Some(f), Some(l)) => Some(format!("{f} {l}")),
                (Some(f), None) => Some(f.clone()),
                _ => None,
            },
        }),
        Channel::Sms => present(&u.phone).map(Destination::Phone),
        Channel::Push => {
            (!u.push_tokens.is_empty()).then(|| Destination::PushTokens(u.push_tokens.clone()))
        }
        Channel::InApp => Some(Destination::Inbox),
    }
}

/// The recipient's preferences applied to this delivery. High priority bypasses mutes
/// and quiet hours only for the event types `policy.bypass_event_types` names.
fn policy_verdict(ctx: &Worker, d: &DeliveryDoc, user: &UserDoc) -> Verdict {
    let prefs = match Preferences::parse(&to_json(&user.preferences)) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(problems = %crate::domain::describe(&e), "stored preferences do not parse; ignoring them");
            Preferences::default()
        }
    };
    let bypass = d.priority == Priority::High
        && ctx
            .settings
            .policy
            .bypass_event_types
            .contains(&d.event_type);
    let tz = user
        .timezone
        .as_deref()
        .and_then(|t| t.parse::<chrono_tz::Tz>().ok())
        .unwrap_or(chrono_tz::Tz::UTC);
    prefs.verdict(d.channel, &d.event_type, bypass, tz, chrono::Utc::now())
}

fn millis_since(t: DateTime) -> i64 {
    DateTime::now().timestamp_millis() - t.timestamp_millis()
}

/// Processes one delivery job. Returns once the outcome is committed (or nothing needs
/// committing); the caller acks only then.
#[instrument(skip_all, fields(delivery_id = %delivery_id, notification_id = tracing::field::Empty))]
pub async fn deliver(
    ctx: &Worker,
    shared: &Shared,
    delivery_id: &str,
    redelivered: bool,
) -> anyhow::Result<()> {
    let Some(d) = shared
        .deliveries
        .call(delivery_id.to_owned())
        .await?
        .map_err(super::Unprocessable)?
    else {
        tracing::warn!("job for an unknown delivery; dropping it");
        return Ok(());
    };
    tracing::Span::current().record("notification_id", d.notification_id.as_str());
    let from = match d.status {
        s if s.is_final() => {
            tracing::debug!(status = s.as_str(), "already final; acking without sending");
            return Ok(());
        }
        DeliveryStatus::Sending => {
            return resolve_sending(ctx, &shared.commits, &d, redelivered).await
        }
        other => other,
    };
    let message = match prepare(ctx, shared, &d).await? {
        Prepared::Send {
            destination,
            content,
            unsubscribe_url,
        } => OutboundMessage {
            delivery_id: d.id.clone(),
            destination,
            content: *content,
            unsubscribe_url,
        },
        Prepared::Decided(outcome) => return settle(ctx, &shared.commits, *outcome).await,
        Prepared::Nothing => return Ok(()),
    };
    let claim = DeliveryClaim {
        delivery_id: d.id.clone(),
        from,
        worker: ctx.instance.clone(),
    };
    let Some(attempt_id) = shared.claims.call(claim).await? else {
        tracing::debug!("another worker holds this delivery");
        return Ok(());
    };
    let claimed = Precondition::Claimed {
        attempt_id: attempt_id.clone(),
    };
    send(ctx, shared, &d, attempt_id, claimed, message).await
}

/// Processes one chunk job: claims the chunk, then sends its deliveries a window at a
/// time (once the lane has as many sends free) — each window marked on the chunk
/// before its sends — and writes each record once, with its outcome. A chunk resumed
/// after a stopped worker goes on after what it had started, first trying again what
/// had failed before its provider call. Returns once every outcome is committed and the
/// chunk marked done; the caller acks only then.
#[instrument(skip_all, fields(chunk_id = %chunk_id))]
pub async fn deliver_chunk(
    ctx: &Worker,
    shared: &Shared,
    chunk_id: &str,
    redelivered: bool,
) -> anyhow::Result<()> {
    let (chunk, attempt_id) = match ctx.store.claim_chunk(chunk_id, &ctx.instance).await? {
        ChunkClaim::Claimed { chunk, attempt_id } => (chunk, attempt_id),
        ChunkClaim::Nothing => return Ok(()),
        ChunkClaim::Held(chunk) => {
            return resolve_held_chunk(ctx, &shared.commits, &chunk, redelivered).await
        }
    };
    let start = (chunk.started as usize).min(chunk.items.len());
    // Resumed: what a stopped worker recorded is not sent again.
    let written = if start > 0 {
        let ids: Vec<String> = chunk.items.iter().map(|i| i.delivery_id.clone()).collect();
        ctx.store.written(&ids).await?
    } else {
        Default::default()
    };
    let todo = |items: &[ChunkItem]| -> Vec<ChunkItem> {
        items
            .iter()
            .filter(|i| !written.contains(&i.delivery_id))
            .cloned()
            .collect()
    };
    let retried: Vec<ChunkItem> = todo(&chunk.items[..start])
        .into_iter()
        .filter(|i| chunk.unsent.contains(&i.delivery_id))
        .collect();
    // Every profile the chunk needs, read at once (reading sends nothing).
    let users = profiles(
        shared,
        retried.iter().chain(todo(&chunk.items[start..]).iter()),
    )
    .await?;
    for window in retried.chunks(super::CHUNK_WINDOW) {
        let ids: Vec<String> = window.iter().map(|i| i.delivery_id.clone()).collect();
        let _permits = shared.chunk_sends.acquire_many(ids.len() as u32).await?;
        if !ctx
            .store
            .retake_unsent(&chunk.id, &attempt_id, &ids)
            .await?
        {
            return Ok(());
        }
        send_window(ctx, shared, &chunk, &attempt_id, window.to_vec(), &users).await?;
    }
    for (n, window) in chunk.items[start..].chunks(super::CHUNK_WINDOW).enumerate() {
        let through = (start + (n + 1) * super::CHUNK_WINDOW).min(chunk.items.len()) as u32;
        // The lane's deliveries under way are bounded whatever the chunks' sizes.
        let _permits = shared.chunk_sends.acquire_many(window.len() as u32).await?;
        if !ctx
            .store
            .start_window(&chunk.id, &attempt_id, through)
            .await?
        {
            tracing::warn!("the chunk was resolved as stopped while this worker sent it");
            return Ok(());
        }
        send_window(ctx, shared, &chunk, &attempt_id, todo(window), &users).await?;
    }
    ctx.store.finish_chunk(&chunk.id).await
}

/// The profiles of these deliveries' recipients, read through the lane's batched read
/// (one round trip for a chunk's worth), by user id.
async fn profiles(
    shared: &Shared,
    items: impl Iterator<Item = &ChunkItem>,
) -> anyhow::Result<HashMap<String, Result<Option<UserDoc>, String>>> {
    let ids: HashSet<&str> = items.map(|i| i.user_id.as_str()).collect();
    let reads = ids.into_iter().map(|id| async move {
        let user = shared.users.call(id.to_owned()).await?;
        anyhow::Ok((id.to_owned(), user))
    });
    Ok(futures::future::try_join_all(reads)
        .await?
        .into_iter()
        .collect())
}

/// Sends one started window of a chunk. Deliveries that failed before their provider
/// call are listed on the chunk as unsent (tried again when it is resumed, never
/// `outcome_unknown`); any failure leaves the chunk claimed, so its job comes back.
async fn send_window(
    ctx: &Worker,
    shared: &Shared,
    chunk: &ChunkDoc,
    attempt_id: &str,
    items: Vec<ChunkItem>,
    users: &HashMap<String, Result<Option<UserDoc>, String>>,
) -> anyhow::Result<()> {
    let sends = items.iter().map(|item| async {
        let read = match users.get(&item.user_id) {
            Some(user) => Ok(user.clone()),
            None => shared.users.call(item.user_id.clone()).await,
        };
        deliver_unwritten(
            ctx,
            shared,
            chunk.delivery(item),
            attempt_id,
            local_user(read),
        )
        .await
    });
    let results = futures::future::join_all(sends).await;
    let mut unsent = Vec::new();
    let mut first = None;
    for (item, r) in items.iter().zip(results) {
        match r {
            Ok(()) => {}
            Err(ItemError::BeforeSend(e)) => {
                unsent.push(item.delivery_id.clone());
                first.get_or_insert(e);
            }
            Err(ItemError::AfterSend(e)) => {
                first.get_or_insert(e);
            }
        }
    }
    if !unsent.is_empty() {
        ctx.store
            .mark_unsent(&chunk.id, attempt_id, &unsent)
            .await?;
    }
    first.map_or(Ok(()), Err)
}

/// How one delivery of a chunk failed: before its provider call (nothing sent), or after.
enum ItemError {
    BeforeSend(anyhow::Error),
    AfterSend(anyhow::Error),
}

/// One delivery of a claimed chunk: decided, or sent under the chunk's attempt, and its
/// record written with the outcome.
async fn deliver_unwritten(
    ctx: &Worker,
    shared: &Shared,
    d: DeliveryDoc,
    attempt_id: &str,
    user: anyhow::Result<Option<UserDoc>>,
) -> Result<(), ItemError> {
    // Each send of a high-lane chunk is at work on its own (its provider call is not).
    let _at_work = shared.gate.job();
    let unwritten = Precondition::Unwritten(Box::new(d.clone()));
    match prepare_for(ctx, shared, &d, user)
        .await
        .map_err(ItemError::BeforeSend)?
    {
        Prepared::Send {
            destination,
            content,
            unsubscribe_url,
        } => {
            let message = OutboundMessage {
                delivery_id: d.id.clone(),
                destination,
                content: *content,
                unsubscribe_url,
            };
            send(ctx, shared, &d, attempt_id.to_owned(), unwritten, message)
                .await
                .map_err(ItemError::AfterSend)
        }
        Prepared::Decided(mut outcome) => {
            outcome.precondition = unwritten;
            settle(ctx, &shared.commits, *outcome)
                .await
                .map_err(ItemError::BeforeSend)
        }
        Prepared::Nothing => Ok(()),
    }
}

/// A chunk found claimed by another attempt, resolved like a `sending` delivery
/// ([`resolve_sending`]): left alone while its worker may still be at it; else its
/// started deliveries without a record are recorded `failed` / `outcome_unknown`, and the
/// job comes back to send the rest.
async fn resolve_held_chunk(
    ctx: &Worker,
    committer: &Committer,
    chunk: &ChunkDoc,
    redelivered: bool,
) -> anyhow::Result<()> {
    let Some(claim) = &chunk.claim else {
        return Ok(());
    };
    let w = &ctx.settings.worker;
    let age = millis_since(claim.claimed_at);
    if age <= w.claim_timeout_secs * 1000 {
        if !redelivered {
            tracing::debug!("chunk is being sent by another worker");
            return Ok(());
        }
        if age <= w.redelivery_grace_secs * 1000 {
            return Err(super::Later(format!(
                "chunk claimed {age} ms ago by {}; waiting for it to finish",
                claim.worker
            ))
            .into());
        }
    }
    if recover_chunk(
        ctx,
        committer,
        chunk,
        "its job came back while it was being sent",
    )
    .await?
    {
        return Err(super::Later("a stopped worker's chunk, resumed".to_owned()).into());
    }
    Ok(())
}

/// Records each started delivery of a chunk whose worker stopped that has no record
/// (and did not fail before its provider call) as `failed` / `outcome_unknown`, never
/// re-sent. Then the chunk is done, or, with deliveries left to send, released for
/// another claim (`true`: it needs a job).
pub(super) async fn recover_chunk(
    ctx: &Worker,
    committer: &Committer,
    chunk: &ChunkDoc,
    found: &str,
) -> anyhow::Result<bool> {
    let Some(claim) = &chunk.claim else {
        // Released earlier and its job lost: it needs one.
        return Ok(true);
    };
    let started = (chunk.started as usize).min(chunk.items.len());
    let ids: Vec<String> = chunk.items[..started]
        .iter()
        .map(|i| i.delivery_id.clone())
        .collect();
    let written = ctx.store.written(&ids).await?;
    let missing: Vec<&ChunkItem> = chunk.items[..started]
        .iter()
        .filter(|i| !written.contains(&i.delivery_id) && !chunk.unsent.contains(&i.delivery_id))
        .collect();
    if !missing.is_empty() {
        tracing::warn!(worker = %claim.worker, count = missing.len(), "chunk left claimed by a stopped worker; recording outcome_unknown");
    }
    let outcomes = missing.into_iter().map(|item| {
        let d = chunk.delivery(item);
        let mut o = outcome_unknown(&d, claim, found);
        o.precondition = Precondition::Unwritten(Box::new(d));
        committer.call(o)
    });
    futures::future::try_join_all(outcomes).await?;
    let rest = started < chunk.items.len() || chunk.unsent.iter().any(|id| !written.contains(id));
    if !ctx
        .store
        .end_stopped_claim(chunk, &claim.attempt_id, !rest)
        .await?
    {
        anyhow::bail!("the chunk moved on while a stopped worker's hold on it was resolved");
    }
    Ok(rest)
}

/// What a delivery comes to before any provider is called.
enum Prepared {
    /// Ready to claim and send.
    Send {
        destination: Destination,
        content: Box<Rendered>,
        /// Marketing: the one-click unsubscribe link (`List-Unsubscribe`).
        unsubscribe_url: Option<String>,
    },
    /// Decided without sending: skipped, deferred, failed to render, or retried later.
    Decided(Box<Outcome>),
    /// Nothing to record (its notification is gone).
    Nothing,
}

/// Commits an outcome, and wakes the relay when the delivery comes back later.
async fn settle(ctx: &Worker, committer: &Committer, outcome: Outcome) -> anyhow::Result<()> {
    let later = outcome.retry.is_some();
    committer.call(outcome).await?;
    if later {
        ctx.relay.wake();
    }
    Ok(())
}

/// An outcome of `d`: its new status and reason, under `precondition`; no provider,
/// attempt or retry until the caller adds them.
fn outcome_of(
    d: &DeliveryDoc,
    precondition: Precondition,
    status: DeliveryStatus,
    reason: Option<&str>,
) -> Outcome {
    Outcome {
        delivery_id: d.id.clone(),
        notification_id: d.notification_id.clone(),
        channel: d.channel,
        precondition,
        status,
        reason: reason.map(str::to_owned),
        provider: None,
        attempt: None,
        retry: None,
        inbox: None,
    }
}

/// An outcome of `d` decided before any provider call.
fn unclaimed(d: &DeliveryDoc, status: DeliveryStatus, reason: &str) -> Outcome {
    outcome_of(d, Precondition::Unclaimed, status, Some(reason))
}

/// The recipient and the notification (enriched), the address, the recipient's
/// preferences and the rendered message: everything a send needs, or why there is none.
async fn prepare(ctx: &Worker, shared: &Shared, d: &DeliveryDoc) -> anyhow::Result<Prepared> {
    let local = local_user(shared.users.call(d.user_id.clone()).await);
    prepare_for(ctx, shared, d, local).await
}

/// A profile as the lane's batched read answered it.
fn local_user(
    read: anyhow::Result<Result<Option<UserDoc>, String>>,
) -> anyhow::Result<Option<UserDoc>> {
    read.and_then(|u| u.map_err(|e| anyhow::Error::new(super::Unprocessable(e))))
}

/// [`prepare`] with the recipient's profile already read (`local`).
async fn prepare_for(
    ctx: &Worker,
    shared: &Shared,
    d: &DeliveryDoc,
    local: anyhow::Result<Option<UserDoc>>,
) -> anyhow::Result<Prepared> {
    let enriched = match shared.notifications.get(ctx, &d.notification_id).await {
        Ok(n) => match local {
            Ok(local) => {
                let remote = local.is_none();
                ctx.enricher
                    .user(local, &d.user_id)
                    .await
                    .map(|user| (n, user, remote))
            }
            Err(e) => Err(EnrichError::Store(e)),
        },
        Err(e) => Err(e),
    };
    let (n, user, remote) = match enriched {
        Ok(found) => found,
        Err(EnrichError::Store(e)) => return Err(e),
        Err(EnrichError::Unavailable(why)) => {
            // The source is down: come back later, with backoff, without spending an attempt.
            tracing::warn!(reason = %why, "enrichment unavailable; retrying later");
            let mut later = unclaimed(d, DeliveryStatus::Retrying, "enrichment_unavailable");
            later.retry = Some(backoff(ctx, d.attempt_count + 1, d.priority, None));
            return Ok(Prepared::Decided(Box::new(later)));
        }
    };
    let Some(n) = n else {
        tracing::warn!("delivery of an unknown notification; dropping it");
        return Ok(Prepared::Nothing);
    };
    let skipped = |reason| {
        let outcome = unclaimed(d, DeliveryStatus::Skipped, reason);
        Ok(Prepared::Decided(Box::new(outcome)))
    };
    let Some(mut user) = user else {
        return skipped("unknown_user");
    };
    if remote {
        // A profile from the enrichment service was not in the batch's read.
        super::mark_one(&ctx.store, &mut user).await?;
    }
    let Some(destination) = destination(ctx, &d.event_type, d.channel, &user) else {
        return skipped("no_address");
    };
    if user.suppressed.contains(&d.channel) {
        return skipped("suppressed");
    }
    if n.category == Category::Marketing && user.unsubscribed_from(&d.event_type).is_some() {
        return skipped("unsubscribed");
    }
    match policy_verdict(ctx, d, &user) {
        Verdict::Send => {}
        Verdict::Skip(reason) => return skipped(reason),
        Verdict::DeferUntil(until) => {
            let mut deferred = unclaimed(d, DeliveryStatus::Deferred, "quiet_hours");
            deferred.retry = Some(Retry {
                delay_ms: 0,
                retry_number: 0,
                lane: d.priority,
                not_before: Some(crate::store::bson_time(until)),
            });
            return Ok(Prepared::Decided(Box::new(deferred)));
        }
    }
    let links = unsubscribe_links(ctx, d, &n, &user);
    match render(ctx, d, &n, &user, &links) {
        Ok(Rendered::InApp {
            title,
            body,
            url,
            data,
        }) => match data.map(|m| bson::to_document(&m)).transpose() {
            Ok(data) => Ok(Prepared::Decided(Box::new(into_inbox(
                d,
                InboxContent {
                    title,
                    body,
                    url,
                    data,
                },
            )))),
            Err(e) => Ok(Prepared::Decided(Box::new(render_failed(
                d,
                &TemplateError::Render {
                    name: format!("{}/in_app.data", d.event_type),
                    reason: format!("in_app.data cannot be stored: {e}"),
                },
            )))),
        },
        Ok(content) => Ok(Prepared::Send {
            destination,
            content: Box::new(content),
            unsubscribe_url: links.this,
        }),
        Err(e) => Ok(Prepared::Decided(Box::new(render_failed(d, &e)))),
    }
}

/// A delivery whose message does not render: `failed` with the template's reason.
fn render_failed(d: &DeliveryDoc, e: &TemplateError) -> Outcome {
    let now = DateTime::now();
    let mut failed = unclaimed(d, DeliveryStatus::Failed, e.reason());
    failed.attempt = Some(AttemptDoc {
        attempt_id: uuid::Uuid::new_v4().to_string(),
        provider: None,
        started_at: now,
        finished_at: now,
        duration_ms: 0,
        status: DeliveryStatus::Failed,
        error: Some(e.to_string()),
        response: None,
    });
    failed
}

/// An in-app delivery is sent by writing its inbox item, in its outcome's transaction:
/// no provider, no claim (the outcome's precondition guards it like any decision).
fn into_inbox(d: &DeliveryDoc, content: InboxContent) -> Outcome {
    let now = DateTime::now();
    Outcome {
        provider: Some(INBOX_PROVIDER.to_owned()),
        attempt: Some(AttemptDoc {
            attempt_id: uuid::Uuid::new_v4().to_string(),
            provider: Some(INBOX_PROVIDER.to_owned()),
            started_at: now,
            finished_at: now,
            duration_ms: 0,
            status: DeliveryStatus::Sent,
            error: None,
            response: None,
        }),
        inbox: Some(Box::new(content)),
        ..outcome_of(d, Precondition::Unclaimed, DeliveryStatus::Sent, None)
    }
}

/// The provider name in-app deliveries are recorded under.
pub const INBOX_PROVIDER: &str = "inbox";

/// Calls the channel's providers under the claim `attempt_id` and commits what they
/// answered, with the attempt.
async fn send(
    ctx: &Worker,
    shared: &Shared,
    d: &DeliveryDoc,
    attempt_id: String,
    claim: Precondition,
    message: OutboundMessage,
) -> anyhow::Result<()> {
    // SMS is length-checked: the log says how many segments it cost.
    let segments = match &message.content {
        Rendered::Sms { text } => Some(crate::templates::sms_segments(text) as i32),
        _ => None,
    };
    let Some(provider) = ctx.channels.provider(d.channel) else {
        anyhow::bail!("no provider sends {} messages", d.channel);
    };
    let started_at = DateTime::now();
    let clock = Instant::now();
    // The lower lanes need not wait while a high-priority job waits for its provider.
    let away = shared.gate.away();
    let result = provider.send(&message).await;
    drop(away);
    let duration_ms = clock.elapsed().as_millis() as i64;
    let dead_tokens = match &result {
        Ok(r) => r.invalid_tokens.as_slice(),
        Err(e) => e.invalid_tokens(),
    };
    if !dead_tokens.is_empty() {
        tracing::info!(
            count = dead_tokens.len(),
            "removing push tokens the provider called dead"
        );
        ctx.store
            .remove_push_tokens(&d.user_id, dead_tokens)
            .await?;
    }
    let attempt_number = d.attempt_count + 1;
    if let Err(DeliveryError::CircuitOpen { retry_after, .. }) = &result {
        // Nothing was sent nor attempted: the delivery waits for the soonest trial (or,
        // while one is under way, a backoff) without spending an attempt, so an outage
        // longer than its attempts' backoff does not turn it dead unsent.
        tracing::debug!(wait = ?retry_after, "every provider's circuit breaker is open");
        let waits = Outcome {
            retry: Some(backoff(ctx, attempt_number, d.priority, *retry_after)),
            ..outcome_of(d, claim, DeliveryStatus::Retrying, Some("circuit_open"))
        };
        return settle(ctx, &shared.commits, waits).await;
    }
    let answered = answer(ctx, d, attempt_number, result, segments);
    let outcome = Outcome {
        reason: answered.reason,
        provider: Some(answered.provider.clone()),
        attempt: Some(AttemptDoc {
            attempt_id,
            provider: Some(answered.provider),
            started_at,
            finished_at: DateTime::now(),
            duration_ms,
            status: answered.status,
            error: answered.error,
            response: answered.response,
        }),
        retry: answered.retry,
        ..outcome_of(d, claim, answered.status, None)
    };
    settle(ctx, &shared.commits, outcome).await
}

/// What a provider's answer makes of a delivery.
struct Answered {
    status: DeliveryStatus,
    reason: Option<String>,
    provider: String,
    error: Option<String>,
    response: Option<Document>,
    retry: Option<Retry>,
}

/// A provider's answer as the delivery's new status: `sent`; `retrying` while attempts
/// are left for a transient failure; else `dead` (retries exhausted) or `failed`
/// (rejected, or an unknown outcome, which is never sent again blindly).
fn answer(
    ctx: &Worker,
    d: &DeliveryDoc,
    attempt_number: i32,
    result: Result<crate::channels::Receipt, DeliveryError>,
    segments: Option<i32>,
) -> Answered {
    match result {
        Ok(mut r) => {
            if let Some(n) = segments {
                r.response.insert("segments", n);
            }
            Answered {
                status: DeliveryStatus::Sent,
                reason: None,
                provider: r.provider,
                error: None,
                response: Some(r.response),
                retry: None,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, attempt = attempt_number, "provider failed");
            let (status, reason, retry) = match next_attempt(ctx, d, attempt_number, &e) {
                Some(retry) => (
                    DeliveryStatus::Retrying,
                    "provider_unavailable",
                    Some(retry),
                ),
                None => match e {
                    DeliveryError::Transient { .. } | DeliveryError::CircuitOpen { .. } => {
                        (DeliveryStatus::Dead, "retries_exhausted", None)
                    }
                    DeliveryError::Unknown { .. } => {
                        (DeliveryStatus::Failed, "outcome_unknown", None)
                    }
                    DeliveryError::Permanent { .. } => {
                        (DeliveryStatus::Failed, "provider_rejected", None)
                    }
                },
            };
            Answered {
                status,
                reason: Some(reason.to_owned()),
                provider: e.provider().to_owned(),
                error: Some(e.message().to_owned()),
                response: None,
                retry,
            }
        }
    }
}

/// The retry of a transient failure, if attempts are left: exponential backoff from
/// `worker.retry_base_ms`, capped, spread by `worker.retry_jitter`, never sooner than
/// the provider's `Retry-After`.
fn next_attempt(
    ctx: &Worker,
    d: &DeliveryDoc,
    attempt_number: i32,
    e: &DeliveryError,
) -> Option<Retry> {
    let w = &ctx.settings.worker;
    if !e.is_transient() || attempt_number >= w.max_attempts as i32 {
        return None;
    }
    Some(backoff(ctx, attempt_number, d.priority, e.retry_after()))
}

/// Exponential backoff for the `n`th retry, capped and spread by jitter, never sooner
/// than `at_least` (a provider's `Retry-After`, an open breaker's cool-down). A wait
/// longer than the backoff goes through the outbox's `due_at` rather than the retry's
/// delay queue, where it would hold up the backoff-sized waits behind it (RabbitMQ
/// expires messages only at a queue's head).
fn backoff(ctx: &Worker, n: i32, lane: Priority, at_least: Option<std::time::Duration>) -> Retry {
    let w = &ctx.settings.worker;
    let exp = w.retry_base_ms.saturating_mul(1u64 << (n - 1).clamp(0, 30));
    let spread = 1.0 + w.retry_jitter * (rand::random::<f64>() * 2.0 - 1.0);
    let delay = (((exp.min(w.retry_max_ms) as f64) * spread) as u64).clamp(1, w.retry_max_ms);
    let not_before = at_least
        .map(|d| d.as_millis() as u64)
        .filter(|&wait| wait > delay)
        .map(|wait| {
            let until = chrono::Utc::now() + chrono::Duration::milliseconds(wait as i64);
            crate::store::bson_time(until)
        });
    Retry {
        delay_ms: if not_before.is_some() {
            0
        } else {
            delay as i64
        },
        retry_number: n,
        lane,
        not_before,
    }
}

/// A delivery found `sending`: its worker may have died between the provider call and
/// the commit. Re-sending blindly could send twice, so it is recorded `failed` with
/// `outcome_unknown` (visible, replayable) — once the claim is older than the claim
/// timeout, or, for a job RabbitMQ redelivered (its consumer's channel is gone), older
/// than the redelivery grace; younger, the claiming worker may only have lost its channel
/// and still be finishing, so the job waits ([`super::Later`]). A job not redelivered is
/// another copy while a live worker holds the delivery, and is dropped.
async fn resolve_sending(
    ctx: &Worker,
    committer: &super::committer::Committer,
    d: &DeliveryDoc,
    redelivered: bool,
) -> anyhow::Result<()> {
    let Some(claim) = &d.claim else {
        return Ok(());
    };
    let w = &ctx.settings.worker;
    let age = millis_since(claim.claimed_at);
    if age <= w.claim_timeout_secs * 1000 {
        if !redelivered {
            tracing::debug!("delivery is being sent by another worker");
            return Ok(());
        }
        if age <= w.redelivery_grace_secs * 1000 {
            return Err(super::Later(format!(
                "delivery claimed {age} ms ago by {}; waiting for it to finish",
                claim.worker
            ))
            .into());
        }
    }
    tracing::warn!(worker = %claim.worker, "delivery left `sending` by a stopped worker; recording outcome_unknown");
    committer
        .call(outcome_unknown(
            d,
            claim,
            "its job came back while it was `sending`",
        ))
        .await
}

/// The outcome of a delivery whose worker stopped between the provider call and the
/// commit: `failed`/`outcome_unknown`, under that worker's claim. `found` says how it
/// was found (the job returned, or the sweep), for whoever reads the attempt.
pub(super) fn outcome_unknown(d: &DeliveryDoc, claim: &ClaimDoc, found: &str) -> Outcome {
    let precondition = Precondition::Claimed {
        attempt_id: claim.attempt_id.clone(),
    };
    Outcome {
        attempt: Some(AttemptDoc {
            attempt_id: claim.attempt_id.clone(),
            provider: None,
            started_at: claim.claimed_at,
            finished_at: DateTime::now(),
            duration_ms: millis_since(claim.claimed_at),
            status: DeliveryStatus::Failed,
            error: Some(format!(
                "{found}: worker {} stopped between the provider call and recording its outcome; not re-sent",
                claim.worker
            )),
            response: None,
        }),
        ..outcome_of(d, precondition, DeliveryStatus::Failed, Some("outcome_unknown"))
    }
}
