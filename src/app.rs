//! The shared context every role runs with, built once from settings.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Notify;

use crate::batch::Batcher;
use crate::channels::Channels;
use crate::config::Settings;
use crate::domain::event::EventLimits;
use crate::metrics::Metrics;
use crate::outbox::Handoff;
use crate::queue::Broker;
use crate::store::TemplatesVersion;
use crate::store::{Accepted, NotificationDoc, OutboxDoc, Store};
use crate::templates::{part_name, Origin, PartSource, Templates};
use crate::worker::enrich::Enricher;

/// At most this many accepted events share one transaction.
const INTAKE_BATCH_MAX: usize = 256;

/// Clients and shared state, built once at start and cloned cheaply (everything is behind `Arc`).
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub broker: Arc<Broker>,
    pub templates: Arc<Templates>,
    pub channels: Channels,
    pub enricher: Arc<Enricher>,
    pub metrics: Arc<Metrics>,
    /// Wakes this process's outbox relay right after an accept commits.
    pub outbox_wake: Arc<Notify>,
    /// Accepted entries handed straight to this process's relay.
    pub handoff: Arc<Handoff>,
    /// Wakes this process's scheduler when a schedule changes here.
    pub schedule_wake: Arc<Notify>,
    /// Accepted events, group-committed: concurrent requests share one transaction.
    pub intake: Batcher<(NotificationDoc, OutboxDoc), anyhow::Result<Accepted>>,
    /// Delivery work waiting, as `POST /v1/events` checks it before accepting.
    pub backlog: Arc<crate::ingest::Backlog>,
    /// Names this process in delivery claims (host:pid:random).
    pub instance: String,
    /// The stored templates this process has applied.
    templates_seen: Arc<tokio::sync::Mutex<Option<TemplatesVersion>>>,
}

impl Context {
    /// Builds every client. Neither MongoDB nor RabbitMQ needs to be up yet: both
    /// connect lazily, so an API can accept events while RabbitMQ is down.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = Store::connect(&settings.mongodb, &settings.retention).await?;
        let broker = Arc::new(Broker::new(&settings.amqp, settings.worker.max_attempts));
        let templates = Templates::load(&settings.templates.dir).with_context(|| {
            format!(
                "loading templates from {}",
                settings.templates.dir.display()
            )
        })?;
        let channels = Channels::from_settings(&settings)?;
        let enricher = Arc::new(Enricher::new(&settings.enrichment)?);
        let instance = format!(
            "{}:{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned()),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let (outbox_wake, handoff) = (Arc::new(Notify::new()), Arc::<Handoff>::default());
        let (intake_store, wake, relay) = (store.clone(), outbox_wake.clone(), handoff.clone());
        let (intake, _) = Batcher::start("intake", INTAKE_BATCH_MAX, move |batch| {
            let (store, wake, relay) = (intake_store.clone(), wake.clone(), relay.clone());
            async move {
                let intaken = store.accept_many(batch).await?;
                relay.pass(intaken.outbox, &wake);
                Ok(intaken.answers)
            }
        });
        Ok(Self {
            settings: Arc::new(settings),
            store,
            broker,
            templates: Arc::new(templates),
            channels,
            enricher,
            metrics: Arc::default(),
            outbox_wake,
            handoff,
            schedule_wake: Arc::new(Notify::new()),
            instance,
            intake,
            backlog: Arc::default(),
            templates_seen: Arc::default(),
        })
    }

    /// Applies templates stored through the API when they changed since the last look.
    pub async fn sync_templates(&self) -> anyhow::Result<()> {
        let mut seen = self.templates_seen.lock().await;
        let version = self.store.templates_version().await?;
        if *seen == Some(version) {
            return Ok(());
        }
        let stored = self.store.list_templates().await?;
        let parts = stored
            .into_iter()
            .filter_map(|t| {
                Some(PartSource {
                    part: part_name(&t.part)?,
                    event_type: t.event_type,
                    locale: t.locale,
                    source: t.source,
                    origin: Origin::Api,
                })
            })
            .collect();
        self.templates.apply_overrides(parts)?;
        *seen = Some(version);
        Ok(())
    }

    pub fn event_limits(&self) -> EventLimits {
        EventLimits {
            max_payload_bytes: self.settings.events.max_payload_bytes,
            max_inline_recipients: self.settings.events.max_inline_recipients,
        }
    }

    /// Creates indexes when configured to; waits for MongoDB rather than failing at once.
    pub async fn prepare_store(&self) -> anyhow::Result<()> {
        if self.settings.mongodb.auto_migrate {
            self.store
                .migrate()
                .await
                .context("creating collections and indexes")?;
        }
        self.sync_templates()
            .await
            .context("loading stored templates")?;
        Ok(())
    }
}
