//! Money in the management API: credits, balance, ledger, the billing API's holds, the usage log,
//! and the fee on metered management calls.
//!
//! Reads come from the store after [`Ledger::flush`], so a caller always sees its own writes. A
//! billing-API hold is read with this node's book laid over the store's record instead: the book
//! has every resolution this node queued and has not stored yet.

use crate::billing::ledger::{GrantRefused, Granted, HoldRefused, HoldSpec, ResolveFailed};
use crate::http::error::validation;
use crate::http::error::FieldErrors;
use crate::http::error::HttpError;
use crate::management::extract::Caller;
use crate::management::extract::{caller_owns, parse_id, JsonBody};
use crate::management::extract::{page, page_limit, parse_query};
use crate::management::fee::ManagementFee;
use crate::management::openapi;
use crate::state::AppState;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use std::time::Duration;
use tollgate_core::ledger::{BillingStatus, HoldStatus, Resolve};
use tollgate_core::money::MAX_AMOUNT;
use tollgate_core::{AccountId, ApiError, ErrorCode, HoldId, KeyId, KeyKind, Nanos, RequestId};
use tollgate_store::{BalanceSheet, HoldRecord, HoldSource, UsageFilter, UsageGroup, UsageRow};
use tollgate_wire::api::{self as wire, Money};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const DEFAULT_HOLD_TTL_S: u64 = 3600;
const MAX_HOLD_TTL_S: u64 = 7 * 24 * 3600;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(grant_credits))
        .routes(routes!(balance))
        .routes(routes!(ledger_entries))
        .routes(routes!(create_hold))
        .routes(routes!(get_hold))
        .routes(routes!(settle_hold))
        .routes(routes!(release_hold))
        .routes(routes!(list_requests))
        .routes(routes!(get_request))
        .routes(routes!(usage_summary))
}

pub(crate) fn money(state: &AppState, amount: Nanos) -> Money {
    Money::new(amount, &state.config.currency)
}

/// The account a call is about: the caller's own, or (admin) the one named.
pub(crate) fn subject_account(
    caller: &Caller,
    named: Option<&str>,
) -> Result<AccountId, HttpError> {
    let named = named
        .map(|text| {
            AccountId::parse(text)
                .ok_or_else(|| validation("account_id", "is not an account id (acct_...)"))
        })
        .transpose()?;
    match (caller, named) {
        (Caller::Admin, Some(id)) => Ok(id),
        (Caller::Admin, None) => Err(validation(
            "account_id",
            "is required when the admin makes this call",
        )),
        (Caller::Key(key), Some(id)) if id != key.account_id => {
            Err(HttpError::not_found("account"))
        }
        (Caller::Key(key), _) => Ok(key.account_id),
    }
}

// ---------------------------------------------------------------------------------------------
// Credits, balance, ledger

/// Adds prepaid credits to an account's wallet (admin only).
#[utoipa::path(
    post,
    path = "/accounts/{id}/credits",
    tag = "billing",
    params(("id" = AccountId, Path, description = "The account's id.")),
    request_body = wire::GrantRequest,
    responses(
        (status = 200, description = "The wallet after the grant.", body = wire::Balance),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn grant_credits(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<axum::response::Response, HttpError> {
    caller.require_admin()?;
    let account = parse_id(id, AccountId::parse, "account")?;
    let body: wire::GrantRequest = body.parse()?;
    let (balance, outcome) = grant(&state, &caller, request_id, account, body).await?;
    let mut response = Json(balance).into_response();
    response
        .headers_mut()
        .insert("x-tollgate-grant", http::HeaderValue::from_static(outcome));
    Ok(response)
}

/// Grants credits as `POST /accounts/{id}/credits` does, for the API and the console alike:
/// the wallet after it, and whether it was `applied` or (a repeated reference)
/// `already_applied`.
pub(crate) async fn grant(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    account: AccountId,
    body: wire::GrantRequest,
) -> Result<(wire::Balance, &'static str), HttpError> {
    caller.require_admin()?;
    let mut fields = FieldErrors::default();
    let amount = match Nanos::parse_amount(&body.amount) {
        Ok(n) if n > Nanos::ZERO => n,
        Ok(_) => {
            fields.add("amount", "must be more than zero");
            Nanos::ZERO
        }
        Err(e) => {
            fields.add("amount", e.to_string());
            Nanos::ZERO
        }
    };
    if amount > MAX_AMOUNT {
        fields.add("amount", format!("must be at most {MAX_AMOUNT} credits"));
    }
    let reason = fields.name("reason", &body.reason);
    let reference = body.reference.as_deref();
    if reference
        .is_some_and(|r| !(1..=128).contains(&r.len()) || !r.bytes().all(|b| b.is_ascii_graphic()))
    {
        fields.add("reference", "must be 1 to 128 printable ASCII characters");
    }
    fields.finish()?;
    if state.store.account(account).await?.is_none() {
        return Err(HttpError::not_found("account"));
    }
    let filed_under = match reference {
        Some(reference) => format!("grant:{reference}"),
        None => request_id.to_string(),
    };
    let granted = state
        .ledger
        .grant(account, amount, &reason, &filed_under, reference.is_some())
        .await
        .map_err(|refused| grant_refused(refused, reference.is_some()))?;
    let outcome = match granted {
        Granted::AlreadyApplied => {
            tracing::info!(%account, reference = ?reference, "grant already applied; not applied again");
            "already_applied"
        }
        Granted::Applied => {
            tracing::info!(%account, amount = %amount, "credits granted");
            let change = crate::management::audit::Change::new("credits.grant", account).after(
                &serde_json::json!({
                    "amount": wire::Money::new(amount, &state.config.currency),
                    "reason": reason,
                }),
            );
            crate::management::audit::record(state, caller, request_id, change).await;
            "applied"
        }
    };
    Ok((read_balance(state, account).await?, outcome))
}

/// A grant that was not applied, or not confirmed: never "nothing changed" when something may
/// have.
fn grant_refused(refused: GrantRefused, has_reference: bool) -> HttpError {
    match refused {
        GrantRefused::OverLimit => validation(
            "amount",
            format!("would take the balance over the limit of {MAX_AMOUNT} credits"),
        ),
        GrantRefused::Store(e) => e.into(),
        GrantRefused::Unconfirmed => {
            let retry = if has_reference {
                "Retry with the same reference to confirm it: it is never applied twice."
            } else {
                "Check the balance before granting again, or send a reference to make retries safe."
            };
            ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!("The store has not confirmed this grant. It is queued and will be applied when the store answers. {retry}"),
            )
            .with_detail("dependency", "store")
            .with_detail("grant", "queued")
            .with_retry_after(crate::http::error::DEPENDENCY_RETRY_AFTER_S)
            .into()
        }
    }
}

pub(crate) async fn read_balance(
    state: &AppState,
    account: AccountId,
) -> Result<wire::Balance, HttpError> {
    state.ledger.flush().await?;
    let BalanceSheet {
        wallet,
        spent_in_month,
    } = state
        .store
        .balance_sheet(account, state.clock.now())
        .await?
        .ok_or_else(|| HttpError::not_found("account"))?;
    Ok(wire::Balance {
        account_id: account,
        available: money(state, wallet.available),
        held: money(state, wallet.held),
        spent_this_month: money(state, spent_in_month),
        debt: money(state, wallet.debt),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AccountQuery {
    /// Admin only (and required of the admin): the account to read.
    account_id: Option<String>,
}

/// The caller's wallet: available, held and spent this month.
#[utoipa::path(
    get,
    path = "/billing/balance",
    tag = "billing",
    params(AccountQuery),
    responses(
        (status = 200, description = "The wallet now.", body = wire::Balance),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn balance(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AccountQuery>, QueryRejection>,
) -> Result<Json<wire::Balance>, HttpError> {
    caller.require_master_or_admin()?;
    let query = parse_query(query)?;
    let account = subject_account(&caller, query.account_id.as_deref())?;
    Ok(Json(read_balance(&state, account).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LedgerQuery {
    /// Admin only (and required of the admin): the account to read.
    account_id: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1 to 500; default 50.
    limit: Option<u32>,
}

/// The account's double-entry ledger.
#[utoipa::path(
    get,
    path = "/ledger",
    tag = "billing",
    params(LedgerQuery),
    responses(
        (status = 200, description = "One page of entries, in commit order.", body = wire::Page<wire::LedgerEntry>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn ledger_entries(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<LedgerQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::LedgerEntry>>, HttpError> {
    caller.require_master_or_admin()?;
    let query = parse_query(query)?;
    let account = subject_account(&caller, query.account_id.as_deref())?;
    let limit = page_limit(query.limit)?;
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| validation("cursor", "is not a cursor from a previous page"))
        })
        .transpose()?;
    Ok(Json(ledger_page(&state, account, before, limit).await?))
}

/// One page of an account's ledger, newest first, after the writer has committed what is
/// queued: `GET /ledger`'s answer, and the console's wallet page.
pub(crate) async fn ledger_page(
    state: &AppState,
    account: AccountId,
    before: Option<i64>,
    limit: u32,
) -> Result<wire::Page<wire::LedgerEntry>, HttpError> {
    state.ledger.flush().await?;
    let rows = state.store.transfers(account, before, limit + 1).await?;
    let (rows, next_cursor) = page(rows, limit, |r| r.seq.to_string());
    Ok(wire::Page {
        data: rows
            .into_iter()
            .map(|r| wire::LedgerEntry {
                seq: r.seq,
                from: r.debit,
                to: r.credit,
                amount: money(state, r.amount),
                kind: r.kind,
                memo: r.memo,
                reference: r.reference,
                created_at: r.created_at,
            })
            .collect(),
        next_cursor,
    })
}

// ---------------------------------------------------------------------------------------------
// Billing API: holds for the operator's own work

fn hold_view(state: &AppState, record: &HoldRecord) -> wire::HoldInfo {
    let hold = &record.hold;
    wire::HoldInfo {
        id: hold.id,
        account_id: hold.account,
        key_id: hold.key,
        amount: money(state, hold.amount),
        charged: money(state, hold.charged),
        status: hold.status.as_str().to_string(),
        metadata: record.metadata.clone(),
        created_at: hold.created_at,
        expires_at: hold.expires_at,
        resolved_at: hold.resolved_at,
    }
}

/// Reserves credit for work done outside the gateway; settle or release it once.
#[utoipa::path(
    post,
    path = "/holds",
    tag = "holds",
    request_body = wire::CreateHoldRequest,
    responses(
        (status = 201, description = "The pending hold.", body = wire::HoldInfo),
        (status = 400, response = openapi::Status400),
        (status = 402, response = openapi::Status402),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn create_hold(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: JsonBody,
) -> Result<impl IntoResponse, HttpError> {
    let body: wire::CreateHoldRequest = body.parse()?;
    let mut fields = FieldErrors::default();
    let amount = Nanos::parse_amount(&body.amount)
        .map_err(|e| fields.add("amount", e.to_string()))
        .unwrap_or_default();
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_HOLD_TTL_S);
    if !(1..=MAX_HOLD_TTL_S).contains(&ttl) {
        fields.add(
            "ttl_seconds",
            format!("must be between 1 and {MAX_HOLD_TTL_S}"),
        );
    }
    let metadata = body
        .metadata
        .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    if !metadata.is_object() || metadata.to_string().len() > 16 * 1024 {
        fields.add("metadata", "must be a JSON object of at most 16 KiB");
    }
    if matches!(caller, Caller::Key(_)) && body.account_id.is_some() {
        fields.add(
            "account_id",
            "is for the admin; a key holds from its own account",
        );
    }
    fields.finish()?;
    let account = subject_account(&caller, body.account_id.as_deref())?;
    // A key's account exists, and a book holding the whole wallet refuses a hold while the
    // account owes; only a shared store's book (a lease) needs the debt read.
    let account_debt = match &caller {
        Caller::Key(_) if !state.ledger.shared() => Nanos::ZERO,
        _ => match state.store.wallet(account).await? {
            Some(wallet) => wallet.debt,
            None => return Err(HttpError::not_found("account")),
        },
    };
    let (key, key_cap) = match &caller {
        Caller::Key(key) => (Some(key.id), key.monthly_spend_cap),
        Caller::Admin => (None, None),
    };
    let fee = ManagementFee::hold(&state, &caller, request_id).await?;
    let hold = state
        .ledger
        .open(HoldSpec {
            account,
            key,
            key_cap,
            account_debt,
            amount,
            ttl: Duration::from_secs(ttl),
            source: HoldSource::Api,
            request_id: Some(request_id),
            metadata: metadata.clone(),
        })
        .await
        .map_err(|refused: HoldRefused| {
            crate::billing::refusal::refused_error(refused, amount, &state.config.currency)
        })?;
    fee.settle();
    let record = HoldRecord {
        hold,
        source: HoldSource::Api,
        request_id: Some(request_id),
        metadata,
    };
    Ok((StatusCode::CREATED, Json(hold_view(&state, &record))))
}

/// A billing-API hold the caller may see and resolve: kept in memory while this node's book has
/// it, or else the store's record with the state the book has laid over it (a resolution not
/// stored yet is newer). No flush is needed: a hold's id is answered only once its opening is
/// stored. Everything else answers 404
/// exactly like a missing hold: a data-plane request's hold (only its request settles it),
/// another account's hold, and, for a usage key, a hold another key of its account opened.
async fn owned_hold(
    state: &AppState,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<HoldRecord, HttpError> {
    let id = parse_id(id, HoldId::parse, "hold")?;
    let record = match state.ledger.api_hold(id) {
        Some(record) => Some(record),
        None => {
            // The book first: once it forgets a hold, the store has the hold's last state.
            let in_book = state.ledger.held(id);
            state.store.hold(id).await?.map(|mut record| {
                if let Some(hold) = in_book {
                    record.hold = hold;
                }
                record
            })
        }
    };
    match record {
        Some(record) if record.source == HoldSource::Api && may_resolve(caller, &record) => {
            Ok(record)
        }
        _ => Err(HttpError::not_found("hold")),
    }
}

/// Who may read, settle and release a billing-API hold: the admin, the account's master keys,
/// and the usage key that opened it.
fn may_resolve(caller: &Caller, record: &HoldRecord) -> bool {
    match caller {
        Caller::Admin => true,
        Caller::Key(key) if key.account_id != record.hold.account => false,
        Caller::Key(key) => key.kind == KeyKind::Master || record.hold.key == Some(key.id),
    }
}

/// A hold and what became of it.
#[utoipa::path(
    get,
    path = "/holds/{id}",
    tag = "holds",
    params(("id" = HoldId, Path, description = "The hold's id.")),
    responses(
        (status = 200, description = "The hold.", body = wire::HoldInfo),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn get_hold(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::HoldInfo>, HttpError> {
    let record = owned_hold(&state, &caller, id).await?;
    Ok(Json(hold_view(&state, &record)))
}

/// Charges the actual cost of a hold (at most the amount held) and releases the rest.
#[utoipa::path(
    post,
    path = "/holds/{id}/settle",
    tag = "holds",
    params(("id" = HoldId, Path, description = "The hold's id.")),
    request_body = wire::SettleHoldRequest,
    responses(
        (status = 200, description = "The settled hold; the rest of the reservation is released.", body = wire::HoldInfo),
        (status = 400, response = openapi::Status400),
        (status = 404, response = openapi::Status404),
        (status = 409, response = openapi::Status409),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn settle_hold(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<Json<wire::HoldInfo>, HttpError> {
    let record = owned_hold(&state, &caller, id).await?;
    let body: wire::SettleHoldRequest = body.parse()?;
    let amount =
        Nanos::parse_amount(&body.amount).map_err(|e| validation("amount", e.to_string()))?;
    // Settling a resolved hold again answers its first outcome, whatever the amount.
    if record.hold.status == HoldStatus::Pending && amount > record.hold.amount {
        return Err(validation(
            "amount",
            format!(
                "must be at most the amount held ({} {})",
                record.hold.amount, state.config.currency
            ),
        ));
    }
    resolve(&state, record, Resolve::Settle(amount)).await
}

/// Releases a hold without charging anything.
#[utoipa::path(
    post,
    path = "/holds/{id}/release",
    tag = "holds",
    params(("id" = HoldId, Path, description = "The hold's id.")),
    responses(
        (status = 200, description = "The released hold; nothing was charged.", body = wire::HoldInfo),
        (status = 404, response = openapi::Status404),
        (status = 409, response = openapi::Status409),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn release_hold(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::HoldInfo>, HttpError> {
    let record = owned_hold(&state, &caller, id).await?;
    resolve(&state, record, Resolve::Release).await
}

async fn resolve(
    state: &AppState,
    mut record: HoldRecord,
    how: Resolve,
) -> Result<Json<wire::HoldInfo>, HttpError> {
    record.hold = match state.ledger.resolve_durably(&record, how).await {
        Ok(hold) => hold,
        Err(ResolveFailed::Store(e)) => return Err(e.into()),
        // Never "nothing changed": the outcome is decided and will be stored.
        Err(ResolveFailed::Queued) => {
            return Err(ApiError::new(
                ErrorCode::ServiceUnavailable,
                "The store has not confirmed this yet: it is queued and applied when the store answers. Retrying is safe: a hold resolves once, and a retry answers its outcome.",
            )
            .with_detail("dependency", "store")
            .with_retry_after(crate::http::error::DEPENDENCY_RETRY_AFTER_S)
            .into())
        }
    };
    Ok(Json(hold_view(state, &record)))
}

// ---------------------------------------------------------------------------------------------
// Usage log

pub(crate) fn usage_view(state: &AppState, row: UsageRow) -> wire::UsageRecord {
    wire::UsageRecord {
        request_id: row.request_id,
        client_request_id: row.client_request_id,
        account_id: row.account_id,
        key_id: row.key_id,
        route: row.route,
        model: row.model,
        method: row.method,
        path: row.path,
        status: row.status,
        upstream_status: row.upstream_status,
        units: row.units,
        input_tokens: row.tokens.map(|t| t.input),
        cached_input_tokens: row.tokens.map(|t| t.cached_input),
        output_tokens: row.tokens.map(|t| t.output),
        cost: money(state, row.cost),
        hold: money(state, row.hold),
        over_hold: row.uncovered > Nanos::ZERO,
        uncovered: money(state, row.uncovered),
        billing_status: row.billing_status.as_str().to_string(),
        latency_ms: row.latency_ms,
        error_code: row.error_code,
        error_message: row.error_message,
        replay_of: row.replay_of,
        created_at: row.created_at,
        completed_at: row.completed_at,
    }
}

/// Which requests to list: the API's query, and the console's filters, read alike.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RequestsQuery {
    /// Admin only: one account's requests; every account's if omitted.
    pub account_id: Option<String>,
    /// Only this key's requests.
    pub key_id: Option<String>,
    /// Only this route's requests (its prefix, `/v1`).
    pub route: Option<String>,
    /// Only requests for this model.
    pub model: Option<String>,
    /// Only requests answered with this status.
    pub status: Option<u16>,
    /// Only requests answered with a status of this class.
    #[param(inline)]
    pub status_class: Option<StatusClass>,
    /// Only requests refused or failed with this error code (`insufficient_balance`).
    pub error_code: Option<String>,
    /// Only requests billed so.
    #[param(inline)]
    pub billing_status: Option<BillingFilter>,
    /// From this instant (inclusive, RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Before this instant (exclusive, RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 500; default 50.
    pub limit: Option<u32>,
}

/// A class of HTTP statuses, by its hundreds.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
pub enum StatusClass {
    #[serde(rename = "1xx")]
    Informational,
    #[serde(rename = "2xx")]
    Success,
    #[serde(rename = "3xx")]
    Redirection,
    #[serde(rename = "4xx")]
    ClientError,
    #[serde(rename = "5xx")]
    ServerError,
}

impl StatusClass {
    fn hundreds(self) -> u8 {
        match self {
            StatusClass::Informational => 1,
            StatusClass::Success => 2,
            StatusClass::Redirection => 3,
            StatusClass::ClientError => 4,
            StatusClass::ServerError => 5,
        }
    }
}

/// How a request was billed, as a filter names it.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BillingFilter {
    Settled,
    Partial,
    Estimated,
    Released,
    Expired,
}

impl BillingFilter {
    fn status(self) -> BillingStatus {
        match self {
            BillingFilter::Settled => BillingStatus::Settled,
            BillingFilter::Partial => BillingStatus::Partial,
            BillingFilter::Estimated => BillingStatus::Estimated,
            BillingFilter::Released => BillingStatus::Released,
            BillingFilter::Expired => BillingStatus::Expired,
        }
    }
}

/// The store's filter for `query` as `caller` may ask it (the admin over every account, a master
/// key over its own), asking for one row more than the page so the page knows if there is a next.
pub fn requests_filter(caller: &Caller, query: RequestsQuery) -> Result<UsageFilter, HttpError> {
    caller.require_master_or_admin()?;
    let mut problems = FieldErrors::default();
    if query.status.is_some_and(|s| !(100..=599).contains(&s)) {
        problems.add("status", "must be an HTTP status, 100 to 599");
    }
    let key = query.key_id.as_deref().and_then(|k| {
        let key = KeyId::parse(k);
        if key.is_none() {
            problems.add("key_id", "is not a key id (key_...)");
        }
        key
    });
    let before = query.cursor.as_deref().and_then(|c| {
        let before = RequestId::parse(c);
        if before.is_none() {
            problems.add("cursor", "is not a cursor from a previous page");
        }
        before
    });
    let limit = page_limit(query.limit)?;
    problems.finish()?;
    // The admin may list every account's requests; a master key sees its own.
    let account = match (caller, &query.account_id) {
        (Caller::Admin, None) => None,
        _ => Some(subject_account(caller, query.account_id.as_deref())?),
    };
    Ok(UsageFilter {
        account,
        key,
        route: query.route,
        model: query.model,
        status: query.status,
        status_class: query.status_class.map(StatusClass::hundreds),
        error_code: query.error_code,
        billing_status: query.billing_status.map(BillingFilter::status),
        from: query.from,
        to: query.to,
        before,
        limit: limit + 1,
    })
}

/// The data-plane request log, newest first: the admin's of every account (or `?account_id=`), a
/// master key's of its own.
#[utoipa::path(
    get,
    path = "/requests",
    tag = "usage",
    params(RequestsQuery),
    responses(
        (status = 200, description = "One page of data-plane requests, newest first.", body = wire::Page<wire::UsageRecord>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn list_requests(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<RequestsQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::UsageRecord>>, HttpError> {
    let filter = requests_filter(&caller, parse_query(query)?)?;
    state.ledger.flush().await?;
    let rows = state.store.requests(&filter).await?;
    let (rows, next_cursor) = page(rows, filter.limit - 1, |r| r.request_id.to_string());
    Ok(Json(wire::Page {
        data: rows.into_iter().map(|r| usage_view(&state, r)).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UsageQuery {
    /// Admin only (and required of the admin): the account to sum.
    account_id: Option<String>,
    /// `day` (default, UTC), `key`, `route` or `model`.
    group_by: Option<String>,
    /// From this instant (inclusive, RFC 3339).
    from: Option<DateTime<Utc>>,
    /// Before this instant (exclusive, RFC 3339).
    to: Option<DateTime<Utc>>,
}

/// An account's usage totals per day, key, route or model, over `[from, to)`.
#[utoipa::path(
    get,
    path = "/usage",
    tag = "usage",
    params(UsageQuery),
    responses(
        (status = 200, description = "Totals per group.", body = wire::UsageSummary),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn usage_summary(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<wire::UsageSummary>, HttpError> {
    caller.require_master_or_admin()?;
    let query = parse_query(query)?;
    let account = subject_account(&caller, query.account_id.as_deref())?;
    let group_by = query.group_by.unwrap_or_else(|| "day".into());
    let group = match group_by.as_str() {
        "day" => UsageGroup::Day,
        "key" => UsageGroup::Key,
        "route" => UsageGroup::Route,
        "model" => UsageGroup::Model,
        _ => return Err(validation("group_by", "must be day, key, route or model")),
    };
    if let (Some(from), Some(to)) = (query.from, query.to) {
        if from > to {
            return Err(validation("to", "must not be before from"));
        }
    }
    state.ledger.flush().await?;
    let buckets = state
        .store
        .usage_summary(account, group, query.from, query.to)
        .await?;
    let (api_holds, api_cost) = state
        .store
        .api_charges(account, query.from, query.to)
        .await?;
    let cost = buckets.iter().fold(api_cost, |total, b| {
        tollgate_core::pricing::add(total, b.cost)
    });
    Ok(Json(wire::UsageSummary {
        account_id: account,
        group_by,
        from: query.from,
        to: query.to,
        billing_api: wire::BillingApiTotals {
            holds: api_holds,
            cost: money(&state, api_cost),
        },
        cost: money(&state, cost),
        data: buckets
            .into_iter()
            .map(|b| wire::UsageTotals {
                group: b.group,
                requests: b.requests,
                errors: b.errors,
                input_tokens: b.input_tokens,
                cached_input_tokens: b.cached_input_tokens,
                output_tokens: b.output_tokens,
                cost: money(&state, b.cost),
            })
            .collect(),
    }))
}

/// One data-plane request, by the request ID it was answered with.
#[utoipa::path(
    get,
    path = "/requests/{id}",
    tag = "usage",
    params(("id" = RequestId, Path, description = "The request's id.")),
    responses(
        (status = 200, description = "The request: route, status, tokens, cost and billing outcome.", body = wire::UsageRecord),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn get_request(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::UsageRecord>, HttpError> {
    caller.require_master_or_admin()?;
    let id = parse_id(id, RequestId::parse, "request")?;
    state.ledger.flush().await?;
    match state.store.request(id).await? {
        Some(row) if caller_owns(&caller, row.account_id) => Ok(Json(usage_view(&state, row))),
        _ => Err(ApiError::new(ErrorCode::NotFound, "No such request.").into()),
    }
}
