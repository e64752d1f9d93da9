//! Batches delivery outcomes into one MongoDB transaction each, so concurrent deliveries
//! touch a notification's counters once per batch instead of conflicting with each other.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::gate::LaneGate;
use crate::batch::Batcher;
use crate::domain::Priority;
use crate::metrics::Metrics;
use crate::store::{Outcome, Store};

/// Submits an outcome and returns once it is committed; only then may its message be acked.
pub type Committer = Batcher<Outcome, ()>;

/// The committer of one priority lane (it picks the rollup documents the lane counts on);
/// each commit first waits for the lane's turn at the database.
pub fn start(
    store: Store,
    metrics: Arc<Metrics>,
    batch_max: usize,
    lane: Priority,
    gate: LaneGate,
) -> (Committer, JoinHandle<()>) {
    Batcher::start("commit", batch_max, move |outcomes: Vec<Outcome>| {
        let (store, metrics, gate) = (store.clone(), Arc::clone(&metrics), gate.clone());
        async move {
            gate.turn().await;
            let applied = store.commit_outcomes(&outcomes, lane).await?;
            record(&metrics, &outcomes, &applied);
            Ok(vec![(); outcomes.len()])
        }
    })
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
