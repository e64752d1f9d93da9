//! The faults `herald-lab chaos` injects, each as a choreography over a running bed.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use chrono::{Timelike, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Bed, Database, Options, Role, Row};
use herald::config::{QueueType, Settings};
use herald::domain::Priority;

use super::cluster::Cluster;

/// A fault of the suite (issue order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// `kill -9` a worker mid-send, twice (each worker once), and restart it.
    WorkerKill,
    /// `kill -9` the API right after it answered 202, and restart it.
    ApiKill,
    /// `rabbitmqctl stop_app` … `start_app` mid-campaign.
    BrokerRestart,
    /// `kill -9` the database server mid-campaign and start it again on its files.
    DatabaseRestart,
    /// Every RabbitMQ connection cut, three times (publishes awaiting confirms, deliveries
    /// awaiting acks).
    ConnectionCuts,
    /// An undecodable job and a job whose record cannot be read, on the lanes.
    Poison,
    /// RabbitMQ closes consumers' channels (consumer timeout exceeded).
    ChannelClose,
    /// The SMTP server answers 421 for a while, closes idle connections, then hangs.
    ProviderStorms,
    /// Both schedulers killed alternately while a minute's slots come due.
    SchedulerKills,
    /// SIGTERM to every process mid-campaign; then they start again.
    Sigterm,
    /// Events posted faster than the workers deliver: 503 + Retry-After past the bound.
    Overload,
    /// A 3-node RabbitMQ cluster with quorum queues: SIGKILL the node leading the lanes,
    /// start it again later.
    BrokerNodeKill,
    /// The same with classic queues (they live on the killed node: deliveries stall).
    BrokerNodeKillClassic,
}

pub const ALL: [Fault; 13] = [
    Fault::WorkerKill,
    Fault::ApiKill,
    Fault::BrokerRestart,
    Fault::DatabaseRestart,
    Fault::ConnectionCuts,
    Fault::Poison,
    Fault::ChannelClose,
    Fault::ProviderStorms,
    Fault::SchedulerKills,
    Fault::Sigterm,
    Fault::Overload,
    Fault::BrokerNodeKill,
    Fault::BrokerNodeKillClassic,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::WorkerKill => "worker-kill",
            Fault::ApiKill => "api-kill",
            Fault::BrokerRestart => "broker-restart",
            Fault::DatabaseRestart => "database-restart",
            Fault::ConnectionCuts => "connection-cuts",
            Fault::Poison => "poison",
            Fault::ChannelClose => "channel-close",
            Fault::ProviderStorms => "provider-storms",
            Fault::SchedulerKills => "scheduler-kills",
            Fault::Sigterm => "sigterm",
            Fault::Overload => "overload",
            Fault::BrokerNodeKill => "broker-node-kill",
            Fault::BrokerNodeKillClassic => "broker-node-kill-classic",
        }
    }

    /// The queue type of a fault that runs on the 3-node cluster (`None`: the machine's
    /// broker behind a proxy).
    pub(super) fn on_cluster(self) -> Option<QueueType> {
        match self {
            Fault::BrokerNodeKill => Some(QueueType::Quorum),
            Fault::BrokerNodeKillClassic => Some(QueueType::Classic),
            _ => None,
        }
    }

    /// Settings this fault needs beyond the bed's (TOML appended to the bed's file).
    pub(super) fn config(self, opts: &Options) -> String {
        match self {
            Fault::Overload => format!(
                "[events]\nmax_backlog = {}\n",
                (opts.deliveries / 4).max(200)
            ),
            _ => String::new(),
        }
    }

    /// The SMTP timeout: longer than RabbitMQ's consumer timeout for `channel-close`, so
    /// a delivery held by a hanging server outlives its channel.
    pub(super) fn smtp_timeout_secs(self) -> u64 {
        match self {
            Fault::ChannelClose => 8,
            _ => 2,
        }
    }
}

/// Runs one fault on a bed of its own and accounts for every delivery.
pub(super) async fn run(
    fault: Fault,
    settings: &Settings,
    db: &mut Database,
    cluster: Option<&Cluster>,
    root: &Path,
    opts: &Options,
) -> anyhow::Result<Row> {
    if fault == Fault::ChannelClose {
        // Read by each new channel; the bed's processes open theirs after this.
        consumer_timeout(Some(CONSUMER_TIMEOUT_MS))?;
    }
    let bed = Bed::start(settings, db, cluster, root, fault, opts).await;
    let result = match bed {
        Ok(mut bed) => {
            let result = inject(fault, &mut bed, db, cluster, opts).await;
            Ok((bed, result))
        }
        Err(e) => Err(e),
    };
    if fault == Fault::ChannelClose {
        consumer_timeout(None)?;
    }
    let (bed, result) = result?;
    let row = match result {
        Ok((recovery, notes)) => {
            bed.wait_final(Duration::from_secs(if opts.quick { 90 } else { 300 }))
                .await?;
            // Stragglers (a send whose commit is still in flight) land before counting.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let notes = match fault {
                // What herald found missing after the restart: records it had written,
                // with the database's acknowledgement, and read back before the crash.
                Fault::DatabaseRestart => format!(
                    "acknowledged writes the restarted database no longer had: {} claims, {} deliveries, {} notifications",
                    bed.log_lines("worker", "claim was lost by the database"),
                    bed.log_lines("worker", "job for an unknown delivery"),
                    bed.log_lines("worker", "unknown notification; dropping"),
                ),
                _ => notes,
            };
            bed.account(fault, recovery, notes).await
        }
        Err(e) => Err(e),
    };
    // A failed fault's database and queues stay for a post-mortem.
    let keep = !row.as_ref().is_ok_and(Row::passed);
    bed.stop(keep).await;
    row
}

/// Starts the load, waits until a share of the campaign went out, injects and repairs the
/// fault, stops the singles; returns (recovery seconds, notes).
async fn inject(
    fault: Fault,
    bed: &mut Bed,
    db: &mut Database,
    cluster: Option<&Cluster>,
    opts: &Options,
) -> anyhow::Result<(f64, String)> {
    let tag = fault.name();
    let stop = CancellationToken::new();
    let (rate, clients) = match fault {
        Fault::Overload => (f64::INFINITY, 32),
        _ => (opts.singles_per_sec, 4),
    };
    bed.campaign(opts.deliveries, tag).await?;
    let singles = bed.singles(rate, clients, tag, stop.clone());
    let before = bed.smtp.count();
    bed.wait_sink(before + opts.deliveries / 5, Duration::from_secs(60))
        .await;
    let mut notes = String::new();
    // Measured by the fault itself rather than from its repair.
    let mut recovered = None;
    let repaired = match fault {
        Fault::WorkerKill => {
            for i in 0..2 {
                bed.crash_and_restart(Role::Worker(i), Duration::from_millis(500))
                    .await?;
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            Instant::now()
        }
        Fault::ApiKill => {
            // Right after an answer: the next accepted single's 202 is the cue.
            let n = bed.accepted_count();
            while bed.accepted_count() == n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            bed.crash_and_restart(Role::Api, Duration::from_secs(1))
                .await?;
            Instant::now()
        }
        Fault::BrokerRestart => {
            rabbitmqctl(&["stop_app"])?;
            let restarted = async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Instant::now()
            }
            .await;
            rabbitmqctl(&["start_app"])?;
            restarted
        }
        Fault::DatabaseRestart => {
            db.crash_and_restart(Duration::from_secs(2)).await?;
            Instant::now()
        }
        Fault::ConnectionCuts => {
            let proxy = bed.amqp.as_ref().context("no proxy before RabbitMQ")?;
            for _ in 0..3 {
                proxy.cut();
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            // Then a silent network: connections open, nothing moving, until heartbeats
            // (5 s here) give them up.
            let before = bed.log_lines("", "consumer lost");
            proxy.set_stalled(true);
            tokio::time::sleep(Duration::from_secs(STALL_SECS)).await;
            proxy.set_stalled(false);
            let noticed = bed.log_lines("", "consumer lost").saturating_sub(before);
            notes =
                format!(
                "3 cuts, then a {STALL_SECS} s stall: {noticed} warnings of lost RabbitMQ links{}",
                if noticed == 0 { " (FAIL: the stall went unnoticed)" } else { "" }
            );
            Instant::now()
        }
        Fault::Poison => {
            let parked_before = bed.parked().await?;
            bed.publish_poison().await?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut parked = 0;
            while Instant::now() < deadline {
                parked = bed.parked().await?.saturating_sub(parked_before);
                if parked >= 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            notes = format!(
                "{parked}/2 poison jobs parked with a reason{}",
                if parked >= 2 { "" } else { " (FAIL)" }
            );
            Instant::now()
        }
        Fault::ChannelClose => {
            // Held past the consumer timeout set for this bed: RabbitMQ closes the channel.
            bed.smtp.set_hang(true);
            tokio::time::sleep(Duration::from_secs(4)).await;
            bed.smtp.set_hang(false);
            // A worker notices the closed channel when its in-flight sends return: give
            // the log a moment rather than count too early.
            let mut closed = 0;
            for _ in 0..40 {
                closed = bed.log_lines("worker", "consumer lost");
                if closed > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            notes = format!(
                "RabbitMQ closed {closed} consumer channels; each reopened{}",
                if closed == 0 {
                    " (FAIL: none closed)"
                } else {
                    ""
                }
            );
            Instant::now()
        }
        Fault::ProviderStorms => {
            bed.smtp.set_idle_close(Some(Duration::from_millis(300)));
            bed.smtp
                .set_storm(Some("421 4.3.2 chaos: service not available"));
            tokio::time::sleep(Duration::from_secs(3)).await;
            bed.smtp.set_storm(None);
            tokio::time::sleep(Duration::from_secs(2)).await;
            bed.smtp.set_hang(true);
            tokio::time::sleep(Duration::from_secs(4)).await;
            bed.smtp.set_hang(false);
            notes = "recovery waits out the email circuit breaker's 30 s cooldown".into();
            Instant::now()
        }
        Fault::SchedulerKills => {
            let (schedules, fired) = scheduler_kills(bed, opts).await?;
            notes = format!("{schedules} slots due in one minute");
            fired
        }
        Fault::Sigterm => {
            let took = bed.terminate_all(Duration::from_secs(30)).await?;
            notes = format!(
                "all 5 processes drained and exited in {:.1} s",
                took.as_secs_f64()
            );
            for role in super::ROLES {
                bed.spawn(role)?;
            }
            bed.wait_ready().await?;
            Instant::now()
        }
        Fault::Overload => {
            let sample = Duration::from_secs(if opts.quick { 10 } else { 60 });
            let peak = bed.watch_rss(sample).await;
            notes = format!("peak RSS {peak:.0} MB while overloaded");
            Instant::now()
        }
        Fault::BrokerNodeKill | Fault::BrokerNodeKillClassic => {
            let cluster = cluster.context("this fault needs the RabbitMQ cluster")?;
            // The campaign's lane and the singles' lane: one node leads both (herald's
            // processes declared them all through the first address).
            let names = bed.ctx.broker.names();
            let node = cluster.leader(names.lane(Priority::Low)).await?;
            let high = cluster.leader(names.lane(Priority::High)).await?;
            anyhow::ensure!(
                node == high,
                "the lanes are led by nodes {node} and {high}, not one"
            );
            let down = Duration::from_secs(if opts.quick { 10 } else { 20 });
            cluster.kill(node).await?;
            // From here nothing more can reach the killed node.
            let killed = Instant::now();
            tokio::time::sleep(down).await;
            let returning = Instant::now();
            cluster.start(node).await?;
            let restarted = Instant::now();
            // Sends already under way finish right after the kill: recovery is when an
            // event posted after the kill was first delivered.
            let deadline = Instant::now() + Duration::from_secs(if opts.quick { 60 } else { 120 });
            let resumed = loop {
                if let Some(t) = bed.first_arrival_accepted_after(killed).await? {
                    break t;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "no event posted after the kill was delivered"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let during = resumed < returning;
            let failed = fault == Fault::BrokerNodeKill && !during;
            notes = format!(
                "node {node} (leading the lanes) killed for {} s, then started (ready {:.1} s later); deliveries resumed {}{}",
                down.as_secs(),
                (restarted - returning).as_secs_f64(),
                if during { "while it was down" } else { "only after it returned" },
                if failed { " (FAIL: quorum queues should have moved to another node)" } else { "" }
            );
            recovered = Some((resumed - killed).as_secs_f64());
            restarted
        }
    };
    let recovery = match recovered {
        Some(r) => r,
        None => {
            bed.recovery(
                repaired,
                Duration::from_secs(if opts.quick { 60 } else { 120 }),
            )
            .await
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    singles.await??;
    let refused = bed.refused.load(std::sync::atomic::Ordering::Relaxed);
    if fault == Fault::Overload {
        notes = format!(
            "{notes}; {refused} answers were 503 + Retry-After{}",
            if refused == 0 {
                " (FAIL: no pushback)"
            } else {
                ""
            }
        );
    }
    Ok((recovery, notes))
}

/// How long `connection-cuts` keeps RabbitMQ's connections silent.
const STALL_SECS: u64 = 15;

const CONSUMER_TIMEOUT_MS: u64 = 2_000;
/// RabbitMQ's defaults (30 min; a channel tick a minute).
const DEFAULT_CONSUMER_TIMEOUT_MS: u64 = 1_800_000;
const DEFAULT_CHANNEL_TICK_MS: u64 = 60_000;

/// RabbitMQ's consumer timeout (`None`: back to the default). Channels check it on their
/// tick, once a minute by default, so the tick is shortened with it.
fn consumer_timeout(ms: Option<u64>) -> anyhow::Result<()> {
    let eval = match ms {
        Some(ms) => format!(
            "application:set_env(rabbit, consumer_timeout, {ms}), application:set_env(rabbit, channel_tick_interval, 500)."
        ),
        None => format!(
            "application:set_env(rabbit, consumer_timeout, {DEFAULT_CONSUMER_TIMEOUT_MS}), application:set_env(rabbit, channel_tick_interval, {DEFAULT_CHANNEL_TICK_MS})."
        ),
    };
    rabbitmqctl(&["eval", &eval])
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "rabbitmqctl {args:?} failed: {status}");
    Ok(())
}

/// Creates schedules due at the next minute boundary (at least 8 s away), kills the two
/// schedulers alternately from 3 s before to 12 s after it, and records the slots owed.
async fn scheduler_kills(bed: &mut Bed, opts: &Options) -> anyhow::Result<(usize, Instant)> {
    let now = Utc::now();
    let mut due = now
        .with_second(0)
        .unwrap_or(now)
        .with_nanosecond(0)
        .unwrap_or(now)
        + chrono::Duration::minutes(1);
    if due - now < chrono::Duration::seconds(8) {
        due += chrono::Duration::minutes(1);
    }
    let count = if opts.quick { 50 } else { 200 };
    let mut ids = HashSet::new();
    for i in 0..count {
        let body = json!({
            "name": format!("chaos {i}"),
            "cron": format!("{} {} * * *", due.minute(), due.hour()),
            "timezone": "UTC",
            "event_type": "welcome", "channels": ["email"], "priority": "normal",
            "recipients": {"user_ids": [format!("s-{:05}", super::SINGLE_USERS - 1 - i)]},
            "payload": {}
        });
        let created: serde_json::Value = bed
            .client
            .post(format!("{}/v1/schedules", bed.base))
            .bearer_auth(&bed.key)
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ids.insert(
            created["schedule_id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("a schedule without an id: {created}"))?
                .to_owned(),
        );
    }
    bed.slots = ids;
    let start = (due - chrono::Duration::seconds(3) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(start).await;
    let until = Instant::now() + Duration::from_secs(15);
    let mut i = 0;
    while Instant::now() < until {
        bed.crash_and_restart(Role::Scheduler(i % 2), Duration::from_millis(300))
            .await?;
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        i += 1;
    }
    Ok((count, Instant::now()))
}
