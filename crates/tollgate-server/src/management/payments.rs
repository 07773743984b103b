//! Card top-ups: starting one (`POST /topups`), reading them, Stripe's webhook, and the
//! operator's reconciliation. The service is `payments::service::Payments`; these are thin.

use crate::http::error::{validation, FieldErrors, HttpError, DEPENDENCY_RETRY_AFTER_S};
use crate::management::billing::{money, subject_account};
use crate::management::extract::{page, page_limit, parse_id, parse_query, Caller, JsonBody};
use crate::management::openapi;
use crate::payments::service::{DeliveryRefused, HandleError, Payments, TopUpRefused};
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use http_body_util::BodyExt;
use serde::Deserialize;
use std::sync::Arc;
use tollgate_core::payment::TopUpStatus;
use tollgate_core::{ApiError, ErrorCode, Nanos, TopUpId};
use tollgate_store::{AutoTopUp, TopUp};
use tollgate_wire::api as wire;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_topup, list_topups))
        .routes(routes!(get_topup))
        .routes(routes!(reconcile))
        .routes(routes!(get_auto_topup, set_auto_topup, stop_auto_topup))
}

/// The payments service, or 404 where none is configured (the endpoints do not exist then).
fn service(state: &AppState) -> Result<&Arc<Payments>, HttpError> {
    state.payments.as_ref().ok_or_else(|| {
        HttpError::new(
            ErrorCode::NotFound,
            "Card payments are not configured on this Tollgate ([payments.stripe]); ask the operator for credit.",
        )
    })
}

/// Starts a card top-up: answers the Checkout URL where the customer pays. The credit lands
/// when Stripe reports the payment, once.
#[utoipa::path(
    post,
    path = "/topups",
    tag = "payments",
    request_body = wire::TopUpRequest,
    responses(
        (status = 201, description = "The top-up, pending; the customer pays at `checkout_url`.", body = wire::TopUp),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
        (status = 503, response = openapi::Status503),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn create_topup(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> Result<(StatusCode, Json<wire::TopUp>), HttpError> {
    caller.require_master_or_admin()?;
    let payments = service(&state)?;
    let body: wire::TopUpRequest = body.parse()?;
    let pack = match &body.pack {
        None => None,
        Some(name) => Some(state.config.plans.pack(name).ok_or_else(|| {
            let offered: Vec<&str> = state
                .config
                .plans
                .packs()
                .map(|p| p.name.as_str())
                .collect();
            validation(
                "pack",
                format!("is not a pack on offer (packs: {})", offered.join(", ")),
            )
        })?),
    };
    let amount = match (&body.amount, pack) {
        (Some(amount), None) => {
            Nanos::parse_amount(amount).map_err(|e| validation("amount", e.to_string()))?
        }
        (None, Some(pack)) => pack.price,
        (Some(_), Some(_)) => {
            return Err(validation("amount", "is the pack's price: leave it out"));
        }
        (None, None) => return Err(validation("amount", "is required (or a pack)")),
    };
    let account = subject_account(&caller, body.account_id.as_deref())?;
    if state.store.account(account).await?.is_none() {
        return Err(HttpError::not_found("account"));
    }
    let topup = start_topup(payments, account, amount, pack.map(|p| p.name.as_str())).await?;
    Ok((
        StatusCode::CREATED,
        Json(view(&state, payments, &topup).await?),
    ))
}

/// Starts a top-up for the API and the console alike, refusals as the caller's answer.
pub(crate) async fn start_topup(
    payments: &Payments,
    account: tollgate_core::AccountId,
    amount: Nanos,
    pack: Option<&str>,
) -> Result<TopUp, HttpError> {
    payments
        .start_topup(account, amount, pack)
        .await
        .map_err(|refused| match refused {
            TopUpRefused::Amount(message) => validation("amount", message),
            TopUpRefused::Unavailable(_) => ApiError::new(
                ErrorCode::ServiceUnavailable,
                "The payment provider did not answer, so no checkout was started and nothing was charged. Try again shortly.",
            )
            .with_detail("dependency", "payments")
            .with_retry_after(DEPENDENCY_RETRY_AFTER_S)
            .into(),
            TopUpRefused::Store(e) => e.into(),
        })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct TopUpsQuery {
    /// Admin only (and required of the admin): the account to read.
    account_id: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1 to 500; default 50.
    limit: Option<u32>,
}

/// The account's top-ups, newest first.
#[utoipa::path(
    get,
    path = "/topups",
    tag = "payments",
    params(TopUpsQuery),
    responses(
        (status = 200, description = "One page of top-ups.", body = wire::Page<wire::TopUp>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn list_topups(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<TopUpsQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::TopUp>>, HttpError> {
    caller.require_master_or_admin()?;
    let payments = service(&state)?;
    let query = parse_query(query)?;
    let account = subject_account(&caller, query.account_id.as_deref())?;
    let limit = page_limit(query.limit)?;
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<TopUpId>()
                .map_err(|_| validation("cursor", "is not a cursor from a previous page"))
        })
        .transpose()?;
    let rows = state.store.topups(account, before, limit + 1).await?;
    let (rows, next_cursor) = page(rows, limit, |t| t.id.to_string());
    let mut data = Vec::with_capacity(rows.len());
    for topup in &rows {
        data.push(view(&state, payments, topup).await?);
    }
    Ok(Json(wire::Page { data, next_cursor }))
}

/// One top-up and where it stands.
#[utoipa::path(
    get,
    path = "/topups/{id}",
    tag = "payments",
    params(("id" = TopUpId, Path, description = "The top-up's id.")),
    responses(
        (status = 200, description = "The top-up.", body = wire::TopUp),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn get_topup(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::TopUp>, HttpError> {
    caller.require_master_or_admin()?;
    let payments = service(&state)?;
    let id = parse_id(id, |text| text.parse::<TopUpId>().ok(), "top-up")?;
    let topup = state
        .store
        .topup(id)
        .await?
        .filter(|t| crate::management::extract::caller_owns(&caller, t.account_id))
        .ok_or_else(|| HttpError::not_found("top-up"))?;
    Ok(Json(view(&state, payments, &topup).await?))
}

/// A top-up as the API shows it: its status with refunds and disputes folded in.
pub(crate) async fn view(
    state: &AppState,
    payments: &Payments,
    topup: &TopUp,
) -> Result<wire::TopUp, HttpError> {
    let refunded = payments.refunded(topup).await?;
    let status = match (topup.status, topup.dispute.as_deref()) {
        (TopUpStatus::Paid, Some("open" | "lost")) => wire::TopUpState::Disputed,
        (TopUpStatus::Paid, _) if refunded >= topup.amount => wire::TopUpState::Refunded,
        (TopUpStatus::Paid, _) if refunded > Nanos::ZERO => wire::TopUpState::PartiallyRefunded,
        (TopUpStatus::Paid, _) => wire::TopUpState::Paid,
        (TopUpStatus::Pending, _) => wire::TopUpState::Pending,
        (TopUpStatus::Processing, _) => wire::TopUpState::Processing,
        (TopUpStatus::Expired, _) => wire::TopUpState::Expired,
        (TopUpStatus::Failed, _) => wire::TopUpState::Failed,
    };
    Ok(wire::TopUp {
        id: topup.id,
        account_id: topup.account_id,
        amount: money(state, topup.amount),
        status,
        origin: topup.origin.as_str().to_string(),
        checkout_url: topup
            .checkout_url
            .clone()
            .filter(|_| topup.status == TopUpStatus::Pending),
        checkout_session: topup.checkout_session.clone(),
        payment_intent: topup.payment_intent.clone(),
        refunded: money(state, refunded),
        dispute: topup.dispute.clone(),
        failure: topup.failure.clone(),
        review: topup.review.clone(),
        pack: topup.pack.clone(),
        created_at: topup.created_at,
        updated_at: topup.updated_at,
    })
}

/// Reads Stripe's event list from `since` and handles every event not handled yet, so a
/// delivery that never arrived is credited, once (admin only; `tollgate payments reconcile`).
#[utoipa::path(
    post,
    path = "/payments/reconcile",
    tag = "payments",
    request_body = wire::ReconcileRequest,
    responses(
        (status = 200, description = "What was read and handled.", body = wire::Reconciliation),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
        (status = 503, response = openapi::Status503),
    ),
    security(("admin_token" = [])),
)]
async fn reconcile(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> Result<Json<wire::Reconciliation>, HttpError> {
    caller.require_admin()?;
    let payments = service(&state)?;
    let body: wire::ReconcileRequest = body.parse()?;
    let found = payments.reconcile(body.since).await.map_err(handle_error)?;
    Ok(Json(wire::Reconciliation {
        events: found.events,
        handled: found.handled,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AccountQuery {
    /// Admin only (and required of the admin): the account.
    account_id: Option<String>,
}

pub(crate) fn auto_view(
    state: &AppState,
    account: tollgate_core::AccountId,
    rule: Option<AutoTopUp>,
) -> wire::AutoTopUp {
    let zero = Nanos::ZERO;
    wire::AutoTopUp {
        account_id: account,
        enabled: rule.as_ref().is_some_and(|r| r.enabled),
        threshold: money(state, rule.as_ref().map_or(zero, |r| r.threshold)),
        amount: money(state, rule.as_ref().map_or(zero, |r| r.amount)),
        max_per_month: rule.as_ref().map_or(0, |r| r.max_per_month),
        card_saved: rule.as_ref().is_some_and(|r| r.payment_method.is_some()),
        disabled_reason: rule.and_then(|r| r.disabled_reason),
    }
}

/// The account's automatic top-up: its rule, whether it is on, and whether a card is saved.
#[utoipa::path(
    get,
    path = "/auto-topup",
    tag = "payments",
    params(AccountQuery),
    responses(
        (status = 200, description = "The rule (off, with zeros, if never set).", body = wire::AutoTopUp),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn get_auto_topup(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AccountQuery>, QueryRejection>,
) -> Result<Json<wire::AutoTopUp>, HttpError> {
    caller.require_master_or_admin()?;
    service(&state)?;
    let query = parse_query(query)?;
    let account = subject_account(&caller, query.account_id.as_deref())?;
    let rule = state.store.auto_topup(account).await?;
    Ok(Json(auto_view(&state, account, rule)))
}

/// Turns automatic top-up on: below `threshold`, buy `amount` with the saved card, at most
/// `max_per_month` times a month. The card is the one the last checkout saved.
#[utoipa::path(
    put,
    path = "/auto-topup",
    tag = "payments",
    request_body = wire::AutoTopUpRequest,
    responses(
        (status = 200, description = "The rule, on.", body = wire::AutoTopUp),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn set_auto_topup(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> Result<Json<wire::AutoTopUp>, HttpError> {
    caller.require_master_or_admin()?;
    let payments = service(&state)?;
    let body: wire::AutoTopUpRequest = body.parse()?;
    let account = subject_account(&caller, body.account_id.as_deref())?;
    Ok(Json(
        save_auto_topup(&state, payments, account, &body).await?,
    ))
}

/// Checks and saves an automatic top-up rule, turned on, for the API and the console alike.
pub(crate) async fn save_auto_topup(
    state: &AppState,
    payments: &Payments,
    account: tollgate_core::AccountId,
    body: &wire::AutoTopUpRequest,
) -> Result<wire::AutoTopUp, HttpError> {
    let settings = payments.settings();
    let mut fields = FieldErrors::default();
    let threshold = Nanos::parse_amount(&body.threshold).unwrap_or_else(|e| {
        fields.add("threshold", e.to_string());
        Nanos::ZERO
    });
    let amount = match Nanos::parse_amount(&body.amount) {
        Ok(a)
            if a >= settings.min_topup
                && a <= settings.max_topup
                && tollgate_core::payment::credits_to_minor(a, &settings.currency).is_some() =>
        {
            a
        }
        _ => {
            fields.add(
                "amount",
                format!(
                    "must be from {} to {}, in whole cents",
                    settings.min_topup, settings.max_topup
                ),
            );
            Nanos::ZERO
        }
    };
    if !(1..=100).contains(&body.max_per_month) {
        fields.add("max_per_month", "must be from 1 to 100");
    }
    fields.finish()?;
    if state.store.account(account).await?.is_none() {
        return Err(HttpError::not_found("account"));
    }
    state
        .store
        .set_auto_topup(&AutoTopUp {
            account_id: account,
            threshold,
            amount,
            max_per_month: body.max_per_month,
            enabled: true,
            disabled_reason: None,
            customer: None,
            payment_method: None,
            updated_at: state.clock.now(),
        })
        .await?;
    let rule = state.store.auto_topup(account).await?;
    Ok(auto_view(state, account, rule))
}

/// Turns automatic top-up off (the rule and card are kept).
#[utoipa::path(
    delete,
    path = "/auto-topup",
    tag = "payments",
    params(AccountQuery),
    responses(
        (status = 200, description = "The rule, off.", body = wire::AutoTopUp),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn stop_auto_topup(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AccountQuery>, QueryRejection>,
) -> Result<Json<wire::AutoTopUp>, HttpError> {
    caller.require_master_or_admin()?;
    service(&state)?;
    let query = parse_query(query)?;
    let account = subject_account(&caller, query.account_id.as_deref())?;
    state
        .store
        .disable_auto_topup(account, None, state.clock.now())
        .await?;
    let rule = state.store.auto_topup(account).await?;
    Ok(Json(auto_view(&state, account, rule)))
}

fn handle_error(e: HandleError) -> HttpError {
    match e {
        HandleError::Store(e) => e.into(),
        HandleError::Provider(_) => ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The payment provider did not answer; nothing was changed. Try again shortly.",
        )
        .with_detail("dependency", "payments")
        .with_retry_after(DEPENDENCY_RETRY_AFTER_S)
        .into(),
        HandleError::Unconfirmed | HandleError::OverLimit => ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!(
                "The payment could not be applied now ({e}); it is applied when delivered again."
            ),
        )
        .with_detail("dependency", "store")
        .with_retry_after(DEPENDENCY_RETRY_AFTER_S)
        .into(),
    }
}

/// Stripe's webhook: the raw body, its signature checked before anything else. A bad
/// signature or body is 400 with no effect; an event the store cannot take now is 503, and
/// Stripe delivers it again. No call leaves Tollgate while Stripe waits.
#[utoipa::path(
    post,
    path = "/webhooks/stripe",
    tag = "payments",
    request_body(content = String, content_type = "application/json", description = "A Stripe event, as Stripe sent it."),
    params(("Stripe-Signature" = String, Header, description = "`t=<unix seconds>,v1=<hex HMAC-SHA256>`, one or more `v1`.")),
    responses(
        (status = 200, description = "Recorded, and handled or kept for later.", body = serde_json::Value),
        (status = 400, response = openapi::Status400),
        (status = 404, response = openapi::Status404),
        (status = 413, response = openapi::Status413),
        (status = 503, response = openapi::Status503),
    ),
)]
pub async fn stripe_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, HttpError> {
    let payments = service(&state)?;
    let limit = payments.settings().webhook_max_bytes;
    let body: Bytes = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|_| {
            HttpError::new(
                ErrorCode::PayloadTooLarge,
                format!("The event is over the {limit} bytes a webhook may be, or was cut short."),
            )
        })?
        .to_bytes();
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    match payments.receive(signature, &body).await {
        Err(DeliveryRefused::Signature(e)) => Err(HttpError::new(
            ErrorCode::BadRequest,
            format!("The webhook was refused, with no effect: {e}."),
        )),
        Err(DeliveryRefused::Malformed(e)) => Err(HttpError::new(
            ErrorCode::BadRequest,
            format!("The webhook was refused, with no effect: {e}."),
        )),
        Ok(Err(e)) => Err(handle_error(e)),
        Ok(Ok(outcome)) => Ok(Json(
            serde_json::json!({"received": true, "outcome": outcome.as_str()}),
        )),
    }
}

/// The same webhook with a trailing slash: Stripe is never redirected, whichever URL the
/// endpoint was registered with.
#[utoipa::path(
    post,
    path = "/webhooks/stripe/",
    tag = "payments",
    request_body(content = String, content_type = "application/json", description = "A Stripe event, as Stripe sent it."),
    params(("Stripe-Signature" = String, Header, description = "`t=<unix seconds>,v1=<hex HMAC-SHA256>`, one or more `v1`.")),
    responses(
        (status = 200, description = "Recorded, and handled or kept for later.", body = serde_json::Value),
        (status = 400, response = openapi::Status400),
        (status = 404, response = openapi::Status404),
        (status = 413, response = openapi::Status413),
        (status = 503, response = openapi::Status503),
    ),
)]
pub async fn stripe_webhook_slash(
    state: State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, HttpError> {
    stripe_webhook(state, headers, body).await
}
