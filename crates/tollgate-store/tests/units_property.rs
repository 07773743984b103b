//! Random histories of calls against a plan's allowance and packs, across periods and plan
//! changes, on the embedded store: every successful call's units are either drawn from a bucket
//! or left uncovered (for the wallet, at the share `allowance::share` gives), a failed call
//! consumes nothing, no bucket passes its grant, and no period is granted twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use std::collections::BTreeMap;
use tollgate_core::allowance::{share, Overage};
use tollgate_core::plan::Meter;
use tollgate_core::{AccountId, KeyEnv, KeyKind, Nanos, RequestId};
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::{
    AccountStore, BucketSource, KeyRecord, NewKey, UnitBucket, UnitStore, UnitsAnswer, UnitsAsk,
};

#[derive(Debug, Clone)]
enum Step {
    /// A call whose worst case is `worst` units; it succeeds using `used` (which may pass the
    /// worst case), or fails.
    Call {
        worst: u64,
        used: u64,
        cost_per_unit: i64,
        succeeds: bool,
    },
    /// The clock passes into the next period.
    NextPeriod,
    /// The clock passes into the period's second half (a window of its own).
    SecondHalf,
    /// The plan changes to one granting `units` a period.
    ChangePlan { units: u64 },
    /// The operator grants a pack that expires `periods` periods from now.
    Pack { units: u64, periods: i64 },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        6 => (1u64..8, 0u64..12, 1i64..1_000, prop::bool::weighted(0.8)).prop_map(
            |(worst, used, cost_per_unit, succeeds)| Step::Call { worst, used, cost_per_unit, succeeds }
        ),
        1 => Just(Step::NextPeriod),
        1 => Just(Step::SecondHalf),
        1 => (1u64..30).prop_map(|units| Step::ChangePlan { units }),
        1 => (1u64..10, 1i64..3).prop_map(|(units, periods)| Step::Pack { units, periods }),
    ];
    prop::collection::vec(step, 1..40)
}

const PERIOD_MS: i64 = 1_000_000;
/// Each half period's limit on the allowance, and the most a period passes to the next.
const WINDOW_UNITS: u64 = 6;
const ROLLOVER: u64 = 3;

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).unwrap()
}

async fn run(steps: Vec<Step>, overage: Overage) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    let account = AccountId::new();
    let master = KeyRecord::issue(
        KeyEnv::Live,
        NewKey::new(account, KeyKind::Master, "m"),
        at(0),
    )
    .1;
    store
        .create_account(account, "p", Nanos::ZERO, master, at(0))
        .await
        .unwrap();

    let (mut period, mut units_now, mut packs) = (1i64, 10u64, 0u32);
    let mut half = 0i64;
    // The most each period's allowance was granted while it was current.
    let mut granted_in: BTreeMap<String, u64> = BTreeMap::new();
    let (mut succeeded, mut drawn_total, mut uncovered_total) = (0u64, 0u64, 0u64);
    for step in steps {
        let now = at(period * PERIOD_MS + half * PERIOD_MS / 2 + 10);
        let window_start = period * PERIOD_MS + half * PERIOD_MS / 2;
        let allowance = UnitBucket {
            account,
            bucket: format!("calls@{period}"),
            source: BucketSource::Allowance,
            meter: Meter::Requests,
            routes: None,
            granted: units_now,
            used: 0,
            held: 0,
            starts_at: at(period * PERIOD_MS),
            ends_at: at((period + 1) * PERIOD_MS),
        };
        match step {
            Step::NextPeriod => {
                period += 1;
                half = 0;
            }
            Step::SecondHalf => half = 1,
            Step::ChangePlan { units } => units_now = units,
            Step::Pack { units, periods } => {
                packs += 1;
                let pack = UnitBucket {
                    bucket: format!("pack:p{packs}"),
                    source: BucketSource::Pack,
                    granted: units,
                    starts_at: now,
                    ends_at: at((period + periods) * PERIOD_MS),
                    ..allowance.clone()
                };
                prop_assert!(store.add_pack(&pack, now).await.unwrap());
            }
            Step::Call {
                worst,
                used,
                cost_per_unit,
                succeeds,
            } => {
                let before = store.unit_buckets(account, now).await.unwrap();
                let window = UnitBucket {
                    bucket: format!("calls/half@{window_start}"),
                    granted: WINDOW_UNITS,
                    starts_at: at(window_start),
                    ends_at: at(window_start + PERIOD_MS / 2),
                    ..allowance.clone()
                };
                let ask = UnitsAsk {
                    request: RequestId::new(),
                    allowance: allowance.clone(),
                    windows: vec![window],
                    rollover: Some((format!("calls@{}", period - 1), ROLLOVER)),
                    group: "g".into(),
                    units: worst,
                    worst_cost: Nanos(worst as i64 * cost_per_unit),
                    overage,
                    at: now,
                    expires_at: at(now.timestamp_millis() + 60_000),
                };
                let answer = store.reserve_units(&ask).await.unwrap();
                let entry = granted_in.entry(allowance.bucket.clone()).or_default();
                *entry = (*entry).max(units_now);
                let reservation = match answer {
                    UnitsAnswer::Exhausted { .. } => {
                        prop_assert_eq!(overage, Overage::Block);
                        let after = store.unit_buckets(account, now).await.unwrap();
                        prop_assert_eq!(held(&after), held(&before), "a refusal holds nothing");
                        continue;
                    }
                    UnitsAnswer::Reserved { reservation, .. } => reservation,
                };
                let used = if succeeds { used } else { 0 };
                let found = store.settle_units(ask.request, used, now).await.unwrap();
                prop_assert_eq!(found, !reservation.draws.is_empty());
                let after = store.unit_buckets(account, now).await.unwrap();
                prop_assert_eq!(held(&after), 0);
                let drawn = total_used(&after) - total_used(&before);
                let covered = worst - reservation.uncovered;
                prop_assert_eq!(drawn, used.min(covered));
                if !succeeds {
                    prop_assert_eq!(drawn, 0, "a failure consumes nothing");
                    continue;
                }
                let uncovered = used - drawn;
                let cost = Nanos(used as i64 * cost_per_unit);
                let charge = share(cost, uncovered, used).min(reservation.wallet_hold);
                if overage == Overage::Wallet && used <= worst {
                    // Within its worst case, a call's uncovered units are paid in full.
                    prop_assert_eq!(charge, share(cost, uncovered, used));
                }
                prop_assert!(charge <= cost);
                succeeded += used;
                drawn_total += drawn;
                uncovered_total += uncovered;
            }
        }
    }
    prop_assert_eq!(drawn_total + uncovered_total, succeeded);
    // Every bucket ever made: its used never passes its grant; a window's grant is its own;
    // each period was granted once, at the most its plan gave it (rollover moves units between
    // periods, never makes them).
    let sums = store.unit_entry_sums(account).await.unwrap();
    let (windows, others): (Vec<_>, Vec<_>) =
        sums.iter().partition(|(name, ..)| name.contains('/'));
    let used_everywhere: u64 = others.iter().map(|(_, _, _, used)| used).sum();
    prop_assert_eq!(used_everywhere, drawn_total);
    for (bucket, granted, held, used) in &sums {
        prop_assert_eq!(*held, 0);
        prop_assert!(used <= granted, "{}", bucket);
    }
    for (_, granted, _, _) in &windows {
        prop_assert_eq!(*granted, WINDOW_UNITS);
    }
    let allowances: u64 = others
        .iter()
        .filter(|(name, ..)| granted_in.contains_key(name))
        .map(|(_, granted, _, _)| granted)
        .sum();
    prop_assert_eq!(allowances, granted_in.values().sum::<u64>());
    Ok(())
}

fn held(buckets: &[UnitBucket]) -> u64 {
    buckets.iter().map(|b| b.held).sum()
}

/// Units used from the allowance and packs (a window's use mirrors its allowance's).
fn total_used(buckets: &[UnitBucket]) -> u64 {
    buckets
        .iter()
        .filter(|b| !b.bucket.contains('/'))
        .map(|b| b.used)
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn units_drawn_plus_units_uncovered_are_the_units_of_successful_calls(
        steps in steps(),
        overage in prop::sample::select(vec![Overage::Block, Overage::Wallet, Overage::Soft]),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(steps, overage))?;
    }
}
