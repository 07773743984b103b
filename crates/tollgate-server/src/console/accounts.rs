//! The operator's pages: every account with its status and balance, searched by name or id and
//! paged by id; an account's page, with a credit grant and suspend or reactivate; and the audit
//! log with the chain's verification. Each change goes through the same function as the admin
//! API, so it is validated and audited alike. An account holder's session gets 404 here, as for
//! a page that does not exist.

use crate::console::render::page;
use crate::console::report::shown;
use crate::console::session::operator;
use crate::http::error::HttpError;
use crate::management::accounts::{account_view, change_status};
use crate::management::audit::{entries_page, verify_chain};
use crate::management::billing::grant;
use crate::management::extract::page as paged;
use crate::management::plans::{allowances_of, grant_pack, subscribe};
use crate::state::AppState;
use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tollgate_core::plan::SubscriptionStatus;
use tollgate_core::{AccountId, RequestId};
use tollgate_wire::api::{Account, AuditEntry, AuditVerification, GrantRequest};
use tollgate_wire::api::{Allowances, CreatePackRequest, SetSubscriptionRequest};

/// Accounts, or audit entries, a page shows.
const PAGE_ROWS: u32 = 50;

#[derive(Template)]
#[template(path = "console/accounts.html")]
struct AccountsPage<'a> {
    accounts: &'a [Account],
    search: &'a str,
    next: Option<String>,
    zone: &'a str,
    state: &'a AppState,
}

#[derive(Template)]
#[template(path = "console/account.html")]
struct AccountPage<'a> {
    account: &'a Account,
    allowances: &'a Allowances,
    /// The configured plans, for the plan form, and whether each is the account's.
    plans: Vec<(&'a str, bool)>,
    statuses: Vec<&'static str>,
    groups: Vec<&'a str>,
    /// The grant form's reference: a fresh one per form shown, so the same form sent twice
    /// grants once.
    reference: String,
    notice: Option<&'a str>,
    problem: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage<'a> {
    entries: &'a [AuditEntry],
    verification: &'a AuditVerification,
    next: Option<String>,
    zone: &'a str,
    state: &'a AppState,
}

impl AccountsPage<'_> {
    fn when(&self, at: &DateTime<Utc>) -> String {
        shown(self.state.config.console.time_zone, *at)
    }
}

impl AuditPage<'_> {
    fn when(&self, at: &DateTime<Utc>) -> String {
        shown(self.state.config.console.time_zone, *at)
    }

    fn json(value: &Option<serde_json::Value>) -> String {
        value.as_ref().map_or_else(String::new, |v| v.to_string())
    }
}

#[derive(Deserialize, Default)]
pub struct AccountsQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    cursor: String,
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<AccountsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = operator(&state, &headers).await {
        return answer;
    }
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let after = AccountId::parse(query.cursor.trim());
    let search = query.q.trim();
    if let Err(e) = state.ledger.flush().await {
        return HttpError::from(e).into_response();
    }
    let found = if search.is_empty() {
        state.store.accounts(after, None, PAGE_ROWS + 1).await
    } else {
        state
            .store
            .search_accounts(search, after, PAGE_ROWS + 1)
            .await
    };
    let accounts = match found {
        Ok(accounts) => accounts,
        Err(e) => return HttpError::from(e).into_response(),
    };
    let (accounts, cursor) = paged(accounts, PAGE_ROWS, |a| a.id.to_string());
    let next = cursor.map(|cursor| {
        let query = serde_urlencoded::to_string([("q", search), ("cursor", &cursor)]);
        format!("/console/accounts?{}", query.unwrap_or_default())
    });
    let accounts: Vec<Account> = accounts.iter().map(|a| account_view(&state, a)).collect();
    page(
        StatusCode::OK,
        &AccountsPage {
            accounts: &accounts,
            search,
            next,
            zone: state.config.console.time_zone.name(),
            state: &state,
        },
    )
}

/// The account `id`, as the admin API shows it, or the answer that there is none.
async fn find(state: &AppState, id: &str) -> Result<Account, Response> {
    let found = match AccountId::parse(id) {
        Some(id) => {
            state
                .ledger
                .flush()
                .await
                .map_err(|e| HttpError::from(e).into_response())?;
            state
                .store
                .account(id)
                .await
                .map_err(|e| HttpError::from(e).into_response())?
        }
        None => None,
    };
    found
        .map(|a| account_view(state, &a))
        .ok_or_else(|| HttpError::not_found("account").into_response())
}

async fn account_page(
    state: &AppState,
    account: &Account,
    status: StatusCode,
    notice: Option<&str>,
    problem: Option<&str>,
) -> Response {
    let allowances = match allowances_of(state, account.id).await {
        Ok(allowances) => allowances,
        Err(e) => return e.into_response(),
    };
    let mut groups: Vec<&str> = state.config.route_groups().collect();
    groups.sort_unstable();
    groups.dedup();
    let token: [u8; 16] = rand::random();
    let reference = format!(
        "console-{}",
        token.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    page(
        status,
        &AccountPage {
            account,
            allowances: &allowances,
            plans: state
                .config
                .plans
                .names()
                .map(|name| (name, allowances.plan.as_deref() == Some(name)))
                .collect(),
            statuses: SubscriptionStatus::ALL.iter().map(|s| s.as_str()).collect(),
            groups,
            reference,
            notice,
            problem,
        },
    )
}

#[derive(Deserialize, Default)]
pub struct AccountQuery {
    /// Set by the redirect after a grant: `applied` or `already_applied`.
    #[serde(default)]
    granted: String,
}

/// `GET /console/accounts/{id}`.
pub async fn one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<AccountQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = operator(&state, &headers).await {
        return answer;
    }
    let account = match find(&state, &id).await {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    let notice = match query.map(|Query(q)| q).unwrap_or_default().granted.as_str() {
        "applied" => Some("The credits were granted."),
        "already_applied" => Some("That grant was already applied; it was not applied again."),
        "plan" => Some("The plan was set."),
        "pack" => Some("The pack was granted."),
        "pack_again" => Some("That pack was already granted; it was not granted again."),
        _ => None,
    };
    account_page(&state, &account, StatusCode::OK, notice, None).await
}

#[derive(Deserialize)]
pub struct GrantForm {
    #[serde(default)]
    amount: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    reference: String,
}

/// `POST /console/accounts/{id}/credits`: a grant, as `POST /accounts/{id}/credits` makes it,
/// under the form's reference.
pub async fn grant_credits(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<GrantForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let session = match operator(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    let account = match find(&state, &id).await {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    let Ok(Form(form)) = form else {
        let problem = "The form could not be read.";
        return account_page(
            &state,
            &account,
            StatusCode::BAD_REQUEST,
            None,
            Some(problem),
        )
        .await;
    };
    let body = GrantRequest {
        amount: form.amount.trim().to_string(),
        reason: form.reason,
        reference: Some(form.reference.trim().to_string()).filter(|r| !r.is_empty()),
    };
    match grant(&state, &session.caller(), request_id, account.id, body).await {
        Ok((_, outcome)) => Redirect::to(&format!(
            "/console/accounts/{}?granted={outcome}",
            account.id
        ))
        .into_response(),
        Err(error) => {
            let status =
                StatusCode::from_u16(error.error.status()).unwrap_or(StatusCode::BAD_REQUEST);
            account_page(&state, &account, status, None, Some(&error.error.message)).await
        }
    }
}

async fn set_status(
    state: AppState,
    request_id: RequestId,
    id: String,
    headers: HeaderMap,
    status: &str,
) -> Response {
    let session = match operator(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    let Some(id) = AccountId::parse(&id) else {
        return HttpError::not_found("account").into_response();
    };
    match change_status(&state, &session.caller(), request_id, id, status).await {
        Ok(_) => Redirect::to(&format!("/console/accounts/{id}")).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn suspend(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    set_status(state, request_id, id, headers, "suspended").await
}

pub async fn reactivate(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    set_status(state, request_id, id, headers, "active").await
}

#[derive(Deserialize)]
pub struct PlanForm {
    #[serde(default)]
    plan: String,
    #[serde(default)]
    status: String,
}

/// `POST /console/accounts/{id}/subscription`: the plan, as `PUT /accounts/{id}/subscription`
/// sets it.
pub async fn set_plan(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<PlanForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let (session, account) = match operator_and_account(&state, &headers, &id).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let Ok(Form(form)) = form else {
        let problem = "The form could not be read.";
        return account_page(
            &state,
            &account,
            StatusCode::BAD_REQUEST,
            None,
            Some(problem),
        )
        .await;
    };
    let body = SetSubscriptionRequest {
        plan: form.plan,
        status: Some(form.status).filter(|s| !s.is_empty()),
        started_at: None,
    };
    match subscribe(&state, &session.caller(), request_id, account.id, body).await {
        Ok(_) => {
            Redirect::to(&format!("/console/accounts/{}?granted=plan", account.id)).into_response()
        }
        Err(error) => refused(&state, &account, error).await,
    }
}

#[derive(Deserialize)]
pub struct PackForm {
    #[serde(default)]
    id: String,
    #[serde(default)]
    units: String,
    #[serde(default)]
    meter: String,
    #[serde(default)]
    routes: String,
    /// A date: the pack expires at its start (UTC).
    #[serde(default)]
    expires: String,
}

/// `POST /console/accounts/{id}/packs`: a pack, as `POST /accounts/{id}/packs` grants it,
/// under the form's id (so the same form sent twice grants once).
pub async fn grant_pack_form(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<PackForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let (session, account) = match operator_and_account(&state, &headers, &id).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let form = form.ok().map(|Form(form)| form);
    let units = form
        .as_ref()
        .and_then(|f| f.units.trim().parse::<u64>().ok());
    let expires = form.as_ref().and_then(|f| {
        chrono::NaiveDate::parse_from_str(f.expires.trim(), "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc())
    });
    let (Some(form), Some(units), Some(expires_at)) = (form, units, expires) else {
        let problem = "Give a whole number of units and an expiry date.";
        return account_page(
            &state,
            &account,
            StatusCode::BAD_REQUEST,
            None,
            Some(problem),
        )
        .await;
    };
    let body = CreatePackRequest {
        id: Some(form.id).filter(|id| !id.is_empty()),
        meter: form.meter,
        units,
        routes: Some(form.routes).filter(|r| !r.is_empty()),
        expires_at,
    };
    match grant_pack(&state, &session.caller(), request_id, account.id, body).await {
        Ok((added, _)) => {
            let outcome = if added { "pack" } else { "pack_again" };
            Redirect::to(&format!(
                "/console/accounts/{}?granted={outcome}",
                account.id
            ))
            .into_response()
        }
        Err(error) => refused(&state, &account, error).await,
    }
}

async fn operator_and_account(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<(crate::console::session::Session, Account), Response> {
    let session = operator(state, headers).await?;
    let account = find(state, id).await?;
    Ok((session, account))
}

/// The account's page with the API's refusal on it.
async fn refused(state: &AppState, account: &Account, error: HttpError) -> Response {
    let status = StatusCode::from_u16(error.error.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let message = match error.error.field_errors.iter().next() {
        Some((field, problems)) => format!("{field}: {}", problems.join("; ")),
        None => error.error.message.clone(),
    };
    account_page(state, account, status, None, Some(&message)).await
}

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    #[serde(default)]
    cursor: String,
}

/// `GET /console/audit`: the log oldest first, as `GET /audit` pages it, under the chain's
/// verification as `GET /audit/verify` gives it.
pub async fn audit(
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = operator(&state, &headers).await {
        return answer;
    }
    let after = query
        .ok()
        .and_then(|Query(q)| q.cursor.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let verification = match verify_chain(&state).await {
        Ok(verification) => verification,
        Err(e) => return e.into_response(),
    };
    let entries = match entries_page(&state, after, PAGE_ROWS).await {
        Ok(entries) => entries,
        Err(e) => return e.into_response(),
    };
    page(
        StatusCode::OK,
        &AuditPage {
            entries: &entries.data,
            verification: &verification,
            next: entries
                .next_cursor
                .map(|c| format!("/console/audit?cursor={c}")),
            zone: state.config.console.time_zone.name(),
            state: &state,
        },
    )
}
