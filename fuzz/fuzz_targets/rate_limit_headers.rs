//! GCRA decisions and the rate-limit headers built from them: any policies, costs and clock
//! steps never panic (no overflow), a refusal never moves the state, and every response gets
//! all five headers.
#![no_main]

use arbitrary::Arbitrary;
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::ratelimit::{FailureMode, Policy, Scope, Standing, Tat, Unit};
use tollgate_server::access::limits::LimitHeaders;

#[derive(Debug, Arbitrary)]
struct RawPolicy {
    limit: u64,
    window_ms: u64,
    burst: u64,
}

#[derive(Debug, Arbitrary)]
struct Input {
    policies: Vec<RawPolicy>,
    /// Each request: how far the clock moves first (ms), and its cost.
    requests: Vec<(u32, u64)>,
    start_s: u32,
}

fuzz_target!(|input: Input| {
    let policies: Vec<Arc<Policy>> = input
        .policies
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, p)| {
            Arc::new(Policy {
                name: format!("policy-{i}"),
                scope: Scope::Key,
                unit: Unit::Requests,
                limit: p.limit.max(1),
                window: Duration::from_millis(p.window_ms.clamp(1, 366 * 86_400_000)),
                burst: p.burst,
                on_limiter_failure: FailureMode::Open,
            })
        })
        .collect();
    if policies.is_empty() {
        return;
    }
    let mut tats: Vec<Option<Tat>> = vec![None; policies.len()];
    let mut now = Duration::from_secs(u64::from(input.start_s));
    for (step_ms, cost) in input.requests.iter().take(64) {
        now += Duration::from_millis(u64::from(*step_ms));
        let standings: Vec<Standing> = policies
            .iter()
            .zip(&mut tats)
            .map(|(policy, tat)| {
                let (standing, next) = policy.decide(*tat, now, *cost);
                if standing.admitted {
                    *tat = next;
                } else {
                    assert!(next.is_none(), "a refusal stores no state");
                }
                standing
            })
            .collect();
        let headers = LimitHeaders {
            policies: policies.iter().cloned().zip(standings).collect(),
            now,
        };
        let mut map = HeaderMap::new();
        headers.apply(&mut map);
        for name in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "ratelimit-policy",
            "ratelimit",
        ] {
            assert!(map.contains_key(name), "{name} missing");
        }
    }
});
