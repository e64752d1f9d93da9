//! `/health` (the process is up) and `/ready` (the process can do its role's work now).
//!
//! What readiness needs depends on the role. The API accepts events as long as MongoDB
//! answers: an accepted event waits in the outbox while RabbitMQ is away, so a broker
//! outage must not take the API out of a load balancer's rotation. A worker needs both
//! (it consumes from RabbitMQ and records in MongoDB); a scheduler needs MongoDB (its
//! fires wait in the outbox like accepted events). `herald all` answers with the API's
//! rule: its intake stays in rotation while the broker is away.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::queue::Broker;
use crate::store::Store;

/// The process is up.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// Whether the process can do its role's work, and what each dependency said.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    status: &'static str,
    checks: Checks,
}

/// `ok` or `unreachable`, per dependency.
#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    mongodb: &'static str,
    rabbitmq: &'static str,
}

pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The API's and the scheduler's readiness: MongoDB answers; RabbitMQ's state is
/// reported, not required.
pub async fn ready(
    State(store): State<Store>,
    State(broker): State<Arc<Broker>>,
) -> (StatusCode, Json<Readiness>) {
    readiness(&store, &broker, false).await
}

/// A worker's readiness: MongoDB and RabbitMQ answer.
pub async fn worker_ready(
    State(store): State<Store>,
    State(broker): State<Arc<Broker>>,
) -> (StatusCode, Json<Readiness>) {
    readiness(&store, &broker, true).await
}

async fn readiness(
    store: &Store,
    broker: &Broker,
    needs_rabbitmq: bool,
) -> (StatusCode, Json<Readiness>) {
    let limit = Duration::from_secs(3);
    let (mongo, rabbit) = tokio::join!(
        tokio::time::timeout(limit, store.ping()),
        tokio::time::timeout(limit, broker.ready()),
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
        Json(Readiness {
            status: if status == StatusCode::OK {
                "ready"
            } else {
                "not_ready"
            },
            checks: Checks {
                mongodb: word(mongo_ok),
                rabbitmq: word(rabbit_ok),
            },
        }),
    )
}
