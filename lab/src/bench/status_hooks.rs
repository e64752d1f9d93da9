//! `bench webhooks`: a campaign with and without a status webhook endpoint subscribed to `message.sent` (rounds alternate), and how fast the events reach a loopback receiver.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{finished, isolated, sink, write_campaign_users, Roles};
use herald::app::Context;
use herald::config::Settings;

/// One campaign's figures.
struct Round {
    with_endpoint: bool,
    campaign_secs: f64,
    /// From the campaign's 202 to the last `message.sent` at the receiver.
    events_secs: Option<f64>,
}

pub async fn webhooks(
    settings: Settings,
    deliveries: usize,
    rounds: usize,
    smtp_port: u16,
) -> anyhow::Result<Value> {
    let settings = isolated(settings, "webhooks");
    let ctx = Context::build(settings.clone()).await?;
    ctx.store.migrate().await?;
    write_campaign_users(&ctx, deliveries, false).await?;
    let (sink, received) = sink::start().await?;
    let roles = Roles::start(&ctx, &settings, smtp_port, &sink).await?;
    let made: Value = roles
        .client
        .post(format!("{}/v1/webhook-endpoints", roles.base))
        .bearer_auth(&roles.key)
        .json(
            &json!({"url": format!("{sink}/hooks"), "events": ["message.sent"], "enabled": false}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let endpoint = made["id"].as_str().unwrap_or_default().to_owned();
    let mut results = Vec::new();
    for round in 0..rounds.max(1) {
        for with_endpoint in [false, true] {
            roles
                .client
                .patch(format!("{}/v1/webhook-endpoints/{endpoint}", roles.base))
                .bearer_auth(&roles.key)
                .json(&json!({"enabled": with_endpoint}))
                .send()
                .await?
                .error_for_status()?;
            // Every process reads subscriptions at most a second old.
            tokio::time::sleep(Duration::from_millis(1_200)).await;
            let before = received.hook_count();
            let started = Instant::now();
            let id = roles
                .post(
                    &json!({"event_type": "welcome", "priority": "low", "channels": ["email"],
                    "recipients": {"segment": {"tag": "campaign"}}, "payload": {}}),
                )
                .await?;
            let n = finished(&ctx, &id).await?;
            let campaign_secs = started.elapsed().as_secs_f64();
            let events_secs = if with_endpoint {
                // Until every delivery's event arrived (a repeat of one does not count).
                let deadline = Instant::now() + Duration::from_secs(1_800);
                let mine = loop {
                    let mine = received.hooks().split_off(before);
                    let unique: HashSet<&str> = mine
                        .iter()
                        .filter_map(|h| h.delivery_id.as_deref())
                        .collect();
                    if unique.len() >= deliveries {
                        break mine;
                    }
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "{} of {deliveries} events in 30 min",
                        unique.len()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                mine.iter()
                    .map(|h| h.at)
                    .max()
                    .map(|t| t.duration_since(started).as_secs_f64())
            } else {
                None
            };
            println!(
                "webhooks: round {} {}: {deliveries} deliveries in {campaign_secs:.1} s ({:.0}/s, sent {}){}",
                round + 1,
                if with_endpoint { "with endpoint" } else { "without" },
                deliveries as f64 / campaign_secs,
                n.counts.sent,
                events_secs.map_or(String::new(), |s| format!(
                    "; {deliveries} message.sent events at the receiver {s:.1} s after the 202 ({:.0}/s)",
                    deliveries as f64 / s
                ))
            );
            results.push(Round {
                with_endpoint,
                campaign_secs,
                events_secs,
            });
        }
    }
    roles.stop().await;
    let median = |with: bool, f: &dyn Fn(&Round) -> Option<f64>| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r.with_endpoint == with)
            .filter_map(f)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let without = deliveries as f64 / median(false, &|r| Some(r.campaign_secs));
    let with = deliveries as f64 / median(true, &|r| Some(r.campaign_secs));
    let events = deliveries as f64 / median(true, &|r| r.events_secs);
    println!(
        "webhooks: campaign {without:.0}/s without an endpoint, {with:.0}/s with one ({:.2} of without); events to the receiver {events:.0}/s ({:.2} of the campaign's rate without)",
        with / without,
        events / without
    );
    let result = json!({
        "bench": "webhooks",
        "deliveries": deliveries,
        "rounds": rounds,
        "campaign_per_sec_without": without.round(),
        "campaign_per_sec_with": with.round(),
        "with_over_without": ((with / without) * 100.0).round() / 100.0,
        "events_per_sec": events.round(),
        "events_over_campaign_without": ((events / without) * 100.0).round() / 100.0,
        "runs": results.iter().map(|r| json!({"with_endpoint": r.with_endpoint,
            "campaign_secs": (r.campaign_secs * 10.0).round() / 10.0,
            "events_secs": r.events_secs.map(|s| (s * 10.0).round() / 10.0)})).collect::<Vec<_>>(),
    });
    super::clean_up(&ctx).await;
    Ok(result)
}
