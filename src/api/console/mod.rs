//! The web console at `/ui`: a sign-in page, and one page of embedded HTML, CSS and
//! JavaScript that drives the JSON API under a server-side sign-in session (no build
//! step, no CDN).

use std::sync::Arc;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::api::auth::{console_cookie, Auth, CONSOLE_COOKIE, CONSOLE_SESSION};
use crate::app::Context;

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");

/// Every asset the pages load, by name: (content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
    ("icon.svg", "image/svg+xml", include_str!("assets/icon.svg")),
];

/// Scripts and styles from herald only; previews of rendered email load nothing remote.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// `/ui` and its pages, assets, sign-in and sign-out.
pub fn routes(auth: Arc<Auth>) -> Router<Context> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(session))
        .route("/ui/assets/{name}", get(asset))
        .layer(axum::Extension(auth))
}

fn page(status: StatusCode, html: String) -> Response {
    (
        status,
        [
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(html),
    )
        .into_response()
}

fn login_form(message: Option<&str>) -> String {
    let notice = message.map_or_else(String::new, |m| {
        format!(
            r#"<p class="error" role="alert" id="login-error">{}</p>"#,
            escape(m)
        )
    });
    LOGIN.replace("<!--notice-->", &notice)
}

/// HTML-escapes text for the server-rendered pages (sign-in, unsubscribe).
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The key behind the request's session cookie, if the session and the key are live.
async fn signed_in(
    auth: &Auth,
    headers: &HeaderMap,
) -> anyhow::Result<Option<Arc<crate::store::ApiKeyDoc>>> {
    match console_cookie(headers) {
        Some(session) => auth.identify_session(&session).await,
        None => Ok(None),
    }
}

/// herald does not terminate TLS itself: a proxy in front says the browser used HTTPS.
fn over_https(headers: &HeaderMap) -> bool {
    let said = |name: header::HeaderName| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
    };
    said(header::HeaderName::from_static("x-forwarded-proto"))
        .iter()
        .any(|v| v.split(',').next().is_some_and(|p| p.trim() == "https"))
        || said(header::FORWARDED)
            .iter()
            .any(|v| v.split([';', ',']).any(|p| p.trim() == "proto=https"))
}

async fn index(axum::Extension(auth): axum::Extension<Arc<Auth>>, headers: HeaderMap) -> Response {
    match signed_in(&auth, &headers).await {
        Ok(Some(_)) => page(StatusCode::OK, INDEX.to_owned()),
        Ok(None) => Redirect::to("/ui/login").into_response(),
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "console: cannot check the sign-in"
            );
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                login_form(Some("herald cannot reach its database; try again shortly")),
            )
        }
    }
}

async fn login_page() -> Response {
    page(StatusCode::OK, login_form(None))
}

#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

fn cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{CONSOLE_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("herald_console=; Path=/; Max-Age=0"))
}

/// Checks the key and, when it is a live one, starts a session whose id the browser
/// keeps in an `HttpOnly` cookie; the key itself is not kept.
async fn login(
    axum::Extension(auth): axum::Extension<Arc<Auth>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let key = form.key.trim();
    let session = match auth.identify(key).await {
        Ok(Some(key)) => auth.start_session(&key).await.map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match session {
        Ok(Some(session)) => (
            [(
                header::SET_COOKIE,
                cookie(&session, CONSOLE_SESSION.as_secs(), over_https(&headers)),
            )],
            Redirect::to("/ui"),
        )
            .into_response(),
        Ok(None) => page(
            StatusCode::UNAUTHORIZED,
            login_form(Some("That API key is unknown or revoked.")),
        ),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "console: cannot check a key");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                login_form(Some("herald cannot reach its database; try again shortly")),
            )
        }
    }
}

/// Ends the session server-side (a copied cookie stops working too), then in the browser.
async fn logout(axum::Extension(auth): axum::Extension<Arc<Auth>>, headers: HeaderMap) -> Response {
    if let Some(session) = console_cookie(&headers) {
        if let Err(e) = auth.end_session(&session).await {
            tracing::error!(error = format!("{e:#}"), "console: cannot end a session");
            return crate::api::error::ApiError::from(e).into_response();
        }
    }
    (
        [(header::SET_COOKIE, cookie("", 0, over_https(&headers)))],
        Redirect::to("/ui/login"),
    )
        .into_response()
}

/// Who is signed in: the key's name and scopes (the page hides what they do not allow).
async fn session(
    axum::Extension(auth): axum::Extension<Arc<Auth>>,
    headers: HeaderMap,
) -> Response {
    match signed_in(&auth, &headers).await {
        Ok(Some(key)) => Json(json!({
            "name": key.name,
            "key_id": key.id,
            "scopes": key.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        }))
        .into_response(),
        Ok(None) => crate::api::error::ApiError::new(
            StatusCode::UNAUTHORIZED,
            "not_signed_in",
            "sign in at /ui/login",
        )
        .into_response(),
        Err(e) => crate::api::error::ApiError::from(e).into_response(),
    }
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, media, body)) => (
            [
                (header::CONTENT_TYPE, *media),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => {
            crate::api::error::ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such asset")
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_in_page_escapes_its_message() {
        let html = login_form(Some("<script>x</script>"));
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(!html.contains("<script>x"));
    }

    #[test]
    fn every_asset_the_page_names_is_served() {
        for name in ["app.js", "app.css", "icon.svg"] {
            assert!(INDEX.contains(&format!("/ui/assets/{name}")), "{name}");
            assert!(ASSETS.iter().any(|(n, _, _)| *n == name), "{name}");
        }
    }
}
