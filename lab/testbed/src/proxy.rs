//! A TCP proxy on loopback that can refuse new connections, cut the open ones, stall them,
//! or cut one right after a chosen request, losing its answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Forwards loopback connections to `target` while up; when down, refuses new
/// connections and cuts the open ones — a server as seen from a partitioned herald. While
/// stalled, connections stay open but no byte moves either way (a silent network).
#[derive(Clone)]
pub struct TcpProxy {
    pub port: u16,
    up: Arc<Mutex<(bool, CancellationToken)>>,
    stalled: Arc<watch::Sender<bool>>,
    trap: Trap,
}

/// The bytes whose next request loses its answer (one shot).
type Trap = Arc<Mutex<Option<Vec<u8>>>>;

impl TcpProxy {
    pub async fn start(target: String, up: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Self {
            port: listener.local_addr()?.port(),
            up: Arc::new(Mutex::new((up, CancellationToken::new()))),
            stalled: Arc::new(watch::channel(false).0),
            trap: Trap::default(),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (is_up, cut) = {
                    let g = p.lock();
                    (g.0, g.1.clone())
                };
                if !is_up {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let stalled = p.stalled.subscribe();
                let trap = Arc::clone(&p.trap);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    let deaf = Arc::new(AtomicBool::new(false));
                    tokio::select! {
                        _ = pump(ir, ow, stalled.clone(), Some(trap), Arc::clone(&deaf)) => {}
                        _ = pump(or, iw, stalled, None, deaf) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Ok(proxy)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, CancellationToken)> {
        self.up.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Down: cuts every open connection and refuses new ones; up: forwards again.
    pub fn set_up(&self, up: bool) {
        let mut g = self.lock();
        if !up {
            g.1.cancel();
            g.1 = CancellationToken::new();
        }
        g.0 = up;
    }

    /// Cuts every open connection; new ones are forwarded as before.
    pub fn cut(&self) {
        let mut g = self.lock();
        g.1.cancel();
        g.1 = CancellationToken::new();
    }

    /// While true, bytes are held instead of forwarded (connections stay open).
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// The next request that contains `bytes` reaches the server, but its answer never
    /// comes back: the connection is cut once the server has had time to act on it.
    pub fn lose_the_answer_to(&self, bytes: &[u8]) {
        *self.trap.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes.to_vec());
    }

    /// Whether [`TcpProxy::lose_the_answer_to`]'s request is still to come.
    pub fn trap_set(&self) -> bool {
        self.trap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// Whether this chunk springs the trap (which then is gone).
fn springs(trap: &Trap, chunk: &[u8]) -> bool {
    let mut t = trap.lock().unwrap_or_else(|p| p.into_inner());
    let hit = t
        .as_deref()
        .is_some_and(|b| !b.is_empty() && chunk.windows(b.len()).any(|w| w == b));
    if hit {
        *t = None;
    }
    hit
}

/// Copies one direction, holding bytes while stalled; ends when either side closes.
/// Nothing more is forwarded once `deaf` is set: by a request (client to server, where
/// `trap` is given) that springs the trap, which is forwarded and then, after the server
/// has had time to act on it, its connection cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
    trap: Option<Trap>,
    deaf: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            break;
        }
        let sprung = trap.as_ref().is_some_and(|t| springs(t, &buf[..n]));
        if sprung {
            deaf.store(true, Ordering::SeqCst);
        } else if deaf.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if sprung {
            tokio::time::sleep(Duration::from_millis(300)).await;
            break;
        }
    }
    let _ = to.shutdown().await;
}
