//! Usage export, for the operator: each sink's standing (cursor, lag, parked records), the
//! parked records themselves with a retry, and the accounts' customer ids in each sink. Admin
//! only: sinks are the operator's billing systems.

use crate::http::error::{validation, HttpError};
use crate::management::audit::{self, Change};
use crate::management::billing::money;
use crate::management::extract::{page_limit, parse_query, Caller, JsonBody};
use crate::management::openapi;
use crate::notify::sinks::SinkClient;
use crate::state::AppState;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Deserialize;
use std::sync::Arc;
use tollgate_core::{AccountId, RequestId};
use tollgate_store::{ParkReason, ParkedRecord};
use tollgate_wire::api as wire;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The longest customer id kept.
const MAX_CUSTOMER: usize = 255;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sinks))
        .routes(routes!(list_parked))
        .routes(routes!(retry_parked))
        .routes(routes!(get_customer, set_customer, delete_customer))
}

fn sink_named(state: &AppState, name: &str) -> Result<Arc<SinkClient>, HttpError> {
    state
        .exporter
        .sink(name)
        .cloned()
        .ok_or_else(|| HttpError::not_found("export sink"))
}

/// Every configured sink and where it stands: its cursor, the records waiting, how late the
/// oldest is, and how many are parked.
#[utoipa::path(
    get,
    path = "/export/sinks",
    tag = "export",
    responses(
        (status = 200, description = "Every sink, in config order.", body = wire::Page<wire::ExportSink>),
        (status = 403, response = openapi::Status403),
    ),
    security(("admin_token" = [])),
)]
async fn list_sinks(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<wire::Page<wire::ExportSink>>, HttpError> {
    caller.require_admin()?;
    Ok(Json(wire::Page {
        data: sink_views(&state).await?,
        next_cursor: None,
    }))
}

/// Every configured sink and where it stands, in config order.
pub(crate) async fn sink_views(state: &AppState) -> Result<Vec<wire::ExportSink>, HttpError> {
    let now = state.clock.now();
    let mut data = Vec::new();
    for sink in &state.exporter.settings().sinks {
        let standing = state.store.export_standing(&sink.name).await?;
        data.push(wire::ExportSink {
            name: sink.name.clone(),
            kind: sink.kind.as_str().to_string(),
            meters: sink
                .meters
                .iter()
                .map(|(meter, name)| (meter.as_str().to_string(), name.clone()))
                .collect(),
            customer: match sink.customer {
                crate::config::CustomerIds::Account => "account",
                crate::config::CustomerIds::Mapped => "mapped",
            }
            .to_string(),
            cursor: standing.cursor,
            head: standing.head,
            pending: standing.pending,
            lag_seconds: standing
                .oldest_pending
                .map_or(0, |oldest| (now - oldest).num_seconds().max(0)),
            unmapped: standing.unmapped,
            dead_letters: standing.dead,
        });
    }
    Ok(data)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ParkedQuery {
    /// `unmapped`, `too_old` or `rejected`; all when absent.
    reason: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1 to 500; default 50.
    limit: Option<u32>,
}

pub(crate) fn parked_view(state: &AppState, parked: ParkedRecord) -> wire::ParkedUsage {
    let record = parked.record;
    wire::ParkedUsage {
        seq: record.seq,
        request_id: record.request_id,
        account_id: record.account,
        reason: parked.reason.as_str().to_string(),
        detail: parked.detail,
        cost: money(state, record.cost),
        input_tokens: record.input_tokens,
        cached_input_tokens: record.cached_input_tokens,
        output_tokens: record.output_tokens,
        at: record.at,
        parked_at: parked.parked_at,
    }
}

/// The sink's parked records, oldest first: those waiting for a customer id (`unmapped`) and
/// the dead letters (`too_old`, `rejected`). Nothing is dropped: a record stays here until it is
/// delivered.
#[utoipa::path(
    get,
    path = "/export/sinks/{name}/parked",
    tag = "export",
    params(("name" = String, Path, description = "The sink's name."), ParkedQuery),
    responses(
        (status = 200, description = "One page of parked records, oldest first.", body = wire::Page<wire::ParkedUsage>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn list_parked(
    State(state): State<AppState>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<ParkedQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::ParkedUsage>>, HttpError> {
    caller.require_admin()?;
    let Ok(Path(name)) = name else {
        return Err(HttpError::not_found("export sink"));
    };
    let sink = sink_named(&state, &name)?;
    let query = parse_query(query)?;
    let limit = page_limit(query.limit)?;
    let reason = query
        .reason
        .as_deref()
        .map(|text| {
            ParkReason::parse(text)
                .ok_or_else(|| validation("reason", "must be unmapped, too_old or rejected"))
        })
        .transpose()?;
    let after = match query.cursor.as_deref() {
        None => 0,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| validation("cursor", "is not a cursor from a previous page"))?,
    };
    let mut rows = state
        .store
        .parked_exports(&sink.settings().name, reason, after, limit + 1)
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|p| p.record.seq.to_string()))
        .flatten();
    Ok(Json(wire::Page {
        data: rows.into_iter().map(|p| parked_view(&state, p)).collect(),
        next_cursor,
    }))
}

/// Sends a parked record to its sink now. Delivered, it leaves the list; refused again, it
/// stays with the sink's new answer; an account still without a customer id stays unmapped.
#[utoipa::path(
    post,
    path = "/export/sinks/{name}/parked/{seq}/retry",
    tag = "export",
    params(
        ("name" = String, Path, description = "The sink's name."),
        ("seq" = i64, Path, description = "The record's number (`seq`)."),
    ),
    responses(
        (status = 200, description = "What the sink answered.", body = wire::ExportRetry),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
        (status = 503, response = openapi::Status503),
    ),
    security(("admin_token" = [])),
)]
async fn retry_parked(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<wire::ExportRetry>, HttpError> {
    caller.require_admin()?;
    let Ok(Path((name, seq))) = ids else {
        return Err(HttpError::not_found("parked record"));
    };
    let Some(seq) = seq.parse::<i64>().ok().filter(|n| *n > 0) else {
        return Err(HttpError::not_found("parked record"));
    };
    let delivered = retry(&state, &caller, request_id, &name, seq).await?;
    Ok(Json(wire::ExportRetry { seq, delivered }))
}

/// Sends one parked record again, audited; whether the sink took it.
pub(crate) async fn retry(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    name: &str,
    seq: i64,
) -> Result<bool, HttpError> {
    caller.require_admin()?;
    let sink = sink_named(state, name)?;
    let delivered = match state.exporter.retry_parked(&sink, seq).await {
        Ok(Some(delivered)) => delivered,
        Ok(None) => return Err(HttpError::not_found("parked record")),
        Err(e) => {
            return Err(HttpError::new(
                tollgate_core::ErrorCode::ServiceUnavailable,
                format!("The sink could not be reached; the record stays parked: {e}"),
            ))
        }
    };
    let change = Change::new("export.retry", format!("{name}/{seq}"))
        .after(&serde_json::json!({ "delivered": delivered }));
    audit::record(state, caller, request_id, change).await;
    Ok(delivered)
}

/// The account and sink a customer-id call is about; 404 for an unknown one of either.
async fn customer_subject(
    state: &AppState,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<(AccountId, String), HttpError> {
    let Ok(Path((account, sink))) = ids else {
        return Err(HttpError::not_found("account"));
    };
    let account = AccountId::parse(&account).ok_or_else(|| HttpError::not_found("account"))?;
    if state.store.account(account).await?.is_none() {
        return Err(HttpError::not_found("account"));
    }
    let sink = sink_named(state, &sink)?;
    Ok((account, sink.settings().name.clone()))
}

/// The account's customer id in the sink (`null`: none set; a Stripe sink then falls back to
/// the customer the account's card checkout saved).
#[utoipa::path(
    get,
    path = "/accounts/{id}/export-customers/{sink}",
    tag = "export",
    params(
        ("id" = String, Path, description = "The account's id."),
        ("sink" = String, Path, description = "The sink's name."),
    ),
    responses(
        (status = 200, description = "The customer id.", body = wire::ExportCustomer),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn get_customer(
    State(state): State<AppState>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<wire::ExportCustomer>, HttpError> {
    caller.require_admin()?;
    let (account, sink) = customer_subject(&state, ids).await?;
    let customer = state
        .store
        .export_customers(&sink, false, &[account])
        .await?
        .into_iter()
        .next()
        .map(|(_, customer)| customer);
    Ok(Json(wire::ExportCustomer {
        account_id: account,
        sink,
        customer,
    }))
}

/// Sets the account's customer id in the sink. Its records waiting for one are sent at the
/// sink's next idle round.
#[utoipa::path(
    put,
    path = "/accounts/{id}/export-customers/{sink}",
    tag = "export",
    params(
        ("id" = String, Path, description = "The account's id."),
        ("sink" = String, Path, description = "The sink's name."),
    ),
    request_body = wire::SetExportCustomer,
    responses(
        (status = 200, description = "The customer id as set.", body = wire::ExportCustomer),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn set_customer(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
    body: JsonBody,
) -> Result<Json<wire::ExportCustomer>, HttpError> {
    caller.require_admin()?;
    let (account, sink) = customer_subject(&state, ids).await?;
    let body: wire::SetExportCustomer = body.parse()?;
    let customer = body.customer.trim();
    if customer.is_empty()
        || customer.chars().count() > MAX_CUSTOMER
        || customer.chars().any(char::is_control)
    {
        return Err(validation(
            "customer",
            format!("must be 1 to {MAX_CUSTOMER} printable characters"),
        ));
    }
    state
        .store
        .set_export_customer(account, &sink, Some(customer), state.clock.now())
        .await?;
    let change = Change::new("export_customer.set", account)
        .after(&serde_json::json!({ "sink": sink, "customer": customer }));
    audit::record(&state, &caller, request_id, change).await;
    Ok(Json(wire::ExportCustomer {
        account_id: account,
        sink,
        customer: Some(customer.to_string()),
    }))
}

/// Removes the account's customer id in the sink: its next records wait (unmapped) until one
/// is set again.
#[utoipa::path(
    delete,
    path = "/accounts/{id}/export-customers/{sink}",
    tag = "export",
    params(
        ("id" = String, Path, description = "The account's id."),
        ("sink" = String, Path, description = "The sink's name."),
    ),
    responses(
        (status = 204, description = "Removed (or there was none)."),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn delete_customer(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<impl IntoResponse, HttpError> {
    caller.require_admin()?;
    let (account, sink) = customer_subject(&state, ids).await?;
    state
        .store
        .set_export_customer(account, &sink, None, state.clock.now())
        .await?;
    let change =
        Change::new("export_customer.delete", account).before(&serde_json::json!({ "sink": sink }));
    audit::record(&state, &caller, request_id, change).await;
    Ok(StatusCode::NO_CONTENT)
}
