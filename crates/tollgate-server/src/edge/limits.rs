//! Rate limits at the edge: a slot for each request's standings, the anonymous (`ip`) limit decided
//! before any work, and the rate-limit headers on the way out. The policies and the limiter are
//! [`crate::access::limits`].

use crate::access::limits::{
    refused, since_epoch, Demand, LimitHeaders, LimitSlot, Standings, Verdict,
};
use crate::config::RouteAuth;
use crate::http::headers::presented_secret;
use crate::http::render::error_response;
use crate::state::AppState;
use axum::extract::Request;
use axum::response::Response;
use std::future::Future;
use tollgate_core::RequestId;

/// Paths that are never rate-limited nor counted: a load balancer's health and readiness checks
/// and the metrics scrape must keep working whatever one client behind the same address does.
const UNLIMITED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];
/// The console's static files (compiled in, cached by the browser): every page loads several,
/// so counting them against the address would refuse a person clicking through the console
/// quickly, for files that cost nothing to serve.
const UNLIMITED_PREFIX: &str = "/console/assets/";

/// What credential a request presents, as far as memory can tell before any lookup.
enum Presented {
    /// None, or one that cannot be valid: the request is anonymous.
    Anonymous,
    /// The admin token (compared in constant time): never limited.
    Admin,
    /// A well-formed API key: judged by its own policies once it is looked up.
    Key,
}

fn presented(state: &AppState, request: &Request) -> Presented {
    let Some(secret) = presented_secret(request.headers()) else {
        return Presented::Anonymous;
    };
    if let Some(admin) = &state.config.admin_token {
        if !secret.starts_with("tg_") && tollgate_core::key::secret_matches(secret, &admin.0) {
            return Presented::Admin;
        }
    }
    // A public route reads no key: whatever is sent, the caller is anonymous there.
    let public = state
        .routes
        .resolve(request.uri().path())
        .is_some_and(|route| route.config.auth == RouteAuth::None);
    if !public && tollgate_core::ApiKey::parse(secret).is_ok() {
        Presented::Key
    } else {
        Presented::Anonymous
    }
}

/// Sits outside the error renderer: gives each request a [`LimitSlot`], and on the way out adds
/// the rate-limit headers. A request that ends without an identified caller (no or a bad key, an
/// unknown path) counts against its address's `ip` policies. An address over them is refused
/// before any work, except for what it cannot be blamed for: health, readiness and metrics, the
/// admin token, and a well-formed key, which is looked up and judged by its own policies (if it
/// turns out not to be a valid key, the answer is the address's 429 all the same).
pub async fn around<Handled>(
    state: &AppState,
    id: RequestId,
    mut request: Request,
    next: impl FnOnce(Request) -> Handled,
) -> Response
where
    Handled: Future<Output = Response>,
{
    let path = request.uri().path();
    if UNLIMITED_PATHS.contains(&path) || path.starts_with(UNLIMITED_PREFIX) {
        return next(request).await;
    }
    let slot = LimitSlot::default();
    request.extensions_mut().insert(slot.clone());
    let anonymous: Vec<Demand> = match state.client_ip(request.headers(), request.extensions()) {
        Some(ip) if !state.config.anonymous_limits.is_empty() => {
            let subject = format!("ip:{ip}");
            state
                .config
                .anonymous_limits
                .iter()
                .map(|policy| Demand::new(policy.clone(), &subject, 1))
                .collect()
        }
        _ => Vec::new(),
    };
    let now = since_epoch(state.clock.now());
    // The answer for an address over its anonymous limit, if it is.
    let mut over_limit: Option<Response> = None;
    if !anonymous.is_empty() {
        if let Ok(standings) = state.limiter.peek(&anonymous).await {
            if standings.iter().any(|s| !s.admitted) {
                let verdict = Verdict {
                    admitted: false,
                    standings,
                };
                let error = refused(&state.metrics, &anonymous, &verdict);
                let profile = state
                    .routes
                    .resolve(request.uri().path())
                    .map(|route| route.config.error_profile)
                    .unwrap_or_default();
                let mut response = error_response(&error, profile, id, request.headers());
                LimitHeaders::new(&anonymous, &verdict.standings, now)
                    .apply(response.headers_mut());
                match presented(state, &request) {
                    Presented::Anonymous => return response,
                    Presented::Admin => {}
                    Presented::Key => over_limit = Some(response),
                }
            }
        }
    }
    let mut response = next(request).await;
    let headers = match slot.take() {
        Some(Standings::Decided(headers)) => Some(headers),
        Some(Standings::Exempt) => None,
        Some(Standings::Identified(demands)) if demands.is_empty() => None,
        Some(Standings::Identified(demands)) => state
            .limiter
            .peek(&demands)
            .await
            .ok()
            .map(|standings| LimitHeaders::new(&demands, &standings, now)),
        // The key presented was not a valid one: the address's refusal stands.
        None if over_limit.is_some() => return over_limit.unwrap_or(response),
        None if anonymous.is_empty() => None,
        None => state
            .limiter
            .acquire(&anonymous)
            .await
            .ok()
            .map(|verdict| LimitHeaders::new(&anonymous, &verdict.standings, now)),
    };
    if let Some(headers) = headers {
        headers.apply(response.headers_mut());
    }
    slot.apply_notes(response.headers_mut());
    response
}
