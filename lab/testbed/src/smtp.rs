//! An SMTP server on loopback (the RFC 5321 subset lettre uses) that records every message and can misbehave on purpose.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

/// A message as the server received it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

impl Mail {
    /// The raw value of a header (first occurrence, unfolded only by trimming).
    pub fn raw_header(&self, name: &str) -> Option<&str> {
        self.data
            .split("\r\n")
            .take_while(|l| !l.is_empty())
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim())
            })
    }

    /// herald's `X-Herald-Delivery-Id`: which delivery this message is.
    pub fn delivery_id(&self) -> Option<&str> {
        self.raw_header("X-Herald-Delivery-Id")
    }
}

#[derive(Default)]
struct State {
    mails: Vec<Mail>,
    /// The next N messages are refused with this reply.
    refusals: (usize, String),
    offered: usize,
    /// While set, `MAIL FROM` gets this reply (a `421` also closes the connection).
    storm: Option<String>,
    /// Connections idle for longer than this are closed by the server.
    idle_close: Option<Duration>,
    /// While set, a message is recorded and then the connection is closed with no reply:
    /// the client cannot know whether it was taken.
    cut_after_data: bool,
    /// When each of `mails` arrived.
    arrivals: Vec<Instant>,
}

/// A real SMTP server on loopback that records what it receives.
#[derive(Clone)]
pub struct SmtpServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    /// While true, new connections get no greeting and open ones no answer to `MAIL
    /// FROM` (a hanging provider, pooled connections included).
    hang: Arc<watch::Sender<bool>>,
}

impl SmtpServer {
    pub async fn start() -> std::io::Result<Self> {
        Self::serve(None).await
    }

    /// The same server speaking implicit TLS (SMTPS, as on port 465) for `127.0.0.1` and
    /// `localhost`, with a certificate from a certificate authority made for it; returns
    /// the authority's certificate (PEM) for the client to trust.
    pub async fn start_tls() -> std::io::Result<(Self, String)> {
        let (config, ca_pem) = tls_config().map_err(std::io::Error::other)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Ok((Self::serve(Some(acceptor)).await?, ca_pem))
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let server = Self {
            port: listener.local_addr()?.port(),
            state: Arc::default(),
            arrived: Arc::default(),
            hang: Arc::new(watch::channel(false).0),
        };
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (s, tls) = (s.clone(), tls.clone());
                tokio::spawn(async move {
                    let _ = match tls {
                        Some(acceptor) => match acceptor.accept(sock).await {
                            Ok(stream) => s.session(stream).await,
                            Err(e) => Err(e),
                        },
                        None => s.session(sock).await,
                    };
                });
            }
        });
        Ok(server)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn session<S>(&self, sock: S) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut hang = self.hang.subscribe();
        // Held without a greeting until the hang ends (or the client gives up).
        if hang.wait_for(|h| !*h).await.is_err() {
            return Ok(());
        }
        let (r, mut w) = tokio::io::split(sock);
        let mut lines = BufReader::new(r);
        w.write_all(b"220 herald-test ESMTP\r\n").await?;
        let (mut from, mut to) = (String::new(), Vec::new());
        let mut line = String::new();
        loop {
            line.clear();
            let idle_close = self.lock().idle_close;
            let read = lines.read_line(&mut line);
            let n = match idle_close {
                Some(idle) => match tokio::time::timeout(idle, read).await {
                    Ok(n) => n?,
                    Err(_) => return Ok(()),
                },
                None => read.await?,
            };
            if n == 0 {
                return Ok(());
            }
            let cmd = line.trim_end().to_owned();
            let upper = cmd.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") {
                b"250-herald-test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
            } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
                b"250 OK\r\n"
            } else if upper.starts_with("MAIL FROM:") {
                if hang.wait_for(|h| !*h).await.is_err() {
                    return Ok(());
                }
                let storm = self.lock().storm.clone();
                if let Some(storm) = storm {
                    w.write_all(format!("{storm}\r\n").as_bytes()).await?;
                    if storm.starts_with("421") {
                        return Ok(());
                    }
                    continue;
                }
                from = cmd[10..].trim().trim_matches(['<', '>']).to_owned();
                to.clear();
                b"250 OK\r\n"
            } else if upper.starts_with("RCPT TO:") {
                to.push(cmd[8..].trim().trim_matches(['<', '>']).to_owned());
                b"250 OK\r\n"
            } else if upper == "DATA" {
                w.write_all(b"354 end with .\r\n").await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if lines.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" || line == ".\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                let refusal = {
                    let mut s = self.lock();
                    s.offered += 1;
                    let r = &mut s.refusals;
                    (r.0 > 0).then(|| {
                        r.0 -= 1;
                        format!("{}\r\n", r.1)
                    })
                };
                if let Some(reply) = refusal {
                    to.clear();
                    w.write_all(reply.as_bytes()).await?;
                    continue;
                }
                {
                    let mut s = self.lock();
                    s.mails.push(Mail {
                        from: from.clone(),
                        to: std::mem::take(&mut to),
                        data,
                    });
                    s.arrivals.push(Instant::now());
                }
                self.arrived.notify_waiters();
                if self.lock().cut_after_data {
                    return Ok(());
                }
                b"250 OK queued\r\n"
            } else if upper == "RSET" {
                to.clear();
                b"250 OK\r\n"
            } else if upper == "QUIT" {
                w.write_all(b"221 bye\r\n").await?;
                return Ok(());
            } else {
                b"502 command not implemented\r\n"
            };
            w.write_all(reply).await?;
        }
    }

    /// Refuses the next `n` messages with `reply` (`451 ...` is transient, `550 ...` permanent).
    pub fn refuse_next(&self, n: usize, reply: &str) {
        self.lock().refusals = (n, reply.to_owned());
    }

    /// While `Some`, every `MAIL FROM` gets this reply (`421 ...` also closes the connection).
    pub fn set_storm(&self, reply: Option<&str>) {
        self.lock().storm = reply.map(str::to_owned);
    }

    /// Closes connections that stay idle longer than this (`None`: never).
    pub fn set_idle_close(&self, idle: Option<Duration>) {
        self.lock().idle_close = idle;
    }

    /// While true, new connections wait without a greeting.
    /// While set, each message is recorded, then its connection closed without a reply.
    pub fn set_cut_after_data(&self, cut: bool) {
        self.lock().cut_after_data = cut;
    }

    pub fn set_hang(&self, hang: bool) {
        self.hang.send_replace(hang);
    }

    /// Messages offered so far, refused ones included.
    pub fn offered(&self) -> usize {
        self.lock().offered
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.lock().mails.clone()
    }

    /// Messages accepted so far.
    pub fn count(&self) -> usize {
        self.lock().mails.len()
    }

    /// When the last message was accepted.
    pub fn last_arrival(&self) -> Option<Instant> {
        self.lock().arrivals.last().copied()
    }

    /// When the first message of any of these deliveries arrived.
    pub fn first_arrival_of(&self, delivery_ids: &HashSet<&str>) -> Option<Instant> {
        let s = self.lock();
        s.mails
            .iter()
            .zip(&s.arrivals)
            .filter(|(m, _)| m.delivery_id().is_some_and(|id| delivery_ids.contains(id)))
            .map(|(_, t)| *t)
            .min()
    }

    /// How many times each delivery id arrived (messages without one under "").
    pub fn delivery_ids(&self) -> HashMap<String, u32> {
        let mut ids = HashMap::new();
        for m in &self.lock().mails {
            *ids.entry(m.delivery_id().unwrap_or_default().to_owned())
                .or_insert(0) += 1;
        }
        ids
    }

    /// Waits until at least `n` messages arrived; `Err` with what did arrive after `wait`.
    pub async fn wait_for(&self, n: usize, wait: Duration) -> Result<Vec<Mail>, Vec<Mail>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.arrived.notified();
            let mails = self.mails();
            if mails.len() >= n {
                return Ok(mails);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.mails());
            }
        }
    }
}

/// A server configuration for `127.0.0.1` and `localhost`, signed by a certificate
/// authority made on the spot, and that authority's certificate (PEM).
fn tls_config() -> Result<(rustls::ServerConfig, String), Box<dyn std::error::Error + Send + Sync>>
{
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "herald test authority");
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
        .signed_by(&key, &ca_cert, &ca_key)?;
    let der_key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], der_key)?;
    Ok((config, ca_cert.pem()))
}
