//! API keys on requests: who is calling (401), may they call this (403), and how often (429).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::channels::chain::TokenBucket;
use crate::config::AuthSettings;
use crate::domain::{Rate, Scope};
use crate::store::{ApiKeyDoc, Store};

/// Verified keys (briefly cached) and a request budget per key.
pub struct Auth {
    store: Store,
    settings: AuthSettings,
    /// Presented key -> the key it is, for `auth.cache_secs`; at most 10,000 keys.
    verified: moka::sync::Cache<String, Arc<ApiKeyDoc>>,
    /// Console session id -> the key it signed in with, likewise.
    sessions: moka::sync::Cache<String, Arc<ApiKeyDoc>>,
    budgets: Mutex<HashMap<String, Arc<TokenBucket>>>,
}

/// At most 10,000 keys, each for `auth.cache_secs`.
fn key_cache(settings: &AuthSettings) -> moka::sync::Cache<String, Arc<ApiKeyDoc>> {
    moka::sync::Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(settings.cache_secs.max(1)))
        .build()
}

/// The key a request was made with, for handlers that want to know.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub name: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Auth {
    pub fn new(store: Store, settings: AuthSettings) -> Self {
        Self {
            store,
            verified: key_cache(&settings),
            sessions: key_cache(&settings),
            budgets: Mutex::default(),
            settings,
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// The key `presented` is, if it is a live one (briefly cached).
    pub async fn identify(&self, presented: &str) -> anyhow::Result<Option<Arc<ApiKeyDoc>>> {
        self.cached(&self.verified, presented, self.store.verify_key(presented))
            .await
    }

    /// The live key behind a console session id (briefly cached).
    pub async fn identify_session(&self, session: &str) -> anyhow::Result<Option<Arc<ApiKeyDoc>>> {
        self.cached(
            &self.sessions,
            session,
            self.store.console_session_key(session),
        )
        .await
    }

    /// What `cache` holds for `presented`, else what `lookup` finds (remembered for
    /// `auth.cache_secs`; a miss forgets any stale entry).
    async fn cached(
        &self,
        cache: &moka::sync::Cache<String, Arc<ApiKeyDoc>>,
        presented: &str,
        lookup: impl std::future::Future<Output = anyhow::Result<Option<ApiKeyDoc>>>,
    ) -> anyhow::Result<Option<Arc<ApiKeyDoc>>> {
        if self.settings.cache_secs > 0 {
            if let Some(key) = cache.get(presented) {
                return Ok(Some(key));
            }
        }
        let Some(key) = lookup.await? else {
            cache.invalidate(presented);
            return Ok(None);
        };
        let key = Arc::new(key);
        if self.settings.cache_secs > 0 {
            cache.insert(presented.to_owned(), key.clone());
        }
        Ok(Some(key))
    }

    /// Starts a console session for a live key.
    pub async fn start_session(&self, key: &ApiKeyDoc) -> anyhow::Result<String> {
        self.store
            .start_console_session(&key.id, CONSOLE_SESSION)
            .await
    }

    /// Ends a console session (sign-out), here and in the database.
    pub async fn end_session(&self, session: &str) -> anyhow::Result<()> {
        self.sessions.invalidate(session);
        self.store.end_console_session(session).await
    }

    /// Drops a revoked key, and the console sessions it signed in, from this process's
    /// caches at once.
    pub fn forget(&self, key_id: &str) {
        for cache in [&self.verified, &self.sessions] {
            for (presented, key) in cache {
                if key.id == key_id {
                    cache.invalidate(presented.as_str());
                }
            }
        }
        lock(&self.budgets).remove(key_id);
    }

    /// Takes one request from the key's budget, or says how long until there is one.
    fn admit(&self, key: &ApiKeyDoc) -> Result<(), Duration> {
        let bucket = lock(&self.budgets)
            .entry(key.id.clone())
            .or_insert_with(|| {
                // A key's own rate was checked when it was created; one stored before
                // that check that is no `Rate` counts as no rate of its own.
                let own = key.rate_per_sec.and_then(|r| match Rate::new(r) {
                    Ok(rate) => Some(rate),
                    Err(why) => {
                        tracing::warn!(key_id = %key.id, %why, "the key's stored rate is not usable; it gets auth.rate_per_sec");
                        None
                    }
                });
                let rate = own.unwrap_or(self.settings.rate_per_sec);
                let burst = match own {
                    Some(r) => (r.per_sec() * 2.0).max(1.0),
                    None => f64::from(self.settings.burst),
                };
                Arc::new(TokenBucket::new(rate, burst))
            })
            .clone();
        bucket.try_acquire()
    }
}

/// The console's session cookie: a session id (never the key), `HttpOnly`,
/// `SameSite=Strict`, and `Secure` when the console is served over HTTPS.
pub const CONSOLE_COOKIE: &str = "herald_console";
/// How long a console sign-in lasts.
pub const CONSOLE_SESSION: Duration = Duration::from_secs(12 * 3600);
/// Sent by the console's scripts with every request that changes something: a request
/// authenticated by the cookie alone must carry it, which a cross-site form cannot.
pub const CONSOLE_HEADER: &str = "x-herald-console";

/// The value of the console's cookie, if the request has one.
pub fn console_cookie(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == CONSOLE_COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn unauthorized(code: &'static str, message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The token of an `Authorization: Bearer <token>` header (API keys, inbox sessions).
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// The middleware on every route that needs `scope`.
pub async fn require(
    State((auth, scope)): State<(Arc<Auth>, Scope)>,
    mut req: Request,
    next: Next,
) -> Response {
    if !auth.enabled() {
        return next.run(req).await;
    }
    let presented = bearer(req.headers()).map(str::to_owned);
    let identified = match (presented, console_cookie(req.headers())) {
        (Some(key), _) => auth.identify(&key).await,
        (None, Some(_))
            if !req.method().is_safe() && !req.headers().contains_key(CONSOLE_HEADER) =>
        {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "console_header_missing",
                format!("a request signed in by the console's cookie that changes something must carry `{CONSOLE_HEADER}: 1`"),
            )
            .into_response();
        }
        (None, Some(session)) => auth.identify_session(&session).await,
        (None, None) => {
            return unauthorized(
                "missing_api_key",
                "send an API key as `Authorization: Bearer <key>`",
            )
        }
    };
    let key = match identified {
        Ok(Some(key)) => key,
        Ok(None) => return unauthorized("invalid_api_key", "the API key is unknown or revoked"),
        Err(e) => return ApiError::from(e).into_response(),
    };
    if let Err(wait) = auth.admit(&key) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "this API key is over its request rate; retry after the given seconds",
        )
        .retry_after(wait.as_secs_f64().ceil() as u64)
        .into_response();
    }
    if !scope.granted_by(&key.scopes) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("this API key lacks the `{}` scope", scope.as_str()),
        )
        .into_response();
    }
    req.extensions_mut().insert(Caller {
        key_id: key.id.clone(),
        name: key.name.clone(),
    });
    next.run(req).await
}
