//! The inbox socket bench: one `herald api` process holding many inbox sockets while events arrive for random connected users.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{clean_up, isolated, peak_rss_mb, percentile, rss_mb, spawn_role, stop_role, Api};
use herald::config::Settings;
use herald::store::UserDoc;

/// Targets the issue sets: API RSS with every socket open, and accept → arrival p99.
const RSS_CEILING_MB: f64 = 300.0;
const P99_CEILING_MS: f64 = 250.0;

/// What the customer's server computes for a user.
fn user_hash(secret: &str, user: &str) -> String {
    hex::encode(herald::domain::signatures::hmac_sha256(
        secret.as_bytes(),
        &[user.as_bytes()],
    ))
}

/// `sockets` users each with an open socket on one `herald api` process (a `herald
/// worker` writes the items); `per_sec` events a second, for `secs` seconds, each to a
/// random connected user. Reports the API's memory and the time from an event's `202`
/// to its item on the socket.
pub async fn inbox(
    settings: Settings,
    sockets: usize,
    per_sec: f64,
    secs: u64,
) -> anyhow::Result<Value> {
    let settings = isolated(settings, "inbox");
    let ctx = herald::app::Context::build(settings.clone()).await?;
    ctx.store.migrate().await?;
    let users: Vec<String> = (0..sockets).map(|i| format!("inbox-bench-{i}")).collect();
    for chunk in users.chunks(1_000) {
        let docs: Vec<UserDoc> = chunk
            .iter()
            .map(|id| UserDoc {
                id: id.clone(),
                first_name: Some("Bench".into()),
                ..Default::default()
            })
            .collect();
        ctx.store.upsert_users(&docs).await?;
    }
    let client = reqwest::Client::new();
    let Api {
        process: api,
        pid,
        base,
        key,
    } = Api::start(&ctx, &settings, &client).await?;
    let worker = spawn_role(&settings, "worker", &[])?;
    let rss_before = rss_mb(pid).unwrap_or(0.0);

    // Sessions, then sockets: every user's socket open before any event.
    let secret = settings.inbox.secret.expose().to_owned();
    // Each arrival: its probe, when (monotonic, and wall-clock ms), and when its item was
    // committed (the item's `created_at`, the outcome transaction's clock).
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel::<(String, Instant, i64, i64)>();
    let opened = Instant::now();
    let mut socket_tasks = tokio::task::JoinSet::new();
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    for user in users.clone() {
        let permit = sem.clone().acquire_owned().await?;
        let (client, base, secret, tx, connected, stop) = (
            client.clone(),
            base.clone(),
            secret.clone(),
            arrivals_tx.clone(),
            connected.clone(),
            stop.clone(),
        );
        socket_tasks.spawn(async move {
            let session: Value = client
                .post(format!("{base}/v1/inbox/session"))
                .json(&json!({"user_id": user, "user_hash": user_hash(&secret, &user)}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let token = session["token"].as_str().context("token")?.to_owned();
            let url = format!(
                "{}/v1/inbox/ws?token={token}",
                base.replacen("http", "ws", 1)
            );
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
            drop(permit);
            connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = ws.next() => m,
                };
                match next {
                    Some(Ok(Message::Text(text))) => {
                        let v: Value = serde_json::from_str(&text).unwrap_or_default();
                        if v["type"] == "notification_received" {
                            if let Some(probe) = v["item"]["body"].as_str() {
                                let committed = v["item"]["created_at"]
                                    .as_str()
                                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                                    .map_or(0, |t| t.timestamp_millis());
                                let wall = chrono::Utc::now().timestamp_millis();
                                let _ =
                                    tx.send((probe.to_owned(), Instant::now(), wall, committed));
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => anyhow::bail!("a socket closed under load"),
                }
            }
            anyhow::Ok(())
        });
    }
    drop(arrivals_tx);
    while connected.load(std::sync::atomic::Ordering::Relaxed) < sockets {
        if let Some(Ok(Err(e)) | Err(e)) = socket_tasks
            .try_join_next()
            .map(|r| r.map_err(anyhow::Error::from))
        {
            anyhow::bail!("opening the sockets: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_secs = opened.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_mb(pid).unwrap_or(0.0);
    println!(
        "inbox: {sockets} sockets open in {open_secs:.1} s; api RSS {rss_before:.0} MB before, {rss_idle:.0} MB with them"
    );

    // The load: `per_sec` events a second to random connected users; each event's body
    // names a probe id the socket reports back.
    let total = (per_sec * secs as f64) as usize;
    let mut accepted: HashMap<String, (Instant, Instant, i64)> = HashMap::with_capacity(total);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..total {
        ticker.tick().await;
        let user = users[rand::rng().random_range(0..users.len())].clone();
        let (client, base, key) = (client.clone(), base.clone(), key.clone());
        posts.spawn(async move {
            let probe = format!("probe-{i}");
            let sent = Instant::now();
            let r = client
                .post(format!("{base}/v1/events"))
                .bearer_auth(&key)
                .json(
                    &json!({"event_type": "comment_added", "channels": ["in_app"],
                    "recipients": {"user_ids": [user]},
                    "payload": {"author": "bench", "excerpt": probe}}),
                )
                .send()
                .await?;
            anyhow::ensure!(r.status().as_u16() == 202, "event refused: {}", r.status());
            anyhow::Ok((
                probe,
                sent,
                Instant::now(),
                chrono::Utc::now().timestamp_millis(),
            ))
        });
        while let Some(done) = posts.try_join_next() {
            let (probe, sent, at, wall) = done??;
            accepted.insert(probe, (sent, at, wall));
        }
    }
    while let Some(done) = posts.join_next().await {
        let (probe, sent, at, wall) = done??;
        accepted.insert(probe, (sent, at, wall));
    }
    // Arrivals, until every probe arrived or 15 s passed after the last post.
    let mut from_accept = Vec::with_capacity(total);
    let mut from_post = Vec::with_capacity(total);
    // The two halves, in wall-clock ms, split at the item's `created_at` (its outcome
    // transaction's clock as it begins): accepted → then, and then → on the socket (the
    // commit, the change stream, the hub, the socket's own reads).
    let mut to_commit = Vec::with_capacity(total);
    let mut to_socket = Vec::with_capacity(total);
    let mut arrived = 0usize;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while arrived < total {
        let Ok(Some(arrival)) = tokio::time::timeout_at(deadline, arrivals.recv()).await else {
            break;
        };
        seen.push(arrival);
        arrived += 1;
    }
    for (probe, at, wall, committed) in seen {
        if let Some((sent, ok, ok_wall)) = accepted.get(&probe) {
            from_accept.push(at.saturating_duration_since(*ok).as_micros() as i64);
            from_post.push(at.saturating_duration_since(*sent).as_micros() as i64);
            to_commit.push((committed - ok_wall) * 1000);
            to_socket.push((wall - committed) * 1000);
        }
    }
    to_commit.sort_unstable();
    to_socket.sort_unstable();
    let rss_peak = peak_rss_mb(pid).unwrap_or(0.0);
    let rss_end = rss_mb(pid).unwrap_or(0.0);
    stop.cancel();
    while socket_tasks.join_next().await.is_some() {}
    stop_role(api).await;
    stop_role(worker).await;
    clean_up(&ctx).await;

    from_accept.sort_unstable();
    from_post.sort_unstable();
    let ms = |us: i64| (us as f64 / 100.0).round() / 10.0;
    let p50 = ms(percentile(&from_accept, 50.0));
    let p99 = ms(percentile(&from_accept, 99.0));
    let lost = total - from_accept.len();
    println!(
        "inbox: {total} events at {per_sec}/s to random connected users: accepted → on the socket p50 {p50} ms, p99 {p99} ms \
         (from the POST: p50 {} ms, p99 {} ms); {lost} not arrived; api RSS {rss_end:.0} MB, peak {rss_peak:.0} MB",
        ms(percentile(&from_post, 50.0)),
        ms(percentile(&from_post, 99.0)),
    );
    println!(
        "inbox: of which accepted → the item's transaction p50 {} ms, p99 {} ms; then → on the socket p50 {} ms, p99 {} ms",
        ms(percentile(&to_commit, 50.0)),
        ms(percentile(&to_commit, 99.0)),
        ms(percentile(&to_socket, 50.0)),
        ms(percentile(&to_socket, 99.0)),
    );
    println!(
        "inbox: ratios to the targets: RSS {:.2} of {RSS_CEILING_MB} MB, p99 {:.2} of {P99_CEILING_MS} ms",
        rss_peak / RSS_CEILING_MB,
        p99 / P99_CEILING_MS
    );
    Ok(json!({
        "bench": "inbox",
        "sockets": sockets,
        "open_secs": (open_secs * 10.0).round() / 10.0,
        "events": total,
        "per_sec": per_sec,
        "arrival_ms": {"p50": p50, "p99": p99, "max": ms(from_accept.last().copied().unwrap_or(0))},
        "to_commit_ms": {"p50": ms(percentile(&to_commit, 50.0)), "p99": ms(percentile(&to_commit, 99.0))},
        "commit_to_socket_ms": {"p50": ms(percentile(&to_socket, 50.0)), "p99": ms(percentile(&to_socket, 99.0))},
        "from_post_ms": {"p50": ms(percentile(&from_post, 50.0)), "p99": ms(percentile(&from_post, 99.0))},
        "not_arrived": lost,
        "api_rss_mb": {"before": rss_before.round(), "idle_with_sockets": rss_idle.round(),
            "end": rss_end.round(), "peak": rss_peak.round()},
        "ratios": {"rss_to_ceiling": ((rss_peak / RSS_CEILING_MB) * 100.0).round() / 100.0,
            "p99_to_ceiling": ((p99 / P99_CEILING_MS) * 100.0).round() / 100.0},
    }))
}
