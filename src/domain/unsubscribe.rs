//! One-click unsubscribe tokens (RFC 8058): who leaves what, signed, so a link is checked
//! without a lookup and cannot be forged or altered.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::signatures::{hmac_sha256, hmac_sha256_verifies};
use super::{EventType, UserId};

/// What a user leaves: one event type's marketing, or all marketing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub user_id: UserId,
    /// `None`: every marketing event type.
    pub event_type: Option<EventType>,
    /// The delivery whose link it is, marked `unsubscribed_at` when used (links made
    /// before deliveries were named in them carry none).
    pub delivery_id: Option<String>,
}

/// Separates the signed fields; neither a user id nor an event type contains it.
const SEP: char = '\n';
/// Binds the MAC to its use: a signature made for something else never verifies here.
const DOMAIN: &[u8] = b"herald-unsubscribe-v1";

impl Unsubscribe {
    fn payload(&self) -> String {
        let scope = self.event_type.as_ref().map_or("*", |t| t.as_str());
        match &self.delivery_id {
            Some(d) => format!("{}{SEP}{scope}{SEP}{d}", self.user_id),
            None => format!("{}{SEP}{scope}", self.user_id),
        }
    }

    /// The token for a link: the fields and their HMAC-SHA256, base64url.
    pub fn token(&self, secret: &[u8]) -> String {
        let payload = self.payload();
        let tag = hmac_sha256(secret, &[DOMAIN, b"\n", payload.as_bytes()]);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// What a token says, if `secret` signed it; `None` for anything forged, altered
    /// or malformed.
    pub fn verify(secret: &[u8], token: &str) -> Option<Self> {
        if token.len() > 512 {
            return None;
        }
        let (payload, tag) = token.split_once('.')?;
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if !hmac_sha256_verifies(secret, &[DOMAIN, b"\n", payload.as_bytes()], &tag) {
            return None;
        }
        let mut fields = payload.split(SEP);
        let (user, scope) = (fields.next()?, fields.next()?);
        let delivery_id = fields.next().map(str::to_owned);
        if fields.next().is_some() || delivery_id.as_deref() == Some("") {
            return None;
        }
        Some(Self {
            user_id: UserId::parse(user).ok()?,
            event_type: match scope {
                "*" => None,
                t => Some(EventType::parse(t).ok()?),
            },
            delivery_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn promo_for(user: &str) -> Unsubscribe {
        Unsubscribe {
            user_id: UserId::parse(user).expect("id"),
            event_type: Some(EventType::parse("promo").expect("type")),
            delivery_id: None,
        }
    }

    #[test]
    fn a_token_says_who_leaves_what_and_only_its_secret_verifies_it() {
        let secret = b"0123456789abcdef";
        for u in [
            promo_for("ana"),
            Unsubscribe {
                user_id: UserId::parse("u:1@x").expect("id"),
                event_type: None,
                delivery_id: Some("019ae0c1-7f00-7000-8000-000000000001".to_owned()),
            },
        ] {
            let token = u.token(secret);
            assert!(token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
            assert_eq!(Unsubscribe::verify(secret, &token), Some(u));
            assert_eq!(Unsubscribe::verify(b"another secret!!", &token), None);
        }
    }

    #[test]
    fn an_altered_or_malformed_token_verifies_as_nothing() {
        let secret = b"0123456789abcdef";
        let token = promo_for("ana").token(secret);
        let (_, tag) = token.split_once('.').expect("two parts");
        // Another user's fields under ana's signature.
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode("bruno\npromo"));
        for bad in [
            forged.as_str(),
            "",
            ".",
            "not-a-token",
            &token[..token.len() - 2],
            &format!("{token}x"),
        ] {
            assert_eq!(Unsubscribe::verify(secret, bad), None, "{bad}");
        }
    }
}
