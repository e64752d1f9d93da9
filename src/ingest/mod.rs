//! Accepting an event — one code path for REST and the `herald.events` exchange — and a
//! campaign's definition (`schedule`), which an event can also create.

pub mod schedule;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use tokio::sync::Notify;

use crate::batch::Batcher;
use crate::config::EventSettings;
use crate::domain::event::{parse_event, EventError, EventLimits, NewEvent};
use crate::domain::{FieldError, Priority};
use crate::metrics::Metrics;
use crate::outbox::Relay;
use crate::queue::{Broker, Disposition, Incoming};
use crate::store::{
    new_notification, payload_document, Accepted, NotificationDoc, NotificationSpec, OutboxDoc,
    RecipientsDoc, ScheduleDoc, Store,
};
use crate::templates::Templates;
use schedule::ScheduleError;

/// At most this many accepted events share one transaction.
const INTAKE_BATCH_MAX: usize = 256;

/// A backlog reading is reused for this long, so a burst of requests costs one look.
const BACKLOG_FRESH: Duration = Duration::from_millis(500);
/// How long the lanes' depths may take to read: requests wait for the reading.
const LANES_READ_WITHIN: Duration = Duration::from_secs(1);

/// How much delivery work waits — jobs ready on the three lanes plus outbox entries not
/// yet relayed — as this process last read it.
#[derive(Default)]
struct Backlog(tokio::sync::Mutex<Option<(Instant, u64)>>);

impl Backlog {
    /// The current backlog (at most `BACKLOG_FRESH` old). A part that cannot be read, or
    /// not within `LANES_READ_WITHIN`, counts as empty: an unreachable RabbitMQ is the
    /// outbox's job, not a reason to refuse.
    async fn current(&self, store: &Store, broker: &Broker) -> u64 {
        let mut cached = self.0.lock().await;
        if let Some((at, n)) = *cached {
            if at.elapsed() < BACKLOG_FRESH {
                return n;
            }
        }
        let lanes = async {
            let mut n = 0;
            for p in [Priority::High, Priority::Normal, Priority::Low] {
                let lane = broker.names().lane(p);
                n += u64::from(broker.queue_depth(lane).await.unwrap_or(0));
            }
            n
        };
        let n = store.outbox_backlog().await.unwrap_or(0)
            + tokio::time::timeout(LANES_READ_WITHIN, lanes)
                .await
                .unwrap_or(0);
        *cached = Some((Instant::now(), n));
        n
    }
}

/// Why an otherwise well-formed event was refused.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("group `{0}` does not exist")]
    UnknownGroup(String),
    #[error("{}", crate::domain::describe(.0))]
    Invalid(Vec<FieldError>),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl AcceptError {
    pub fn code(&self) -> &'static str {
        match self {
            AcceptError::UnknownGroup(_) => "unknown_group",
            AcceptError::Invalid(_) => "validation_failed",
            AcceptError::Schedule(e) => e.code(),
            AcceptError::Store(_) => "internal_error",
        }
    }
}

/// What an accepted event became.
#[derive(Debug)]
pub enum AcceptedAs {
    Notification(Accepted),
    /// The seed format's `schedule`: a recurring campaign (`created` false for a repeat).
    Schedule {
        schedule: Box<ScheduleDoc>,
        created: bool,
    },
}

/// The intake: what accepting an event needs, handed to the API and the exchange
/// consumer by the startup code. Concurrent accepts are group-committed: they share one
/// transaction.
#[derive(Clone)]
pub struct Intake {
    store: Store,
    broker: Arc<Broker>,
    templates: Arc<Templates>,
    relay: Relay,
    metrics: Arc<Metrics>,
    settings: EventSettings,
    backlog: Arc<Backlog>,
    commits: Batcher<(NotificationDoc, OutboxDoc), anyhow::Result<Accepted>>,
    /// Wakes this process's scheduler when an event created a schedule.
    schedule_wake: Arc<Notify>,
}

impl Intake {
    pub fn new(
        store: Store,
        broker: Arc<Broker>,
        templates: Arc<Templates>,
        relay: Relay,
        metrics: Arc<Metrics>,
        settings: &EventSettings,
        schedule_wake: Arc<Notify>,
    ) -> Self {
        let (batch_store, batch_relay) = (store.clone(), relay.clone());
        // The batching task catches a panicking round trip and lives as long as a
        // handle of this intake does, so its JoinHandle needs no watch.
        let (commits, _) = Batcher::start("intake", INTAKE_BATCH_MAX, move |batch| {
            let (store, relay) = (batch_store.clone(), batch_relay.clone());
            async move {
                let intaken = store.accept_many(batch).await?;
                relay.pass(intaken.outbox);
                Ok(intaken.answers)
            }
        });
        Self {
            store,
            broker,
            templates,
            relay,
            metrics,
            settings: settings.clone(),
            backlog: Arc::default(),
            commits,
            schedule_wake,
        }
    }

    /// The bounds an event is parsed with.
    pub fn limits(&self) -> EventLimits {
        EventLimits {
            max_payload_bytes: self.settings.max_payload_bytes,
            max_inline_recipients: self.settings.max_inline_recipients,
        }
    }

    /// `Err((waiting, bound))` while the backlog is past `events.max_backlog` (0: never).
    pub async fn admit(&self) -> Result<(), (u64, u64)> {
        let bound = self.settings.max_backlog;
        if bound == 0 {
            return Ok(());
        }
        match self.backlog.current(&self.store, &self.broker).await {
            n if n > bound => Err((n, bound)),
            _ => Ok(()),
        }
    }

    /// Accepts a validated event: a recurring one becomes a schedule; any other is written
    /// as a notification with its outbox entry in one transaction. Only after that commit
    /// may the caller answer 2xx.
    pub async fn accept_event(
        &self,
        event: NewEvent,
        source: &str,
    ) -> Result<AcceptedAs, AcceptError> {
        let Some(spec) = &event.recurring else {
            return Ok(AcceptedAs::Notification(self.accept(event, source).await?));
        };
        if let Some(id) = &event.event_id {
            if let Some(s) = self.store.schedule_by_event_id(id).await? {
                return Ok(AcceptedAs::Schedule {
                    schedule: Box::new(s),
                    created: false,
                });
            }
        }
        let input = schedule::from_event(spec, &event)?;
        schedule::check_references(&self.store, &self.templates, &input).await?;
        let doc = schedule::to_document(&input, None, event.event_id.clone(), Utc::now())?;
        Ok(match self.store.insert_schedule(&doc).await? {
            Some(original) => AcceptedAs::Schedule {
                schedule: Box::new(original),
                created: false,
            },
            None => {
                self.schedule_wake.notify_one();
                AcceptedAs::Schedule {
                    schedule: Box::new(doc),
                    created: true,
                }
            }
        })
    }

    /// Accepts a one-off event (`send_at` delays it): notification + outbox in one transaction.
    async fn accept(&self, event: NewEvent, source: &str) -> Result<Accepted, AcceptError> {
        if let Some(event_id) = &event.event_id {
            // A repeat is answered before anything else is checked or written.
            if let Some(existing) = self.store.find_notification_by_event_id(event_id).await? {
                return Ok(Accepted::Duplicate(Box::new(existing)));
            }
        }
        if let Some(group) = &event.recipients.group_id {
            if self.store.get_group(group.as_str()).await?.is_none() {
                return Err(AcceptError::UnknownGroup(group.to_string()));
            }
        }
        let payload = payload_document(&event.payload).map_err(AcceptError::Invalid)?;
        let due_at = event.send_at.filter(|t| *t > Utc::now());
        let (notification, mut outbox) = new_notification(
            NotificationSpec {
                event_id: event.event_id,
                event_type: event.event_type.to_string(),
                priority: event.priority,
                recipients: RecipientsDoc::from(&event.recipients),
                channels: event.channels,
                payload,
                source: source.to_owned(),
                schedule_id: None,
                upstream_created_at: event.upstream_created_at,
                category: event.category,
            },
            due_at,
        );
        self.relay.lease(&mut outbox);
        // The group commit hands the committed outbox entries to this process's relay.
        let accepted = self.commits.call((notification, outbox)).await??;
        if matches!(accepted, Accepted::New(_)) {
            self.metrics.accepted(source);
        }
        Ok(accepted)
    }
}

/// Handles one message from the `herald.events` exchange: the same parsing and accept
/// path as REST; malformed events are rejected with their reason, never retried forever.
pub async fn handle_amqp_event(intake: Intake, message: Incoming) -> Disposition {
    let event = match parse_event(&message.body, None, intake.limits()) {
        Ok(e) => e,
        Err(e) => return reject(&e),
    };
    if event.event_id.is_none() {
        return Disposition::Reject {
            code: "validation_failed".to_owned(),
            message: "event_id: is required on messages published to the events exchange"
                .to_owned(),
        };
    }
    match intake.accept_event(event, "amqp").await {
        Ok(AcceptedAs::Notification(Accepted::New(n))) => {
            tracing::info!(notification_id = %n.id, "event accepted from the exchange");
            Disposition::Ack
        }
        Ok(AcceptedAs::Notification(Accepted::Duplicate(n))) => {
            tracing::debug!(notification_id = %n.id, "repeated event from the exchange");
            Disposition::Ack
        }
        Ok(AcceptedAs::Schedule { schedule, .. }) => {
            tracing::info!(schedule_id = %schedule.id, "schedule created from the exchange");
            Disposition::Ack
        }
        Err(AcceptError::Store(e)) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not accept an event from the exchange; requeueing"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            Disposition::Requeue
        }
        Err(e) => Disposition::Reject {
            code: e.code().to_owned(),
            message: e.to_string(),
        },
    }
}

fn reject(e: &EventError) -> Disposition {
    let message = match e {
        EventError::Invalid(errors) => crate::domain::describe(errors),
        other => other.message(),
    };
    Disposition::Reject {
        code: e.code().to_owned(),
        message,
    }
}
