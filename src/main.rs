//! herald's entry point: parse the command line, load settings, run one role.

use anyhow::Context as _;
use clap::Parser;

use herald::cli::{Bench, Cli, Command, Keys};
use herald::domain::Scope;
use herald::{app::Context, bench, chaos, config::Settings, roles, seed, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(&cli.config_dir)?;
    telemetry::init(&settings.log);
    let bind = settings.server.bind;
    if let Command::Bench(which) = &cli.command {
        let (name, result) = match *which {
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
                ref readme,
            } => (
                "all",
                bench::suite::all(settings, quick, smtp_port, readme).await?,
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
        return Ok(());
    }
    if let Command::Chaos {
        quick,
        fault,
        deliveries,
        database_server,
        readme,
    } = cli.command
    {
        return run_chaos(settings, quick, fault, deliveries, database_server, readme).await;
    }
    let ctx = Context::build(settings).await?;
    let cancel = shutdown::on_signal();
    let result = match cli.command {
        Command::Api => roles::api(ctx, bind_listener(bind).await?, cancel).await,
        Command::Worker => roles::worker(ctx, cancel).await,
        Command::Scheduler => roles::scheduler(ctx, cancel).await,
        Command::All => roles::all(ctx, bind_listener(bind).await?, cancel).await,
        Command::Migrate => {
            ctx.store.migrate().await?;
            println!("migrated database `{}`", ctx.store.database_name());
            Ok(())
        }
        Command::Seed => {
            ctx.store.migrate().await?;
            seed::seed(&ctx.store).await?;
            println!("seeded demo data into `{}`", ctx.store.database_name());
            Ok(())
        }
        Command::Keys(k) => keys(&ctx, k).await,
        Command::RebuildStats => {
            ctx.store.migrate().await?;
            ctx.store.rebuild_stats().await?;
            println!(
                "rebuilt delivery statistics in `{}`",
                ctx.store.database_name()
            );
            Ok(())
        }
        Command::Bench(_) | Command::Chaos { .. } => Ok(()),
    };
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "herald stopped with an error");
    }
    result
}

async fn keys(ctx: &Context, command: Keys) -> anyhow::Result<()> {
    let store = &ctx.store;
    match command {
        Keys::Create {
            name,
            scopes,
            rate_per_sec,
            replace,
            quiet,
        } => {
            let scopes = Scope::parse_list(&scopes).map_err(anyhow::Error::msg)?;
            if replace {
                store.revoke_keys_named(&name).await?;
            }
            let (key, plain) = store.create_key(&name, &scopes, rate_per_sec).await?;
            if quiet {
                println!("{plain}");
            } else {
                let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
                println!(
                    "created key {} ({}) with scopes {}",
                    key.id,
                    key.name,
                    scopes.join(",")
                );
                println!("{plain}");
                println!("store it now: herald keeps only its hash and cannot show it again");
            }
        }
        Keys::List => {
            for k in store.list_keys().await? {
                let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
                let state = match k.revoked_at {
                    Some(_) => "revoked",
                    None => "live",
                };
                println!("{}\t{}\t{}\t{}", k.id, state, k.name, scopes.join(","));
            }
        }
        Keys::Revoke { key_id } => {
            if !store.revoke_key(&key_id).await? {
                anyhow::bail!("no live key with id `{key_id}`");
            }
            println!("revoked {key_id}");
        }
    }
    Ok(())
}

async fn bind_listener(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding server.bind {addr}"))
}

/// `herald chaos`: runs the faults, prints and saves the table; fails if any row lost or
/// doubled a delivery.
async fn run_chaos(
    settings: Settings,
    quick: bool,
    faults: Vec<chaos::Fault>,
    deliveries: Option<usize>,
    database_server: std::path::PathBuf,
    readme: Option<std::path::PathBuf>,
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
    if let (Some(readme), false, true) = (readme, quick, complete) {
        chaos::write_readme(&readme, &rows, "scripts/chaos")?;
        println!("updated {}", readme.display());
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
