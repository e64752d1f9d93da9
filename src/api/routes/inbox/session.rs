//! End users' inbox sessions: a user hash from the customer's server traded for a short-lived token naming that one user.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::channels::chain::TokenBucket;
use crate::config::InboxSettings;
use crate::domain::signatures::{hmac_sha256, hmac_sha256_verifies};

const AUDIENCE: &str = "herald-inbox";

/// The user a request's session token names (put on the request by [`require`]).
#[derive(Debug, Clone)]
pub struct InboxUser {
    pub user_id: String,
    /// Unix seconds.
    pub expires_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    iat: i64,
    exp: i64,
}

/// Checks user hashes and issues and checks session tokens; holds each active user's
/// request budget.
pub struct Sessions {
    hash_key: Vec<u8>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl_secs: i64,
    rate: crate::domain::Rate,
    burst: f64,
    /// Per user; users idle for ten minutes are forgotten (a full bucket again).
    budgets: moka::sync::Cache<String, Arc<TokenBucket>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    pub fn new(settings: &InboxSettings) -> Self {
        let secret = settings.secret.expose().as_bytes();
        // Tokens are signed with a key of their own, derived from the secret, so a
        // token's signature and a user hash are never the same computation.
        let token_key = hmac_sha256(secret, &[b"herald inbox session tokens v1"]);
        Self {
            hash_key: secret.to_vec(),
            encoding: EncodingKey::from_secret(&token_key),
            decoding: DecodingKey::from_secret(&token_key),
            ttl_secs: settings.session_secs as i64,
            rate: settings.rate_per_sec,
            burst: f64::from(settings.burst),
            budgets: moka::sync::Cache::builder()
                .max_capacity(200_000)
                .time_to_idle(std::time::Duration::from_secs(600))
                .build(),
        }
    }

    /// `hex(HMAC-SHA256(secret, user_id))`, as the customer's server computes it.
    pub fn user_hash(&self, user_id: &str) -> String {
        hex::encode(hmac_sha256(&self.hash_key, &[user_id.as_bytes()]))
    }

    /// True when `presented` is the user's hash (hex, either case; constant time).
    pub fn hash_matches(&self, user_id: &str, presented: &str) -> bool {
        let Ok(bytes) = hex::decode(presented.trim()) else {
            return false;
        };
        hmac_sha256_verifies(&self.hash_key, &[user_id.as_bytes()], &bytes)
    }

    /// A token naming `user_id`, and when it lapses (Unix seconds).
    pub fn issue(&self, user_id: &str) -> anyhow::Result<(String, i64)> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user_id.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now + self.ttl_secs,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, claims.exp))
    }

    /// Takes one request from the user's budget, or says how long until there is one.
    pub fn admit(&self, user_id: &str) -> Result<(), std::time::Duration> {
        self.budgets
            .get_with_by_ref(user_id, || {
                Arc::new(TokenBucket::new(self.rate, self.burst))
            })
            .try_acquire()
    }

    /// The user a presented token names, with one request taken from their budget: what
    /// every inbox route and socket opening checks.
    pub fn authorize(&self, token: &str) -> Result<InboxUser, ApiError> {
        let user = self.check(token).ok_or_else(|| {
            unauthorized(
                "invalid_session",
                "the session token is invalid or has expired; start a new session",
            )
        })?;
        self.admit(&user.user_id).map_err(over_rate)?;
        Ok(user)
    }

    /// The user a token names, if it is ours and has not lapsed.
    pub fn check(&self, token: &str) -> Option<InboxUser> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        Some(InboxUser {
            user_id: data.claims.sub,
            expires_at: data.claims.exp,
        })
    }
}

/// The refusal of a request over its user's budget.
pub fn over_rate(wait: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "this user is over the inbox's request rate; retry after the given seconds",
    )
    .retry_after(wait.as_secs_f64().ceil() as u64)
}

/// The refusal of a request without a valid session.
pub fn unauthorized(code: &'static str, message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

/// The middleware on every inbox route but the session's: the request must carry a
/// valid token (`Authorization: Bearer <token>`); its user is put on the request.
pub async fn require(
    State(sessions): State<Arc<Sessions>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(token) = crate::api::auth::bearer(req.headers()) else {
        return unauthorized(
            "missing_session",
            "send the inbox session token as `Authorization: Bearer <token>` (POST /v1/inbox/session)",
        )
        .into_response();
    };
    let user = match sessions.authorize(token) {
        Ok(user) => user,
        Err(refused) => return refused.into_response(),
    };
    req.extensions_mut().insert(user);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn sessions(secret: &str) -> Sessions {
        Sessions::new(&InboxSettings {
            secret: Secret::new(secret),
            session_secs: 60,
            allowed_origins: Vec::new(),
            ping_secs: 20,
            rate_per_sec: crate::domain::Rate::new(10.0).expect("rate"),
            burst: 40,
            demo: false,
            demo_user: "demo".into(),
        })
    }

    #[test]
    fn a_hash_is_the_hmac_of_the_user_id_and_a_token_names_only_its_user() {
        let s = sessions("a secret of sixteen+");
        // Python's hmac.new(b"a secret of sixteen+", b"ana", hashlib.sha256).hexdigest()
        let hash = s.user_hash("ana");
        assert_eq!(
            hash,
            "d319f5c84572f16c49d398024cb2bd184e9adb858be596c95bf8f664173b9803"
        );
        assert!(s.hash_matches("ana", &hash));
        assert!(s.hash_matches("ana", &hash.to_uppercase()));
        assert!(!s.hash_matches("bob", &hash));
        assert!(!s.hash_matches("ana", "not hex"));
        let (token, exp) = s.issue("ana").expect("issues");
        let user = s.check(&token).expect("valid");
        assert_eq!(user.user_id, "ana");
        assert_eq!(user.expires_at, exp);
        assert!(s.check(&format!("{token}x")).is_none(), "a changed token");
        assert!(
            sessions("another secret sixteen").check(&token).is_none(),
            "another deployment's token"
        );
    }
}
