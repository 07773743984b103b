//! API keys: create, list, read, edit, revoke and roll, and `GET /keys/me`.

use crate::edge::idempotency::CarriesSecret;
use crate::http::error::FieldErrors;
use crate::http::error::HttpError;
use crate::management::audit;
use crate::management::audit::Change;
use crate::management::extract::Caller;
use crate::management::extract::{caller_owns, parse_id, JsonBody};
use crate::management::openapi;
use crate::state::AppState;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::{DurationRound, TimeDelta};
use ipnet::IpNet;
use serde::Deserialize;
use tollgate_core::{
    access, AccountId, ApiError, ApiKey, ErrorCode, KeyId, KeyKind, KeyStatus, RequestId,
};
use tollgate_store::{InsertKeyOutcome, KeyChange, KeyRecord, NewKey, RevokeOutcome};
use tollgate_wire::api::{self as wire, CreateKeyRequest};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const MAX_SCOPES: usize = 100;
/// The longest a rolled key's previous secret may keep working.
const MAX_ROLL_GRACE_SECONDS: u64 = 7 * 24 * 3600;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(get_key, update_key))
        .routes(routes!(revoke_key))
        .routes(routes!(roll_key))
        .routes(routes!(current_key))
}

// ---------------------------------------------------------------------------------------------
// Handlers

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
    let created = issue_key(&state, &caller, request_id, body.parse()?).await?;
    Ok((StatusCode::CREATED, Extension(CarriesSecret), Json(created)))
}

/// Creates a key as `POST /keys` does (validation, ownership, the key limit, the fee, the audit
/// entry), for the API and the console alike. The secret is in the answer and nowhere else.
pub(crate) async fn issue_key(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    body: CreateKeyRequest,
) -> Result<wire::CreatedKey, HttpError> {
    caller.require_master_or_admin()?;
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
    validate_scopes(state, &scopes, &mut fields);
    let allowed_ips = fields.allowed_ips(body.allowed_ips.as_deref().unwrap_or_default());
    let expires_at = fields.expiry(state, body.expires_at);
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
    if !caller_owns(caller, account_id) || state.store.account(account_id).await?.is_none() {
        return Err(HttpError::not_found("account"));
    }
    let (secret, mut record) = new_key(state, account_id, kind, &name, scopes, expires_at);
    record.monthly_spend_cap = monthly_spend_cap;
    record.allowed_ips = allowed_ips;
    let fee = crate::management::fee::ManagementFee::hold(state, caller, request_id).await?;
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
    let view = key_view(&record, state);
    audit::record(
        state,
        caller,
        request_id,
        Change::new("key.create", record.id).after(&view),
    )
    .await;
    Ok(wire::CreatedKey {
        key: view,
        secret: secret.expose().to_string(),
    })
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
    let query = crate::management::extract::parse_query(query)?;
    let limit = crate::management::extract::page_limit(query.limit)?;
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
        crate::management::extract::page(keys, limit, |k: &KeyRecord| k.id.to_string());
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
    let key = owned_key(&state, &caller, id).await?;
    let body: wire::UpdateKeyRequest = body.parse()?;
    Ok(Json(
        change_key(&state, &caller, request_id, key, body).await?,
    ))
}

/// Changes a key the caller owns (checked by the caller of this) as `PATCH /keys/{id}` does,
/// for the API and the console alike.
pub(crate) async fn change_key(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    mut key: KeyRecord,
    body: wire::UpdateKeyRequest,
) -> Result<wire::ApiKeyInfo, HttpError> {
    let before = key_view(&key, state);
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
            validate_scopes(state, &scopes, &mut fields);
            key.scopes = scopes;
        }
    }
    if let Some(list) = body.allowed_ips {
        key.allowed_ips = fields.allowed_ips(&list.unwrap_or_default());
    }
    if let Some(expires_at) = body.expires_at {
        key.expires_at = fields.expiry(state, expires_at);
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
        key.rate_limits = fields.rate_limits(state, set.unwrap_or_default(), false);
    }
    fields.finish()?;
    let key = changed_key(state, state.store.update_key(&key).await?)?;
    tracing::info!(key = %key.id, "key updated");
    let view = key_view(&key, state);
    let change = Change::new("key.update", key.id)
        .before(&before)
        .after(&view);
    audit::record(state, caller, request_id, change).await;
    Ok(view)
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
    let rolled = roll(&state, &caller, request_id, key, body).await?;
    Ok((Extension(CarriesSecret), Json(rolled)))
}

/// Gives a key the caller owns (checked by the caller of this) a new secret as
/// `POST /keys/{id}/roll` does, for the API and the console alike.
pub(crate) async fn roll(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    key: KeyRecord,
    body: wire::RollKeyRequest,
) -> Result<wire::RolledKey, HttpError> {
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
    let key = changed_key(state, change)?;
    tracing::info!(key = %key.id, grace_seconds = grace, "key rolled");
    let change = Change::new("key.roll", key.id).after(&serde_json::json!({
        "prefix": key.display_prefix,
        "previous_secret_expires_at": previous_expires,
    }));
    audit::record(state, caller, request_id, change).await;
    Ok(wire::RolledKey {
        key: key_view(&key, state),
        secret: secret.expose().to_string(),
        previous_secret_expires_at: previous_expires,
    })
}

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
    Ok(Json(revoke(&state, &caller, request_id, key.id).await?))
}

/// Revokes a key the caller owns (checked by the caller of this) as `POST /keys/{id}/revoke`
/// does, for the API and the console alike.
pub(crate) async fn revoke(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    id: KeyId,
) -> Result<wire::ApiKeyInfo, HttpError> {
    match state.store.revoke_key(id, state.clock.now()).await? {
        RevokeOutcome::Revoked(key) => {
            state.keys.invalidate(key.id);
            tracing::info!(key = %key.id, "key revoked");
            state.notifier.key_revoked(&key, request_id).await;
            let view = key_view(&key, state);
            let change = Change::new("key.revoke", key.id).after(&view);
            audit::record(state, caller, request_id, change).await;
            Ok(view)
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

// ---------------------------------------------------------------------------------------------
// Helpers

pub(crate) fn new_key(
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
