//! The webhooks page: the account's endpoints with their status, adding one (its secret shown
//! once), testing, disabling, rotating and deleting them, each one's delivery log with a
//! button to send again, and the low-balance amount. Every action goes through the same
//! service functions as `/api/v1/webhook-endpoints` and `/accounts/{id}/balance-alert`.

use crate::console::render::page;
use crate::console::report::shown;
use crate::console::session::{holder, Session};
use crate::http::error::HttpError;
use crate::management::webhooks::{
    create, delete, owned_endpoint, ping, redeliver_one, rotate, set_alert, update,
};
use crate::state::AppState;
use askama::Template;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use serde::Deserialize;
use tollgate_core::{AccountId, EndpointId, EventId, RequestId};
use tollgate_wire::api::{
    CreateEndpointRequest, SetBalanceAlertRequest, UpdateEndpointRequest, WebhookEndpoint,
};

/// The most deliveries a log page shows.
const LOGGED: u32 = 100;

#[derive(Template)]
#[template(path = "console/webhooks.html")]
struct WebhooksPage<'a> {
    endpoints: &'a [WebhookEndpoint],
    low_balance: String,
    problem: Option<&'a str>,
    notice: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "console/webhook_secret.html")]
struct SecretPage<'a> {
    endpoint: &'a WebhookEndpoint,
    secret: &'a str,
    rotated: bool,
    previous_until: Option<String>,
}

/// One row of a delivery log.
struct DeliveryRow {
    event_id: EventId,
    event_type: String,
    status: String,
    attempts: u32,
    /// The receiver's last status or the error, and when.
    last: String,
    next: String,
}

#[derive(Template)]
#[template(path = "console/webhook.html")]
struct LogPage<'a> {
    endpoint: &'a WebhookEndpoint,
    rows: &'a [DeliveryRow],
    zone: &'a str,
    notice: Option<&'a str>,
}

fn status_of(error: &HttpError) -> StatusCode {
    StatusCode::from_u16(error.error.status()).unwrap_or(StatusCode::BAD_REQUEST)
}

/// The signed-in holder's session and account, or the answer for anyone else.
async fn holder_of(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Session, AccountId), Response> {
    let session = holder(state, headers).await?;
    match session.who.account() {
        Some(account) => Ok((session, account)),
        None => Err(HttpError::not_found("account").into_response()),
    }
}

async fn webhooks_page(
    state: &AppState,
    account: AccountId,
    status: StatusCode,
    problem: Option<&str>,
    notice: Option<&str>,
) -> Response {
    let listed = async {
        let endpoints = state.store.endpoints(account).await?;
        let low = state.store.low_balance(account).await?;
        Ok::<_, HttpError>((endpoints, low))
    };
    match listed.await {
        Ok((endpoints, low)) => {
            let views: Vec<WebhookEndpoint> = endpoints
                .iter()
                .map(crate::management::webhooks::endpoint_view)
                .collect();
            page(
                status,
                &WebhooksPage {
                    endpoints: &views,
                    low_balance: low.map(|n| n.to_string()).unwrap_or_default(),
                    problem,
                    notice,
                },
            )
        }
        Err(e) => e.into_response(),
    }
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match holder_of(&state, &headers).await {
        Ok((_, account)) => webhooks_page(&state, account, StatusCode::OK, None, None).await,
        Err(answer) => answer,
    }
}

/// The add form: events comma- or space-separated, empty for every type.
#[derive(Deserialize)]
pub struct EndpointForm {
    url: String,
    #[serde(default)]
    events: String,
    #[serde(default)]
    description: String,
}

pub async fn add(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    form: Result<Form<EndpointForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let (session, account) = match holder_of(&state, &headers).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let Ok(Form(form)) = form else {
        let problem = "The form could not be read; fill in the URL.";
        return webhooks_page(
            &state,
            account,
            StatusCode::BAD_REQUEST,
            Some(problem),
            None,
        )
        .await;
    };
    let events: Vec<String> = form
        .events
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let body = CreateEndpointRequest {
        url: form.url,
        account_id: None,
        events: Some(events),
        description: Some(form.description),
    };
    match create(&state, &session.caller(), request_id, body).await {
        Ok(created) => page(
            StatusCode::CREATED,
            &SecretPage {
                endpoint: &created.endpoint,
                secret: &created.secret,
                rotated: false,
                previous_until: None,
            },
        ),
        Err(error) => {
            let problem = error.error.message.clone();
            webhooks_page(&state, account, status_of(&error), Some(&problem), None).await
        }
    }
}

/// The account's endpoint named in the path, or the page saying there is none.
async fn endpoint_in_path(
    state: &AppState,
    session: &Session,
    account: AccountId,
    id: &str,
) -> Result<EndpointId, Response> {
    let found = match EndpointId::parse(id) {
        Some(id) => owned_endpoint(state, &session.caller(), id).await.ok(),
        None => None,
    };
    match found.filter(|e| e.account_id == account) {
        Some(endpoint) => Ok(endpoint.id),
        None => {
            let problem = "No such endpoint.";
            Err(webhooks_page(state, account, StatusCode::NOT_FOUND, Some(problem), None).await)
        }
    }
}

/// `POST /console/webhooks/{id}/{action}`: test, enable, disable, rotate or delete.
pub async fn act(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (session, account) = match holder_of(&state, &headers).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let id = match endpoint_in_path(&state, &session, account, &id).await {
        Ok(id) => id,
        Err(answer) => return answer,
    };
    let caller = session.caller();
    let toggled = |enabled| UpdateEndpointRequest {
        enabled: Some(enabled),
        ..UpdateEndpointRequest::default()
    };
    let done = match action.as_str() {
        "test" => ping(&state, &caller, request_id, id)
            .await
            .map(|_| "A test event is on its way; its delivery shows in the endpoint's log."),
        "enable" => update(&state, &caller, request_id, id, toggled(true))
            .await
            .map(|_| "Enabled: new events are sent to it again."),
        "disable" => update(&state, &caller, request_id, id, toggled(false))
            .await
            .map(|_| "Disabled: nothing is sent to it until it is enabled."),
        "delete" => delete(&state, &caller, request_id, id)
            .await
            .map(|_| "Deleted, with its delivery log."),
        "rotate" => {
            return match rotate(&state, &caller, request_id, id).await {
                Ok(rotated) => {
                    let tz = state.config.console.time_zone;
                    let previous_until = rotated
                        .endpoint
                        .previous_secret_expires_at
                        .map(|at| shown(tz, at));
                    page(
                        StatusCode::OK,
                        &SecretPage {
                            endpoint: &rotated.endpoint,
                            secret: &rotated.secret,
                            rotated: true,
                            previous_until,
                        },
                    )
                }
                Err(error) => error.into_response(),
            }
        }
        _ => return HttpError::not_found("console page").into_response(),
    };
    match done {
        Ok(notice) => webhooks_page(&state, account, StatusCode::OK, None, Some(notice)).await,
        Err(error) => {
            let problem = error.error.message.clone();
            webhooks_page(&state, account, status_of(&error), Some(&problem), None).await
        }
    }
}

async fn log_page(
    state: &AppState,
    session: &Session,
    account: AccountId,
    id: &str,
    notice: Option<&str>,
) -> Response {
    let id = match endpoint_in_path(state, session, account, id).await {
        Ok(id) => id,
        Err(answer) => return answer,
    };
    let read = async {
        let endpoint = owned_endpoint(state, &session.caller(), id).await?;
        let deliveries = state.store.deliveries(id, None, LOGGED).await?;
        Ok::<_, HttpError>((endpoint, deliveries))
    };
    let (endpoint, deliveries) = match read.await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let tz = state.config.console.time_zone;
    let rows: Vec<DeliveryRow> = deliveries
        .into_iter()
        .map(|d| {
            let answer = match (d.last_status, &d.last_error) {
                (_, Some(error)) => error.clone(),
                (Some(status), None) => format!("{status}"),
                (None, None) => "not tried yet".into(),
            };
            DeliveryRow {
                event_id: d.event_id,
                event_type: d.event_type,
                status: d.status.as_str().to_string(),
                attempts: d.attempts,
                last: format!("{answer} ({})", shown(tz, d.updated_at)),
                next: d.next_at.map(|at| shown(tz, at)).unwrap_or_default(),
            }
        })
        .collect();
    page(
        StatusCode::OK,
        &LogPage {
            endpoint: &crate::management::webhooks::endpoint_view(&endpoint),
            rows: &rows,
            zone: tz.name(),
            notice,
        },
    )
}

/// `GET /console/webhooks/{id}`: the endpoint's delivery log.
pub async fn log(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match holder_of(&state, &headers).await {
        Ok((session, account)) => log_page(&state, &session, account, &id, None).await,
        Err(answer) => answer,
    }
}

/// `POST /console/webhooks/{id}/deliveries/{event}/redeliver`.
pub async fn redeliver(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path((id, event)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (session, account) = match holder_of(&state, &headers).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let sent = match (EndpointId::parse(&id), EventId::parse(&event)) {
        (Some(endpoint), Some(event)) => {
            redeliver_one(&state, &session.caller(), request_id, endpoint, event).await
        }
        _ => Err(HttpError::not_found("webhook delivery")),
    };
    match sent {
        Ok(()) => {
            let notice = "Sent again: the delivery is due now.";
            log_page(&state, &session, account, &id, Some(notice)).await
        }
        Err(error) => error.into_response(),
    }
}

#[derive(Deserialize)]
pub struct AlertForm {
    #[serde(default)]
    low_balance: String,
}

/// `POST /console/webhooks/alert`: the low-balance amount (empty turns it off).
pub async fn alert(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    form: Result<Form<AlertForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let (session, account) = match holder_of(&state, &headers).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let amount = form
        .map(|Form(f)| f.low_balance.trim().to_string())
        .unwrap_or_default();
    let body = SetBalanceAlertRequest {
        low_balance: (!amount.is_empty()).then_some(amount),
    };
    match set_alert(&state, &session.caller(), request_id, account, body).await {
        Ok(_) => Redirect::to("/console/webhooks").into_response(),
        Err(error) => {
            let problem = error.error.message.clone();
            webhooks_page(&state, account, status_of(&error), Some(&problem), None).await
        }
    }
}
