//! `/u/{token}`: one-click unsubscribe (RFC 8058). The token in a marketing email's
//! `List-Unsubscribe` says who leaves what, signed; no key, no cookie, no lookup to check it.

use std::sync::Arc;

use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::Html;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::api::console::escape;
use crate::api::error::{read_body, ApiError};
use crate::config::Settings;
use crate::domain::unsubscribe::Unsubscribe;
use crate::store::Store;

/// The body a mail client's one-click POST carries (RFC 8058), urlencoded or multipart.
#[derive(Deserialize, ToSchema)]
pub struct OneClick {
    #[serde(rename = "List-Unsubscribe")]
    #[schema(rename = "List-Unsubscribe", pattern = "^One-Click$")]
    #[allow(dead_code)]
    list_unsubscribe: String,
}

/// The form field and value RFC 8058 prescribes.
const FIELD: &str = "List-Unsubscribe";
const ONE_CLICK: &str = "One-Click";

fn verified(settings: &Settings, token: &str) -> Result<Unsubscribe, ApiError> {
    Unsubscribe::verify(settings.email.unsubscribe_secret.expose().as_bytes(), token).ok_or_else(
        || {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such unsubscribe link",
            )
        },
    )
}

fn what(leave: &Unsubscribe) -> String {
    match &leave.event_type {
        Some(t) => format!("“{}” messages", escape(t.as_str())),
        None => "all marketing messages".to_owned(),
    }
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>body{{font:16px/1.5 system-ui,sans-serif;\
         max-width:32rem;margin:4rem auto;padding:0 1rem}}button{{font:inherit;\
         padding:.5rem 1rem}}</style></head><body><h1>{title}</h1>{body}</body></html>"
    ))
}

/// `GET /u/{token}`: a page with a button that unsubscribes. Changes nothing itself: mail
/// scanners follow links.
pub async fn show(
    State(settings): State<Arc<Settings>>,
    Path(token): Path<String>,
) -> Result<Html<String>, ApiError> {
    let leave = verified(&settings, &token)?;
    Ok(page(
        "Unsubscribe",
        &format!(
            "<p>Stop receiving {} from us?</p><form method=\"post\">\
             <input type=\"hidden\" name=\"{FIELD}\" value=\"{ONE_CLICK}\">\
             <button type=\"submit\">Unsubscribe</button></form>",
            what(&leave)
        ),
    ))
}

/// Whether a one-click body says `List-Unsubscribe=One-Click`.
async fn one_click(req: Request, limit: usize) -> Result<bool, ApiError> {
    let kind = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    // Bounded first, whatever the form: the route is open to anyone with a link.
    let (parts, body) = req.into_parts();
    let body = read_body(Request::from_parts(parts.clone(), body), limit).await?;
    if kind.starts_with("multipart/form-data") {
        let req = Request::from_parts(parts, axum::body::Body::from(body));
        let mut form = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_form", e.body_text()))?;
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_form", e.body_text()))?
        {
            if field.name() == Some(FIELD) {
                let value = field.text().await.map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, "malformed_form", e.body_text())
                })?;
                return Ok(value.trim() == ONE_CLICK);
            }
        }
        return Ok(false);
    }
    Ok(url::form_urlencoded::parse(&body).any(|(k, v)| k == FIELD && v == ONE_CLICK))
}

/// `POST /u/{token}` with `List-Unsubscribe=One-Click`: records the opt-out (once; a
/// repeat answers the same) and answers 200.
pub async fn confirm(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    Path(token): Path<String>,
    req: Request,
) -> Result<Html<String>, ApiError> {
    let leave = verified(&settings, &token)?;
    if !one_click(req, settings.server.body_limit_bytes).await? {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "one_click_missing",
            "the body must be the form field List-Unsubscribe=One-Click (RFC 8058)",
        ));
    }
    store
        .unsubscribe(
            leave.user_id.as_str(),
            leave.event_type.as_ref().map(|t| t.as_str()),
        )
        .await?;
    // The opt-out is recorded: a mark that cannot be written now does not undo it.
    if let Some(delivery_id) = &leave.delivery_id {
        if let Err(e) = store
            .mark_unsubscribed(delivery_id, leave.user_id.as_str())
            .await
        {
            tracing::warn!(error = format!("{e:#}"), %delivery_id, "could not mark the delivery unsubscribed");
        }
    }
    Ok(page(
        "Unsubscribed",
        &format!("<p>You will not receive {} any more.</p>", what(&leave)),
    ))
}
