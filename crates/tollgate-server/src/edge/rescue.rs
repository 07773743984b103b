//! The rescue layer: turns an [`HttpError`](crate::http::error::HttpError) riding in a response
//! into the error envelope of the route's profile, in the caller's language.
//! **Architecture Invariant:** nothing else builds error bodies; layers outside this one call
//! [`crate::http::render::error_response`].

use crate::http::render::{language, log, render};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tollgate_core::{ApiError, RequestId};
use tollgate_wire::ErrorProfile;

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
