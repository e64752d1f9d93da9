//! `/health` (the process is up) and `/ready` (MongoDB and RabbitMQ answer).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::app::Context;

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(ctx): State<Context>) -> (StatusCode, Json<Value>) {
    let limit = Duration::from_secs(3);
    let (mongo, rabbit) = tokio::join!(
        tokio::time::timeout(limit, ctx.store.ping()),
        tokio::time::timeout(limit, ctx.broker.ready()),
    );
    let mongo_ok = matches!(mongo, Ok(Ok(())));
    let rabbit_ok = matches!(rabbit, Ok(true));
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let status = if mongo_ok && rabbit_ok {
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
