//! The management API under the configured prefix (default `/api/v1`): one file per area
//! (accounts, keys, billing, audit, payments, plans, webhooks, export), the extractors they share, and the OpenAPI document.
//!
//! Handlers are thin: extract, authorise, call the store or a service, shape the answer. They
//! take the app state; nothing below this room does. **Architecture Invariant:** every handler
//! that takes an id checks that the caller owns it, and answers another account's resource
//! exactly as one that does not exist (404 `not_found`).

use crate::state::AppState;
use utoipa_axum::router::OpenApiRouter;

pub mod accounts;
pub mod audit;
pub mod billing;
pub mod export;
pub mod extract;
pub mod fee;
pub mod keys;
pub mod openapi;
pub mod payments;
pub mod plans;
pub mod webhooks;

/// The management API and its OpenAPI description, declared together so neither can drift.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(accounts::router())
        .merge(keys::router())
        .merge(billing::router())
        .merge(audit::router())
        .merge(payments::router())
        .merge(plans::router())
        .merge(webhooks::router())
        .merge(export::router())
}
