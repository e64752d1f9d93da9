//! The REST API (axum): the only layer that knows HTTP.

pub mod error;
mod routes;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::app::Context;
use error::{ApiError, BodyLimit};

/// Every route, with its state.
pub fn router(ctx: Context) -> Router {
    let limit = ctx.settings.server.body_limit_bytes;
    Router::new()
        .route("/health", get(routes::health::health))
        .route("/ready", get(routes::health::ready))
        .route("/v1/events", post(routes::events::post_event))
        .route(
            "/v1/notifications/{id}",
            get(routes::notifications::get_notification),
        )
        .route(
            "/v1/deliveries",
            get(routes::notifications::list_deliveries),
        )
        .route(
            "/v1/deliveries/{id}",
            get(routes::notifications::get_delivery),
        )
        .route("/v1/users/import", post(routes::users::import))
        .route(
            "/v1/users/{id}",
            get(routes::users::get_user)
                .put(routes::users::put_user)
                .delete(routes::users::delete_user),
        )
        .route(
            "/v1/groups/{id}",
            get(routes::groups::get_group)
                .put(routes::groups::put_group)
                .delete(routes::groups::delete_group),
        )
        .route(
            "/v1/schedules",
            get(routes::schedules::list).post(routes::schedules::create),
        )
        .route(
            "/v1/schedules/{id}",
            get(routes::schedules::get)
                .patch(routes::schedules::patch)
                .delete(routes::schedules::delete),
        )
        .route("/v1/schedules/{id}/pause", post(routes::schedules::pause))
        .route("/v1/schedules/{id}/resume", post(routes::schedules::resume))
        .route(
            "/v1/schedules/{id}/trigger",
            post(routes::schedules::trigger),
        )
        .route("/v1/schedules/{id}/runs", get(routes::schedules::runs))
        .route("/v1/schedules/{id}/next", get(routes::schedules::next))
        .route("/v1/dead-letters", get(routes::dead_letters::list))
        .route(
            "/v1/dead-letters/replay",
            post(routes::dead_letters::replay_many),
        )
        .route(
            "/v1/dead-letters/{id}/replay",
            post(routes::dead_letters::replay),
        )
        .route("/v1/templates", get(routes::templates::list))
        .route("/v1/templates/preview", post(routes::templates::preview))
        .route(
            "/v1/templates/{event_type}/{channel}",
            axum::routing::put(routes::templates::put).delete(routes::templates::delete),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        // Bodies are read (and bounded) by our extractors so every refusal has our shape.
        .layer(DefaultBodyLimit::disable())
        .layer(Extension(BodyLimit(limit)))
        .layer(TraceLayer::new_for_http())
        .with_state(ctx)
}

/// Serves the API on an already-bound listener until `cancel`, then drains requests.
pub async fn serve(
    ctx: Context,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    axum::serve(listener, router(ctx))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await?;
    Ok(())
}
