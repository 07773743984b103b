//! The wallet page: every movement of the account's money, newest first, paged by a stable
//! cursor with no date cap, each typed and signed as the wallet sees it. It is
//! `GET /ledger`'s answer.

use crate::console::render::{page, CursorQuery};
use crate::console::session::holder_account;
use crate::management::billing::ledger_page;
use crate::state::AppState;
use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tollgate_wire::api::LedgerEntry;

/// Entries a page shows.
const PAGE_ROWS: u32 = 50;

/// One movement as the wallet sees it.
pub struct Movement {
    pub entry: LedgerEntry,
    /// What it did to the spendable balance: `in`, `out`, or `none` (a charge settled from
    /// money already held).
    pub direction: &'static str,
}

#[derive(Template)]
#[template(path = "console/wallet.html")]
struct WalletPage<'a> {
    movements: &'a [Movement],
    next: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<CursorQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let account = match holder_account(&state, &headers).await {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    let cursor = query.map(|Query(c)| c).unwrap_or_default();
    let before = cursor.cursor.trim().parse::<i64>().ok();
    let ledger = match ledger_page(&state, account, before, PAGE_ROWS).await {
        Ok(ledger) => ledger,
        Err(e) => return e.into_response(),
    };
    let wallet = format!("wallet:{account}");
    let movements: Vec<Movement> = ledger
        .data
        .into_iter()
        .map(|entry| Movement {
            direction: if entry.to == wallet {
                "in"
            } else if entry.from == wallet {
                "out"
            } else {
                "none"
            },
            entry,
        })
        .collect();
    page(
        StatusCode::OK,
        &WalletPage {
            movements: &movements,
            next: ledger
                .next_cursor
                .map(|c| format!("/console/wallet?cursor={c}")),
        },
    )
}
