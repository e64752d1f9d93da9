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
}
