//! The outermost layers every response passes through, proxied or not.
//!
//! - [`request_id`] gives each request its `req_<ULID>` and stamps it on the response (also as
//!   `request-id` when the response carries the Anthropic profile of its route).
//! - [`rescue`] turns an [`HttpError`](crate::error::HttpError) into the error envelope of the
//!   route's profile, adds `X-Tollgate-Error`, `x-should-retry` and `Retry-After`, and logs it.
//!   **Architecture Invariant:** nothing else builds error bodies.

use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tollgate_core::{ApiError, ErrorCode, RequestId};
use tollgate_wire::{render_error, ErrorProfile, Language};

pub const TOLLGATE_ERROR: HeaderName = HeaderName::from_static("x-tollgate-error");
pub const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// Anthropic's SDKs read the request ID from this header.
pub const ANTHROPIC_REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// A client-sent request ID, kept for the logs (and later the usage log) but never trusted.
#[derive(Debug, Clone)]
pub struct ClientRequestId(pub String);

/// The request ID already formatted as a header value, so it is formatted once per request.
#[derive(Debug, Clone)]
pub struct RequestIdHeader(pub HeaderValue);

pub async fn request_id(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = RequestId::new();
    let header = &state.config.request_id_header;
    if let Some(client_id) = request.headers().get(header).and_then(|v| v.to_str().ok()) {
        let client_id = client_id.chars().take(200).collect();
        request.extensions_mut().insert(ClientRequestId(client_id));
    }
    let value = HeaderValue::from_str(&id.to_string()).ok();
    request.extensions_mut().insert(id);
    if let Some(value) = &value {
        request
            .extensions_mut()
            .insert(RequestIdHeader(value.clone()));
    }
    let mut response = next.run(request).await;
    if let Some(value) = value {
        // Anthropic clients read the ID from `request-id`; a route's responses carry its profile.
        if response.extensions().get::<ErrorProfile>() == Some(&ErrorProfile::Anthropic) {
            response
                .headers_mut()
                .insert(ANTHROPIC_REQUEST_ID, value.clone());
        }
        response.headers_mut().insert(header.clone(), value);
    }
    response
}

pub async fn rescue(request: Request, next: Next) -> Response {
    let id = request
        .extensions()
        .get::<RequestId>()
        .copied()
        .unwrap_or_default();
    // Kept (a reference-counted clone) but read only if the answer is an error: most are not.
    let accept_language = request
        .headers()
        .get(http::header::ACCEPT_LANGUAGE)
        .cloned();
    let mut response = next.run(request).await;
    let Some(error) = response.extensions_mut().remove::<ApiError>() else {
        return response;
    };
    let profile = response
        .extensions()
        .get::<ErrorProfile>()
        .copied()
        .unwrap_or_default();
    log(&error);
    let language = language(accept_language.as_ref());
    let mut rendered = render(response.status(), &error, profile, id, language);
    // Headers the handler set beside the error (`Server-Timing`, say) stay; the body's own
    // headers are the envelope's.
    for (name, value) in response.headers() {
        if name != http::header::CONTENT_LENGTH && !rendered.headers().contains_key(name) {
            rendered.headers_mut().append(name, value.clone());
        }
    }
    rendered
}

/// An error rendered outside the rescue layer (by a layer that sits around it), for a request
/// with these headers.
pub fn error_response(
    error: &ApiError,
    profile: ErrorProfile,
    id: RequestId,
    headers: &HeaderMap,
) -> Response {
    log(error);
    let status = axum::http::StatusCode::from_u16(error.code.info().status)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    let language = language(headers.get(http::header::ACCEPT_LANGUAGE));
    render(status, error, profile, id, language)
}

/// The language the caller reads, from its `Accept-Language`.
fn language(accept_language: Option<&HeaderValue>) -> Language {
    Language::negotiate(accept_language.and_then(|v| v.to_str().ok()))
}

fn log(error: &ApiError) {
    let info = error.code.info();
    if info.status >= 500 {
        tracing::error!(code = %error.code, status = info.status, message = %error.message, "request failed");
    } else {
        tracing::info!(code = %error.code, status = info.status, message = %error.message, "request rejected");
    }
}

fn render(
    status: axum::http::StatusCode,
    error: &ApiError,
    profile: ErrorProfile,
    id: RequestId,
    language: Language,
) -> Response {
    let (headers, body) = render_parts(error, profile, id, language);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    // Keep the profile for the request-ID layer, which adds `request-id` for Anthropic routes.
    response.extensions_mut().insert(profile);
    response
}

/// The envelope's headers and body, its message in `language` where a translation exists.
fn render_parts(
    error: &ApiError,
    profile: ErrorProfile,
    id: RequestId,
    language: Language,
) -> (HeaderMap, Vec<u8>) {
    let rendered = render_error(profile, &language.translate(error), &id);
    let body = serde_json::to_vec(&rendered.body).unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(rendered.content_type),
    );
    headers.insert(
        http::header::CONTENT_LANGUAGE,
        HeaderValue::from_static(language.tag()),
    );
    headers.insert(
        http::header::VARY,
        HeaderValue::from_static("accept-language"),
    );
    headers.insert(
        TOLLGATE_ERROR,
        HeaderValue::from_static(error.code.as_str()),
    );
    let should_retry = if error.code.info().retryable {
        "true"
    } else {
        "false"
    };
    headers.insert(SHOULD_RETRY, HeaderValue::from_static(should_retry));
    if let Some(seconds) = error.retry_after_s {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    // A 405 says which methods the path serves (RFC 9110 §15.5.6).
    if let Some(allowed) = error.details.get("allowed").and_then(|a| a.as_array()) {
        let names: Vec<&str> = allowed.iter().filter_map(|m| m.as_str()).collect();
        if let Ok(value) = HeaderValue::from_str(&names.join(", ")) {
            headers.insert(http::header::ALLOW, value);
        }
    }
    (headers, body)
}

/// An HTTP/2 request whose header list is larger than `server.max_header_bytes` (counted as
/// HTTP/2 counts it: name, value and 32 bytes per field, plus the request line) gets 431. h2's
/// own limit is set above this one so that the refusal carries the envelope, not h2's bare 431.
/// An HTTP/1 head is bounded by hyper as it reads it (see `serve`), so it is not counted again.
pub async fn bounded_head(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.version() != http::Version::HTTP_2 {
        return next.run(request).await;
    }
    let limit = state.config.connections.max_header_bytes;
    let line = request.method().as_str().len()
        + request
            .uri()
            .path_and_query()
            .map_or(0, |p| p.as_str().len())
        + request.uri().authority().map_or(0, |a| a.as_str().len());
    let size = request.headers().iter().fold(line, |size, (name, value)| {
        size + name.as_str().len() + value.len() + 32
    });
    if size <= limit {
        return next.run(request).await;
    }
    let id = request
        .extensions()
        .get::<RequestId>()
        .copied()
        .unwrap_or_default();
    error_response(
        &head_too_large(limit),
        ErrorProfile::default(),
        id,
        request.headers(),
    )
}

fn head_too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorCode::HeadersTooLarge,
        format!(
            "The request's head is larger than {limit} bytes, or has more than 100 headers. \
             Send fewer or smaller headers."
        ),
    )
    .with_detail("limit_bytes", limit)
}

/// The whole HTTP/1.1 answer Tollgate gives in place of hyper's own bare refusal of a request
/// it could not read (`status` is hyper's: 400, 414 or 431): the envelope, `X-Tollgate-Error`
/// and a fresh request ID, on a connection that then closes. `None` for any other status.
pub fn http1_refusal(
    status: u16,
    max_header_bytes: usize,
    request_id_header: &HeaderName,
) -> Option<Vec<u8>> {
    let error = match status {
        400 => ApiError::new(
            ErrorCode::BadRequest,
            "The request is not valid HTTP/1.1: its request line or a header could not be read.",
        ),
        414 => ApiError::new(
            ErrorCode::UriTooLong,
            "The request's URI is longer than Tollgate reads (64 KiB).",
        ),
        431 => head_too_large(max_header_bytes),
        _ => return None,
    };
    log(&error);
    let id = RequestId::new();
    // The head could not be read, so neither could its Accept-Language.
    let (headers, body) = render_parts(&error, ErrorProfile::default(), id, Language::English);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n").into_bytes();
    for (name, value) in headers.iter().chain([(
        request_id_header,
        &HeaderValue::from_str(&id.to_string()).ok()?,
    )]) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out.extend_from_slice(&body);
    Some(out)
}

/// A response body that runs `on_end` once, when the body ends, fails, or is dropped unfinished
/// (the client left): what must last exactly as long as the response does.
pub struct OnEnd<F: FnOnce()> {
    inner: Body,
    on_end: Option<F>,
}

impl<F: FnOnce()> OnEnd<F> {
    pub fn new(inner: Body, on_end: F) -> OnEnd<F> {
        OnEnd {
            inner,
            on_end: Some(on_end),
        }
    }

    fn end(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end();
        }
    }
}

impl<F: FnOnce() + Unpin> http_body::Body for OnEnd<F> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce()> Drop for OnEnd<F> {
    fn drop(&mut self) {
        self.end();
    }
}
