//! Email through lettre: a pooled SMTP transport, or one `.eml` file per message.

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::TlsParameters;
use lettre::{AsyncFileTransport, AsyncTransport, Message, Tokio1Executor};
use mongodb::bson::doc;

use super::smtp_pool::{PoolError, Security, SmtpPool};
use super::{DeliveryError, Destination, OutboundMessage, Provider, Receipt};
use crate::config::{EmailSettings, EmailTransportKind, SmtpSecurity};
use crate::templates::Rendered;

pub fn build(settings: &EmailSettings) -> anyhow::Result<Box<dyn Provider>> {
    let from: Mailbox = settings.from.parse().context("email.from")?;
    Ok(match settings.transport {
        EmailTransportKind::File => {
            std::fs::create_dir_all(&settings.file_dir).with_context(|| {
                format!("creating email.file_dir {}", settings.file_dir.display())
            })?;
            Box::new(FileEmail {
                from,
                dir: settings.file_dir.display().to_string(),
                transport: AsyncFileTransport::new(&settings.file_dir),
            })
        }
        EmailTransportKind::Smtp => {
            let s = &settings.smtp;
            let credentials = (!s.username.is_empty())
                .then(|| Credentials::new(s.username.clone(), s.password.expose().to_owned()));
            let timeout = Duration::from_secs(s.timeout_secs);
            let security = match s.security {
                SmtpSecurity::None => Security::Plain,
                SmtpSecurity::Starttls => Security::StartTls(tls_parameters(s)?),
                SmtpSecurity::Tls => Security::Implicit(tls_parameters(s)?),
            };
            let pool = SmtpPool::new(
                &s.host,
                s.port,
                security,
                credentials,
                timeout,
                s.pool_max_size as usize,
            );
            Box::new(SmtpEmail { from, pool })
        }
    })
}

/// How the server's certificate is checked: the system's authorities, plus
/// `email.smtp.ca_file` when set.
fn tls_parameters(s: &crate::config::SmtpSettings) -> anyhow::Result<TlsParameters> {
    let mut builder = TlsParameters::builder(s.host.clone());
    if let Some(path) = &s.ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading email.smtp.ca_file {}", path.display()))?;
        let ca = lettre::transport::smtp::client::Certificate::from_pem(&pem)
            .context("email.smtp.ca_file: not a PEM certificate")?;
        builder = builder.add_root_certificate(ca);
    }
    builder.build().context("email.smtp: TLS setup")
}

/// `X-Herald-Delivery-Id`: which delivery a message is, so a recipient's mail server
/// (or an audit of a sink) can tell a duplicate from a second notification.
#[derive(Clone)]
struct DeliveryId(String);

impl Header for DeliveryId {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Herald-Delivery-Id")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self(s.to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// Builds the MIME message: multipart/alternative when there are both text and HTML.
fn compose(
    from: &Mailbox,
    message: &OutboundMessage,
    provider: &str,
) -> Result<Message, DeliveryError> {
    let permanent = |m: String| DeliveryError::permanent(provider, m);
    let Destination::Email { address, name } = &message.destination else {
        return Err(permanent(
            "email provider given a non-email destination".into(),
        ));
    };
    let Rendered::Email {
        subject,
        html,
        text,
    } = &message.content
    else {
        return Err(permanent("email provider given a non-email message".into()));
    };
    let to = Mailbox::new(
        name.clone(),
        address
            .parse()
            .map_err(|e| permanent(format!("invalid recipient address: {e}")))?,
    );
    let builder = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(subject.as_str())
        .header(DeliveryId(message.delivery_id.clone()));
    let built = match (text, html) {
        (Some(t), Some(h)) => {
            builder.multipart(MultiPart::alternative_plain_html(t.clone(), h.clone()))
        }
        (Some(t), None) => builder.singlepart(SinglePart::plain(t.clone())),
        (None, Some(h)) => builder.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_HTML)
                .body(h.clone()),
        ),
        (None, None) => return Err(permanent("email without a body".into())),
    };
    built.map_err(|e| permanent(format!("building the message: {e}")))
}

/// Pooled SMTP.
pub struct SmtpEmail {
    from: Mailbox,
    pool: SmtpPool,
}

#[async_trait]
impl Provider for SmtpEmail {
    fn name(&self) -> &str {
        "smtp"
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        let email = compose(&self.from, message, self.name())?;
        // 5xx replies will fail again; a connection lost after the content went out may
        // have delivered it; everything else (4xx, timeouts before, I/O) may work later.
        let name = self.name();
        let response = self
            .pool
            .send(email.envelope(), &email.formatted())
            .await
            .map_err(|e| match e {
                PoolError::Unknown(message) => DeliveryError::Unknown {
                    provider: name.to_owned(),
                    message,
                },
                e if e.is_permanent() => DeliveryError::permanent(name, e.to_string()),
                e => DeliveryError::transient(name, e.to_string()),
            })?;
        Ok(Receipt {
            provider: name.to_owned(),
            invalid_tokens: Vec::new(),
            response: doc! {
                "smtp_code": response.code().to_string(),
                "smtp_message": response.message().collect::<Vec<_>>().join(" "),
            },
        })
    }
}

/// One `.eml` file per message (the embedded default: look in `var/outbox/email`).
pub struct FileEmail {
    from: Mailbox,
    dir: String,
    transport: AsyncFileTransport<Tokio1Executor>,
}

#[async_trait]
impl Provider for FileEmail {
    fn name(&self) -> &str {
        "file"
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        let email = compose(&self.from, message, self.name())?;
        let id = self
            .transport
            .send(email)
            .await
            .map_err(|e| DeliveryError::transient(self.name(), e.to_string()))?;
        Ok(Receipt {
            provider: self.name().to_owned(),
            invalid_tokens: Vec::new(),
            response: doc! {"file": format!("{}/{id}.eml", self.dir)},
        })
    }
}
