//! Email through lettre: a pooled SMTP transport, or one `.eml` file per message.

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::{
    ContentTransferEncoding, ContentType, Header, HeaderName, HeaderValue, MIME_VERSION_1_0,
};
use lettre::message::{Body, Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::TlsParameters;
use lettre::{AsyncFileTransport, AsyncTransport, Message, Tokio1Executor};
use mongodb::bson::doc;

use super::smtp_pool::{PoolError, Security, SmtpPool};
use super::{DeliveryError, Destination, OutboundMessage, Provider, Receipt};
use crate::config::{DkimAlgorithm, EmailSettings, EmailTransportKind, SmtpSecurity};
use crate::templates::Rendered;

pub fn build(settings: &EmailSettings) -> anyhow::Result<Box<dyn Provider>> {
    let from = Composer::new(settings)?;
    Ok(match settings.transport {
        EmailTransportKind::File => {
            std::fs::create_dir_all(&settings.file_dir).with_context(|| {
                format!("creating email.file_dir {}", settings.file_dir.display())
            })?;
            Box::new(FileEmail {
                composer: from,
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
            Box::new(SmtpEmail {
                composer: from,
                pool,
            })
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

/// What every message of this process shares: the sender, the DKIM key, the mailbox
/// offered for unsubscribing by mail.
pub struct Composer {
    from: Mailbox,
    dkim: Option<DkimConfig>,
    unsubscribe_mailbox: Option<String>,
    /// The envelope sender with `{delivery_id}` (VERP).
    return_path: Option<String>,
}

/// The headers a signature covers: the ones a reader sees and those that decide how the
/// message is shown or unsubscribed from. An absent one is signed as absent, so it cannot
/// be added on the way.
const SIGNED: [&str; 9] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

impl Composer {
    pub fn new(settings: &EmailSettings) -> anyhow::Result<Self> {
        let from: Mailbox = settings.from.parse().context("email.from")?;
        let dkim = match &settings.dkim {
            None => None,
            Some(d) => {
                let key = std::fs::read_to_string(&d.private_key_file).with_context(|| {
                    format!(
                        "reading email.dkim.private_key_file {}",
                        d.private_key_file.display()
                    )
                })?;
                let algorithm = match d.algorithm {
                    DkimAlgorithm::Rsa => DkimSigningAlgorithm::Rsa,
                    DkimAlgorithm::Ed25519 => DkimSigningAlgorithm::Ed25519,
                };
                let key = DkimSigningKey::new(key.trim(), algorithm).map_err(|e| {
                    anyhow::anyhow!(
                        "email.dkim.private_key_file: not a {:?} key ({e:?}); RSA keys are PKCS#1 PEM",
                        d.algorithm
                    )
                })?;
                Some(DkimConfig::new(
                    d.selector.clone(),
                    d.domain.clone(),
                    key,
                    SIGNED.map(HeaderName::new_from_ascii_str).to_vec(),
                    DkimCanonicalization {
                        header: DkimCanonicalizationType::Relaxed,
                        body: DkimCanonicalizationType::Relaxed,
                    },
                ))
            }
        };
        Ok(Self {
            from,
            dkim,
            unsubscribe_mailbox: settings.unsubscribe_mailbox.clone(),
            return_path: settings.return_path.clone(),
        })
    }

    /// The SMTP envelope: the message's recipients, from the delivery's own return path
    /// when one is configured (a bounce then names its delivery).
    fn envelope(
        &self,
        email: &Message,
        delivery_id: &str,
        provider: &str,
    ) -> Result<lettre::address::Envelope, DeliveryError> {
        let Some(path) = &self.return_path else {
            return Ok(email.envelope().clone());
        };
        let from = path
            .replace("{delivery_id}", delivery_id)
            .parse::<lettre::Address>()
            .map_err(|e| DeliveryError::permanent(provider, format!("email.return_path: {e}")))?;
        lettre::address::Envelope::new(Some(from), email.envelope().to().to_vec())
            .map_err(|e| DeliveryError::permanent(provider, format!("envelope: {e}")))
    }

    /// The message, with its unsubscribe headers when it is marketing, signed when a
    /// DKIM key is configured.
    fn compose(&self, message: &OutboundMessage, provider: &str) -> Result<Message, DeliveryError> {
        let mut email = compose(&self.from, message, provider)?;
        if let Some(url) = &message.unsubscribe_url {
            // RFC 2369 and RFC 8058: the link, a mailbox if there is one, and one-click.
            let mut value = format!("<{url}>");
            if let Some(mailbox) = &self.unsubscribe_mailbox {
                value.push_str(&format!(", <mailto:{mailbox}?subject=unsubscribe>"));
            }
            let headers = email.headers_mut();
            headers.insert_raw(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe"),
                value,
            ));
            headers.insert_raw(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                "List-Unsubscribe=One-Click".to_owned(),
            ));
        }
        if let Some(dkim) = &self.dkim {
            email.sign(dkim);
        }
        Ok(email)
    }
}

/// The `Message-ID` of a delivery's email: the same on every attempt, so a receiver can
/// tell a retry from a second message, and feedback that quotes it finds the delivery.
pub fn message_id(delivery_id: &str, from: &Mailbox) -> String {
    format!("<{delivery_id}@{}>", from.email.domain())
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
        .message_id(Some(message_id(&message.delivery_id, from)))
        .header(DeliveryId(message.delivery_id.clone()));
    // Every header at the message's top level, where a DKIM signature covers it (lettre
    // writes a MIME part's own Content-Type after the signature, unsigned).
    let builder = builder.header(MIME_VERSION_1_0);
    let built = match (text, html) {
        (Some(t), Some(h)) => {
            let part = MultiPart::alternative_plain_html(t.clone(), h.clone());
            let content_type = part
                .headers()
                .get::<ContentType>()
                .ok_or_else(|| permanent("a multipart without its Content-Type".into()))?;
            let formatted = part.formatted();
            let body = formatted
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|at| formatted[at + 4..].to_vec())
                .ok_or_else(|| permanent("a multipart without a body".into()))?;
            builder
                .header(content_type)
                .body(Body::dangerous_pre_encoded(
                    body,
                    ContentTransferEncoding::SevenBit,
                ))
        }
        (Some(t), None) => builder.header(ContentType::TEXT_PLAIN).body(t.clone()),
        (None, Some(h)) => builder.header(ContentType::TEXT_HTML).body(h.clone()),
        (None, None) => return Err(permanent("email without a body".into())),
    };
    built.map_err(|e| permanent(format!("building the message: {e}")))
}

/// Pooled SMTP.
pub struct SmtpEmail {
    composer: Composer,
    pool: SmtpPool,
}

#[async_trait]
impl Provider for SmtpEmail {
    fn name(&self) -> &str {
        "smtp"
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        let email = self.composer.compose(message, self.name())?;
        // 5xx replies will fail again; a connection lost after the content went out may
        // have delivered it; everything else (4xx, timeouts before, I/O) may work later.
        let name = self.name();
        let envelope = self.composer.envelope(&email, &message.delivery_id, name)?;
        let response = self
            .pool
            .send(&envelope, &email.formatted())
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
                "message_id": message_id(&message.delivery_id, &self.composer.from),
                "smtp_code": response.code().to_string(),
                "smtp_message": response.message().collect::<Vec<_>>().join(" "),
            },
        })
    }
}

/// One `.eml` file per message (the embedded default: look in `var/outbox/email`).
pub struct FileEmail {
    composer: Composer,
    dir: String,
    transport: AsyncFileTransport<Tokio1Executor>,
}

#[async_trait]
impl Provider for FileEmail {
    fn name(&self) -> &str {
        "file"
    }

    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        let email = self.composer.compose(message, self.name())?;
        let id = self
            .transport
            .send(email)
            .await
            .map_err(|e| DeliveryError::transient(self.name(), e.to_string()))?;
        Ok(Receipt {
            provider: self.name().to_owned(),
            invalid_tokens: Vec::new(),
            response: doc! {
                "message_id": message_id(&message.delivery_id, &self.composer.from),
                "file": format!("{}/{id}.eml", self.dir),
            },
        })
    }
}
