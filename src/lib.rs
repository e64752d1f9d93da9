//! herald: a notification delivery service — a worker pool with a scheduler.
//!
//! # Layout
//! - `cli`        — the command line: a subcommand per role.
//! - `config`     — typed settings: embedded defaults -> `config/<env>.toml` -> `HERALD__*`.
//! - `telemetry`  — logging setup.
//! - `metrics`    — the Prometheus registry every role feeds.
//! - `shutdown`   — signals -> cancellation; draining with a deadline.
//! - `app`        — the `Context` of clients every role shares.
//! - `roles`      — `api`, `worker`, `scheduler`, `all` as library functions.
//! - `domain`     — ids, channels, priorities, statuses; event parsing.
//! - `ingest`     — accepting an event (REST and AMQP share it).
//! - `store`      — MongoDB: collections, indexes, transactions (the only module naming collections).
//! - `queue`      — RabbitMQ: topology, confirming publisher, consumers (the only module knowing AMQP).
//! - `outbox`     — the relay from the outbox collection to RabbitMQ.
//! - `worker`     — fan-out, delivery, and the batching outcome committer.
//! - `channels`   — providers per channel (SMTP/file email, recorded SMS/push).
//! - `templates`  — Handlebars templates, compiled once.
//! - `api`        — axum routes and the error shape (the only layer knowing HTTP).
//! - `console`    — the web console at `/ui`: sign-in and embedded pages over the API.
//! - `scheduler`  — cron campaigns: fire times with DST rules, misfire plans, the claiming tick.
//! - `seed`       — demo data.
//! - `supervise`  — spawned tasks whose panics and early ends stop the role, never pass silently.

pub mod api;
pub mod app;
pub mod batch;
pub mod channels;
pub mod cli;
pub mod config;
pub mod domain;
pub mod enrich;
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
