//! `spawn_app()` and the real servers tests talk to (herald's test bed: an SMTP server that
//! records what it receives, a TCP proxy that can cut herald off from RabbitMQ).

use std::path::PathBuf;
use std::time::Duration;

use herald::app::Context;
use herald::config::Settings;
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn mongodb_uri() -> String {
    std::env::var("MONGODB_URI")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:47017/?directConnection=true".to_owned())
}

/// The API's timestamp format.
pub fn iso(t: mongodb::bson::DateTime) -> String {
    chrono::DateTime::from_timestamp_millis(t.timestamp_millis())
        .expect("time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn init_logs() {
    if std::env::var("TEST_LOG").is_ok() {
        herald::telemetry::init(&herald::config::LogSettings {
            format: herald::config::LogFormat::Pretty,
            level: "debug".to_owned(),
        });
    }
}

// ---- SMTP ----------------------------------------------------------------------------------

/// A message as the SMTP server received it, with its MIME parts decoded on demand.
#[derive(Debug, Clone)]
pub struct Mail(pub herald_testbed::Mail);

impl std::ops::Deref for Mail {
    type Target = herald_testbed::Mail;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Mail {
    pub fn subject(&self) -> String {
        self.parsed(|m| m.subject().unwrap_or_default().to_owned())
    }
    pub fn text(&self) -> String {
        self.parsed(|m| m.body_text(0).unwrap_or_default().into_owned())
    }
    pub fn html(&self) -> String {
        self.parsed(|m| m.body_html(0).unwrap_or_default().into_owned())
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.parsed(|m| m.header_raw(name).map(|v| v.trim().to_owned()))
    }
    fn parsed<T>(&self, f: impl FnOnce(&mail_parser::Message<'_>) -> T) -> T {
        let m = mail_parser::MessageParser::default()
            .parse(self.data.as_bytes())
            .expect("a parseable message");
        f(&m)
    }
}

/// herald's test-bed SMTP server, answering with test [`Mail`]s.
#[derive(Clone)]
pub struct SmtpServer(herald_testbed::SmtpServer);

impl std::ops::Deref for SmtpServer {
    type Target = herald_testbed::SmtpServer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl SmtpServer {
    pub async fn start() -> Self {
        Self(
            herald_testbed::SmtpServer::start()
                .await
                .expect("bind smtp"),
        )
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.0.mails().into_iter().map(Mail).collect()
    }

    /// Waits until at least `n` messages arrived (or panics after `secs`).
    pub async fn wait_for(&self, n: usize, secs: u64) -> Vec<Mail> {
        match self.0.wait_for(n, Duration::from_secs(secs)).await {
            Ok(mails) => mails.into_iter().map(Mail).collect(),
            Err(got) => panic!("expected {n} emails within {secs}s, got {}", got.len()),
        }
    }
}

pub use herald_testbed::TcpProxy;

/// `host:port` of the MongoDB server in `mongodb_uri()`, for a proxy in front of it.
pub fn mongodb_host_port() -> String {
    let uri = mongodb_uri();
    let rest = uri.split("://").nth(1).unwrap_or("127.0.0.1:47017");
    let hosts = rest.split(['/', '?']).next().unwrap_or(rest);
    hosts.rsplit('@').next().unwrap_or(hosts).to_owned()
}

/// `host:port` of the broker in `amqp_url()`.
pub fn amqp_host_port() -> String {
    let url = amqp_url();
    let after_at = url.rsplit('@').next().unwrap_or("127.0.0.1:5672");
    after_at
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:5672")
        .to_owned()
}

// ---- the app ---------------------------------------------------------------------------

/// Which roles a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    All,
    ApiOnly,
    /// API and workers but no scheduler: tests drive `scheduler::tick(now)` themselves.
    NoScheduler,
}

pub struct TestOptions {
    pub roles: Roles,
    /// Point herald's AMQP connection somewhere else (a proxy).
    pub amqp_url: Option<String>,
    /// Several broker addresses instead (`amqp.urls`): `amqp_url` is then not used.
    pub amqp_urls: Vec<String>,
    /// Point herald's MongoDB connection somewhere else (a proxy); the test's own client
    /// still connects directly.
    pub mongodb_url: Option<String>,
    /// Extra `HERALD__*` variables.
    pub env: Vec<(String, String)>,
    /// A `config/test.toml` for what variables cannot say (provider lists).
    pub config_toml: Option<String>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            roles: Roles::All,
            amqp_url: None,
            amqp_urls: Vec::new(),
            mongodb_url: None,
            env: Vec::new(),
            config_toml: None,
        }
    }
}

/// Another API process of a [`TestApp`].
pub struct OtherApi {
    pub address: String,
    cancel: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl OtherApi {
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
}

pub struct TestApp {
    pub address: String,
    pub settings: Settings,
    /// Sends an admin key with every request.
    pub http: reqwest::Client,
    pub ctx: Context,
    pub smtp: SmtpServer,
    pub db: mongodb::Database,
    pub files: PathBuf,
    cancel: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A greeting by email to user `u1` with `note`, as the API builds one: the notification
/// and the outbox entry that dispatches it (neither stored).
pub fn greeting_to_u1(
    priority: herald::domain::Priority,
    note: &str,
) -> (herald::store::NotificationDoc, herald::store::OutboxDoc) {
    herald::store::new_notification(
        herald::store::NotificationSpec {
            event_id: None,
            event_type: "greeting".into(),
            priority,
            recipients: herald::store::RecipientsDoc {
                user_ids: vec!["u1".into()],
                ..Default::default()
            },
            channels: Some(vec![herald::domain::Channel::Email]),
            payload: mongodb::bson::doc! {"note": note},
            source: "test".into(),
            schedule_id: None,
            upstream_created_at: None,
            category: None,
        },
        None,
    )
}

/// An HTTP client that sends `key` as a bearer token with every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().expect("header value"),
    );
    // A request left unanswered fails its test rather than holding up the whole suite.
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// Sends a request; returns the status and the JSON body (null when there is none).
pub async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestOptions::default()).await
}

pub async fn spawn_app_with(options: TestOptions) -> TestApp {
    init_logs();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let smtp = SmtpServer::start().await;
    let files = std::env::temp_dir().join(format!("herald-test-{id}"));
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut vars: Vec<(String, String)> = vec![
        (
            "MONGODB_URI".into(),
            options.mongodb_url.clone().unwrap_or_else(mongodb_uri),
        ),
        (
            "AMQP_URL".into(),
            options.amqp_url.clone().unwrap_or_else(amqp_url),
        ),
        (
            "HERALD__MONGODB__DATABASE".into(),
            format!("herald_test_{}", &id[..16]),
        ),
        (
            "HERALD__AMQP__PREFIX".into(),
            format!("herald-test-{}", &id[..12]),
        ),
        ("HERALD__AMQP__RECONNECT_MAX_MS".into(), "300".into()),
        ("HERALD__OUTBOX__POLL_INTERVAL_MS".into(), "100".into()),
        ("HERALD__WORKER__RETRY_BASE_MS".into(), "200".into()),
        ("HERALD__WORKER__MAX_ATTEMPTS".into(), "3".into()),
        // Tests click and poll faster than people; the budget's own test lowers it.
        ("HERALD__INBOX__RATE_PER_SEC".into(), "1000000".into()),
        ("HERALD__EMAIL__TRANSPORT".into(), "smtp".into()),
        ("HERALD__EMAIL__SMTP__PORT".into(), smtp.port.to_string()),
        (
            "HERALD__EMAIL__FILE_DIR".into(),
            files.join("email").display().to_string(),
        ),
        (
            "HERALD__SMS__RECORD_DIR".into(),
            files.display().to_string(),
        ),
        (
            "HERALD__PUSH__RECORD_DIR".into(),
            files.display().to_string(),
        ),
        (
            "HERALD__TEMPLATES__DIR".into(),
            manifest
                .join("tests/fixtures/templates")
                .display()
                .to_string(),
        ),
    ];
    vars.extend(options.env);
    if !options.amqp_urls.is_empty() {
        // The single-address shortcut would win over the list.
        vars.retain(|(k, _)| k != "AMQP_URL");
        vars.push(("HERALD__AMQP__URLS".into(), options.amqp_urls.join(",")));
    }
    let config_dir = match &options.config_toml {
        Some(toml) => {
            let dir = files.join("config");
            std::fs::create_dir_all(&dir).expect("config dir");
            std::fs::write(dir.join("test.toml"), toml).expect("test.toml");
            vars.push(("HERALD_ENV".into(), "test".into()));
            dir
        }
        None => manifest.join("config"),
    };
    let settings = Settings::load_from(&config_dir, &vars).expect("test settings");
    let ctx = Context::build(settings.clone()).await.expect("context");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind api");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    let cancel = CancellationToken::new();
    let task = match options.roles {
        Roles::All => tokio::spawn(herald::roles::all(ctx.clone(), listener, cancel.clone())),
        Roles::ApiOnly => tokio::spawn(herald::roles::api(ctx.clone(), listener, cancel.clone())),
        Roles::NoScheduler => {
            let (c, k) = (ctx.clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::try_join!(
                    herald::roles::api(c.clone(), listener, k.clone()),
                    herald::roles::worker(c, k),
                )?;
                Ok(())
            })
        }
    };
    let client = mongodb::Client::with_uri_str(mongodb_uri())
        .await
        .expect("mongo client");
    // SecantusDB reads every change stream only up to its oldest open transaction, in
    // any database: a transaction a test leaves open on purpose (a connection cut
    // mid-commit, a process killed) would stall every other test's live tail until the
    // server reaps it, after 60 s by default. 10 s bounds that stall. (mongod has no
    // such coupling, and may refuse the command: that is fine.)
    let _ = client
        .database("admin")
        .run_command(doc! {"setParameter": 1, "transactionLifetimeLimitSeconds": 10})
        .await;
    let db = client.database(&settings.mongodb.database);
    // Every request of the tests carries an admin key unless a test says otherwise.
    let (_, key) = ctx
        .store
        .create_key(
            "tests",
            &[herald::domain::Scope::Admin],
            Some(herald::domain::Rate::new(1e6).expect("rate")),
        )
        .await
        .expect("admin key");
    let app = TestApp {
        settings: settings.clone(),
        address,
        http: client_with_key(&key),
        ctx,
        smtp,
        db,
        files,
        cancel,
        task: Some(task),
    };
    app.wait_until_serving().await;
    app
}

impl TestApp {
    async fn wait_until_serving(&self) {
        for _ in 0..100 {
            if let Ok(r) = self
                .http
                .get(format!("{}/health", self.address))
                .send()
                .await
            {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("herald did not start serving");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn post_event(&self, body: &Value) -> (u16, Value) {
        self.post("/v1/events", body).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(self.http.patch(self.url(path)).json(body)).await
    }

    pub async fn post_raw(&self, body: impl Into<reqwest::Body>) -> (u16, Value) {
        answer(
            self.http
                .post(self.url("/v1/events"))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        answer(self.http.get(self.url(path))).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(self.http.put(self.url(path)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> u16 {
        self.http
            .delete(self.url(path))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    pub async fn put_user(&self, id: &str, body: Value) {
        let (status, body) = self.put(&format!("/v1/users/{id}"), &body).await;
        assert!(status == 201 || status == 200, "{status} {body}");
    }

    /// The `/metrics` exposition.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Asserts that `/metrics` holds each of `lines`.
    pub async fn assert_metrics(&self, lines: &[&str]) {
        let metrics = self.metrics().await;
        for line in lines {
            assert!(metrics.contains(line), "{line} in\n{metrics}");
        }
    }

    /// User `u1`: Ana, reached by email at one@example.com.
    pub async fn put_ana(&self) {
        self.put_user(
            "u1",
            json!({"email": "one@example.com", "first_name": "Ana"}),
        )
        .await;
    }

    /// Posts a greeting to a segment whose one member is Ana (`u1`): an audience (chunks
    /// are for groups and segments) of one. Returns the notification's id.
    pub async fn post_to_an_audience_of_one(&self) -> String {
        self.put_user(
            "u1",
            json!({"email": "one@example.com", "first_name": "Ana", "tags": ["solo"]}),
        )
        .await;
        let (_, body) = self
            .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                "recipients": {"segment": {"tag": "solo"}}, "payload": {"note": "x"}}))
            .await;
        body["notification_id"].as_str().expect("id").to_owned()
    }

    /// Waits until the notification reaches a final status; returns its JSON.
    pub async fn wait_finished(&self, notification_id: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, n) = self
                .get(&format!("/v1/notifications/{notification_id}"))
                .await;
            let status = n["status"].as_str().unwrap_or_default();
            if ["completed", "partially_failed", "failed"].contains(&status) {
                return n;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("notification {notification_id} did not finish within {secs}s: {n}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The delivery log of a notification.
    pub async fn deliveries(&self, notification_id: &str) -> Vec<Value> {
        let (status, body) = self
            .get(&format!("/v1/deliveries?notification_id={notification_id}"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Messages ready (not yet handed to a consumer) on a priority lane.
    pub async fn lane_depth(&self, lane: herald::domain::Priority) -> u32 {
        let broker = &self.ctx.broker;
        broker
            .queue_depth(broker.names().lane(lane))
            .await
            .expect("passive declare")
    }

    /// Waits until a lane has handed out every message, then lets handlers finish.
    pub async fn wait_lane_drained(&self, lane: herald::domain::Priority) {
        for _ in 0..200 {
            if self.lane_depth(lane).await == 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("lane {lane:?} was not drained");
    }

    /// A second API process on the same database and broker (another listener, its own
    /// clients and change streams); stop it with [`OtherApi::stop`].
    pub async fn second_api(&self) -> OtherApi {
        let ctx = Context::build(self.settings.clone())
            .await
            .expect("context");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind api");
        let address = format!("http://{}", listener.local_addr().expect("addr"));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(herald::roles::api(ctx, listener, cancel.clone()));
        for _ in 0..100 {
            if reqwest::get(format!("{address}/health"))
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        OtherApi {
            address,
            cancel,
            task,
        }
    }

    /// Documents in a collection (tests read the database directly to prove nothing was written).
    pub async fn count(&self, collection: &str) -> u64 {
        self.db
            .collection::<Document>(collection)
            .count_documents(doc! {})
            .await
            .expect("count")
    }

    /// Stops herald, then removes its database, queues and files.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
        let _ = self.ctx.broker.delete_topology().await;
        self.ctx.broker.close().await;
        self.ctx.store.close().await;
        let _ = self.db.drop().await;
        let _ = std::fs::remove_dir_all(&self.files);
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // A failed test still stops its background roles.
        self.cancel.cancel();
        if self.task.is_none() {
            return;
        }
        // …and removes its database, queues and files: the broker and the database server
        // are shared by every run on the machine. On a runtime of its own, since this one
        // may be unwinding from the failure.
        let settings = self.settings.clone();
        let files = self.files.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let broker =
                    herald::queue::Broker::new(&settings.amqp, settings.worker.max_attempts);
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), broker.delete_topology()).await;
                broker.close().await;
                if let Ok(client) = mongodb::Client::with_uri_str(mongodb_uri()).await {
                    let _ = client.database(&settings.mongodb.database).drop().await;
                    client.shutdown().await;
                }
            });
            let _ = std::fs::remove_dir_all(files);
        });
        let _ = cleanup.join();
    }
}

/// The Python the tests check herald against (`HERALD_PYTHON`, with dkimpy and twilio from
/// PyPI); `None` skips the check, except under scripts/test, which installs it.
pub fn python_checker(what: &str) -> Option<PathBuf> {
    let python = std::env::var("HERALD_PYTHON")
        .ok()
        .map(PathBuf::from)
        .filter(|p| p.exists());
    if python.is_none() {
        assert!(
            std::env::var("HERALD_PYTHON_TESTS").as_deref() != Ok("require"),
            "{what} cannot run: set HERALD_PYTHON to a Python with it installed"
        );
        eprintln!("skipping the {what} check: no HERALD_PYTHON");
    }
    python
}

/// A directory of its own under the system's temporary directory, removed when dropped.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("herald-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    TempDir(dir)
}

/// The plan an `explain` says the server will run (rejected alternatives may sort; they
/// do not run), as relaxed extended JSON to search.
pub fn winning_plan(explained: &Document) -> String {
    let winning = explained
        .get_document("queryPlanner")
        .and_then(|q| q.get_document("winningPlan"))
        .expect("winning plan")
        .clone();
    mongodb::bson::Bson::Document(winning)
        .into_relaxed_extjson()
        .to_string()
}
