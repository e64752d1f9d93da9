//! Typed settings: embedded `config/default.toml` -> `config/<env>.toml` -> `HERALD__*` env.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// The defaults every binary carries, so `herald` runs from any directory.
const DEFAULTS: &str = include_str!("../config/default.toml");

/// A value that never appears in logs or `Debug` output (passwords, URIs with credentials).
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The real value; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub environment: String,
    pub server: ServerSettings,
    pub log: LogSettings,
    pub mongodb: MongoSettings,
    pub amqp: AmqpSettings,
    pub events: EventSettings,
    pub outbox: OutboxSettings,
    pub worker: WorkerSettings,
    pub scheduler: SchedulerSettings,
    pub policy: PolicySettings,
    pub templates: TemplateSettings,
    pub email: EmailSettings,
    pub sms: ChannelSettings,
    pub push: ChannelSettings,
    pub webhook: WebhookSettings,
    pub status_webhooks: StatusWebhookSettings,
    pub enrichment: EnrichmentSettings,
    pub retention: RetentionSettings,
    pub auth: AuthSettings,
    pub feedback: FeedbackSettings,
    pub inbox: InboxSettings,
    /// Per event type: its category (`[event_types.<event_type>] category = "marketing"`).
    #[serde(default)]
    pub event_types: std::collections::HashMap<String, EventTypeSettings>,
}

/// How the providers' feedback endpoints authenticate what they receive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackSettings {
    pub ses: SesFeedbackSettings,
    pub sendgrid: SendgridFeedbackSettings,
}

/// Amazon SES through SNS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SesFeedbackSettings {
    /// The SNS topics accepted; none: every SNS message is refused.
    pub topic_arns: Vec<String>,
    /// Host patterns (`*` is one DNS label) signing certificates and subscription URLs
    /// may come from.
    pub cert_hosts: Vec<String>,
}

/// SendGrid's signed Event Webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendgridFeedbackSettings {
    /// The webhook's verification key (base64 DER of an ECDSA P-256 public key).
    #[serde(default)]
    pub public_key: Option<String>,
}

/// The in-app inbox: end users' sessions, CORS, the socket and the demo.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxSettings {
    /// Signs user hashes (`hex(HMAC-SHA256(secret, user_id))`) and session tokens.
    pub secret: Secret,
    pub session_secs: u64,
    /// Browser origins allowed by CORS (exact `scheme://host[:port]`).
    pub allowed_origins: Vec<String>,
    pub ping_secs: u64,
    /// Requests per second per user across the inbox routes (a token bucket), and how
    /// many may come at once.
    pub rate_per_sec: crate::domain::Rate,
    pub burst: u32,
    /// Serve `/inbox/demo` (never with `environment = "production"`).
    pub demo: bool,
    pub demo_user: String,
}

/// The inbox secret shipped in `config/default.toml`; production refuses it.
pub const DEVELOPMENT_INBOX_SECRET: &str = "development-only-inbox-secret";

/// What is configured for one event type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTypeSettings {
    #[serde(default)]
    pub category: crate::domain::Category,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: SocketAddr,
    pub body_limit_bytes: usize,
    /// `POST /v1/users/import` bodies may be this large.
    pub import_limit_bytes: usize,
    /// The delivery stream sends a comment this often so proxies keep it open.
    pub sse_heartbeat_secs: u64,
    /// Where `herald worker` and `herald scheduler` serve `/metrics` (they have no API);
    /// unset: they serve nothing.
    #[serde(default)]
    pub metrics_bind: Option<SocketAddr>,
    /// Where people and providers reach this API: unsubscribe links are built on it.
    pub public_url: String,
}

/// How many days records are kept (TTL indexes remove them); 0 keeps them forever.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Deliveries (with their attempts), counted from their final status.
    pub sent_days: u32,
    pub skipped_days: u32,
    pub failed_days: u32,
    pub dead_days: u32,
    /// Notifications (the raw events and payloads), counted from when they finished.
    pub notification_days: u32,
    pub dead_letter_days: u32,
    /// Hourly statistics rollups.
    pub stats_days: u32,
    /// In-app inbox items, counted from their arrival.
    pub inbox_days: u32,
    /// Status webhook messages and their tries, counted from the event.
    pub webhook_days: u32,
}

impl RetentionSettings {
    /// When a delivery that reached `status` at `at` expires; `None` while it may change.
    pub fn delivery_expiry(
        &self,
        status: crate::domain::DeliveryStatus,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        use crate::domain::DeliveryStatus as S;
        let days = match status {
            S::Sent | S::Delivered => self.sent_days,
            S::Skipped => self.skipped_days,
            S::Failed | S::Bounced | S::Undelivered => self.failed_days,
            S::Dead => self.dead_days,
            _ => return None,
        };
        expiry(days, at)
    }
}

/// `at` plus `days`; `None` for 0 (keep forever).
pub fn expiry(
    days: u32,
    at: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    (days > 0).then(|| at + chrono::Duration::days(i64::from(days)))
}

/// API keys: who may call what, and how often.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Off: every route is open (only for a trusted network or local experiments).
    pub enabled: bool,
    /// Serve `/metrics` without a key (scrapers usually sit on an internal network).
    pub open_metrics: bool,
    /// Requests per second per key (a token bucket), and how many may come at once.
    pub rate_per_sec: crate::domain::Rate,
    pub burst: u32,
    /// A verified key is trusted this long before MongoDB is asked again; a revocation
    /// reaches other processes within this time.
    pub cache_secs: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    pub uri: Secret,
    pub database: String,
    pub auto_migrate: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: Secret,
    /// A cluster's nodes, tried in order (set: `url` is not used).
    #[serde(default)]
    pub urls: Vec<Secret>,
    pub prefix: String,
    pub reconnect_max_ms: u64,
    pub answer_within_ms: u64,
    /// The type of the lanes, intake, rejected and webhooks queues.
    pub queue_type: QueueType,
}

impl AmqpSettings {
    /// The addresses to try, in order.
    pub fn addresses(&self) -> Vec<Secret> {
        if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        }
    }
}

/// A RabbitMQ queue type (it cannot be changed on an existing queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// On one node: lost with it until it returns (the single-node default).
    Classic,
    /// Replicated (Raft) over the cluster's nodes: survives a node.
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    pub max_payload_bytes: usize,
    pub max_inline_recipients: usize,
    /// Jobs waiting (lanes + outbox) past which new events are refused with 503; 0: no bound.
    pub max_backlog: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    pub poll_interval_ms: u64,
    pub batch_size: i64,
    pub lease_secs: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub high_concurrency: u16,
    pub normal_concurrency: u16,
    pub low_concurrency: u16,
    pub claim_timeout_secs: i64,
    /// A redelivered job whose delivery was claimed less than this ago waits for its sender.
    pub redelivery_grace_secs: i64,
    pub commit_batch_max: usize,
    pub fanout_batch_size: usize,
    /// Fan-outs write chunks, and each delivery is written once with its outcome.
    pub chunked_fanout: bool,
    /// Provider calls per delivery before it is `dead`.
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Each backoff is spread by up to this fraction either way.
    pub retry_jitter: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Event types whose `high` priority deliveries ignore mutes and quiet hours
    /// (security codes, password resets). Channel opt-outs always hold.
    pub bypass_event_types: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    pub poll_interval_ms: u64,
    pub misfire_grace_secs: i64,
    pub max_catch_up: usize,
    pub batch_size: i64,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSettings {
    pub dir: PathBuf,
    pub refresh_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EmailTransportKind {
    File,
    Smtp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettings {
    pub transport: EmailTransportKind,
    pub from: String,
    pub file_dir: PathBuf,
    pub smtp: SmtpSettings,
    /// Signs one-click unsubscribe links: whoever knows it can unsubscribe anyone.
    pub unsubscribe_secret: Secret,
    /// Also offered in `List-Unsubscribe` as a `mailto:` URI when set.
    #[serde(default)]
    pub unsubscribe_mailbox: Option<String>,
    /// The envelope sender (VERP): `bounces+{delivery_id}@example.com`, so a bounce
    /// names its delivery. Unset: the `from` address.
    #[serde(default)]
    pub return_path: Option<String>,
    /// Sign every message with DKIM when set.
    #[serde(default)]
    pub dkim: Option<DkimSettings>,
}

/// DKIM signing: the key's selector and domain as published in DNS
/// (`<selector>._domainkey.<domain>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSettings {
    pub domain: String,
    pub selector: String,
    /// RSA: a PKCS#1 PEM file; Ed25519: a file holding the base64 of the 32-byte seed.
    pub private_key_file: PathBuf,
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DkimAlgorithm {
    #[default]
    Rsa,
    Ed25519,
}

/// The secret the embedded defaults sign unsubscribe links with; production refuses it.
pub const DEVELOPMENT_UNSUBSCRIBE_SECRET: &str = "development-only-unsubscribe-secret";

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SmtpSecurity {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: String,
    pub password: Secret,
    pub pool_max_size: u32,
    pub timeout_secs: u64,
    /// A certificate authority (PEM) to trust for the server's certificate besides the
    /// system's: a relay with a certificate from a private authority.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// External profile and content services (the local collections come first).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentSettings {
    /// e.g. `http://auth/api/users/{user_id}`; empty: the users collection only.
    pub user_url: String,
    /// e.g. `http://ugc/api/content/{content_id}`; empty: the contents collection only.
    pub content_url: String,
    pub timeout_ms: u64,
    pub cache_size: usize,
    pub cache_ttl_secs: u64,
}

/// The webhook channel (and the safety rules every webhook provider shares).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// HMAC-SHA256 key for `X-Herald-Signature`; empty sends unsigned.
    pub secret: Secret,
    /// Loopback, private and link-local targets are refused unless this is true.
    pub allow_internal_targets: bool,
    pub timeout_ms: u64,
    pub max_response_bytes: usize,
    /// The URL each event type's webhook goes to.
    pub endpoints: std::collections::BTreeMap<String, String>,
}

/// Status webhooks to the endpoints of `/v1/webhook-endpoints` (targets follow
/// `webhook.allow_internal_targets`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusWebhookSettings {
    /// The wait before each retry; their number is the number of retries.
    pub retry_delays_ms: Vec<u64>,
    pub disable_after_hours: f64,
    pub timeout_ms: u64,
    pub max_response_bytes: usize,
    pub concurrency: u16,
    pub per_endpoint_concurrency: usize,
    pub poll_interval_ms: u64,
    pub batch_size: i64,
    pub lease_secs: u64,
}

/// A channel's providers, tried in order (failover).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    /// Where `record` providers write.
    pub record_dir: PathBuf,
    pub providers: Vec<ProviderSettings>,
}

/// One provider of a channel, with its rate limit and circuit breaker.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderSettings {
    pub name: String,
    #[serde(flatten)]
    pub kind: ProviderKind,
    /// Sends per second (token bucket); 0 means unlimited.
    #[serde(default)]
    pub rate_per_sec: f64,
    #[serde(default = "default_burst")]
    pub burst: f64,
    /// Consecutive transient failures that open the breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker waits before letting one trial through.
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_fcm_url() -> String {
    "https://fcm.googleapis.com".to_owned()
}

fn default_burst() -> f64 {
    1.0
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown_ms() -> u64 {
    30_000
}
fn default_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderKind {
    /// Appends to `<record_dir>/<channel>.ndjson` (single-machine default).
    Record,
    /// POSTs JSON (`delivery_id`, `channel`, `to`, `text` or `title`/`body`) to a gateway.
    Webhook {
        url: String,
        #[serde(default)]
        secret: Secret,
        #[serde(default)]
        headers: std::collections::BTreeMap<String, String>,
        /// Handlebars (strict, not escaped) over `delivery_id`, `channel`, `to`, `text`,
        /// `title`, `body`, `data`; it must render JSON. Without it those fields are sent.
        #[serde(default)]
        body_template: Option<String>,
    },
    /// Firebase Cloud Messaging HTTP v1 (push).
    Fcm {
        /// The service-account key JSON downloaded from Firebase.
        service_account_file: PathBuf,
        #[serde(default = "default_fcm_url")]
        base_url: String,
        /// Overrides the key's `token_uri`.
        #[serde(default)]
        token_uri: Option<String>,
    },
    /// Twilio's Messages API (SMS).
    Twilio {
        base_url: String,
        account_sid: String,
        auth_token: Secret,
        from: String,
    },
}

impl Settings {
    /// Loads settings from the process environment and `config_dir` (may be absent).
    pub fn load(config_dir: &Path) -> anyhow::Result<Self> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(config_dir, &vars)
    }

    /// Loads settings from an explicit environment, so tests need no global state.
    pub fn load_from(config_dir: &Path, vars: &[(String, String)]) -> anyhow::Result<Self> {
        let var = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let env = var("HERALD_ENV").unwrap_or_else(|| "development".to_owned());
        let env_map: config::Map<String, String> = vars
            .iter()
            .filter(|(k, _)| k.starts_with("HERALD__"))
            .cloned()
            .collect();
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .add_source(config::File::from(config_dir.join(format!("{env}.toml"))).required(false))
            .add_source(
                config::Environment::with_prefix("HERALD")
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(env_map))
                    .try_parsing(true)
                    // Lists from variables: comma-separated.
                    .list_separator(",")
                    .with_list_parse_key("inbox.allowed_origins")
                    .with_list_parse_key("amqp.urls"),
            );
        if let Some(uri) = var("MONGODB_URI").filter(|v| !v.is_empty()) {
            builder = builder.set_override("mongodb.uri", uri)?;
        }
        if let Some(url) = var("AMQP_URL").filter(|v| !v.is_empty()) {
            // The single-address shortcut wins over a configured list.
            builder = builder
                .set_override("amqp.url", url)?
                .set_override("amqp.urls", Vec::<String>::new())?;
        }
        let settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("invalid configuration")?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the rules serde cannot express; each message names its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let bad =
            |key: &str, why: &str| Err(anyhow::anyhow!("invalid configuration: {key}: {why}"));
        if !self.mongodb.uri.expose().starts_with("mongodb") {
            return bad("mongodb.uri", "must be a mongodb:// or mongodb+srv:// URI");
        }
        if self.mongodb.database.is_empty() || self.mongodb.database.contains(['/', '.', ' ']) {
            return bad("mongodb.database", "must be a plain database name");
        }
        if !self.amqp.url.expose().starts_with("amqp") {
            return bad("amqp.url", "must be an amqp:// or amqps:// URL");
        }
        if self.status_webhooks.lease_secs * 1000 < self.status_webhooks.timeout_ms + 5000 {
            return bad(
                "status_webhooks.lease_secs",
                "must outlast a try: at least timeout_ms + 5 s (a message leased to a try \
                 is not sent again before its lease ends)",
            );
        }
        if self
            .amqp
            .urls
            .iter()
            .any(|u| !u.expose().starts_with("amqp"))
        {
            return bad("amqp.urls", "each must be an amqp:// or amqps:// URL");
        }
        if self.amqp.prefix.is_empty() {
            return bad("amqp.prefix", "must not be empty");
        }
        for (key, value) in [
            ("worker.high_concurrency", self.worker.high_concurrency),
            ("worker.normal_concurrency", self.worker.normal_concurrency),
            ("worker.low_concurrency", self.worker.low_concurrency),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if self.worker.commit_batch_max == 0 || self.worker.fanout_batch_size == 0 {
            return bad(
                "worker.commit_batch_max / worker.fanout_batch_size",
                "must be at least 1",
            );
        }
        if !(1..=20).contains(&self.worker.max_attempts) {
            return bad("worker.max_attempts", "must be between 1 and 20");
        }
        if !(0.0..1.0).contains(&self.worker.retry_jitter) {
            return bad("worker.retry_jitter", "must be at least 0 and below 1");
        }
        if self.scheduler.batch_size <= 0 || self.scheduler.concurrency == 0 {
            return bad(
                "scheduler.batch_size / scheduler.concurrency",
                "must be positive",
            );
        }
        if self.scheduler.misfire_grace_secs < 0 {
            return bad("scheduler.misfire_grace_secs", "must not be negative");
        }
        if self.outbox.batch_size <= 0 || self.outbox.lease_secs <= 0 {
            return bad("outbox.batch_size / outbox.lease_secs", "must be positive");
        }
        if self.environment == "production" && self.email.transport == EmailTransportKind::File {
            return bad(
                "email.transport",
                "`file` only writes .eml files; with environment = \"production\" use \"smtp\"",
            );
        }
        if url::Url::parse(&self.server.public_url)
            .map_or(true, |u| !matches!(u.scheme(), "http" | "https"))
        {
            return bad("server.public_url", "must be an http:// or https:// URL");
        }
        if let Some(key) = &self.feedback.sendgrid.public_key {
            if let Err(why) = crate::domain::signatures::p256_public_key(key) {
                return bad("feedback.sendgrid.public_key", &why);
            }
        }
        for pattern in &self.feedback.ses.cert_hosts {
            if pattern.is_empty() || pattern.split('.').any(str::is_empty) {
                return bad(
                    "feedback.ses.cert_hosts",
                    "each must be a host name pattern",
                );
            }
        }
        let secret = self.email.unsubscribe_secret.expose();
        if secret.len() < 16 {
            return bad("email.unsubscribe_secret", "must be at least 16 characters");
        }
        if self.environment == "production" && secret == DEVELOPMENT_UNSUBSCRIBE_SECRET {
            return bad(
                "email.unsubscribe_secret",
                "with environment = \"production\" set a long random value of your own",
            );
        }
        let inbox = self.inbox.secret.expose();
        if inbox.len() < 16 {
            return bad(
                "inbox.secret",
                "must be at least 16 characters (HERALD__INBOX__SECRET: a long random value)",
            );
        }
        if self.environment == "production" && inbox == DEVELOPMENT_INBOX_SECRET {
            return bad(
                "inbox.secret",
                "with environment = \"production\" set a long random value of your own",
            );
        }
        if self.environment == "production" && self.inbox.demo {
            return bad("inbox.demo", "the demo page is for development only");
        }
        if !(60..=86_400).contains(&self.inbox.session_secs) {
            return bad("inbox.session_secs", "must be between 60 and 86400");
        }
        if !(1..=300).contains(&self.inbox.ping_secs) {
            return bad("inbox.ping_secs", "must be between 1 and 300");
        }
        for origin in &self.inbox.allowed_origins {
            let ok = url::Url::parse(origin).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.path() == "/"
                    && !origin.ends_with('/')
                    && u.query().is_none()
            });
            if !ok {
                return bad(
                    "inbox.allowed_origins",
                    "each must be an origin: scheme://host[:port], no path",
                );
            }
        }
        if let Some(path) = &self.email.return_path {
            let sample = path.replace("{delivery_id}", "01a24670-63af-75ad-8824-9ee61d5b3bd9");
            if !path.contains("{delivery_id}") || sample.parse::<lettre::Address>().is_err() {
                return bad(
                    "email.return_path",
                    "must be an address with {delivery_id} in it, such as bounces+{delivery_id}@example.com",
                );
            }
        }
        if let Some(mailbox) = &self.email.unsubscribe_mailbox {
            if mailbox.parse::<lettre::Address>().is_err() {
                return bad("email.unsubscribe_mailbox", "must be an email address");
            }
        }
        if self.email.from.parse::<lettre::message::Mailbox>().is_err() {
            return bad(
                "email.from",
                "must be a mailbox such as `herald <herald@example.com>`",
            );
        }
        for (channel, settings) in [("sms", &self.sms), ("push", &self.push)] {
            // In production a recorded message would be marked `sent` and reach nobody.
            if self.environment == "production" {
                if let Some(p) = settings
                    .providers
                    .iter()
                    .find(|p| matches!(p.kind, ProviderKind::Record))
                {
                    let key = format!("{channel}.providers.{}.kind", p.name);
                    return bad(
                        &key,
                        "`record` only writes messages to a file; with environment = \"production\" \
                         configure a real provider (twilio or webhook for sms, fcm or webhook for push) \
                         in config/production.toml",
                    );
                }
            }
            for p in &settings.providers {
                if p.rate_per_sec != 0.0 {
                    if let Err(why) = crate::domain::Rate::new(p.rate_per_sec) {
                        let key = format!("{channel}.providers.{}.rate_per_sec", p.name);
                        return bad(&key, &format!("{why}, or 0 for unlimited"));
                    }
                }
            }
        }
        if self.events.max_payload_bytes == 0
            || self.events.max_payload_bytes > self.server.body_limit_bytes
        {
            return bad(
                "events.max_payload_bytes",
                "must be positive and no larger than server.body_limit_bytes",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn embedded_defaults_load_without_any_file() {
        let s = Settings::load_from(Path::new("/nonexistent"), &[]).expect("defaults load");
        assert_eq!(s.amqp.prefix, "herald");
        assert_eq!(s.email.transport, EmailTransportKind::File);
    }

    #[test]
    fn environment_overrides_nested_keys_and_shortcuts() {
        let s = Settings::load_from(
            Path::new("/nonexistent"),
            &env(&[
                ("HERALD__WORKER__HIGH_CONCURRENCY", "3"),
                ("HERALD__EMAIL__SMTP__PASSWORD", "hunter2"),
                ("MONGODB_URI", "mongodb://user:pw@db:27017/?replicaSet=rs0"),
            ]),
        )
        .expect("loads");
        assert_eq!(s.worker.high_concurrency, 3);
        assert_eq!(s.email.smtp.password.expose(), "hunter2");
        assert!(s.mongodb.uri.expose().contains("rs0"));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let s = Settings::load_from(
            Path::new("/nonexistent"),
            &env(&[
                ("HERALD__EMAIL__SMTP__PASSWORD", "hunter2"),
                ("AMQP_URL", "amqp://u:topsecret@mq:5672/%2f"),
            ]),
        )
        .expect("loads");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("topsecret"));
    }

    /// The shipped `config/` folder.
    fn shipped() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
    }

    #[test]
    fn production_refuses_providers_that_only_record() {
        let secret = (
            "HERALD__EMAIL__UNSUBSCRIBE_SECRET",
            "a long random value of our own",
        );
        let inbox = ("HERALD__INBOX__SECRET", "another long random value");
        let err = Settings::load_from(
            &shipped(),
            &env(&[("HERALD_ENV", "production"), secret, inbox]),
        )
        .expect_err("record providers in production");
        let shown = format!("{err:#}");
        assert!(shown.contains("sms.providers.record.kind"), "{shown}");

        let dir = std::env::temp_dir().join(format!("herald-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let real = r#"environment = "production"
[email]
transport = "smtp"
[[sms.providers]]
name = "twilio"
kind = "twilio"
base_url = "https://api.twilio.com"
account_sid = "AC123"
auth_token = "secret"
from = "+15550100"
[[push.providers]]
name = "gateway"
kind = "webhook"
url = "https://push.example.com/send"
[inbox]
demo = false
"#;
        std::fs::write(dir.join("production.toml"), real).expect("write");
        let secret = (
            "HERALD__EMAIL__UNSUBSCRIBE_SECRET",
            "a long random value of our own",
        );
        let s = Settings::load_from(&dir, &env(&[("HERALD_ENV", "production"), secret, inbox]))
            .expect("real providers load");
        assert_eq!(
            s.sms.providers.len(),
            1,
            "the file's providers replace the defaults"
        );
        assert!(matches!(
            s.sms.providers[0].kind,
            ProviderKind::Twilio { .. }
        ));
        let err = Settings::load_from(
            &dir,
            &env(&[
                ("HERALD_ENV", "production"),
                ("HERALD__EMAIL__TRANSPORT", "file"),
                secret,
            ]),
        )
        .expect_err("file email in production");
        assert!(format!("{err:#}").contains("email.transport"), "{err:#}");
        // Nor does it sign unsubscribe links with the secret everyone can read here.
        let err = Settings::load_from(&dir, &env(&[("HERALD_ENV", "production")]))
            .expect_err("the development unsubscribe secret in production");
        assert!(
            format!("{err:#}").contains("email.unsubscribe_secret"),
            "{err:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rates_a_token_bucket_cannot_honour_are_refused_naming_their_key() {
        for bad in ["0", "-1", "NaN", "1e-30"] {
            let err = Settings::load_from(
                Path::new("/nonexistent"),
                &env(&[("HERALD__AUTH__RATE_PER_SEC", bad)]),
            )
            .expect_err("must fail");
            assert!(
                format!("{err:#}").contains("rate_per_sec"),
                "{bad}: {err:#}"
            );
        }
    }

    #[test]
    fn a_bad_value_fails_naming_its_key() {
        let err = Settings::load_from(
            Path::new("/nonexistent"),
            &env(&[("HERALD__WORKER__HIGH_CONCURRENCY", "lots")]),
        )
        .expect_err("must fail");
        assert!(format!("{err:#}").contains("high_concurrency"), "{err:#}");

        let err = Settings::load_from(
            Path::new("/nonexistent"),
            &env(&[("HERALD__EMAIL__FROM", "not a mailbox")]),
        )
        .expect_err("must fail");
        assert!(format!("{err:#}").contains("email.from"), "{err:#}");
    }
}
