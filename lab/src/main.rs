//! herald's lab: the benchmarks and the fault suite, run against real local servers and
//! herald's own binary. Not part of the product; `scripts/bench` and `scripts/chaos` run it.

mod bench;
mod chaos;
mod db;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use herald::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "herald-lab",
    about = "herald's benchmarks and fault suite (throw-away databases and queues)"
)]
struct Cli {
    /// Folder holding `<HERALD_ENV>.toml` overrides (the defaults are built in).
    #[arg(
        long,
        env = "HERALD_CONFIG_DIR",
        default_value = "config",
        global = true
    )]
    config_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure against the real local servers (a throw-away database and queues).
    #[command(subcommand)]
    Bench(Bench),
    /// Inject faults into herald's own processes (a throw-away database and queues per
    /// fault) and account for every accepted delivery: lost, duplicated, unexpected.
    Chaos {
        /// The short form (CI): 1,000-delivery campaigns, shorter faults.
        #[arg(long)]
        quick: bool,
        /// Only these faults (repeatable); all by default.
        #[arg(long, value_enum)]
        fault: Vec<chaos::Fault>,
        /// Deliveries per campaign (default 10,000; 1,000 with --quick).
        #[arg(long)]
        deliveries: Option<usize>,
        /// The MongoDB-compatible server the harness runs (and kills).
        #[arg(long, default_value = "secantusd-rs")]
        database_server: PathBuf,
        /// Rewrite the table in this document (full runs of every fault only).
        #[arg(long)]
        doc: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Fire lag of many schedules due within a window, with racing scheduler instances.
    Scheduler {
        #[arg(long, env = "HERALD_BENCH_SCHEDULES", default_value_t = 10_000)]
        schedules: usize,
        #[arg(long, env = "HERALD_BENCH_WINDOW_SECS", default_value_t = 60)]
        window_secs: u64,
        #[arg(long, env = "HERALD_BENCH_INSTANCES", default_value_t = 2)]
        instances: usize,
    },
    /// Concurrent clients posting single-recipient events to a `herald api` process.
    Ingest {
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        #[arg(long, default_value_t = 32)]
        clients: usize,
    },
    /// One event to a large segment, api and worker as separate processes: email through
    /// a real SMTP server, SMS and push through a server answering like Twilio and FCM.
    Fanout {
        #[arg(long, default_value_t = 100_000)]
        deliveries: usize,
        /// Email + SMS + push (a third as many recipients) instead of email only.
        #[arg(long)]
        mixed: bool,
        /// High-priority events per second posted while the campaign drains (and on the
        /// idle system before it); their accept → sent latency is reported. 0: none.
        #[arg(long, default_value_t = 0.0)]
        probe_per_sec: f64,
        /// An SMTP server that accepts everything (scripts/bench starts Postfix's smtp-sink).
        #[arg(long, default_value_t = 2525)]
        smtp_port: u16,
    },
    /// Every scenario in one run: ceilings, ingest, fan-out, mixed channels, priority
    /// under backlog and the scheduler; prints a table, saves one JSON file and writes
    /// the performance table in docs/benchmarks.md.
    All {
        /// Small sizes: under 2 minutes.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 2525)]
        smtp_port: u16,
        /// The document whose performance table is rewritten (between its markers).
        #[arg(long, default_value = "docs/benchmarks.md")]
        doc: PathBuf,
    },
    /// Inbox sockets: one `herald api` process holding `sockets` open sockets while
    /// `per_sec` in-app events arrive for random connected users → the API's memory and
    /// the time from an event's 202 to its item on the socket.
    Inbox {
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        #[arg(long, default_value_t = 100.0)]
        per_sec: f64,
        #[arg(long, default_value_t = 30)]
        secs: u64,
    },
    /// A campaign with and without a status webhook endpoint subscribed to `message.sent`
    /// (alternating, `rounds` of each), and the events' rate to a loopback receiver.
    Webhooks {
        #[arg(long, default_value_t = 100_000)]
        deliveries: usize,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        #[arg(long, default_value_t = 2525)]
        smtp_port: u16,
    },
    /// The machine's own ceilings: RabbitMQ and MongoDB without herald in the loop.
    Ceilings {
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        #[arg(long, default_value_t = 100_000)]
        documents: usize,
    },
    /// Delivery-log queries and statistics with many deliveries stored.
    Logs {
        #[arg(long, env = "HERALD_BENCH_DELIVERIES", default_value_t = 1_000_000)]
        deliveries: usize,
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// Bulk user import through the API.
    Import {
        #[arg(long, env = "HERALD_BENCH_USERS", default_value_t = 100_000)]
        users: usize,
    },
}

/// The `herald` binary the lab runs as processes: `HERALD_BIN`, else the one cargo built
/// beside this one.
pub fn herald_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("HERALD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating herald-lab")?;
    let path = me.with_file_name(format!("herald{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        path.exists(),
        "no herald binary beside {} (build it, or set HERALD_BIN)",
        me.display()
    );
    Ok(path)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(&cli.config_dir)?;
    herald::telemetry::init(&settings.log);
    match cli.command {
        Command::Bench(which) => run_bench(settings, which).await,
        Command::Chaos {
            quick,
            fault,
            deliveries,
            database_server,
            doc,
        } => run_chaos(settings, quick, fault, deliveries, database_server, doc).await,
    }
}

/// `herald-lab bench`: runs one scenario (or all), prints and saves the result.
async fn run_bench(settings: Settings, which: Bench) -> anyhow::Result<()> {
    let (name, result) = match which {
        Bench::Scheduler {
            schedules,
            window_secs,
            instances,
        } => (
            "scheduler",
            bench::scheduler(settings, schedules, window_secs, instances).await?,
        ),
        Bench::Import { users } => ("import", bench::import(settings, users).await?),
        Bench::Fanout {
            deliveries,
            mixed,
            probe_per_sec,
            smtp_port,
        } => {
            let c = bench::Campaign {
                deliveries,
                mixed,
                probe_per_sec,
                smtp_port,
            };
            ("campaign", bench::campaign(settings, c).await?)
        }
        Bench::All {
            quick,
            smtp_port,
            doc,
        } => (
            "all",
            bench::suite::all(settings, quick, smtp_port, &doc).await?,
        ),
        Bench::Inbox {
            sockets,
            per_sec,
            secs,
        } => (
            "inbox",
            bench::inbox::inbox(settings, sockets, per_sec, secs).await?,
        ),
        Bench::Webhooks {
            deliveries,
            rounds,
            smtp_port,
        } => (
            "webhooks",
            bench::webhooks(settings, deliveries, rounds, smtp_port).await?,
        ),
        Bench::Ingest { events, clients } => {
            ("ingest", bench::ingest(settings, events, clients).await?)
        }
        Bench::Ceilings {
            messages,
            documents,
        } => (
            "ceilings",
            bench::ceilings(settings, messages, documents).await?,
        ),
        Bench::Logs {
            deliveries,
            samples,
        } => ("logs", bench::logs(settings, deliveries, samples).await?),
    };
    println!("saved {}", bench::save(name, &result)?.display());
    Ok(())
}

/// `herald-lab chaos`: runs the faults, prints and saves the table; fails if any row lost or
/// doubled a delivery.
async fn run_chaos(
    settings: Settings,
    quick: bool,
    faults: Vec<chaos::Fault>,
    deliveries: Option<usize>,
    database_server: std::path::PathBuf,
    doc: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let opts = chaos::Options {
        deliveries: deliveries.unwrap_or(if quick { 1_000 } else { 10_000 }),
        singles_per_sec: if quick { 10.0 } else { 20.0 },
        faults: if faults.is_empty() {
            chaos::ALL.to_vec()
        } else {
            faults
        },
        database_server,
        quick,
    };
    let complete = opts.faults.len() == chaos::ALL.len();
    let rows = chaos::run(settings, opts).await?;
    println!("\n{}", chaos::table(&rows));
    println!("saved {}", chaos::save(&rows, quick)?.display());
    if let (Some(doc), false, true) = (doc, quick, complete) {
        chaos::write_table(&doc, &rows, "scripts/chaos")?;
        println!("updated {}", doc.display());
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.fault.as_str())
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "faults that lost or doubled deliveries: {failed:?}"
    );
    Ok(())
}
