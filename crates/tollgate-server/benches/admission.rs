//! The per-request admission pieces added by rate limiting and load shedding, each against a
//! baseline measured in the same run:
//!
//! - one all-or-nothing GCRA decision over three policies, against one over a single policy;
//! - a load-shedding permit (admit and release), against two uncontended mutex locks and
//!   unlocks (the floor for any shared count taken and given back);
//! - an idempotency fingerprint of a 1 KiB body.
//!
//! `cargo bench -p tollgate-server --bench admission`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate_core::load::LimitSettings;
use tollgate_core::ratelimit::{Policy, Scope, Unit};
use tollgate_core::SystemClock;
use tollgate_server::access::limits::{Demand, Limiter, LocalLimiter};
use tollgate_server::access::shed::{Shedder, Tenant};

fn policy(name: &str, scope: Scope, limit: u64) -> Arc<Policy> {
    Arc::new(Policy {
        name: name.into(),
        scope,
        unit: Unit::Requests,
        // Generous enough that every decision in the bench is an admission.
        limit,
        window: Duration::from_secs(1),
        burst: limit,
        on_limiter_failure: Default::default(),
    })
}

fn gcra(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let limiter = LocalLimiter::new(Arc::new(SystemClock));
    let one = [Demand::new(
        policy("per-key", Scope::Key, u64::MAX / 4),
        "key:k",
        1,
    )];
    let three = [
        Demand::new(policy("per-key", Scope::Key, u64::MAX / 4), "key:k", 1),
        Demand::new(
            policy("per-account", Scope::Account, u64::MAX / 4),
            "acct:a",
            1,
        ),
        Demand::new(
            policy("per-route", Scope::Route, u64::MAX / 4),
            "route:/v1",
            1,
        ),
    ];
    let mut group = c.benchmark_group("gcra");
    group.bench_function("one policy", |b| {
        b.iter(|| runtime.block_on(limiter.acquire(black_box(&one))).unwrap())
    });
    group.bench_function("three policies", |b| {
        b.iter(|| {
            runtime
                .block_on(limiter.acquire(black_box(&three)))
                .unwrap()
        })
    });
    group.finish();
}

fn shedding(c: &mut Criterion) {
    let shedder = Arc::new(Shedder::new(LimitSettings {
        initial: 1000,
        min: 1000,
        max: 1000,
        tolerance: 2.0,
    }));
    let tenant = Tenant::Address([127, 0, 0, 1].into());
    let floor = Mutex::new(0u64);
    let mut group = c.benchmark_group("shed");
    group.bench_function("mutex floor", |b| {
        b.iter(|| {
            *floor.lock().unwrap() += 1;
            *floor.lock().unwrap() -= 1;
        })
    });
    group.bench_function("permit", |b| {
        b.iter(|| drop(black_box(shedder.try_admit(tenant))))
    });
    group.finish();
}

fn fingerprint(c: &mut Criterion) {
    use sha2::{Digest, Sha256};
    let body = vec![b'x'; 1024];
    c.bench_function("idempotency fingerprint 1 KiB", |b| {
        b.iter(|| {
            let mut hash = Sha256::new();
            hash.update(b"POST /v1/chat/completions\n");
            hash.update(Sha256::digest(black_box(&body)));
            hash.finalize()
        })
    });
}

criterion_group!(benches, gcra, shedding, fingerprint);
criterion_main!(benches);
