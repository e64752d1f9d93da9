//! herald's entry point: parse the command line, load settings, run one role.

use anyhow::Context as _;
use clap::Parser;

use herald::cli::{Cli, Command, Keys};
use herald::domain::Scope;
use herald::{app::Context, config::Settings, roles, seed, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(&cli.config_dir)?;
    telemetry::init(&settings.log);
    let bind = settings.server.bind;
    let ctx = Context::build(settings).await?;
    let store = ctx.store.clone();
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
    };
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "herald stopped with an error");
    }
    store.close().await;
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
