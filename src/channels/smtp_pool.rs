//! A pool of lettre SMTP connections on sockets with `TCP_NODELAY`, checked only after idling.
//!
//! lettre's own pool sends `NOOP` before every reuse and its sockets keep Nagle's
//! algorithm on; it writes a message body and the closing `.` in two writes, so every
//! message waited for the server's delayed ACK (~40 ms on Linux). Here the protocol is
//! still lettre's (`AsyncSmtpConnection`); only the socket and the pool are ours. Every
//! security mode goes through this one pool, so a send is classified one way: a
//! connection lost after the content went out is an unknown outcome, never a retry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, MailBodyParameter, MailParameter};
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
    /// The connection broke (or the deadline passed) after the message content was
    /// written: the server may have queued it.
    #[error("{0}")]
    Unknown(String),
}

impl PoolError {
    /// A 5xx reply: sending again will fail again.
    pub fn is_permanent(&self) -> bool {
        matches!(self, PoolError::Smtp(e) if e.is_permanent())
    }
}

/// How a connection is secured, with how the server's certificate is checked.
pub enum Security {
    Plain,
    StartTls(TlsParameters),
    /// Implicit TLS (SMTPS, port 465).
    Implicit(TlsParameters),
}

pub struct SmtpPool {
    host: String,
    port: u16,
    security: Security,
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
        security: Security,
        credentials: Option<Credentials>,
        timeout: Duration,
        max_size: usize,
    ) -> Self {
        Self {
            host: host.to_owned(),
            port,
            security,
            credentials,
            timeout,
            hello: ClientId::default(),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(max_size.max(1)),
        }
    }

    /// Sends one message on a pooled connection (at most `max_size` at once); the whole
    /// exchange is bounded by the timeout, and a connection that failed is not reused. A
    /// pooled connection that turns out dead before the message content went out (the
    /// server closed it while idle) is replaced once, at once.
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<Response, PoolError> {
        let _slot = self.slots.acquire().await.expect("the pool never closes");
        let content_sent = AtomicBool::new(false);
        let work = async {
            let (mut conn, reused) = self.connection().await?;
            let mut result = exchange(&mut conn, envelope, message, &content_sent).await;
            if let Err(e) = &result {
                let nothing_sent = !content_sent.load(Ordering::SeqCst);
                if reused && nothing_sent && !is_reply(e) {
                    conn.abort().await;
                    conn = self.connect().await?;
                    result = exchange(&mut conn, envelope, message, &content_sent).await;
                }
            }
            match result {
                Ok(response) => {
                    if !conn.has_broken() {
                        self.lock().push((conn, Instant::now()));
                    }
                    Ok(response)
                }
                Err(e) => {
                    conn.abort().await;
                    if content_sent.load(Ordering::SeqCst) && !is_reply(&e) {
                        Err(PoolError::Unknown(format!(
                            "the connection failed after the message was sent: {e}"
                        )))
                    } else {
                        Err(PoolError::Smtp(e))
                    }
                }
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) if content_sent.load(Ordering::SeqCst) => Err(PoolError::Unknown(format!(
                "no answer within {:?} after the message was sent",
                self.timeout
            ))),
            Err(_) => Err(PoolError::Timeout(self.timeout)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(AsyncSmtpConnection, Instant)>> {
        // A poisoned pool only loses idle connections.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle pooled connection (`true`), or a new one.
    async fn connection(&self) -> Result<(AsyncSmtpConnection, bool), PoolError> {
        loop {
            let Some((mut conn, since)) = self.lock().pop() else {
                return Ok((self.connect().await?, false));
            };
            if since.elapsed() < CHECK_AFTER_IDLE || conn.test_connected().await {
                return Ok((conn, true));
            }
            conn.abort().await;
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, PoolError> {
        let mut conn = if let Security::Implicit(tls) = &self.security {
            // Implicit TLS (port 465): lettre sets up the TLS stream itself, where
            // `TCP_NODELAY` cannot be set; the classification of failures is the same.
            AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.timeout),
                &self.hello,
                Some(tls.clone()),
                None,
            )
            .await?
        } else {
            let addr = format!("{}:{}", self.host, self.port);
            let stream = TcpStream::connect(&addr)
                .await
                .map_err(|e| PoolError::Connect(addr.clone(), e))?;
            stream
                .set_nodelay(true)
                .map_err(|e| PoolError::Connect(addr.clone(), e))?;
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello).await?
        };
        if let Security::StartTls(tls) = &self.security {
            conn.starttls(tls.clone(), &self.hello).await?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(conn)
    }
}

/// An SMTP reply (4xx or 5xx), as opposed to a broken connection.
fn is_reply(e: &lettre::transport::smtp::Error) -> bool {
    e.is_transient() || e.is_permanent()
}

/// One mail transaction, step by step, so the caller knows whether the content went out
/// (`content_sent`): before it, a failure delivered nothing.
async fn exchange(
    conn: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    message: &[u8],
    content_sent: &AtomicBool,
) -> Result<Response, lettre::transport::smtp::Error> {
    let mut params = Vec::new();
    let non_ascii = |a: &lettre::Address| !AsRef::<str>::as_ref(a).is_ascii();
    if envelope.from().is_some_and(non_ascii) || envelope.to().iter().any(non_ascii) {
        params.push(MailParameter::SmtpUtfEight);
    }
    if !message.is_ascii() {
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), params))
        .await?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new())).await?;
    }
    conn.command(Data).await?;
    content_sent.store(true, Ordering::SeqCst);
    conn.message(message).await
}
