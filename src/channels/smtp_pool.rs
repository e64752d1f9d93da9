//! A pool of lettre SMTP connections on sockets with `TCP_NODELAY`, checked only after idling.
//!
//! lettre's own pool sends `NOOP` before every reuse and its sockets keep Nagle's
//! algorithm on; it writes a message body and the closing `.` in two writes, so every
//! message waited for the server's delayed ACK (~40 ms on Linux). Here the protocol is
//! still lettre's (`AsyncSmtpConnection`); only the socket and the pool are ours.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// A connection idle for longer than this is asked `NOOP` before it is reused.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(2);

/// Why a pooled send failed: lettre's own error, or our deadline.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl PoolError {
    /// A 5xx reply: sending again will fail again.
    pub fn is_permanent(&self) -> bool {
        matches!(self, PoolError::Smtp(e) if e.is_permanent())
    }
}

pub struct SmtpPool {
    host: String,
    port: u16,
    starttls: bool,
    credentials: Option<Credentials>,
    timeout: Duration,
    hello: ClientId,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    slots: Semaphore,
}

impl SmtpPool {
    pub fn new(
        host: &str,
        port: u16,
        starttls: bool,
        credentials: Option<Credentials>,
        timeout: Duration,
        max_size: usize,
    ) -> Self {
        Self {
            host: host.to_owned(),
            port,
            starttls,
            credentials,
            timeout,
            hello: ClientId::default(),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(max_size.max(1)),
        }
    }

    /// Sends one message on a pooled connection (at most `max_size` at once); the whole
    /// exchange is bounded by the timeout, and a connection that failed is not reused.
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<Response, PoolError> {
        let _slot = self.slots.acquire().await.expect("the pool never closes");
        let work = async {
            let mut conn = self.connection().await?;
            match conn.send(envelope, message).await {
                Ok(response) => {
                    if !conn.has_broken() {
                        self.lock().push((conn, Instant::now()));
                    }
                    Ok(response)
                }
                Err(e) => {
                    conn.abort().await;
                    Err(PoolError::Smtp(e))
                }
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(PoolError::Timeout(self.timeout)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(AsyncSmtpConnection, Instant)>> {
        // A poisoned pool only loses idle connections.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connection(&self) -> Result<AsyncSmtpConnection, PoolError> {
        loop {
            let Some((mut conn, since)) = self.lock().pop() else {
                return self.connect().await;
            };
            if since.elapsed() < CHECK_AFTER_IDLE || conn.test_connected().await {
                return Ok(conn);
            }
            conn.abort().await;
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, PoolError> {
        let addr = format!("{}:{}", self.host, self.port);
        let stream = TcpStream::connect(&addr)
            .await
            .map_err(|e| PoolError::Connect(addr.clone(), e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| PoolError::Connect(addr.clone(), e))?;
        let mut conn =
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello).await?;
        if self.starttls {
            conn.starttls(TlsParameters::new(self.host.clone())?, &self.hello)
                .await?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(conn)
    }
}
