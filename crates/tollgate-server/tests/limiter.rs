//! The limiter conformance suite: what every `Limiter` backend must do, written once and run per
//! backend by `limiter_suite!`. A backend supplies the limiter and a way to let time pass (a
//! manual clock here; a backend on a server's clock sleeps). Subjects are unique per test, so a
//! shared backend may run the suite in parallel. The Redis run skips without a server, and fails
//! under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::ratelimit::{Policy, Scope, Unit};
use tollgate_core::{Clock, ManualClock, SystemClock};
use tollgate_server::access::limits::{Demand, Limiter, LocalLimiter};
use tollgate_server::access::redis_limiter::RedisLimiter;

type Pass = Box<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub struct Rig {
    limiter: Arc<dyn Limiter>,
    /// Lets this much time pass for the limiter.
    pass: Pass,
}

fn demand(limit: u64, window: Duration, burst: u64, cost: u64) -> Demand {
    Demand::new(
        Arc::new(Policy {
            name: format!("p{limit}-{burst}"),
            scope: Scope::Key,
            unit: Unit::Requests,
            limit,
            window,
            burst,
            on_limiter_failure: Default::default(),
        }),
        &format!("key:{}", tollgate_core::KeyId::new()),
        cost,
    )
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

pub async fn a_burst_then_the_steady_pace(rig: Rig) {
    // 60 a minute, burst 2: three at once, then one a second.
    let d = [demand(60, MINUTE, 2, 1)];
    for _ in 0..3 {
        assert!(rig.limiter.acquire(&d).await.unwrap().admitted);
    }
    let refused = rig.limiter.acquire(&d).await.unwrap();
    assert!(!refused.admitted);
    let wait = refused.standings[0].retry_after;
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    (rig.pass)(wait).await;
    assert!(rig.limiter.acquire(&d).await.unwrap().admitted);
}

pub async fn a_refusal_by_one_policy_consumes_none_of_the_others(rig: Rig) {
    let roomy = demand(100, HOUR, 9, 1);
    let tight = demand(1, HOUR, 0, 1);
    let both = [roomy.clone(), tight.clone()];
    assert!(rig.limiter.acquire(&both).await.unwrap().admitted);
    let before = rig
        .limiter
        .peek(std::slice::from_ref(&roomy))
        .await
        .unwrap()[0]
        .remaining;
    for _ in 0..5 {
        let verdict = rig.limiter.acquire(&both).await.unwrap();
        assert!(!verdict.admitted);
        assert!(verdict.standings[0].admitted && !verdict.standings[1].admitted);
        assert_eq!(
            verdict.standings[0].remaining, 9,
            "shown as it is, not as if consumed"
        );
    }
    let after = rig.limiter.peek(&[roomy]).await.unwrap()[0].remaining;
    assert_eq!(before, after);
    assert_eq!(before, 9);
}

pub async fn peeking_consumes_nothing(rig: Rig) {
    let d = [demand(10, HOUR, 4, 1)];
    for _ in 0..3 {
        let standing = rig.limiter.peek(&d).await.unwrap()[0];
        assert!(standing.admitted);
        assert_eq!(standing.remaining, 5);
    }
    rig.limiter.acquire(&d).await.unwrap();
    assert_eq!(rig.limiter.peek(&d).await.unwrap()[0].remaining, 4);
}

pub async fn corrections_return_and_take_units(rig: Rig) {
    // 1000 tokens an hour, all at once: reserve 800, use 100.
    let reserve = demand(1_000, HOUR, 999, 800);
    assert!(
        rig.limiter
            .acquire(std::slice::from_ref(&reserve))
            .await
            .unwrap()
            .admitted
    );
    // The same subject and policy, asking for 500.
    let mut more = reserve.clone();
    more.cost = 500;
    assert!(
        !rig.limiter
            .acquire(std::slice::from_ref(&more))
            .await
            .unwrap()
            .admitted
    );
    rig.limiter
        .adjust(&[(reserve.clone(), -700)])
        .await
        .unwrap();
    assert!(rig.limiter.acquire(&[more]).await.unwrap().admitted);
    assert_eq!(
        rig.limiter
            .peek(std::slice::from_ref(&reserve))
            .await
            .unwrap()[0]
            .remaining,
        400
    );
    rig.limiter.adjust(&[(reserve.clone(), 400)]).await.unwrap();
    assert_eq!(rig.limiter.peek(&[reserve]).await.unwrap()[0].remaining, 0);
}

pub async fn subjects_do_not_share_capacity(rig: Rig) {
    let a = demand(1, HOUR, 0, 1);
    let b = Demand::new(
        a.policy.clone(),
        &format!("key:{}", tollgate_core::KeyId::new()),
        1,
    );
    assert!(
        rig.limiter
            .acquire(std::slice::from_ref(&a))
            .await
            .unwrap()
            .admitted
    );
    assert!(!rig.limiter.acquire(&[a]).await.unwrap().admitted);
    assert!(rig.limiter.acquire(&[b]).await.unwrap().admitted);
}

pub async fn concurrent_callers_get_exactly_the_capacity(rig: Rig) {
    // 10 an hour with burst 9: ten at once, then nothing for six minutes.
    let d = demand(10, HOUR, 9, 1);
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let (limiter, d) = (rig.limiter.clone(), d.clone());
            tokio::spawn(async move { limiter.acquire(&[d]).await.unwrap().admitted })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap());
    }
    assert_eq!(admitted, 10);
}

/// Runs every conformance test against one backend: `limiter_suite!(module, async_rig)`.
macro_rules! limiter_suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            limiter_suite!(@tests $make;
                a_burst_then_the_steady_pace,
                a_refusal_by_one_policy_consumes_none_of_the_others,
                peeking_consumes_nothing,
                corrections_return_and_take_units,
                subjects_do_not_share_capacity,
                concurrent_callers_get_exactly_the_capacity,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                // `None`: the backend's server is not running here (never under CI).
                let Some(rig) = $make.await else {
                    return;
                };
                super::$test(rig).await;
            }
        )*
    };
}

/// The in-process limiter on a manual clock: time passes when the test says so.
async fn local() -> Option<Rig> {
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let limiter = Arc::new(LocalLimiter::new(clock.clone()));
    Some(Rig {
        limiter,
        pass: Box::new(move |by| {
            clock.advance(chrono::Duration::from_std(by).unwrap());
            Box::pin(async {})
        }),
    })
}

/// The test Redis: `TOLLGATE_TEST_REDIS_URL`, else the local one.
fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Redis limiter, on the Redis server's clock: time passes by sleeping.
async fn redis() -> Option<Rig> {
    let url = redis_url();
    let reachable = async {
        let client = redis::Client::open(url.as_str()).ok()?;
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .ok()
    };
    if reachable.await.is_none() {
        let message = format!("Redis is not reachable at {url}");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("SKIPPED (Redis limiter suite): {message}");
        return None;
    }
    Some(Rig {
        limiter: Arc::new(RedisLimiter::new(&url).unwrap()),
        pass: Box::new(|by| Box::pin(tokio::time::sleep(by))),
    })
}

limiter_suite!(local_limiter, local());
limiter_suite!(redis_limiter, redis());
