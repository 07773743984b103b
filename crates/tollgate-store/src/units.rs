//! Included units: subscriptions, and the buckets of units (a plan allowance's for one period,
//! credit packs) calls draw from before the wallet. The store decides every reservation in one
//! transaction, under the buckets' row locks, so nodes sharing a store never draw one unit
//! twice; the rules themselves are the core's ([`tollgate_core::allowance`]).
//!
//! Units move between a bucket's states as entries, like money between ledger accounts:
//! `grant` (from outside into the bucket), `hold` (remaining → held), `use` (held → used),
//! `return` and `expire` (held → remaining), `reset` (used → remaining), and `carry` (remaining
//! out of a period's bucket, granted to the next one's by rollover). A bucket's `granted`,
//! `held` and `used` are always the sums of its entries, which the conformance suite checks.

use crate::StoreError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tollgate_core::allowance::{self, Bucket, Overage, Reservation, Source};
use tollgate_core::plan::{Meter, Subscription};
use tollgate_core::{AccountId, Nanos, RequestId};

/// Where a bucket's units came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketSource {
    Allowance,
    Pack,
}

impl BucketSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BucketSource::Allowance => "allowance",
            BucketSource::Pack => "pack",
        }
    }

    pub fn parse(text: &str) -> Option<BucketSource> {
        [BucketSource::Allowance, BucketSource::Pack]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// A bucket of units as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitBucket {
    pub account: AccountId,
    /// `<allowance>@<period start>` or `pack:<id>`.
    pub bucket: String,
    pub source: BucketSource,
    pub meter: Meter,
    /// The route group it serves; `None`: every route.
    pub routes: Option<String>,
    pub granted: u64,
    pub used: u64,
    pub held: u64,
    /// An allowance's period, or a pack's life: usable from `starts_at` until `ends_at`.
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

impl UnitBucket {
    pub fn remaining(&self) -> u64 {
        self.granted
            .saturating_sub(self.used.saturating_add(self.held))
    }

    /// The core's view of it, for the draw order.
    pub fn core(&self) -> Bucket {
        Bucket {
            source: match self.source {
                BucketSource::Pack => Source::Pack {
                    id: self.bucket.clone(),
                    expires_at: self.ends_at,
                },
                BucketSource::Allowance => Source::Allowance { period: 0 },
            },
            granted: self.granted,
            used: self.used,
            held: self.held,
        }
    }

    /// Whether a call metered by `meter` on `group` may draw on it (packs of the meter, for
    /// every route or for the group).
    pub fn serves(&self, meter: Meter, group: &str) -> bool {
        self.meter == meter && self.routes.as_deref().is_none_or(|g| g == group)
    }
}

/// A call's ask for units: its worst case from the plan allowance's bucket for the period
/// (created with `allowance.granted` if it does not exist, raised to it if it is lower: an
/// upgrade applies at once) and the packs that serve the call.
#[derive(Debug, Clone)]
pub struct UnitsAsk {
    pub request: RequestId,
    /// The allowance's bucket for the current period, as the plan grants it now.
    pub allowance: UnitBucket,
    /// The allowance's windows' buckets for their current periods (created likewise): the
    /// allowance is drawn only as far as each has room, and each holds what it holds.
    pub windows: Vec<UnitBucket>,
    /// The previous period's bucket and the most of its unused units a new period takes over.
    pub rollover: Option<(String, u64)>,
    pub group: String,
    pub units: u64,
    pub worst_cost: Nanos,
    pub overage: Overage,
    pub at: DateTime<Utc>,
    /// When an unsettled reservation returns its units by itself.
    pub expires_at: DateTime<Utc>,
}

/// The store's answer to a [`UnitsAsk`].
#[derive(Debug, Clone)]
pub enum UnitsAnswer {
    /// `draws` name the buckets in draw order, with the units each holds for the call.
    Reserved {
        reservation: Reservation,
        draws: Vec<(String, u64)>,
        /// What each window holds: what the allowance's draw holds.
        window_draws: Vec<(String, u64)>,
        /// The allowance's bucket after the reservation, and its windows'.
        allowance: UnitBucket,
        windows: Vec<UnitBucket>,
        /// What the packs that serve the call have left after it.
        packs_remaining: u64,
    },
    /// Overage `block`, and the buckets cannot cover the worst case: nothing was held.
    Exhausted {
        allowance: UnitBucket,
        windows: Vec<UnitBucket>,
        packs_remaining: u64,
    },
}

impl UnitsAsk {
    /// The buckets the plan itself grants (the allowance's and its windows'), in lock order.
    pub fn own_buckets(&self) -> Vec<&UnitBucket> {
        let mut own: Vec<&UnitBucket> = std::iter::once(&self.allowance)
            .chain(&self.windows)
            .collect();
        own.sort_by(|a, b| lock_order(&a.bucket).cmp(&lock_order(&b.bucket)));
        own
    }
}

/// Decides an ask against the buckets read under lock: `candidates` are the plan's own buckets
/// (the allowance's and its windows') and the packs that may serve the call. Returns the answer,
/// with the draws to write.
pub(crate) fn decide(ask: &UnitsAsk, candidates: Vec<UnitBucket>) -> UnitsAnswer {
    let window_names: Vec<&str> = ask.windows.iter().map(|w| w.bucket.as_str()).collect();
    let (windows, candidates): (Vec<UnitBucket>, Vec<UnitBucket>) = candidates
        .into_iter()
        .partition(|b| window_names.contains(&b.bucket.as_str()));
    let mut sorted: Vec<UnitBucket> = candidates
        .into_iter()
        .filter(|b| {
            b.bucket == ask.allowance.bucket
                || (b.source == BucketSource::Pack && b.serves(ask.allowance.meter, &ask.group))
        })
        .collect();
    sorted.sort_by(|a, b| allowance::draw_cmp(&a.core(), &b.core()));
    // The allowance lends no more than its tightest window has room for.
    let window_room = windows.iter().map(UnitBucket::remaining).min();
    let mut buckets: Vec<Bucket> = sorted
        .iter()
        .map(|b| {
            let mut core = b.core();
            if let (true, Some(room)) = (b.bucket == ask.allowance.bucket, window_room) {
                core.granted = core.used + core.held + b.remaining().min(room);
            }
            core
        })
        .collect();
    let packs_remaining = |sorted: &[UnitBucket]| {
        sorted
            .iter()
            .filter(|b| b.source == BucketSource::Pack && b.ends_at > ask.at)
            .map(UnitBucket::remaining)
            .sum()
    };
    let allowance_of = |sorted: &[UnitBucket]| {
        sorted
            .iter()
            .find(|b| b.bucket == ask.allowance.bucket)
            .cloned()
            .unwrap_or_else(|| ask.allowance.clone())
    };
    match allowance::reserve(&mut buckets, ask.at, ask.units, ask.worst_cost, ask.overage) {
        Err(_) => UnitsAnswer::Exhausted {
            allowance: allowance_of(&sorted),
            windows,
            packs_remaining: packs_remaining(&sorted),
        },
        Ok(reservation) => {
            let draws: Vec<(String, u64)> = reservation
                .draws
                .iter()
                .map(|&(index, units)| {
                    sorted[index].held += units;
                    (sorted[index].bucket.clone(), units)
                })
                .collect();
            let from_allowance = draws
                .iter()
                .find(|(name, _)| *name == ask.allowance.bucket)
                .map_or(0, |(_, units)| *units);
            let mut windows = windows;
            let window_draws = windows
                .iter_mut()
                .filter(|_| from_allowance > 0)
                .map(|w| {
                    w.held += from_allowance;
                    (w.bucket.clone(), from_allowance)
                })
                .collect();
            UnitsAnswer::Reserved {
                reservation,
                draws,
                window_draws,
                allowance: allowance_of(&sorted),
                windows,
                packs_remaining: packs_remaining(&sorted),
            }
        }
    }
}

/// The order rows are locked and written in, everywhere: an account's allowance buckets, then
/// its packs, each by name. One order means two transactions never wait on each other.
pub(crate) fn lock_order(bucket: &str) -> (bool, &str) {
    (bucket.starts_with("pack:"), bucket)
}

/// Subscriptions and buckets of units. See the module docs.
#[async_trait]
pub trait UnitStore: Send + Sync {
    async fn subscription(&self, account: AccountId) -> Result<Option<Subscription>, StoreError>;
    /// Sets the account's subscription (its plan, status and anchor), replacing any.
    async fn set_subscription(
        &self,
        account: AccountId,
        subscription: &Subscription,
    ) -> Result<(), StoreError>;
    /// Adds a pack (a bucket of source `pack`, `bucket` = `pack:<id>`); `false` if the account
    /// has one of that name already (nothing written).
    async fn add_pack(&self, pack: &UnitBucket, at: DateTime<Utc>) -> Result<bool, StoreError>;
    /// Reserves a call's worst case, all or nothing, in one transaction.
    async fn reserve_units(&self, ask: &UnitsAsk) -> Result<UnitsAnswer, StoreError>;
    /// Settles a reservation on the call's actual units: they are used from its buckets in
    /// draw order (at most what each held), the rest returns. `false` when the reservation was
    /// not there (settled before, or expired).
    async fn settle_units(
        &self,
        request: RequestId,
        units: u64,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Returns the units of reservations that outlived `cutoff`; how many reservations.
    async fn expire_units(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError>;
    /// The account's buckets usable at `at`: unexpired packs, and allowance buckets whose
    /// period holds `at`.
    async fn unit_buckets(
        &self,
        account: AccountId,
        at: DateTime<Utc>,
    ) -> Result<Vec<UnitBucket>, StoreError>;
    /// Sets a bucket's `used` back to zero (what it holds stays held), once per `reference`:
    /// `None` when the account has no such bucket, else whether this call reset it.
    async fn reset_bucket(
        &self,
        account: AccountId,
        bucket: &str,
        reference: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<bool>, StoreError>;
    /// Each bucket's (granted, held, used) as its entries sum them, for the books' check.
    async fn unit_entry_sums(
        &self,
        account: AccountId,
    ) -> Result<Vec<(String, u64, u64, u64)>, StoreError>;
}

/// Which draws to take: a request's, or those expired by a time (in milliseconds).
#[derive(Debug, Clone, Copy)]
pub(crate) enum DrawsOf<'a> {
    Request(&'a str),
    ExpiredBy(i64),
}

/// One bucket's share of a call's reservation, as stored.
#[derive(Debug, Clone)]
pub(crate) struct Draw {
    pub request: String,
    pub position: i64,
    pub account: AccountId,
    pub bucket: String,
    pub units: u64,
    /// A window's: it uses what the allowance's draw uses.
    pub mirror: bool,
}

pub(crate) fn draws(
    rows: Vec<(String, i64, String, String, i64, bool)>,
) -> Result<Vec<Draw>, StoreError> {
    rows.into_iter()
        .map(|(request, position, account, bucket, units, mirror)| {
            Ok(Draw {
                request,
                position,
                account: crate::rows::parse_id("account id", &account)?,
                bucket,
                units: u64::try_from(units)
                    .map_err(|_| crate::rows::corrupt("drawn units", &units.to_string()))?,
                mirror,
            })
        })
        .collect()
}

/// How one reservation's draws settle on `units` actually used: taken in draw order, at most
/// what each held; as (account, bucket, used, returned), in lock order.
pub(crate) fn settlement(mut draws: Vec<Draw>, units: u64) -> Vec<(AccountId, String, u64, u64)> {
    draws.sort_by_key(|d| d.position);
    let mut left = units;
    // What the allowance's own draw used (the one draw that is neither a pack's nor a window's):
    // its windows' draws use the same.
    let mut from_allowance = 0;
    let (windows, draws): (Vec<Draw>, Vec<Draw>) = draws.into_iter().partition(|d| d.mirror);
    let mut moves: Vec<(AccountId, String, u64, u64)> = draws
        .into_iter()
        .map(|draw| {
            let used = draw.units.min(left);
            left -= used;
            if !draw.bucket.starts_with("pack:") {
                from_allowance = used;
            }
            (draw.account, draw.bucket, used, draw.units - used)
        })
        .collect();
    moves.extend(windows.into_iter().map(|draw| {
        let used = draw.units.min(from_allowance);
        (draw.account, draw.bucket, used, draw.units - used)
    }));
    moves.sort_by(|a, b| lock_order(&a.1).cmp(&lock_order(&b.1)));
    moves
}

/// Draws sorted as rows are locked: by account, then [`lock_order`].
pub(crate) fn by_lock_order(draws: &[Draw]) -> Vec<&Draw> {
    let mut sorted: Vec<&Draw> = draws.iter().collect();
    sorted.sort_by(|a, b| {
        (a.account, lock_order(&a.bucket)).cmp(&(b.account, lock_order(&b.bucket)))
    });
    sorted
}

/// Each bucket's (granted, held, used) summed from its entries; `{account}` is the placeholder.
pub(crate) const ENTRY_SUMS: &str = "SELECT bucket, \
    CAST(COALESCE(SUM(CASE WHEN kind = 'grant' THEN units WHEN kind = 'carry' THEN -units \
        ELSE 0 END), 0) AS BIGINT), \
    CAST(COALESCE(SUM(CASE WHEN kind = 'hold' THEN units \
        WHEN kind IN ('use', 'return', 'expire') THEN -units ELSE 0 END), 0) AS BIGINT), \
    CAST(COALESCE(SUM(CASE WHEN kind = 'use' THEN units WHEN kind = 'reset' THEN -units \
        ELSE 0 END), 0) AS BIGINT) \
    FROM unit_entries WHERE account_id = {account} GROUP BY bucket ORDER BY bucket";

pub(crate) fn sums(rows: Vec<(String, i64, i64, i64)>) -> Vec<(String, u64, u64, u64)> {
    let count = |n: i64| u64::try_from(n).unwrap_or(u64::MAX);
    rows.into_iter()
        .map(|(bucket, granted, held, used)| (bucket, count(granted), count(held), count(used)))
        .collect()
}
