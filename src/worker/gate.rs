//! The high lane goes first at the database: the other lanes hold new round trips while a high-priority job runs.
//!
//! Each lane has its own slots and batches, but all of them share one database, and a busy
//! one answers every request slower. While this process runs a high-priority job, the
//! normal and low lanes start no new round trip (those in flight finish), so the job's
//! reads, claim and commit meet a database that is not busy with a campaign. Its provider
//! call does not count; an enrichment service's answer does (rarely configured, bounded by
//! `enrichment.timeout_ms`). A lane never waits more than [`MAX_YIELD`] per round trip, so
//! a steady high-priority stream slows a campaign but cannot stop it. The requests held
//! meanwhile join the next round trip, so the pause costs less throughput than its length.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::domain::Priority;

/// The longest one round trip of a lower lane waits for the high lane.
pub const MAX_YIELD: Duration = Duration::from_millis(100);

/// Counts the high-priority jobs at work in this process.
#[derive(Default)]
pub struct Gate {
    high_at_work: AtomicUsize,
    idle: Notify,
}

/// A high-priority job at work, until dropped.
pub struct AtWork<'a>(&'a Gate);

/// A high-priority job waiting on something other than the database (its provider),
/// until dropped.
pub struct Away<'a>(&'a Gate);

impl Gate {
    /// Marks a high-priority job at work until the guard is dropped.
    pub fn at_work(&self) -> AtWork<'_> {
        self.high_at_work.fetch_add(1, Ordering::SeqCst);
        AtWork(self)
    }

    /// Inside [`Gate::at_work`]: the job is not using the database until the guard is
    /// dropped (the lower lanes may go on meanwhile).
    pub fn away(&self) -> Away<'_> {
        self.release();
        Away(self)
    }

    fn release(&self) {
        if self.high_at_work.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until no high-priority job is at work, or [`MAX_YIELD`] has passed.
    pub async fn lower_lane_turn(&self) {
        let idle = self.idle.notified();
        tokio::pin!(idle);
        // Registered before looking, so a release between the look and the wait is seen.
        idle.as_mut().enable();
        if self.high_at_work.load(Ordering::SeqCst) == 0 {
            return;
        }
        let _ = tokio::time::timeout(MAX_YIELD, idle).await;
    }
}

/// One lane's side of its process's [`Gate`].
#[derive(Clone)]
pub struct LaneGate {
    gate: Arc<Gate>,
    high: bool,
}

impl LaneGate {
    pub fn new(gate: Arc<Gate>, lane: Priority) -> Self {
        Self {
            gate,
            high: lane == Priority::High,
        }
    }

    /// Before a round trip: a lower lane waits for its turn, the high lane goes.
    pub async fn turn(&self) {
        if !self.high {
            self.gate.lower_lane_turn().await;
        }
    }

    /// For the length of one job: on the high lane, marks it at work.
    pub fn job(&self) -> Option<AtWork<'_>> {
        self.high.then(|| self.gate.at_work())
    }

    /// Inside [`LaneGate::job`], while the job waits for its provider.
    pub fn away(&self) -> Option<Away<'_>> {
        self.high.then(|| self.gate.away())
    }
}

impl Drop for AtWork<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Drop for Away<'_> {
    fn drop(&mut self) {
        self.0.high_at_work.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_lower_lane_goes_at_once_when_no_high_job_is_at_work() {
        let gate = Gate::default();
        let started = Instant::now();
        gate.lower_lane_turn().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_lane_waits_for_the_high_job_but_never_longer_than_the_bound() {
        let gate = Arc::new(Gate::default());
        let work = gate.at_work();
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move {
                let started = Instant::now();
                gate.lower_lane_turn().await;
                started.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiting.is_finished(), "went while a high job was at work");
        drop(work);
        let waited = waiting.await.expect("ran");
        assert_eq!(waited, Duration::from_millis(30));

        // A high job that never ends holds a lower lane only for the bound.
        let _forever = gate.at_work();
        let started = Instant::now();
        gate.lower_lane_turn().await;
        assert_eq!(started.elapsed(), MAX_YIELD);
    }

    #[tokio::test(start_paused = true)]
    async fn a_high_job_waiting_on_its_provider_lets_the_lower_lanes_go() {
        let gate = Gate::default();
        let _work = gate.at_work();
        {
            let _away = gate.away();
            let started = Instant::now();
            gate.lower_lane_turn().await;
            assert_eq!(started.elapsed(), Duration::ZERO);
        }
        assert_eq!(gate.high_at_work.load(Ordering::SeqCst), 1);
    }
}
