//! The shared context every role runs with, built once from settings.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Notify;

use crate::channels::sns::SnsVerifier;
use crate::channels::Channels;
use crate::config::Settings;
use crate::enrich::Enricher;
use crate::hooks::Hooks;
use crate::ingest::Intake;
use crate::metrics::Metrics;
use crate::outbox::Relay;
use crate::queue::Broker;
use crate::scheduler::Scheduler;
use crate::store::{Store, TemplatesVersion};
use crate::templates::{part_name, Origin, PartSource, Templates};
use crate::worker::{Worker, WorkerConfig};

/// Everything a process runs with, built once at start (the startup module) and cloned
/// cheaply: the roles take their handles from it (`intake`, `relay`, `scheduler`,
/// `worker`), and each API handler extracts just the handles it uses (`api::state`).
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub broker: Arc<Broker>,
    pub templates: Arc<Templates>,
    pub metrics: Arc<Metrics>,
    /// This process's outbox relay: woken by outbox writes, handed accepted entries.
    pub relay: Relay,
    /// Fires campaigns; woken when a schedule changes here.
    pub scheduler: Scheduler,
    /// Dispatches and delivers.
    pub worker: Worker,
    /// Accepting events (REST and the exchange share it).
    pub intake: Intake,
    /// Applies the templates stored through the API.
    pub template_sync: TemplateSync,
    /// Checks the signatures of SNS messages (SES feedback).
    pub sns: Arc<SnsVerifier>,
    /// Status webhooks: publishes due messages and posts them.
    pub hooks: Hooks,
}

/// Applies the templates stored through the API to this process's templates.
#[derive(Clone)]
pub struct TemplateSync {
    store: Store,
    templates: Arc<Templates>,
    /// The stored templates this process has applied.
    seen: Arc<tokio::sync::Mutex<Option<TemplatesVersion>>>,
}

impl TemplateSync {
    /// Applies stored templates when they changed since the last look.
    pub async fn sync(&self) -> anyhow::Result<()> {
        let mut seen = self.seen.lock().await;
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
        let templates = Arc::new(templates);
        let metrics = Arc::<Metrics>::default();
        let relay = Relay::new(store.clone(), broker.clone(), &settings.outbox, &instance);
        let schedule_wake = Arc::new(Notify::new());
        let intake = Intake::new(
            store.clone(),
            broker.clone(),
            templates.clone(),
            relay.clone(),
            metrics.clone(),
            &settings.events,
            schedule_wake.clone(),
        );
        let scheduler = Scheduler::new(
            store.clone(),
            relay.clone(),
            metrics.clone(),
            &settings.scheduler,
            &instance,
            schedule_wake,
        );
        let worker = Worker {
            store: store.clone(),
            broker: broker.clone(),
            templates: templates.clone(),
            channels,
            enricher,
            metrics: metrics.clone(),
            relay: relay.clone(),
            instance,
            settings: Arc::new(WorkerConfig::from_settings(&settings)),
        };
        let hooks = Hooks::new(
            store.clone(),
            broker.clone(),
            &settings.status_webhooks,
            settings.webhook.allow_internal_targets,
            metrics.clone(),
        )?;
        let template_sync = TemplateSync {
            store: store.clone(),
            templates: templates.clone(),
            seen: Arc::default(),
        };
        Ok(Self {
            settings: Arc::new(settings),
            store,
            broker,
            templates,
            metrics,
            relay,
            scheduler,
            worker,
            intake,
            template_sync,
            sns: Arc::new(SnsVerifier::new()?),
            hooks,
        })
    }

    /// Applies templates stored through the API when they changed since the last look.
    pub async fn sync_templates(&self) -> anyhow::Result<()> {
        self.template_sync.sync().await
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
