//! Rescue: turns an [`HttpError`](crate::http::error::HttpError) riding in a response into the
//! error envelope of the route's profile, in the caller's language.
//! **Architecture Invariant:** nothing else builds error bodies; the edge's refusals before
//! rescue call [`crate::http::render::error_response`].

use crate::http::render::{language, log, render};
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::response::Response;
use tollgate_core::{ApiError, RequestId};
use tollgate_wire::ErrorProfile;

/// What rendering an error needs from its request, kept before the request is handed on.
pub struct Rescue {
    id: RequestId,
    /// Kept (a reference-counted clone) but read only if the answer is an error: most are not.
    accept_language: Option<HeaderValue>,
}

impl Rescue {
    pub fn of(id: RequestId, request: &Request) -> Rescue {
        Rescue {
            id,
            accept_language: request
                .headers()
                .get(http::header::ACCEPT_LANGUAGE)
                .cloned(),
        }
    }

    /// The response, with an error it carries rendered as the envelope.
    pub fn render(self, mut response: Response) -> Response {
        let Some(error) = response.extensions_mut().remove::<ApiError>() else {
            return response;
        };
        let profile = response
            .extensions()
            .get::<ErrorProfile>()
            .copied()
            .unwrap_or_default();
        log(&error);
        let language = language(self.accept_language.as_ref());
        let mut rendered = render(response.status(), &error, profile, self.id, language);
        // Headers the handler set beside the error (`Server-Timing`, say) stay; the body's own
        // headers are the envelope's.
        for (name, value) in response.headers() {
            if name != http::header::CONTENT_LENGTH && !rendered.headers().contains_key(name) {
                rendered.headers_mut().append(name, value.clone());
            }
        }
        rendered
    }
}
