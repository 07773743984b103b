//! Request IDs: each request gets its `req_<ULID>`, stamped on the response (also as
//! `request-id` when the response carries the Anthropic profile of its route).

use crate::http::headers::{ClientRequestId, RequestIdHeader, ANTHROPIC_REQUEST_ID};
use crate::state::AppState;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::response::Response;
use tollgate_core::RequestId;
use tollgate_wire::ErrorProfile;

/// Gives the request its ID (and keeps the caller's own, if it sent one); returns the ID, for
/// the edge's own steps, and the header value [`stamp`] puts on the response.
pub fn assign(state: &AppState, request: &mut Request) -> (RequestId, Option<HeaderValue>) {
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
    (id, value)
}

/// Puts the request's ID on its response, whatever happened inside.
pub fn stamp(state: &AppState, value: Option<HeaderValue>, response: &mut Response) {
    let Some(value) = value else {
        return;
    };
    // Anthropic clients read the ID from `request-id`; a route's responses carry its profile.
    if response.extensions().get::<ErrorProfile>() == Some(&ErrorProfile::Anthropic) {
        response
            .headers_mut()
            .insert(ANTHROPIC_REQUEST_ID, value.clone());
    }
    response
        .headers_mut()
        .insert(state.config.request_id_header.clone(), value);
}
