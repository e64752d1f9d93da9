//! Spawned work that cannot die unnoticed: a caught panic says what it was, and a task
//! that ends before the process is told to stop is an error that stops the role.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What a caught panic said.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message")
}

/// Tasks that must run until `cancel`: the first one to end before it (returning or
/// panicking) cancels the others' token and is returned as the error; after `cancel`,
/// every task is awaited.
pub struct Supervised {
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    cancel: CancellationToken,
}

impl Supervised {
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            tasks: JoinSet::new(),
            cancel,
        }
    }

    pub fn spawn<F>(&mut self, name: &'static str, work: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(async move {
            let ended = match AssertUnwindSafe(work).catch_unwind().await {
                Ok(ended) => ended,
                Err(panic) => Err(anyhow::anyhow!("panicked: {}", panic_message(&*panic))),
            };
            (name, ended)
        });
    }

    /// Waits for every task; an early end of any is the error returned.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut failure = None;
        while let Some(joined) = self.tasks.join_next().await {
            let early = !self.cancel.is_cancelled();
            let problem = match joined {
                Ok((_, Ok(()))) if !early => None,
                Ok((name, Ok(()))) => Some(anyhow::anyhow!("{name} stopped on its own")),
                Ok((name, Err(e))) => Some(e.context(format!("{name} failed"))),
                Err(e) => Some(anyhow::anyhow!("a task was cancelled: {e}")),
            };
            if let Some(problem) = problem {
                tracing::error!(
                    error = format!("{problem:#}"),
                    "a background task died; stopping"
                );
                self.cancel.cancel();
                failure.get_or_insert(problem);
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_before_cancel_stops_the_others_and_is_the_error() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervised::new(cancel.clone());
        let c = cancel.clone();
        tasks.spawn("the long one", async move {
            c.cancelled().await;
            Ok(())
        });
        tasks.spawn("the short one", async { Ok(()) });
        let e = tasks.wait().await.expect_err("an early end");
        assert!(format!("{e:#}").contains("the short one"), "{e:#}");
        assert!(cancel.is_cancelled(), "the others were told to stop");
    }

    #[tokio::test]
    async fn a_panicking_task_is_the_error() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervised::new(cancel.clone());
        tasks.spawn("a lane", async { panic!("lost it") });
        let e = tasks.wait().await.expect_err("a panic");
        assert!(format!("{e:#}").contains("lost it"), "{e:#}");
        assert!(format!("{e:#}").contains("a lane"), "named: {e:#}");
        assert!(cancel.is_cancelled());
    }

    #[tokio::test]
    async fn tasks_that_end_after_cancel_are_a_clean_stop() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervised::new(cancel.clone());
        let c = cancel.clone();
        tasks.spawn("a lane", async move {
            c.cancelled().await;
            Ok(())
        });
        cancel.cancel();
        tasks.wait().await.expect("a clean stop");
    }
}
