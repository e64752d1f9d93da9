//! Transactions and their failures: which errors are of the moment, write-conflict retries, commit-or-abort.

use std::time::Duration;

use mongodb::error::{ErrorKind, WriteFailure};

/// True when MongoDB could not do it now — unreachable, switching over, or the documents
/// held by another transaction — as opposed to a failure of the request itself.
pub fn is_temporary(e: &anyhow::Error) -> bool {
    is_write_conflict(e) || is_unreachable(e)
}

/// True when `e` says MongoDB could not be reached or is switching over.
pub(super) fn is_unreachable(e: &anyhow::Error) -> bool {
    // Server codes for "not now": host unreachable/not found, network timeout, shutdown,
    // stepdown, not primary, interrupted at shutdown, socket exception.
    const NOT_NOW: [i32; 12] = [
        6, 7, 89, 91, 189, 9001, 10107, 11600, 11602, 13435, 13436, 262,
    ];
    e.chain()
        .filter_map(|c| c.downcast_ref::<mongodb::error::Error>())
        .any(|m| {
            [
                "TransientTransactionError",
                "RetryableWriteError",
                "UnknownTransactionCommitResult",
            ]
            .iter()
            .any(|l| m.contains_label(l))
                || match m.kind.as_ref() {
                    ErrorKind::ServerSelection { .. }
                    | ErrorKind::Io(_)
                    | ErrorKind::ConnectionPoolCleared { .. }
                    | ErrorKind::DnsResolve { .. } => true,
                    ErrorKind::Command(c) => NOT_NOW.contains(&c.code),
                    _ => false,
                }
        })
}

/// MongoDB's WriteConflict: another transaction touched the same document first.
pub(super) const WRITE_CONFLICT: i32 = 112;
/// A transaction that keeps conflicting is tried again for this long (and at least
/// `CONFLICT_TRIES` times). Every conflict means another transaction committed, so this
/// is progress, not a livelock; and giving up is costly: an outcome commit that fails
/// leaves its delivery `sending` although the worker knows what the provider answered,
/// until the claim timeout turns it into `outcome_unknown` (the chaos suite's `overload`
/// saw 80 so, with 10 tries in ~1 s on documents every transaction increments). Kept
/// under the claim timeout the chaos bed uses (30 s; the default is 300 s).
pub(super) const CONFLICT_BUDGET: Duration = Duration::from_secs(20);
pub(super) const CONFLICT_TRIES: u32 = 10;

/// True when `e` is (or, in a bulk write, holds only) write conflicts. MongoDB reports one
/// inside a transaction as a `TransientTransactionError`, which the driver's `and_run`
/// retries; SecantusDB reports it as a per-operation error of the bulk write, which it
/// does not, so herald retries those itself.
pub fn is_write_conflict(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<mongodb::error::Error>())
        .any(conflicted)
}

/// True when the driver's error is (or, in a bulk write, holds only) write conflicts.
pub(super) fn conflicted(m: &mongodb::error::Error) -> bool {
    match m.kind.as_ref() {
        ErrorKind::Command(c) => c.code == WRITE_CONFLICT,
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == WRITE_CONFLICT,
        ErrorKind::BulkWrite(b) => {
            !b.write_errors.is_empty() && b.write_errors.values().all(|w| w.code == WRITE_CONFLICT)
        }
        ErrorKind::InsertMany(i) => i
            .write_errors
            .as_ref()
            .is_some_and(|errs| !errs.is_empty() && errs.iter().all(|w| w.code == WRITE_CONFLICT)),
        _ => false,
    }
}

/// Commits the session's transaction if `written` succeeded (committing again while the
/// commit's result is unknown: a commit is safe to repeat), and aborts it otherwise. One
/// attempt of the transaction: a write conflict is returned, not retried as the driver's
/// `and_run` does until the other transaction ends.
pub(super) async fn commit_or_abort(
    session: &mut mongodb::ClientSession,
    written: mongodb::error::Result<()>,
) -> mongodb::error::Result<()> {
    if let Err(e) = written {
        let _ = session.abort_transaction().await;
        return Err(e);
    }
    let mut tries = 0;
    loop {
        match session.commit_transaction().await {
            Err(e) if e.contains_label("UnknownTransactionCommitResult") && tries < 3 => tries += 1,
            result => return result,
        }
    }
}

/// A short pause, growing with `round` (to at most ~250 ms) and jittered, before trying a
/// conflicting write again.
pub(super) async fn conflict_pause(round: u32) {
    let ms = 2u64 << round.min(6);
    tokio::time::sleep(Duration::from_millis(ms + rand::random::<u64>() % ms)).await;
}

/// Runs a transaction again (after short pauses, for up to `CONFLICT_BUDGET`) while it
/// fails on a write conflict; any other outcome is returned as it is.
pub(super) async fn conflict_retried<T, F, Fut>(attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    conflict_retried_for(CONFLICT_TRIES, CONFLICT_BUDGET, attempt).await
}

/// Tries of an intake transaction whose event id another transaction holds: ~60 ms of
/// pauses in all, enough for a live transaction to end.
pub(super) const ACCEPT_CONFLICT_TRIES: u32 = 5;

/// Runs a transaction again while it fails on a write conflict, at least `tries` times
/// in all and for as long as `budget` lasts; any other outcome is returned as it is.
pub(super) async fn conflict_retried_for<T, F, Fut>(
    tries: u32,
    budget: Duration,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let started = std::time::Instant::now();
    let mut round = 0;
    loop {
        match attempt().await {
            Err(e)
                if is_write_conflict(&e) && (round + 1 < tries || started.elapsed() < budget) =>
            {
                tracing::debug!(
                    error = format!("{e:#}"),
                    round,
                    "transaction conflicted; again"
                );
                conflict_pause(round).await;
                round += 1;
            }
            result => return result,
        }
    }
}

/// True when a write failed on a unique index.
pub fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    const DUPLICATE_KEY: i32 = 11000;
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().any(|w| w.code == DUPLICATE_KEY)),
        // A rollup upsert racing another, inside a bulk write.
        ErrorKind::BulkWrite(b) => b.write_errors.values().any(|w| w.code == DUPLICATE_KEY),
        _ => false,
    }
}
