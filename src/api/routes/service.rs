//! `/metrics` (Prometheus), `/openapi.json` (generated from the route table) and `/docs`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::{Extension, Json};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::Priority;
use crate::metrics::{LaneLabels, Metrics};
use crate::queue::Broker;
use crate::store::Store;

/// This document (OpenAPI 3.1).
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct OpenApiDocument(Value);

/// The generated OpenAPI document, shared with the handler that serves it.
#[derive(Clone)]
pub struct Spec(pub Arc<Value>);

/// Jobs waiting in each priority lane and in the outbox, each read within 2 s (`None`
/// when RabbitMQ or MongoDB did not answer in time); the gauges are updated on the way.
async fn backlog(
    store: &Store,
    broker: &Broker,
    metrics: &Metrics,
) -> (Vec<(Priority, Option<u32>)>, Option<u64>) {
    let limit = Duration::from_secs(2);
    let mut lanes = Vec::new();
    for lane in [Priority::High, Priority::Normal, Priority::Low] {
        let queue = broker.names().lane(lane).to_owned();
        let depth = match tokio::time::timeout(limit, broker.queue_depth(&queue)).await {
            Ok(Ok(depth)) => {
                metrics
                    .queue_depth
                    .get_or_create(&LaneLabels {
                        lane: lane.as_str().to_owned(),
                    })
                    .set(i64::from(depth));
                Some(depth)
            }
            _ => None,
        };
        lanes.push((lane, depth));
    }
    let outbox = match tokio::time::timeout(limit, store.outbox_backlog()).await {
        Ok(Ok(backlog)) => {
            metrics.outbox_backlog.set(backlog as i64);
            Some(backlog)
        }
        _ => None,
    };
    (lanes, outbox)
}

/// Jobs waiting now; null where the answer did not come within 2 s.
#[derive(Debug, Serialize, ToSchema)]
pub struct Queues {
    lanes: Lanes,
    outbox: Option<u64>,
}

/// Jobs waiting in each priority lane.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Lanes {
    high: Option<u32>,
    normal: Option<u32>,
    low: Option<u32>,
}

/// `GET /v1/queues`: jobs waiting per priority lane and in the outbox, now.
pub async fn queues(
    State(store): State<Store>,
    State(broker): State<Arc<Broker>>,
    State(metrics): State<Arc<Metrics>>,
) -> Json<Queues> {
    let (depths, outbox) = backlog(&store, &broker, &metrics).await;
    let mut lanes = Lanes::default();
    for (lane, depth) in depths {
        *match lane {
            Priority::High => &mut lanes.high,
            Priority::Normal => &mut lanes.normal,
            Priority::Low => &mut lanes.low,
        } = depth;
    }
    Json(Queues { lanes, outbox })
}

/// Refreshes the gauges read from RabbitMQ and MongoDB, then renders every metric.
pub async fn metrics(
    State(store): State<Store>,
    State(broker): State<Arc<Broker>>,
    State(metrics): State<Arc<Metrics>>,
) -> impl IntoResponse {
    backlog(&store, &broker, &metrics).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

pub async fn openapi(Extension(spec): Extension<Spec>) -> Json<Value> {
    Json((*spec.0).clone())
}

/// A self-contained page that renders `/openapi.json` (no CDN: it works offline).
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("../docs.html"))
}
