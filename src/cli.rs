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
}

#[derive(Debug, Subcommand)]
pub enum Keys {
    /// Create a key and print it (only its hash is stored).
    Create {
        /// What the key is for, e.g. `billing-service`.
        #[arg(long)]
        name: String,
        /// Comma-separated: events:write, campaigns:write, logs:read, feedback:write,
        /// webhooks:write, admin.
        #[arg(long)]
        scopes: String,
        /// Requests per second for this key (default: auth.rate_per_sec).
        #[arg(long)]
        rate_per_sec: Option<crate::domain::Rate>,
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
