//! Batches delivery outcomes into one MongoDB transaction each, so concurrent deliveries
//! touch a notification's counters once per batch instead of conflicting with each other.

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::store::{Outcome, Store};

type Request = (Outcome, oneshot::Sender<Result<(), String>>);

/// A handle for submitting outcomes; the committing task ends when every handle is dropped.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
}

impl Committer {
    pub fn start(store: Store, metrics: Arc<Metrics>, batch_max: usize) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Request>(batch_max * 4);
        let task = tokio::spawn(async move {
            let mut batch: Vec<Request> = Vec::with_capacity(batch_max);
            while let Some(first) = rx.recv().await {
                batch.push(first);
                // Whatever arrived while the last transaction ran joins this one.
                while batch.len() < batch_max {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let outcomes: Vec<Outcome> = batch.iter().map(|(o, _)| o.clone()).collect();
                let result = store
                    .commit_outcomes(&outcomes)
                    .await
                    .map(|applied| record(&metrics, &outcomes, &applied))
                    .map_err(|e| format!("{e:#}"));
                if let Err(e) = &result {
                    tracing::error!(error = %e, count = outcomes.len(), "committing outcomes failed");
                }
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(result.clone());
                }
            }
        });
        (Self { tx }, task)
    }

    /// Returns once the outcome is committed; only then may its message be acked.
    pub async fn commit(&self, outcome: Outcome) -> anyhow::Result<()> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send((outcome, reply))
            .await
            .map_err(|_| anyhow::anyhow!("the committer has stopped"))?;
        done.await
            .map_err(|_| anyhow::anyhow!("the committer has stopped"))?
            .map_err(anyhow::Error::msg)
    }
}

/// Counts what was written (outcomes whose precondition failed changed nothing).
fn record(metrics: &Metrics, outcomes: &[Outcome], applied: &[bool]) {
    for (o, _) in outcomes.iter().zip(applied).filter(|(_, a)| **a) {
        metrics.delivery(o.channel.as_str(), o.status.as_str(), o.provider.as_deref());
        if let Some(a) = &o.attempt {
            if let Some(p) = &a.provider {
                let took = std::time::Duration::from_millis(a.duration_ms.max(0) as u64);
                metrics.attempt(o.channel.as_str(), p, took);
            }
        }
    }
}
