//! The management API under the configured prefix (default `/api/v1`).
//!
//! Handlers are thin: extract, authorise, call the store, shape the answer. **Architecture
//! Invariant:** every handler that takes an id checks that the caller owns it, and answers
//! another account's resource exactly as one that does not exist (404 `not_found`).

use crate::audit::{self, Change};
use crate::auth::Caller;
use crate::error::HttpError;
use crate::limits;
use crate::openapi;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, OriginalUri, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::{DurationRound, TimeDelta};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::{
    access, AccountId, ApiError, ApiKey, ErrorCode, KeyId, KeyKind, KeyStatus, Nanos, RequestId,
};
use tollgate_store::{Account, InsertKeyOutcome, KeyChange, KeyRecord, NewKey, RevokeOutcome};
use tollgate_wire::api::{self as wire, CreateAccountRequest, CreateKeyRequest};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The largest management request body read.
const MAX_BODY_BYTES: usize = 1024 * 1024;
const MAX_NAME_CHARS: usize = 200;
const MAX_SCOPES: usize = 100;
const MAX_ALLOWED_IPS: usize = 100;
/// The longest a rolled key's previous secret may keep working.
const MAX_ROLL_GRACE_SECONDS: u64 = 7 * 24 * 3600;

/// The management API and its OpenAPI description, declared together so neither can drift.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_account, list_accounts))
        .routes(routes!(get_account, update_account))
        .routes(routes!(suspend_account))
        .routes(routes!(reactivate_account))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(get_key, update_key))
        .routes(routes!(revoke_key))
        .routes(routes!(roll_key))
        .routes(routes!(current_key))
        .merge(crate::billing_api::router())
        .merge(crate::audit::router())
}

// ---------------------------------------------------------------------------------------------
// Handlers

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
    let query = crate::billing_api::parse_query(query)?;
    let limit = crate::billing_api::page_limit(query.limit)?;
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
        crate::billing_api::page(accounts, limit, |a: &Account| a.id.to_string());
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
    caller.require_admin()?;
    let mut account = current_account(&state, id).await?;
    let before = account.status.clone();
    account.status = status.to_string();
    let account = write_account(&state, &account).await?;
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
    audit::record(&state, &caller, request_id, change).await;
    Ok(Json(account_view(&state, &account)))
}

/// Creates an API key (a master key for its own account; the admin for any).
#[utoipa::path(
    post,
    path = "/keys",
    tag = "keys",
    request_body = CreateKeyRequest,
    responses(
        (status = 201, description = "The key; its secret is shown only here.", body = wire::CreatedKey),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn create_key(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: JsonBody,
) -> Result<impl IntoResponse, HttpError> {
    caller.require_master_or_admin()?;
    let body: CreateKeyRequest = body.parse()?;
    let mut fields = FieldErrors::default();
    let name = fields.name("name", &body.name);
    let account_id = match (&caller, &body.account_id) {
        (Caller::Admin, None) => {
            fields.add("account_id", "is required when the admin creates a key");
            None
        }
        (_, Some(text)) => match AccountId::parse(text) {
            Some(id) => Some(id),
            None => {
                fields.add("account_id", "is not an account id (acct_...)");
                None
            }
        },
        (Caller::Key(key), None) => Some(key.account_id),
    };
    let kind = body.kind.unwrap_or(KeyKind::Usage);
    let scopes = body.scopes.clone().unwrap_or_else(|| vec!["*".into()]);
    validate_scopes(&state, &scopes, &mut fields);
    let allowed_ips = fields.allowed_ips(body.allowed_ips.as_deref().unwrap_or_default());
    let expires_at = fields.expiry(&state, body.expires_at);
    let monthly_spend_cap = fields.spend_cap(body.monthly_spend_cap.as_deref());
    fields.finish()?;
    let Some(account_id) = account_id else {
        return Err(HttpError::not_found("account"));
    };
    if kind == KeyKind::Master {
        caller.require_admin().map_err(|_| {
            HttpError::new(
                ErrorCode::Forbidden,
                "Only the admin token can create master keys.",
            )
        })?;
    }
    if !caller_owns(&caller, account_id) || state.store.account(account_id).await?.is_none() {
        return Err(HttpError::not_found("account"));
    }
    let (secret, mut record) = new_key(&state, account_id, kind, &name, scopes, expires_at);
    record.monthly_spend_cap = monthly_spend_cap;
    record.allowed_ips = allowed_ips;
    let fee = crate::billing_api::ManagementFee::hold(&state, &caller, request_id).await?;
    match state
        .store
        .insert_key(&record, state.config.max_keys_per_account)
        .await?
    {
        InsertKeyOutcome::Inserted => fee.settle(),
        InsertKeyOutcome::LimitReached { limit } => {
            // Dropping the fee unsettled releases it: a refused call costs nothing.
            return Err(ApiError::new(
                ErrorCode::KeyLimitReached,
                format!(
                    "The account already has {limit} keys, its limit. Revoke one it no longer \
                     needs, or ask the operator to raise the limit."
                ),
            )
            .with_detail("limit", limit)
            .into());
        }
    }
    tracing::info!(account = %account_id, key = %record.id, kind = kind.as_str(), "key created");
    let view = key_view(&record, &state);
    audit::record(
        &state,
        &caller,
        request_id,
        Change::new("key.create", record.id).after(&view),
    )
    .await;
    let created = wire::CreatedKey {
        key: view,
        secret: secret.expose().to_string(),
    };
    Ok((StatusCode::CREATED, Extension(CarriesSecret), Json(created)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListKeysQuery {
    /// Admin only: the account whose keys to list; every account's if omitted.
    account_id: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1 to 500; default 50.
    limit: Option<u32>,
}

/// Keys in id order (oldest first), paged: the admin's of every account or of `?account_id=`;
/// a master key's of its own account (naming another finds nothing).
#[utoipa::path(
    get,
    path = "/keys",
    tag = "keys",
    params(ListKeysQuery),
    responses(
        (status = 200, description = "One page of keys, oldest first.", body = wire::Page<wire::ApiKeyInfo>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListKeysQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::ApiKeyInfo>>, HttpError> {
    caller.require_master_or_admin()?;
    let query = crate::billing_api::parse_query(query)?;
    let limit = crate::billing_api::page_limit(query.limit)?;
    let mut fields = FieldErrors::default();
    let filter = query.account_id.as_deref().and_then(|text| {
        let parsed = AccountId::parse(text);
        if parsed.is_none() {
            fields.add("account_id", "is not an account id (acct_...)");
        }
        parsed
    });
    let after = query.cursor.as_deref().and_then(|text| {
        let parsed = KeyId::parse(text);
        if parsed.is_none() {
            fields.add("cursor", "is not a cursor from a previous page");
        }
        parsed
    });
    fields.finish()?;
    let keys = match (&caller, filter) {
        (Caller::Admin, filter) => state.store.keys(filter, after, limit + 1).await?,
        (Caller::Key(key), Some(account)) if account != key.account_id => Vec::new(),
        (Caller::Key(key), _) => {
            state
                .store
                .keys(Some(key.account_id), after, limit + 1)
                .await?
        }
    };
    let (keys, next_cursor) =
        crate::billing_api::page(keys, limit, |k: &KeyRecord| k.id.to_string());
    Ok(Json(wire::Page {
        data: keys.iter().map(|k| key_view(k, &state)).collect(),
        next_cursor,
    }))
}

/// The key with this id if the caller may manage it; another account's key is not found, exactly
/// as one that does not exist.
async fn owned_key(
    state: &AppState,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<KeyRecord, HttpError> {
    caller.require_master_or_admin()?;
    let id = parse_id(id, KeyId::parse, "key")?;
    state
        .store
        .key_by_id(id)
        .await?
        .filter(|key| caller_owns(caller, key.account_id))
        .ok_or_else(|| HttpError::not_found("key"))
}

/// An API key (the admin's of any, a master key's of its own account).
#[utoipa::path(
    get,
    path = "/keys/{id}",
    tag = "keys",
    params(("id" = KeyId, Path, description = "The key's id.")),
    responses(
        (status = 200, description = "The key (never its secret).", body = wire::ApiKeyInfo),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn get_key(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::ApiKeyInfo>, HttpError> {
    let key = owned_key(&state, &caller, id).await?;
    Ok(Json(key_view(&key, &state)))
}

/// Changes a key's name, scopes, allowlist, expiry, status, spend cap or (admin only) rate limits.
#[utoipa::path(
    patch,
    path = "/keys/{id}",
    tag = "keys",
    params(("id" = KeyId, Path, description = "The key's id.")),
    request_body = wire::UpdateKeyRequest,
    responses(
        (status = 200, description = "The key as now stored; the change applies from the next request.", body = wire::ApiKeyInfo),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
        (status = 409, response = openapi::Status409),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn update_key(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<Json<wire::ApiKeyInfo>, HttpError> {
    let mut key = owned_key(&state, &caller, id).await?;
    let before = key_view(&key, &state);
    let body: wire::UpdateKeyRequest = body.parse()?;
    if key.status == KeyStatus::Revoked {
        return Err(revoked_conflict(&key));
    }
    let mut fields = FieldErrors::default();
    match body.name {
        None => {}
        Some(None) => fields.add("name", "cannot be cleared"),
        Some(Some(name)) => key.name = fields.name("name", &name),
    }
    match body.scopes {
        None => {}
        Some(None) => fields.add("scopes", "cannot be cleared; revoke the key instead"),
        Some(Some(scopes)) => {
            validate_scopes(&state, &scopes, &mut fields);
            key.scopes = scopes;
        }
    }
    if let Some(list) = body.allowed_ips {
        key.allowed_ips = fields.allowed_ips(&list.unwrap_or_default());
    }
    if let Some(expires_at) = body.expires_at {
        key.expires_at = fields.expiry(&state, expires_at);
    }
    match body.status {
        None => {}
        Some(Some(status @ (KeyStatus::Active | KeyStatus::Inactive))) => key.status = status,
        Some(_) => fields.add(
            "status",
            "must be active or inactive; revoke with POST /keys/{id}/revoke",
        ),
    }
    if let Some(cap) = body.monthly_spend_cap {
        key.monthly_spend_cap = fields.spend_cap(cap.as_deref());
    }
    if let Some(set) = body.rate_limits {
        caller.require_admin().map_err(|_| {
            HttpError::new(
                ErrorCode::Forbidden,
                "Only the operator (the admin token) can change a key's rate limits.",
            )
        })?;
        key.rate_limits = fields.rate_limits(&state, set.unwrap_or_default(), false);
    }
    fields.finish()?;
    let key = changed_key(&state, state.store.update_key(&key).await?)?;
    tracing::info!(key = %key.id, "key updated");
    let view = key_view(&key, &state);
    let change = Change::new("key.update", key.id)
        .before(&before)
        .after(&view);
    audit::record(&state, &caller, request_id, change).await;
    Ok(Json(view))
}

/// Gives a key a new secret; the old one keeps working for the grace period.
#[utoipa::path(
    post,
    path = "/keys/{id}/roll",
    tag = "keys",
    params(("id" = KeyId, Path, description = "The key's id.")),
    request_body = Option<wire::RollKeyRequest>,
    responses(
        (status = 200, description = "The key with its new secret, shown only here.", body = wire::RolledKey),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
        (status = 409, response = openapi::Status409),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn roll_key(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<impl IntoResponse, HttpError> {
    let key = owned_key(&state, &caller, id).await?;
    // The body may be omitted, or be JSON `null` (as the document's optional body allows).
    let body: wire::RollKeyRequest = if body.is_empty() || body.is_null() {
        wire::RollKeyRequest::default()
    } else {
        body.parse()?
    };
    let grace = body.grace_period_seconds.unwrap_or(0);
    if grace > MAX_ROLL_GRACE_SECONDS {
        let mut fields = FieldErrors::default();
        fields.add(
            "grace_period_seconds",
            format!("must be at most {MAX_ROLL_GRACE_SECONDS} (7 days)"),
        );
        fields.finish()?;
    }
    if key.status == KeyStatus::Revoked {
        return Err(revoked_conflict(&key));
    }
    let secret = ApiKey::generate(state.config.key_env);
    let now = state.clock.now();
    // Whole seconds on a millisecond clock, so the deadline reads back exactly as stored.
    let now = now
        .duration_trunc(TimeDelta::milliseconds(1))
        .unwrap_or(now);
    let previous_expires = now + TimeDelta::seconds(i64::try_from(grace).unwrap_or(i64::MAX));
    let change = state
        .store
        .roll_key(
            key.id,
            secret.hash(),
            secret.display_prefix(),
            previous_expires,
            now,
        )
        .await?;
    let key = changed_key(&state, change)?;
    tracing::info!(key = %key.id, grace_seconds = grace, "key rolled");
    let change = Change::new("key.roll", key.id).after(&serde_json::json!({
        "prefix": key.display_prefix,
        "previous_secret_expires_at": previous_expires,
    }));
    audit::record(&state, &caller, request_id, change).await;
    Ok((
        Extension(CarriesSecret),
        Json(wire::RolledKey {
            key: key_view(&key, &state),
            secret: secret.expose().to_string(),
            previous_secret_expires_at: previous_expires,
        }),
    ))
}

/// Marks a response that shows a secret: the idempotency layer never keeps such a body, since
/// Tollgate stores no plaintext secret anywhere.
#[derive(Debug, Clone, Copy)]
pub struct CarriesSecret;

/// The key after a change, with its cache entries dropped so the next request sees it.
fn changed_key(state: &AppState, change: KeyChange) -> Result<KeyRecord, HttpError> {
    match change {
        KeyChange::Changed(key) => {
            state.keys.invalidate(key.id);
            Ok(key)
        }
        KeyChange::Revoked(key) => Err(revoked_conflict(&key)),
        KeyChange::NotFound => Err(HttpError::not_found("key")),
    }
}

fn revoked_conflict(key: &KeyRecord) -> HttpError {
    HttpError::new(
        ErrorCode::Conflict,
        format!("The key {} is revoked and cannot change.", key.id),
    )
}

/// Revokes a key for good.
#[utoipa::path(
    post,
    path = "/keys/{id}/revoke",
    tag = "keys",
    params(("id" = KeyId, Path, description = "The key's id.")),
    responses(
        (status = 200, description = "The revoked key. It is refused from its next request.", body = wire::ApiKeyInfo),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
        (status = 409, response = openapi::Status409),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn revoke_key(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::ApiKeyInfo>, HttpError> {
    let key = owned_key(&state, &caller, id).await?;
    match state.store.revoke_key(key.id, state.clock.now()).await? {
        RevokeOutcome::Revoked(key) => {
            state.keys.invalidate(key.id);
            tracing::info!(key = %key.id, "key revoked");
            let view = key_view(&key, &state);
            let change = Change::new("key.revoke", key.id).after(&view);
            audit::record(&state, &caller, request_id, change).await;
            Ok(Json(view))
        }
        RevokeOutcome::AlreadyRevoked(key) => {
            let mut error = ApiError::new(
                ErrorCode::AlreadyRevoked,
                format!("The key {} was already revoked.", key.id),
            );
            if let Some(at) = key.revoked_at {
                error = error.with_detail("revoked_at", tollgate_core::clock::rfc3339(at));
            }
            Err(error.into())
        }
        RevokeOutcome::NotFound => Err(HttpError::not_found("key")),
    }
}

/// "Verify my key": any valid key may ask about itself.
#[utoipa::path(
    get,
    path = "/key",
    tag = "keys",
    responses(
        (status = 200, description = "The key that made this call.", body = wire::ApiKeyInfo),
        (status = 403, response = openapi::Status403),
    ),
    security(("api_key" = [])),
)]
async fn current_key(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<wire::ApiKeyInfo>, HttpError> {
    match caller {
        Caller::Key(key) => Ok(Json(key_view(&key, &state))),
        // The token is valid but names no key: this call is not the admin's to make.
        Caller::Admin => Err(HttpError::new(
            ErrorCode::Forbidden,
            "The admin token is not an API key; call this with an API key.",
        )),
    }
}

/// Unknown paths and methods under the API prefix. (A nested router sees the path without the
/// prefix; `OriginalUri` gives the path the client sent.)
pub async fn not_found(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> HttpError {
    HttpError::new(
        ErrorCode::NotFound,
        format!("No route for {method} {}.", uri.path()),
    )
}

/// A path the API serves, with a method it does not: 405, and the router adds `Allow`.
pub async fn method_not_allowed(
    method: axum::http::Method,
    OriginalUri(uri): OriginalUri,
) -> HttpError {
    HttpError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{method} is not served by {}; the Allow header lists the methods it serves.",
            uri.path()
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Helpers

pub(crate) fn caller_owns(caller: &Caller, account: AccountId) -> bool {
    match caller {
        Caller::Admin => true,
        Caller::Key(key) => key.account_id == account,
    }
}

pub(crate) fn parse_id<T>(
    path: Result<Path<String>, PathRejection>,
    parse: fn(&str) -> Option<T>,
    what: &str,
) -> Result<T, HttpError> {
    path.ok()
        .and_then(|Path(text)| parse(&text))
        .ok_or_else(|| HttpError::not_found(what))
}

fn new_key(
    state: &AppState,
    account_id: AccountId,
    kind: KeyKind,
    name: &str,
    scopes: Vec<String>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
) -> (ApiKey, KeyRecord) {
    let key = NewKey {
        scopes,
        expires_at,
        ..NewKey::new(account_id, kind, name)
    };
    KeyRecord::issue(state.config.key_env, key, state.clock.now())
}

fn validate_scopes(state: &AppState, scopes: &[String], fields: &mut FieldErrors) {
    if scopes.is_empty() {
        fields.add(
            "scopes",
            "must name at least one route group, or \"*\" for all",
        );
    }
    if scopes.len() > MAX_SCOPES {
        fields.add("scopes", format!("at most {MAX_SCOPES} scopes"));
    }
    for scope in scopes {
        let Some((group, model)) = access::parse_scope(scope) else {
            continue;
        };
        let routes: Vec<_> = state
            .config
            .routes
            .iter()
            .filter(|r| r.group == group)
            .collect();
        if routes.is_empty() {
            let mut groups: Vec<&str> = state.config.route_groups().collect();
            groups.dedup();
            fields.add(
                "scopes",
                format!(
                    "'{scope}' is not a route group (known: {}; or \"*\")",
                    groups.join(", ")
                ),
            );
            continue;
        }
        let Some(model) = model else { continue };
        let models: Vec<&str> = routes
            .iter()
            .filter_map(|r| r.pricing.llm.as_ref())
            .flat_map(|(_, models)| models.keys().map(String::as_str))
            .collect();
        if !models.contains(&model) {
            fields.add(
                "scopes",
                format!(
                    "'{scope}': '{model}' is not a model of the route group '{group}' (models: {})",
                    if models.is_empty() {
                        "none".to_string()
                    } else {
                        models.join(", ")
                    }
                ),
            );
        }
    }
}

fn account_view(state: &AppState, account: &Account) -> wire::Account {
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

pub(crate) fn key_view(key: &KeyRecord, state: &AppState) -> wire::ApiKeyInfo {
    let currency = &state.config.currency;
    wire::ApiKeyInfo {
        id: key.id,
        account_id: key.account_id,
        name: key.name.clone(),
        kind: key.kind,
        status: wire::KeyState::at(key.status, key.expires_at, state.clock.now()),
        prefix: key.display_prefix.clone(),
        scopes: key.scopes.clone(),
        allowed_ips: key.allowed_ips.iter().map(IpNet::to_string).collect(),
        expires_at: key.expires_at,
        monthly_spend_cap: key
            .monthly_spend_cap
            .map(|cap| wire::Money::new(cap, currency)),
        rate_limits: key.rate_limits.clone(),
        created_at: key.created_at,
        revoked_at: key.revoked_at,
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

    /// A trimmed, non-empty name of bounded length.
    pub(crate) fn name(&mut self, field: &str, value: &str) -> String {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            self.add(field, "must not be empty");
        } else if trimmed.chars().count() > MAX_NAME_CHARS {
            self.add(
                field,
                format!("must be at most {MAX_NAME_CHARS} characters"),
            );
        } else if trimmed.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
        trimmed.to_string()
    }

    /// Rate-limit overrides for a key or (`for_account`) an account, each checked against the
    /// configured policies.
    fn rate_limits(&mut self, state: &AppState, set: Overrides, for_account: bool) -> Overrides {
        for (field, message) in limits::check_overrides(&state.config, &set, for_account) {
            self.add(&field, message);
        }
        set
    }

    /// CIDRs for a key's allowlist, each checked.
    fn allowed_ips(&mut self, list: &[String]) -> Vec<IpNet> {
        if list.len() > MAX_ALLOWED_IPS {
            self.add("allowed_ips", format!("at most {MAX_ALLOWED_IPS} entries"));
        }
        list.iter()
            .filter_map(|text| {
                crate::config::parse_cidr(text)
                    .map_err(|m| self.add("allowed_ips", m))
                    .ok()
            })
            .collect()
    }

    /// A key's expiry: in the future, kept to milliseconds (what stores keep), so the key reads
    /// back exactly as written.
    fn expiry(
        &mut self,
        state: &AppState,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let at = at.map(|t| t.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(t));
        if at.is_some_and(|at| at <= state.clock.now()) {
            self.add("expires_at", "must be in the future");
        }
        at
    }

    fn spend_cap(&mut self, text: Option<&str>) -> Option<Nanos> {
        text.and_then(|text| {
            Nanos::parse_amount(text)
                .map_err(|e| self.add("monthly_spend_cap", e.to_string()))
                .ok()
        })
    }

    pub(crate) fn finish(self) -> Result<(), HttpError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(self.0).into())
        }
    }
}

/// A request body of at most 1 MiB (else 413 `payload_too_large`), parsed as JSON by
/// [`JsonBody::parse`] once the handler has authorised the caller, so that a caller who may not
/// call an endpoint learns that first. The content type is not checked: `curl -d` works as typed.
pub struct JsonBody(Bytes);

impl JsonBody {
    /// No body, or only whitespace.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(u8::is_ascii_whitespace)
    }

    /// JSON `null`.
    pub fn is_null(&self) -> bool {
        self.0.trim_ascii() == b"null"
    }

    /// Malformed JSON → 400 `bad_request`; the wrong shape → 400 `validation_error` naming the
    /// field.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        parse_json(&self.0)
    }
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = HttpError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, HttpError> {
        let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                HttpError::from(
                    ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        format!(
                            "The request body is larger than the limit of {MAX_BODY_BYTES} bytes."
                        ),
                    )
                    .with_detail("limit_bytes", MAX_BODY_BYTES),
                )
            })?;
        Ok(JsonBody(bytes))
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, HttpError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::new(
            ErrorCode::BadRequest,
            "The request body is empty; send a JSON object.",
        ));
    }
    // serde would also read a struct from a JSON array; the API takes objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(ApiError::validation(BTreeMap::from([(
            "body".to_string(),
            vec!["must be a JSON object".to_string()],
        )]))
        .into());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let error = match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(value) => match deserializer.end() {
            Ok(()) => return Ok(value),
            Err(e) => {
                return Err(HttpError::new(
                    ErrorCode::BadRequest,
                    format!("Malformed JSON: {e}."),
                ))
            }
        },
        Err(e) => e,
    };
    let path = error.path().to_string();
    let inner = error.into_inner();
    if !inner.is_data() {
        return Err(HttpError::new(
            ErrorCode::BadRequest,
            format!("Malformed JSON: {inner}."),
        ));
    }
    let message = inner.to_string();
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or_default()
        .to_string();
    // serde reports a missing field at its parent; name the field itself.
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    let field = match (path.as_str(), missing) {
        (".", Some(name)) => name.to_string(),
        (".", None) => "body".to_string(),
        (path, Some(name)) => format!("{path}.{name}"),
        (path, None) => path.to_string(),
    };
    Err(ApiError::validation(BTreeMap::from([(field, vec![message])])).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    fn outcome(json: &str) -> String {
        match parse_json::<CreateKeyRequest>(&Bytes::copy_from_slice(json.as_bytes())) {
            Ok(_) => "ok".into(),
            Err(e) => format!(
                "{} {} {:?}",
                e.error.code, e.error.message, e.error.field_errors
            ),
        }
    }

    #[test]
    fn json_errors_are_classified() {
        expect![[r#"
            ok
            bad_request The request body is empty; send a JSON object. {}
            bad_request Malformed JSON: EOF while parsing an object at line 1 column 1. {}
            bad_request Malformed JSON: trailing characters at line 1 column 14. {}
            validation_error 1 invalid field: name: missing field `name`. {"name": ["missing field `name`"]}
            validation_error 1 invalid field: nmae: unknown field `nmae`, expected one of `name`, `account_id`, `kind`, `scopes`, `allowed_ips`, `expires_at`, `monthly_spend_cap`. {"nmae": ["unknown field `nmae`, expected one of `name`, `account_id`, `kind`, `scopes`, `allowed_ips`, `expires_at`, `monthly_spend_cap`"]}
            validation_error 1 invalid field: name: invalid type: integer `5`, expected a string. {"name": ["invalid type: integer `5`, expected a string"]}
            validation_error 1 invalid field: scopes[1]: invalid type: integer `1`, expected a string. {"scopes[1]": ["invalid type: integer `1`, expected a string"]}
            validation_error 1 invalid field: kind: unknown variant `root`, expected `master` or `usage`. {"kind": ["unknown variant `root`, expected `master` or `usage`"]}
            validation_error 1 invalid field: body: must be a JSON object. {"body": ["must be a JSON object"]}
        "#]]
        .assert_eq(
            &[
                r#"{"name":"ok"}"#,
                "  ",
                "{",
                r#"{"name":"a"} {}"#,
                "{}",
                r#"{"nmae":"a"}"#,
                r#"{"name":5}"#,
                r#"{"name":"a","scopes":["x",1]}"#,
                r#"{"name":"a","kind":"root"}"#,
                "[]",
            ]
            .iter()
            .map(|j| outcome(j) + "\n")
            .collect::<String>(),
        );
    }
}
