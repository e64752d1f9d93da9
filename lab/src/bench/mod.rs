//! `herald-lab bench`: reproducible measurements against the real local servers, printed and saved as JSON.

mod commands;
mod cpu;
pub mod inbox;
mod queue_ceiling;
pub mod sink;
mod status_hooks;
mod store_ceiling;
pub mod suite;

pub use status_hooks::webhooks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use herald::app::Context;

use crate::db::LabDb;
use herald::config::{QueueType, Settings};
use herald::domain::plan::MisfirePolicy;
use herald::domain::Priority;
use herald::store::{RecipientsDoc, ScheduleDoc, ScheduleStatus, UserDoc};

/// p-th percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Settings for a throw-away database and queue prefix of this run.
fn isolated(mut settings: Settings, name: &str) -> Settings {
    let stamp = Utc::now().format("%Y%m%d%H%M%S");
    settings.mongodb.database = format!("herald_bench_{name}_{stamp}");
    settings.amqp.prefix = format!("herald-bench-{name}-{stamp}");
    settings
}

/// A context on this run's database, migrated, with one user who has an email address.
async fn with_bench_user(settings: &Settings) -> anyhow::Result<Context> {
    let ctx = Context::build(settings.clone()).await?;
    ctx.store.migrate().await?;
    ctx.store
        .put_user(UserDoc {
            id: "bench-user".into(),
            email: Some("bench@example.com".into()),
            ..Default::default()
        })
        .await?;
    Ok(ctx)
}

async fn clean_up(ctx: &Context) {
    if let Err(e) = ctx.broker.delete_topology().await {
        tracing::warn!(
            error = format!("{e:#}"),
            "could not delete the bench queues"
        );
    }
    ctx.broker.close().await;
    ctx.store.close().await;
    let dropped = match LabDb::connect(&ctx.settings.mongodb).await {
        Ok(db) => db.drop_and_close().await,
        Err(e) => Err(e),
    };
    if let Err(e) = dropped {
        tracing::warn!(
            error = format!("{e:#}"),
            "could not drop the bench database"
        );
    }
}

/// Saves a result under `var/bench/` and returns the path.
pub fn save(name: &str, result: &Value) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from("var/bench");
    std::fs::create_dir_all(&dir)?;
    // The whole suite's file is named by its time alone: var/bench/<timestamp>.json.
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
    let path = match name {
        "all" => dir.join(format!("{stamp}.json")),
        _ => dir.join(format!("{stamp}-{name}.json")),
    };
    std::fs::write(&path, serde_json::to_vec_pretty(result)?)?;
    Ok(path)
}

/// Fire lag of `schedules` slots spread evenly over `window` seconds, claimed by
/// `instances` scheduler processes' worth of roles racing each other.
pub async fn scheduler(
    settings: Settings,
    schedules: usize,
    window_secs: u64,
    instances: usize,
) -> anyhow::Result<Value> {
    let settings = isolated(settings, "scheduler");
    let ctx = with_bench_user(&settings).await?;
    let lead = Duration::from_secs(5);
    let start = Utc::now() + chrono::Duration::from_std(lead)?;
    let step_ms = (window_secs * 1000) as f64 / schedules.max(1) as f64;
    let now = mongodb::bson::DateTime::now();
    let docs: Vec<ScheduleDoc> = (0..schedules)
        .map(|i| {
            let slot = start + chrono::Duration::milliseconds((i as f64 * step_ms) as i64);
            ScheduleDoc {
                id: uuid::Uuid::now_v7().to_string(),
                name: format!("bench {i}"),
                cron: "0 0 1 1 *".into(),
                timezone: "UTC".into(),
                start_at: None,
                end_at: None,
                event_type: "welcome".into(),
                priority: Priority::Low,
                recipients: RecipientsDoc {
                    user_ids: vec!["bench-user".into()],
                    ..Default::default()
                },
                channels: None,
                payload: Default::default(),
                misfire_policy: MisfirePolicy::FireOnce,
                category: None,
                status: ScheduleStatus::Active,
                next_fire_at: Some(mongodb::bson::DateTime::from_millis(
                    slot.timestamp_millis(),
                )),
                last_fire_at: None,
                fire_count: 0,
                event_id: None,
                created_at: now,
                updated_at: now,
            }
        })
        .collect();
    let lab = LabDb::connect(&settings.mongodb).await?;
    lab.insert_schedules(&docs).await?;
    println!("{schedules} schedules due over {window_secs}s from {start}; {instances} scheduler instance(s) racing");

    let cancel = CancellationToken::new();
    let mut roles = Vec::new();
    for _ in 0..instances {
        let c = Context::build(settings.clone()).await?;
        roles.push(tokio::spawn(herald::roles::scheduler(c, cancel.clone())));
    }
    tokio::time::sleep(lead + Duration::from_secs(window_secs) + Duration::from_secs(5)).await;
    cancel.cancel();
    for r in roles {
        r.await.context("scheduler task")??;
    }

    let runs = lab.all_runs().await?;
    let mut per_schedule: HashMap<&str, usize> = HashMap::new();
    for r in &runs {
        *per_schedule.entry(r.schedule_id.as_str()).or_default() += 1;
    }
    let duplicates: usize = per_schedule.values().map(|n| n.saturating_sub(1)).sum();
    let missed = docs
        .iter()
        .filter(|d| !per_schedule.contains_key(d.id.as_str()))
        .count();
    let mut lags: Vec<i64> = runs.iter().map(|r| r.lag_ms).collect();
    lags.sort_unstable();
    let result = json!({
        "bench": "scheduler",
        "schedules": schedules,
        "window_secs": window_secs,
        "instances": instances,
        "runs": runs.len(),
        "duplicates": duplicates,
        "missed": missed,
        "lag_ms": {"p50": percentile(&lags, 50.0), "p99": percentile(&lags, 99.0), "max": lags.last().copied().unwrap_or(0)},
    });
    println!(
        "fire lag (claim - due): p50 {} ms, p99 {} ms, max {} ms; runs {}, duplicates {}, missed {}",
        result["lag_ms"]["p50"], result["lag_ms"]["p99"], result["lag_ms"]["max"], runs.len(), duplicates, missed
    );
    clean_up(&ctx).await;
    Ok(result)
}

/// `POST /v1/users/import` of `users` NDJSON profiles, through a real API server.
pub async fn import(settings: Settings, users: usize) -> anyhow::Result<Value> {
    let settings = isolated(settings, "import");
    let ctx = Context::build(settings).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let api = tokio::spawn(herald::roles::api(ctx.clone(), listener, cancel.clone()));
    let mut body = String::with_capacity(users * 160);
    for i in 0..users {
        body.push_str(
            &json!({
                "user_id": format!("user-{i:07}"), "email": format!("user{i}@example.com"),
                "first_name": "Bench", "last_name": format!("User {i}"), "locale": if i % 3 == 0 { "pt-BR" } else { "en" },
                "timezone": "Europe/Berlin", "tags": ["bench"],
            })
            .to_string(),
        );
        body.push('\n');
    }
    let bytes = body.len();
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/users/import");
    for _ in 0..50 {
        if client
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let report: Value = client
        .post(&url)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let secs = started.elapsed().as_secs_f64();
    let result = json!({
        "bench": "import",
        "users": users,
        "bytes": bytes,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "users_per_second": (users as f64 / secs).round(),
        "report": {"created": report["created"], "updated": report["updated"], "failed": report["failed"]},
    });
    println!(
        "imported {users} users ({:.1} MB) in {secs:.2} s = {:.0} users/s (created {}, failed {})",
        bytes as f64 / 1e6,
        users as f64 / secs,
        report["created"],
        report["failed"]
    );
    cancel.cancel();
    let _ = api.await;
    clean_up(&ctx).await;
    Ok(result)
}

/// The delivery log and statistics with `deliveries` records stored (30 days of history):
/// p50/p99 of the queries ops run most, through the HTTP API.
pub async fn logs(settings: Settings, deliveries: usize, samples: usize) -> anyhow::Result<Value> {
    use herald::domain::{Channel, DeliveryStatus};
    use herald::store::DeliveryDoc;
    use rand::Rng;

    let settings = isolated(settings, "logs");
    let ctx = Context::build(settings).await?;
    ctx.store.migrate().await?;
    let lab = LabDb::connect(&ctx.settings.mongodb).await?;
    let per_notification = 500;
    let users = (deliveries / 10).max(per_notification);
    let notifications = deliveries.div_ceil(per_notification);
    let now_ms = Utc::now().timestamp_millis();
    let span_ms: i64 = 30 * 86_400_000;
    let started = Instant::now();
    let mut rng = rand::rng();
    let mut written = 0;
    let mut batch: Vec<DeliveryDoc> = Vec::with_capacity(10_000);
    let mut notification_ids = Vec::with_capacity(notifications);
    for n in 0..notifications {
        let notification_id = uuid::Uuid::now_v7().to_string();
        notification_ids.push(notification_id.clone());
        let accepted = now_ms - span_ms + (n as i64 * span_ms) / notifications as i64;
        let event_type = [
            "order_shipped",
            "weekly_digest",
            "password_reset",
            "new_episode",
        ][n % 4];
        // Distinct recipients per notification, as a fan-out makes them.
        let first_user = rng.random_range(0..users);
        for k in 0..per_notification.min(deliveries - written) {
            let created = accepted + rng.random_range(0..120_000);
            let channel = match rng.random_range(0..100) {
                0..60 => Channel::Email,
                60..80 => Channel::Sms,
                80..95 => Channel::Push,
                _ => Channel::Webhook,
            };
            let status = match rng.random_range(0..100) {
                0..90 => DeliveryStatus::Sent,
                90..93 => DeliveryStatus::Failed,
                93..98 => DeliveryStatus::Skipped,
                98 => DeliveryStatus::Dead,
                _ => DeliveryStatus::Retrying,
            };
            let provider = match channel {
                Channel::Email => "smtp",
                Channel::Sms => ["twilio", "gateway"][rng.random_range(0..2)],
                Channel::Push => "fcm",
                Channel::Webhook => "webhook",
                Channel::InApp => "inbox",
            };
            let sent = (status == DeliveryStatus::Sent).then(|| {
                mongodb::bson::DateTime::from_millis(created + rng.random_range(50..5_000))
            });
            batch.push(DeliveryDoc {
                id: uuid::Uuid::now_v7().to_string(),
                notification_id: notification_id.clone(),
                event_type: event_type.to_owned(),
                user_id: format!("user-{:07}", (first_user + k) % users),
                channel,
                priority: Priority::Normal,
                schedule_id: None,
                status,
                reason: (status == DeliveryStatus::Failed).then(|| "rejected".to_owned()),
                provider: (status != DeliveryStatus::Skipped).then(|| provider.to_owned()),
                attempt_count: 1,
                attempts: Vec::new(),
                last_error: None,
                claim: None,
                accepted_at: Some(mongodb::bson::DateTime::from_millis(accepted)),
                created_at: mongodb::bson::DateTime::from_millis(created),
                updated_at: mongodb::bson::DateTime::from_millis(created),
                sent_at: sent,
                feedback: Vec::new(),
                complained_at: None,
                unsubscribed_at: None,
                seen_at: None,
                read_at: None,
                expire_at: None,
            });
            written += 1;
            if batch.len() == 10_000 {
                lab.load_deliveries(&batch).await?;
                batch.clear();
            }
        }
    }
    lab.load_deliveries(&batch).await?;
    let load_secs = started.elapsed().as_secs_f64();
    println!("stored {written} deliveries ({users} users, {notifications} notifications over 30 days) in {load_secs:.1} s");
    let started = Instant::now();
    ctx.store.rebuild_stats().await?;
    let rebuild_secs = started.elapsed().as_secs_f64();
    println!("rebuilt statistics from the log in {rebuild_secs:.1} s");

    let (_, key) = ctx
        .store
        .create_key(
            "bench",
            &[herald::domain::Scope::LogsRead],
            Some(herald::domain::Rate::new(1e9).expect("rate")),
        )
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let api = tokio::spawn(herald::api::serve(ctx.clone(), listener, cancel.clone()));
    let client = reqwest::Client::new();
    let iso = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    type PathOf = Box<dyn Fn(&mut rand::rngs::ThreadRng) -> String>;
    let queries: Vec<(&str, PathOf)> = vec![
        (
            "user_last_24h",
            Box::new(move |r| {
                format!(
                    "/v1/deliveries?user_id=user-{:07}&since={}",
                    r.random_range(0..users),
                    iso(now_ms - 86_400_000)
                )
            }),
        ),
        (
            "failed_sms_last_hour",
            Box::new(move |_| {
                format!(
                    "/v1/deliveries?status=failed&channel=sms&since={}",
                    iso(now_ms - 3_600_000)
                )
            }),
        ),
        (
            "notification_deliveries",
            Box::new({
                let ids = notification_ids.clone();
                move |r| {
                    format!(
                        "/v1/deliveries?notification_id={}",
                        ids[r.random_range(0..ids.len())]
                    )
                }
            }),
        ),
        (
            "stats_day_x_channel_30d",
            Box::new(move |_| {
                format!(
                    "/v1/stats/deliveries?group_by=day,channel&since={}",
                    iso(now_ms - span_ms)
                )
            }),
        ),
    ];
    let mut report = serde_json::Map::new();
    for (name, make) in &queries {
        let mut took = Vec::with_capacity(samples);
        for i in 0..samples + 5 {
            let path = make(&mut rng);
            let t = Instant::now();
            let body: Value = client
                .get(format!("http://{addr}{path}"))
                .bearer_auth(&key)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            // The first few warm the caches; they are not counted.
            if i >= 5 {
                took.push(t.elapsed().as_micros() as i64);
            }
            anyhow::ensure!(body.is_object(), "{name}: unexpected answer");
        }
        took.sort_unstable();
        let ms = |us: i64| (us as f64 / 100.0).round() / 10.0;
        let (p50, p99) = (ms(percentile(&took, 50.0)), ms(percentile(&took, 99.0)));
        println!("{name:<26} p50 {p50:>7.1} ms   p99 {p99:>7.1} ms   ({samples} requests)");
        report.insert(
            (*name).to_owned(),
            json!({"p50_ms": p50, "p99_ms": p99, "requests": samples}),
        );
    }
    cancel.cancel();
    let _ = api.await;
    clean_up(&ctx).await;
    Ok(json!({
        "bench": "logs",
        "deliveries": written,
        "load_seconds": (load_secs * 10.0).round() / 10.0,
        "stats_rebuild_seconds": (rebuild_secs * 10.0).round() / 10.0,
        "queries": report,
    }))
}

/// The machine's own ceilings, measured in this run: RabbitMQ publish (confirmed,
/// persistent) and consume (manual acks) on one queue, MongoDB bulk inserts and
/// outcome-shaped transactions. herald's figures are reported against these.
pub async fn ceilings(settings: Settings, messages: usize, docs: usize) -> anyhow::Result<Value> {
    let settings = isolated(settings, "ceilings");
    let ctx = Context::build(settings).await?;
    // A delivery job is about this large (JSON with two UUIDs and a version).
    let job_size = 160;
    // Classic and quorum queues alternately, twice each; each figure is the mean of two.
    let mut runs = Vec::new();
    for _ in 0..2 {
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            let c = queue_ceiling::measure(&ctx.broker, messages, job_size, queue_type).await?;
            runs.push((queue_type, c));
        }
    }
    let mean = |t: QueueType| {
        let of: Vec<_> = runs
            .iter()
            .filter(|(q, _)| *q == t)
            .map(|(_, c)| c)
            .collect();
        queue_ceiling::Ceiling {
            publish_per_sec: of.iter().map(|c| c.publish_per_sec).sum::<f64>() / of.len() as f64,
            consume_per_sec: of.iter().map(|c| c.consume_per_sec).sum::<f64>() / of.len() as f64,
        }
    };
    let (rabbit, quorum) = (mean(QueueType::Classic), mean(QueueType::Quorum));
    println!(
        "RabbitMQ: publish with confirms {:.0} msg/s, consume with acks {:.0} msg/s ({messages} persistent messages of {job_size} B, classic queue)",
        rabbit.publish_per_sec, rabbit.consume_per_sec
    );
    println!(
        "RabbitMQ quorum queue (one node): publish {:.0} msg/s ({:.2} of classic), consume {:.0} msg/s ({:.2} of classic)",
        quorum.publish_per_sec,
        quorum.publish_per_sec / rabbit.publish_per_sec,
        quorum.consume_per_sec,
        quorum.consume_per_sec / rabbit.consume_per_sec
    );
    let batch = 64;
    let database = cpu::port_of(ctx.settings.mongodb.uri.expose()).and_then(cpu::listener);
    let mongo = store_ceiling::measure(
        &LabDb::connect(&ctx.settings.mongodb).await?,
        docs,
        batch,
        database,
    )
    .await?;
    let cpu = |c: Option<f64>| c.map_or("unseen".to_owned(), |c| format!("{c:.2}"));
    println!(
        "MongoDB (deliveries' indexes): bulk insert {:.0} docs/s ({} database CPU s per 1,000); outcome-shaped transactions {:.0}/s ({batch} outcomes each = {:.0} outcomes/s); written once with their outcome, {batch} a transaction: {:.0} deliveries/s ({} database CPU s per 1,000)",
        mongo.inserts_per_sec, cpu(mongo.insert_cpu_per_1000), mongo.transactions_per_sec, mongo.outcomes_per_sec,
        mongo.written_with_outcome_per_sec, cpu(mongo.written_with_outcome_cpu_per_1000)
    );
    clean_up(&ctx).await;
    Ok(json!({
        "bench": "ceilings",
        "rabbitmq": {"messages": messages, "message_bytes": job_size,
            "publish_confirmed_per_sec": rabbit.publish_per_sec.round(),
            "consume_acked_per_sec": rabbit.consume_per_sec.round(),
            "quorum": {"publish_confirmed_per_sec": quorum.publish_per_sec.round(),
                "consume_acked_per_sec": quorum.consume_per_sec.round()}},
        "mongodb": {"documents": docs, "insert_per_sec": mongo.inserts_per_sec.round(),
            "transactions_per_sec": mongo.transactions_per_sec.round(),
            "outcomes_in_transactions_per_sec": mongo.outcomes_per_sec.round(), "outcomes_per_transaction": batch,
            "written_with_outcome_per_sec": mongo.written_with_outcome_per_sec.round(),
            "insert_database_cpu_seconds_per_1000": mongo.insert_cpu_per_1000,
            "written_with_outcome_database_cpu_seconds_per_1000": mongo.written_with_outcome_cpu_per_1000},
    }))
}

/// Peak resident memory of a process (`VmHWM`), in MB.
pub(crate) fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

/// Resident memory of a process now (`VmRSS`), in MB.
pub(crate) fn rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmRSS:")
}

/// A memory line of `/proc/<pid>/status`, in MB.
fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Ingest: `clients` concurrent clients post single-recipient events to a `herald api`
/// process of its own (this process is only the load generator) → accepted events/s and
/// response times; each answer comes after the durable write.
pub async fn ingest(settings: Settings, events: usize, clients: usize) -> anyhow::Result<Value> {
    let settings = isolated(settings, "ingest");
    let ctx = with_bench_user(&settings).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let Api {
        process: api,
        pid,
        base,
        key,
    } = Api::start(&ctx, &settings, &client).await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (client, base, key, next) = (client.clone(), base.clone(), key.clone(), next.clone());
        tasks.spawn(async move {
            let mut took = Vec::new();
            let mut refused = 0usize;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < events {
                let body = json!({"event_type": "order_shipped", "priority": "normal",
                    "channels": ["email"], "recipients": {"user_ids": ["bench-user"]},
                    "payload": {"order_id": uuid::Uuid::new_v4().to_string()}});
                let t = Instant::now();
                let ok = client
                    .post(format!("{base}/v1/events"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 202);
                took.push(t.elapsed().as_micros() as i64);
                refused += usize::from(!ok);
            }
            (took, refused)
        });
    }
    let mut took = Vec::with_capacity(events);
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        let (t, f) = r?;
        took.extend(t);
        refused += f;
    }
    let secs = started.elapsed().as_secs_f64();
    let rss = peak_rss_mb(pid);
    stop_role(api).await;
    took.sort_unstable();
    let ms = |us: i64| (us as f64 / 100.0).round() / 10.0;
    let rate = (events - refused) as f64 / secs;
    println!(
        "ingest: {} events accepted in {secs:.1} s = {rate:.0} events/s ({clients} clients); response p50 {} ms, p99 {} ms; {refused} refused; api peak RSS {:.0} MB",
        events - refused,
        ms(percentile(&took, 50.0)),
        ms(percentile(&took, 99.0)),
        rss.unwrap_or(0.0)
    );
    clean_up(&ctx).await;
    Ok(json!({
        "bench": "ingest",
        "events": events,
        "clients": clients,
        "accepted_per_sec": rate.round(),
        "refused": refused,
        "response_ms": {"p50": ms(percentile(&took, 50.0)), "p99": ms(percentile(&took, 99.0))},
        "api_peak_rss_mb": rss.map(|r| r.round()),
    }))
}

/// `herald api` as a process of its own, ready, with an `events:write` key.
pub(crate) struct Api {
    pub process: tokio::process::Child,
    pub pid: u32,
    /// `http://127.0.0.1:<port>`
    pub base: String,
    pub key: String,
}

impl Api {
    pub(crate) async fn start(
        ctx: &Context,
        settings: &Settings,
        client: &reqwest::Client,
    ) -> anyhow::Result<Self> {
        let (_, key) = ctx
            .store
            .create_key(
                "bench",
                &[herald::domain::Scope::EventsWrite],
                Some(herald::domain::Rate::new(1e9).expect("rate")),
            )
            .await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let process = spawn_role(
            settings,
            "api",
            &[("HERALD__SERVER__BIND", format!("127.0.0.1:{port}"))],
        )?;
        let pid = process.id().context("api pid")?;
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(client, &base, Duration::from_secs(20)).await?;
        Ok(Self {
            process,
            pid,
            base,
            key,
        })
    }
}

/// A herald role as a process of its own, on this run's database and queues.
fn spawn_role(
    settings: &Settings,
    role: &str,
    env: &[(&str, String)],
) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(crate::herald_binary()?);
    cmd.arg(role)
        .env("HERALD__MONGODB__DATABASE", &settings.mongodb.database)
        .env("HERALD__AMQP__PREFIX", &settings.amqp.prefix)
        .env("HERALD__LOG__LEVEL", "warn")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("starting `herald {role}`"))
}

/// Waits until the API at `base` says MongoDB and RabbitMQ answer (`within` at most).
pub(crate) async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    within: Duration,
) -> anyhow::Result<()> {
    for _ in 0..within.as_millis() / 100 {
        if client
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("`herald api` did not become ready within {within:?}")
}

/// SIGTERM, then up to 20 s for the role to drain and exit.
async fn stop_role(mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
}

/// A campaign scenario: what it sends and whether high-lane probes run beside it.
#[derive(Debug, Clone, Copy)]
pub struct Campaign {
    /// Deliveries in the campaign (for mixed channels, a third of this many users).
    pub deliveries: usize,
    /// Email + SMS + push instead of email only.
    pub mixed: bool,
    /// High-priority single-recipient events per second posted while the campaign
    /// drains, and before it on an idle system; 0: none.
    pub probe_per_sec: f64,
    /// An SMTP server that accepts everything (Postfix's smtp-sink in `scripts/bench`).
    pub smtp_port: u16,
}

/// herald's api and worker as processes of their own, configured for a scenario.
struct Roles {
    api: tokio::process::Child,
    worker: tokio::process::Child,
    base: String,
    client: reqwest::Client,
    key: String,
}

impl Roles {
    /// Email through smtp-sink, SMS and push through the provider sink at `sink`.
    async fn start(
        ctx: &Context,
        settings: &Settings,
        smtp_port: u16,
        sink: &str,
    ) -> anyhow::Result<Self> {
        let (_, key) = ctx
            .store
            .create_key(
                "bench",
                &[herald::domain::Scope::Admin],
                Some(herald::domain::Rate::new(1e9).expect("rate")),
            )
            .await?;
        let dir = PathBuf::from("var/bench/config").join(&settings.amqp.prefix);
        std::fs::create_dir_all(&dir)?;
        let service_account =
            std::env::current_dir()?.join("tests/fixtures/fcm/service-account.json");
        std::fs::write(
            dir.join("bench.toml"),
            format!(
                r#"[email]
transport = "smtp"
[email.smtp]
host = "127.0.0.1"
port = {smtp_port}
[[sms.providers]]
name = "twilio"
kind = "twilio"
base_url = "{sink}"
account_sid = "ACbench"
auth_token = "bench"
from = "+15550000000"
[[push.providers]]
name = "fcm"
kind = "fcm"
service_account_file = "{}"
base_url = "{sink}"
token_uri = "{sink}/token"
[webhook]
allow_internal_targets = true
"#,
                service_account.display()
            ),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = [
            ("HERALD_CONFIG_DIR", dir.display().to_string()),
            ("HERALD_ENV", "bench".to_owned()),
        ];
        let mut api_env = config.to_vec();
        api_env.push(("HERALD__SERVER__BIND", format!("127.0.0.1:{port}")));
        let api = spawn_role(settings, "api", &api_env)?;
        let worker = spawn_role(settings, "worker", &config)?;
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        wait_ready(&client, &base, Duration::from_secs(10)).await?;
        Ok(Self {
            api,
            worker,
            base,
            client,
            key,
        })
    }

    fn pids(&self) -> anyhow::Result<[(&'static str, u32); 2]> {
        Ok([
            ("api", self.api.id().context("api pid")?),
            ("worker", self.worker.id().context("worker pid")?),
        ])
    }

    /// Posts an event; returns its notification id.
    async fn post(&self, event: &Value) -> anyhow::Result<String> {
        let accepted: Value = self
            .client
            .post(format!("{}/v1/events", self.base))
            .bearer_auth(&self.key)
            .json(event)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(accepted["notification_id"]
            .as_str()
            .context("notification id")?
            .to_owned())
    }

    async fn stop(self) {
        stop_role(self.api).await;
        stop_role(self.worker).await;
    }
}

/// The campaign's recipients: `users` users tagged `campaign`, with an address (and with
/// `mixed`, a phone and a push token too).
async fn write_campaign_users(ctx: &Context, users: usize, mixed: bool) -> anyhow::Result<()> {
    for chunk in (0..users).collect::<Vec<_>>().chunks(5_000) {
        let docs: Vec<UserDoc> = chunk
            .iter()
            .map(|i| UserDoc {
                id: format!("user-{i:07}"),
                email: Some(format!("user{i}@example.com")),
                phone: mixed.then(|| format!("+1555{i:07}")),
                push_tokens: if mixed {
                    vec![format!("token-{i}")]
                } else {
                    Vec::new()
                },
                first_name: Some("Bench".into()),
                tags: vec!["campaign".into()],
                ..Default::default()
            })
            .collect();
        ctx.store.upsert_users(&docs).await?;
    }
    Ok(())
}

/// Waits until a notification has its final status (30 min at most) and returns it.
async fn finished(ctx: &Context, id: &str) -> anyhow::Result<herald::store::NotificationDoc> {
    let started = Instant::now();
    loop {
        let n = ctx
            .store
            .get_notification(id)
            .await?
            .context("notification")?;
        use herald::domain::NotificationStatus as S;
        if matches!(n.status, S::Completed | S::PartiallyFailed | S::Failed) {
            return Ok(n);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1_800),
            "notification {id} did not finish in 30 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Posts high-priority single-recipient emails at `per_sec` until `stop` is cancelled
/// (or `count` are posted); returns their notification ids.
async fn probe(
    roles: &Roles,
    per_sec: f64,
    count: usize,
    stop: CancellationToken,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while ids.len() < count && !stop.is_cancelled() {
        tick.tick().await;
        ids.push(
            roles
                .post(
                    &json!({"event_type": "welcome", "priority": "high", "channels": ["email"],
                    "recipients": {"user_ids": ["probe-user"]}, "payload": {}}),
                )
                .await?,
        );
    }
    Ok(ids)
}

/// The probes' accept → sent latencies (ms), and the same split into where the time went.
struct ProbeTimes {
    /// Accept → sent, sorted.
    total: Vec<i64>,
    /// (phase, sorted latencies): accepted → delivery written (dispatch and fan-out),
    /// written → provider call (publish, consume, reads, render, claim), the provider
    /// call, and its end → the committed outcome.
    phases: Vec<(&'static str, Vec<i64>)>,
}

impl ProbeTimes {
    fn summary(&self) -> Value {
        let mut s = latency_summary(&self.total);
        for (phase, took) in &self.phases {
            s["phases"][*phase] =
                json!({"p50_ms": percentile(took, 50.0), "p99_ms": percentile(took, 99.0)});
        }
        s
    }

    /// "phase p50/p99, ..." for the console.
    fn phases_line(&self) -> String {
        self.phases
            .iter()
            .map(|(phase, took)| {
                format!(
                    "{phase} {}/{}",
                    percentile(took, 50.0),
                    percentile(took, 99.0)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Accept → sent latency (ms) of each probe, once all of them are final, with its phases.
async fn probe_latencies(ctx: &Context, ids: &[String]) -> anyhow::Result<ProbeTimes> {
    let mut total = Vec::with_capacity(ids.len());
    let mut phases: Vec<(&'static str, Vec<i64>)> = ["fan-out", "to claim", "send", "commit"]
        .into_iter()
        .map(|p| (p, Vec::with_capacity(ids.len())))
        .collect();
    for id in ids {
        finished(ctx, id).await?;
        let filter = herald::store::DeliveryFilter {
            notification_id: Some(id.clone()),
            ..Default::default()
        };
        let page = ctx.store.find_deliveries(&filter, None, 10).await?.items;
        let ids: Vec<String> = page.into_iter().map(|d| d.id).collect();
        for d in ctx.store.get_deliveries(&ids).await?.into_values() {
            let d = d.map_err(|e| anyhow::anyhow!(e))?;
            let (Some(sent), Some(accepted), Some(attempt)) =
                (d.sent_at, d.accepted_at, d.attempts.last())
            else {
                continue;
            };
            let ms = |a: mongodb::bson::DateTime, b: mongodb::bson::DateTime| {
                b.timestamp_millis() - a.timestamp_millis()
            };
            total.push(ms(accepted, sent));
            let marks = [
                accepted,
                d.created_at,
                attempt.started_at,
                attempt.finished_at,
                sent,
            ];
            for (i, (_, took)) in phases.iter_mut().enumerate() {
                took.push(ms(marks[i], marks[i + 1]));
            }
        }
    }
    total.sort_unstable();
    for (_, took) in &mut phases {
        took.sort_unstable();
    }
    Ok(ProbeTimes { total, phases })
}

fn latency_summary(sorted: &[i64]) -> Value {
    json!({"count": sorted.len(), "p50_ms": percentile(sorted, 50.0),
        "p99_ms": percentile(sorted, 99.0), "max_ms": sorted.last().copied().unwrap_or(0)})
}

/// Campaign fan-out: one event to a segment (`herald api` and `herald worker` as
/// separate processes; email through smtp-sink, SMS and push through a sink answering
/// like Twilio and FCM) → deliveries/s from accept to the last outcome, CPU seconds per
/// 1,000 deliveries and peak RSS of each process; with probes, the high lane's accept →
/// sent latency while the campaign drains, against the same probes on an idle system.
pub async fn campaign(settings: Settings, c: Campaign) -> anyhow::Result<Value> {
    let name = match (c.mixed, c.probe_per_sec > 0.0) {
        (_, true) => "priority",
        (true, false) => "mixed",
        (false, false) => "fanout",
    };
    let settings = isolated(settings, name);
    let ctx = Context::build(settings.clone()).await?;
    ctx.store.migrate().await?;
    let (users, channels) = if c.mixed {
        (c.deliveries.div_ceil(3), json!(["email", "sms", "push"]))
    } else {
        (c.deliveries, json!(["email"]))
    };
    let deliveries = if c.mixed { users * 3 } else { users };
    ctx.store
        .put_user(UserDoc {
            id: "probe-user".into(),
            email: Some("probe@example.com".into()),
            first_name: Some("Probe".into()),
            ..Default::default()
        })
        .await?;
    ctx.store
        .put_content(
            "bench-episode",
            mongodb::bson::doc! {"show": "Bench", "title": "Pilot", "season": 1, "episode": 1},
        )
        .await?;
    let (sink, received) = sink::start().await?;
    let roles = Roles::start(&ctx, &settings, c.smtp_port, &sink).await?;
    let pids = roles.pids()?;

    // The same probes on the idle system first, for comparison.
    let probe_count = (c.probe_per_sec * 5.0).ceil() as usize;
    let idle = if c.probe_per_sec > 0.0 {
        let ids = probe(
            &roles,
            c.probe_per_sec,
            probe_count,
            CancellationToken::new(),
        )
        .await?;
        Some(probe_latencies(&ctx, &ids).await?)
    } else {
        None
    };

    // The campaign's recipients, written after the idle probes: the database digesting
    // 100,000 new profiles is not an idle system.
    let started = Instant::now();
    write_campaign_users(&ctx, users, c.mixed).await?;
    println!(
        "{name}: {users} recipients written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let lab = LabDb::connect(&settings.mongodb).await?;
    let commands_before = commands::counts(lab.client()).await;
    let meter = cpu::Meter::start(&[
        ("herald_api", Some(pids[0].1)),
        ("herald_worker", Some(pids[1].1)),
        (
            "database",
            cpu::port_of(settings.mongodb.uri.expose()).and_then(cpu::listener),
        ),
        (
            "broker",
            cpu::port_of(settings.amqp.url.expose()).and_then(cpu::listener),
        ),
        ("smtp_sink", cpu::listener(c.smtp_port)),
        ("harness", Some(std::process::id())),
    ]);
    let started = Instant::now();
    let id = roles
        .post(&json!({"event_type": "new_episode", "priority": "low", "channels": channels,
            "recipients": {"segment": {"tag": "campaign"}}, "payload": {"content": ["bench-episode"]}}))
        .await?;
    let stop = CancellationToken::new();
    let (notification, probes) = if c.probe_per_sec > 0.0 {
        // Probes start once the low lane has a backlog to jump.
        let probing = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            probe(&roles, c.probe_per_sec, usize::MAX, stop.clone()).await
        };
        let draining = async {
            let n = finished(&ctx, &id).await;
            stop.cancel();
            n
        };
        let (n, p) = tokio::join!(draining, probing);
        (n?, p?)
    } else {
        (finished(&ctx, &id).await?, Vec::new())
    };
    let secs = started.elapsed().as_secs_f64();
    let budget = meter.per_1000(deliveries, secs);
    let mut processes = serde_json::Map::new();
    let mut cpu_total = 0.0;
    for (role, pid) in &pids {
        let cpu = budget.seconds(&format!("herald_{role}")).unwrap_or(0.0);
        cpu_total += cpu;
        processes.insert(
            (*role).to_owned(),
            json!({"cpu_seconds": (cpu * 10.0).round() / 10.0, "peak_rss_mb": peak_rss_mb(*pid).map(|r| r.round())}),
        );
    }
    let commands = commands::per_1000(
        &commands_before,
        &commands::counts(lab.client()).await,
        deliveries,
    );
    // The database server's own CPU over the same span (a local server only).
    let database_cpu_per_1000 = budget.processes.get("database").and_then(Value::as_f64);
    let backlog = if c.probe_per_sec > 0.0 {
        Some(probe_latencies(&ctx, &probes).await?)
    } else {
        None
    };
    roles.stop().await;
    let rate = deliveries as f64 / secs;
    let cpu_per_1000 = (cpu_total / deliveries as f64 * 1000.0 * 100.0).round() / 100.0;
    println!(
        "{name}: {deliveries} deliveries ({channels}) in {secs:.1} s = {rate:.0} deliveries/s; sent {}, status {:?}; {cpu_per_1000:.2} CPU s per 1,000 (herald), {} (database); {}",
        notification.counts.sent,
        notification.status,
        database_cpu_per_1000.map_or("unseen".to_owned(), |c| format!("{c:.2}")),
        Value::Object(processes.clone())
    );
    println!("{name}: {}", budget.line());
    println!("{name}: {}", commands::line(&commands));
    let mut result = json!({
        "bench": name,
        "deliveries": deliveries,
        "channels": channels,
        "seconds": (secs * 10.0).round() / 10.0,
        "deliveries_per_sec": rate.round(),
        "counts": serde_json::to_value(notification.counts)?,
        "sink_received": {"sms": received.sms.load(std::sync::atomic::Ordering::Relaxed),
            "push": received.push.load(std::sync::atomic::Ordering::Relaxed)},
        "cpu_seconds_per_1000": cpu_per_1000,
        "database_cpu_seconds_per_1000": database_cpu_per_1000,
        "cpu": budget.json(),
        "database_commands_per_1000": commands,
        "processes": processes,
    });
    if let (Some(idle), Some(backlog)) = (idle, backlog) {
        let (i, b) = (&idle.total, &backlog.total);
        println!(
            "priority: high-lane accept→sent idle p50 {} / p99 {} / max {} ms; while {deliveries} low deliveries drain p50 {} / p99 {} / max {} ms ({} probes at {}/s)",
            percentile(i, 50.0), percentile(i, 99.0), i.last().copied().unwrap_or(0),
            percentile(b, 50.0), percentile(b, 99.0), b.last().copied().unwrap_or(0),
            b.len(), c.probe_per_sec
        );
        println!(
            "priority: phases p50/p99 ms idle: {}; under backlog: {}",
            idle.phases_line(),
            backlog.phases_line()
        );
        result["high_lane"] = json!({"per_sec": c.probe_per_sec, "idle": idle.summary(),
            "under_backlog": backlog.summary()});
    }
    clean_up(&ctx).await;
    let _ = std::fs::remove_dir_all(PathBuf::from("var/bench/config").join(&settings.amqp.prefix));
    Ok(result)
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(super::percentile(&v, 50.0), 50);
        assert_eq!(super::percentile(&v, 99.0), 99);
        assert_eq!(super::percentile(&[7], 99.0), 7);
        assert_eq!(super::percentile(&[], 50.0), 0);
    }
}
