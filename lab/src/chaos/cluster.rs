//! The 3-node RabbitMQ cluster on loopback that the `broker-node-kill` faults run against, driven through `scripts/cluster`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Context as _;

/// A running cluster; dropping it stops the nodes and deletes their files.
pub(super) struct Cluster {
    script: PathBuf,
    urls: Vec<String>,
}

impl Cluster {
    /// `scripts/cluster up` (it reuses nodes that already run).
    pub fn up() -> anyhow::Result<Self> {
        let script = PathBuf::from("scripts/cluster");
        anyhow::ensure!(
            script.exists(),
            "{} not found: run herald-lab from the repository's root",
            script.display()
        );
        let mut cluster = Self {
            script,
            urls: Vec::new(),
        };
        cluster.run(&["up"])?;
        let urls = cluster.output(&["urls"])?;
        cluster.urls = urls.trim().split(',').map(str::to_owned).collect();
        Ok(cluster)
    }

    /// The nodes' AMQP addresses, node 1 first.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The node (1–3) leading a quorum queue or hosting a classic one.
    pub fn leader(&self, queue: &str) -> anyhow::Result<u8> {
        let out = self.output(&["leader", queue])?;
        out.trim()
            .parse()
            .with_context(|| format!("scripts/cluster leader said {out:?}"))
    }

    /// SIGKILL a node.
    pub fn kill(&self, node: u8) -> anyhow::Result<()> {
        self.run(&["kill", &node.to_string()])
    }

    /// Starts a node again on its files (it rejoins the cluster).
    pub fn start(&self, node: u8) -> anyhow::Result<()> {
        self.run(&["start", &node.to_string()])
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let status = Command::new(&self.script)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {}", self.script.display()))?;
        anyhow::ensure!(status.success(), "scripts/cluster {args:?}: {status}");
        Ok(())
    }

    fn output(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.script)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", self.script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "scripts/cluster {args:?}: {}",
            out.status
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.run(&["down"]) {
            eprintln!("could not stop the RabbitMQ cluster: {e:#}");
        }
    }
}
