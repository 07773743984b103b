//! The HTTP/2 header-size bound (HTTP/1 heads are bounded by hyper as it reads them).

use crate::http::render::{error_response, head_too_large};
use crate::state::AppState;
use axum::extract::Request;
use axum::response::Response;
use tollgate_core::RequestId;
use tollgate_wire::ErrorProfile;

/// An HTTP/2 request whose header list is larger than `server.max_header_bytes` (counted as
/// HTTP/2 counts it: name, value and 32 bytes per field, plus the request line) gets 431. h2's
/// own limit is set above this one so that the refusal carries the envelope, not h2's bare 431.
/// An HTTP/1 head is bounded by hyper as it reads it (see `serve`), so it is not counted again.
pub fn oversized(state: &AppState, id: RequestId, request: &Request) -> Option<Response> {
    if request.version() != http::Version::HTTP_2 {
        return None;
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
        return None;
    }
    Some(error_response(
        &head_too_large(limit),
        ErrorProfile::default(),
        id,
        request.headers(),
    ))
}
