//! A TCP proxy on loopback that can refuse new connections, cut the open ones, or stall them.

use std::sync::{Arc, Mutex};

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
}

impl TcpProxy {
    pub async fn start(target: String, up: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Self {
            port: listener.local_addr()?.port(),
            up: Arc::new(Mutex::new((up, CancellationToken::new()))),
            stalled: Arc::new(watch::channel(false).0),
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
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::select! {
                        _ = pump(ir, ow, stalled.clone()) => {}
                        _ = pump(or, iw, stalled) => {}
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
}

/// Copies one direction, holding bytes while stalled; ends when either side closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
