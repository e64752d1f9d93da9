//! One change stream per API process, fanned out to the sockets of the users it names: every process serves every user, whichever wrote the change.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::Metrics;
use crate::store::inbox::{InboxChange, InboxItemDoc};
use crate::store::Store;

/// What a user's sockets are told: the newest item this process has seen for them, and
/// counters that move on every change. A socket compares them with what it has sent,
/// so a signal that arrives while it is busy is never lost (watch keeps the latest).
#[derive(Debug, Clone, Default)]
pub struct Signal {
    pub latest: Option<Arc<InboxItemDoc>>,
    /// Moves on every change of the user's items.
    pub changes: u64,
    /// Moves when the change stream had to be opened again: changes may have been
    /// missed, so every socket reads what it has not sent.
    pub epoch: u64,
}

struct Inner {
    users: Mutex<HashMap<String, watch::Sender<Signal>>>,
    epoch: std::sync::atomic::AtomicU64,
    /// `herald_inbox_sockets`.
    sockets: Gauge,
    /// `herald_inbox_following`: 0 while the change stream is down.
    following: Gauge,
}

/// The process's registry of open sockets by user.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// A socket's subscription to its user's signals; leaving drops the user's entry when
/// no other socket of theirs is open here.
pub struct Subscription {
    hub: Hub,
    user_id: String,
    pub rx: watch::Receiver<Signal>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.inner.sockets.dec();
        let mut users = self
            .hub
            .inner
            .users
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // This subscription's receiver is still alive here: it is the last when it is
        // the only one.
        if users
            .get(&self.user_id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            users.remove(&self.user_id);
        }
    }
}

impl Hub {
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                users: Mutex::default(),
                epoch: Default::default(),
                sockets: metrics.inbox_sockets.clone(),
                following: metrics.inbox_following.clone(),
            }),
        }
    }

    pub fn subscribe(&self, user_id: &str) -> Subscription {
        let mut users = self.inner.users.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = self.inner.epoch.load(Ordering::Relaxed);
        let rx = users
            .entry(user_id.to_owned())
            .or_insert_with(|| {
                watch::channel(Signal {
                    epoch,
                    ..Signal::default()
                })
                .0
            })
            .subscribe();
        self.inner.sockets.inc();
        Subscription {
            hub: self.clone(),
            user_id: user_id.to_owned(),
            rx,
        }
    }

    fn publish(&self, change: InboxChange) {
        let users = self.inner.users.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = users.get(change.user_id()) else {
            return;
        };
        tx.send_modify(|s| {
            s.changes += 1;
            if let InboxChange::Received(item) = change {
                if s.latest.as_ref().is_none_or(|l| l.seq < item.seq) {
                    s.latest = Some(Arc::new(*item));
                }
            }
        });
    }

    /// Every socket reads what it has not sent (after the stream was reopened).
    fn resync(&self) {
        let epoch = self.inner.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let users = self.inner.users.lock().unwrap_or_else(|p| p.into_inner());
        for tx in users.values() {
            tx.send_modify(|s| s.epoch = epoch);
        }
    }

    /// Follows every inbox change until `cancel`. A stream that fails is opened again
    /// with backoff (logged with its cause); sockets then catch up from the database.
    pub async fn run(self, store: Store, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let opened = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                s = store.watch_inbox() => s,
            };
            match opened {
                Ok(stream) => {
                    self.inner.following.set(1);
                    // Whatever changed before the stream opened, sockets read.
                    self.resync();
                    backoff = Duration::from_millis(200);
                    let mut stream = std::pin::pin!(stream);
                    loop {
                        let next = tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            n = stream.next() => n,
                        };
                        match next {
                            Some(Ok(change)) => self.publish(change),
                            Some(Err(e)) => {
                                tracing::warn!(
                                    error = format!("{e:#}"),
                                    "the inbox change stream failed; opening it again"
                                );
                                break;
                            }
                            None => {
                                tracing::warn!("the inbox change stream ended; opening it again");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), wait = ?backoff, "cannot open the inbox change stream; trying again");
                }
            }
            self.inner.following.set(0);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
