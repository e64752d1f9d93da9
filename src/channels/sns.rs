//! Amazon SNS messages (how SES reports bounces, complaints and deliveries): the string
//! SNS signs, signatures of versions 1 (SHA-1) and 2 (SHA-256) checked with the signing
//! certificate fetched from an allowed host and kept an hour, and subscription
//! confirmation.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::domain::signatures::{certificate_rsa_key, rsa_verifies, RsaDigest};

/// An SNS message as SNS posts it (JSON, sent as `text/plain`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SnsMessage {
    #[serde(rename = "Type")]
    #[schema(rename = "Type")]
    pub kind: SnsType,
    #[serde(rename = "MessageId")]
    #[schema(rename = "MessageId")]
    pub message_id: String,
    #[serde(rename = "TopicArn")]
    #[schema(rename = "TopicArn")]
    pub topic_arn: String,
    #[serde(rename = "Subject")]
    #[schema(rename = "Subject")]
    pub subject: Option<String>,
    /// For SES: the notification, itself JSON.
    #[serde(rename = "Message")]
    #[schema(rename = "Message")]
    pub message: String,
    #[serde(rename = "Timestamp")]
    #[schema(rename = "Timestamp")]
    pub timestamp: String,
    #[serde(rename = "SignatureVersion")]
    #[schema(rename = "SignatureVersion")]
    pub signature_version: SignatureVersion,
    #[serde(rename = "Signature")]
    #[schema(rename = "Signature")]
    pub signature: String,
    #[serde(rename = "SigningCertURL")]
    #[schema(rename = "SigningCertURL")]
    pub signing_cert_url: String,
    /// Subscription messages: where to confirm.
    #[serde(rename = "SubscribeURL")]
    #[schema(rename = "SubscribeURL")]
    pub subscribe_url: Option<String>,
    #[serde(rename = "Token")]
    #[schema(rename = "Token")]
    pub token: Option<String>,
    #[serde(rename = "UnsubscribeURL")]
    #[schema(rename = "UnsubscribeURL")]
    pub unsubscribe_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
pub enum SnsType {
    Notification,
    SubscriptionConfirmation,
    UnsubscribeConfirmation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
pub enum SignatureVersion {
    #[serde(rename = "1")]
    #[schema(rename = "1")]
    V1,
    #[serde(rename = "2")]
    #[schema(rename = "2")]
    V2,
}

impl SnsMessage {
    /// The string SNS signs: the message's fields in this order, each as its name, a
    /// newline, its value, a newline (`Subject` only when present).
    pub fn string_to_sign(&self) -> String {
        let mut fields: Vec<(&str, &str)> =
            vec![("Message", &self.message), ("MessageId", &self.message_id)];
        match self.kind {
            SnsType::Notification => {
                if let Some(subject) = &self.subject {
                    fields.push(("Subject", subject));
                }
                fields.extend([
                    ("Timestamp", self.timestamp.as_str()),
                    ("TopicArn", &self.topic_arn),
                ]);
            }
            SnsType::SubscriptionConfirmation | SnsType::UnsubscribeConfirmation => {
                fields.extend([
                    (
                        "SubscribeURL",
                        self.subscribe_url.as_deref().unwrap_or_default(),
                    ),
                    ("Timestamp", &self.timestamp),
                    ("Token", self.token.as_deref().unwrap_or_default()),
                    ("TopicArn", &self.topic_arn),
                ]);
            }
        }
        let kind = match self.kind {
            SnsType::Notification => "Notification",
            SnsType::SubscriptionConfirmation => "SubscriptionConfirmation",
            SnsType::UnsubscribeConfirmation => "UnsubscribeConfirmation",
        };
        fields.push(("Type", kind));
        fields.iter().map(|(k, v)| format!("{k}\n{v}\n")).collect()
    }
}

/// Why an SNS message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SnsError {
    #[error("the {0} is not on an allowed host (feedback.ses.cert_hosts)")]
    HostNotAllowed(&'static str),
    #[error("the signing certificate could not be fetched: {0}")]
    Unreachable(String),
    #[error("the signing certificate is unusable: {0}")]
    BadCertificate(String),
    #[error("the signature does not match the message and its certificate")]
    BadSignature,
}

/// Whether `label` is shaped like an AWS region (`us-east-1`, `us-gov-west-1`,
/// `cn-north-1`): two letters, words, a number. S3's host labels (`s3`, `s3-us-west-2`,
/// `s3-accelerate`) are not.
fn is_region(label: &str) -> bool {
    let parts: Vec<&str> = label.split('-').collect();
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    parts.len() >= 3
        && first.len() == 2
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_digit())
        && parts[1..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Whether `host` matches one of `patterns`, where `*` stands for one label shaped like
/// an AWS region.
pub fn host_matches(patterns: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    patterns.iter().any(|p| {
        let want: Vec<&str> = p.split('.').collect();
        want.len() == labels.len()
            && want
                .iter()
                .zip(&labels)
                .all(|(w, l)| (*w == "*" && is_region(l)) || w.eq_ignore_ascii_case(l))
    })
}

/// Whether `url` is SNS's signing certificate on an allowed host: its path is
/// `/SimpleNotificationService-<hex>.pem`, as SNS names them.
pub fn cert_url_allowed(patterns: &[String], url: &str) -> bool {
    url_allowed(patterns, url)
        && url::Url::parse(url).is_ok_and(|u| {
            u.query().is_none()
                && u.path()
                    .strip_prefix("/SimpleNotificationService-")
                    .and_then(|rest| rest.strip_suffix(".pem"))
                    .is_some_and(|hex| {
                        !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())
                    })
        })
}

/// A URL SNS may name: HTTPS on an allowed host (plain HTTP only on a loopback address,
/// for a test's own server).
pub fn url_allowed(patterns: &[String], url: &str) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return false;
    };
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        _ => false,
    };
    let scheme_ok = url.scheme() == "https" || (url.scheme() == "http" && loopback);
    scheme_ok
        && url.username().is_empty()
        && url
            .host_str()
            .is_some_and(|h| host_matches(patterns, h.trim_matches(['[', ']'])))
}

/// Checks SNS signatures; holds the certificates it fetched, an hour each.
pub struct SnsVerifier {
    client: reqwest::Client,
    keys: moka::sync::Cache<String, Arc<Vec<u8>>>,
}

impl SnsVerifier {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            // The host allow-list guards where it goes.
            client: super::http::client(Duration::from_secs(10), true)?,
            keys: moka::sync::Cache::builder()
                .max_capacity(64)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        })
    }

    /// Checks `m`'s signature with the certificate its `SigningCertURL` names, which
    /// must be on one of `hosts`.
    pub async fn verify(&self, hosts: &[String], m: &SnsMessage) -> Result<(), SnsError> {
        if !cert_url_allowed(hosts, &m.signing_cert_url) {
            return Err(SnsError::HostNotAllowed("SigningCertURL"));
        }
        let key = match self.keys.get(&m.signing_cert_url) {
            Some(key) => key,
            None => {
                let pem = self
                    .client
                    .get(&m.signing_cert_url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| SnsError::Unreachable(e.without_url().to_string()))?
                    .bytes()
                    .await
                    .map_err(|e| SnsError::Unreachable(e.without_url().to_string()))?;
                let key = Arc::new(certificate_rsa_key(&pem).map_err(SnsError::BadCertificate)?);
                self.keys.insert(m.signing_cert_url.clone(), key.clone());
                key
            }
        };
        let digest = match m.signature_version {
            SignatureVersion::V1 => RsaDigest::Sha1,
            SignatureVersion::V2 => RsaDigest::Sha256,
        };
        let signature = STANDARD
            .decode(m.signature.trim())
            .map_err(|_| SnsError::BadSignature)?;
        if rsa_verifies(&key, digest, m.string_to_sign().as_bytes(), &signature) {
            Ok(())
        } else {
            Err(SnsError::BadSignature)
        }
    }

    /// Confirms a subscription: a GET of its `SubscribeURL`, which must be on `hosts`.
    pub async fn confirm(&self, hosts: &[String], subscribe_url: &str) -> Result<(), SnsError> {
        if !url_allowed(hosts, subscribe_url) {
            return Err(SnsError::HostNotAllowed("SubscribeURL"));
        }
        self.client
            .get(subscribe_url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| SnsError::Unreachable(e.without_url().to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sns_certificates_on_listed_hosts_over_https_or_loopback_are_allowed() {
        let hosts = vec!["sns.*.amazonaws.com".to_owned(), "127.0.0.1".to_owned()];
        for ok in [
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem",
            "https://SNS.us-gov-west-1.amazonaws.com./SimpleNotificationService-01ab.pem",
            "http://127.0.0.1:8123/SimpleNotificationService-0123.pem",
        ] {
            assert!(cert_url_allowed(&hosts, ok), "{ok}");
        }
        for bad in [
            // Anyone can put a file on S3, under amazonaws.com, in a bucket named `sns` too.
            "https://bucket.s3.amazonaws.com/SimpleNotificationService-01.pem",
            "https://sns.s3.amazonaws.com/SimpleNotificationService-01.pem",
            "https://sns.s3-us-west-2.amazonaws.com/SimpleNotificationService-01.pem",
            "https://sns.s3-external-1.amazonaws.com/SimpleNotificationService-01.pem",
            "https://sns.s3-accelerate.amazonaws.com/SimpleNotificationService-01.pem",
            "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-01.pem",
            "https://sns.amazonaws.com/SimpleNotificationService-01.pem",
            "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-01.pem",
            "https://user@sns.us-east-1.amazonaws.com/SimpleNotificationService-01.pem",
            "https://sns.us-east-1.amazonaws.com/other.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-01.pem?x=1",
            "https://127.0.0.2/SimpleNotificationService-01.pem",
            "not a url",
        ] {
            assert!(!cert_url_allowed(&hosts, bad), "{bad}");
        }
        // A subscription URL is any path on an allowed host.
        assert!(url_allowed(
            &hosts,
            "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&Token=x"
        ));
        assert!(!url_allowed(
            &hosts,
            "https://sns.s3.amazonaws.com/?Action=ConfirmSubscription"
        ));
    }
}
