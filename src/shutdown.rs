//! Turns SIGINT/SIGTERM into a cancellation every loop watches; roles drain with a deadline.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Cancels the returned token on Ctrl-C or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down: finishing in-flight work");
        t.cancel();
    });
    token
}

/// Awaits `work`; once `cancel` fires it gets `deadline` more to finish, then is abandoned
/// (its unacked messages return to RabbitMQ and are redelivered).
pub async fn drain<F>(work: F, cancel: CancellationToken, deadline: Duration) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return r,
        _ = cancel.cancelled() => {}
    }
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                ?deadline,
                "shutdown deadline passed; leaving the rest to redelivery"
            );
            Ok(())
        }
    }
}
