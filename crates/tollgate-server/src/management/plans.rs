//! Plans: an account's subscription, credit packs, an allowance's manual reset (admin only),
//! and the buckets of included units every account can read.

use crate::billing;
use crate::billing::allowances::PlanOf;
use crate::http::error::{validation, FieldErrors, HttpError};
use crate::management::audit::{self, Change};
use crate::management::billing::{money, subject_account};
use crate::management::extract::{parse_id, parse_query, Caller, JsonBody};
use crate::management::openapi;
use crate::state::AppState;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tollgate_core::allowance;
use tollgate_core::plan::{length_name, Meter, PackOffer, Subscription, SubscriptionStatus};
use tollgate_core::{AccountId, RequestId};
use tollgate_store::{BucketSource, UnitBucket};
use tollgate_wire::api as wire;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(set_subscription))
        .routes(routes!(create_pack))
        .routes(routes!(reset_allowance))
        .routes(routes!(allowances))
        .routes(routes!(pack_offers))
        .routes(routes!(buy_pack))
}

fn subscription_view(subscription: &Subscription) -> wire::Subscription {
    wire::Subscription {
        plan: subscription.plan.clone(),
        status: subscription.status.as_str().to_string(),
        since: subscription.since,
        started_at: subscription.started_at,
    }
}

async fn existing_account(state: &AppState, id: AccountId) -> Result<(), HttpError> {
    match state.store.account(id).await? {
        Some(_) => Ok(()),
        None => Err(HttpError::not_found("account")),
    }
}

/// Puts an account on a plan, or moves its subscription's status (admin only). An upgrade's
/// allowances apply at once, keeping the period's usage; a smaller allowance applies from the
/// next period.
#[utoipa::path(
    put,
    path = "/accounts/{id}/subscription",
    tag = "plans",
    params(("id" = AccountId, Path, description = "The account's id.")),
    request_body = wire::SetSubscriptionRequest,
    responses(
        (status = 200, description = "The subscription as now stored.", body = wire::Subscription),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn set_subscription(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<Json<wire::Subscription>, HttpError> {
    caller.require_admin()?;
    let account = parse_id(id, AccountId::parse, "account")?;
    let body: wire::SetSubscriptionRequest = body.parse()?;
    Ok(Json(
        subscribe(&state, &caller, request_id, account, body).await?,
    ))
}

/// Sets an account's subscription as `PUT /accounts/{id}/subscription` does, for the API and the
/// console alike: validated, audited, its keys' cache entries dropped.
pub(crate) async fn subscribe(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    account: AccountId,
    body: wire::SetSubscriptionRequest,
) -> Result<wire::Subscription, HttpError> {
    caller.require_admin()?;
    let mut fields = FieldErrors::default();
    if state.config.plans.get(&body.plan).is_none() {
        let known: Vec<&str> = state.config.plans.names().collect();
        fields.add(
            "plan",
            format!("is not a configured plan (plans: {})", known.join(", ")),
        );
    }
    let status = match body.status.as_deref() {
        None => SubscriptionStatus::Active,
        Some(text) => SubscriptionStatus::parse(text).unwrap_or_else(|| {
            fields.add(
                "status",
                "must be active, trialing, past_due, unpaid or canceled",
            );
            SubscriptionStatus::Active
        }),
    };
    let now = state.clock.now();
    // Periods are counted from it: a start in the future, or before any real subscription,
    // is a mistake.
    let earliest = DateTime::<Utc>::from_timestamp(946_684_800, 0).unwrap_or_default();
    if body.started_at.is_some_and(|at| at > now || at < earliest) {
        fields.add("started_at", "must be between 2000-01-01 and now");
    }
    fields.finish()?;
    existing_account(state, account).await?;
    let before = state.store.subscription(account).await?;
    let subscription = Subscription {
        plan: body.plan,
        status,
        // A status that does not change keeps its date, so a grace period is not restarted.
        since: match &before {
            Some(b) if b.status == status => b.since,
            _ => now,
        },
        started_at: body
            .started_at
            .or(before.as_ref().map(|b| b.started_at))
            .unwrap_or(now),
    };
    state.store.set_subscription(account, &subscription).await?;
    // The subscription travels with the account's keys' cache entries.
    state.keys.invalidate_account(account);
    let view = subscription_view(&subscription);
    let mut change = Change::new("subscription.set", account).after(&view);
    if let Some(before) = &before {
        change = change.before(&subscription_view(before));
    }
    audit::record(state, caller, request_id, change).await;
    Ok(view)
}

fn pack_id_ok(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Grants a credit pack (admin only): units of one meter, drawn before the plan's allowance
/// until they run out or expire. A pack id granted before grants nothing (200, the pack as it
/// is).
#[utoipa::path(
    post,
    path = "/accounts/{id}/packs",
    tag = "plans",
    params(("id" = AccountId, Path, description = "The account's id.")),
    request_body = wire::CreatePackRequest,
    responses(
        (status = 201, description = "The pack, granted now.", body = wire::UnitBucket),
        (status = 200, description = "A pack of this id was granted before: nothing more is.", body = wire::UnitBucket),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn create_pack(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<(axum::http::StatusCode, Json<wire::UnitBucket>), HttpError> {
    caller.require_admin()?;
    let account = parse_id(id, AccountId::parse, "account")?;
    let body: wire::CreatePackRequest = body.parse()?;
    let (added, view) = grant_pack(&state, &caller, request_id, account, body).await?;
    Ok((created_or_ok(added), Json(view)))
}

/// Grants a pack as `POST /accounts/{id}/packs` does, for the API and the console alike:
/// whether it was granted now (not before), and the pack.
pub(crate) async fn grant_pack(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    account: AccountId,
    body: wire::CreatePackRequest,
) -> Result<(bool, wire::UnitBucket), HttpError> {
    caller.require_admin()?;
    let now = state.clock.now();
    let mut fields = FieldErrors::default();
    let pack_id = body.id.clone().unwrap_or_else(|| request_id.to_string());
    if !pack_id_ok(&pack_id) {
        fields.add("id", "must be 1 to 64 of A-Z a-z 0-9 - _ .");
    }
    let meter = Meter::parse(&body.meter).unwrap_or_else(|| {
        fields.add("meter", "must be requests, tokens or cost");
        Meter::Requests
    });
    if body.units == 0 || i64::try_from(body.units).is_err() {
        fields.add("units", "must be more than zero and at most 2^63 - 1");
    }
    if let Some(group) = &body.routes {
        if !state.config.route_groups().any(|g| g == group) {
            fields.add("routes", format!("'{group}' is not the group of any route"));
        }
    }
    if body.expires_at <= now {
        fields.add("expires_at", "must be in the future");
    }
    fields.finish()?;
    existing_account(state, account).await?;
    let pack = UnitBucket {
        account,
        bucket: format!("pack:{pack_id}"),
        source: BucketSource::Pack,
        meter,
        routes: body.routes,
        granted: body.units,
        used: 0,
        held: 0,
        starts_at: now,
        ends_at: body.expires_at,
    };
    let added = state.store.add_pack(&pack, now).await?;
    let view = bucket_view(&as_stored(state, pack, now).await?, None);
    if added {
        let change = Change::new("pack.grant", account).after(&view);
        audit::record(state, caller, request_id, change).await;
    }
    Ok((added, view))
}

/// Sets the used units of one allowance's current period back to zero (admin only), once per
/// `reference`. The period keeps its start and end; units held by calls in progress stay held.
#[utoipa::path(
    post,
    path = "/accounts/{id}/allowances/{name}/reset",
    tag = "plans",
    params(
        ("id" = AccountId, Path, description = "The account's id."),
        ("name" = String, Path, description = "The allowance's name in the account's plan."),
    ),
    request_body = wire::ResetAllowanceRequest,
    responses(
        (status = 200, description = "The allowance's bucket now. `X-Tollgate-Reset` says `applied` or `already_applied`.", body = wire::UnitBucket),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = [])),
)]
async fn reset_allowance(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    body: JsonBody,
) -> Result<axum::response::Response, HttpError> {
    caller.require_admin()?;
    let (account, name) = path
        .ok()
        .and_then(|Path((id, name))| Some((AccountId::parse(&id)?, name)))
        .ok_or_else(|| HttpError::not_found("account"))?;
    let body: wire::ResetAllowanceRequest = body.parse()?;
    if !(1..=128).contains(&body.reference.len())
        || !body.reference.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(crate::http::error::validation(
            "reference",
            "must be 1 to 128 printable ASCII characters",
        ));
    }
    existing_account(&state, account).await?;
    let subscription = state.store.subscription(account).await?;
    let plan = PlanOf::find(&state.config.plans, subscription.as_ref());
    let Some((plan, allowance)) = plan.and_then(|plan| {
        let allowance = plan
            .plan
            .allowances
            .iter()
            .find(|a| a.name == name)
            .cloned()?;
        Some((plan, allowance))
    }) else {
        return Err(HttpError::not_found("allowance"));
    };
    let now = state.clock.now();
    let fresh = match body.window.as_deref() {
        None => plan.bucket_of(account, &allowance, now),
        Some(window) => plan
            .window_buckets(account, &allowance, now)
            .into_iter()
            .find(|(w, _)| length_name(w.length) == window)
            .map(|(_, bucket)| bucket)
            .ok_or_else(|| HttpError::not_found("window"))?,
    };
    let outcome = match state
        .store
        .reset_bucket(account, &fresh.bucket, &body.reference, now)
        .await?
    {
        Some(true) => "applied",
        Some(false) => "already_applied",
        // No call drew on this period yet: nothing is used.
        None => "applied",
    };
    let stored = as_stored(&state, fresh, now).await?;
    let view = bucket_view(&stored, Some(&allowance));
    if outcome == "applied" {
        let change = Change::new("allowance.reset", account).after(&serde_json::json!({
            "allowance": allowance.name,
            "window": body.window,
            "reference": body.reference,
            "resets_at": stored.ends_at,
        }));
        audit::record(&state, &caller, request_id, change).await;
    }
    let mut response = axum::response::IntoResponse::into_response(Json(view));
    response.headers_mut().insert(
        "x-tollgate-reset",
        axum::http::HeaderValue::from_static(outcome),
    );
    Ok(response)
}

/// 201 for what this call made, 200 for what an earlier one did.
fn created_or_ok(made_now: bool) -> axum::http::StatusCode {
    if made_now {
        axum::http::StatusCode::CREATED
    } else {
        axum::http::StatusCode::OK
    }
}

/// `bucket` as the store has it now (used, held), or as given if the store has none yet.
async fn as_stored(
    state: &AppState,
    bucket: UnitBucket,
    now: DateTime<Utc>,
) -> Result<UnitBucket, HttpError> {
    let stored = state.store.unit_buckets(bucket.account, now).await?;
    Ok(stored
        .into_iter()
        .find(|b| b.bucket == bucket.bucket)
        .unwrap_or(bucket))
}

fn bucket_view(
    bucket: &UnitBucket,
    allowance: Option<&tollgate_core::plan::Allowance>,
) -> wire::UnitBucket {
    let (name, resets_at, expires_at) = match bucket.source {
        BucketSource::Pack => (
            bucket
                .bucket
                .strip_prefix("pack:")
                .unwrap_or(&bucket.bucket)
                .to_string(),
            None,
            Some(bucket.ends_at),
        ),
        // `<allowance>@<start>`, or a window's `<allowance>/<length>@<start>`.
        BucketSource::Allowance => (
            bucket
                .bucket
                .split('@')
                .next()
                .unwrap_or_default()
                .to_string(),
            Some(bucket.ends_at),
            None,
        ),
    };
    wire::UnitBucket {
        source: bucket.source.as_str().to_string(),
        name,
        meter: bucket.meter.as_str().to_string(),
        routes: bucket.routes.clone(),
        granted: bucket.granted,
        used: bucket.used,
        held: bucket.held,
        remaining: bucket.remaining(),
        resets_at,
        expires_at,
        overage: allowance.map(|a| a.overage.as_str().to_string()),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AccountQuery {
    /// Admin only (and required of the admin): the account to read.
    account_id: Option<String>,
}

/// The account's plan and buckets of included units now: unexpired packs, then each of the
/// plan's allowances for its current period, in the order calls draw on them.
#[utoipa::path(
    get,
    path = "/billing/allowances",
    tag = "plans",
    params(AccountQuery),
    responses(
        (status = 200, description = "The plan and its buckets now.", body = wire::Allowances),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn allowances(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AccountQuery>, QueryRejection>,
) -> Result<Json<wire::Allowances>, HttpError> {
    caller.require_master_or_admin()?;
    let query = parse_query(query)?;
    let account = subject_account(&caller, query.account_id.as_deref())?;
    Ok(Json(allowances_of(&state, account).await?))
}

/// The credit packs on offer (`[[packs]]`), for any key to read.
#[utoipa::path(
    get,
    path = "/billing/packs",
    tag = "plans",
    responses(
        (status = 200, description = "The packs on offer, by name.", body = Vec<wire::PackOffer>),
        (status = 401, response = openapi::Status401),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn pack_offers(State(state): State<AppState>, _caller: Caller) -> Json<Vec<wire::PackOffer>> {
    let offers = state
        .config
        .plans
        .packs()
        .map(|offer| pack_view(&state, offer))
        .collect();
    Json(offers)
}

/// A pack on offer as the API shows it, for the API and the console alike.
pub(crate) fn pack_view(state: &AppState, offer: &PackOffer) -> wire::PackOffer {
    wire::PackOffer {
        name: offer.name.clone(),
        meter: offer.meter.as_str().to_string(),
        routes: offer.routes.clone(),
        units: offer.units,
        price: money(state, offer.price),
        valid_for_seconds: u64::try_from(offer.valid_for.num_seconds()).unwrap_or(0),
    }
}

/// Buys a credit pack from the wallet (a master key for its own account, or the admin): its
/// price is paid at once and its units granted, as the pack `buy.<id>`. An id bought before
/// pays and grants nothing more (200, the pack as it is). To pay by card, start a top-up with
/// the pack (`POST /topups {"pack": ...}`).
#[utoipa::path(
    post,
    path = "/billing/packs/{name}/buy",
    tag = "plans",
    params(("name" = String, Path, description = "The pack's name, from `GET /billing/packs`.")),
    request_body = wire::BuyPackRequest,
    responses(
        (status = 201, description = "Bought now: the pack.", body = wire::UnitBucket),
        (status = 200, description = "Bought before with this id: nothing more was paid.", body = wire::UnitBucket),
        (status = 400, response = openapi::Status400),
        (status = 402, response = openapi::Status402),
        (status = 403, response = openapi::Status403),
        (status = 404, response = openapi::Status404),
    ),
    security(("admin_token" = []), ("api_key" = [])),
)]
async fn buy_pack(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
    body: JsonBody,
) -> Result<(axum::http::StatusCode, Json<wire::UnitBucket>), HttpError> {
    caller.require_master_or_admin()?;
    let Path(name) = name.map_err(|_| HttpError::not_found("pack"))?;
    let body: wire::BuyPackRequest = body.parse()?;
    let account = subject_account(&caller, body.account_id.as_deref())?;
    let offer = state
        .config
        .plans
        .pack(&name)
        .ok_or_else(|| HttpError::not_found("pack"))?;
    let (bought, view) = buy(&state, &caller, request_id, account, offer, &body.id).await?;
    Ok((created_or_ok(bought), Json(view)))
}

/// Buys a pack from the wallet as `POST /billing/packs/{name}/buy` does, for the API and the
/// console alike: whether it was bought now (not before), and the pack.
pub(crate) async fn buy(
    state: &AppState,
    caller: &Caller,
    request_id: RequestId,
    account: AccountId,
    offer: &PackOffer,
    id: &str,
) -> Result<(bool, wire::UnitBucket), HttpError> {
    if !pack_id_ok(id) {
        return Err(validation("id", "must be 1 to 64 of A-Z a-z 0-9 - _ ."));
    }
    existing_account(state, account).await?;
    let now = state.clock.now();
    let (bought, pack) = billing::allowances::buy_pack(
        &state.ledger,
        &*state.store,
        offer,
        account,
        &format!("buy.{id}"),
        now,
        &state.config.currency,
    )
    .await?;
    let view = bucket_view(&as_stored(state, pack, now).await?, None);
    if bought {
        let change = Change::new("pack.bought", account).after(&serde_json::json!({
            "pack": offer.name,
            "id": view.name,
            "price": money(state, offer.price),
        }));
        audit::record(state, caller, request_id, change).await;
    }
    Ok((bought, view))
}

/// The account's plan and buckets now, for the API and the console alike.
pub(crate) async fn allowances_of(
    state: &AppState,
    account: AccountId,
) -> Result<wire::Allowances, HttpError> {
    existing_account(state, account).await?;
    let now = state.clock.now();
    let subscription = state.store.subscription(account).await?;
    let plan = PlanOf::find(&state.config.plans, subscription.as_ref());
    let stored = state.store.unit_buckets(account, now).await?;
    let mut packs: Vec<&UnitBucket> = stored
        .iter()
        .filter(|b| b.source == BucketSource::Pack)
        .collect();
    packs.sort_by(|a, b| allowance::draw_cmp(&a.core(), &b.core()));
    let mut buckets: Vec<wire::UnitBucket> =
        packs.into_iter().map(|b| bucket_view(b, None)).collect();
    if let Some(plan) = &plan {
        for allowance in &plan.plan.allowances {
            let fresh = plan.bucket_of(account, allowance, now);
            let windows = plan.window_buckets(account, allowance, now);
            for fresh in std::iter::once(&fresh).chain(windows.iter().map(|(_, b)| b)) {
                let bucket = stored
                    .iter()
                    .find(|b| b.bucket == fresh.bucket)
                    .unwrap_or(fresh);
                buckets.push(bucket_view(bucket, Some(allowance)));
            }
        }
    }
    Ok(wire::Allowances {
        account_id: account,
        plan: plan.as_ref().map(|p| p.plan.name.clone()),
        subscription: subscription.as_ref().map(subscription_view),
        buckets,
    })
}
