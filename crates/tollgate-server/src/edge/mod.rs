//! The edge: what every request passes through, proxied or not, and the accept loop beneath it.
//! [`edge`] runs the steps in order, in one function rather than a stack of layers (each layer
//! boxed its future and cloned the state per request: a tenth of a pass-through request's CPU,
//! docs/performance.md). The steps call services and never answer a route's business.

pub mod head;
pub mod idempotency;
pub mod limits;
pub mod metrics;
pub mod request_id;
pub mod rescue;
pub mod serve;
pub mod shed;

use crate::access::shed::Permit;
use crate::http::body::{OnEnd, Stalling};
use crate::http::headers::ClientRequestId;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::Body as _;
use shed::Admission;
use tollgate_core::RequestId;
use tracing::Instrument;

/// Every request, on the way in, top to bottom; the way out runs back up:
///
/// 0. **Body deadline**: a request body that goes `server.body_read_timeout` without a byte
///    fails whoever reads it (400), rather than hold the request open.
/// 1. **Request ID**, first: every response, whatever happened inside, carries it.
/// 2. **Metrics**: every response is counted, shed ones included, and timed to its last byte.
/// 3. **Trace span**, once the ID exists, so every log line carries it; one INFO line per
///    response. Failures are logged once, by rescue.
/// 4. **Head bound**: an oversized HTTP/2 head is refused before anything reads it.
/// 5. **Shedding**, before any other work: no key lookup, limit decision or hold.
/// 6. **Rate limits**: their headers go on the rendered response, so they sit outside rescue.
/// 7. **Rescue** renders errors, inside the request ID so every body carries it.
/// 8. **Idempotency** for proxied calls sees the handlers' raw outcomes (an error Tollgate
///    originates is never kept), and its own errors are rendered by rescue. The management
///    API's routes carry it as a route layer (`app::router`), so only a matched route is claimed.
///
/// `next` is the router, inside a panic catcher that turns a panic into a 500 envelope.
pub async fn edge(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // A body that stops arriving fails its reader rather than hold the request open.
    let mut request = if request.body().is_end_stream() {
        request
    } else {
        let idle = state.config.connections.body_read_timeout;
        request.map(|body| Body::new(Stalling::new(body, idle)))
    };
    let (id, header) = request_id::assign(&state, &mut request);
    let timer = metrics::Timer::start(&state, request.uri().path());
    let span = request_span(id, &request);
    let (mut response, permit) = async {
        let (response, permit) = admitted(&state, id, request, next).await;
        tracing::info!(
            latency = ?timer.elapsed(),
            status = response.status().as_u16(),
            "finished processing request"
        );
        (response, permit)
    }
    .instrument(span)
    .await;
    timer.count(&state.metrics, &response);
    request_id::stamp(&state, header, &mut response);
    // In flight until the last byte: the shedding permit is released and the time taken then.
    let metrics = state.metrics.clone();
    response.map(|inner| {
        Body::new(OnEnd::new(inner, move || {
            drop(permit);
            timer.observe(&metrics);
        }))
    })
}

/// Steps 4 to 8, and the shedding permit the request holds until its response's last byte.
async fn admitted(
    state: &AppState,
    id: RequestId,
    request: Request,
    next: Next,
) -> (Response, Option<Permit>) {
    if let Some(refused) = head::oversized(state, id, &request) {
        return (refused, None);
    }
    let permit = match shed::admit(state, id, &request) {
        Admission::Exempt => None,
        Admission::Admitted(permit) => Some(permit),
        Admission::Shed(refused) => return (refused, None),
    };
    let response = limits::around(state, id, request, |request| async move {
        let rescue = rescue::Rescue::of(id, &request);
        let response = if idempotency::claims_a_key(&request) {
            idempotency::proxied(State(state.clone()), request, next).await
        } else {
            next.run(request).await
        };
        rescue.render(response)
    })
    .await;
    if let Some(permit) = &permit {
        shed::sample(permit, &response);
    }
    (response, permit)
}

fn request_span(id: RequestId, request: &Request) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        client_request_id = tracing::field::Empty,
        method = %request.method(),
        path = request.uri().path(),
    );
    if let Some(client_id) = request.extensions().get::<ClientRequestId>() {
        span.record("client_request_id", client_id.0.as_str());
    }
    span
}
