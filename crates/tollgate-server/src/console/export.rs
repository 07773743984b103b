//! CSV downloads of the requests page (with exactly its filters) and of the wallet. Streamed a
//! store page at a time, read only as the client takes it, so memory stays bounded however long
//! the log; the last line is the totals. A cell a spreadsheet would read as a formula (starting
//! with `=`, `+`, `-`, `@`, a tab or a carriage return) is written with a leading `'`.

use crate::console::requests::Filters;
use crate::console::session::{holder, holder_account};
use crate::http::error::HttpError;
use crate::management::billing::ledger_page;
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::stream;
use tollgate_core::{AccountId, ErrorCode, Nanos};
use tollgate_store::UsageFilter;

/// Rows read from the store at a time.
const CHUNK_ROWS: u32 = 500;

/// `text` safe to open in a spreadsheet: never read as a formula.
pub fn cell(text: &str) -> String {
    match text.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{text}"),
        _ => text.to_string(),
    }
}

/// One CSV line of `cells`, each escaped as [`cell`] and quoted as CSV needs.
fn line<I: IntoIterator<Item = String>>(cells: I) -> Result<Bytes, std::io::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .write_record(cells.into_iter().map(|c| cell(&c)))
        .map_err(std::io::Error::other)?;
    writer
        .into_inner()
        .map(Bytes::from)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn csv_response(file: &str, body: Body) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

fn instant(at: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    at.with_timezone(&tz)
        .to_rfc3339_opts(SecondsFormat::Millis, false)
}

const REQUEST_COLUMNS: [&str; 17] = [
    "request_id",
    "created_at",
    "key_id",
    "route",
    "method",
    "path",
    "model",
    "status",
    "upstream_status",
    "billing_status",
    "error_code",
    "input_tokens",
    "output_tokens",
    "held",
    "charged",
    "client_request_id",
    "replay_of",
];

/// Where a streamed export stands between store pages.
struct Progress<F> {
    state: AppState,
    filter: F,
    header_sent: bool,
    done: bool,
    totals: Totals,
}

#[derive(Default)]
struct Totals {
    rows: u64,
    input_tokens: u64,
    output_tokens: u64,
    held: i64,
    charged: i64,
    money_in: i64,
    money_out: i64,
    money_within: i64,
}

/// `GET /console/requests.csv`: every request the requests page's filters select, newest first.
pub async fn requests(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let session = match holder(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    let filter = match Filters::read(&state, &session, raw.as_deref(), CHUNK_ROWS).filter {
        Ok(filter) => filter,
        Err(problem) => return HttpError::new(ErrorCode::ValidationError, problem).into_response(),
    };
    if let Err(e) = state.ledger.flush().await {
        return HttpError::from(e).into_response();
    }
    let start = Progress {
        state,
        filter,
        header_sent: false,
        done: false,
        totals: Totals::default(),
    };
    let body = stream::unfold(start, |mut p: Progress<UsageFilter>| async move {
        if !p.header_sent {
            p.header_sent = true;
            return Some((line(REQUEST_COLUMNS.map(String::from)), p));
        }
        if p.done {
            return None;
        }
        let rows = match p.state.store.requests(&p.filter).await {
            Ok(rows) => rows,
            // The body ends in an error, so the download fails rather than looks complete.
            Err(e) => {
                p.done = true;
                return Some((Err(std::io::Error::other(e.to_string())), p));
            }
        };
        let tz = p.state.config.console.time_zone;
        let currency = p.state.config.currency.clone();
        let mut chunk = Vec::new();
        for row in &rows {
            let t = &mut p.totals;
            t.rows += 1;
            let tokens = row.tokens.unwrap_or_default();
            t.input_tokens += tokens.input;
            t.output_tokens += tokens.output;
            t.held += row.hold.0;
            t.charged += row.cost.0;
            let optional = |v: Option<String>| v.unwrap_or_default();
            match line([
                row.request_id.to_string(),
                instant(row.created_at, tz),
                row.key_id.to_string(),
                row.route.clone(),
                row.method.clone(),
                row.path.clone(),
                optional(row.model.clone()),
                row.status.to_string(),
                optional(row.upstream_status.map(|s| s.to_string())),
                row.billing_status.as_str().to_string(),
                optional(row.error_code.clone()),
                optional(row.tokens.map(|t| t.input.to_string())),
                optional(row.tokens.map(|t| t.output.to_string())),
                row.hold.to_string(),
                row.cost.to_string(),
                optional(row.client_request_id.clone()),
                optional(row.replay_of.map(|r| r.to_string())),
            ]) {
                Ok(bytes) => chunk.extend_from_slice(&bytes),
                Err(e) => return Some((Err(e), p)),
            }
        }
        match rows.last() {
            // A full read may have more behind it; the next starts after its last row.
            Some(last) if rows.len() == p.filter.limit as usize => {
                p.filter.before = Some(last.request_id);
            }
            _ => {
                p.done = true;
                let t = &p.totals;
                let mut totals = vec![String::new(); REQUEST_COLUMNS.len()];
                totals[0] = format!("total of {} requests ({currency})", t.rows);
                totals[11] = t.input_tokens.to_string();
                totals[12] = t.output_tokens.to_string();
                totals[13] = Nanos(t.held).to_string();
                totals[14] = Nanos(t.charged).to_string();
                match line(totals) {
                    Ok(bytes) => chunk.extend_from_slice(&bytes),
                    Err(e) => return Some((Err(e), p)),
                }
            }
        }
        Some((Ok(Bytes::from(chunk)), p))
    });
    csv_response("requests.csv", Body::from_stream(body))
}

/// A wallet export's position: the account, and the ledger cursor (`None` before the first page).
struct LedgerCursor {
    account: AccountId,
    before: Option<i64>,
}

/// `GET /console/wallet.csv`: every movement of the account's money, newest first.
pub async fn wallet(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let account = match holder_account(&state, &headers).await {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    let start = Progress {
        state,
        filter: LedgerCursor {
            account,
            before: None,
        },
        header_sent: false,
        done: false,
        totals: Totals::default(),
    };
    let columns = [
        "seq",
        "created_at",
        "kind",
        "in",
        "out",
        "unchanged",
        "from",
        "to",
        "reference",
        "memo",
    ];
    let body = stream::unfold(start, move |mut p: Progress<LedgerCursor>| async move {
        if !p.header_sent {
            p.header_sent = true;
            return Some((line(columns.map(String::from)), p));
        }
        if p.done {
            return None;
        }
        let wallet = format!("wallet:{}", p.filter.account);
        let entries =
            match ledger_page(&p.state, p.filter.account, p.filter.before, CHUNK_ROWS).await {
                Ok(entries) => entries,
                Err(e) => {
                    p.done = true;
                    return Some((Err(std::io::Error::other(e.error.message)), p));
                }
            };
        let tz = p.state.config.console.time_zone;
        let mut chunk = Vec::new();
        for entry in &entries.data {
            // Each amount in the column of what it did to the spendable balance.
            let mut amounts = [String::new(), String::new(), String::new()];
            let (column, total) = if entry.to == wallet {
                (0, &mut p.totals.money_in)
            } else if entry.from == wallet {
                (1, &mut p.totals.money_out)
            } else {
                (2, &mut p.totals.money_within)
            };
            *total += entry.amount.nanos;
            amounts[column] = entry.amount.credits.clone();
            p.totals.rows += 1;
            let [money_in, money_out, within] = amounts;
            match line([
                entry.seq.to_string(),
                instant(entry.created_at, tz),
                entry.kind.clone(),
                money_in,
                money_out,
                within,
                entry.from.clone(),
                entry.to.clone(),
                entry.reference.clone(),
                entry.memo.clone(),
            ]) {
                Ok(bytes) => chunk.extend_from_slice(&bytes),
                Err(e) => return Some((Err(e), p)),
            }
        }
        match entries.next_cursor.and_then(|c| c.parse::<i64>().ok()) {
            Some(before) => p.filter.before = Some(before),
            None => {
                p.done = true;
                let t = &p.totals;
                let summary = [
                    format!("total of {} movements", t.rows),
                    String::new(),
                    String::new(),
                    Nanos(t.money_in).to_string(),
                    Nanos(t.money_out).to_string(),
                    Nanos(t.money_within).to_string(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ];
                match line(summary) {
                    Ok(bytes) => chunk.extend_from_slice(&bytes),
                    Err(e) => return Some((Err(e), p)),
                }
            }
        }
        Some((Ok(Bytes::from(chunk)), p))
    });
    csv_response("wallet.csv", Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_that_would_be_a_formula_is_escaped_and_others_are_kept() {
        for (text, written) in [
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("+1", "'+1"),
            ("-2", "'-2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("plain", "plain"),
            ("0.25", "0.25"),
            ("", ""),
        ] {
            assert_eq!(cell(text), written, "{text:?}");
        }
    }
}
