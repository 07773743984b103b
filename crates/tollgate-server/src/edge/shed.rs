//! The load-shedding layer: a request over the node's adaptive concurrency limit is answered 429
//! `overloaded` before any other work. The limit and the tenants are [`crate::access::shed`].

use crate::access::shed::Tenant;
use crate::http::body::OnEnd;
use crate::http::headers::{presented_secret, TOLLGATE_ERROR};
use crate::http::render::error_response;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tollgate_core::{ApiError, ApiKey, ErrorCode, RequestId};

/// Sits just inside the trace layer, before every other piece of work. Health checks and metrics
/// are never shed: a load balancer must still see the node alive, and its operator see why.
pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(shedder) = &state.shedder else {
        return next.run(request).await;
    };
    if matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(request).await;
    }
    let Some(permit) = shedder.try_admit(tenant_of(&state, &request)) else {
        state.metrics.shed.inc();
        return overloaded(&state, &request);
    };
    let response = next.run(request).await;
    let own_refusal =
        response.headers().contains_key(TOLLGATE_ERROR) && !response.status().is_server_error();
    if !own_refusal {
        permit.sample();
    }
    // The permit is released when the body ends: a request is in flight until its last byte.
    response.map(|inner| Body::new(OnEnd::new(inner, move || drop(permit))))
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

fn overloaded(state: &AppState, request: &Request) -> Response {
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
    let id = request.extensions().get::<RequestId>().copied();
    error_response(&error, profile, id.unwrap_or_default(), request.headers())
}
