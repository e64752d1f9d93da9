//! Status webhooks on the wire: a relay publishes due messages to RabbitMQ, and senders sign (Standard Webhooks), post and record each try, with the specification's retry schedule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::batch::Batcher;
use crate::channels::http::{bounded_body, check_target, client, retry_after};
use crate::config::StatusWebhookSettings;
use crate::domain::standard_webhooks::{headers, SigningKey};
use crate::metrics::{Metrics, ResultLabels};
use crate::queue::{Broker, Disposition, Incoming, Outgoing};
use crate::store::webhook_endpoints::EndpointDoc;
use crate::store::webhook_messages::{HookAttemptDoc, HookMessageDoc, Next};
use crate::store::Store;

/// How long a try waits for a place at a busy endpoint before its message is put back.
const SLOT_WAIT: Duration = Duration::from_millis(250);
/// How long a busy endpoint's message waits before it is tried again (untried).
const BUSY_WAIT_MS: i64 = 1000;
/// The most of an answer kept with a try.
const RESPONSE_CHARS: usize = 200;

/// What the relay publishes: a message, and the relay batch that leased it.
#[derive(Serialize, Deserialize)]
struct Ticket {
    id: String,
    lease: String,
}

/// One try's result.
struct Answer {
    status_code: Option<u16>,
    error: Option<String>,
    response: String,
    retry_after: Option<Duration>,
}

/// What an answer means for the message and its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Any 2xx.
    Delivered,
    /// 410: the endpoint is gone.
    Gone,
    /// Anything else, no answer included.
    Failed,
}

impl Answer {
    fn verdict(&self) -> Verdict {
        match self.status_code {
            Some(c) if (200..300).contains(&c) => Verdict::Delivered,
            Some(410) => Verdict::Gone,
            _ => Verdict::Failed,
        }
    }
}

/// The relay and the senders of one process.
#[derive(Clone)]
pub struct Hooks {
    store: Store,
    broker: Arc<Broker>,
    settings: Arc<StatusWebhookSettings>,
    client: reqwest::Client,
    allow_internal: bool,
    metrics: Arc<Metrics>,
    /// Tries in flight per endpoint, in this process.
    busy: Arc<Busy>,
    /// Concurrent senders' reads, and their records, share round trips.
    messages: Batcher<(String, String), Option<HookMessageDoc>>,
    records: Batcher<(HookAttemptDoc, String, Next), bool>,
}

/// The most reads or records sharing one round trip.
const BATCH_MAX: usize = 64;

/// An endpoint's place among the tries in flight; given back when dropped.
struct Slot {
    busy: Arc<Busy>,
    endpoint: String,
}

/// Tries in flight per endpoint in this process, and what a freed place wakes.
#[derive(Default)]
struct Busy {
    counts: Mutex<HashMap<String, usize>>,
    freed: tokio::sync::Notify,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut busy = self.busy.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(&self.endpoint) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.endpoint);
            }
        }
        drop(busy);
        self.busy.freed.notify_waiters();
    }
}

impl Hooks {
    pub fn new(
        store: Store,
        broker: Arc<Broker>,
        settings: &StatusWebhookSettings,
        allow_internal: bool,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let reader = store.clone();
        let (messages, _) = Batcher::start("webhook reads", BATCH_MAX, move |tickets| {
            let store = reader.clone();
            async move { store.leased_hook_messages(&tickets).await }
        });
        let recorder = store.clone();
        let (records, _) = Batcher::start("webhook records", BATCH_MAX, move |tries: Vec<_>| {
            let store = recorder.clone();
            async move { store.record_hook_attempts(&tries).await }
        });
        Ok(Self {
            messages,
            records,
            store,
            broker,
            client: client(Duration::from_millis(settings.timeout_ms), allow_internal)?,
            settings: Arc::new(settings.clone()),
            allow_internal,
            metrics,
            busy: Arc::default(),
        })
    }

    /// Runs the relay and the senders until cancelled.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let queue = self.broker.names().webhooks_queue.clone();
        let sender = self.clone();
        let consume = Arc::clone(&self.broker).consume(
            queue,
            self.settings.concurrency.max(1),
            cancel.clone(),
            move |m| sender.clone().handle(m),
        );
        tokio::join!(self.relay(cancel.clone()), consume);
        Ok(())
    }

    /// Publishes due messages until cancelled: woken by messages written in this process,
    /// polling for the others and for retries coming due.
    async fn relay(&self, cancel: CancellationToken) {
        let poll = Duration::from_millis(self.settings.poll_interval_ms.max(10));
        // Enough waiting in RabbitMQ to keep the senders busy: leasing more would only let
        // leases run out in the queue (their copies are then dropped at the claim).
        let enough = i64::from(self.settings.concurrency.max(1)) * 2;
        let batch = self.settings.batch_size.clamp(1, enough);
        let mut wait = poll;
        let mut published = 0;
        loop {
            // The queue is looked at only while this relay has been filling it.
            let full = published > 0
                && match self
                    .broker
                    .queue_depth(&self.broker.names().webhooks_queue)
                    .await
                {
                    Ok(depth) => i64::from(depth) >= enough,
                    Err(_) => false,
                };
            let relayed = if full {
                Ok(0)
            } else {
                self.relay_once(batch).await
            };
            // While the queue is full, go on looking at it until it has room again.
            if !full {
                published = *relayed.as_ref().unwrap_or(&0);
            }
            match relayed {
                Ok(n) if n as i64 >= batch => continue,
                Ok(_) => wait = poll,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "status webhook relay failed; messages wait"
                    );
                    wait = (wait * 2).min(self.broker.reconnect_max().max(poll));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.store.hook_wake().notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Leases one batch of due messages and publishes them with confirms; on failure
    /// gives the batch back.
    async fn relay_once(&self, batch: i64) -> anyhow::Result<usize> {
        let lease = Duration::from_secs(self.settings.lease_secs.max(1));
        let (token, ids) = self.store.lease_hook_messages(batch, lease).await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let queue = &self.broker.names().webhooks_queue;
        let messages: Vec<Outgoing> = ids
            .iter()
            .map(|id| Outgoing {
                exchange: String::new(),
                routing_key: queue.clone(),
                body: serde_json::to_vec(&Ticket {
                    id: id.clone(),
                    lease: token.clone(),
                })
                .unwrap_or_default(),
                headers: Vec::new(),
                expiration_ms: None,
            })
            .collect();
        if let Err(e) = self.broker.publish_confirmed(&messages).await {
            if let Err(release) = self.store.release_hook_messages(&token).await {
                tracing::warn!(
                    error = format!("{release:#}"),
                    "could not release status webhook messages; they wait for their lease"
                );
            }
            return Err(e);
        }
        Ok(ids.len())
    }

    /// One published message: tried once, whatever happens, and acknowledged. A try
    /// whose record fails comes back when its lease ends (the same `webhook-id`).
    async fn handle(self, m: Incoming) -> Disposition {
        let Ok(ticket) = serde_json::from_slice::<Ticket>(&m.body) else {
            tracing::warn!("a status webhook ticket that is not JSON; dropped");
            return Disposition::Ack;
        };
        if let Err(e) = self.deliver(&ticket).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "a status webhook try could not be recorded; it comes back after its lease"
            );
        }
        Disposition::Ack
    }

    async fn deliver(&self, ticket: &Ticket) -> anyhow::Result<()> {
        let Some(msg) = self
            .messages
            .call((ticket.id.clone(), ticket.lease.clone()))
            .await?
        else {
            // Tried already through another copy, or replayed or retried meanwhile.
            return Ok(());
        };
        // The relay batch's lease holds it for this try (`status_webhooks.lease_secs`).
        let token = ticket.lease.as_str();
        let Some(endpoint) = self.store.endpoint_cached(&msg.endpoint_id).await? else {
            return self
                .store
                .fail_hook_message(&msg.id, token, "endpoint deleted")
                .await;
        };
        if !endpoint.enabled {
            return self
                .store
                .fail_hook_message(&msg.id, token, "endpoint disabled")
                .await;
        }
        let Some(_slot) = self.slot(&endpoint.id).await else {
            let later = DateTime::from_millis(DateTime::now().timestamp_millis() + BUSY_WAIT_MS);
            return self
                .store
                .postpone_hook_message(&msg.id, token, later)
                .await;
        };
        let at = DateTime::now();
        let started = Instant::now();
        let answer = self.post(&endpoint, &msg).await;
        let took = started.elapsed();
        let next = self.next(&msg, &answer, at);
        let attempt = HookAttemptDoc {
            id: format!("att_{}", uuid::Uuid::now_v7().simple()),
            endpoint_id: endpoint.id.clone(),
            message_id: msg.id.clone(),
            kind: msg.kind.clone(),
            at,
            status_code: answer.status_code.map(i32::from),
            duration_ms: took.as_millis() as i64,
            error: answer.error.clone(),
            response: answer.response.clone(),
            expire_at: msg.expire_at,
        };
        if !self.records.call((attempt, token.to_owned(), next)).await? {
            return Ok(());
        }
        let result = match next {
            Next::Delivered => "delivered",
            Next::RetryAt(_) => "retrying",
            Next::Failed => "failed",
        };
        self.metrics
            .status_webhooks
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
        self.account(&endpoint, &answer, at).await
    }

    /// Takes a place for a try to `endpoint`, waiting up to [`SLOT_WAIT`] for one when it
    /// has all it may have (a fast endpoint's places free up within it; a slow one's
    /// message is put back rather than hold the sender).
    async fn slot(&self, endpoint: &str) -> Option<Slot> {
        let deadline = tokio::time::Instant::now() + SLOT_WAIT;
        loop {
            let freed = self.busy.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.try_slot(endpoint) {
                return Some(slot);
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    fn try_slot(&self, endpoint: &str) -> Option<Slot> {
        let mut busy = self.busy.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = busy.entry(endpoint.to_owned()).or_default();
        if *n >= self.settings.per_endpoint_concurrency.max(1) {
            return None;
        }
        *n += 1;
        Some(Slot {
            busy: self.busy.clone(),
            endpoint: endpoint.to_owned(),
        })
    }

    /// Signs and posts the message's body.
    async fn post(&self, endpoint: &EndpointDoc, msg: &HookMessageDoc) -> Answer {
        let refused = |error: String| Answer {
            status_code: None,
            error: Some(error),
            response: String::new(),
            retry_after: None,
        };
        let url = match reqwest::Url::parse(&endpoint.url) {
            Ok(u) => u,
            Err(e) => return refused(format!("invalid URL: {e}")),
        };
        if let Err(e) = check_target(&url, self.allow_internal) {
            return refused(format!("target refused: {e}"));
        }
        let keys: Vec<SigningKey> = endpoint
            .signing_secrets(DateTime::now())
            .into_iter()
            .filter_map(|s| SigningKey::parse(s).ok())
            .collect();
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("herald/", env!("CARGO_PKG_VERSION")));
        for (name, value) in headers(&keys, &msg.id, timestamp, msg.body.as_bytes()) {
            request = request.header(name, value);
        }
        let response = match request.body(msg.body.clone()).send().await {
            Ok(r) => r,
            Err(e) => {
                let e = e.without_url();
                let error = if e.is_timeout() {
                    format!("no answer within {} ms", self.settings.timeout_ms)
                } else if e.is_connect() {
                    format!("could not connect: {e}")
                } else {
                    format!("request failed: {e}")
                };
                return refused(error);
            }
        };
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = bounded_body(response, self.settings.max_response_bytes).await;
        let text: String = String::from_utf8_lossy(&body)
            .chars()
            .take(RESPONSE_CHARS)
            .collect();
        Answer {
            status_code: Some(status.as_u16()),
            error: (!status.is_success()).then(|| {
                if status.is_redirection() {
                    format!("HTTP {} (redirects are not followed)", status.as_u16())
                } else {
                    format!("HTTP {}", status.as_u16())
                }
            }),
            response: text,
            retry_after: wait,
        }
    }

    /// What becomes of a message after a try: delivered on 2xx; failed on 410 or after
    /// the last retry; otherwise the next delay of the schedule, with up to 20 % jitter,
    /// or the endpoint's `Retry-After` when longer (never past the schedule's longest).
    fn next(&self, msg: &HookMessageDoc, a: &Answer, at: DateTime) -> Next {
        match a.verdict() {
            Verdict::Delivered => return Next::Delivered,
            Verdict::Gone => return Next::Failed,
            Verdict::Failed => {}
        }
        let delays = &self.settings.retry_delays_ms;
        let Some(&delay) = delays.get(msg.attempts.max(0) as usize) else {
            return Next::Failed;
        };
        let jittered = delay as f64 * (1.0 + rand::random::<f64>() * 0.2);
        let longest = delays.iter().copied().max().unwrap_or(0) as f64;
        let asked = a
            .retry_after
            .map_or(0.0, |d| d.as_millis() as f64)
            .min(longest);
        let wait = jittered.max(asked) as i64;
        Next::RetryAt(DateTime::from_millis(at.timestamp_millis() + wait))
    }

    /// The endpoint's standing after a try: 410 disables it; a success clears its
    /// failing streak; a failure past `disable_after_hours` of nothing but failures
    /// disables it, with the reason.
    async fn account(
        &self,
        endpoint: &EndpointDoc,
        a: &Answer,
        at: DateTime,
    ) -> anyhow::Result<()> {
        match a.verdict() {
            Verdict::Delivered => {
                if endpoint.failing_since.is_some() {
                    self.store.endpoint_recovered(&endpoint.id).await?;
                }
                Ok(())
            }
            Verdict::Gone => {
                if self
                    .store
                    .disable_endpoint(&endpoint.id, "the endpoint answered 410 Gone")
                    .await?
                {
                    tracing::warn!(endpoint_id = %endpoint.id, "status webhook endpoint answered 410 Gone; disabled");
                }
                Ok(())
            }
            Verdict::Failed => {
                let since = self.store.endpoint_failing(&endpoint.id, at).await?;
                let limit = (self.settings.disable_after_hours * 3_600_000.0) as i64;
                if at.timestamp_millis() - since.timestamp_millis() < limit {
                    return Ok(());
                }
                let reason = format!(
                    "every try failed since {}",
                    crate::store::chrono_time(since)
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                if self.store.disable_endpoint(&endpoint.id, &reason).await? {
                    tracing::warn!(endpoint_id = %endpoint.id, reason, "status webhook endpoint disabled");
                }
                Ok(())
            }
        }
    }
}
