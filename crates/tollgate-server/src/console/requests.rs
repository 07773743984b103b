//! The requests page: the account's usage log, newest first, filtered in the URL (the same
//! filters as `GET /requests`, read by the same function, with times in the reporting zone) and
//! paged by a stable cursor, and a box that finds one request by its exact ID (refusals
//! included) in one lookup, across every date the log keeps.

use crate::console::render::page;
use crate::console::report::{local_input, shown};
use crate::console::session::{holder, Session};
use crate::http::error::HttpError;
use crate::management::billing::{requests_filter, usage_view, RequestsQuery};
use crate::management::extract::page as paged;
use crate::state::AppState;
use askama::Template;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use tollgate_core::{Nanos, RequestId};
use tollgate_store::UsageFilter;
use tollgate_wire::api::{Money, UsageRecord};

/// Rows a page shows.
const PAGE_ROWS: u32 = 50;

/// The filters a page was asked for, as the form sent them (empty fields dropped), and what
/// they mean to the store.
pub struct Filters {
    /// The form's fields, without `id` and `cursor`, to refill the form and build links.
    pub fields: Vec<(String, String)>,
    /// An exact request ID to find.
    pub id: Option<String>,
    pub filter: Result<UsageFilter, String>,
}

impl Filters {
    /// Reads a page's query as `session` may ask it, `rows` to a page.
    pub fn read(state: &AppState, session: &Session, raw: Option<&str>, rows: u32) -> Filters {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(raw.unwrap_or_default()).unwrap_or_default();
        let mut fields = Vec::new();
        let (mut id, mut cursor) = (None, None);
        for (name, value) in pairs {
            let value = value.trim().to_string();
            match name.as_str() {
                _ if value.is_empty() => {}
                "id" => id = Some(value),
                "cursor" => cursor = Some(value),
                _ => fields.push((name, value)),
            }
        }
        let filter = Self::filter(state, session, &fields, cursor, rows);
        Filters { fields, id, filter }
    }

    fn filter(
        state: &AppState,
        session: &Session,
        fields: &[(String, String)],
        cursor: Option<String>,
        rows: u32,
    ) -> Result<UsageFilter, String> {
        let tz = state.config.console.time_zone;
        // The form's times are local to the reporting zone; the API's are RFC 3339.
        let mut query = Vec::with_capacity(fields.len() + 2);
        for (name, value) in fields {
            let value = match name.as_str() {
                "from" | "to" => local_input(tz, value)
                    .map_err(|e| format!("{name}: {e}"))?
                    .to_rfc3339_opts(SecondsFormat::Secs, true),
                _ => value.clone(),
            };
            query.push((name.clone(), value));
        }
        query.extend(cursor.map(|c| ("cursor".to_string(), c)));
        query.push(("limit".into(), rows.to_string()));
        let encoded = serde_urlencoded::to_string(&query).unwrap_or_default();
        let query: RequestsQuery = serde_urlencoded::from_str(&encoded)
            .map_err(|e| format!("The filters could not be read: {e}."))?;
        let filter = requests_filter(&session.caller(), query).map_err(|e| e.error.message)?;
        // The API answers an inverted range with nothing; a person asking for one made a slip.
        if filter
            .from
            .zip(filter.to)
            .is_some_and(|(from, to)| from > to)
        {
            return Err("The range ends before it starts.".into());
        }
        Ok(filter)
    }

    /// The form's value of `name`, for the form to show again.
    pub fn value(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map_or("", |(_, value)| value.as_str())
    }

    /// A query string of the filters, with `extra` pairs.
    pub fn query(&self, extra: &[(&str, &str)]) -> String {
        let mut pairs: Vec<(&str, &str)> = self
            .fields
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        pairs.extend_from_slice(extra);
        serde_urlencoded::to_string(&pairs).unwrap_or_default()
    }
}

#[derive(Template)]
#[template(path = "console/requests.html")]
struct RequestsPage<'a> {
    rows: &'a [UsageRecord],
    filters: &'a Filters,
    next: Option<String>,
    export: String,
    retention: &'a str,
    zone: &'a str,
    state: &'a AppState,
    problem: Option<&'a str>,
}

impl RequestsPage<'_> {
    fn when(&self, at: &DateTime<Utc>) -> String {
        shown(self.state.config.console.time_zone, *at)
    }
}

#[derive(Template)]
#[template(path = "console/request.html")]
struct RequestPage<'a> {
    row: &'a UsageRecord,
    /// What of the hold went back to the wallet.
    released: Money,
    when: String,
    zone: &'a str,
}

/// How long the log keeps requests, in whole days where it is (as it is configured, "90days").
fn retention(state: &AppState) -> String {
    const DAY: u64 = 86_400;
    match state.config.usage_retention.as_secs() {
        secs if secs % DAY == 0 && secs >= DAY => format!("{} days", secs / DAY),
        _ => humantime::format_duration(state.config.usage_retention).to_string(),
    }
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
    let tz = state.config.console.time_zone;
    match found {
        Some(row) => page(
            StatusCode::OK,
            &RequestPage {
                released: Money::new(
                    Nanos((row.hold.0 - row.cost.0).max(0)),
                    &state.config.currency,
                ),
                when: row
                    .created_at
                    .with_timezone(&tz)
                    .format("%Y-%m-%d %H:%M:%S%.3f")
                    .to_string(),
                row: &usage_view(state, row),
                zone: tz.name(),
            },
        ),
        None => {
            let problem = format!(
                "No request of this account has the ID '{}' in the last {} (how long the log \
                 keeps requests).",
                id.trim(),
                retention(state)
            );
            let filters = Filters::read(state, session, None, PAGE_ROWS);
            render(
                state,
                StatusCode::NOT_FOUND,
                &[],
                &filters,
                None,
                Some(&problem),
            )
        }
    }
}

fn render(
    state: &AppState,
    status: StatusCode,
    rows: &[UsageRecord],
    filters: &Filters,
    next: Option<String>,
    problem: Option<&str>,
) -> Response {
    page(
        status,
        &RequestsPage {
            rows,
            filters,
            next,
            export: format!("/console/requests.csv?{}", filters.query(&[])),
            retention: &retention(state),
            zone: state.config.console.time_zone.name(),
            state,
            problem,
        },
    )
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
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let session = match holder(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    let filters = Filters::read(&state, &session, raw.as_deref(), PAGE_ROWS);
    if let Some(id) = &filters.id {
        return detail(&state, &session, id).await;
    }
    let filter = match &filters.filter {
        Ok(filter) => filter,
        Err(problem) => {
            return render(
                &state,
                StatusCode::BAD_REQUEST,
                &[],
                &filters,
                None,
                Some(problem),
            )
        }
    };
    if let Err(e) = state.ledger.flush().await {
        return HttpError::from(e).into_response();
    }
    let rows = match state.store.requests(filter).await {
        Ok(rows) => rows,
        Err(e) => return HttpError::from(e).into_response(),
    };
    let (rows, cursor) = paged(rows, PAGE_ROWS, |r| r.request_id.to_string());
    // The next page starts after this page's last row, with the same filters.
    let next = cursor.map(|c| format!("/console/requests?{}", filters.query(&[("cursor", &c)])));
    let rows: Vec<UsageRecord> = rows.into_iter().map(|r| usage_view(&state, r)).collect();
    render(&state, StatusCode::OK, &rows, &filters, next, None)
}
