//! Included usage: the buckets of units (a plan's allowance for a period, credit packs) a call
//! draws from before the wallet, and how a call's reservation of them settles.
//!
//! A call reserves its worst case in units of the meter (1 for a request, its most tokens, its
//! most cost in nanos) from the buckets in order: packs by earliest expiry (an expired pack
//! gives nothing), then the plan's allowance. All or nothing: when the buckets cannot cover the
//! worst case, the overage rule decides before anything is held: `block` refuses, `wallet`
//! holds the uncovered share of the worst-case cost from the wallet, `soft` lets the call pass
//! uncharged and counts the excess. Settling draws the actual units from the same buckets in the
//! same order and returns each remainder where it came from; the wallet pays the uncovered share
//! of the actual cost, rounded up; a release returns everything.

use crate::Nanos;
use chrono::{DateTime, Utc};

/// What a call over its meter's included units meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Overage {
    /// Refused (402) until the allowance resets or a pack extends it.
    Block,
    /// Charged to the wallet at the route's prices.
    Wallet,
    /// Let through uncharged, with a warning; the excess is counted.
    Soft,
}

/// Where a bucket's units came from, which decides its place in the draw order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A one-time grant of units, usable until it expires.
    Pack {
        id: String,
        expires_at: DateTime<Utc>,
    },
    /// The plan's allowance for one period (its index in the plan's schedule).
    Allowance { period: i64 },
}

/// Units granted, used by settled calls and held by calls in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub source: Source,
    pub granted: u64,
    pub used: u64,
    pub held: u64,
}

impl Bucket {
    /// What is left to reserve.
    pub fn remaining(&self) -> u64 {
        self.granted
            .saturating_sub(self.used.saturating_add(self.held))
    }

    fn usable_at(&self, at: DateTime<Utc>) -> bool {
        match &self.source {
            Source::Pack { expires_at, .. } => at < *expires_at,
            Source::Allowance { .. } => true,
        }
    }
}

/// Puts buckets in draw order: packs by earliest expiry (then id, so the order is total), then
/// allowances.
pub fn draw_order(buckets: &mut [Bucket]) {
    buckets.sort_by(draw_cmp);
}

/// The draw order of two buckets (see [`draw_order`]).
pub fn draw_cmp(a: &Bucket, b: &Bucket) -> std::cmp::Ordering {
    match (&a.source, &b.source) {
        (
            Source::Pack {
                id: a_id,
                expires_at: a_at,
            },
            Source::Pack {
                id: b_id,
                expires_at: b_at,
            },
        ) => (a_at, a_id).cmp(&(b_at, b_id)),
        (Source::Pack { .. }, Source::Allowance { .. }) => std::cmp::Ordering::Less,
        (Source::Allowance { .. }, Source::Pack { .. }) => std::cmp::Ordering::Greater,
        (Source::Allowance { period: a }, Source::Allowance { period: b }) => a.cmp(b),
    }
}

/// A call's hold on the buckets (by their index in the slice it was reserved from) and on the
/// wallet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reservation {
    /// The worst case, in units.
    pub units: u64,
    pub draws: Vec<(usize, u64)>,
    /// Units of the worst case no bucket covers.
    pub uncovered: u64,
    /// What the wallet holds for them (`wallet` overage).
    pub wallet_hold: Nanos,
    /// The call goes past its included units uncharged (`soft` overage).
    pub soft: bool,
}

/// Why a call was refused: its worst case is more than the buckets have left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    pub needed: u64,
    pub remaining: u64,
}

/// Reserves a call's worst case of `units` (costing at most `worst_cost`) from `buckets` (in
/// [`draw_order`]) at `at`; for what they cannot cover, as `overage` says. Nothing is held
/// when the call is refused.
pub fn reserve(
    buckets: &mut [Bucket],
    at: DateTime<Utc>,
    units: u64,
    worst_cost: Nanos,
    overage: Overage,
) -> Result<Reservation, Exhausted> {
    let mut draws = Vec::new();
    let mut left = units;
    for (index, bucket) in buckets.iter().enumerate() {
        if left == 0 {
            break;
        }
        let take = if bucket.usable_at(at) {
            bucket.remaining().min(left)
        } else {
            0
        };
        if take > 0 {
            draws.push((index, take));
            left -= take;
        }
    }
    if left > 0 && overage == Overage::Block {
        return Err(Exhausted {
            needed: units,
            remaining: units - left,
        });
    }
    for (index, take) in &draws {
        buckets[*index].held += take;
    }
    Ok(Reservation {
        units,
        draws,
        uncovered: left,
        wallet_hold: if overage == Overage::Wallet {
            share(worst_cost, left, units)
        } else {
            Nanos::ZERO
        },
        soft: overage == Overage::Soft && left > 0,
    })
}

/// What settling a reservation did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settlement {
    /// Units taken from each bucket.
    pub used: Vec<(usize, u64)>,
    /// Actual units no bucket covered.
    pub uncovered: u64,
    /// What the wallet pays for them (at most its hold).
    pub wallet_charge: Nanos,
}

/// Settles `reservation` on the call's actual `units` and `cost`: the units come from the
/// buckets it reserved, in order (at most what each reserved), the rest of each reservation is
/// returned, and the wallet pays the uncovered share of `cost`.
pub fn settle(
    buckets: &mut [Bucket],
    reservation: &Reservation,
    units: u64,
    cost: Nanos,
) -> Settlement {
    let mut used = Vec::new();
    let mut left = units;
    for (index, held) in &reservation.draws {
        let take = (*held).min(left);
        let bucket = &mut buckets[*index];
        bucket.held -= held;
        bucket.used += take;
        left -= take;
        if take > 0 {
            used.push((*index, take));
        }
    }
    let wallet_charge = share(cost, left, units).min(reservation.wallet_hold);
    Settlement {
        used,
        uncovered: left,
        wallet_charge,
    }
}

/// Returns everything `reservation` held.
pub fn release(buckets: &mut [Bucket], reservation: &Reservation) {
    for (index, held) in &reservation.draws {
        buckets[*index].held -= held;
    }
}

/// `cost × part / whole`, rounded up; nothing of nothing.
pub fn share(cost: Nanos, part: u64, whole: u64) -> Nanos {
    if whole == 0 || part == 0 || cost <= Nanos::ZERO {
        return Nanos::ZERO;
    }
    let scaled = i128::from(cost.0) * i128::from(part.min(whole));
    let whole = i128::from(whole);
    Nanos(i64::try_from((scaled + whole - 1) / whole).unwrap_or(cost.0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    fn pack(id: &str, granted: u64, expires: i64) -> Bucket {
        Bucket {
            source: Source::Pack {
                id: id.into(),
                expires_at: at(expires),
            },
            granted,
            used: 0,
            held: 0,
        }
    }

    fn allowance(granted: u64) -> Bucket {
        Bucket {
            source: Source::Allowance { period: 0 },
            granted,
            used: 0,
            held: 0,
        }
    }

    #[test]
    fn packs_by_earliest_expiry_then_the_allowance_and_an_expired_pack_gives_nothing() {
        let mut buckets = vec![
            allowance(5),
            pack("late", 3, 2_000),
            pack("early", 2, 1_500),
            pack("gone", 9, 500),
        ];
        draw_order(&mut buckets);
        let ids: Vec<_> = buckets
            .iter()
            .map(|b| match &b.source {
                Source::Pack { id, .. } => id.as_str(),
                Source::Allowance { .. } => "allowance",
            })
            .collect();
        assert_eq!(ids, ["gone", "early", "late", "allowance"]);
        let held = reserve(&mut buckets, at(1_000), 6, Nanos(600), Overage::Block).unwrap();
        assert_eq!(held.draws, [(1, 2), (2, 3), (3, 1)]);
        assert_eq!(held.uncovered, 0);
        // The call used 4: the early pack's 2, then 2 of the late one's 3; the rest returns.
        let settled = settle(&mut buckets, &held, 4, Nanos(400));
        assert_eq!(settled.used, [(1, 2), (2, 2)]);
        assert_eq!(settled.wallet_charge, Nanos::ZERO);
        let left: Vec<_> = buckets.iter().map(Bucket::remaining).collect();
        assert_eq!(left, [9, 0, 1, 5]);
    }

    #[test]
    fn overage_rules() {
        // 3 left of 5; a call of at most 4 units costing at most 400.
        let fresh = || {
            let mut b = vec![allowance(5)];
            b[0].used = 2;
            b
        };
        let mut buckets = fresh();
        assert_eq!(
            reserve(&mut buckets, at(0), 4, Nanos(400), Overage::Block),
            Err(Exhausted {
                needed: 4,
                remaining: 3
            })
        );
        assert_eq!(buckets, fresh(), "a refusal holds nothing");

        let held = reserve(&mut buckets, at(0), 4, Nanos(400), Overage::Wallet).unwrap();
        assert_eq!((held.uncovered, held.wallet_hold), (1, Nanos(100)));
        // It used all 4 and cost 380: the allowance's 3, the wallet a quarter of the cost.
        let settled = settle(&mut buckets, &held, 4, Nanos(380));
        assert_eq!((settled.uncovered, settled.wallet_charge), (1, Nanos(95)));
        assert_eq!(buckets[0].remaining(), 0);

        let mut buckets = fresh();
        let held = reserve(&mut buckets, at(0), 4, Nanos(400), Overage::Soft).unwrap();
        assert!(held.soft);
        assert_eq!(held.wallet_hold, Nanos::ZERO);
        let settled = settle(&mut buckets, &held, 4, Nanos(400));
        assert_eq!((settled.uncovered, settled.wallet_charge), (1, Nanos::ZERO));
    }

    #[test]
    fn a_share_rounds_up_once_and_never_passes_the_cost() {
        assert_eq!(share(Nanos(10), 1, 3), Nanos(4));
        assert_eq!(share(Nanos(10), 3, 3), Nanos(10));
        assert_eq!(share(Nanos(10), 5, 3), Nanos(10));
        assert_eq!(share(Nanos(10), 0, 3), Nanos::ZERO);
        assert_eq!(share(Nanos(10), 1, 0), Nanos::ZERO);
        assert_eq!(
            share(Nanos(i64::MAX), u64::MAX - 1, u64::MAX),
            Nanos(i64::MAX)
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Reserve a worst case; then the call succeeds using `used` of it (clamped), or fails.
        Call {
            worst: u64,
            used: u64,
            cost_per_unit: i64,
            succeeds: bool,
        },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            (1u64..20, 0u64..20, 1i64..1_000, any::<bool>()).prop_map(
                |(worst, used, cost_per_unit, succeeds)| Step::Call {
                    worst,
                    used,
                    cost_per_unit,
                    succeeds,
                },
            ),
            1..40,
        )
    }

    proptest! {
        /// Units drawn plus units the wallet paid for equal the units of the calls that
        /// succeeded; a failure draws nothing; no bucket goes past what it was granted; the
        /// wallet never pays more than the uncovered share of a call's cost.
        #[test]
        fn buckets_and_wallet_account_for_every_successful_unit(
            steps in steps(),
            overage in prop::sample::select(vec![Overage::Block, Overage::Wallet, Overage::Soft]),
        ) {
            let mut buckets = vec![allowance(30), pack("p", 10, 1_000)];
            draw_order(&mut buckets);
            let (mut succeeded_units, mut uncovered_units) = (0u64, 0u64);
            for step in steps {
                let Step::Call { worst, used, cost_per_unit, succeeds } = step;
                let worst_cost = Nanos(worst as i64 * cost_per_unit);
                let before = buckets.clone();
                let Ok(held) = reserve(&mut buckets, at(0), worst, worst_cost, overage) else {
                    prop_assert_eq!(overage, Overage::Block);
                    prop_assert_eq!(&buckets, &before);
                    continue;
                };
                for bucket in &buckets {
                    prop_assert!(bucket.used + bucket.held <= bucket.granted);
                }
                if !succeeds {
                    release(&mut buckets, &held);
                    prop_assert_eq!(&buckets, &before, "a failure consumes nothing");
                    continue;
                }
                let used = used.min(worst);
                let cost = Nanos(used as i64 * cost_per_unit);
                let settled = settle(&mut buckets, &held, used, cost);
                let drawn: u64 = settled.used.iter().map(|(_, n)| n).sum();
                prop_assert_eq!(drawn + settled.uncovered, used);
                prop_assert!(settled.wallet_charge <= share(cost, settled.uncovered, used));
                if overage == Overage::Wallet {
                    prop_assert_eq!(settled.wallet_charge, share(cost, settled.uncovered, used));
                } else {
                    prop_assert_eq!(settled.wallet_charge, Nanos::ZERO);
                }
                succeeded_units += used;
                uncovered_units += settled.uncovered;
            }
            let consumed: u64 = buckets.iter().map(|b| b.used).sum();
            prop_assert_eq!(consumed + uncovered_units, succeeded_units);
            prop_assert!(buckets.iter().all(|b| b.held == 0 && b.used <= b.granted));
        }
    }
}
