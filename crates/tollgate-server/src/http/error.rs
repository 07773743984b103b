//! The one error type handlers return, and the refusals several rooms share. It does not render
//! itself: it rides in the response's extensions to the rescue layer
//! ([`crate::edge::rescue::rescue`]), which knows the request ID and the route's error profile.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
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

/// 405 for a method the path does not serve, with `Allow` naming those it does.
pub(crate) fn method_not_allowed(method: &http::Method, allowed: &[http::Method]) -> HttpError {
    let names: Vec<&str> = allowed.iter().map(http::Method::as_str).collect();
    HttpError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not served here; use {}.", names.join(", ")),
    )
    .with_detail("allowed", names.clone())
}

/// 413: the body is over `limit` bytes.
pub(crate) fn payload_too_large(limit: u64) -> HttpError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("The request body is larger than the limit of {limit} bytes."),
    )
    .with_detail("limit_bytes", limit)
    .into()
}

/// A `validation_error` naming one field.
pub(crate) fn validation(field: &str, message: impl Into<String>) -> HttpError {
    let mut fields = FieldErrors::default();
    fields.add(field, message);
    match fields.finish() {
        Err(e) => e,
        Ok(()) => HttpError::new(ErrorCode::ValidationError, "Invalid request."),
    }
}

/// Field → messages, collected so one response lists every invalid field.
#[derive(Default)]
pub(crate) struct FieldErrors(BTreeMap<String, Vec<String>>);

impl FieldErrors {
    pub(crate) fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0
            .entry(field.to_string())
            .or_default()
            .push(message.into());
    }

    /// `Ok` if no field was added, else one `validation_error` listing them all.
    pub(crate) fn finish(self) -> Result<(), HttpError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(self.0).into())
        }
    }
}
