//! The operator's usage-export page: each sink's standing (records waiting, how late, parked),
//! its parked records (waiting for a customer id, or dead letters with the sink's answer), and a
//! button that sends one again. The same service functions as `/api/v1/export/...`.

use crate::console::render::page;
use crate::console::report::shown;
use crate::console::session::operator;
use crate::management::export::{parked_view, retry, sink_views};
use crate::state::AppState;
use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tollgate_core::RequestId;
use tollgate_wire::api::{ExportSink, ParkedUsage};

/// Parked records shown per sink.
const PARKED_SHOWN: u32 = 50;

struct SinkSection {
    sink: ExportSink,
    parked: Vec<ParkedUsage>,
}

#[derive(Template)]
#[template(path = "console/sinks.html")]
struct SinksPage<'a> {
    sections: &'a [SinkSection],
    notice: Option<&'a str>,
    zone: &'a str,
    state: &'a AppState,
}

impl SinksPage<'_> {
    fn when(&self, at: &DateTime<Utc>) -> String {
        shown(self.state.config.console.time_zone, *at)
    }
}

#[derive(Deserialize, Default)]
pub struct SinksQuery {
    /// Set by the redirect after a retry: `delivered` or `parked`.
    #[serde(default)]
    retried: String,
}

/// `GET /console/sinks`.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<SinksQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = operator(&state, &headers).await {
        return answer;
    }
    let sinks = match sink_views(&state).await {
        Ok(sinks) => sinks,
        Err(e) => return e.into_response(),
    };
    let mut sections = Vec::new();
    for sink in sinks {
        let parked = match state
            .store
            .parked_exports(&sink.name, None, 0, PARKED_SHOWN)
            .await
        {
            Ok(parked) => parked,
            Err(e) => return crate::http::error::HttpError::from(e).into_response(),
        };
        sections.push(SinkSection {
            parked: parked.into_iter().map(|p| parked_view(&state, p)).collect(),
            sink,
        });
    }
    let notice = match query.map(|Query(q)| q).unwrap_or_default().retried.as_str() {
        "delivered" => Some("The sink took the record."),
        "parked" => {
            Some("The sink did not take the record; it stays parked with the sink's answer.")
        }
        _ => None,
    };
    page(
        StatusCode::OK,
        &SinksPage {
            sections: &sections,
            notice,
            zone: state.config.console.time_zone.name(),
            state: &state,
        },
    )
}

/// `POST /console/sinks/{name}/{seq}/retry`: sends one parked record again.
pub async fn retry_one(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path((name, seq)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let session = match operator(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    let Some(seq) = seq.parse::<i64>().ok().filter(|n| *n > 0) else {
        return crate::http::error::HttpError::not_found("parked record").into_response();
    };
    match retry(&state, &session.caller(), request_id, &name, seq).await {
        Ok(true) => Redirect::to("/console/sinks?retried=delivered").into_response(),
        Ok(false) => Redirect::to("/console/sinks?retried=parked").into_response(),
        Err(e) => e.into_response(),
    }
}
