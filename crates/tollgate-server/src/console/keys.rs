//! The keys page: the account's keys with their status and this month's spend against their
//! caps; create (the secret shown once, on the answer to the form) and revoke, through the same
//! service functions as `POST /keys` and `POST /keys/{id}/revoke`.

use crate::console::pages::page;
use crate::console::session::{holder, Session};
use crate::http::error::HttpError;
use crate::management::keys::{issue_key, key_view, revoke};
use crate::state::AppState;
use askama::Template;
use axum::extract::{Form, FromRequest, Path, Request, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use chrono::{NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;
use tollgate_core::ledger::month_start;
use tollgate_core::{KeyId, RequestId};
use tollgate_wire::api::{ApiKeyInfo, CreateKeyRequest, KeyState, Money};

/// The most keys the page lists.
const LISTED: u32 = 500;

/// One row of the keys table.
pub struct KeyRow {
    pub info: ApiKeyInfo,
    pub state: &'static str,
    pub spent: Money,
}

#[derive(Template)]
#[template(path = "console/keys.html")]
struct KeysPage<'a> {
    rows: &'a [KeyRow],
    problem: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "console/key_created.html")]
struct CreatedPage<'a> {
    info: &'a ApiKeyInfo,
    secret: &'a str,
    origin: &'a str,
}

async fn rows(state: &AppState, session: &Session) -> Result<Vec<KeyRow>, HttpError> {
    let Some(account) = session.who.account() else {
        return Ok(Vec::new());
    };
    let now = state.clock.now();
    let mut rows = Vec::new();
    for key in state.store.keys(Some(account), None, LISTED).await? {
        let spent = state
            .store
            .key_spent_since(key.id, month_start(now))
            .await?;
        let info = key_view(&key, state);
        let state_name = match info.status {
            KeyState::Active => "active",
            KeyState::Inactive => "inactive",
            KeyState::Revoked => "revoked",
            KeyState::Expired => "expired",
        };
        rows.push(KeyRow {
            spent: Money::new(spent, &state.config.currency),
            state: state_name,
            info,
        });
    }
    Ok(rows)
}

async fn keys_page(
    state: &AppState,
    session: &Session,
    status: StatusCode,
    problem: Option<&str>,
) -> Response {
    match rows(state, session).await {
        Ok(rows) => page(
            status,
            &KeysPage {
                rows: &rows,
                problem,
            },
        ),
        Err(e) => e.into_response(),
    }
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let session = match holder(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    keys_page(&state, &session, StatusCode::OK, None).await
}

/// The create form, as the browser sends it: lists are comma- or space-separated, the expiry
/// is a `datetime-local` read as UTC, empty fields are left out.
#[derive(Deserialize)]
pub struct NewKeyForm {
    name: String,
    #[serde(default)]
    scopes: String,
    #[serde(default)]
    allowed_ips: String,
    #[serde(default)]
    expires_at: String,
    #[serde(default)]
    monthly_spend_cap: String,
}

fn list_of(text: &str) -> Option<Vec<String>> {
    let items: Vec<String> = text
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    (!items.is_empty()).then_some(items)
}

impl NewKeyForm {
    fn into_request(self) -> Result<CreateKeyRequest, &'static str> {
        let expires_at = match self.expires_at.trim() {
            "" => None,
            text => {
                let local = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
                    .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
                    .map_err(|_| "The expiry must be a date and time, e.g. 2027-01-31T18:00.")?;
                Some(Utc.from_utc_datetime(&local))
            }
        };
        let cap = self.monthly_spend_cap.trim();
        Ok(CreateKeyRequest {
            name: self.name,
            account_id: None,
            kind: None,
            scopes: list_of(&self.scopes),
            allowed_ips: list_of(&self.allowed_ips),
            expires_at,
            monthly_spend_cap: (!cap.is_empty()).then(|| cap.to_string()),
        })
    }
}

pub async fn create(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    let session = match holder(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let form = match Form::<NewKeyForm>::from_request(request, &state).await {
        Ok(Form(form)) => form.into_request(),
        Err(_) => Err("The form could not be read; fill in at least a name."),
    };
    let body = match form {
        Ok(body) => body,
        Err(problem) => {
            return keys_page(&state, &session, StatusCode::BAD_REQUEST, Some(problem)).await
        }
    };
    match issue_key(&state, &session.caller(), request_id, body).await {
        Ok(created) => page(
            StatusCode::CREATED,
            &CreatedPage {
                info: &created.key,
                secret: &created.secret,
                origin: &format!("http://{host}"),
            },
        ),
        Err(error) => {
            let status =
                StatusCode::from_u16(error.error.status()).unwrap_or(StatusCode::BAD_REQUEST);
            keys_page(&state, &session, status, Some(&error.error.message)).await
        }
    }
}

pub async fn revoke_key(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let session = match holder(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    // Another account's key answers exactly as one that does not exist.
    let owned = match id.parse::<KeyId>() {
        Ok(id) => match state.store.key_by_id(id).await {
            Ok(key) => key.filter(|k| Some(k.account_id) == session.who.account()),
            Err(e) => return HttpError::from(e).into_response(),
        },
        Err(_) => None,
    };
    let Some(key) = owned else {
        return keys_page(
            &state,
            &session,
            StatusCode::NOT_FOUND,
            Some("No such key."),
        )
        .await;
    };
    match revoke(&state, &session.caller(), request_id, key.id).await {
        Ok(_) => Redirect::to("/console/keys").into_response(),
        Err(error) => {
            let status =
                StatusCode::from_u16(error.error.status()).unwrap_or(StatusCode::BAD_REQUEST);
            keys_page(&state, &session, status, Some(&error.error.message)).await
        }
    }
}
