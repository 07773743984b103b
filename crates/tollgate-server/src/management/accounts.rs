//! Accounts: create, list, read, edit, suspend and reactivate.

use crate::edge::idempotency::CarriesSecret;
use crate::http::error::FieldErrors;
use crate::http::error::HttpError;
use crate::management::audit;
use crate::management::audit::Change;
use crate::management::extract::Caller;
use crate::management::extract::{caller_owns, parse_id, JsonBody};
use crate::management::keys::{key_view, new_key};
use crate::management::openapi;
use crate::state::AppState;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Deserialize;
use tollgate_core::{AccountId, KeyKind, Nanos, RequestId};
use tollgate_store::Account;
use tollgate_wire::api::{self as wire, CreateAccountRequest};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Creates an account with a wallet and a master key (admin only).
#[utoipa::path(
    post,
    path = "/accounts",
    tag = "accounts",
    request_body = CreateAccountRequest,
    responses(
        (status = 201, description = "The account and its first master key (the secret is shown only here).", body = wire::CreateAccountResponse),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
    ),
    security(("admin_token" = [])),
)]
async fn create_account(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: JsonBody,
) -> Result<impl IntoResponse, HttpError> {
    caller.require_admin()?;
    let body: CreateAccountRequest = body.parse()?;
    let mut fields = FieldErrors::default();
    let name = fields.name("name", &body.name);
    let starter_credits = match &body.starter_credits {
        None => state.config.starter_credits,
        Some(text) => Nanos::parse_amount(text)
            .map_err(|e| fields.add("starter_credits", e.to_string()))
            .unwrap_or_default(),
    };
    fields.finish()?;

    let account_id = AccountId::new();
    let (secret, master) = new_key(
        &state,
        account_id,
        KeyKind::Master,
        "master",
        vec!["*".into()],
        None,
    );
    let now = state.clock.now();
    let mut account = state
        .store
        .create_account(account_id, &name, starter_credits, master.clone(), now)
        .await?;
    if body.max_keys.is_some() {
        account.max_keys = body.max_keys;
        account = write_account(&state, &account).await?;
    }
    tracing::info!(account = %account_id, key = %master.id, "account created");
    let view = account_view(&state, &account);
    let change = Change::new("account.create", account_id).after(&view);
    audit::record(&state, &caller, request_id, change).await;
    let response = wire::CreateAccountResponse {
        account: view,
        master_key: wire::CreatedKey {
            key: key_view(&master, &state),
            secret: secret.expose().to_string(),
        },
    };
    Ok((
        StatusCode::CREATED,
        Extension(CarriesSecret),
        Json(response),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListAccountsQuery {
    /// Only accounts with this status: `active` or `suspended`.
    status: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1 to 500; default 50.
    limit: Option<u32>,
}

/// The admin's listing of every account (paged, `?status=active|suspended`); a master key sees
/// its own account alone.
#[utoipa::path(
    get,
    path = "/accounts",
    tag = "accounts",
    params(ListAccountsQuery),
    responses(
        (status = 200, description = "One page of accounts, oldest first.", body = wire::Page<wire::Account>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn list_accounts(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListAccountsQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::Account>>, HttpError> {
    caller.require_master_or_admin()?;
    let query = crate::management::extract::parse_query(query)?;
    let limit = crate::management::extract::page_limit(query.limit)?;
    let mut fields = FieldErrors::default();
    let status = query.status.as_deref();
    if status.is_some_and(|s| !matches!(s, "active" | "suspended")) {
        fields.add("status", "must be active or suspended");
    }
    let after = query.cursor.as_deref().and_then(|c| {
        let parsed = AccountId::parse(c);
        if parsed.is_none() {
            fields.add("cursor", "is not a cursor from a previous page");
        }
        parsed
    });
    fields.finish()?;
    state.ledger.flush().await?;
    let accounts = match &caller {
        Caller::Admin => state.store.accounts(after, status, limit + 1).await?,
        Caller::Key(key) => {
            let own = state.store.account(key.account_id).await?;
            own.filter(|a| after.is_none() && status.is_none_or(|s| s == a.status))
                .into_iter()
                .collect()
        }
    };
    let (accounts, next_cursor) =
        crate::management::extract::page(accounts, limit, |a: &Account| a.id.to_string());
    Ok(Json(wire::Page {
        data: accounts.iter().map(|a| account_view(&state, a)).collect(),
        next_cursor,
    }))
}

/// An account (the admin's of any, a master key's of its own).
#[utoipa::path(
    get,
    path = "/accounts/{id}",
    tag = "accounts",
    params(("id" = AccountId, Path, description = "The account's id.")),
    responses(
        (status = 200, description = "The account, with its current balance.", body = wire::Account),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn get_account(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::Account>, HttpError> {
    let id = visible_account(&caller, id)?;
    let account = current_account(&state, id).await?;
    Ok(Json(account_view(&state, &account)))
}

/// The account id in the path, if the caller may see that account (else 404, as for none).
fn visible_account(
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<AccountId, HttpError> {
    caller.require_master_or_admin()?;
    let id = parse_id(id, AccountId::parse, "account")?;
    if !caller_owns(caller, id) {
        return Err(HttpError::not_found("account"));
    }
    Ok(id)
}

/// The account as stored now; the ledger is flushed first, so its balance is current.
async fn current_account(state: &AppState, id: AccountId) -> Result<Account, HttpError> {
    state.ledger.flush().await?;
    state
        .store
        .account(id)
        .await?
        .ok_or_else(|| HttpError::not_found("account"))
}

/// Writes the account's settings; the account as now stored.
async fn write_account(state: &AppState, account: &Account) -> Result<Account, HttpError> {
    state
        .store
        .update_account(account)
        .await?
        .ok_or_else(|| HttpError::not_found("account"))
}

/// Renames an account, changes its key limit or its rate-limit overrides (admin only).
#[utoipa::path(
    patch,
    path = "/accounts/{id}",
    tag = "accounts",
    params(("id" = AccountId, Path, description = "The account's id.")),
    request_body = wire::UpdateAccountRequest,
    responses(
        (status = 200, description = "The account as now stored.", body = wire::Account),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn update_account(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<Json<wire::Account>, HttpError> {
    let id = visible_account(&caller, id)?;
    caller.require_admin()?;
    let body: wire::UpdateAccountRequest = body.parse()?;
    let mut fields = FieldErrors::default();
    let name = match &body.name {
        None => None,
        Some(None) => {
            fields.add("name", "cannot be cleared");
            None
        }
        Some(Some(name)) => Some(fields.name("name", name)),
    };
    let rate_limits = body
        .rate_limits
        .map(|set| fields.rate_limits(&state, set.unwrap_or_default(), true));
    fields.finish()?;
    let mut account = current_account(&state, id).await?;
    let before = account_view(&state, &account);
    account.name = name.unwrap_or(account.name);
    account.max_keys = body.max_keys.unwrap_or(account.max_keys);
    account.rate_limits = rate_limits.unwrap_or(account.rate_limits);
    let account = write_account(&state, &account).await?;
    // The account's overrides travel with its keys' cache entries.
    state.keys.invalidate_account(id);
    tracing::info!(account = %id, "account updated");
    let view = account_view(&state, &account);
    let change = Change::new("account.update", id)
        .before(&before)
        .after(&view);
    audit::record(&state, &caller, request_id, change).await;
    Ok(Json(view))
}

/// Suspends an account (admin only): every key of it is refused until it is reactivated.
#[utoipa::path(
    post,
    path = "/accounts/{id}/suspend",
    tag = "accounts",
    params(("id" = AccountId, Path, description = "The account's id.")),
    responses(
        (status = 200, description = "The suspended account. Its keys get 403 `forbidden` from their next request.", body = wire::Account),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn suspend_account(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::Account>, HttpError> {
    set_account_status(state, caller, request_id, id, "suspended").await
}

/// Reactivates a suspended account (admin only).
#[utoipa::path(
    post,
    path = "/accounts/{id}/reactivate",
    tag = "accounts",
    params(("id" = AccountId, Path, description = "The account's id.")),
    responses(
        (status = 200, description = "The active account.", body = wire::Account),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn reactivate_account(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::Account>, HttpError> {
    set_account_status(state, caller, request_id, id, "active").await
}

/// Suspends or reactivates an account (admin only); its keys follow from their next request.
/// Setting the status it already has is not an error.
async fn set_account_status(
    state: AppState,
    caller: Caller,
    request_id: RequestId,
    id: Result<Path<String>, PathRejection>,
    status: &str,
) -> Result<Json<wire::Account>, HttpError> {
    let id = visible_account(&caller, id)?;
    Ok(Json(
        change_status(&state, &caller, request_id, id, status).await?,
    ))
}

/// Suspends (`"suspended"`) or reactivates (`"active"`) an account as the admin's API does,
/// audited, its keys' cache entries dropped; for the API and the console alike.
pub(crate) async fn change_status(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    id: AccountId,
    status: &str,
) -> Result<wire::Account, HttpError> {
    caller.require_admin()?;
    let mut account = current_account(state, id).await?;
    let before = account.status.clone();
    account.status = status.to_string();
    let account = write_account(state, &account).await?;
    state.keys.invalidate_account(id);
    tracing::info!(account = %id, status, "account status changed");
    let action = if status == "active" {
        "account.reactivate"
    } else {
        "account.suspend"
    };
    let change = Change::new(action, id)
        .before(&serde_json::json!({ "status": before }))
        .after(&serde_json::json!({ "status": account.status }));
    audit::record(state, caller, request_id, change).await;
    Ok(account_view(state, &account))
}

pub(crate) fn account_view(state: &AppState, account: &Account) -> wire::Account {
    wire::Account {
        id: account.id,
        name: account.name.clone(),
        status: account.status.clone(),
        balance: wire::Money::new(account.balance, &state.config.currency),
        max_keys: account
            .max_keys
            .unwrap_or(state.config.max_keys_per_account),
        rate_limits: account.rate_limits.clone(),
        created_at: account.created_at,
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_account, list_accounts))
        .routes(routes!(get_account, update_account))
        .routes(routes!(suspend_account))
        .routes(routes!(reactivate_account))
}
