//! `/metrics` (Prometheus), `/openapi.json` (generated from the route table) and `/docs`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::{Extension, Json};
use serde_json::Value;

use crate::app::Context;
use crate::domain::Priority;
use crate::metrics::LaneLabels;

/// The generated OpenAPI document, shared with the handler that serves it.
#[derive(Clone)]
pub struct Spec(pub Arc<Value>);

/// Refreshes the gauges read from RabbitMQ and MongoDB, then renders every metric.
pub async fn metrics(State(ctx): State<Context>) -> impl IntoResponse {
    let limit = Duration::from_secs(2);
    for lane in [Priority::High, Priority::Normal, Priority::Low] {
        let queue = ctx.broker.names().lane(lane).to_owned();
        if let Ok(Ok(depth)) = tokio::time::timeout(limit, ctx.broker.queue_depth(&queue)).await {
            ctx.metrics
                .queue_depth
                .get_or_create(&LaneLabels {
                    lane: lane.as_str().to_owned(),
                })
                .set(i64::from(depth));
        }
    }
    if let Ok(Ok(backlog)) = tokio::time::timeout(limit, ctx.store.outbox_backlog()).await {
        ctx.metrics.outbox_backlog.set(backlog as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
}

pub async fn openapi(Extension(spec): Extension<Spec>) -> Json<Value> {
    Json((*spec.0).clone())
}

/// A self-contained page that renders `/openapi.json` (no CDN: it works offline).
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("../docs.html"))
}
