//! `/healthz` (the process is alive) and `/readyz` (every dependency answers).

use crate::error::{HttpError, DEPENDENCY_RETRY_AFTER_S};
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use tollgate_core::{ApiError, ErrorCode};

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive.", example = json!({"status": "ok"}))),
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: every dependency answers; a 503 names the one that does not.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve.", example = json!({"status": "ready", "checks": {"store": {"status": "ok", "backend": "sqlite"}}})),
        (status = 503, response = crate::openapi::Status503),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, HttpError> {
    match state.store.ping().await {
        Ok(()) => Ok(Json(json!({
            "status": "ready",
            "checks": { "store": { "status": "ok", "backend": state.store.backend() } },
        }))),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed: store");
            Err(ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "Not ready: the store ({}) does not answer.",
                    state.store.backend()
                ),
            )
            .with_detail("dependency", "store")
            .with_retry_after(DEPENDENCY_RETRY_AFTER_S)
            .into())
        }
    }
}
