//! A TCP proxy on loopback that can refuse new connections and cut the open ones.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards loopback connections to `target` while up; when down, refuses new
/// connections and cuts the open ones — a server as seen from a partitioned herald.
#[derive(Clone)]
pub struct TcpProxy {
    pub port: u16,
    up: Arc<Mutex<(bool, CancellationToken)>>,
}

impl TcpProxy {
    pub async fn start(target: String, up: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Self {
            port: listener.local_addr()?.port(),
            up: Arc::new(Mutex::new((up, CancellationToken::new()))),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (is_up, cut) = {
                    let g = p.lock();
                    (g.0, g.1.clone())
                };
                if !is_up {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
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
}
