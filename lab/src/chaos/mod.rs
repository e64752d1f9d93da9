//! `herald-lab chaos`: herald as real processes under injected faults, with every accepted delivery accounted for.
//!
//! Each fault gets a fresh database and queue prefix, `herald api`, two `herald worker`s and
//! two `herald scheduler`s as processes of their own, a MongoDB-compatible server the
//! harness owns (so it can kill it), RabbitMQ behind a TCP proxy (so it can cut it) and an
//! SMTP sink that records each message's `X-Herald-Delivery-Id`. A campaign and a stream of
//! single events run while the fault is injected and repaired; then every accepted delivery
//! is sorted, as RabbitMQ's Jepsen checker sorts messages, into delivered, lost,
//! duplicated and unexpected. A status webhook endpoint subscribed to `message.sent`
//! points at a loopback receiver: every `sent` delivery's event must reach it (at least
//! once, always under one `webhook-id`).

mod cluster;
mod faults;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use herald::app::Context;
use herald::config::{Secret, Settings};
use herald::store::UserDoc;
use herald_testbed::{SmtpServer, TcpProxy};

use crate::bench::sink::{self, Received};
use crate::db::LabDb;

pub use faults::{Fault, ALL};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deliveries in each fault's campaign.
    pub deliveries: usize,
    /// Single-recipient events per second beside the campaign.
    pub singles_per_sec: f64,
    /// Faults to inject, in order.
    pub faults: Vec<Fault>,
    /// The `secantusd-rs` binary to run as the harness's own database server.
    pub database_server: PathBuf,
    /// Short form: smaller loads and faults (CI).
    pub quick: bool,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub fault: String,
    /// Deliveries herald accepted (recipients x channels of every accepted event or fired slot).
    pub accepted: usize,
    /// Received by the sink exactly as the delivery log says (`sent`).
    pub delivered: usize,
    /// Accepted but never final, or logged `sent` without reaching the sink.
    pub lost: usize,
    /// Extra copies the sink received of a delivery.
    pub duplicated: usize,
    /// Received by the sink but not accounted for by the log.
    pub unexpected: usize,
    /// Logged `failed`/`outcome_unknown` (its sender died between the claim and recording
    /// the outcome), whether or not the message reached the sink: honest, replayable.
    pub unknown: usize,
    /// Seconds from the repair until messages reached the sink again.
    pub recovery_s: f64,
    /// What else the fault checked.
    pub notes: String,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && !self.notes.contains("FAIL")
    }
}

/// A MongoDB-compatible server process the harness can kill and restart.
struct Database {
    binary: PathBuf,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Database {
    async fn start(binary: PathBuf, root: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut db = Self {
            binary,
            port,
            dir: root.join("db"),
            log: root.join("logs/secantusd.log"),
            child: None,
        };
        db.spawn().await?;
        Ok(db)
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = tokio::process::Command::new(&self.binary)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--storage-path")
            .arg(&self.dir)
            // As the scripts start it: a commit is on disk before it is acknowledged.
            .arg("--sync-on-commit")
            .args(["--log-level", "WARNING"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(30))
            .await
            .context("the database server did not listen within 30 s")?;
        // A killed process's open transaction holds its documents until the server expires
        // it; herald waits that out (uncounted requeues), and a shorter limit than the
        // default 60 s keeps each fault short.
        mongodb::Client::with_uri_str(self.uri())
            .await?
            .database("admin")
            .run_command(mongodb::bson::doc! {
                "setParameter": 1,
                "transactionLifetimeLimitSeconds": TRANSACTION_LIFETIME_SECS,
            })
            .await
            .context("setting transactionLifetimeLimitSeconds")?;
        Ok(())
    }

    /// `kill -9`, then the same server on the same files.
    async fn crash_and_restart(&mut self, down: Duration) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()?;
            c.wait().await?;
        }
        tokio::time::sleep(down).await;
        self.spawn().await
    }
}

/// The database server's `transactionLifetimeLimitSeconds` in the harness.
const TRANSACTION_LIFETIME_SECS: i32 = 15;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_port(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The roles a bed runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Api,
    Worker(usize),
    Scheduler(usize),
}

impl Role {
    fn command(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Worker(_) => "worker",
            Role::Scheduler(_) => "scheduler",
        }
    }
    fn label(self) -> String {
        match self {
            Role::Api => "api".into(),
            Role::Worker(i) => format!("worker-{i}"),
            Role::Scheduler(i) => format!("scheduler-{i}"),
        }
    }
}

const ROLES: [Role; 5] = [
    Role::Api,
    Role::Worker(0),
    Role::Worker(1),
    Role::Scheduler(0),
    Role::Scheduler(1),
];

/// One fault's world: its database and queues, the sink, the proxy and herald's processes.
struct Bed {
    ctx: Context,
    /// The harness's own reads and writes of the bed's database.
    lab: LabDb,
    env: Vec<(String, String)>,
    logs: PathBuf,
    processes: HashMap<String, Child>,
    base: String,
    client: reqwest::Client,
    key: String,
    smtp: SmtpServer,
    /// The proxy before the machine's RabbitMQ (none on the cluster).
    amqp: Option<TcpProxy>,
    /// Accepted notifications: id, how many deliveries each owes, when the request herald
    /// accepted was sent.
    accepted: Arc<Mutex<Vec<(String, usize, Instant)>>>,
    /// 429/503 answers the clients got.
    refused: Arc<AtomicUsize>,
    /// Schedules owed exactly one fired slot each.
    slots: HashSet<String>,
    /// The status webhooks the bed's endpoint received.
    hooks: Arc<Received>,
}

/// The bed's `worker.max_attempts`; the harness's own context uses it too, so its queue
/// names (one delay queue per retry) match the processes' and all are deleted after.
const MAX_ATTEMPTS: u32 = 12;

/// The bed's `chaos.toml`: SMTP to the sink, short timeouts and retries, plus the
/// fault's own `extra` TOML.
fn config_toml(smtp_port: u16, smtp_timeout_secs: u64, extra: &str) -> String {
    format!(
        r#"[email]
transport = "smtp"
[email.smtp]
host = "127.0.0.1"
port = {smtp_port}
timeout_secs = {smtp_timeout_secs}
[worker]
claim_timeout_secs = 30
redelivery_grace_secs = 12
retry_base_ms = 200
retry_max_ms = 4000
max_attempts = {MAX_ATTEMPTS}
[outbox]
poll_interval_ms = 200
lease_secs = 3
[scheduler]
poll_interval_ms = 200
[amqp]
reconnect_max_ms = 1000
[webhook]
allow_internal_targets = true
[status_webhooks]
retry_delays_ms = [200, 1000, 2000, 4000, 4000]
timeout_ms = 2000
poll_interval_ms = 200
lease_secs = 10
{extra}"#
    )
}

impl Bed {
    async fn start(
        settings: &Settings,
        db: &Database,
        cluster: Option<&cluster::Cluster>,
        root: &Path,
        fault: Fault,
        opts: &Options,
    ) -> anyhow::Result<Self> {
        let stamp = Utc::now().format("%Y%m%d%H%M%S");
        let name = fault.name().replace('-', "_");
        let mut settings = settings.clone();
        settings.mongodb.uri = Secret::new(db.uri());
        settings.mongodb.database = format!("herald_chaos_{name}_{stamp}");
        settings.amqp.prefix = format!("herald-chaos-{name}-{stamp}");
        settings.worker.max_attempts = MAX_ATTEMPTS;
        if let Some(queue_type) = fault.on_cluster() {
            let cluster = cluster.context("this fault needs the RabbitMQ cluster")?;
            settings.amqp.urls = cluster.urls().iter().cloned().map(Secret::new).collect();
            settings.amqp.queue_type = queue_type;
        }
        let ctx = Context::build(settings.clone()).await?;
        ctx.store.migrate().await?;
        let lab = LabDb::connect(&settings.mongodb).await?;
        let users: Vec<UserDoc> = (0..opts.deliveries)
            .map(|i| user(format!("c-{i:06}"), Some("chaos")))
            .chain((0..SINGLE_USERS).map(|i| user(format!("s-{i:05}"), None)))
            .collect();
        for chunk in users.chunks(5_000) {
            ctx.store.upsert_users(chunk).await?;
        }
        let (_, key) = ctx
            .store
            .create_key(
                "chaos",
                &[herald::domain::Scope::Admin],
                Some(herald::domain::Rate::new(1e9).expect("rate")),
            )
            .await?;

        let smtp = SmtpServer::start().await?;
        let (hook_sink, hooks) = sink::start().await?;
        // herald's processes reach the machine's broker through a proxy the harness can cut,
        // or all three cluster nodes directly; 5 s heartbeats either way.
        let heartbeat = |url: &str| -> anyhow::Result<url::Url> {
            let mut url = url::Url::parse(url)?;
            url.set_query(Some("heartbeat=5"));
            Ok(url)
        };
        let (amqp, amqp_env) = match fault.on_cluster() {
            Some(queue_type) => {
                let urls = settings
                    .amqp
                    .urls
                    .iter()
                    .map(|u| heartbeat(u.expose()).map(String::from))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let env = vec![
                    ("HERALD__AMQP__URLS".to_owned(), urls.join(",")),
                    (
                        "HERALD__AMQP__QUEUE_TYPE".to_owned(),
                        queue_type.as_str().to_owned(),
                    ),
                ];
                (None, env)
            }
            None => {
                let mut url = heartbeat(settings.amqp.url.expose())?;
                let target = format!(
                    "{}:{}",
                    url.host_str().context("amqp.url has no host")?,
                    url.port().unwrap_or(5672)
                );
                let proxy = TcpProxy::start(target, true).await?;
                url.set_port(Some(proxy.port))
                    .map_err(|()| anyhow::anyhow!("amqp.url cannot take a port"))?;
                (
                    Some(proxy),
                    vec![("HERALD__AMQP__URL".to_owned(), url.to_string())],
                )
            }
        };

        let dir = root.join("config").join(&settings.amqp.prefix);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("chaos.toml"),
            config_toml(smtp.port, fault.smtp_timeout_secs(), &fault.config(opts)),
        )?;
        let logs = root.join("logs").join(&settings.amqp.prefix);
        std::fs::create_dir_all(&logs)?;
        let api_port = free_port()?;
        let env: Vec<(String, String)> = vec![
            ("HERALD_CONFIG_DIR".into(), dir.display().to_string()),
            ("HERALD_ENV".into(), "chaos".into()),
            ("HERALD__MONGODB__URI".into(), db.uri()),
            (
                "HERALD__MONGODB__DATABASE".into(),
                settings.mongodb.database.clone(),
            ),
            ("HERALD__AMQP__PREFIX".into(), settings.amqp.prefix.clone()),
            // `HERALD_CHAOS_LOG` (e.g. `warn,herald::worker=info`) for a closer post-mortem.
            (
                "HERALD__LOG__LEVEL".into(),
                std::env::var("HERALD_CHAOS_LOG").unwrap_or_else(|_| "warn".into()),
            ),
            (
                "HERALD__SERVER__BIND".into(),
                format!("127.0.0.1:{api_port}"),
            ),
        ]
        .into_iter()
        .chain(amqp_env)
        .collect();
        let mut bed = Self {
            ctx,
            lab,
            env,
            logs,
            processes: HashMap::new(),
            base: format!("http://127.0.0.1:{api_port}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            key,
            smtp,
            amqp,
            accepted: Arc::default(),
            refused: Arc::default(),
            slots: HashSet::new(),
            hooks,
        };
        for role in ROLES {
            bed.spawn(role)?;
        }
        bed.wait_ready().await?;
        let made = bed
            .client
            .post(format!("{}/v1/webhook-endpoints", bed.base))
            .bearer_auth(&bed.key)
            .json(&json!({"url": format!("{hook_sink}/hooks"), "events": ["message.sent"]}))
            .send()
            .await?;
        anyhow::ensure!(
            made.status().as_u16() == 201,
            "creating the status webhook endpoint: {}",
            made.status()
        );
        // Every process reads subscriptions at most a second old.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        Ok(bed)
    }

    fn spawn(&mut self, role: Role) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", role.label())))?;
        let mut cmd = tokio::process::Command::new(crate::herald_binary()?);
        cmd.arg(role.command())
            // The shortcuts outrank HERALD__*: they would bypass the harness's database
            // server and proxy.
            .env_remove("MONGODB_URI")
            .env_remove("AMQP_URL")
            // A bed sets these itself when it runs on the cluster.
            .env_remove("HERALD__AMQP__URLS")
            .env_remove("HERALD__AMQP__QUEUE_TYPE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if role != Role::Api {
            // Only the API binds the API port.
            cmd.env_remove("HERALD__SERVER__BIND");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `herald {}`", role.command()))?;
        self.processes.insert(role.label(), child);
        Ok(())
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        crate::bench::wait_ready(&self.client, &self.base, Duration::from_secs(30)).await
    }

    /// `kill -9` a role's process.
    async fn kill(&mut self, role: Role) -> anyhow::Result<()> {
        if let Some(mut child) = self.processes.remove(&role.label()) {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// `kill -9`, then start it again.
    async fn crash_and_restart(&mut self, role: Role, down: Duration) -> anyhow::Result<()> {
        self.kill(role).await?;
        tokio::time::sleep(down).await;
        self.spawn(role)?;
        if role == Role::Api {
            self.wait_ready().await?;
        }
        Ok(())
    }

    /// SIGTERM to every process at once; returns how long the slowest took to exit.
    async fn terminate_all(&mut self, deadline: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut children: Vec<(String, Child)> = self.processes.drain().collect();
        for (_, child) in &children {
            if let Some(pid) = child.id() {
                std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status()?;
            }
        }
        for (label, child) in &mut children {
            match tokio::time::timeout(deadline, child.wait()).await {
                Ok(status) => {
                    let status = status?;
                    anyhow::ensure!(status.success(), "{label} exited with {status}");
                }
                Err(_) => anyhow::bail!("{label} did not exit within {deadline:?} of SIGTERM"),
            }
        }
        Ok(started.elapsed())
    }

    /// Posts an event until herald answers it (the same `event_id` each time, so a retry
    /// after a lost answer cannot double it); honours `Retry-After`. Records it as owing
    /// `owed` deliveries once accepted.
    async fn post(&self, event: Value, owed: usize) -> anyhow::Result<()> {
        post_until_answered(
            &self.client,
            &self.base,
            &self.key,
            event,
            owed,
            &self.accepted,
            &self.refused,
        )
        .await
    }

    /// Posts single-recipient emails at `per_sec` from `clients` concurrent clients until
    /// `stop`.
    fn singles(
        &self,
        per_sec: f64,
        clients: usize,
        tag: &str,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<anyhow::Result<usize>> {
        let (client, base, key) = (self.client.clone(), self.base.clone(), self.key.clone());
        let (accepted, refused) = (Arc::clone(&self.accepted), Arc::clone(&self.refused));
        let tag = tag.to_owned();
        tokio::spawn(async move {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..clients.max(1) {
                let (client, base, key, accepted, refused, next, stop, tag) = (
                    client.clone(),
                    base.clone(),
                    key.clone(),
                    Arc::clone(&accepted),
                    Arc::clone(&refused),
                    Arc::clone(&next),
                    stop.clone(),
                    tag.clone(),
                );
                tasks.spawn(async move {
                    let pause = Duration::from_secs_f64(clients.max(1) as f64 / per_sec);
                    while !stop.is_cancelled() {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let event = json!({"event_id": format!("{tag}-{i}"), "event_type": "welcome",
                            "priority": "high", "channels": ["email"],
                            "recipients": {"user_ids": [format!("s-{:05}", i % SINGLE_USERS)]}, "payload": {}});
                        post_until_answered(&client, &base, &key, event, 1, &accepted, &refused)
                            .await?;
                        if per_sec.is_finite() {
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                _ = tokio::time::sleep(pause) => {}
                            }
                        }
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            Ok(next.load(Ordering::Relaxed))
        })
    }

    /// Lines containing `needle` in the logs of the processes whose label starts with `role`.
    fn log_lines(&self, role: &str, needle: &str) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.logs) else {
            return 0;
        };
        dir.flatten()
            .filter(|f| f.file_name().to_string_lossy().starts_with(role))
            .filter_map(|f| std::fs::read_to_string(f.path()).ok())
            .map(|text| text.lines().filter(|l| l.contains(needle)).count())
            .sum()
    }

    fn accepted_count(&self) -> usize {
        lock(&self.accepted).len()
    }

    /// Messages parked in the rejected queue.
    async fn parked(&self) -> anyhow::Result<u32> {
        let names = self.ctx.broker.names();
        self.ctx.broker.queue_depth(&names.rejected_queue).await
    }

    /// An undecodable job and a job for a record herald cannot read, on the normal lane.
    async fn publish_poison(&self) -> anyhow::Result<()> {
        use herald::queue::{messages::Job, Outgoing};
        self.lab
            .insert_unreadable_delivery("poison-delivery")
            .await?;
        let lane = self
            .ctx
            .broker
            .names()
            .lane(herald::domain::Priority::Normal);
        let to_lane = |body: Vec<u8>| Outgoing {
            exchange: String::new(),
            routing_key: lane.to_owned(),
            body,
            headers: Vec::new(),
            expiration_ms: None,
        };
        let job = Job::Deliver {
            delivery_id: "poison-delivery".into(),
            notification_id: "poison".into(),
        };
        self.ctx
            .broker
            .publish_confirmed(&[to_lane(b"{not a job".to_vec()), to_lane(job.encode())])
            .await
    }

    /// The highest peak RSS (MB) of herald's processes, watched for `during`.
    async fn watch_rss(&self, during: Duration) -> f64 {
        let until = Instant::now() + during;
        let mut peak: f64 = 0.0;
        while Instant::now() < until {
            for child in self.processes.values() {
                if let Some(mb) = child.id().and_then(crate::bench::peak_rss_mb) {
                    peak = peak.max(mb);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        peak
    }

    /// The campaign: one event to every `chaos`-tagged user.
    async fn campaign(&self, deliveries: usize, tag: &str) -> anyhow::Result<()> {
        self.post(
            json!({"event_id": format!("{tag}-campaign"), "event_type": "welcome", "priority": "low",
                "channels": ["email"], "recipients": {"segment": {"tag": "chaos"}}, "payload": {}}),
            deliveries,
        )
        .await
    }

    /// Waits until the sink has `n` messages (or `within` passes).
    async fn wait_sink(&self, n: usize, within: Duration) -> bool {
        self.smtp.wait_for(n, within).await.is_ok()
    }

    /// Seconds from `repaired` until a message reached the sink after it (or `within`).
    async fn recovery(&self, repaired: Instant, within: Duration) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(t) = self.smtp.last_arrival().filter(|t| *t > repaired) {
                return t.duration_since(repaired).as_secs_f64();
            }
            if Instant::now() > deadline {
                return within.as_secs_f64();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// When the first delivery of an event posted after `since` reached the sink.
    async fn first_arrival_accepted_after(
        &self,
        since: Instant,
    ) -> anyhow::Result<Option<Instant>> {
        let notifications: HashSet<String> = lock(&self.accepted)
            .iter()
            .filter(|(_, _, sent)| *sent > since)
            .map(|(id, _, _)| id.clone())
            .collect();
        let log = self.lab.delivery_audit().await?;
        let deliveries: HashSet<&str> = log
            .iter()
            .filter(|d| notifications.contains(&d.notification_id))
            .map(|d| d.id.as_str())
            .collect();
        Ok(self.smtp.first_arrival_of(&deliveries))
    }

    /// Waits until every accepted notification is final (or `within` passes).
    async fn wait_final(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let ids: Vec<String> = lock(&self.accepted)
            .iter()
            .map(|(id, _, _)| id.clone())
            .collect();
        for id in ids {
            loop {
                use herald::domain::NotificationStatus as S;
                let done = match self.ctx.store.get_notification(&id).await {
                    Ok(Some(n)) => {
                        matches!(n.status, S::Completed | S::PartiallyFailed | S::Failed)
                    }
                    _ => false,
                };
                if done {
                    break;
                }
                if Instant::now() > deadline {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Status webhooks: until each message is delivered.
        while Instant::now() < deadline && self.lab.webhooks_waiting().await? > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Scheduled slots: until each has a final delivery.
        while !self.slots.is_empty() && Instant::now() < deadline {
            let log = self.lab.delivery_audit().await?;
            let done: HashSet<&str> = log
                .iter()
                .filter(|d| d.is_terminal())
                .filter_map(|d| d.schedule_id.as_deref())
                .collect();
            if self.slots.iter().all(|s| done.contains(s.as_str())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Sorts every accepted delivery by what the log and the sink say.
    async fn account(&self, fault: Fault, recovery_s: f64, notes: String) -> anyhow::Result<Row> {
        let owed: HashMap<String, usize> = lock(&self.accepted)
            .iter()
            .map(|(id, n, _)| (id.clone(), *n))
            .collect();
        let log = self.lab.delivery_audit().await?;
        let received = self.smtp.delivery_ids();
        let mut row = Row {
            fault: fault.name().to_owned(),
            accepted: owed.values().sum(),
            delivered: 0,
            lost: 0,
            duplicated: received
                .values()
                .map(|n| n.saturating_sub(1) as usize)
                .sum(),
            unexpected: 0,
            unknown: 0,
            recovery_s: (recovery_s * 100.0).round() / 100.0,
            notes,
        };
        row.accepted += self.slots.len();
        // Why each `unknown` is unknown (its last error, up to its first colon).
        let mut unknown_causes: BTreeMap<String, usize> = BTreeMap::new();
        let mut final_per_notification: HashMap<&str, usize> = HashMap::new();
        let mut fired: HashMap<&str, usize> = HashMap::new();
        let mut seen = HashSet::new();
        for d in &log {
            let got = received.contains_key(&d.id);
            seen.insert(d.id.as_str());
            if let Some(s) = d.schedule_id.as_deref().filter(|s| self.slots.contains(*s)) {
                let n = fired.entry(s).or_insert(0);
                *n += 1;
                if *n > 1 {
                    // The slot fired again.
                    row.duplicated += 1;
                    continue;
                }
                if !d.is_terminal() {
                    row.lost += 1;
                }
            } else if !owed.contains_key(&d.notification_id) {
                // Not from an accepted event (a poison record, a scheduled slot counted below).
                if got {
                    row.unexpected += 1;
                }
                continue;
            }
            if d.is_terminal() {
                *final_per_notification
                    .entry(&d.notification_id)
                    .or_insert(0) += 1;
            }
            match (d.status.as_str(), got) {
                ("sent", true) => row.delivered += 1,
                ("sent", false) => row.lost += 1,
                // Whether or not the message got out before the sender died: herald
                // cannot know, so neither does this count; the notes tell them apart.
                ("failed", _) if d.reason.as_deref() == Some("outcome_unknown") => {
                    row.unknown += 1;
                    let cause = d.last_error.as_deref().unwrap_or("no error recorded");
                    let cause = cause.split(':').next().unwrap_or(cause);
                    let cause = herald::domain::truncate(cause, 60);
                    let cause = match got {
                        true => cause,
                        false => format!("{cause} (never reached the sink)"),
                    };
                    *unknown_causes.entry(cause).or_insert(0) += 1;
                }
                (_, true) => row.unexpected += 1,
                _ => {}
            }
        }
        row.lost += self
            .slots
            .iter()
            .filter(|s| !fired.contains_key(s.as_str()))
            .count();
        for (id, n) in &owed {
            let done = final_per_notification
                .get(id.as_str())
                .copied()
                .unwrap_or(0);
            row.lost += n.saturating_sub(done);
            row.unexpected += done.saturating_sub(*n);
        }
        row.unexpected += received
            .keys()
            .filter(|id| !seen.contains(id.as_str()))
            .count();
        let hooks = self.hook_accounting(&log);
        row.notes = format!("{}; {hooks}", row.notes)
            .trim_start_matches("; ")
            .to_owned();
        if !unknown_causes.is_empty() {
            let causes: Vec<String> = unknown_causes
                .iter()
                .map(|(cause, n)| format!("{n} {cause}"))
                .collect();
            row.notes = format!("{}; unknown: {}", row.notes, causes.join(", "))
                .trim_start_matches("; ")
                .to_owned();
        }
        Ok(row)
    }

    /// The status webhooks against the log: every `sent` delivery's `message.sent` must
    /// have arrived, each delivery's under one `webhook-id` (repeats of it are the
    /// specification's at-least-once; a second id would be a second event). FAIL otherwise.
    fn hook_accounting(&self, log: &[crate::db::AuditedDelivery]) -> String {
        let mut ids: HashMap<&str, HashSet<&str>> = HashMap::new();
        let hooks = self.hooks.hooks();
        for h in &hooks {
            if let (Some(d), "message.sent") = (h.delivery_id.as_deref(), h.kind.as_str()) {
                ids.entry(d).or_default().insert(h.webhook_id.as_str());
            }
        }
        let sent: HashSet<&str> = log
            .iter()
            .filter(|d| d.status == "sent")
            .map(|d| d.id.as_str())
            .collect();
        let lost = sent.iter().filter(|d| !ids.contains_key(*d)).count();
        let doubled = ids.values().filter(|w| w.len() > 1).count();
        let unsent = ids.keys().filter(|d| !sent.contains(*d)).count();
        let repeats = hooks.len() - ids.values().map(HashSet::len).sum::<usize>();
        let verdict = if lost + doubled + unsent > 0 {
            " FAIL"
        } else {
            ""
        };
        format!(
            "webhooks: {} of {} sent reported, {lost} lost, {doubled} under two ids, {unsent} not sent, {repeats} repeated{verdict}",
            sent.len() - lost,
            sent.len()
        )
    }

    /// Stops herald's processes; drops the database and queues unless `keep`.
    async fn stop(mut self, keep: bool) {
        let _ = self.terminate_all(Duration::from_secs(20)).await;
        if keep {
            println!(
                "  kept database `{}` and queues `{}.*` for a post-mortem; logs in {}",
                self.ctx.store.database_name(),
                self.ctx.broker.names().prefix(),
                self.logs.display()
            );
            self.ctx.broker.close().await;
            self.ctx.store.close().await;
            return;
        }
        if let Err(e) = self.ctx.broker.delete_topology().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not delete the chaos queues"
            );
        }
        self.ctx.broker.close().await;
        self.ctx.store.close().await;
        if let Err(e) = self.lab.clone().drop_and_close().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not drop the chaos database"
            );
        }
    }
}

/// Users that single events go to, round robin.
const SINGLE_USERS: usize = 2_000;

fn user(id: String, tag: Option<&str>) -> UserDoc {
    UserDoc {
        email: Some(format!("{id}@example.com")),
        first_name: Some("Chaos".into()),
        tags: tag.map(|t| vec![t.to_owned()]).unwrap_or_default(),
        id,
        ..Default::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn post_until_answered(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    event: Value,
    owed: usize,
    accepted: &Mutex<Vec<(String, usize, Instant)>>,
    refused: &AtomicUsize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "herald did not answer {} within 3 min",
            event["event_id"]
        );
        let sent_at = Instant::now();
        let answer = client
            .post(format!("{base}/v1/events"))
            .bearer_auth(key)
            .json(&event)
            .send()
            .await;
        let response = match answer {
            Ok(r) => r,
            Err(_) => {
                // Down, or the answer was lost: the same event id again.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let status = response.status().as_u16();
        match status {
            200..=299 => {
                let body: Value = response.json().await.unwrap_or_default();
                let id = body["notification_id"]
                    .as_str()
                    .context("an accepted event without a notification id")?
                    .to_owned();
                let mut a = lock(accepted);
                if !a.iter().any(|(n, _, _)| *n == id) {
                    a.push((id, owed, sent_at));
                }
                return Ok(());
            }
            429 | 503 => {
                refused.fetch_add(1, Ordering::Relaxed);
                let wait = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .context("a 429/503 without Retry-After")?;
                tokio::time::sleep(Duration::from_secs(wait.min(5))).await;
            }
            500..=599 => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => {
                let body = response.text().await.unwrap_or_default();
                anyhow::bail!("herald refused {}: {status} {body}", event["event_id"]);
            }
        }
    }
}

/// Runs every fault in `opts` and returns the table.
pub async fn run(settings: Settings, opts: Options) -> anyhow::Result<Vec<Row>> {
    let root = PathBuf::from("var/chaos").join(Utc::now().format("%Y%m%dT%H%M%SZ").to_string());
    std::fs::create_dir_all(root.join("logs"))?;
    let mut db = Database::start(opts.database_server.clone(), &root).await?;
    // Started before the first fault that needs it (its nodes idle through the others'
    // rows otherwise); if it cannot start, those faults fail with the reason.
    let mut cluster: Option<Result<cluster::Cluster, String>> = None;
    println!(
        "chaos: {} fault(s), {} deliveries per campaign, logs in {}",
        opts.faults.len(),
        opts.deliveries,
        root.display()
    );
    let mut rows = Vec::new();
    for fault in &opts.faults {
        let started = Instant::now();
        if fault.on_cluster().is_some() && cluster.is_none() {
            cluster = Some(cluster::Cluster::up().await.map_err(|e| format!("{e:#}")));
        }
        let result = match (fault.on_cluster(), &cluster) {
            (Some(_), Some(Err(why))) => Err(anyhow::anyhow!("the RabbitMQ cluster: {why}")),
            (_, c) => {
                let c = c.as_ref().and_then(|c| c.as_ref().ok());
                faults::run(*fault, &settings, &mut db, c, &root, &opts).await
            }
        };
        let row = match result {
            Ok(row) => row,
            Err(e) => Row {
                fault: fault.name().to_owned(),
                accepted: 0,
                delivered: 0,
                lost: 0,
                duplicated: 0,
                unexpected: 0,
                unknown: 0,
                recovery_s: 0.0,
                notes: format!("FAIL: {e:#}"),
            },
        };
        if let (false, Some(_), Some(Ok(c))) = (row.passed(), fault.on_cluster(), &cluster) {
            match c.save_logs(&root.join("logs")).await {
                Ok(dir) => println!("  the RabbitMQ nodes' logs: {}", dir.display()),
                Err(e) => println!("  could not keep the RabbitMQ nodes' logs: {e:#}"),
            }
        }
        println!(
            "{:<18} accepted {:>6}  delivered {:>6}  lost {}  duplicated {}  unexpected {}  unknown {}  recovery {:.2} s  ({:.0} s) {}",
            row.fault, row.accepted, row.delivered, row.lost, row.duplicated, row.unexpected,
            row.unknown, row.recovery_s, started.elapsed().as_secs_f64(), row.notes
        );
        rows.push(row);
    }
    Ok(rows)
}

/// The table as Markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| fault | accepted | delivered | lost | duplicated | unexpected | unknown | recovery | checked too |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} s | {} |\n",
            r.fault,
            r.accepted,
            r.delivered,
            r.lost,
            r.duplicated,
            r.unexpected,
            r.unknown,
            r.recovery_s,
            r.notes
        ));
    }
    out
}

/// Saves the rows under `var/chaos/` and returns the path.
pub fn save(rows: &[Row], quick: bool) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from("var/chaos").join(format!(
        "{}{}.json",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        if quick { "-quick" } else { "" }
    ));
    std::fs::write(&path, serde_json::to_vec_pretty(&json!({"rows": rows}))?)?;
    Ok(path)
}

/// Replaces the table in a document between `<!-- chaos:start -->` and `<!-- chaos:end -->`.
pub fn write_table(readme: &Path, rows: &[Row], command: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(readme)?;
    let (start, end) = ("<!-- chaos:start -->", "<!-- chaos:end -->");
    let (Some(a), Some(b)) = (text.find(start), text.find(end)) else {
        anyhow::bail!("{} has no {start} … {end} markers", readme.display());
    };
    let body = format!(
        "{start}\n_`{command}`, {}:_\n\n{}{}",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        table(rows),
        &text[b..]
    );
    std::fs::write(readme, format!("{}{body}", &text[..a]))?;
    Ok(())
}
