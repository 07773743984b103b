//! The web console at `/console/`: server-rendered pages (askama templates, checked at compile
//! time) for account holders and the operator, over the same services as the management API.
//! Signed in by a session cookie, never by a key in the browser. Pages are HTML, not API
//! operations, so they are routed here directly and left out of the OpenAPI document.

pub mod accounts;
pub mod assets;
pub mod export;
pub mod keys;
pub mod pages;
pub mod render;
pub mod report;
pub mod requests;
pub mod security;
pub mod session;
pub mod sinks;
pub mod usage;
pub mod wallet;
pub mod webhooks;

use crate::state::AppState;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;

/// The console's routes, every response behind its security headers and cross-site check.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(pages::to_console))
        .route("/console/", get(pages::overview))
        .route("/console/sign-in", post(pages::sign_in))
        .route("/console/sign-out", post(pages::sign_out))
        .route("/console/keys", get(keys::list).post(keys::create))
        .route("/console/keys/{id}", get(keys::one).post(keys::edit))
        .route("/console/keys/{id}/roll", post(keys::roll_key))
        .route("/console/keys/{id}/revoke", post(keys::revoke_key))
        .route("/console/requests", get(requests::list))
        .route("/console/requests.csv", get(export::requests))
        .route("/console/requests/{id}", get(requests::one))
        .route("/console/usage", get(usage::show))
        .route("/console/wallet", get(wallet::list))
        .route("/console/wallet/topup", post(wallet::top_up))
        .route("/console/wallet/packs", post(wallet::buy_pack))
        .route("/console/wallet/auto-topup", post(wallet::auto_top_up_on))
        .route(
            "/console/wallet/auto-topup/off",
            post(wallet::auto_top_up_off),
        )
        .route("/console/wallet.csv", get(export::wallet))
        .route("/console/webhooks", get(webhooks::list).post(webhooks::add))
        .route("/console/webhooks/alert", post(webhooks::alert))
        .route("/console/webhooks/{id}", get(webhooks::log))
        .route("/console/webhooks/{id}/{action}", post(webhooks::act))
        .route(
            "/console/webhooks/{id}/deliveries/{event}/redeliver",
            post(webhooks::redeliver),
        )
        .route("/console/accounts", get(accounts::list))
        .route("/console/accounts/{id}", get(accounts::one))
        .route(
            "/console/accounts/{id}/credits",
            post(accounts::grant_credits),
        )
        .route(
            "/console/accounts/{id}/subscription",
            post(accounts::set_plan),
        )
        .route(
            "/console/accounts/{id}/packs",
            post(accounts::grant_pack_form),
        )
        .route("/console/accounts/{id}/suspend", post(accounts::suspend))
        .route(
            "/console/accounts/{id}/reactivate",
            post(accounts::reactivate),
        )
        .route("/console/audit", get(accounts::audit))
        .route("/console/sinks", get(sinks::list))
        .route("/console/sinks/{name}/{seq}/retry", post(sinks::retry_one))
        .route("/console/assets/{name}", get(assets::serve))
        .layer(middleware::from_fn(security::layer))
}
