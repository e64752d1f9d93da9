//! Micro-batching: requests that arrive while a round trip runs share the next one.
//!
//! A lone request goes out at once (no waiting to fill a batch); under load, concurrent
//! deliveries' reads, claims and commits each become one MongoDB round trip per batch.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A failed batch's message, and whether it was a failure of the moment.
type Failure = (Arc<str>, bool);
type Reply<O> = oneshot::Sender<Result<O, Failure>>;

/// A round trip failed for a reason of the moment (MongoDB or RabbitMQ unreachable, the
/// documents held by another transaction); kept as a type so every request a failed batch
/// answers can still tell.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Temporary(pub String);

/// True when `e` is a failure of the moment — a server down or switching over, documents
/// held by another transaction — that will pass without anything changing in the request.
pub fn is_temporary(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Temporary>())
        || crate::store::is_temporary(e)
        || crate::queue::is_unreachable(e)
}

/// A handle for submitting requests; the batching task ends when every handle is dropped.
pub struct Batcher<I, O> {
    tx: mpsc::Sender<(I, Reply<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// `run` gets up to `max` requests and answers each, in order; an error answers
    /// them all.
    pub fn start<F, Fut>(name: &'static str, max: usize, run: F) -> (Self, JoinHandle<()>)
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<Vec<O>>> + Send,
    {
        let max = max.max(1);
        let (tx, mut rx) = mpsc::channel::<(I, Reply<O>)>(max * 4);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while rx.recv_many(&mut batch, max).await > 0 {
                let (inputs, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
                let count = inputs.len();
                // A panicking round trip answers its batch with an error; the batcher
                // lives on for the next one.
                let result = match AssertUnwindSafe(run(inputs)).catch_unwind().await {
                    Ok(result) => result,
                    Err(panic) => Err(anyhow::anyhow!(
                        "{name}: the round trip panicked: {}",
                        crate::supervise::panic_message(&*panic)
                    )),
                };
                match result {
                    Ok(outputs) if outputs.len() == count => {
                        for (reply, out) in replies.into_iter().zip(outputs) {
                            let _ = reply.send(Ok(out));
                        }
                    }
                    result => {
                        let (why, down): Failure = match result {
                            Err(e) => (format!("{e:#}").into(), is_temporary(&e)),
                            Ok(o) => (
                                format!("{name}: {} answers to {count} requests", o.len()).into(),
                                false,
                            ),
                        };
                        tracing::error!(error = %why, count, batch = name, "batch failed");
                        for reply in replies {
                            let _ = reply.send(Err((Arc::clone(&why), down)));
                        }
                    }
                }
            }
        });
        (Self { tx }, task)
    }

    /// Returns this request's answer once its batch has run.
    pub async fn call(&self, input: I) -> anyhow::Result<O> {
        let (reply, answer) = oneshot::channel();
        let stopped = || anyhow::anyhow!("the batching task has stopped");
        self.tx.send((input, reply)).await.map_err(|_| stopped())?;
        answer
            .await
            .map_err(|_| stopped())?
            .map_err(|(why, down)| match down {
                true => anyhow::Error::new(Temporary(why.to_string())),
                false => anyhow::anyhow!("{why}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::Batcher;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_requests_share_round_trips_and_get_their_own_answers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let (b, _task) = Batcher::start("double", 64, move |xs: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(xs.into_iter().map(|x| x * 2).collect())
            }
        });
        let answers = futures::future::join_all((0..200u32).map(|i| {
            let b = b.clone();
            async move { b.call(i).await.expect("answered") }
        }))
        .await;
        assert_eq!(answers, (0..200u32).map(|i| i * 2).collect::<Vec<_>>());
        let rounds = calls.load(Ordering::SeqCst);
        assert!((4..200).contains(&rounds), "{rounds} round trips for 200");
    }

    #[tokio::test]
    async fn a_panicking_round_trip_fails_its_batch_and_the_batcher_lives_on() {
        let (b, task) = Batcher::start("panics", 8, |xs: Vec<u32>| async move {
            assert!(!xs.contains(&0), "zero is poison");
            Ok(xs)
        });
        let e = b.call(0).await.expect_err("its batch panicked");
        assert!(e.to_string().contains("panicked"), "{e}");
        assert_eq!(b.call(7).await.expect("the next batch runs"), 7);
        assert!(!task.is_finished());
    }

    #[tokio::test]
    async fn a_failed_round_trip_answers_every_request_with_its_error() {
        let (b, _task) = Batcher::start("fail", 8, |_: Vec<u32>| async {
            Err::<Vec<u32>, _>(anyhow::anyhow!("server gone"))
        });
        let e = b.call(1).await.expect_err("failed");
        assert!(e.to_string().contains("server gone"));
    }
}
