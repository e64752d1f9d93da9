//! Prometheus metrics: one registry per process, fed by the roles, rendered at `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub channel: String,
    pub status: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeedbackLabels {
    pub provider: String,
    pub kind: String,
    /// `applied`, `duplicate`, `unmatched` or `pending` when received; `applied_late`
    /// when a waiting event is applied afterwards.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub channel: String,
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route pattern (`/v1/deliveries/{id}`), never the raw path.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric herald exports.
pub struct Metrics {
    registry: Registry,
    pub deliveries: Family<DeliveryLabels, Counter>,
    pub feedback: Family<FeedbackLabels, Counter>,
    pub attempt_seconds: HistogramFamily<AttemptLabels>,
    pub events_accepted: Family<SourceLabels, Counter>,
    pub http_seconds: HistogramFamily<HttpLabels>,
    pub scheduler_lag_seconds: Histogram,
    /// Refreshed from RabbitMQ when scraped.
    pub queue_depth: Family<LaneLabels, Gauge>,
    /// Refreshed from MongoDB when scraped.
    pub outbox_backlog: Gauge,
    /// Inbox sockets open on this process, and whether its inbox change stream is open.
    pub inbox_sockets: Gauge,
    pub inbox_following: Gauge,
    /// Status webhook tries by result (`delivered`, `retrying`, `failed`).
    pub status_webhooks: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald");
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Delivery outcomes committed by this process (and the statuses provider feedback moved deliveries to), by channel, status and provider",
            deliveries.clone(),
        );
        let feedback = Family::<FeedbackLabels, Counter>::default();
        registry.register(
            "feedback_events",
            "Provider feedback events received, by provider, kind and result",
            feedback.clone(),
        );
        let attempt_seconds = HistogramFamily::<AttemptLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "attempt_duration_seconds",
            "Time of one provider call",
            attempt_seconds.clone(),
        );
        let events_accepted = Family::<SourceLabels, Counter>::default();
        registry.register(
            "events_accepted",
            "Events accepted (durably written), by source",
            events_accepted.clone(),
        );
        let http_seconds = HistogramFamily::<HttpLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "API request durations by route and status",
            http_seconds.clone(),
        );
        let scheduler_lag_seconds = latency_histogram();
        registry.register(
            "scheduler_lag_seconds",
            "How late schedule slots were claimed after their fire time",
            scheduler_lag_seconds.clone(),
        );
        let queue_depth = Family::<LaneLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Ready messages per priority lane in RabbitMQ",
            queue_depth.clone(),
        );
        let outbox_backlog = Gauge::default();
        registry.register(
            "outbox_backlog",
            "Outbox entries waiting to be published to RabbitMQ",
            outbox_backlog.clone(),
        );
        let inbox_sockets = Gauge::default();
        registry.register(
            "inbox_sockets",
            "Inbox WebSockets open on this process",
            inbox_sockets.clone(),
        );
        let inbox_following = Gauge::default();
        registry.register(
            "inbox_following",
            "1 while this process follows inbox changes (its change stream is open); sockets get no live changes while 0",
            inbox_following.clone(),
        );
        let status_webhooks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "status_webhook_attempts",
            "Tries of status webhook messages by this process, by result (delivered, retrying, failed)",
            status_webhooks.clone(),
        );
        Self {
            registry,
            status_webhooks,
            inbox_sockets,
            inbox_following,
            deliveries,
            feedback,
            attempt_seconds,
            events_accepted,
            http_seconds,
            scheduler_lag_seconds,
            queue_depth,
            outbox_backlog,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition (Prometheus reads it).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    pub fn delivery(&self, channel: &str, status: &str, provider: Option<&str>) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                channel: channel.to_owned(),
                status: status.to_owned(),
                provider: provider.unwrap_or_default().to_owned(),
            })
            .inc();
    }

    pub fn feedback(&self, provider: &str, kind: &str, result: &str) {
        self.feedback
            .get_or_create(&FeedbackLabels {
                provider: provider.to_owned(),
                kind: kind.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn attempt(&self, channel: &str, provider: &str, took: Duration) {
        self.attempt_seconds
            .get_or_create(&AttemptLabels {
                channel: channel.to_owned(),
                provider: provider.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn accepted(&self, source: &str) {
        self.events_accepted
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .inc();
    }

    pub fn http(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.http_seconds
            .get_or_create(&HttpLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_series() {
        let m = Metrics::default();
        m.delivery("email", "sent", Some("smtp"));
        m.http("GET", "/v1/deliveries/{id}", 200, Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains(
            r#"herald_deliveries_total{channel="email",status="sent",provider="smtp"} 1"#
        ));
        assert!(text.contains(r#"route="/v1/deliveries/{id}""#));
        assert!(text.contains("herald_http_request_duration_seconds_bucket"));
    }
}
