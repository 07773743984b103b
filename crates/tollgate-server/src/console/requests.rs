//! The requests page: the account's usage log, newest first, filtered in the URL and paged by a
//! stable cursor, and a box that finds one request by its exact ID (refusals included) in one
//! lookup, across every date the log keeps. What it shows is `GET /requests` and
//! `GET /requests/{id}`'s answer.

use crate::console::pages::page;
use crate::console::session::{holder, Session};
use crate::http::error::HttpError;
use crate::management::billing::usage_view;
use crate::management::extract::page as paged;
use crate::state::AppState;
use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tollgate_core::{KeyId, RequestId};
use tollgate_store::UsageFilter;
use tollgate_wire::api::UsageRecord;

/// Rows a page shows.
const PAGE_ROWS: u32 = 50;

#[derive(Deserialize, Default)]
pub struct Filters {
    #[serde(default)]
    key: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    cursor: String,
    /// An exact request ID to find.
    #[serde(default)]
    id: String,
}

#[derive(Template)]
#[template(path = "console/requests.html")]
struct RequestsPage<'a> {
    rows: &'a [UsageRecord],
    key: &'a str,
    status: &'a str,
    next: Option<String>,
    retention: &'a str,
    problem: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "console/request.html")]
struct RequestPage<'a> {
    row: &'a UsageRecord,
}

fn retention(state: &AppState) -> String {
    humantime::format_duration(state.config.usage_retention).to_string()
}

/// One request of the session's account, or the page that says there is none.
async fn detail(state: &AppState, session: &Session, id: &str) -> Response {
    let found = match RequestId::parse(id.trim()) {
        Some(id) => {
            if let Err(e) = state.ledger.flush().await {
                return HttpError::from(e).into_response();
            }
            match state.store.request(id).await {
                Ok(row) => row.filter(|r| Some(r.account_id) == session.who.account()),
                Err(e) => return HttpError::from(e).into_response(),
            }
        }
        None => None,
    };
    match found {
        Some(row) => page(
            StatusCode::OK,
            &RequestPage {
                row: &usage_view(state, row),
            },
        ),
        None => {
            let problem = format!(
                "No request of this account has the ID '{}' in the last {} (how long the log \
                 keeps requests).",
                id.trim(),
                retention(state)
            );
            page(
                StatusCode::NOT_FOUND,
                &RequestsPage {
                    rows: &[],
                    key: "",
                    status: "",
                    next: None,
                    retention: &retention(state),
                    problem: Some(&problem),
                },
            )
        }
    }
}

pub async fn one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match holder(&state, &headers).await {
        Ok(session) => detail(&state, &session, &id).await,
        Err(answer) => answer,
    }
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<Filters>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let session = match holder(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    // Every filter is text, checked below: a query that does not read at all filters nothing.
    let filters = query.map(|Query(filters)| filters).unwrap_or_default();
    if !filters.id.trim().is_empty() {
        return detail(&state, &session, &filters.id).await;
    }
    let mut problems = Vec::new();
    let key = match filters.key.trim() {
        "" => None,
        text => KeyId::parse(text).or_else(|| {
            problems.push("The key filter must be a key id (key_...).");
            None
        }),
    };
    let status = match filters.status.trim() {
        "" => None,
        text => text
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
            .or_else(|| {
                problems.push("The status filter must be an HTTP status, 100 to 599.");
                None
            }),
    };
    let before = match filters.cursor.trim() {
        "" => None,
        text => RequestId::parse(text),
    };
    let retention = retention(&state);
    if let Some(problem) = problems.first() {
        return page(
            StatusCode::BAD_REQUEST,
            &RequestsPage {
                rows: &[],
                key: &filters.key,
                status: &filters.status,
                next: None,
                retention: &retention,
                problem: Some(problem),
            },
        );
    }
    if let Err(e) = state.ledger.flush().await {
        return HttpError::from(e).into_response();
    }
    let filter = UsageFilter {
        account: session.who.account(),
        key,
        route: None,
        status,
        from: None,
        to: None,
        before,
        limit: PAGE_ROWS + 1,
    };
    let rows = match state.store.requests(&filter).await {
        Ok(rows) => rows,
        Err(e) => return HttpError::from(e).into_response(),
    };
    let (rows, cursor) = paged(rows, PAGE_ROWS, |r| r.request_id.to_string());
    // The next page starts after this page's last row, with the same filters.
    let next = cursor.map(|cursor| {
        let mut query = format!("/console/requests?cursor={cursor}");
        if let Some(key) = key {
            query.push_str(&format!("&key={key}"));
        }
        if let Some(status) = status {
            query.push_str(&format!("&status={status}"));
        }
        query
    });
    let rows: Vec<UsageRecord> = rows.into_iter().map(|r| usage_view(&state, r)).collect();
    page(
        StatusCode::OK,
        &RequestsPage {
            rows: &rows,
            key: &filters.key,
            status: &filters.status,
            next,
            retention: &retention,
            problem: None,
        },
    )
}
