//! The wallet page: the balance (and any debt), the plan's included units and the credit packs
//! on sale, adding credits by card where payments are configured, the latest top-ups, and every
//! movement of the account's money, newest first, paged by a stable cursor with no date cap,
//! each typed and signed as the wallet sees it. The movements are `GET /ledger`'s answer; adding
//! credits is `POST /topups`, buying a pack `POST /billing/packs/{name}/buy`.

use crate::console::render::page;
use crate::console::security::CONTENT_SECURITY_POLICY;
use crate::console::session::{holder, holder_account};
use crate::http::error::HttpError;
use crate::management::billing::{ledger_page, read_balance};
use crate::management::payments::{auto_view, save_auto_topup, start_topup, view};
use crate::management::plans::{allowances_of, buy, pack_view};
use crate::state::AppState;
use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::{AccountId, Nanos, RequestId, TopUpId};
use tollgate_wire::api::{Allowances, PackOffer};
use tollgate_wire::api::{AutoTopUp, AutoTopUpRequest, Balance, LedgerEntry, TopUp};

/// Entries a page shows.
const PAGE_ROWS: u32 = 50;

/// One movement as the wallet sees it.
pub struct Movement {
    pub entry: LedgerEntry,
    /// What it did to the spendable balance: `in`, `out`, or `none` (a charge settled from
    /// money already held).
    pub direction: &'static str,
}

/// Top-ups the page lists.
const RECENT_TOPUPS: u32 = 5;

#[derive(Template)]
#[template(path = "console/wallet.html")]
struct WalletPage<'a> {
    balance: &'a Balance,
    /// Card top-ups are configured: the form, with its bounds.
    payments: Option<(String, String)>,
    topups: &'a [TopUp],
    /// The top-up the customer just came back from.
    returned: Option<&'a TopUp>,
    /// Why automatic top-up was turned off by Tollgate, if it was.
    auto_off: Option<String>,
    /// The automatic top-up rule as the API shows it (where payments are configured).
    auto: Option<AutoTopUp>,
    problem: Option<&'a str>,
    movements: &'a [Movement],
    /// The plan and its included units.
    allowances: &'a Allowances,
    /// The packs on offer, each with a fresh order id for its form (a form sent twice buys
    /// once).
    packs: Vec<(PackOffer, String)>,
    next: Option<String>,
}

/// `?cursor=` pages the movements; `?topup=` names the top-up a checkout returned from.
#[derive(Deserialize, Default)]
pub struct WalletQuery {
    #[serde(default)]
    cursor: String,
    #[serde(default)]
    topup: String,
    /// Set on the reload that brings the session cookie back (so it happens once).
    #[serde(default)]
    back: bool,
}

/// A page that at once loads the wallet again for the same top-up, now as a same-site
/// navigation, which carries the session cookie.
fn reload_from_this_site(topup: &str) -> Response {
    let topup: String = topup
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let target = format!("/console/wallet?topup={topup}&back=true");
    axum::response::Html(format!(
        "<!doctype html><html><head><meta http-equiv=\"refresh\" content=\"0; url={target}\">\
         <title>Back to your wallet</title></head><body><p><a href=\"{target}\">Back to your \
         wallet</a></p></body></html>"
    ))
    .into_response()
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<WalletQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let returned = query.topup.trim().parse::<TopUpId>().ok();
    let account = match holder_account(&state, &headers).await {
        Ok(account) => account,
        // Back from the payment page: a navigation from another site carries no
        // `SameSite=Strict` cookie, so the page reloads itself once, from this site, with it.
        Err(_) if returned.is_some() && !query.back => return reload_from_this_site(&query.topup),
        Err(answer) => return answer,
    };
    wallet_page(
        &state,
        account,
        &query.cursor,
        returned,
        StatusCode::OK,
        None,
    )
    .await
}

#[derive(Deserialize)]
pub struct TopUpForm {
    amount: String,
}

/// "Add credits": starts a top-up and sends the customer to the payment page.
pub async fn top_up(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<TopUpForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let account = match holder_account(&state, &headers).await {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    let Some(payments) = state.payments.clone() else {
        let problem = "Card payments are not configured here; ask the operator for credit.";
        return wallet_page(
            &state,
            account,
            "",
            None,
            StatusCode::NOT_FOUND,
            Some(problem),
        )
        .await;
    };
    let amount = form
        .ok()
        .and_then(|Form(f)| Nanos::parse_amount(f.amount.trim()).ok());
    let Some(amount) = amount else {
        let problem = "Enter an amount of credits, such as 25 or 12.50.";
        return wallet_page(
            &state,
            account,
            "",
            None,
            StatusCode::BAD_REQUEST,
            Some(problem),
        )
        .await;
    };
    match start_topup(&payments, account, amount, None).await {
        Ok(topup) => match topup.checkout_url {
            Some(url) => Redirect::to(&url).into_response(),
            None => wallet_page(&state, account, "", Some(topup.id), StatusCode::OK, None).await,
        },
        Err(e) => {
            let problem = e.error.message.clone();
            let status =
                StatusCode::from_u16(e.error.code.info().status).unwrap_or(StatusCode::BAD_REQUEST);
            wallet_page(&state, account, "", None, status, Some(&problem)).await
        }
    }
}

#[derive(Deserialize)]
pub struct PackForm {
    pack: String,
    /// The order id the page gave this form.
    order: String,
    /// `wallet` or `card`.
    pay: String,
}

/// Buys a pack: from the wallet at once (then back to the page, which lists it), or by card
/// through a top-up of the pack (to the payment page).
pub async fn buy_pack(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    form: Result<Form<PackForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let session = match holder(&state, &headers).await {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    let Some(account) = session.who.account() else {
        return HttpError::not_found("account").into_response();
    };
    let refused = |status: StatusCode, problem: String| {
        let state = state.clone();
        async move { wallet_page(&state, account, "", None, status, Some(&problem)).await }
    };
    let Ok(Form(form)) = form else {
        return refused(StatusCode::BAD_REQUEST, "Choose a pack to buy.".into()).await;
    };
    let Some(offer) = state.config.plans.pack(&form.pack) else {
        return refused(StatusCode::NOT_FOUND, "That pack is not on offer.".into()).await;
    };
    let bought = match (form.pay.as_str(), state.payments.clone()) {
        ("wallet", _) => buy(
            &state,
            &session.caller(),
            request_id,
            account,
            offer,
            &form.order,
        )
        .await
        .map(|_| Redirect::to("/console/wallet").into_response()),
        ("card", Some(payments)) => start_topup(&payments, account, offer.price, Some(&offer.name))
            .await
            .map(|topup| match topup.checkout_url {
                Some(url) => Redirect::to(&url).into_response(),
                None => Redirect::to("/console/wallet").into_response(),
            }),
        _ => {
            return refused(
                StatusCode::BAD_REQUEST,
                "Pay from the wallet or by card.".into(),
            )
            .await
        }
    };
    match bought {
        Ok(answer) => answer,
        Err(e) => {
            let status =
                StatusCode::from_u16(e.error.code.info().status).unwrap_or(StatusCode::BAD_REQUEST);
            refused(status, e.error.message).await
        }
    }
}

#[derive(Deserialize)]
pub struct AutoTopUpForm {
    threshold: String,
    amount: String,
    max_per_month: String,
}

/// Turns automatic top-up on with the form's rule.
pub async fn auto_top_up_on(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<AutoTopUpForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let account = match holder_account(&state, &headers).await {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    let Some(payments) = state.payments.clone() else {
        let problem = "Card payments are not configured here.";
        return wallet_page(
            &state,
            account,
            "",
            None,
            StatusCode::NOT_FOUND,
            Some(problem),
        )
        .await;
    };
    let Ok(Form(form)) = form else {
        let problem = "Fill in the threshold, the amount and how many a month.";
        return wallet_page(
            &state,
            account,
            "",
            None,
            StatusCode::BAD_REQUEST,
            Some(problem),
        )
        .await;
    };
    let request = AutoTopUpRequest {
        threshold: form.threshold.trim().to_string(),
        amount: form.amount.trim().to_string(),
        max_per_month: form.max_per_month.trim().parse().unwrap_or(0),
        account_id: None,
    };
    match save_auto_topup(&state, &payments, account, &request).await {
        Ok(_) => Redirect::to("/console/wallet").into_response(),
        Err(e) => {
            let problem = e.error.message.clone();
            wallet_page(
                &state,
                account,
                "",
                None,
                StatusCode::BAD_REQUEST,
                Some(&problem),
            )
            .await
        }
    }
}

/// Turns automatic top-up off.
pub async fn auto_top_up_off(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let account = match holder_account(&state, &headers).await {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    match state
        .store
        .disable_auto_topup(account, None, state.clock.now())
        .await
    {
        Ok(()) => Redirect::to("/console/wallet").into_response(),
        Err(e) => crate::http::error::HttpError::from(e).into_response(),
    }
}

async fn wallet_page(
    state: &AppState,
    account: AccountId,
    cursor: &str,
    returned: Option<TopUpId>,
    status: StatusCode,
    problem: Option<&str>,
) -> Response {
    let balance = match read_balance(state, account).await {
        Ok(balance) => balance,
        Err(e) => return e.into_response(),
    };
    let mut topups = Vec::new();
    let mut came_back = None;
    if let Some(payments) = &state.payments {
        let listed = match state.store.topups(account, None, RECENT_TOPUPS).await {
            Ok(listed) => listed,
            Err(e) => return crate::http::error::HttpError::from(e).into_response(),
        };
        for topup in &listed {
            match view(state, payments, topup).await {
                Ok(shown) => topups.push(shown),
                Err(e) => return e.into_response(),
            }
        }
        if let Some(id) = returned {
            let found = match state.store.topup(id).await {
                Ok(found) => found.filter(|t| t.account_id == account),
                Err(e) => return crate::http::error::HttpError::from(e).into_response(),
            };
            if let Some(topup) = found {
                match view(state, payments, &topup).await {
                    Ok(shown) => came_back = Some(shown),
                    Err(e) => return e.into_response(),
                }
            }
        }
    }
    let rule = match state.store.auto_topup(account).await {
        Ok(rule) => rule,
        Err(e) => return crate::http::error::HttpError::from(e).into_response(),
    };
    let auto_off = rule.as_ref().and_then(|r| r.disabled_reason.clone());
    let auto = state
        .payments
        .as_ref()
        .map(|_| auto_view(state, account, rule));
    let before = cursor.trim().parse::<i64>().ok();
    let ledger = match ledger_page(state, account, before, PAGE_ROWS).await {
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
    let payments = state.payments.as_ref().map(|p| {
        let s = p.settings();
        (s.min_topup.to_string(), s.max_topup.to_string())
    });
    let allowances = match allowances_of(state, account).await {
        Ok(allowances) => allowances,
        Err(e) => return e.into_response(),
    };
    let mut answer = page(
        status,
        &WalletPage {
            balance: &balance,
            payments,
            topups: &topups,
            returned: came_back.as_ref(),
            auto_off,
            auto,
            problem,
            movements: &movements,
            allowances: &allowances,
            packs: state
                .config
                .plans
                .packs()
                .map(|offer| (pack_view(state, offer), ulid::Ulid::new().to_string()))
                .collect(),
            next: ledger
                .next_cursor
                .map(|c| format!("/console/wallet?cursor={c}")),
        },
    );
    // "Add credits" is answered by a redirect to the payment page, which a browser lets a form
    // follow only to an origin its form-action names.
    if let Some(payments) = &state.payments {
        let policy = CONTENT_SECURITY_POLICY.replace(
            "form-action 'self'",
            &format!(
                "form-action 'self' {}",
                payments.checkout_origins().join(" ")
            ),
        );
        if let Ok(value) = HeaderValue::from_str(&policy) {
            answer
                .headers_mut()
                .insert("content-security-policy", value);
        }
    }
    answer
}
