//! The operator's accounts page: every account with its status and balance, paged by id, and
//! suspend or reactivate through the same function as the admin API. An account holder's
//! session gets 404 here, as for a page that does not exist.

use crate::console::pages::{page, CursorQuery};
use crate::console::session::operator;
use crate::http::error::HttpError;
use crate::management::accounts::{account_view, change_status};
use crate::management::extract::page as paged;
use crate::state::AppState;
use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use tollgate_core::{AccountId, RequestId};
use tollgate_wire::api::Account;

/// Accounts a page shows.
const PAGE_ROWS: u32 = 50;

#[derive(Template)]
#[template(path = "console/accounts.html")]
struct AccountsPage<'a> {
    accounts: &'a [Account],
    next: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<CursorQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = operator(&state, &headers).await {
        return answer;
    }
    let after = query
        .ok()
        .and_then(|Query(c)| AccountId::parse(c.cursor.trim()));
    if let Err(e) = state.ledger.flush().await {
        return HttpError::from(e).into_response();
    }
    let accounts = match state.store.accounts(after, None, PAGE_ROWS + 1).await {
        Ok(accounts) => accounts,
        Err(e) => return HttpError::from(e).into_response(),
    };
    let (accounts, cursor) = paged(accounts, PAGE_ROWS, |a| a.id.to_string());
    let next = cursor.map(|cursor| format!("/console/accounts?cursor={cursor}"));
    let accounts: Vec<Account> = accounts.iter().map(|a| account_view(&state, a)).collect();
    page(
        StatusCode::OK,
        &AccountsPage {
            accounts: &accounts,
            next,
        },
    )
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
        Ok(_) => Redirect::to("/console/accounts").into_response(),
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
