//! herald: a notification delivery service — a worker pool with a scheduler.
//!
//! # Layout (bottom-up layers; `tests/layering.rs` keeps imports running down them)
//! - `domain`     — ids, channels, priorities, statuses, rates; event parsing, cron, misfire plans, preferences.
//! - `metrics`    — the Prometheus registry every role feeds.
//! - `shutdown`   — signals -> cancellation; draining with a deadline.
//! - `supervise`  — spawned tasks whose panics and early ends stop the role, never pass silently.
//! - `config`     — typed settings: embedded defaults -> `config/<env>.toml` -> `HERALD__*`.
//! - `cli`        — the command line: a subcommand per role and operator command.
//! - `telemetry`  — logging setup.
//! - `templates`  — Handlebars templates, compiled once.
//! - `store`      — MongoDB: collections, indexes, transactions (the only module naming collections).
//! - `queue`      — RabbitMQ: topology, confirming publisher, consumers (the only module knowing AMQP).
//! - `channels`   — providers per channel (SMTP/file email, Twilio, FCM, webhooks, recorded SMS/push).
//! - `enrich`     — external profile and content services behind the local collections.
//! - `batch`      — micro-batching: requests arriving during a round trip share the next.
//! - `outbox`     — the `Relay`: from the outbox collection to RabbitMQ.
//! - `seed`       — demo data.
//! - `ingest`     — the `Intake`: accepting an event (REST and AMQP share it); schedule definitions.
//! - `scheduler`  — the `Scheduler`: the tick that claims due campaign slots exactly once.
//! - `worker`     — the `Worker`: fan-out, delivery, and the batching outcome committer.
//! - `app`        — startup: builds every client and handle once (`Context`).
//! - `api`        — axum routes, the error shape and the console at `/ui` (the only layer knowing HTTP).
//! - `roles`      — `api`, `worker`, `scheduler`, `all` as library functions.

pub mod api;
pub mod app;
pub mod batch;
pub mod channels;
pub mod cli;
pub mod config;
pub mod domain;
pub mod enrich;
pub mod hooks;
pub mod ingest;
pub mod metrics;
pub mod outbox;
pub mod queue;
pub mod roles;
pub mod scheduler;
pub mod seed;
pub mod shutdown;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod templates;
pub mod worker;
