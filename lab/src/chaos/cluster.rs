//! The 3-node RabbitMQ cluster on loopback that the `broker-node-kill` faults run against, driven through `scripts/cluster`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use tokio::process::Command;

const SCRIPT: &str = "scripts/cluster";

/// A running cluster; dropping it stops the nodes and deletes their files.
pub(super) struct Cluster {
    urls: Vec<String>,
}

impl Cluster {
    /// `scripts/cluster up` (it reuses nodes that already run).
    pub async fn up() -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new(SCRIPT).exists(),
            "{SCRIPT} not found: run herald-lab from the repository's root"
        );
        // Whatever `up` started is stopped again if the rest fails.
        let mut cluster = Self { urls: Vec::new() };
        run(&["up"]).await?;
        let urls = output(&["urls"]).await?;
        cluster.urls = urls.trim().split(',').map(str::to_owned).collect();
        Ok(cluster)
    }

    /// The nodes' AMQP addresses, node 1 first.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The node (1–3) leading a quorum queue or hosting a classic one.
    pub async fn leader(&self, queue: &str) -> anyhow::Result<u8> {
        let out = output(&["leader", queue]).await?;
        out.trim()
            .parse()
            .with_context(|| format!("{SCRIPT} leader said {out:?}"))
    }

    /// SIGKILL a node; returns once its port is closed.
    pub async fn kill(&self, node: u8) -> anyhow::Result<()> {
        run(&["kill", &node.to_string()]).await
    }

    /// Starts a node again on its files (it rejoins the cluster).
    pub async fn start(&self, node: u8) -> anyhow::Result<()> {
        run(&["start", &node.to_string()]).await
    }

    /// Copies the nodes' logs under `dest` (`down` deletes them).
    pub async fn save_logs(&self, dest: &Path) -> anyhow::Result<PathBuf> {
        let dest = dest.join("rabbitmq-cluster");
        run(&["save-logs", &dest.display().to_string()]).await?;
        Ok(dest)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let stopped = std::process::Command::new(SCRIPT)
            .arg("down")
            .stdout(Stdio::null())
            .status();
        if !stopped.is_ok_and(|s| s.success()) {
            eprintln!("could not stop the RabbitMQ cluster: run `{SCRIPT} down`");
        }
    }
}

async fn run(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(SCRIPT)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {SCRIPT}"))?;
    anyhow::ensure!(status.success(), "{SCRIPT} {}: {status}", args.join(" "));
    Ok(())
}

async fn output(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(SCRIPT)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("running {SCRIPT}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{SCRIPT} {}: {}",
        args.join(" "),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
