//! The REST API (axum): the only layer that knows HTTP.

pub mod auth;
pub mod console;
pub mod error;
mod routes;
pub mod spec;
mod state;

pub use routes::feedback::retry_waiting as retry_feedback;

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
use crate::domain::{Channel, EventType, Scope, UserId};
use crate::metrics::Metrics;
use auth::Auth;
use error::{ApiError, BodyLimit};
use routes::inbox::{self, Sessions};
use routes::*;
use spec::{Api, Op};

const EVENTS: Option<Scope> = Some(Scope::EventsWrite);
const CAMPAIGNS: Option<Scope> = Some(Scope::CampaignsWrite);
const LOGS: Option<Scope> = Some(Scope::LogsRead);
const ADMIN: Option<Scope> = Some(Scope::Admin);
const FEEDBACK: Option<Scope> = Some(Scope::FeedbackWrite);
const WEBHOOKS: Option<Scope> = Some(Scope::WebhooksWrite);

/// `/metrics` is open unless `auth.open_metrics` is off.
fn metrics_op(ctx: &Context) -> Op {
    let scope = (!ctx.settings.auth.open_metrics).then_some(Scope::LogsRead);
    Op::new("service", "Prometheus metrics", scope).ok_media(200, "application/openmetrics-text")
}

/// Every route with its scope and documentation (see `spec`), and the spec itself.
///
/// Long on purpose: this is the route table, one entry per route, read top to bottom
/// like the API reference it generates; split up, no single place would list the API.
pub fn routes(ctx: &Context, auth: Arc<Auth>, sessions: Arc<Sessions>) -> (Router<Context>, Value) {
    use routes::{
        dead_letters as dl, deliveries as dv, events as ev, feedback as fb, groups as gr,
        health as he, inbox as ib, keys as ke, notifications as no, schedules as sc, service as se,
        stats as st, suppressions as su, templates as te, unsubscribe as un, users as us,
        webhook_endpoints as we,
    };
    let api = Api::new(auth, sessions)
        .get(
            "/health",
            Op::new("service", "the process is up", None).ok::<he::Health>(200),
            health::health,
        )
        .get(
            "/ready",
            Op::new(
                "service",
                "events can be accepted: MongoDB answers (RabbitMQ is reported, not required)",
                None,
            )
            .ok::<he::Readiness>(200)
            .errors(&[503]),
            health::ready,
        )
        .get("/metrics", metrics_op(ctx), service::metrics)
        .get(
            "/openapi.json",
            Op::new("service", "this document", None).ok::<se::OpenApiDocument>(200),
            service::openapi,
        )
        .get(
            "/docs",
            Op::new("service", "the API reference, readable", None).ok_media(200, "text/html"),
            service::docs,
        )
        .post(
            "/v1/events",
            Op::new(
                "events",
                "accept an event: 202 new, 200 a repeat of its event_id; with `schedule`, \
                 201 a new campaign, 200 a repeat",
                EVENTS,
            )
            .body::<ev::EventBody>()
            .ok::<ev::Accepted>(202)
            .ok::<ev::Accepted>(200)
            .ok::<ev::ScheduleMade>(201)
            .ok::<ev::ScheduleMade>(200),
            events::post_event,
        )
        .get(
            "/v1/notifications/{id}",
            Op::new("events", "one notification and its delivery counts", LOGS)
                .ok::<no::Notification>(200),
            notifications::get_notification,
        )
        .get(
            "/v1/deliveries",
            Op::new(
                "deliveries",
                "the delivery log, newest first, cursor pages",
                LOGS,
            )
            .query::<dv::LogQuery>()
            .ok::<dv::DeliveryPage>(200)
            .errors(&[400]),
            deliveries::list,
        )
        .get(
            "/v1/deliveries/stream",
            Op::new(
                "deliveries",
                "status changes as server-sent events; resume with Last-Event-ID",
                LOGS,
            )
            .query::<dv::StreamQuery>()
            .ok_media(200, "text/event-stream")
            .errors(&[400, 410]),
            deliveries::stream,
        )
        .get(
            "/v1/deliveries/{id}/preview",
            Op::new(
                "deliveries",
                "the message rendered now from the current template and profile",
                LOGS,
            )
            .ok::<dv::DeliveryPreview>(200)
            .errors(&[422]),
            deliveries::preview,
        )
        .get(
            "/v1/deliveries/{id}",
            Op::new("deliveries", "one delivery with every attempt", LOGS)
                .ok::<dv::DeliveryDetail>(200),
            deliveries::get,
        )
        .get(
            "/v1/stats/deliveries",
            Op::new("deliveries", "counts, success rates and send latency", LOGS)
                .query::<st::StatsQuery>()
                .ok::<st::Stats>(200),
            stats::deliveries,
        )
        .get(
            "/v1/queues",
            Op::new(
                "deliveries",
                "jobs waiting per priority lane and in the outbox (null: no answer within 2 s)",
                LOGS,
            )
            .ok::<se::Queues>(200),
            service::queues,
        )
        .get(
            "/v1/dead-letters",
            Op::new("dead letters", "deliveries that failed for good", LOGS)
                .query::<dl::FilterQuery>()
                .ok::<dl::DeadLetterList>(200),
            dead_letters::list,
        )
        .post(
            "/v1/dead-letters/replay",
            Op::new(
                "dead letters",
                "replay every letter matching a filter",
                CAMPAIGNS,
            )
            .body::<dl::ReplayFilter>()
            .ok::<dl::Replayed>(202),
            dead_letters::replay_many,
        )
        .post(
            "/v1/dead-letters/{id}/replay",
            Op::new("dead letters", "replay one dead letter", CAMPAIGNS).ok::<dl::Replayed>(202),
            dead_letters::replay,
        )
        .post(
            "/v1/users/import",
            Op::new(
                "users",
                "bulk upsert from NDJSON or CSV (a header row; `;` between push tokens and tags)",
                CAMPAIGNS,
            )
            .body_media("application/x-ndjson", None)
            .body_media("text/csv", Some(us::CSV_HEADER))
            .ok::<us::ImportReport>(200)
            .errors(&[415]),
            users::import,
        )
        .get(
            "/v1/users/{id}",
            Op::new("users", "one user", CAMPAIGNS).ok::<us::User>(200),
            users::get_user,
        )
        .put(
            "/v1/users/{id}",
            Op::new("users", "create or replace a user", CAMPAIGNS)
                .path::<UserId>("id")
                .body::<us::UserBody>()
                .ok::<us::User>(201)
                .ok::<us::User>(200),
            users::put_user,
        )
        .delete(
            "/v1/users/{id}",
            Op::new("users", "delete a user", CAMPAIGNS).empty(204),
            users::delete_user,
        )
        .get(
            "/v1/groups/{id}",
            Op::new("groups", "one group", CAMPAIGNS).ok::<gr::Group>(200),
            groups::get_group,
        )
        .put(
            "/v1/groups/{id}",
            Op::new("groups", "create or replace a group", CAMPAIGNS)
                .path::<UserId>("id")
                .body::<gr::GroupBody>()
                .ok::<gr::Group>(201)
                .ok::<gr::Group>(200),
            groups::put_group,
        )
        .delete(
            "/v1/groups/{id}",
            Op::new("groups", "delete a group", CAMPAIGNS).empty(204),
            groups::delete_group,
        )
        .get(
            "/v1/schedules",
            Op::new("campaigns", "every schedule", CAMPAIGNS)
                .query::<sc::ListQuery>()
                .ok::<sc::ScheduleList>(200),
            schedules::list,
        )
        .post(
            "/v1/schedules",
            Op::new("campaigns", "create a schedule", CAMPAIGNS)
                .body::<sc::ScheduleBody>()
                .ok::<sc::ScheduleCreated>(201),
            schedules::create,
        )
        .post(
            "/v1/schedules/preview",
            Op::new(
                "campaigns",
                "the next fire times of a cron expression in a zone, before saving",
                CAMPAIGNS,
            )
            .body::<sc::CronPreviewBody>()
            .ok::<sc::Fires>(200),
            schedules::preview,
        )
        .get(
            "/v1/schedules/{id}",
            Op::new("campaigns", "one schedule", CAMPAIGNS).ok::<sc::Schedule>(200),
            schedules::get,
        )
        .patch(
            "/v1/schedules/{id}",
            Op::new("campaigns", "change a schedule", CAMPAIGNS)
                .body::<sc::SchedulePatch>()
                .ok::<sc::Schedule>(200),
            schedules::patch,
        )
        .delete(
            "/v1/schedules/{id}",
            Op::new("campaigns", "delete a schedule", CAMPAIGNS).empty(204),
            schedules::delete,
        )
        .post(
            "/v1/schedules/{id}/pause",
            Op::new("campaigns", "pause", CAMPAIGNS)
                .ok::<sc::Schedule>(200)
                .errors(&[409]),
            schedules::pause,
        )
        .post(
            "/v1/schedules/{id}/resume",
            Op::new("campaigns", "resume", CAMPAIGNS)
                .ok::<sc::Schedule>(200)
                .errors(&[409]),
            schedules::resume,
        )
        .post(
            "/v1/schedules/{id}/trigger",
            Op::new("campaigns", "fire now, once", CAMPAIGNS).ok::<sc::Triggered>(202),
            schedules::trigger,
        )
        .get(
            "/v1/schedules/{id}/runs",
            Op::new("campaigns", "run history with lag", CAMPAIGNS)
                .query::<sc::RunsQuery>()
                .ok::<sc::RunList>(200),
            schedules::runs,
        )
        .get(
            "/v1/schedules/{id}/next",
            Op::new("campaigns", "the next fire times", CAMPAIGNS)
                .query::<sc::NextQuery>()
                .ok::<sc::Fires>(200),
            schedules::next,
        )
        .get(
            "/v1/templates",
            Op::new(
                "templates",
                "every template and where it comes from",
                CAMPAIGNS,
            )
            .ok::<te::TemplateList>(200),
            templates::list,
        )
        .get(
            "/v1/templates/{event_type}/{channel}",
            Op::new(
                "templates",
                "the source of one channel's parts, as deliveries use them",
                CAMPAIGNS,
            )
            .path::<EventType>("event_type")
            .path::<Channel>("channel")
            .query::<te::LocaleQuery>()
            .ok::<te::TemplateSource>(200),
            templates::get,
        )
        .post(
            "/v1/templates/preview",
            Op::new("templates", "render with sample data", CAMPAIGNS)
                .body::<te::PreviewBody>()
                .ok::<te::Preview>(200),
            templates::preview,
        )
        .put(
            "/v1/templates/{event_type}/{channel}",
            Op::new("templates", "store a template override", CAMPAIGNS)
                .path::<EventType>("event_type")
                .path::<Channel>("channel")
                .body::<te::TemplateBody>()
                .ok::<te::TemplateStored>(201)
                .ok::<te::TemplateStored>(200),
            templates::put,
        )
        .delete(
            "/v1/templates/{event_type}/{channel}",
            Op::new("templates", "remove a stored override", CAMPAIGNS)
                .path::<EventType>("event_type")
                .path::<Channel>("channel")
                .query::<te::LocaleQuery>()
                .empty(204),
            templates::delete,
        )
        .post(
            "/v1/feedback/twilio",
            Op::new(
                "feedback",
                "Twilio's message status callback (herald passes it as StatusCallback): \
                 delivered, or undelivered with Twilio's error code",
                None,
            )
            .header(
                "X-Twilio-Signature",
                "Twilio's HMAC-SHA1 of the URL and the parameters, keyed with the account's auth token",
            )
            .body_as::<fb::TwilioStatus>("application/x-www-form-urlencoded")
            .ok::<fb::FeedbackAnswer>(200)
            .ok::<fb::FeedbackAnswer>(202)
            .errors(&[401, 403]),
            feedback::twilio,
        )
        .post(
            "/v1/feedback/ses",
            Op::new(
                "feedback",
                "Amazon SES notifications through SNS (sent as text/plain): subscription \
                 confirmation, bounces, complaints, deliveries; signed by SNS, from the \
                 topics of feedback.ses.topic_arns",
                None,
            )
            .body_as::<crate::channels::sns::SnsMessage>("application/json")
            .ok::<fb::FeedbackAnswer>(200)
            .ok::<fb::FeedbackAnswer>(202)
            .errors(&[403, 502]),
            feedback::ses,
        )
        .post(
            "/v1/feedback/sendgrid",
            Op::new(
                "feedback",
                "SendGrid's signed Event Webhook: a batch of delivered, bounce, dropped, \
                 deferred and spamreport events",
                None,
            )
            .header(
                "X-Twilio-Email-Event-Webhook-Signature",
                "base64 ECDSA P-256 signature of the timestamp header followed by the body",
            )
            .header(
                "X-Twilio-Email-Event-Webhook-Timestamp",
                "the time SendGrid signed the batch",
            )
            .body::<Vec<fb::SendgridEvent>>()
            .ok::<fb::FeedbackAnswer>(200)
            .ok::<fb::FeedbackAnswer>(202)
            .errors(&[401, 403]),
            feedback::sendgrid,
        )
        .post(
            "/v1/feedback/dsn",
            Op::new(
                "feedback",
                "a delivery status notification (RFC 3464), whole, from an MTA's bounce pipe",
                FEEDBACK,
            )
            .body_media("message/rfc822", None)
            .ok::<fb::FeedbackAnswer>(200)
            .ok::<fb::FeedbackAnswer>(202),
            feedback::dsn,
        )
        .get(
            "/v1/feedback",
            Op::new(
                "feedback",
                "feedback events: one delivery's, or those that matched no delivery",
                LOGS,
            )
            .query::<fb::FeedbackQuery>()
            .ok::<fb::FeedbackList>(200),
            feedback::list,
        )
        .get(
            "/v1/suppressions",
            Op::new(
                "suppressions",
                "addresses herald no longer sends to, and why",
                LOGS,
            )
            .query::<su::SuppressionQuery>()
            .ok::<su::SuppressionPage>(200)
            .errors(&[400]),
            suppressions::list,
        )
        .put(
            "/v1/suppressions/{channel}/{address}",
            Op::new("suppressions", "suppress an address by hand", CAMPAIGNS)
                .path::<Channel>("channel")
                .body::<su::SuppressionBody>()
                .ok::<su::Suppression>(201)
                .ok::<su::Suppression>(200),
            suppressions::put,
        )
        .delete(
            "/v1/suppressions/{channel}/{address}",
            Op::new(
                "suppressions",
                "lift a suppression: herald sends there again",
                CAMPAIGNS,
            )
            .path::<Channel>("channel")
            .empty(204),
            suppressions::delete,
        )
        .get(
            "/u/{token}",
            Op::new(
                "unsubscribe",
                "the page of a marketing email's unsubscribe link (changes nothing)",
                None,
            )
            .ok_media(200, "text/html"),
            unsubscribe::show,
        )
        .post(
            "/u/{token}",
            Op::new(
                "unsubscribe",
                "one-click unsubscribe (RFC 8058): records the opt-out the link names",
                None,
            )
            .body_as::<un::OneClick>("application/x-www-form-urlencoded")
            .body_as::<un::OneClick>("multipart/form-data")
            .ok_media(200, "text/html")
            .errors(&[400]),
            unsubscribe::confirm,
        )
        .get(
            "/v1/keys",
            Op::new("keys", "every API key (never the secret)", ADMIN).ok::<ke::KeyList>(200),
            keys::list,
        )
        .post(
            "/v1/keys",
            Op::new(
                "keys",
                "create a key; the answer is the only time it is shown",
                ADMIN,
            )
            .body::<ke::NewKey>()
            .ok::<ke::Key>(201),
            keys::create,
        )
        .delete(
            "/v1/keys/{id}",
            Op::new("keys", "revoke a key", ADMIN).empty(204),
            keys::revoke,
        )
        .post(
            "/v1/webhook-endpoints",
            Op::new(
                "webhooks",
                "add an endpoint for delivery status events (Standard Webhooks); the answer \
                 is the only time its secret is shown",
                WEBHOOKS,
            )
            .body::<we::NewEndpoint>()
            .ok::<we::Endpoint>(201),
            webhook_endpoints::create,
        )
        .get(
            "/v1/webhook-endpoints",
            Op::new("webhooks", "every endpoint (never a secret)", WEBHOOKS)
                .ok::<we::EndpointList>(200),
            webhook_endpoints::list,
        )
        .get(
            "/v1/webhook-endpoints/{id}",
            Op::new("webhooks", "one endpoint", WEBHOOKS).ok::<we::Endpoint>(200),
            webhook_endpoints::get,
        )
        .patch(
            "/v1/webhook-endpoints/{id}",
            Op::new(
                "webhooks",
                "change an endpoint; enabling it clears why herald disabled it",
                WEBHOOKS,
            )
            .body::<we::EndpointChange>()
            .ok::<we::Endpoint>(200),
            webhook_endpoints::patch,
        )
        .delete(
            "/v1/webhook-endpoints/{id}",
            Op::new("webhooks", "remove an endpoint", WEBHOOKS).empty(204),
            webhook_endpoints::delete,
        )
        .post(
            "/v1/webhook-endpoints/{id}/rotate-secret",
            Op::new(
                "webhooks",
                "a new secret, shown once; the previous one signs beside it for 24 hours",
                WEBHOOKS,
            )
            .ok::<we::Endpoint>(200),
            webhook_endpoints::rotate,
        )
        .get(
            "/v1/webhook-endpoints/{id}/messages",
            Op::new(
                "webhooks",
                "its messages (one per event), newest first",
                WEBHOOKS,
            )
            .query::<we::MessageQuery>()
            .ok::<we::WebhookMessagePage>(200)
            .errors(&[400]),
            webhook_endpoints::messages,
        )
        .get(
            "/v1/webhook-endpoints/{id}/attempts",
            Op::new(
                "webhooks",
                "its tries (time, status code, duration, error), newest first",
                WEBHOOKS,
            )
            .query::<we::PageQuery>()
            .ok::<we::WebhookAttemptPage>(200)
            .errors(&[400]),
            webhook_endpoints::attempts,
        )
        .post(
            "/v1/webhook-endpoints/{id}/replay",
            Op::new(
                "webhooks",
                "send again its messages of a time range that were not delivered (or all), \
                 each with its own webhook-id",
                WEBHOOKS,
            )
            .body::<we::ReplayBody>()
            .ok::<we::WebhooksReplayed>(202)
            .errors(&[409]),
            webhook_endpoints::replay,
        )
        .post(
            "/v1/webhook-messages/{id}/retry",
            Op::new(
                "webhooks",
                "send one message again, from a fresh retry schedule",
                WEBHOOKS,
            )
            .ok::<we::WebhookMessage>(202)
            .errors(&[409]),
            webhook_endpoints::retry,
        )
        .post(
            "/v1/inbox/session",
            Op::new(
                "inbox",
                "an end user's inbox session: trade the user hash your server computed for a \
                 short-lived token naming only that user",
                None,
            )
            .body::<ib::SessionBody>()
            .ok::<ib::Session>(200)
            .errors(&[401]),
            inbox::start_session,
        )
        .get(
            "/v1/inbox/notifications",
            Op::new("inbox", "the user's items, newest first, cursor pages", None)
                .session()
                .query::<ib::ListQuery>()
                .ok::<ib::ItemPage>(200),
            inbox::list,
        )
        .get(
            "/v1/inbox/counts",
            Op::new("inbox", "unread, unseen and total, from the items themselves", None)
                .session()
                .ok::<ib::Counts>(200),
            inbox::counts,
        )
        .post(
            "/v1/inbox/notifications/{id}/{action}",
            Op::new(
                "inbox",
                "mark one item read or unread, archive or unarchive it",
                None,
            )
            .session()
            .path::<ib::ItemActionName>("action")
            .ok::<ib::Item>(200),
            inbox::act,
        )
        .post(
            "/v1/inbox/seen",
            Op::new("inbox", "mark every item seen", None)
                .session()
                .ok::<ib::Marked>(200),
            inbox::seen_all,
        )
        .post(
            "/v1/inbox/read",
            Op::new("inbox", "mark every item (of one event type) read", None)
                .session()
                .query::<ib::ReadAllQuery>()
                .ok::<ib::Marked>(200),
            inbox::read_all,
        )
        .get(
            "/v1/inbox/preferences",
            Op::new("inbox", "the user's own channel opt-outs and mutes", None)
                .session()
                .ok::<ib::PreferencesBody>(200),
            inbox::get_preferences,
        )
        .put(
            "/v1/inbox/preferences",
            Op::new(
                "inbox",
                "replace the user's preferences (the worker applies them to every channel)",
                None,
            )
            .session()
            .body::<ib::PreferencesBody>()
            .ok::<ib::PreferencesBody>(200),
            inbox::put_preferences,
        )
        .get(
            "/v1/inbox/ws",
            Op::new(
                "inbox",
                "a WebSocket: `notification_received` and `counts_changed` messages, pings; \
                 `after` resumes after the last item seen",
                None,
            )
            .query::<ib::SocketQuery>()
            .empty(101)
            .errors(&[401, 403, 426]),
            inbox::socket,
        )
        .get(
            "/inbox.js",
            Op::new("inbox", "the inbox widget: Herald.inbox({...})", None)
                .ok_media(200, "text/javascript"),
            inbox::widget,
        );
    let api = if ctx.settings.inbox.demo {
        api.get(
            "/inbox/demo",
            Op::new(
                "inbox",
                "the widget for the demo user (development only)",
                None,
            )
            .ok_media(200, "text/html"),
            inbox::demo,
        )
    } else {
        api
    };
    api.finish()
}

/// How long open inbox sockets get to close at shutdown.
const SOCKETS_CLOSE: std::time::Duration = std::time::Duration::from_secs(10);

/// Times every request under its route pattern (unmatched ones as `unmatched`).
async fn observe(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    metrics.http(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Every route, with its state; `hub` carries inbox changes to this process's sockets,
/// which close when `sockets.cancel` fires.
pub fn router(ctx: Context, hub: inbox::hub::Hub, sockets: inbox::SocketShutdown) -> Router {
    let limit = ctx.settings.server.body_limit_bytes;
    let auth = Arc::new(Auth::new(ctx.store.clone(), ctx.settings.auth.clone()));
    let sessions = Arc::new(Sessions::new(&ctx.settings.inbox));
    let (routes, spec) = routes(&ctx, auth.clone(), sessions.clone());
    routes
        .merge(console::routes(auth.clone()))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        // Inside `observe`, so a panicking handler is counted as the 500 it answers.
        .layer(CatchPanicLayer::custom(error::panicked))
        .layer(from_fn_with_state(ctx.metrics.clone(), observe))
        // Bodies are read (and bounded) by our extractors so every refusal has our shape.
        .layer(DefaultBodyLimit::disable())
        .layer(Extension(BodyLimit(limit)))
        .layer(Extension(auth))
        .layer(Extension(service::Spec(Arc::new(spec))))
        .layer(Extension(sessions))
        .layer(Extension(hub))
        .layer(Extension(sockets))
        .layer(inbox::cors(&ctx.settings.inbox))
        // The path alone: a query may carry a secret (the inbox socket's `token`).
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
        }))
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
    let sessions = Arc::new(Sessions::new(&ctx.settings.inbox));
    let health_op = || Op::new("service", "the process is up", None).ok::<health::Health>(200);
    let api = Api::new(auth, sessions)
        .get("/metrics", metrics_op(&ctx), service::metrics)
        .get("/health", health_op(), health::health);
    let api = match role {
        ProbeRole::Worker => api.get(
            "/ready",
            Op::new("service", "MongoDB and RabbitMQ answer", None)
                .ok::<health::Readiness>(200)
                .errors(&[503]),
            health::worker_ready,
        ),
        ProbeRole::Scheduler => api.get(
            "/ready",
            Op::new("service", "MongoDB answers", None)
                .ok::<health::Readiness>(200)
                .errors(&[503]),
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
    let hub = inbox::hub::Hub::new(&ctx.metrics);
    let follow = hub.clone().run(ctx.store.clone(), cancel.clone());
    let sockets = inbox::SocketShutdown {
        cancel: cancel.clone(),
        sockets: tokio_util::task::TaskTracker::new(),
    };
    let app = router(ctx, hub, sockets.clone());
    let server = async {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await?;
        // Upgraded sockets are not the server's connections any more: they close on
        // the same signal, and are waited for here.
        sockets.sockets.close();
        if tokio::time::timeout(SOCKETS_CLOSE, sockets.sockets.wait())
            .await
            .is_err()
        {
            tracing::warn!("inbox sockets still open at shutdown; dropping them");
        }
        anyhow::Ok(())
    };
    tokio::try_join!(server, follow)?;
    Ok(())
}
