//! `/health` (the process is up) and `/ready` (the process can do its role's work now).
//!
//! What readiness needs depends on the role. The API accepts events as long as MongoDB
//! answers: an accepted event waits in the outbox while RabbitMQ is away, so a broker
//! outage must not take the API out of a load balancer's rotation. A worker needs both
//! (it consumes from RabbitMQ and records in MongoDB); a scheduler needs MongoDB (its
//! fires wait in the outbox like accepted events). `herald all` answers with the API's
//! rule: its intake stays in rotation while the broker is away.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::app::Context;

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The API's and the scheduler's readiness: MongoDB answers; RabbitMQ's state is
/// reported, not required.
pub async fn ready(State(ctx): State<Context>) -> (StatusCode, Json<Value>) {
    readiness(&ctx, false).await
}

/// A worker's readiness: MongoDB and RabbitMQ answer.
pub async fn worker_ready(State(ctx): State<Context>) -> (StatusCode, Json<Value>) {
    readiness(&ctx, true).await
}

async fn readiness(ctx: &Context, needs_rabbitmq: bool) -> (StatusCode, Json<Value>) {
    let limit = Duration::from_secs(3);
    let (mongo, rabbit) = tokio::join!(
        tokio::time::timeout(limit, ctx.store.ping()),
        tokio::time::timeout(limit, ctx.broker.ready()),
    );
    let mongo_ok = matches!(mongo, Ok(Ok(())));
    let rabbit_ok = matches!(rabbit, Ok(true));
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let status = if mongo_ok && (rabbit_ok || !needs_rabbitmq) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "checks": {"mongodb": word(mongo_ok), "rabbitmq": word(rabbit_ok)},
        })),
    )
}
