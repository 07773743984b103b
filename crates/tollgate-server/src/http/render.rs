//! The error envelope, rendered: status, headers (`X-Tollgate-Error`, `x-should-retry`,
//! `Retry-After`, `Content-Language`) and body in the route's profile and the caller's language.
//! The rescue layer and the layers outside it call this; nothing else builds error bodies.

use crate::http::headers::{SHOULD_RETRY, TOLLGATE_ERROR};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use tollgate_core::{ApiError, ErrorCode, RequestId};
use tollgate_wire::{render_error, ErrorProfile, Language};

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
pub fn language(accept_language: Option<&HeaderValue>) -> Language {
    Language::negotiate(accept_language.and_then(|v| v.to_str().ok()))
}

pub fn log(error: &ApiError) {
    let info = error.code.info();
    if info.status >= 500 {
        tracing::error!(code = %error.code, status = info.status, message = %error.message, "request failed");
    } else {
        tracing::info!(code = %error.code, status = info.status, message = %error.message, "request rejected");
    }
}

pub fn render(
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

pub fn head_too_large(limit: usize) -> ApiError {
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
