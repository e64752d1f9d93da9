//! `herald-lab bench all`: every scenario in one run, each figure beside the machine's own
//! ceilings from the same run; one JSON file and the performance table in docs/benchmarks.md.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::{json, Value};

use super::Campaign;
use herald::config::Settings;

const TABLE_START: &str = "<!-- bench:start -->";
const TABLE_END: &str = "<!-- bench:end -->";

/// Scenario sizes: the full run (under 15 minutes here) or `--quick` (under 2).
struct Sizes {
    ceiling_messages: usize,
    ceiling_docs: usize,
    ingest_events: usize,
    ingest_clients: usize,
    fanout: usize,
    mixed: usize,
    priority: usize,
    probe_per_sec: f64,
    schedules: usize,
    schedule_window_secs: u64,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                ceiling_messages: 10_000,
                ceiling_docs: 10_000,
                ingest_events: 3_000,
                ingest_clients: 32,
                fanout: 5_000,
                mixed: 3_000,
                priority: 5_000,
                probe_per_sec: 20.0,
                schedules: 500,
                schedule_window_secs: 10,
            }
        } else {
            Self {
                ceiling_messages: 100_000,
                ceiling_docs: 100_000,
                ingest_events: 30_000,
                ingest_clients: 64,
                fanout: 100_000,
                mixed: 100_000,
                priority: 100_000,
                probe_per_sec: 20.0,
                schedules: 10_000,
                schedule_window_secs: 60,
            }
        }
    }
}

pub async fn all(
    settings: Settings,
    quick: bool,
    smtp_port: u16,
    readme: &Path,
) -> anyhow::Result<Value> {
    let z = Sizes::new(quick);
    let started = Instant::now();
    let campaign = |deliveries, mixed, probe_per_sec| Campaign {
        deliveries,
        mixed,
        probe_per_sec,
        smtp_port,
    };
    let ceilings = super::ceilings(settings.clone(), z.ceiling_messages, z.ceiling_docs).await?;
    let ingest = super::ingest(settings.clone(), z.ingest_events, z.ingest_clients).await?;
    let fanout = super::campaign(settings.clone(), campaign(z.fanout, false, 0.0)).await?;
    let mixed = super::campaign(settings.clone(), campaign(z.mixed, true, 0.0)).await?;
    let priority = super::campaign(
        settings.clone(),
        campaign(z.priority, false, z.probe_per_sec),
    )
    .await?;
    let scheduler = super::scheduler(settings, z.schedules, z.schedule_window_secs, 2).await?;
    let seconds = started.elapsed().as_secs_f64().round();

    let rabbit = ceilings["rabbitmq"]["publish_confirmed_per_sec"]
        .as_f64()
        .unwrap_or(0.0)
        .min(
            ceilings["rabbitmq"]["consume_acked_per_sec"]
                .as_f64()
                .unwrap_or(0.0),
        );
    let mongo_insert = ceilings["mongodb"]["insert_per_sec"]
        .as_f64()
        .unwrap_or(0.0);
    let mongo_outcomes = ceilings["mongodb"]["outcomes_in_transactions_per_sec"]
        .as_f64()
        .unwrap_or(0.0);
    let written_with_outcome = ceilings["mongodb"]["written_with_outcome_per_sec"]
        .as_f64()
        .unwrap_or(0.0);
    let delivery_bound = delivery_bound(mongo_insert, mongo_outcomes);
    let ratio = |x: &Value, ceiling: f64| {
        let x = x.as_f64().unwrap_or(0.0);
        if ceiling > 0.0 {
            (x / ceiling * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    let ratios = json!({
        "ingest_to_rabbitmq": ratio(&ingest["accepted_per_sec"], rabbit),
        "ingest_to_mongodb_insert": ratio(&ingest["accepted_per_sec"], mongo_insert),
        "fanout_to_rabbitmq": ratio(&fanout["deliveries_per_sec"], rabbit),
        "fanout_to_mongodb_insert": ratio(&fanout["deliveries_per_sec"], mongo_insert),
        "fanout_to_mongodb_outcomes": ratio(&fanout["deliveries_per_sec"], mongo_outcomes),
        "fanout_to_mongodb_delivery_bound": ratio(&fanout["deliveries_per_sec"], delivery_bound),
        "fanout_to_mongodb_written_with_outcome": ratio(&fanout["deliveries_per_sec"], written_with_outcome),
        "fanout_to_cpu_bound": ratio(&fanout["deliveries_per_sec"], fanout["cpu"]["bound_per_sec"].as_f64().unwrap_or(0.0)),
        "mixed_to_rabbitmq": ratio(&mixed["deliveries_per_sec"], rabbit),
        "mixed_to_mongodb_insert": ratio(&mixed["deliveries_per_sec"], mongo_insert),
        "mixed_to_mongodb_outcomes": ratio(&mixed["deliveries_per_sec"], mongo_outcomes),
        "mixed_to_mongodb_delivery_bound": ratio(&mixed["deliveries_per_sec"], delivery_bound),
        "mixed_to_mongodb_written_with_outcome": ratio(&mixed["deliveries_per_sec"], written_with_outcome),
        "mixed_to_cpu_bound": ratio(&mixed["deliveries_per_sec"], mixed["cpu"]["bound_per_sec"].as_f64().unwrap_or(0.0)),
    });
    let result = json!({
        "bench": "all",
        "quick": quick,
        "seconds": seconds,
        "at": chrono::Utc::now().to_rfc3339(),
        "ceilings": ceilings,
        "mongodb_delivery_bound_per_sec": delivery_bound,
        "ingest": ingest,
        "fanout": fanout,
        "mixed": mixed,
        "priority": priority,
        "scheduler": scheduler,
        "ratios": ratios,
    });
    let table = table(&result);
    println!("\n{table}");
    if quick {
        println!("(--quick: sizes too small to publish; the published table is left as it is)");
    } else {
        write_readme(readme, &table)?;
        println!("performance table updated: {}", readme.display());
    }
    Ok(result)
}

/// Deliveries/s the database could take if it did nothing else: every delivery costs it
/// at least one indexed insert and one outcome write, whatever herald does around them
/// (0 when a ceiling is unknown).
fn delivery_bound(inserts_per_sec: f64, outcomes_per_sec: f64) -> f64 {
    if inserts_per_sec > 0.0 && outcomes_per_sec > 0.0 {
        (1.0 / (1.0 / inserts_per_sec + 1.0 / outcomes_per_sec)).round()
    } else {
        0.0
    }
}

/// The Markdown table of one full run.
fn table(r: &Value) -> String {
    let f = |v: &Value| match v.as_f64() {
        Some(x) if x >= 10_000.0 => {
            let s = format!("{:.0}", x);
            let (head, tail) = s.split_at(s.len() - 3);
            format!("{head},{tail}")
        }
        Some(x) if x.fract() == 0.0 => format!("{x:.0}"),
        Some(x) => format!("{x}"),
        None => v.to_string(),
    };
    let c = &r["ceilings"];
    let rss = |s: &Value| {
        format!(
            "api {} / worker {} MB",
            f(&s["processes"]["api"]["peak_rss_mb"]),
            f(&s["processes"]["worker"]["peak_rss_mb"])
        )
    };
    let campaign = |s: &Value, scenario: &str| {
        let ratio = |ceiling: &str| f(&r["ratios"][format!("{scenario}_to_{ceiling}")]);
        format!(
            "{} deliveries/s ({} in {} s; sent {}); CPU s per 1,000: herald {}, database {}, broker {}, smtp-sink {}, harness {}, whole machine {} ({} of {} cores busy); RSS {} | {} of RabbitMQ, {} of MongoDB indexed insert, {} of MongoDB outcomes, {} of the MongoDB delivery bound, {} of MongoDB written-with-outcome; {} of the CPU bound ({} deliveries/s: the cores ÷ the machine's CPU per delivery)",
            f(&s["deliveries_per_sec"]),
            f(&s["deliveries"]),
            f(&s["seconds"]),
            f(&s["counts"]["sent"]),
            f(&s["cpu_seconds_per_1000"]),
            f(&s["database_cpu_seconds_per_1000"]),
            f(&s["cpu"]["per_1000"]["broker"]),
            f(&s["cpu"]["per_1000"]["smtp_sink"]),
            f(&s["cpu"]["per_1000"]["harness"]),
            f(&s["cpu"]["machine_per_1000"]),
            f(&s["cpu"]["busy_cores"]),
            f(&s["cpu"]["cores"]),
            rss(s),
            ratio("rabbitmq"),
            ratio("mongodb_insert"),
            ratio("mongodb_outcomes"),
            ratio("mongodb_delivery_bound"),
            ratio("mongodb_written_with_outcome"),
            ratio("cpu_bound"),
            f(&s["cpu"]["bound_per_sec"])
        )
    };
    let p = &r["priority"]["high_lane"];
    let i = &r["ingest"];
    let s = &r["scheduler"];
    let rows = [
        (
            "ceiling: RabbitMQ publish with confirms / consume with acks, persistent 160 B, one queue".to_owned(),
            format!(
                "{} / {} msg/s | —",
                f(&c["rabbitmq"]["publish_confirmed_per_sec"]),
                f(&c["rabbitmq"]["consume_acked_per_sec"])
            ),
        ),
        (
            "ceiling: the same on a quorum queue (one node)".to_owned(),
            format!(
                "{} / {} msg/s | —",
                f(&c["rabbitmq"]["quorum"]["publish_confirmed_per_sec"]),
                f(&c["rabbitmq"]["quorum"]["consume_acked_per_sec"])
            ),
        ),
        (
            "ceiling: MongoDB, on a collection with the deliveries' indexes: bulk insert / outcome-shaped transactions of 64 sent deliveries / 64 deliveries written once with their outcome a transaction".to_owned(),
            format!(
                "{} docs/s ({} database CPU s per 1,000) / {} txn/s ({} outcomes/s) / {} deliveries/s ({} database CPU s per 1,000); delivery bound (one insert + one outcome each) {} deliveries/s | —",
                f(&c["mongodb"]["insert_per_sec"]),
                f(&c["mongodb"]["insert_database_cpu_seconds_per_1000"]),
                f(&c["mongodb"]["transactions_per_sec"]),
                f(&c["mongodb"]["outcomes_in_transactions_per_sec"]),
                f(&c["mongodb"]["written_with_outcome_per_sec"]),
                f(&c["mongodb"]["written_with_outcome_database_cpu_seconds_per_1000"]),
                f(&r["mongodb_delivery_bound_per_sec"])
            ),
        ),
        (
            format!(
                "ingest: {} clients, {} single-recipient events (target ≥ 5,000/s)",
                f(&i["clients"]),
                f(&i["events"])
            ),
            format!(
                "{} events/s, p50 {} ms, p99 {} ms, {} refused; RSS api {} MB | {} of RabbitMQ, {} of MongoDB insert",
                f(&i["accepted_per_sec"]),
                f(&i["response_ms"]["p50"]),
                f(&i["response_ms"]["p99"]),
                f(&i["refused"]),
                f(&i["api_peak_rss_mb"]),
                f(&r["ratios"]["ingest_to_rabbitmq"]),
                f(&r["ratios"]["ingest_to_mongodb_insert"])
            ),
        ),
        (
            format!(
                "campaign fan-out: one event, {} email recipients, smtp-sink (target ≥ 5,000/s and ≥ 0.25 of RabbitMQ; RSS ≤ 150 MB)",
                f(&r["fanout"]["deliveries"])
            ),
            campaign(&r["fanout"], "fanout"),
        ),
        (
            format!(
                "mixed channels: {} deliveries, email + SMS + push (Twilio- and FCM-like HTTP sink)",
                f(&r["mixed"]["deliveries"])
            ),
            campaign(&r["mixed"], "mixed"),
        ),
        (
            format!(
                "priority: high events at {}/s while {} low deliveries drain, accept → sent (target p99 ≤ 100 ms)",
                f(&p["per_sec"]),
                f(&r["priority"]["deliveries"])
            ),
            format!(
                "idle p50 {} / p99 {} / max {} ms; under backlog p50 {} / p99 {} / max {} ms ({} probes) | —",
                f(&p["idle"]["p50_ms"]),
                f(&p["idle"]["p99_ms"]),
                f(&p["idle"]["max_ms"]),
                f(&p["under_backlog"]["p50_ms"]),
                f(&p["under_backlog"]["p99_ms"]),
                f(&p["under_backlog"]["max_ms"]),
                f(&p["under_backlog"]["count"])
            ),
        ),
        (
            format!(
                "scheduler: {} schedules due within {} s, 2 racing instances",
                f(&s["schedules"]),
                f(&s["window_secs"])
            ),
            format!(
                "fire lag p50 {} / p99 {} / max {} ms; {} duplicates, {} missed | —",
                f(&s["lag_ms"]["p50"]),
                f(&s["lag_ms"]["p99"]),
                f(&s["lag_ms"]["max"]),
                f(&s["duplicates"]),
                f(&s["missed"])
            ),
        ),
    ];
    let mut out = String::from("| scenario | result | ratio to the ceilings |\n|---|---|---|\n");
    for (scenario, result) in rows {
        out.push_str(&format!("| {scenario} | {result} |\n"));
    }
    out.push_str(&format!(
        "\n`scripts/bench` on {}; the whole run took {} s.\n",
        r["at"]
            .as_str()
            .unwrap_or_default()
            .get(..10)
            .unwrap_or_default(),
        f(&r["seconds"])
    ));
    out
}

/// Replaces what lies between the document's table markers.
fn write_readme(path: &Path, table: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (Some(a), Some(b)) = (text.find(TABLE_START), text.find(TABLE_END)) else {
        anyhow::bail!(
            "{} has no `{TABLE_START}` … `{TABLE_END}` markers",
            path.display()
        );
    };
    anyhow::ensure!(a < b, "the table markers are out of order");
    let updated = format!("{}{TABLE_START}\n{table}{}", &text[..a], &text[b..]);
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_delivery_bound_adds_an_insert_and_an_outcome_per_delivery() {
        assert_eq!(super::delivery_bound(10_000.0, 2_500.0), 2_000.0);
        assert_eq!(super::delivery_bound(0.0, 2_500.0), 0.0, "unknown ceiling");
    }

    #[test]
    fn the_readme_table_is_replaced_between_its_markers_only() {
        let dir = std::env::temp_dir().join(format!("herald-readme-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("README.md");
        std::fs::write(
            &path,
            format!(
                "intro\n{}\nold table\n{}\noutro\n",
                super::TABLE_START,
                super::TABLE_END
            ),
        )
        .expect("write");
        super::write_readme(&path, "| new |\n").expect("updated");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text,
            format!(
                "intro\n{}\n| new |\n{}\noutro\n",
                super::TABLE_START,
                super::TABLE_END
            )
        );
        std::fs::write(&path, "no markers").expect("write");
        assert!(super::write_readme(&path, "x").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
