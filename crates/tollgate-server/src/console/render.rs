//! How a console page is answered: a template rendered with its status, or the error envelope
//! if it cannot be.

use crate::http::error::HttpError;
use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

/// `template` rendered, answered with `status`.
pub fn page(status: StatusCode, template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render a console page");
            HttpError::new(
                tollgate_core::ErrorCode::InternalError,
                "The page could not be rendered.",
            )
            .into_response()
        }
    }
}

/// `?cursor=` of a paged page; a missing or unreadable one is the first page.
#[derive(Deserialize, Default)]
pub struct CursorQuery {
    #[serde(default)]
    pub cursor: String,
}
