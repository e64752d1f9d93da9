//! The REST API (axum): the only layer that knows HTTP.

pub mod auth;
pub mod console;
pub mod error;
mod routes;
pub mod spec;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{from_fn_with_state, Next};
use axum::response::Response;
use axum::{Extension, Router};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::app::Context;
use crate::domain::Scope;
use auth::Auth;
use error::{ApiError, BodyLimit};
use routes::*;
use spec::{Api, Op};

const EVENTS: Option<Scope> = Some(Scope::EventsWrite);
const CAMPAIGNS: Option<Scope> = Some(Scope::CampaignsWrite);
const LOGS: Option<Scope> = Some(Scope::LogsRead);
const ADMIN: Option<Scope> = Some(Scope::Admin);

const LOG_FILTERS: &[(&str, &str)] = &[
    ("notification_id", "one notification's deliveries"),
    ("user_id", "one recipient's deliveries"),
    (
        "status",
        "queued, sending, sent, failed, retrying, dead, skipped or deferred",
    ),
    ("channel", "email, sms, push or webhook"),
    ("event_type", "one event type"),
    ("schedule_id", "deliveries of one campaign"),
    ("since", "created at or after (RFC 3339)"),
    ("until", "created before (RFC 3339)"),
    ("limit", "page size, 1 to 500 (default 50)"),
    ("cursor", "next_cursor of the previous page"),
];

/// `/metrics` is open unless `auth.open_metrics` is off.
fn metrics_op(ctx: &Context) -> Op {
    let scope = (!ctx.settings.auth.open_metrics).then_some(Scope::LogsRead);
    Op::new("service", "Prometheus metrics", scope).media("application/openmetrics-text")
}

/// Every route with its scope and documentation (see `spec`), and the spec itself.
///
/// Long on purpose: this is the route table, one entry per route, read top to bottom
/// like the API reference it generates; split up, no single place would list the API.
pub fn routes(ctx: &Context, auth: Arc<Auth>) -> (Router<Context>, Value) {
    Api::new(auth)
        .get(
            "/health",
            Op::new("service", "the process is up", None),
            health::health,
        )
        .get(
            "/ready",
            Op::new(
                "service",
                "events can be accepted: MongoDB answers (RabbitMQ is reported, not required)",
                None,
            ),
            health::ready,
        )
        .get("/metrics", metrics_op(ctx), service::metrics)
        .get(
            "/openapi.json",
            Op::new("service", "this document", None),
            service::openapi,
        )
        .get(
            "/docs",
            Op::new("service", "the API reference, readable", None).media("text/html"),
            service::docs,
        )
        .post(
            "/v1/events",
            Op::new("events", "accept an event (201 new, 200 repeat)", EVENTS)
                .body("Event")
                .ok(202, Some("Accepted")),
            events::post_event,
        )
        .get(
            "/v1/notifications/{id}",
            Op::new("events", "one notification and its delivery counts", LOGS)
                .ok(200, Some("Notification")),
            notifications::get_notification,
        )
        .get(
            "/v1/deliveries",
            Op::new(
                "deliveries",
                "the delivery log, newest first, cursor pages",
                LOGS,
            )
            .query(LOG_FILTERS)
            .ok(200, Some("DeliveryPage")),
            deliveries::list,
        )
        .get(
            "/v1/deliveries/stream",
            Op::new(
                "deliveries",
                "status changes as server-sent events; resume with Last-Event-ID",
                LOGS,
            )
            .query(&[
                ("status", "only changes to this status"),
                ("channel", "one channel"),
                ("event_type", "one event type"),
            ])
            .media("text/event-stream"),
            deliveries::stream,
        )
        .get(
            "/v1/deliveries/{id}/preview",
            Op::new(
                "deliveries",
                "the message rendered now from the current template and profile",
                LOGS,
            ),
            deliveries::preview,
        )
        .get(
            "/v1/deliveries/{id}",
            Op::new("deliveries", "one delivery with every attempt", LOGS)
                .ok(200, Some("DeliveryDetail")),
            deliveries::get,
        )
        .get(
            "/v1/stats/deliveries",
            Op::new("deliveries", "counts, success rates and send latency", LOGS)
                .query(&[
                    ("since", "RFC 3339; default 7 days before until"),
                    ("until", "RFC 3339; default now"),
                    (
                        "group_by",
                        "comma-separated: day, hour, channel, status, event_type, provider",
                    ),
                ])
                .ok(200, Some("Stats")),
            stats::deliveries,
        )
        .get(
            "/v1/queues",
            Op::new(
                "deliveries",
                "jobs waiting per priority lane and in the outbox (null: no answer within 2 s)",
                LOGS,
            ),
            service::queues,
        )
        .get(
            "/v1/dead-letters",
            Op::new("dead letters", "deliveries that failed for good", LOGS).query(&[
                ("notification_id", "one notification"),
                ("channel", "one channel"),
                ("reason", "one reason"),
                ("include_replayed", "true to include replayed letters"),
                ("limit", "1 to 1000"),
            ]),
            dead_letters::list,
        )
        .post(
            "/v1/dead-letters/replay",
            Op::new(
                "dead letters",
                "replay every letter matching a filter",
                CAMPAIGNS,
            )
            .body("ReplayFilter"),
            dead_letters::replay_many,
        )
        .post(
            "/v1/dead-letters/{id}/replay",
            Op::new("dead letters", "replay one dead letter", CAMPAIGNS),
            dead_letters::replay,
        )
        .post(
            "/v1/users/import",
            Op::new("users", "bulk upsert from NDJSON or CSV", CAMPAIGNS).media("application/json"),
            users::import,
        )
        .get(
            "/v1/users/{id}",
            Op::new("users", "one user", CAMPAIGNS).ok(200, Some("User")),
            users::get_user,
        )
        .put(
            "/v1/users/{id}",
            Op::new("users", "create or replace a user", CAMPAIGNS).body("User"),
            users::put_user,
        )
        .delete(
            "/v1/users/{id}",
            Op::new("users", "delete a user", CAMPAIGNS).ok(204, None),
            users::delete_user,
        )
        .get(
            "/v1/groups/{id}",
            Op::new("groups", "one group", CAMPAIGNS).ok(200, Some("Group")),
            groups::get_group,
        )
        .put(
            "/v1/groups/{id}",
            Op::new("groups", "create or replace a group", CAMPAIGNS).body("Group"),
            groups::put_group,
        )
        .delete(
            "/v1/groups/{id}",
            Op::new("groups", "delete a group", CAMPAIGNS).ok(204, None),
            groups::delete_group,
        )
        .get(
            "/v1/schedules",
            Op::new("campaigns", "every schedule", CAMPAIGNS).query(&[
                ("status", "active, paused or ended"),
                ("limit", "1 to 1000"),
            ]),
            schedules::list,
        )
        .post(
            "/v1/schedules",
            Op::new("campaigns", "create a schedule", CAMPAIGNS)
                .body("Schedule")
                .ok(201, Some("Object")),
            schedules::create,
        )
        .post(
            "/v1/schedules/preview",
            Op::new(
                "campaigns",
                "the next fire times of a cron expression in a zone, before saving",
                CAMPAIGNS,
            )
            .body("CronPreview"),
            schedules::preview,
        )
        .get(
            "/v1/schedules/{id}",
            Op::new("campaigns", "one schedule", CAMPAIGNS).ok(200, Some("Schedule")),
            schedules::get,
        )
        .patch(
            "/v1/schedules/{id}",
            Op::new("campaigns", "change a schedule", CAMPAIGNS).body("Schedule"),
            schedules::patch,
        )
        .delete(
            "/v1/schedules/{id}",
            Op::new("campaigns", "delete a schedule", CAMPAIGNS).ok(204, None),
            schedules::delete,
        )
        .post(
            "/v1/schedules/{id}/pause",
            Op::new("campaigns", "pause", CAMPAIGNS),
            schedules::pause,
        )
        .post(
            "/v1/schedules/{id}/resume",
            Op::new("campaigns", "resume", CAMPAIGNS),
            schedules::resume,
        )
        .post(
            "/v1/schedules/{id}/trigger",
            Op::new("campaigns", "fire now, once", CAMPAIGNS),
            schedules::trigger,
        )
        .get(
            "/v1/schedules/{id}/runs",
            Op::new("campaigns", "run history with lag", CAMPAIGNS)
                .query(&[("limit", "1 to 1000")]),
            schedules::runs,
        )
        .get(
            "/v1/schedules/{id}/next",
            Op::new("campaigns", "the next fire times", CAMPAIGNS).query(&[("count", "1 to 100")]),
            schedules::next,
        )
        .get(
            "/v1/templates",
            Op::new(
                "templates",
                "every template and where it comes from",
                CAMPAIGNS,
            ),
            templates::list,
        )
        .get(
            "/v1/templates/{event_type}/{channel}",
            Op::new(
                "templates",
                "the source of one channel's parts, as deliveries use them",
                CAMPAIGNS,
            )
            .query(&[("locale", "one locale (default: the base template)")]),
            templates::get,
        )
        .post(
            "/v1/templates/preview",
            Op::new("templates", "render with sample data", CAMPAIGNS).body("TemplatePreview"),
            templates::preview,
        )
        .put(
            "/v1/templates/{event_type}/{channel}",
            Op::new("templates", "store a template override", CAMPAIGNS).body("Template"),
            templates::put,
        )
        .delete(
            "/v1/templates/{event_type}/{channel}",
            Op::new("templates", "remove a stored override", CAMPAIGNS)
                .query(&[("locale", "one locale")])
                .ok(204, None),
            templates::delete,
        )
        .get(
            "/v1/keys",
            Op::new("keys", "every API key (never the secret)", ADMIN),
            keys::list,
        )
        .post(
            "/v1/keys",
            Op::new(
                "keys",
                "create a key; the answer is the only time it is shown",
                ADMIN,
            )
            .body("NewKey")
            .ok(201, Some("Key")),
            keys::create,
        )
        .delete(
            "/v1/keys/{id}",
            Op::new("keys", "revoke a key", ADMIN).ok(204, None),
            keys::revoke,
        )
        .finish()
}

/// Times every request under its route pattern (unmatched ones as `unmatched`).
async fn observe(State(ctx): State<Context>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    ctx.metrics.http(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Every route, with its state.
pub fn router(ctx: Context) -> Router {
    let limit = ctx.settings.server.body_limit_bytes;
    let auth = Arc::new(Auth::new(ctx.store.clone(), ctx.settings.auth.clone()));
    let (routes, spec) = routes(&ctx, auth.clone());
    routes
        .merge(console::routes(auth.clone()))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        // Inside `observe`, so a panicking handler is counted as the 500 it answers.
        .layer(CatchPanicLayer::custom(error::panicked))
        .layer(from_fn_with_state(ctx.clone(), observe))
        // Bodies are read (and bounded) by our extractors so every refusal has our shape.
        .layer(DefaultBodyLimit::disable())
        .layer(Extension(BodyLimit(limit)))
        .layer(Extension(auth))
        .layer(Extension(service::Spec(Arc::new(spec))))
        .layer(TraceLayer::new_for_http())
        .with_state(ctx)
}

/// Which role a `/metrics` server runs in: it decides what `/ready` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeRole {
    Worker,
    Scheduler,
}

/// `/metrics`, `/health` and `/ready` for roles without the API (`server.metrics_bind`);
/// nothing when unset.
pub async fn serve_metrics(
    ctx: Context,
    role: ProbeRole,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let Some(addr) = ctx.settings.server.metrics_bind else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    let auth = Arc::new(Auth::new(ctx.store.clone(), ctx.settings.auth.clone()));
    let health_op = || Op::new("service", "the process is up", None);
    let api = Api::new(auth)
        .get("/metrics", metrics_op(&ctx), service::metrics)
        .get("/health", health_op(), health::health);
    let api = match role {
        ProbeRole::Worker => api.get(
            "/ready",
            Op::new("service", "MongoDB and RabbitMQ answer", None),
            health::worker_ready,
        ),
        ProbeRole::Scheduler => api.get(
            "/ready",
            Op::new("service", "MongoDB answers", None),
            health::ready,
        ),
    };
    let (routes, _) = api.finish();
    axum::serve(listener, routes.with_state(ctx))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await?;
    Ok(())
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
