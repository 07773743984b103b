//! Load shedding: a request over the node's adaptive concurrency limit is answered 429
//! `overloaded` before any other work. The limit and the tenants are [`crate::access::shed`].

use crate::access::shed::{Permit, Tenant};
use crate::http::headers::{presented_secret, TOLLGATE_ERROR};
use crate::http::render::error_response;
use crate::state::AppState;
use axum::extract::Request;
use axum::response::Response;
use tollgate_core::{ApiError, ApiKey, ErrorCode, RequestId};

/// What shedding decided for a request.
pub enum Admission {
    /// Not subject to shedding: no shedder, or a health check or the metrics scrape (a load
    /// balancer must still see the node alive, and its operator see why).
    Exempt,
    /// Admitted; in flight until its response's last byte.
    Admitted(Permit),
    /// Over the limit: this answer, before any other work.
    Shed(Response),
}

pub fn admit(state: &AppState, id: RequestId, request: &Request) -> Admission {
    let Some(shedder) = &state.shedder else {
        return Admission::Exempt;
    };
    if matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return Admission::Exempt;
    }
    match shedder.try_admit(tenant_of(state, request)) {
        Some(permit) => Admission::Admitted(permit),
        None => {
            state.metrics.shed.inc();
            Admission::Shed(overloaded(state, id, request))
        }
    }
}

/// A response's latency teaches the limit, unless it is a refusal of Tollgate's own (those
/// return before the work the limit measures).
pub fn sample(permit: &Permit, response: &Response) {
    let own_refusal =
        response.headers().contains_key(TOLLGATE_ERROR) && !response.status().is_server_error();
    if !own_refusal {
        permit.sample();
    }
}

fn tenant_of(state: &AppState, request: &Request) -> Tenant {
    let account = presented_secret(request.headers())
        .and_then(|secret| ApiKey::parse(secret).ok())
        .and_then(|key| state.keys.cached_account(&key.hash()));
    match account {
        Some(account) => Tenant::Account(account),
        None => state
            .client_ip(request.headers(), request.extensions())
            .map_or(Tenant::Unknown, Tenant::Address),
    }
}

fn overloaded(state: &AppState, id: RequestId, request: &Request) -> Response {
    let error = ApiError::new(
        ErrorCode::Overloaded,
        "The node is at capacity and shed this request before doing any work. Nothing was \
         charged; retry after 1 s.",
    )
    .with_retry_after(1);
    let profile = state
        .routes
        .resolve(request.uri().path())
        .map(|route| route.config.error_profile)
        .unwrap_or_default();
    error_response(&error, profile, id, request.headers())
}
