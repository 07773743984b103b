//! The metrics layer: counts every response by route, status and error code, and times it to its
//! last byte. The registry is [`crate::telemetry::Metrics`].

use crate::http::body::OnEnd;
use crate::http::headers::TOLLGATE_ERROR;
use crate::state::AppState;
use crate::telemetry::{RequestLabels, RouteLabel};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;

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
        Body::new(OnEnd::new(inner, move || {
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
