//! The console's sign-in, sign-out and overview. Each reads and changes through the same
//! services as the management API, so what a page shows is what `/api/v1` answers.

use crate::access::keys::{admit_key, find_key};
use crate::access::limits::Demand;
use crate::console::keys::{self, KeyRow};
use crate::console::render::page;
use crate::console::report::{day_start, zone_caption, Step};
use crate::console::session::{self, Session, Who};
use crate::console::usage::{chart_data, usage_buckets};
use crate::http::error::HttpError;
use crate::management::billing::read_balance;
use crate::state::AppState;
use askama::Template;
use axum::extract::{Form, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::TimeDelta;
use serde::Deserialize;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tollgate_core::key::secret_matches;
use tollgate_core::ratelimit::{FailureMode, Policy, Scope, Unit};
use tollgate_core::{AccountId, KeyKind};
use tollgate_store::SeriesSplit;
use tollgate_wire::api::Money;

/// Failed sign-ins from one address: 10 a minute, then one every 6 s.
static FAILED_SIGN_INS: LazyLock<Arc<Policy>> = LazyLock::new(|| {
    Arc::new(Policy {
        name: "console-sign-in".into(),
        scope: Scope::Ip,
        unit: Unit::Requests,
        limit: 10,
        window: Duration::from_secs(60),
        burst: 9,
        on_limiter_failure: FailureMode::Open,
    })
});

#[derive(Template)]
#[template(path = "console/sign_in.html")]
struct SignInPage<'a> {
    problem: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage<'a> {
    who: &'a str,
    balance: Option<(Money, Money, Money)>,
    /// What the account owes, when it owes anything.
    debt: Option<Money>,
    /// The last 30 days' spend, for the chart.
    chart: String,
    /// The account's keys that have spent 80 % of their monthly cap or more.
    near_cap: Vec<KeyRow>,
}

/// What the overview shows an account holder besides the balance: the last 30 local days'
/// spend as chart data, and the keys near their caps.
async fn holder_overview(
    state: &AppState,
    account: AccountId,
) -> Result<(String, Vec<KeyRow>), HttpError> {
    let tz = state.config.console.time_zone;
    let today = state.clock.now().with_timezone(&tz).date_naive();
    let range = (
        day_start(tz, today - TimeDelta::days(29)),
        day_start(tz, today + TimeDelta::days(1)),
    );
    let (buckets, names) =
        usage_buckets(state, account, Step::Day, SeriesSplit::Total, range).await?;
    let chart = chart_data(&buckets, &names, &zone_caption(tz, range.0));
    let near_cap = keys::near_cap_rows(state, account).await?;
    Ok((chart, near_cap))
}

pub async fn to_console() -> Redirect {
    Redirect::permanent("/console/")
}

/// The overview for a signed-in caller, the sign-in page for anyone else.
pub async fn overview(State(state): State<AppState>, request: Request) -> Response {
    let session = match session::current(&state, request.headers()).await {
        Ok(session) => session,
        Err(e) => return HttpError::from(e).into_response(),
    };
    let Some(Session { who, .. }) = session else {
        return page(StatusCode::OK, &SignInPage { problem: None });
    };
    let mut debt = None;
    let (name, balance, chart, near_cap) = match &who {
        Who::Operator => ("the operator".to_string(), None, String::new(), Vec::new()),
        Who::Holder { key } => {
            let account = match state.store.account(key.account_id).await {
                Ok(Some(account)) => account,
                Ok(None) => return HttpError::not_found("account").into_response(),
                Err(e) => return HttpError::from(e).into_response(),
            };
            let balance = match read_balance(&state, key.account_id).await {
                Ok(b) => {
                    debt = Some(b.debt).filter(|d| d.nanos > 0);
                    (b.available, b.held, b.spent_this_month)
                }
                Err(e) => return e.into_response(),
            };
            let (chart, near_cap) = match holder_overview(&state, account.id).await {
                Ok(found) => found,
                Err(e) => return e.into_response(),
            };
            (
                format!(
                    "{} ({}), with the master key {}…",
                    account.name, account.id, key.display_prefix
                ),
                Some(balance),
                chart,
                near_cap,
            )
        }
    };
    page(
        StatusCode::OK,
        &OverviewPage {
            who: &name,
            balance,
            debt,
            chart,
            near_cap,
        },
    )
}

#[derive(Deserialize)]
pub struct SignIn {
    credential: String,
}

/// Signs in with a master key or the admin token, and starts a session. The credential is
/// never echoed, logged or kept; a wrong one counts against the address.
pub async fn sign_in(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let address = state
        .client_ip(&parts.headers, &parts.extensions)
        .map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
    let failed = [Demand::new(
        FAILED_SIGN_INS.clone(),
        &format!("console-sign-in:ip:{address}"),
        1,
    )];
    if let Ok(standings) = state.limiter.peek(&failed).await {
        if standings.iter().any(|s| !s.admitted) {
            let problem = "Too many failed sign-ins from this address. Wait a minute and retry.";
            return page(
                StatusCode::TOO_MANY_REQUESTS,
                &SignInPage {
                    problem: Some(problem),
                },
            );
        }
    }
    let Ok(Form(SignIn { credential })) =
        Form::<SignIn>::from_request(Request::from_parts(parts.clone(), body), &state).await
    else {
        return page(
            StatusCode::BAD_REQUEST,
            &SignInPage {
                problem: Some("Paste a master key or the admin token."),
            },
        );
    };
    let credential = credential.trim();
    let now = state.clock.now();
    let signed_in = match &state.config.admin_token {
        Some(admin) if !credential.starts_with("tg_") => {
            secret_matches(credential, &admin.0).then_some(None)
        }
        _ => match find_key(&state.keys, &*state.store, Some(credential)).await {
            Ok(found) => {
                let client = state.client_ip(&parts.headers, &parts.extensions);
                let usable =
                    admit_key(&found, now, client).is_ok() && found.record.kind == KeyKind::Master;
                usable.then_some(Some(found.record))
            }
            Err(_) => None,
        },
    };
    let Some(key) = signed_in else {
        if state.limiter.acquire(&failed).await.is_err() {
            tracing::warn!("console sign-in limiter unavailable");
        }
        return page(
            StatusCode::UNAUTHORIZED,
            &SignInPage {
                problem: Some(
                    "That is not a usable master key or the admin token. Usage keys cannot \
                     sign in; a revoked, expired or suspended account's key cannot either.",
                ),
            },
        );
    };
    let (secret, record) = session::new_session(key.as_deref(), now);
    if let Err(e) = state.store.create_session(&record).await {
        return HttpError::from(e).into_response();
    }
    let mut response = Redirect::to("/console/").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::cookie(&state, &parts.headers, &parts.extensions, Some(&secret)),
    );
    response
}

/// Ends the session on the server and clears the cookie.
pub async fn sign_out(State(state): State<AppState>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    match session::current(&state, &parts.headers).await {
        Ok(Some(session)) => {
            if let Err(e) = state.store.end_session(&session.id_hash).await {
                return HttpError::from(e).into_response();
            }
        }
        Ok(None) => {}
        Err(e) => return HttpError::from(e).into_response(),
    }
    let mut response = Redirect::to("/console/").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::cookie(&state, &parts.headers, &parts.extensions, None),
    );
    response.headers_mut().insert(
        "clear-site-data",
        HeaderValue::from_static("\"cookies\", \"storage\""),
    );
    response
}
