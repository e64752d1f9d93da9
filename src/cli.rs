//! Command line: one binary, a subcommand per role.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Notification delivery: intake, campaigns, worker pool, delivery log"
)]
pub struct Cli {
    /// Folder holding `<HERALD_ENV>.toml` overrides (the defaults are built in).
    #[arg(
        long,
        env = "HERALD_CONFIG_DIR",
        default_value = "config",
        global = true
    )]
    pub config_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// REST API, the herald.events intake and the outbox relay.
    Api,
    /// Cron campaigns and the outbox sweep.
    Scheduler,
    /// Dispatch and delivery pool.
    Worker,
    /// Every role in one process.
    All,
    /// Create collections and indexes (idempotent).
    Migrate,
    /// Write demo users, a group and content.
    Seed,
    /// API keys: create (shown once), list, revoke.
    #[command(subcommand)]
    Keys(Keys),
    /// Recompute the delivery statistics from the delivery log (after a restore).
    RebuildStats,
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
        fault: Vec<crate::chaos::Fault>,
        /// Deliveries per campaign (default 10,000; 1,000 with --quick).
        #[arg(long)]
        deliveries: Option<usize>,
        /// The MongoDB-compatible server the harness runs (and kills).
        #[arg(long, default_value = "secantusd-rs")]
        database_server: PathBuf,
        /// Rewrite the table in this README (full runs only).
        #[arg(long)]
        readme: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Keys {
    /// Create a key and print it (only its hash is stored).
    Create {
        /// What the key is for, e.g. `billing-service`.
        #[arg(long)]
        name: String,
        /// Comma-separated: events:write, campaigns:write, logs:read, admin.
        #[arg(long)]
        scopes: String,
        /// Requests per second for this key (default: auth.rate_per_sec).
        #[arg(long)]
        rate_per_sec: Option<f64>,
        /// Revoke live keys with the same name first (rotating a key).
        #[arg(long)]
        replace: bool,
        /// Print only the key (for scripts).
        #[arg(long)]
        quiet: bool,
    },
    /// Every key, newest first.
    List,
    /// Revoke a key by its id.
    Revoke { key_id: String },
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
    /// the README's performance table.
    All {
        /// Small sizes: under 2 minutes.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 2525)]
        smtp_port: u16,
        /// Where the performance table goes (between its markers).
        #[arg(long, default_value = "README.md")]
        readme: std::path::PathBuf,
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
