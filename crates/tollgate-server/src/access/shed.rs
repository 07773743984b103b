//! Load shedding: a node over its adaptive concurrency limit answers 429 `overloaded` before any
//! other work (no key lookup in the store, no rate-limit decision, no hold, no charge).
//!
//! - **The limit** is `tollgate_core::load::AdaptiveLimit`, fed the time each request took to
//!   produce its response head. Tollgate's own quick refusals (a 401, a 429) are not samples:
//!   they say nothing about the capacity behind the node. An optional CPU threshold backs the
//!   limit off while the machine is busier than that ([`watch_cpu`]).
//! - **In flight** means until the response body ends (or the client leaves), streams included:
//!   the [`Permit`] rides in the body.
//! - **Fairness:** the last tenth of the limit is kept for callers under their fair share. Once
//!   the node is that full, a tenant already holding its share of the rest (the rest divided by
//!   the tenants in flight, the newcomer included) is shed, and one under it is admitted. A tenant
//!   is the caller's account when its key is already in the key cache (a memory lookup), else the
//!   client address: an unknown key earns no share of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_core::load::{AdaptiveLimit, LimitSettings};
use tollgate_core::AccountId;

/// Whom a request is counted against for fairness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tenant {
    Account(AccountId),
    Address(IpAddr),
    Unknown,
}

pub struct Shedder {
    state: Mutex<ShedState>,
}

struct ShedState {
    limit: AdaptiveLimit,
    in_flight: u32,
    per_tenant: HashMap<Tenant, u32>,
}

impl ShedState {
    fn admits(&self, tenant: &Tenant) -> bool {
        let limit = self.limit.limit();
        if self.in_flight >= limit {
            return false;
        }
        let reserve = if limit >= 2 { limit.div_ceil(10) } else { 0 };
        let open = limit - reserve;
        if self.in_flight < open {
            return true;
        }
        let mine = self.per_tenant.get(tenant).copied().unwrap_or(0);
        let tenants = self.per_tenant.len() as u64 + u64::from(mine == 0);
        u64::from(mine) * tenants < u64::from(open)
    }
}

impl Shedder {
    pub fn new(settings: LimitSettings) -> Shedder {
        Shedder {
            state: Mutex::new(ShedState {
                limit: AdaptiveLimit::new(settings),
                in_flight: 0,
                per_tenant: HashMap::new(),
            }),
        }
    }

    /// A permit to serve one request, or `None` when the node sheds it.
    pub fn try_admit(self: &Arc<Self>, tenant: Tenant) -> Option<Permit> {
        let mut state = self.lock();
        if !state.admits(&tenant) {
            return None;
        }
        state.in_flight += 1;
        *state.per_tenant.entry(tenant).or_default() += 1;
        Some(Permit {
            shedder: self.clone(),
            tenant,
            started: Instant::now(),
        })
    }

    /// The current concurrency limit.
    pub fn limit(&self) -> u32 {
        self.lock().limit.limit()
    }

    pub fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    pub fn on_pressure(&self, pressured: bool) {
        self.lock().limit.on_pressure(pressured);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ShedState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One request in flight; released when dropped.
pub struct Permit {
    shedder: Arc<Shedder>,
    tenant: Tenant,
    started: Instant,
}

impl Permit {
    /// Teaches the limit how long this request took to answer.
    pub(crate) fn sample(&self) {
        let mut state = self.shedder.lock();
        let in_flight = state.in_flight;
        state.limit.on_sample(self.started.elapsed(), in_flight);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.shedder.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some(count) = state.per_tenant.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                state.per_tenant.remove(&self.tenant);
            }
        }
    }
}

/// Backs the limit off while the machine's CPU use is above `threshold` (0 to 1), sampled twice a
/// second. Runs until the server stops.
pub async fn watch_cpu(shedder: Arc<Shedder>, threshold: f64) {
    const EVERY: Duration = Duration::from_millis(500);
    let mut system = sysinfo::System::new();
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        system.refresh_cpu_usage();
        let used = f64::from(system.global_cpu_usage()) / 100.0;
        shedder.on_pressure(used > threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(limit: u32) -> Arc<Shedder> {
        Arc::new(Shedder::new(LimitSettings {
            initial: limit,
            min: limit,
            max: limit,
            tolerance: 2.0,
        }))
    }

    fn account(n: u8) -> Tenant {
        Tenant::Address(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn a_full_node_sheds_everyone_and_a_released_permit_makes_room() {
        let shedder = fixed(2);
        let first = shedder.try_admit(account(1));
        let _second = shedder.try_admit(account(2)).unwrap();
        assert!(first.is_some());
        assert!(shedder.try_admit(account(3)).is_none());
        drop(first);
        assert!(shedder.try_admit(account(3)).is_some());
    }

    #[test]
    fn near_the_limit_a_tenant_over_its_share_is_shed_before_one_under_it() {
        let shedder = fixed(10);
        let hog: Vec<_> = (0..9).map(|_| shedder.try_admit(account(1))).collect();
        assert!(hog.iter().all(Option::is_some));
        // The last tenth is kept for tenants under their share: the hog holds all of the rest.
        assert!(shedder.try_admit(account(1)).is_none());
        let newcomer = shedder.try_admit(account(2));
        assert!(newcomer.is_some());
        assert_eq!(shedder.in_flight(), 10);
        assert!(shedder.try_admit(account(3)).is_none());
        drop(hog);
        drop(newcomer);
        assert_eq!(shedder.in_flight(), 0);
        assert!(shedder.lock().per_tenant.is_empty());
    }

    #[test]
    fn with_two_tenants_each_may_fill_its_half_of_the_open_capacity() {
        let shedder = fixed(20);
        // open = 18: below it anyone is admitted.
        let a: Vec<_> = (0..14)
            .filter_map(|_| shedder.try_admit(account(1)))
            .collect();
        let b: Vec<_> = (0..4)
            .filter_map(|_| shedder.try_admit(account(2)))
            .collect();
        assert_eq!((a.len(), b.len()), (14, 4));
        // 18 in flight: the share is 9 each; b (4) is under it, a (14) is over.
        assert!(shedder.try_admit(account(1)).is_none());
        let more_b: Vec<_> = (0..2)
            .filter_map(|_| shedder.try_admit(account(2)))
            .collect();
        assert_eq!(more_b.len(), 2);
        assert!(shedder.try_admit(account(2)).is_none(), "the node is full");
    }
}
