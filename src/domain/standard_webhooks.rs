//! Standard Webhooks 1.0 signing: `whsec_` secrets, and the `webhook-id`, `webhook-timestamp` and `webhook-signature` headers every receiver can verify with the official libraries.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;

use super::signatures::hmac_sha256;

/// The events an endpoint can subscribe to (`type` of each message).
pub const EVENT_TYPES: [&str; 12] = [
    "message.sent",
    "message.delivered",
    "message.bounced",
    "message.undelivered",
    "message.failed",
    "message.dead",
    "message.skipped",
    "message.complained",
    "message.unsubscribed",
    "message.seen",
    "message.read",
    "notification.completed",
];

/// The prefix of a secret in the specification's text form.
pub const SECRET_PREFIX: &str = "whsec_";

/// A signing key: the bytes after `whsec_`, base64-decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

impl SigningKey {
    /// A new random key of 32 bytes (the specification asks for 24 to 64).
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Reads `whsec_<base64>`; any other text is taken as the key's bytes themselves
    /// (receivers then use `whsec_` + base64 of that text with the libraries).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix(SECRET_PREFIX) {
            Some(b64) => {
                let bytes = B64
                    .decode(b64)
                    .map_err(|e| format!("the part after whsec_ is not base64: {e}"))?;
                if bytes.is_empty() {
                    return Err("the secret is empty".into());
                }
                Ok(Self(bytes))
            }
            None if text.is_empty() => Err("the secret is empty".into()),
            None => Ok(Self(text.as_bytes().to_vec())),
        }
    }

    /// The specification's text form, `whsec_<base64>`.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}", B64.encode(&self.0))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let ts = timestamp.to_string();
        let tag = hmac_sha256(&self.0, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
        format!("v1,{}", B64.encode(tag))
    }
}

/// The three headers of a message signed by every key in `keys` (space-separated
/// signatures while a rotated secret still signs beside the new one).
pub fn headers(
    keys: &[SigningKey],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    let signature = keys
        .iter()
        .map(|k| k.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ");
    [
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_specifications_example_does() {
        // The example of the Standard Webhooks specification (spec/standard-webhooks.md).
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_round_trip_and_two_keys_sign_side_by_side() {
        let a = SigningKey::generate();
        assert!(a.to_text().starts_with("whsec_"));
        assert_eq!(SigningKey::parse(&a.to_text()), Ok(a.clone()));
        assert!(SigningKey::parse("whsec_!!").is_err());
        assert!(SigningKey::parse("").is_err());
        assert_eq!(
            SigningKey::parse("plain").map(|k| k.to_text()),
            Ok(format!("whsec_{}", B64.encode("plain")))
        );
        let b = SigningKey::generate();
        let [_, _, (_, sig)] = headers(&[a.clone(), b.clone()], "msg_1", 7, b"{}");
        assert_eq!(
            sig,
            format!(
                "{} {}",
                a.sign("msg_1", 7, b"{}"),
                b.sign("msg_1", 7, b"{}")
            )
        );
    }
}
