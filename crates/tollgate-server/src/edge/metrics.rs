//! Request metrics: every response counted by route, status and error code, and timed to its
//! last byte. The registry is [`crate::telemetry::Metrics`].

use crate::http::headers::TOLLGATE_ERROR;
use crate::state::AppState;
use crate::telemetry::{Metrics, RequestLabels, RouteLabel};
use axum::http::HeaderMap;
use axum::response::Response;
use std::time::Instant;

/// A request being timed, from before any other work.
pub struct Timer {
    started: Instant,
    route: String,
}

impl Timer {
    pub fn start(state: &AppState, path: &str) -> Timer {
        Timer {
            started: Instant::now(),
            route: route_of(state, path),
        }
    }

    /// How long the request has taken so far.
    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Counts the response; [`Timer::observe`] times it when its body ends.
    pub fn count(&self, metrics: &Metrics, response: &Response) {
        metrics
            .requests
            .get_or_create(&RequestLabels {
                route: self.route.clone(),
                status: response.status().as_u16(),
                code: error_code(response.headers()),
            })
            .inc();
    }

    /// Records the time from the request's start to its response's last byte.
    pub fn observe(self, metrics: &Metrics) {
        metrics
            .duration
            .get_or_create(&RouteLabel { route: self.route })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// The route label of a path.
fn route_of(state: &AppState, path: &str) -> String {
    match path {
        "/healthz" | "/readyz" => "health".into(),
        "/metrics" => "metrics".into(),
        _ if path == "/console" || path.starts_with("/console/") => "console".into(),
        _ if path.starts_with(&state.config.api_prefix) => "management".into(),
        _ => state
            .routes
            .resolve(path)
            .map_or_else(|| "unrouted".into(), |r| r.config.prefix.clone()),
    }
}

fn error_code(headers: &HeaderMap) -> String {
    headers
        .get(TOLLGATE_ERROR)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
