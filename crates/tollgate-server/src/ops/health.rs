//! `/` (where to start), `/healthz` (the process is alive) and `/readyz` (every dependency
//! answers).

use crate::http::error::{HttpError, DEPENDENCY_RETRY_AFTER_S};
use crate::state::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use tollgate_core::{ApiError, ErrorCode};

/// Where to start: what this server is and where its docs are, for someone who opens the bare
/// address.
#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    responses((status = 200, description = "What this server is and where to read about it.", example = json!({"service": "tollgate", "version": "0.1.0", "docs": "/api/docs", "openapi": "/api/openapi.json", "api": "/api/v1", "console": "/console/", "health": "/healthz", "ready": "/readyz"}))),
)]
pub async fn root(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "service": "tollgate",
        "version": env!("CARGO_PKG_VERSION"),
        "docs": "/api/docs",
        "openapi": "/api/openapi.json",
        "api": state.config.api_prefix,
        "console": "/console/",
        "health": "/healthz",
        "ready": "/readyz",
    }))
}

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

/// Readiness: the store and the rate limiter are checked side by side. A store that does not
/// answer makes the node unready. A shared limiter (Redis) that does not answer makes it unready
/// only if some policy refuses calls without it (`on_limiter_failure = "closed"`); otherwise the
/// node still serves, admitting undecided calls, and says `degraded` with a 200, so a load
/// balancer does not take every node out at once for an outage they all share.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve (`degraded`: the shared limiter does not answer and every policy fails open).", example = json!({"status": "ready", "checks": {"store": {"status": "ok", "backend": "sqlite"}, "rate_limiter": {"status": "ok", "backend": "local"}}})),
        (status = 503, response = crate::management::openapi::Status503),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, HttpError> {
    let (store, limiter) = tokio::join!(state.store.ping(), state.limiter.ping());
    let store_backend = state.store.backend();
    let limiter_backend = state.limiter.backend();
    if let Err(e) = store {
        tracing::warn!(error = %e, "readiness check failed: store");
        return Err(not_ready(
            "store",
            format!("Not ready: the store ({store_backend}) does not answer."),
        ));
    }
    if !state.ledger.writer_running() {
        return Err(not_ready(
            "ledger_writer",
            "Not ready: the ledger writer has stopped, so nothing paid can be recorded. Restart the node.".into(),
        ));
    }
    let (status, limiter_check) = match limiter {
        Ok(()) => (
            "ready",
            json!({ "status": "ok", "backend": limiter_backend }),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed: rate limiter");
            if let Some(policy) = state.config.policy_failing_closed() {
                return Err(not_ready(
                    "rate_limiter",
                    format!(
                        "Not ready: the rate limiter ({limiter_backend}) does not answer, and \
                         policy '{}' refuses calls without it.",
                        policy.name
                    ),
                ));
            }
            let check = json!({ "status": "unavailable", "backend": limiter_backend,
                                "error": e.to_string() });
            ("degraded", check)
        }
    };
    Ok(Json(json!({
        "status": status,
        "checks": {
            "store": { "status": "ok", "backend": store_backend },
            "rate_limiter": limiter_check,
        },
    })))
}

fn not_ready(dependency: &'static str, message: String) -> HttpError {
    ApiError::new(ErrorCode::ServiceUnavailable, message)
        .with_detail("dependency", dependency)
        .with_retry_after(DEPENDENCY_RETRY_AFTER_S)
        .into()
}
