//! The Prometheus registry and Tollgate's own metrics, served at `/metrics` (OpenMetrics text) by
//! `ops::metrics` for the operator's scraper. A leaf: it knows no service and no handler; the
//! services register their own counters in the registry it is built from.
//!
//! Labels are bounded by the config, never by traffic: a route is its configured prefix (or
//! `management`, `health`, `metrics`, `unrouted`), a policy its configured name, an error its
//! catalogue code. Gauges that mirror state (holds open, key cache size, the shed limit) are
//! read when scraped. `/metrics` needs the admin token when one is configured (Prometheus:
//! `authorization: {credentials: ...}` in the scrape config).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// What the gauges that mirror state read at a scrape.
pub struct Gauges {
    pub holds_open: usize,
    pub key_cache_entries: usize,
    /// In flight and the concurrency limit, when load shedding is on.
    pub shedding: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
    /// The Tollgate error code, or empty for a response Tollgate did not refuse.
    pub code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric Tollgate keeps, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily<RouteLabel>,
    pub upstream_duration: HistogramFamily<RouteLabel>,
    pub rate_limited: Family<PolicyLabel, Counter>,
    pub shed: Counter,
    limiter_failures: Family<OutcomeLabel, Counter>,
    holds_open: Gauge,
    key_cache_entries: Gauge,
    in_flight: Gauge,
    concurrency_limit: Gauge,
}

/// Latency buckets: 1 ms to about 65 s.
pub fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    /// Registers Tollgate's own metrics in `registry`, which holds those the services keep
    /// (the key cache's, the ledger writer's), registered by each beside its counters.
    pub fn new(mut registry: Registry) -> Metrics {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily<RouteLabel> = Family::new_with_constructor(latency);
        let upstream_duration: HistogramFamily<RouteLabel> = Family::new_with_constructor(latency);
        let rate_limited = Family::<PolicyLabel, Counter>::default();
        let shed = Counter::default();
        let limiter_failures = Family::<OutcomeLabel, Counter>::default();
        let (holds_open, key_cache_entries, in_flight, concurrency_limit) = Default::default();
        registry.register(
            "requests",
            "Responses by route, status and Tollgate error code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response's last byte",
            duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding a request to the upstream's response head",
            upstream_duration.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate-limit policy",
            rate_limited.clone(),
        );
        registry.register("shed", "Requests shed with 429 overloaded", shed.clone());
        registry.register(
            "rate_limiter_failures",
            "Requests the shared rate limiter could not decide, by what became of them",
            limiter_failures.clone(),
        );
        registry.register("holds_open", "Holds pending", Gauge::clone(&holds_open));
        registry.register(
            "key_cache_entries",
            "Secrets in the key cache",
            Gauge::clone(&key_cache_entries),
        );
        registry.register(
            "in_flight",
            "Requests being served (load shedding's count)",
            Gauge::clone(&in_flight),
        );
        registry.register(
            "concurrency_limit",
            "The adaptive concurrency limit",
            Gauge::clone(&concurrency_limit),
        );
        Metrics {
            registry,
            requests,
            duration,
            upstream_duration,
            rate_limited,
            shed,
            limiter_failures,
            holds_open,
            key_cache_entries,
            in_flight,
            concurrency_limit,
        }
    }

    /// A request the limiter could not decide: admitted (its policies fail open) or refused.
    pub fn limiter_failure(&self, admitted: bool) {
        let outcome = if admitted { "admitted" } else { "refused" };
        self.limiter_failures
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn rate_limited(&self, policy: &str) {
        self.rate_limited
            .get_or_create(&PolicyLabel {
                policy: policy.to_string(),
            })
            .inc();
    }

    pub fn upstream(&self, route: &str, took: Duration) {
        self.upstream_duration
            .get_or_create(&RouteLabel {
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// The metrics as OpenMetrics text, with the state gauges read now.
    pub fn render(&self, gauges: Gauges) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.holds_open.set(gauge(gauges.holds_open));
        self.key_cache_entries.set(gauge(gauges.key_cache_entries));
        if let Some((in_flight, limit)) = gauges.shedding {
            self.in_flight.set(i64::from(in_flight));
            self.concurrency_limit.set(i64::from(limit));
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "cannot render metrics");
        }
        text
    }
}
