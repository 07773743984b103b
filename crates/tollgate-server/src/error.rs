//! The one error type handlers return. It does not render itself: it rides in the response's
//! extensions to the rescue layer ([`crate::edge::rescue`]), which knows the request ID and the
//! route's error profile and is the only place that builds error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tollgate_core::{ApiError, ErrorCode};
use tollgate_store::StoreError;
use tollgate_wire::ErrorProfile;

/// How long a client should wait before retrying when a dependency is down.
pub const DEPENDENCY_RETRY_AFTER_S: u64 = 5;

#[derive(Debug)]
pub struct HttpError {
    pub error: ApiError,
    /// The route's profile; `None` renders `native`.
    pub profile: Option<ErrorProfile>,
}

impl HttpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::new(code, message).into()
    }

    pub fn in_profile(mut self, profile: ErrorProfile) -> Self {
        self.profile = Some(profile);
        self
    }

    pub fn with_detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.error = self.error.with_detail(key, value);
        self
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        HttpError::new(ErrorCode::NotFound, format!("No such {what}."))
    }
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        HttpError {
            error,
            profile: None,
        }
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(reason) => {
                tracing::error!(%reason, "store unavailable");
                ApiError::new(
                    ErrorCode::ServiceUnavailable,
                    "The store is unavailable. Nothing was charged; retry shortly.",
                )
                .with_detail("dependency", "store")
                .with_retry_after(DEPENDENCY_RETRY_AFTER_S)
                .into()
            }
            StoreError::Corrupt(reason) => {
                tracing::error!(%reason, "corrupt store data");
                HttpError::new(
                    ErrorCode::InternalError,
                    "Tollgate failed unexpectedly. Nothing was charged.",
                )
            }
        }
    }
}

/// Marks the response as an error to render; the body is written by the rescue layer.
impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = status.into_response();
        response
            .extensions_mut()
            .insert(self.profile.unwrap_or_default());
        response.extensions_mut().insert(self.error);
        response
    }
}
