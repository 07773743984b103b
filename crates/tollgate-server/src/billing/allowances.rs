//! A call's plan: whether its subscription lets it through, and its reservation of included
//! units (the plan allowance's for the period, then credit packs) before the wallet. The store
//! decides each reservation atomically ([`tollgate_store::UnitStore`]); this says what to ask
//! and turns the answer into a refusal, a quota to show, and at the end a wallet charge.

use crate::billing::ledger::{FeeRefused, GrantRefused, HoldRefused, Ledger};
use crate::billing::refusal::refused_error;
use crate::config::plans::Plans;
use crate::http::error::HttpError;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::allowance::{self, Overage};
use tollgate_core::period::Period;
use tollgate_core::plan::{
    length_name, Allowance, Meter, PackOffer, Plan, Standing, Subscription, SubscriptionStatus,
    Window,
};
use tollgate_core::{AccountId, ApiError, ErrorCode, Nanos, RequestId};
use tollgate_store::{BucketSource, Store, StoreError, UnitBucket, UnitsAnswer, UnitsAsk};
use tollgate_wire::api::Money;

/// Subscriptions' start for accounts on the default plan: only calendar periods use it.
const NO_START: DateTime<Utc> = DateTime::<Utc>::UNIX_EPOCH;

/// The plan an account's calls follow, and its subscription if it has one; borrowed from the
/// config and the key cache, so finding it per request copies nothing.
#[derive(Debug, Clone, Copy)]
pub struct PlanOf<'a> {
    pub plan: &'a Plan,
    pub subscription: Option<&'a Subscription>,
}

impl<'a> PlanOf<'a> {
    /// The account's subscribed plan, else the default one; `None` when neither exists (a
    /// subscription to a plan the config no longer has follows the default).
    pub fn find(plans: &'a Plans, subscription: Option<&'a Subscription>) -> Option<PlanOf<'a>> {
        let plan = plans.of(subscription)?;
        Some(PlanOf {
            plan,
            // Only the plan subscribed to anchors on the subscription and has its standing.
            subscription: subscription.filter(|s| s.plan == plan.name),
        })
    }

    /// `Ok(None)`: calls pass; `Ok(Some(until))`: they pass, past due, until then;
    /// `Err`: the subscription has lapsed (402 `subscription_lapsed`).
    pub fn standing(&self, at: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, ApiError> {
        let Some(subscription) = self.subscription else {
            return Ok(None);
        };
        match subscription.standing(self.plan.grace, at) {
            Standing::Good => Ok(None),
            Standing::Grace { until } => Ok(Some(until)),
            Standing::Lapsed => Err(ApiError::new(
                ErrorCode::SubscriptionLapsed,
                format!(
                    "The account's subscription to the '{}' plan is {} since {}. Pay the open \
                     invoice or renew the subscription to resume calls.",
                    self.plan.name,
                    subscription.status.as_str(),
                    rfc3339(subscription.since),
                ),
            )
            .with_detail("status", subscription.status.as_str())
            .with_detail("since", rfc3339(subscription.since))),
        }
    }

    /// The fee owed for the period holding `at`, and that period: `None` on a free plan, in a
    /// trial, or on the default plan (which is free).
    pub fn fee(&self, at: DateTime<Utc>) -> Option<(Nanos, Period)> {
        let subscription = self.subscription?;
        if self.plan.price == Nanos::ZERO || subscription.status == SubscriptionStatus::Trialing {
            return None;
        }
        let period = self.plan.schedule(subscription.started_at).period_at(at);
        Some((self.plan.price, period))
    }

    /// The allowance metering calls on `group`, and its bucket for the period holding `at`.
    pub fn bucket(
        &self,
        account: AccountId,
        group: &str,
        at: DateTime<Utc>,
    ) -> Option<(&'a Allowance, UnitBucket)> {
        let allowance = self.plan.allowance_for(group)?;
        let bucket = self.bucket_of(account, allowance, at);
        Some((allowance, bucket))
    }

    fn started(&self) -> DateTime<Utc> {
        self.subscription.map_or(NO_START, |s| s.started_at)
    }

    /// The name of `allowance`'s bucket for the period before the one holding `at`.
    pub fn previous_bucket(&self, allowance: &Allowance, at: DateTime<Utc>) -> String {
        let schedule = self.plan.schedule(self.started());
        let period = schedule.period_at(at);
        let before = period
            .start
            .checked_sub_signed(chrono::Duration::seconds(1))
            .unwrap_or(period.start);
        allowance.bucket(&schedule.period_at(before))
    }

    /// `allowance`'s windows' buckets for the windows holding `at`, as the plan grants them.
    pub fn window_buckets(
        &self,
        account: AccountId,
        allowance: &Allowance,
        at: DateTime<Utc>,
    ) -> Vec<(Window, UnitBucket)> {
        allowance
            .windows
            .iter()
            .map(|window| {
                let period = self
                    .plan
                    .schedule_of(window.length, self.started())
                    .period_at(at);
                let bucket = UnitBucket {
                    account,
                    bucket: allowance.window_bucket(window, &period),
                    source: BucketSource::Allowance,
                    meter: allowance.meter,
                    routes: allowance.routes.clone(),
                    granted: window.units,
                    used: 0,
                    held: 0,
                    starts_at: period.start,
                    ends_at: period.end,
                };
                (*window, bucket)
            })
            .collect()
    }

    /// `allowance`'s bucket for the period holding `at`, as the plan grants it (unused).
    pub fn bucket_of(
        &self,
        account: AccountId,
        allowance: &Allowance,
        at: DateTime<Utc>,
    ) -> UnitBucket {
        let period = self.plan.schedule(self.started()).period_at(at);
        UnitBucket {
            account,
            bucket: allowance.bucket(&period),
            source: BucketSource::Allowance,
            meter: allowance.meter,
            routes: allowance.routes.clone(),
            granted: allowance.units,
            used: 0,
            held: 0,
            starts_at: period.start,
            ends_at: period.end,
        }
    }
}

/// Pays the plan's fee for the call's period from the wallet, if it is owed and not paid yet
/// (the period's first call pays it, once, whichever node takes it). A wallet short of it
/// refuses the call with 402 `insufficient_balance`: a period is not used before it is paid.
pub async fn pay_fee(
    ledger: &Ledger,
    plan: PlanOf<'_>,
    account: AccountId,
    at: DateTime<Utc>,
    currency: &str,
) -> Result<(), HttpError> {
    let Some((price, period)) = plan.fee(at) else {
        return Ok(());
    };
    let paid = ledger
        .pay_fee(account, price, period.start, &plan.plan.name)
        .await;
    paid.map(|_| ()).map_err(|refused| {
        fee_refused(refused, currency, |required, available| {
            let error = HttpError::new(
                ErrorCode::InsufficientBalance,
                format!(
                    "The '{}' plan's fee for the period from {} to {} is {required} {currency}, \
                     paid from the wallet at the period's first call, but the balance is \
                     {available} {currency}. Top up the wallet and retry.",
                    plan.plan.name,
                    rfc3339(period.start),
                    rfc3339(period.end),
                ),
            );
            error
                .with_detail("plan", plan.plan.name.as_str())
                .with_detail("period_start", rfc3339(period.start))
                .with_detail("period_end", rfc3339(period.end))
        })
    })
}

/// Buys `offer` for `account` from its wallet, once per `id`: the pack's bucket is `pack:<id>`,
/// and its price a `fee` filed under that name, then the pack is granted, good for the offer's
/// `valid_for` from `at`. Asked again with the same id it pays nothing (and grants what a crash
/// between the two left ungranted). The answer: whether this call granted it, and the pack.
pub async fn buy_pack(
    ledger: &Ledger,
    store: &dyn Store,
    offer: &PackOffer,
    account: AccountId,
    id: &str,
    at: DateTime<Utc>,
    currency: &str,
) -> Result<(bool, UnitBucket), HttpError> {
    let bucket = UnitBucket {
        account,
        bucket: format!("pack:{id}"),
        source: BucketSource::Pack,
        meter: offer.meter,
        routes: offer.routes.clone(),
        granted: offer.units,
        used: 0,
        held: 0,
        starts_at: at,
        ends_at: at.checked_add_signed(offer.valid_for).unwrap_or(at),
    };
    let memo = format!("the '{}' credit pack", offer.name);
    ledger
        .pay_once(account, offer.price, &bucket.bucket, &memo)
        .await
        .map_err(|refused| {
            fee_refused(refused, currency, |required, available| {
                HttpError::new(
                    ErrorCode::InsufficientBalance,
                    format!(
                        "The '{}' pack costs {required} {currency} but the balance is \
                         {available} {currency}. Top up the wallet, or buy it by card.",
                        offer.name
                    ),
                )
                .with_detail("pack", offer.name.as_str())
            })
        })?;
    let granted = store.add_pack(&bucket, at).await?;
    Ok((granted, bucket))
}

/// A fee or purchase the wallet could not pay: `short(required, balance)` says what, as a 402
/// `insufficient_balance`; credit other nodes lease is 503 while they give it back.
fn fee_refused(
    refused: FeeRefused,
    currency: &str,
    short: impl FnOnce(Nanos, Nanos) -> HttpError,
) -> HttpError {
    let money = |n: Nanos| serde_json::to_value(Money::new(n, currency)).unwrap_or_default();
    match refused {
        FeeRefused::Grant(e) => grant_refused(e),
        FeeRefused::Short {
            required,
            available,
            leased,
        } if available.0.saturating_add(leased.0) >= required.0 => refused_error(
            HoldRefused::CreditElsewhere {
                required,
                balance: Nanos(available.0.saturating_add(leased.0)),
            },
            required,
            currency,
        ),
        FeeRefused::Short {
            required,
            available,
            ..
        } => short(required, available)
            .with_detail("required", money(required))
            .with_detail("balance", money(available)),
    }
}

fn grant_refused(refused: GrantRefused) -> HttpError {
    match refused {
        GrantRefused::Store(e) => e.into(),
        // Queued: the store applies it once when it answers, and the next call finds it paid.
        GrantRefused::Unconfirmed => StoreError::Unavailable(
            "the store did not confirm the plan's fee in time; retry shortly".into(),
        )
        .into(),
        GrantRefused::OverLimit => {
            StoreError::Corrupt("a plan's fee is out of range".into()).into()
        }
    }
}

/// What a call is worth in units of `meter`: a request is one; tokens and cost as measured.
pub fn units_of(meter: Meter, tokens: u64, cost: Nanos) -> u64 {
    match meter {
        Meter::Requests => 1,
        Meter::Tokens => tokens,
        Meter::Cost => u64::try_from(cost.0).unwrap_or(0),
    }
}

/// Where a call stands with its allowance, for the `RateLimit` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub name: String,
    pub meter: Meter,
    pub limit: u64,
    /// What the next call may draw: the allowance's and the packs' remaining units.
    pub remaining: u64,
    pub window_seconds: u64,
    pub resets_at: DateTime<Utc>,
}

impl Quota {
    /// The allowance's quota and each window's, `name` and `name/day`.
    fn all(
        allowance: &Allowance,
        bucket: &UnitBucket,
        windows: &[(Window, UnitBucket)],
        packs_remaining: u64,
    ) -> Vec<Quota> {
        let mut quotas = vec![Quota::new(
            &allowance.name,
            allowance,
            bucket,
            packs_remaining,
        )];
        for (window, bucket) in windows {
            let name = format!("{}/{}", allowance.name, length_name(window.length));
            quotas.push(Quota::new(&name, allowance, bucket, 0));
        }
        quotas
    }

    fn new(name: &str, allowance: &Allowance, bucket: &UnitBucket, packs_remaining: u64) -> Quota {
        Quota {
            name: name.to_string(),
            meter: allowance.meter,
            limit: bucket.granted,
            remaining: bucket.remaining().saturating_add(packs_remaining),
            window_seconds: u64::try_from((bucket.ends_at - bucket.starts_at).num_seconds())
                .unwrap_or(0),
            resets_at: bucket.ends_at,
        }
    }
}

/// A call's units, reserved: what settling it charges the wallet, and the store's part, done
/// in the background (the units were counted at the reservation: settling only returns some).
pub struct UnitsHeld {
    store: Arc<dyn Store>,
    request: RequestId,
    pub meter: Meter,
    /// The worst case reserved, and what of it the buckets covered.
    units: u64,
    uncovered: u64,
    /// What the wallet holds for the uncovered part (`wallet` overage).
    pub wallet_hold: Nanos,
    /// When the reservation expires and the sweep returns its units unused.
    expires_at: DateTime<Utc>,
}

impl UnitsHeld {
    /// Settles on the call's actual units and cost; returns what the wallet pays: the share of
    /// the cost the buckets did not cover, at most its hold.
    pub fn settle(self, units: u64, cost: Nanos) -> Nanos {
        let covered = self.units - self.uncovered;
        let uncovered = units.saturating_sub(covered);
        let charge = allowance::share(cost, uncovered, units).min(self.wallet_hold);
        self.finish(units);
        charge
    }

    /// Returns everything: the call failed.
    pub fn release(self) {
        self.finish(0);
    }

    fn finish(self, units: u64) {
        if self.uncovered == self.units {
            // Nothing was drawn from a bucket (all of it went to the wallet): nothing to return.
            return;
        }
        let UnitsHeld {
            store,
            request,
            expires_at,
            ..
        } = self;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(settle_units(store, request, units, expires_at));
        }
    }
}

/// The longest wait between two tries of a settlement the store did not take.
const SETTLE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Settles a call's reservation on `units`, trying again through an outage until the store
/// takes it. A settlement given up would leave the units held until `expires_at`, and the sweep
/// returns expired units unused: the call would have been free. Past that time there is
/// nothing left to settle. A retry after a lost answer finds the reservation gone, and does
/// nothing.
async fn settle_units(
    store: Arc<dyn Store>,
    request: RequestId,
    units: u64,
    expires_at: DateTime<Utc>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.settle_units(request, units, Utc::now()).await {
            Ok(_) => return,
            Err(StoreError::Unavailable(e)) if Utc::now() < expires_at => {
                tracing::warn!(error = %e, %request, retry_in = ?backoff,
                    "settling included units failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SETTLE_BACKOFF_MAX);
            }
            Err(e) => {
                tracing::error!(error = %e, %request, "settling included units failed");
                return;
            }
        }
    }
}

/// What reserving a call's units decided.
pub struct Reserved {
    pub held: Option<UnitsHeld>,
    /// The allowance's, then each window's.
    pub quotas: Vec<Quota>,
    /// Overage `soft` and the buckets ran short: the call passes uncharged, with a warning.
    pub soft_excess: u64,
}

/// Why a call's units could not be reserved.
pub enum NotReserved {
    Exhausted(ApiError, Vec<Quota>),
    Store(StoreError),
}

/// What a call asks of its allowance.
pub struct CallUnits<'a> {
    pub plan: PlanOf<'a>,
    pub account: AccountId,
    pub group: &'a str,
    pub request: RequestId,
    /// Worst-case tokens and cost.
    pub tokens: u64,
    pub worst_cost: Nanos,
    pub at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Reserves a call's worst case from its allowance and packs; `Ok(None)` when no allowance of
/// the plan meters the call's route group.
pub async fn reserve(
    store: &Arc<dyn Store>,
    call: CallUnits<'_>,
) -> Result<Option<Reserved>, NotReserved> {
    let Some((allowance, bucket)) = call.plan.bucket(call.account, call.group, call.at) else {
        return Ok(None);
    };
    let units = units_of(allowance.meter, call.tokens, call.worst_cost);
    let asked_windows = call.plan.window_buckets(call.account, allowance, call.at);
    let ask = UnitsAsk {
        request: call.request,
        allowance: bucket,
        windows: asked_windows.iter().map(|(_, b)| b.clone()).collect(),
        rollover: (allowance.rollover > 0).then(|| {
            (
                call.plan.previous_bucket(allowance, call.at),
                allowance.rollover,
            )
        }),
        group: call.group.to_string(),
        units,
        worst_cost: call.worst_cost,
        overage: allowance.overage,
        at: call.at,
        expires_at: call.expires_at,
    };
    // The store's window buckets after the call, each with its window.
    let with_windows = |stored: Vec<UnitBucket>| -> Vec<(Window, UnitBucket)> {
        asked_windows
            .iter()
            .map(|(window, asked)| {
                let bucket = stored
                    .iter()
                    .find(|b| b.bucket == asked.bucket)
                    .cloned()
                    .unwrap_or_else(|| asked.clone());
                (*window, bucket)
            })
            .collect()
    };
    match store
        .reserve_units(&ask)
        .await
        .map_err(NotReserved::Store)?
    {
        UnitsAnswer::Exhausted {
            allowance: bucket,
            windows,
            packs_remaining,
        } => {
            let windows = with_windows(windows);
            let quotas = Quota::all(allowance, &bucket, &windows, packs_remaining);
            let error = exhausted(call.plan.plan, allowance, &bucket, &windows, units);
            Err(NotReserved::Exhausted(error, quotas))
        }
        UnitsAnswer::Reserved {
            reservation,
            allowance: bucket,
            windows,
            packs_remaining,
            ..
        } => Ok(Some(Reserved {
            quotas: Quota::all(allowance, &bucket, &with_windows(windows), packs_remaining),
            soft_excess: if reservation.soft {
                reservation.uncovered
            } else {
                0
            },
            held: Some(UnitsHeld {
                store: store.clone(),
                request: call.request,
                meter: allowance.meter,
                units,
                uncovered: reservation.uncovered,
                wallet_hold: if allowance.overage == Overage::Wallet {
                    reservation.wallet_hold
                } else {
                    Nanos::ZERO
                },
                expires_at: call.expires_at,
            }),
        })),
    }
}

/// 402 `allowance_exhausted`: the allowance or window that ran short (the window with the
/// least left, if one has less than the call needs), how far it is used, when it resets.
fn exhausted(
    plan: &Plan,
    allowance: &Allowance,
    bucket: &UnitBucket,
    windows: &[(Window, UnitBucket)],
    needed: u64,
) -> ApiError {
    let short_window = windows
        .iter()
        .filter(|(_, w)| w.remaining() < needed)
        .min_by_key(|(_, w)| w.remaining());
    let (window, limit, bucket) = match short_window {
        Some((window, w)) => (length_name(window.length), window.units, w),
        None => (length_name(plan.length), allowance.units, bucket),
    };
    ApiError::new(
        ErrorCode::AllowanceExhausted,
        format!(
            "The '{}' plan's {limit} {} for this {window} are used up ({} used, {} held by calls \
             in progress; this call needs up to {needed}). They reset at {}. To raise the \
             allowance, buy a credit pack or move to a larger plan.",
            plan.name,
            allowance.meter.as_str(),
            bucket.used,
            bucket.held,
            rfc3339(bucket.ends_at),
        ),
    )
    .with_detail("meter", allowance.meter.as_str())
    .with_detail("allowance", allowance.name.as_str())
    .with_detail("window", window)
    .with_detail("limit", bucket.granted)
    .with_detail("used", bucket.used)
    .with_detail("held", bucket.held)
    .with_detail("resets_at", rfc3339(bucket.ends_at))
}

/// An instant as the API's JSON writes it (`2027-01-01T00:00:00Z`).
fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}
