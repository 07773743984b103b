//! Prometheus metrics at `/metrics` (OpenMetrics text), for the operator's scraper.
//!
//! Labels are bounded by the config, never by traffic: a route is its configured prefix (or
//! `management`, `health`, `metrics`, `unrouted`), a policy its configured name, an error its
//! catalogue code. Gauges that mirror state (holds open, key cache size, the shed limit) are
//! read when scraped. `/metrics` needs the admin token when one is configured (Prometheus:
//! `authorization: {credentials: ...}` in the scrape config).

use crate::auth::KeyCache;
use crate::edge::TOLLGATE_ERROR;
use crate::error::HttpError;
use crate::ledger::Ledger;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::{Duration, Instant};
use tollgate_core::key::secret_matches;
use tollgate_core::ErrorCode;

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
    /// Registers Tollgate's own metrics and those the ledger writer and the key cache keep.
    pub fn new(ledger: &Ledger, keys: &KeyCache) -> Metrics {
        let mut registry = Registry::with_prefix("tollgate");
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
        registry.register(
            "key_cache_hits",
            "API key lookups answered from memory",
            keys.hits.clone(),
        );
        registry.register(
            "key_cache_misses",
            "API key lookups that read the store",
            keys.misses.clone(),
        );
        registry.register(
            "ledger_batch_size",
            "Ledger writes committed per transaction",
            ledger.batch_size.clone(),
        );
        registry.register(
            "ledger_write_lag_seconds",
            "Time from a ledger write being queued to its commit",
            ledger.write_lag.clone(),
        );
        registry.register(
            "over_hold_calls",
            "Calls whose usage cost more than their hold (the charge is capped at the hold)",
            ledger.over_hold_calls.clone(),
        );
        registry.register(
            "uncovered_nanos",
            "What calls' usage cost beyond their holds, in nano-units: not charged",
            ledger.uncovered_nanos.clone(),
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
    pub fn render(&self, state: &AppState) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.holds_open.set(gauge(state.ledger.pending_holds()));
        self.key_cache_entries.set(gauge(state.keys.len()));
        if let Some(shedder) = &state.shedder {
            self.in_flight.set(i64::from(shedder.in_flight()));
            self.concurrency_limit.set(i64::from(shedder.limit()));
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "cannot render metrics");
        }
        text
    }
}

/// The route label of a path.
fn route_of(state: &AppState, path: &str) -> String {
    match path {
        "/healthz" | "/readyz" => "health".into(),
        "/metrics" => "metrics".into(),
        _ if path.starts_with(&state.config.api_prefix) => "management".into(),
        _ => state
            .routes
            .resolve(path)
            .map_or_else(|| "unrouted".into(), |r| r.config.prefix.clone()),
    }
}

/// Outermost but for the request ID: counts every response, shed ones included, and times it to
/// its last byte.
pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = route_of(&state, request.uri().path());
    let response = next.run(request).await;
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route.clone(),
            status: response.status().as_u16(),
            code: error_code(response.headers()),
        })
        .inc();
    let metrics = state.metrics.clone();
    response.map(|inner| {
        Body::new(crate::edge::OnEnd::new(inner, move || {
            metrics
                .duration
                .get_or_create(&RouteLabel { route })
                .observe(started.elapsed().as_secs_f64());
        }))
    })
}

fn error_code(headers: &HeaderMap) -> String {
    headers
        .get(TOLLGATE_ERROR)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Prometheus metrics (OpenMetrics text). Needs the admin token when one is configured.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Every metric, in the OpenMetrics text format.", content_type = "application/openmetrics-text"),
        (status = 401, response = crate::openapi::Status401),
    ),
    security(("admin_token" = [])),
)]
pub async fn handler(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(admin) = &state.config.admin_token {
        let presented = crate::auth::presented_secret(&headers).unwrap_or_default();
        if !secret_matches(presented, &admin.0) {
            return HttpError::new(
                ErrorCode::InvalidApiKey,
                "The metrics need the admin token: 'Authorization: Bearer <admin token>'.",
            )
            .into_response();
        }
    }
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state),
    )
        .into_response()
}
