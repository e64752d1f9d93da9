//! An HTTP server on loopback that answers like the SMS and push providers (Twilio's
//! Messages API, FCM v1 and Google's token endpoint) and a status webhook receiver
//! (`/hooks`), and counts what it accepted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Messages the sink accepted, per kind.
#[derive(Default)]
pub struct Received {
    pub sms: AtomicU64,
    pub push: AtomicU64,
    /// Status webhooks received at `/hooks`, in arrival order.
    pub hooks: Mutex<Vec<Hook>>,
}

/// One status webhook as received.
#[derive(Debug, Clone)]
pub struct Hook {
    pub webhook_id: String,
    pub kind: String,
    pub delivery_id: Option<String>,
    pub at: Instant,
}

impl Received {
    /// The status webhooks received so far.
    pub fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn hook_count(&self) -> usize {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Serves until the process ends; returns its base URL and its counters.
pub async fn start() -> anyhow::Result<(String, Arc<Received>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let received = Arc::new(Received::default());
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(Arc::clone(&received));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the provider sink stopped");
        }
    });
    Ok((base, received))
}

async fn answer(State(received): State<Arc<Received>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let webhook_id = request
        .headers()
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Read the whole body, as a provider would, before answering.
    let Ok(body) = axum::body::to_bytes(request.into_body(), 1 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if path == "/hooks" {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let hook = Hook {
            webhook_id: webhook_id.unwrap_or_default(),
            kind: event["type"].as_str().unwrap_or_default().to_owned(),
            delivery_id: event["data"]["delivery_id"].as_str().map(str::to_owned),
            at: Instant::now(),
        };
        received
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
        StatusCode::NO_CONTENT.into_response()
    } else if path.ends_with("/Messages.json") {
        let n = received.sms.fetch_add(1, Ordering::Relaxed);
        let body = json!({"sid": format!("SM{n:032x}"), "status": "queued"});
        (StatusCode::CREATED, Json(body)).into_response()
    } else if path.ends_with("/messages:send") {
        let n = received.push.fetch_add(1, Ordering::Relaxed);
        let project = path.split('/').nth(3).unwrap_or("bench");
        Json(json!({"name": format!("projects/{project}/messages/{n}")})).into_response()
    } else if path == "/token" {
        Json(json!({"access_token": "bench-token", "expires_in": 3600, "token_type": "Bearer"}))
            .into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}
