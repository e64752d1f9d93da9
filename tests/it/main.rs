//! herald's integration tests: each test runs herald against real MongoDB, RabbitMQ and SMTP.

mod helpers;

mod access;
mod api_document;
mod chunks;
mod cluster;
mod console;
mod deliverability;
mod delivery;
mod enrichment;
mod events;
mod failures;
mod feedback;
mod inbox;
mod intake;
mod logs;
mod marketing;
mod outages;
mod policy;
mod provider_feedback;
mod providers;
mod push;
mod recipients;
mod schedules;
mod status_webhooks;
mod webhooks;
