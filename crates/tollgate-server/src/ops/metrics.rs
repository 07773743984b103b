//! `/metrics`: the registry as OpenMetrics text, with the gauges that mirror state read now.

use crate::http::error::HttpError;
use crate::http::headers::presented_secret;
use crate::state::AppState;
use crate::telemetry::Gauges;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tollgate_core::key::secret_matches;
use tollgate_core::ErrorCode;

/// Prometheus metrics (OpenMetrics text). Needs the admin token when one is configured.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Every metric, in the OpenMetrics text format.", content_type = "application/openmetrics-text"),
        (status = 401, response = crate::management::openapi::Status401),
    ),
    security(("admin_token" = [])),
)]
pub async fn handler(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(admin) = &state.config.admin_token {
        let presented = presented_secret(&headers).unwrap_or_default();
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
        state.metrics.render(Gauges {
            holds_open: state.ledger.pending_holds(),
            key_cache_entries: state.keys.len(),
            shedding: state
                .shedder
                .as_ref()
                .map(|shedder| (shedder.in_flight(), shedder.limit())),
        }),
    )
        .into_response()
}
