//! `herald bench`: reproducible measurements against the real local servers, printed and saved as JSON.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::app::Context;
use crate::config::Settings;
use crate::domain::Priority;
use crate::scheduler::plan::MisfirePolicy;
use crate::store::{RecipientsDoc, ScheduleDoc, ScheduleStatus, UserDoc};

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

async fn clean_up(ctx: &Context) {
    if let Err(e) = ctx.broker.delete_topology().await {
        tracing::warn!(
            error = format!("{e:#}"),
            "could not delete the bench queues"
        );
    }
    ctx.broker.close().await;
    if let Err(e) = ctx.store.drop_database().await {
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
    let path = dir.join(format!(
        "{}-{name}.json",
        Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
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
    let ctx = Context::build(settings.clone()).await?;
    ctx.store.migrate().await?;
    ctx.store
        .put_user(UserDoc {
            id: "bench-user".into(),
            email: Some("bench@example.com".into()),
            ..Default::default()
        })
        .await?;
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
    ctx.store.insert_schedules(&docs).await?;
    println!("{schedules} schedules due over {window_secs}s from {start}; {instances} scheduler instance(s) racing");

    let cancel = CancellationToken::new();
    let mut roles = Vec::new();
    for _ in 0..instances {
        let c = Context::build(settings.clone()).await?;
        roles.push(tokio::spawn(crate::roles::scheduler(c, cancel.clone())));
    }
    tokio::time::sleep(lead + Duration::from_secs(window_secs) + Duration::from_secs(5)).await;
    cancel.cancel();
    for r in roles {
        r.await.context("scheduler task")??;
    }

    let runs = ctx.store.all_runs().await?;
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
    let api = tokio::spawn(crate::roles::api(ctx.clone(), listener, cancel.clone()));
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
    use crate::domain::{Channel, DeliveryStatus};
    use crate::store::DeliveryDoc;
    use rand::Rng;

    let settings = isolated(settings, "logs");
    let ctx = Context::build(settings).await?;
    ctx.store.migrate().await?;
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
                expire_at: None,
            });
            written += 1;
            if batch.len() == 10_000 {
                ctx.store.load_deliveries(&batch).await?;
                batch.clear();
            }
        }
    }
    ctx.store.load_deliveries(&batch).await?;
    let load_secs = started.elapsed().as_secs_f64();
    println!("stored {written} deliveries ({users} users, {notifications} notifications over 30 days) in {load_secs:.1} s");
    let started = Instant::now();
    ctx.store.rebuild_stats().await?;
    let rebuild_secs = started.elapsed().as_secs_f64();
    println!("rebuilt statistics from the log in {rebuild_secs:.1} s");

    let (_, key) = ctx
        .store
        .create_key("bench", &[crate::domain::Scope::LogsRead], Some(1e9))
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let api = tokio::spawn(crate::api::serve(ctx.clone(), listener, cancel.clone()));
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
    let rabbit = ctx.broker.measure_ceiling(messages, job_size).await?;
    println!(
        "RabbitMQ: publish with confirms {:.0} msg/s, consume with acks {:.0} msg/s ({messages} persistent messages of {job_size} B)",
        rabbit.publish_per_sec, rabbit.consume_per_sec
    );
    let batch = 64;
    let mongo = ctx.store.measure_ceiling(docs, batch).await?;
    println!(
        "MongoDB: bulk insert {:.0} docs/s; outcome-shaped transactions {:.0}/s ({batch} updates + 1 counter each = {:.0} updates/s)",
        mongo.inserts_per_sec, mongo.transactions_per_sec, mongo.updates_per_sec
    );
    clean_up(&ctx).await;
    Ok(json!({
        "bench": "ceilings",
        "rabbitmq": {"messages": messages, "message_bytes": job_size,
            "publish_confirmed_per_sec": rabbit.publish_per_sec.round(),
            "consume_acked_per_sec": rabbit.consume_per_sec.round()},
        "mongodb": {"documents": docs, "insert_per_sec": mongo.inserts_per_sec.round(),
            "transactions_per_sec": mongo.transactions_per_sec.round(),
            "updates_in_transactions_per_sec": mongo.updates_per_sec.round(), "updates_per_transaction": batch},
    }))
}

/// Peak resident memory of a process (`VmHWM`), in MB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
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
    let ctx = Context::build(settings.clone()).await?;
    ctx.store.migrate().await?;
    ctx.store
        .put_user(UserDoc {
            id: "bench-user".into(),
            email: Some("bench@example.com".into()),
            ..Default::default()
        })
        .await?;
    let (_, key) = ctx
        .store
        .create_key("bench", &[crate::domain::Scope::EventsWrite], Some(1e9))
        .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let api = spawn_role(
        &settings,
        "api",
        &[("HERALD__SERVER__BIND", format!("127.0.0.1:{port}"))],
    )?;
    let pid = api.id().context("api pid")?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    wait_ready(&client, &base).await?;
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

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A herald role as a process of its own, on this run's database and queues.
fn spawn_role(
    settings: &Settings,
    role: &str,
    env: &[(&str, String)],
) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
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

/// Waits until the API at `base` says MongoDB and RabbitMQ answer (10 s at most).
async fn wait_ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
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
    anyhow::bail!("`herald api` did not become ready")
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

/// Campaign fan-out: one event to `recipients` users (a segment), email through a real
/// SMTP server on `smtp_port` (Postfix's smtp-sink in `scripts/bench`), `herald api` and
/// `herald worker` as separate processes → deliveries/s from accept to the last outcome,
/// CPU seconds per 1,000 deliveries and peak RSS of each process.
pub async fn fanout(
    settings: Settings,
    recipients: usize,
    smtp_port: u16,
) -> anyhow::Result<Value> {
    let settings = isolated(settings, "fanout");
    let ctx = Context::build(settings.clone()).await?;
    ctx.store.migrate().await?;
    let started = Instant::now();
    for chunk in (0..recipients).collect::<Vec<_>>().chunks(5_000) {
        let users: Vec<UserDoc> = chunk
            .iter()
            .map(|i| UserDoc {
                id: format!("user-{i:07}"),
                email: Some(format!("user{i}@example.com")),
                first_name: Some("Bench".into()),
                tags: vec!["fanout".into()],
                ..Default::default()
            })
            .collect();
        ctx.store.upsert_users(&users).await?;
    }
    println!(
        "{recipients} recipients written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (_, key) = ctx
        .store
        .create_key("bench", &[crate::domain::Scope::Admin], Some(1e9))
        .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let smtp = [
        ("HERALD__EMAIL__TRANSPORT", "smtp".to_owned()),
        ("HERALD__EMAIL__SMTP__HOST", "127.0.0.1".to_owned()),
        ("HERALD__EMAIL__SMTP__PORT", smtp_port.to_string()),
    ];
    let mut api_env = smtp.to_vec();
    api_env.push(("HERALD__SERVER__BIND", format!("127.0.0.1:{port}")));
    let api = spawn_role(&settings, "api", &api_env)?;
    let worker = spawn_role(&settings, "worker", &smtp)?;
    let pids = [
        ("api", api.id().context("api pid")?),
        ("worker", worker.id().context("worker pid")?),
    ];
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before: Vec<f64> = pids
        .iter()
        .map(|(_, p)| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let started = Instant::now();
    let accepted: Value = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(&key)
        .json(
            &json!({"event_type": "welcome", "priority": "low", "channels": ["email"],
            "recipients": {"segment": {"tag": "fanout"}}, "payload": {}}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = accepted["notification_id"]
        .as_str()
        .context("notification id")?
        .to_owned();
    let notification = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n: Value = client
            .get(format!("{base}/v1/notifications/{id}"))
            .bearer_auth(&key)
            .send()
            .await?
            .json()
            .await?;
        if ["completed", "partially_failed", "failed"].contains(&n["status"].as_str().unwrap_or(""))
        {
            break n;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1_800),
            "the campaign did not finish in 30 min"
        );
    };
    let secs = started.elapsed().as_secs_f64();
    let mut processes = serde_json::Map::new();
    let mut cpu_total = 0.0;
    for ((name, pid), before) in pids.iter().zip(&cpu_before) {
        let cpu = cpu_seconds(*pid).unwrap_or(0.0) - before;
        cpu_total += cpu;
        processes.insert(
            (*name).to_owned(),
            json!({"cpu_seconds": (cpu * 10.0).round() / 10.0, "peak_rss_mb": peak_rss_mb(*pid).map(|r| r.round())}),
        );
    }
    stop_role(api).await;
    stop_role(worker).await;
    let sent = notification["counts"]["sent"].as_i64().unwrap_or(0);
    let rate = recipients as f64 / secs;
    println!(
        "fan-out: {recipients} emails in {secs:.1} s = {rate:.0} deliveries/s (sent {sent}, status {}); {:.2} CPU s per 1,000; {}",
        notification["status"],
        cpu_total / recipients as f64 * 1000.0,
        Value::Object(processes.clone())
    );
    clean_up(&ctx).await;
    Ok(json!({
        "bench": "fanout",
        "recipients": recipients,
        "seconds": (secs * 10.0).round() / 10.0,
        "deliveries_per_sec": rate.round(),
        "sent": sent,
        "counts": notification["counts"],
        "cpu_seconds_per_1000": (cpu_total / recipients as f64 * 1000.0 * 100.0).round() / 100.0,
        "processes": processes,
    }))
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
