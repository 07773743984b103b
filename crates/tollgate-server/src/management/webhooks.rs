//! Webhook endpoints (create, list, read, edit, delete, rotate the secret, send a test), their
//! delivery logs with manual redelivery, and an account's balance alert. A master key manages
//! its own account's; the admin any account's.

use crate::http::error::{validation, FieldErrors, HttpError};
use crate::management::audit::{self, Change};
use crate::management::billing::{money, subject_account};
use crate::management::extract::{
    caller_owns, page_limit, parse_id, parse_query, Caller, JsonBody,
};
use crate::management::openapi;
use crate::notify::UrlRefused;
use crate::state::AppState;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::TimeDelta;
use serde::Deserialize;
use tollgate_core::egress::Refused;
use tollgate_core::notify::{Event, EventFilter, EventType};
use tollgate_core::webhook::WebhookSecret;
use tollgate_core::{AccountId, ApiError, EndpointId, ErrorCode, EventId, Nanos, RequestId};
use tollgate_store::{DeliveryRecord, EndpointRecord};
use tollgate_wire::api as wire;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The longest description kept.
const MAX_DESCRIPTION: usize = 500;
/// The longest URL accepted.
const MAX_URL: usize = 2048;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_endpoint, list_endpoints))
        .routes(routes!(get_endpoint, update_endpoint, delete_endpoint))
        .routes(routes!(rotate_secret))
        .routes(routes!(send_test))
        .routes(routes!(list_deliveries))
        .routes(routes!(redeliver))
        .routes(routes!(get_balance_alert, set_balance_alert))
}

pub(crate) fn endpoint_view(endpoint: &EndpointRecord) -> wire::WebhookEndpoint {
    wire::WebhookEndpoint {
        id: endpoint.id,
        account_id: endpoint.account_id,
        url: endpoint.url.clone(),
        description: endpoint.description.clone(),
        events: endpoint.events.names(),
        enabled: endpoint.enabled,
        disabled_reason: endpoint.disabled_reason.clone(),
        previous_secret_expires_at: endpoint
            .previous_secret
            .as_ref()
            .and(endpoint.previous_until),
        created_at: endpoint.created_at,
        updated_at: endpoint.updated_at,
    }
}

fn delivery_view(delivery: DeliveryRecord) -> wire::WebhookDelivery {
    wire::WebhookDelivery {
        event_id: delivery.event_id,
        event_type: delivery.event_type,
        status: delivery.status.as_str().to_string(),
        attempts: delivery.attempts,
        next_attempt_at: delivery.next_at,
        last_status: delivery.last_status,
        last_error: delivery.last_error,
        created_at: delivery.created_at,
        updated_at: delivery.updated_at,
    }
}

/// The URL as the guard and the resolver allow it, or the answer: `ssrf_blocked` for an inside
/// address or a scheme not allowed, a field error for what is not a usable URL.
async fn checked_url(state: &AppState, text: &str) -> Result<String, HttpError> {
    if text.len() > MAX_URL {
        return Err(validation(
            "url",
            format!("must be at most {MAX_URL} characters"),
        ));
    }
    match state.notifier.check_url(text).await {
        Ok(url) => Ok(url),
        Err(UrlRefused::Guard(refused @ (Refused::Address { .. } | Refused::Scheme { .. }))) => {
            Err(ApiError::new(
                ErrorCode::SsrfBlocked,
                format!("The URL is refused: {refused}."),
            )
            .with_detail("reason", refused.to_string())
            .into())
        }
        Err(other) => Err(validation("url", other.to_string())),
    }
}

fn event_filter(fields: &mut FieldErrors, names: &[String]) -> EventFilter {
    EventFilter::parse(names).unwrap_or_else(|unknown| {
        let known: Vec<&str> = EventType::ALL
            .iter()
            .filter(|t| **t != EventType::Ping)
            .map(|t| t.as_str())
            .collect();
        fields.add(
            "events",
            format!(
                "'{unknown}' is not an event type (types: {}, or \"*\")",
                known.join(", ")
            ),
        );
        EventFilter::All
    })
}

fn description(fields: &mut FieldErrors, text: Option<&str>) -> String {
    let text = text.unwrap_or_default().trim();
    if text.chars().count() > MAX_DESCRIPTION {
        fields.add(
            "description",
            format!("must be at most {MAX_DESCRIPTION} characters"),
        );
    }
    text.to_string()
}

/// The endpoint, if the caller may see it; another account's answers as one that does not
/// exist.
pub(crate) async fn owned_endpoint(
    state: &AppState,
    caller: &Caller,
    id: EndpointId,
) -> Result<EndpointRecord, HttpError> {
    caller.require_master_or_admin()?;
    match state.store.endpoint(id).await? {
        Some(endpoint) if caller_owns(caller, endpoint.account_id) => Ok(endpoint),
        _ => Err(HttpError::not_found("webhook endpoint")),
    }
}

fn endpoint_id(id: Result<Path<String>, PathRejection>) -> Result<EndpointId, HttpError> {
    parse_id(id, EndpointId::parse, "webhook endpoint")
}

/// Creates an endpoint. Its URL must be `https://` (plain `http://` only if the operator allows
/// it) and reach the public internet: a URL that names or resolves to an inside address is
/// refused with `ssrf_blocked`.
#[utoipa::path(
    post,
    path = "/webhook-endpoints",
    tag = "webhooks",
    request_body = wire::CreateEndpointRequest,
    responses(
        (status = 201, description = "The endpoint; its signing secret is shown only here.", body = wire::EndpointWithSecret),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn create_endpoint(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: JsonBody,
) -> Result<impl IntoResponse, HttpError> {
    caller.require_master_or_admin()?;
    let created = create(&state, &caller, request_id, body.parse()?).await?;
    Ok((
        StatusCode::CREATED,
        Extension(crate::edge::idempotency::CarriesSecret),
        Json(created),
    ))
}

/// Creates an endpoint as `POST /webhook-endpoints` does, for the API and the console alike:
/// checked, counted against the limit, audited. The secret is in the answer and nowhere else.
pub(crate) async fn create(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    body: wire::CreateEndpointRequest,
) -> Result<wire::EndpointWithSecret, HttpError> {
    caller.require_master_or_admin()?;
    let account = subject_account(caller, body.account_id.as_deref())?;
    let mut fields = FieldErrors::default();
    let events = event_filter(&mut fields, body.events.as_deref().unwrap_or_default());
    let description = description(&mut fields, body.description.as_deref());
    fields.finish()?;
    let url = checked_url(state, &body.url).await?;
    if state.store.account(account).await?.is_none() {
        return Err(HttpError::not_found("account"));
    }
    let now = state.clock.now();
    let secret = WebhookSecret::generate().expose();
    let endpoint = EndpointRecord {
        id: EndpointId::new(),
        account_id: account,
        url,
        description,
        events,
        enabled: true,
        disabled_reason: None,
        secret: secret.clone(),
        previous_secret: None,
        previous_until: None,
        created_at: now,
        updated_at: now,
    };
    let limit = state.config.webhooks.max_endpoints_per_account;
    if !state.store.create_endpoint(&endpoint, limit).await? {
        return Err(ApiError::new(
            ErrorCode::EndpointLimitReached,
            format!(
                "The account already has {limit} webhook endpoints, its limit. Delete one it no \
                 longer needs, or ask the operator to raise the limit."
            ),
        )
        .with_detail("limit", limit)
        .into());
    }
    let view = endpoint_view(&endpoint);
    let change = Change::new("webhook_endpoint.create", endpoint.id).after(&view);
    audit::record(state, caller, request_id, change).await;
    Ok(wire::EndpointWithSecret {
        endpoint: view,
        secret,
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListEndpointsQuery {
    /// Admin only (and required then): the account whose endpoints to list.
    account_id: Option<String>,
}

/// The account's endpoints, oldest first (an account has at most the configured limit).
#[utoipa::path(
    get,
    path = "/webhook-endpoints",
    tag = "webhooks",
    params(ListEndpointsQuery),
    responses(
        (status = 200, description = "Every endpoint of the account.", body = wire::Page<wire::WebhookEndpoint>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn list_endpoints(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListEndpointsQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::WebhookEndpoint>>, HttpError> {
    caller.require_master_or_admin()?;
    let query = parse_query(query)?;
    let account = subject_account(&caller, query.account_id.as_deref())?;
    let endpoints = state.store.endpoints(account).await?;
    Ok(Json(wire::Page {
        data: endpoints.iter().map(endpoint_view).collect(),
        next_cursor: None,
    }))
}

/// One endpoint.
#[utoipa::path(
    get,
    path = "/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id (`we_...`).")),
    responses(
        (status = 200, description = "The endpoint.", body = wire::WebhookEndpoint),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn get_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::WebhookEndpoint>, HttpError> {
    let endpoint = owned_endpoint(&state, &caller, endpoint_id(id)?).await?;
    Ok(Json(endpoint_view(&endpoint)))
}

/// Edits an endpoint: its URL (checked as at creation), event types, description, or whether
/// it is enabled.
#[utoipa::path(
    patch,
    path = "/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id (`we_...`).")),
    request_body = wire::UpdateEndpointRequest,
    responses(
        (status = 200, description = "The endpoint as now stored.", body = wire::WebhookEndpoint),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn update_endpoint(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<Json<wire::WebhookEndpoint>, HttpError> {
    caller.require_master_or_admin()?;
    let id = endpoint_id(id)?;
    Ok(Json(
        update(&state, &caller, request_id, id, body.parse()?).await?,
    ))
}

/// Edits an endpoint as `PATCH /webhook-endpoints/{id}` does, for the API and the console.
pub(crate) async fn update(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    id: EndpointId,
    body: wire::UpdateEndpointRequest,
) -> Result<wire::WebhookEndpoint, HttpError> {
    let before = owned_endpoint(state, caller, id).await?;
    let mut endpoint = before.clone();
    let mut fields = FieldErrors::default();
    if let Some(names) = &body.events {
        endpoint.events = event_filter(&mut fields, names);
    }
    if let Some(text) = &body.description {
        endpoint.description = description(&mut fields, Some(text));
    }
    fields.finish()?;
    if let Some(url) = &body.url {
        endpoint.url = checked_url(state, url).await?;
    }
    if let Some(enabled) = body.enabled {
        endpoint.enabled = enabled;
        if enabled {
            endpoint.disabled_reason = None;
        }
    }
    endpoint.updated_at = state.clock.now();
    if !state.store.update_endpoint(&endpoint).await? {
        return Err(HttpError::not_found("webhook endpoint"));
    }
    let view = endpoint_view(&endpoint);
    let change = Change::new("webhook_endpoint.update", endpoint.id)
        .before(&endpoint_view(&before))
        .after(&view);
    audit::record(state, caller, request_id, change).await;
    Ok(view)
}

/// Deletes an endpoint and its delivery log; nothing more is sent to it.
#[utoipa::path(
    delete,
    path = "/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id (`we_...`).")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn delete_endpoint(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, HttpError> {
    delete(&state, &caller, request_id, endpoint_id(id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes an endpoint as `DELETE /webhook-endpoints/{id}` does, for the API and the console.
pub(crate) async fn delete(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    id: EndpointId,
) -> Result<(), HttpError> {
    let endpoint = owned_endpoint(state, caller, id).await?;
    if !state.store.delete_endpoint(endpoint.id).await? {
        return Err(HttpError::not_found("webhook endpoint"));
    }
    let change =
        Change::new("webhook_endpoint.delete", endpoint.id).before(&endpoint_view(&endpoint));
    audit::record(state, caller, request_id, change).await;
    Ok(())
}

/// Gives the endpoint a new signing secret, shown once. For the configured overlap (a day by
/// default) deliveries carry both signatures, so a receiver can switch without missing any.
#[utoipa::path(
    post,
    path = "/webhook-endpoints/{id}/rotate-secret",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id (`we_...`).")),
    responses(
        (status = 200, description = "The endpoint and its new secret, shown only here.", body = wire::EndpointWithSecret),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn rotate_secret(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let rotated = rotate(&state, &caller, request_id, endpoint_id(id)?).await?;
    Ok((
        Extension(crate::edge::idempotency::CarriesSecret),
        Json(rotated),
    ))
}

/// Rotates an endpoint's secret as `POST /webhook-endpoints/{id}/rotate-secret` does.
pub(crate) async fn rotate(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    id: EndpointId,
) -> Result<wire::EndpointWithSecret, HttpError> {
    let mut endpoint = owned_endpoint(state, caller, id).await?;
    let now = state.clock.now();
    let overlap =
        TimeDelta::from_std(state.config.webhooks.rotation_overlap).unwrap_or(TimeDelta::days(1));
    let secret = WebhookSecret::generate().expose();
    endpoint.previous_secret = Some(std::mem::replace(&mut endpoint.secret, secret.clone()));
    endpoint.previous_until = Some(now + overlap);
    endpoint.updated_at = now;
    if !state.store.update_endpoint(&endpoint).await? {
        return Err(HttpError::not_found("webhook endpoint"));
    }
    let view = endpoint_view(&endpoint);
    let change = Change::new("webhook_endpoint.rotate_secret", endpoint.id).after(&view);
    audit::record(state, caller, request_id, change).await;
    Ok(wire::EndpointWithSecret {
        endpoint: view,
        secret,
    })
}

/// Sends the endpoint a `webhook.ping` event, to check the receiver and its signature check.
#[utoipa::path(
    post,
    path = "/webhook-endpoints/{id}/test",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id (`we_...`).")),
    responses(
        (status = 202, description = "The ping is queued; its delivery shows in the log.", body = wire::QueuedEvent),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn send_test(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let queued = ping(&state, &caller, request_id, endpoint_id(id)?).await?;
    Ok((StatusCode::ACCEPTED, Json(queued)))
}

/// Queues a `webhook.ping` for one endpoint.
pub(crate) async fn ping(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    id: EndpointId,
) -> Result<wire::QueuedEvent, HttpError> {
    let endpoint = owned_endpoint(state, caller, id).await?;
    let data = serde_json::json!({
        "endpoint_id": endpoint.id.to_string(),
        "request_id": request_id.to_string(),
    });
    let event = Event::new(
        endpoint.account_id,
        EventType::Ping,
        state.clock.now(),
        data,
    );
    state.store.emit_to(&event, endpoint.id).await?;
    Ok(wire::QueuedEvent { event_id: event.id })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeliveriesQuery {
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1 to 500; default 50.
    limit: Option<u32>,
}

/// The endpoint's delivery log, newest event first: each event's status, attempts, next
/// attempt and the receiver's last answer.
#[utoipa::path(
    get,
    path = "/webhook-endpoints/{id}/deliveries",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id (`we_...`)."), DeliveriesQuery),
    responses(
        (status = 200, description = "One page of deliveries, newest first.", body = wire::Page<wire::WebhookDelivery>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn list_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::WebhookDelivery>>, HttpError> {
    let endpoint = owned_endpoint(&state, &caller, endpoint_id(id)?).await?;
    let query = parse_query(query)?;
    let limit = page_limit(query.limit)?;
    let before = match query.cursor.as_deref() {
        None => None,
        Some(text) => Some(
            EventId::parse(text)
                .ok_or_else(|| validation("cursor", "is not a cursor from a previous page"))?,
        ),
    };
    let mut rows = state
        .store
        .deliveries(endpoint.id, before, limit + 1)
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|d| d.event_id.to_string()))
        .flatten();
    Ok(Json(wire::Page {
        data: rows.into_iter().map(delivery_view).collect(),
        next_cursor,
    }))
}

/// Sends an event to the endpoint again now, whatever its delivery came to (the same
/// `webhook-id`; a receiver that dedupes by it sees a repeat).
#[utoipa::path(
    post,
    path = "/webhook-endpoints/{id}/deliveries/{event_id}/redeliver",
    tag = "webhooks",
    params(
        ("id" = String, Path, description = "The endpoint's id (`we_...`)."),
        ("event_id" = String, Path, description = "The event's id (`msg_...`)."),
    ),
    responses(
        (status = 202, description = "The delivery is due again.", body = wire::QueuedEvent),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn redeliver(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Ok(Path((endpoint_text, event_text))) = ids else {
        return Err(HttpError::not_found("webhook delivery"));
    };
    let (Some(endpoint), Some(event)) = (
        EndpointId::parse(&endpoint_text),
        EventId::parse(&event_text),
    ) else {
        return Err(HttpError::not_found("webhook delivery"));
    };
    redeliver_one(&state, &caller, request_id, endpoint, event).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(wire::QueuedEvent { event_id: event }),
    ))
}

/// Makes one delivery due again now.
pub(crate) async fn redeliver_one(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    id: EndpointId,
    event: EventId,
) -> Result<(), HttpError> {
    let endpoint = owned_endpoint(state, caller, id).await?;
    if !state
        .store
        .redeliver(endpoint.id, event, state.clock.now())
        .await?
    {
        return Err(HttpError::not_found("webhook delivery"));
    }
    let change = Change::new("webhook_delivery.redeliver", endpoint.id)
        .after(&serde_json::json!({ "event_id": event.to_string() }));
    audit::record(state, caller, request_id, change).await;
    Ok(())
}

/// The account's balance alert.
#[utoipa::path(
    get,
    path = "/accounts/{id}/balance-alert",
    tag = "webhooks",
    params(("id" = AccountId, Path, description = "The account's id.")),
    responses(
        (status = 200, description = "The alert (`low_balance` null when off).", body = wire::BalanceAlert),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn get_balance_alert(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<wire::BalanceAlert>, HttpError> {
    let account = alert_account(&state, &caller, id).await?;
    let low = state.store.low_balance(account).await?;
    Ok(Json(wire::BalanceAlert {
        low_balance: low.map(|low| money(&state, low)),
    }))
}

/// Sets the amount under which the settled balance is low: `balance.low` fires once when the
/// balance falls under it, and `balance.recovered` once it is back.
#[utoipa::path(
    put,
    path = "/accounts/{id}/balance-alert",
    tag = "webhooks",
    params(("id" = AccountId, Path, description = "The account's id.")),
    request_body = wire::SetBalanceAlertRequest,
    responses(
        (status = 200, description = "The alert as now stored.", body = wire::BalanceAlert),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn set_balance_alert(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<Json<wire::BalanceAlert>, HttpError> {
    let account = alert_account(&state, &caller, id).await?;
    Ok(Json(
        set_alert(&state, &caller, request_id, account, body.parse()?).await?,
    ))
}

/// Sets an account's balance alert as `PUT /accounts/{id}/balance-alert` does.
pub(crate) async fn set_alert(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    account: AccountId,
    body: wire::SetBalanceAlertRequest,
) -> Result<wire::BalanceAlert, HttpError> {
    let low = match body.low_balance.as_deref() {
        None => None,
        Some(text) => match Nanos::parse_amount(text) {
            Ok(low) if low > Nanos::ZERO => Some(low),
            Ok(_) => return Err(validation("low_balance", "must be more than zero")),
            Err(e) => return Err(validation("low_balance", e.to_string())),
        },
    };
    let before = state.store.low_balance(account).await?;
    state
        .store
        .set_low_balance(account, low, &state.config.currency)
        .await?;
    let view = wire::BalanceAlert {
        low_balance: low.map(|low| money(state, low)),
    };
    let change = Change::new("balance_alert.set", account)
        .before(&wire::BalanceAlert {
            low_balance: before.map(|low| money(state, low)),
        })
        .after(&view);
    audit::record(state, caller, request_id, change).await;
    Ok(view)
}

async fn alert_account(
    state: &AppState,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<AccountId, HttpError> {
    caller.require_master_or_admin()?;
    let account = parse_id(id, AccountId::parse, "account")?;
    if !caller_owns(caller, account) || state.store.account(account).await?.is_none() {
        return Err(HttpError::not_found("account"));
    }
    Ok(account)
}
