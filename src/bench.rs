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
