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
    /// Always `Some` until dropped (taken under the registry's lock, see `Drop`).
    rx: Option<watch::Receiver<Signal>>,
}

impl Subscription {
    pub fn rx(&mut self) -> &mut watch::Receiver<Signal> {
        self.rx
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only when dropped"))
    }
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
        // The receiver goes under the lock, so of two sockets of one user closing at
        // once the second sees the first gone, and the entry is removed exactly when
        // none is left.
        drop(self.rx.take());
        if users
            .get(&self.user_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
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
            rx: Some(rx),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn users(hub: &Hub) -> usize {
        hub.inner.users.lock().map(|u| u.len()).unwrap_or(0)
    }

    #[test]
    fn a_users_entry_lives_exactly_as_long_as_one_of_their_sockets() {
        let hub = Hub::new(&Metrics::default());
        let a = hub.subscribe("ana");
        let b = hub.subscribe("ana");
        let c = hub.subscribe("bob");
        assert_eq!(users(&hub), 2);
        drop(a);
        assert_eq!(users(&hub), 2, "ana has a socket left");
        // Both of a user's last sockets closing at once, on two threads.
        let d = hub.subscribe("bob");
        let closing = [
            std::thread::spawn(move || drop(c)),
            std::thread::spawn(move || drop(d)),
        ];
        for t in closing {
            t.join().expect("dropped");
        }
        drop(b);
        assert_eq!(users(&hub), 0, "no entry outlives its sockets");
    }

    #[test]
    fn a_change_reaches_only_its_users_sockets_and_a_newer_item_wins() {
        let hub = Hub::new(&Metrics::default());
        let mut ana = hub.subscribe("ana");
        let mut bob = hub.subscribe("bob");
        let item = |seq| InboxItemDoc {
            id: format!("i{seq}"),
            user_id: "ana".into(),
            seq,
            delivery_id: format!("d{seq}"),
            notification_id: "n".into(),
            event_type: "note".into(),
            title: "t".into(),
            body: "b".into(),
            url: None,
            data: None,
            created_at: mongodb::bson::DateTime::now(),
            seen_at: None,
            read_at: None,
            archived_at: None,
            expire_at: None,
        };
        hub.publish(InboxChange::Received(Box::new(item(2))));
        hub.publish(InboxChange::Received(Box::new(item(1))));
        assert!(ana.rx().has_changed().unwrap_or(false));
        assert!(!bob.rx().has_changed().unwrap_or(true));
        let signal = ana.rx().borrow_and_update().clone();
        assert_eq!(signal.changes, 2);
        assert_eq!(
            signal.latest.map(|l| l.seq),
            Some(2),
            "an older item never replaces a newer"
        );
        hub.resync();
        assert!(
            bob.rx().has_changed().unwrap_or(false),
            "a resync reaches every socket"
        );
    }
}
