//! The keys page: the account's keys with their status, last use and this month's spend against
//! their caps; create, edit, roll and revoke through the same service functions as
//! `POST /keys`, `PATCH /keys/{id}`, `POST /keys/{id}/roll` and `POST /keys/{id}/revoke`. A new
//! secret is shown once, on the answer to the form that made it.

use crate::console::render::page;
use crate::console::report::{local_input, shown};
use crate::console::session::{holder, Session};
use crate::http::error::HttpError;
use crate::management::keys::{change_key, issue_key, key_view, revoke, roll};
use crate::state::AppState;
use askama::Template;
use axum::extract::{Form, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use tollgate_core::ledger::month_start;
use tollgate_core::{AccountId, KeyId, KeyStatus, Nanos, RequestId};
use tollgate_store::{IdempotencyBegin, IdempotencyClaim, KeyRecord, StoredResponse};
use tollgate_wire::api::{
    ApiKeyInfo, CreateKeyRequest, KeyState, Money, RollKeyRequest, UpdateKeyRequest,
};

/// The most keys the page lists.
const LISTED: u32 = 500;
/// A key whose month-to-date spend reaches this share of its cap is near it.
pub const NEAR_CAP_PERCENT: i64 = 80;

/// One row of the keys table.
pub struct KeyRow {
    pub info: ApiKeyInfo,
    pub state: &'static str,
    pub spent: Money,
    /// When it was last used, in the reporting zone.
    pub last_used: Option<String>,
    /// Whether this month's spend has reached [`NEAR_CAP_PERCENT`] of its cap.
    pub near_cap: bool,
}

#[derive(Template)]
#[template(path = "console/keys.html")]
struct KeysPage<'a> {
    rows: &'a [KeyRow],
    zone: &'a str,
    /// The create form's token: a fresh one per form shown, so the same form sent twice makes
    /// one key.
    form_token: String,
    problem: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "console/key_created.html")]
struct CreatedPage<'a> {
    info: &'a ApiKeyInfo,
    secret: &'a str,
    origin: &'a str,
    /// After a roll: until when the previous secret works, in the reporting zone.
    previous_until: Option<String>,
}

#[derive(Template)]
#[template(path = "console/key.html")]
struct KeyPage<'a> {
    info: &'a ApiKeyInfo,
    inactive: bool,
    expires: String,
    zone: &'a str,
    problem: Option<&'a str>,
}

fn state_name(status: KeyState) -> &'static str {
    match status {
        KeyState::Active => "active",
        KeyState::Inactive => "inactive",
        KeyState::Revoked => "revoked",
        KeyState::Expired => "expired",
    }
}

/// Whether `spent` has reached [`NEAR_CAP_PERCENT`] of `cap`.
pub fn near_cap(spent: i64, cap: Option<&Money>) -> bool {
    cap.is_some_and(|cap| {
        i128::from(spent) * 100 >= i128::from(cap.nanos) * i128::from(NEAR_CAP_PERCENT)
    })
}

/// The account's keys (up to [`LISTED`]) with their spend and last use, read in two queries.
async fn rows(state: &AppState, session: &Session) -> Result<Vec<KeyRow>, HttpError> {
    let Some(account) = session.who.account() else {
        return Ok(Vec::new());
    };
    state.ledger.flush().await?;
    let keys = state.store.keys(Some(account), None, LISTED).await?;
    let ids: Vec<KeyId> = keys.iter().map(|k| k.id).collect();
    let since = month_start(state.clock.now());
    let activity: HashMap<KeyId, _> = state
        .store
        .key_activity(&ids, since)
        .await?
        .into_iter()
        .map(|a| (a.key, a))
        .collect();
    Ok(keys
        .iter()
        .map(|key| {
            let (spent, last_used) = activity
                .get(&key.id)
                .map_or((Nanos::ZERO, None), |a| (a.spent, a.last_used));
            row(state, key, spent, last_used)
        })
        .collect())
}

/// The account's keys that have spent [`NEAR_CAP_PERCENT`] of their monthly cap or more (at
/// most 20), found among its capped keys however many keys it has.
pub async fn near_cap_rows(state: &AppState, account: AccountId) -> Result<Vec<KeyRow>, HttpError> {
    state.ledger.flush().await?;
    let since = month_start(state.clock.now());
    let percent = NEAR_CAP_PERCENT as u32;
    let mut rows = Vec::new();
    for near in state
        .store
        .keys_near_cap(account, since, percent, 20)
        .await?
    {
        if let Some(key) = state.store.key_by_id(near.key).await? {
            rows.push(row(state, &key, near.spent, None));
        }
    }
    Ok(rows)
}

/// A key's row from its record, this month's spend and its last use.
fn row(
    state: &AppState,
    key: &KeyRecord,
    spent: Nanos,
    last_used: Option<DateTime<Utc>>,
) -> KeyRow {
    let info = key_view(key, state);
    KeyRow {
        near_cap: near_cap(spent.0, info.monthly_spend_cap.as_ref()),
        spent: Money::new(spent, &state.config.currency),
        state: state_name(info.status),
        last_used: last_used.map(|at| shown(state.config.console.time_zone, at)),
        info,
    }
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
                zone: state.config.console.time_zone.name(),
                form_token: form_token(),
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

/// A key's form, as the browser sends it: lists are comma- or space-separated, the expiry is
/// a `datetime-local` in the reporting zone, empty fields mean the API's default (all routes,
/// anywhere, never, no cap).
#[derive(Deserialize)]
pub struct KeyForm {
    name: String,
    #[serde(default)]
    scopes: String,
    #[serde(default)]
    allowed_ips: String,
    #[serde(default)]
    expires_at: String,
    #[serde(default)]
    monthly_spend_cap: String,
    /// Edit only: `active` or `inactive`.
    #[serde(default)]
    status: String,
    /// Create only: the form's token.
    #[serde(default)]
    form_token: String,
}

/// A new form's token: 128 random bits.
fn form_token() -> String {
    let token: [u8; 16] = rand::random();
    token.iter().map(|b| format!("{b:02x}")).collect()
}

/// What claiming a create form's token found.
enum FormClaim {
    /// The form is new (or carries no token): make the key.
    Fresh(Option<IdempotencyClaim>),
    /// The form was sent before: its key exists, or is being made.
    AlreadySent,
}

/// Claims a create form's token in the idempotency store, under the account: the first send
/// of a form makes a key, a second (a double click, a resend) is told the key exists.
async fn claim_form(
    state: &AppState,
    session: &Session,
    token: &str,
    request_id: RequestId,
) -> Result<FormClaim, HttpError> {
    let (Some(account), false) = (session.who.account(), token.is_empty()) else {
        return Ok(FormClaim::Fresh(None));
    };
    let now = state.clock.now();
    let hour = chrono::TimeDelta::hours(1);
    let claim = IdempotencyClaim {
        scope: format!("console:{account}"),
        key: format!("create-key:{token}"),
        fingerprint: Sha256::digest(b"console: create a key").into(),
        owner: request_id,
        now,
        lease_until: now + hour,
        expires_at: now + chrono::TimeDelta::days(1),
    };
    Ok(match state.store.begin_idempotent(&claim).await? {
        IdempotencyBegin::Started => FormClaim::Fresh(Some(claim)),
        _ => FormClaim::AlreadySent,
    })
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

impl KeyForm {
    fn expiry(&self, state: &AppState) -> Result<Option<DateTime<Utc>>, String> {
        match self.expires_at.trim() {
            "" => Ok(None),
            text => local_input(state.config.console.time_zone, text)
                .map(Some)
                .map_err(|e| format!("The expiry: {e}.")),
        }
    }

    fn cap(&self) -> Option<String> {
        let cap = self.monthly_spend_cap.trim();
        (!cap.is_empty()).then(|| cap.to_string())
    }

    fn into_create(self, state: &AppState) -> Result<CreateKeyRequest, String> {
        Ok(CreateKeyRequest {
            expires_at: self.expiry(state)?,
            monthly_spend_cap: self.cap(),
            name: self.name,
            account_id: None,
            kind: None,
            scopes: list_of(&self.scopes),
            allowed_ips: list_of(&self.allowed_ips),
        })
    }

    /// Every field of the form, set: the page shows the key's current values, so what the
    /// holder left alone is sent back unchanged.
    fn into_update(self, state: &AppState) -> Result<UpdateKeyRequest, String> {
        let status = match self.status.trim() {
            "" => None,
            "active" => Some(Some(KeyStatus::Active)),
            "inactive" => Some(Some(KeyStatus::Inactive)),
            _ => return Err("The status is active or inactive.".into()),
        };
        Ok(UpdateKeyRequest {
            expires_at: Some(self.expiry(state)?),
            monthly_spend_cap: Some(self.cap()),
            name: Some(Some(self.name)),
            scopes: Some(Some(
                list_of(&self.scopes).unwrap_or_else(|| vec!["*".into()]),
            )),
            allowed_ips: Some(list_of(&self.allowed_ips)),
            status,
            rate_limits: None,
        })
    }
}

/// The address a usage snippet calls: this console's own origin, as the browser reached it.
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn status_of(error: &HttpError) -> StatusCode {
    StatusCode::from_u16(error.error.status()).unwrap_or(StatusCode::BAD_REQUEST)
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
    let form = match Form::<KeyForm>::from_request(request, &state).await {
        Ok(Form(form)) => {
            let token = form.form_token.trim().to_string();
            form.into_create(&state).map(|body| (body, token))
        }
        Err(_) => Err("The form could not be read; fill in at least a name.".into()),
    };
    let (body, token) = match form {
        Ok(body) => body,
        Err(problem) => {
            return keys_page(&state, &session, StatusCode::BAD_REQUEST, Some(&problem)).await
        }
    };
    let claim = match claim_form(&state, &session, &token, request_id).await {
        Ok(FormClaim::Fresh(claim)) => claim,
        Ok(FormClaim::AlreadySent) => {
            let problem = "This form was already sent, and made its key: it is listed below. \
                           Its secret was shown once, on the answer to the first send.";
            return keys_page(&state, &session, StatusCode::CONFLICT, Some(problem)).await;
        }
        Err(e) => return e.into_response(),
    };
    let issued = issue_key(&state, &session.caller(), request_id, body).await;
    if let Some(claim) = claim {
        // A made key holds the form's token (its record keeps the key's id, never the
        // secret); a refused form frees it, so the same form may be corrected and sent again.
        let settled = match &issued {
            Ok(created) => {
                let kept = StoredResponse {
                    status: StatusCode::CREATED.as_u16(),
                    headers: Vec::new(),
                    body: Some(created.key.id.to_string().into_bytes()),
                };
                let store = &state.store;
                store
                    .complete_idempotent(&claim.scope, &claim.key, request_id, &kept)
                    .await
            }
            Err(_) => {
                let store = &state.store;
                store
                    .release_idempotent(&claim.scope, &claim.key, request_id)
                    .await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(error = %e, "cannot settle a console form's token");
        }
    }
    match issued {
        Ok(created) => page(
            StatusCode::CREATED,
            &CreatedPage {
                info: &created.key,
                secret: &created.secret,
                origin: &origin(&headers),
                previous_until: None,
            },
        ),
        Err(error) => {
            keys_page(
                &state,
                &session,
                status_of(&error),
                Some(&error.error.message),
            )
            .await
        }
    }
}

/// The session's own key `id`; another account's answers exactly as one that does not exist.
async fn owned(state: &AppState, session: &Session, id: &str) -> Result<KeyRecord, Response> {
    let found = match id.parse::<KeyId>() {
        Ok(id) => state
            .store
            .key_by_id(id)
            .await
            .map_err(|e| HttpError::from(e).into_response())?,
        Err(_) => None,
    };
    match found.filter(|k| Some(k.account_id) == session.who.account()) {
        Some(key) => Ok(key),
        None => Err(keys_page(state, session, StatusCode::NOT_FOUND, Some("No such key.")).await),
    }
}

/// The signed-in holder's session and their key `id`, or the answer for anyone else.
async fn holder_key(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<(Session, KeyRecord), Response> {
    let session = holder(state, headers).await?;
    let key = owned(state, &session, id).await?;
    Ok((session, key))
}

fn key_page(
    state: &AppState,
    info: &ApiKeyInfo,
    status: StatusCode,
    problem: Option<&str>,
) -> Response {
    let tz = state.config.console.time_zone;
    let expires = info
        .expires_at
        .map(|at| at.with_timezone(&tz).format("%Y-%m-%dT%H:%M").to_string())
        .unwrap_or_default();
    page(
        status,
        &KeyPage {
            info,
            inactive: info.status == KeyState::Inactive,
            expires,
            zone: tz.name(),
            problem,
        },
    )
}

/// `GET /console/keys/{id}`: the key's settings, in a form to change them.
pub async fn one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match holder_key(&state, &headers, &id).await {
        Ok((_, key)) => key_page(&state, &key_view(&key, &state), StatusCode::OK, None),
        Err(answer) => answer,
    }
}

/// `POST /console/keys/{id}`: changes the key as `PATCH /keys/{id}` does.
pub async fn edit(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    let (session, key) = match holder_key(&state, &headers, &id).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let view = key_view(&key, &state);
    let body = match Form::<KeyForm>::from_request(request, &state).await {
        Ok(Form(form)) => form.into_update(&state),
        Err(_) => Err("The form could not be read; a key needs a name.".into()),
    };
    let body = match body {
        Ok(body) => body,
        Err(problem) => return key_page(&state, &view, StatusCode::BAD_REQUEST, Some(&problem)),
    };
    match change_key(&state, &session.caller(), request_id, key, body).await {
        Ok(_) => Redirect::to("/console/keys").into_response(),
        Err(error) => key_page(&state, &view, status_of(&error), Some(&error.error.message)),
    }
}

#[derive(Deserialize)]
pub struct RollForm {
    #[serde(default)]
    grace_period_seconds: String,
}

/// `POST /console/keys/{id}/roll`: a new secret, shown once, as `POST /keys/{id}/roll` gives it.
pub async fn roll_key(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    let (session, key) = match holder_key(&state, &headers, &id).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let grace = match Form::<RollForm>::from_request(request, &state).await {
        Ok(Form(form)) => match form.grace_period_seconds.trim() {
            "" => Ok(None),
            text => text.parse::<u64>().map(Some).map_err(|_| ()),
        },
        Err(_) => Err(()),
    };
    let Ok(grace_period_seconds) = grace else {
        let problem = "The grace period is a whole number of seconds.";
        return keys_page(&state, &session, StatusCode::BAD_REQUEST, Some(problem)).await;
    };
    let body = RollKeyRequest {
        grace_period_seconds,
    };
    match roll(&state, &session.caller(), request_id, key, body).await {
        Ok(rolled) => page(
            StatusCode::OK,
            &CreatedPage {
                info: &rolled.key,
                secret: &rolled.secret,
                origin: &origin(&headers),
                previous_until: Some(shown(
                    state.config.console.time_zone,
                    rolled.previous_secret_expires_at,
                )),
            },
        ),
        Err(error) => {
            keys_page(
                &state,
                &session,
                status_of(&error),
                Some(&error.error.message),
            )
            .await
        }
    }
}

pub async fn revoke_key(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (session, key) = match holder_key(&state, &headers, &id).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    match revoke(&state, &session.caller(), request_id, key.id).await {
        Ok(_) => Redirect::to("/console/keys").into_response(),
        Err(error) => {
            keys_page(
                &state,
                &session,
                status_of(&error),
                Some(&error.error.message),
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_near_its_cap_from_80_percent_and_never_without_one() {
        let cap = |nanos| Money {
            nanos,
            credits: String::new(),
            currency: String::new(),
        };
        assert!(!near_cap(79, Some(&cap(100))));
        assert!(near_cap(80, Some(&cap(100))));
        assert!(near_cap(150, Some(&cap(100))));
        assert!(!near_cap(i64::MAX, None));
        assert!(
            near_cap(i64::MAX / 2, Some(&cap(i64::MAX / 2))),
            "no overflow"
        );
    }
}
