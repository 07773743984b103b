//! Load shedding end to end, on the real clock: a full node answers 429 `overloaded` before any
//! work and charges nothing; a request holds its place until its body ends; a tenant under its
//! share is admitted where one over it is shed; under a load the upstream cannot serve, the
//! limit learns from latency and keeps the upstream's queue short; CPU pressure backs it off.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::{expect_error, spawn_app_with, TestApp};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tollgate_core::{ApiKey, KeyEnv};
use tollgate_server::config::{RawLoadShedding, RawRoute};

const PRICE_NANOS: i64 = 1_000_000; // "0.001"

/// A test upstream with a fixed capacity. `/work` is served by `workers` workers taking
/// `service` each (callers beyond them queue, and each arrival records how many were queued);
/// `/held` answers its head at once and ends its body only when released.
#[derive(Clone)]
struct Upstream {
    url: String,
    workers: usize,
    service: Duration,
    pool: Arc<Semaphore>,
    inside: Arc<AtomicU32>,
    queue_depths: Arc<Mutex<Vec<u32>>>,
    release: watch::Receiver<bool>,
}

impl Upstream {
    async fn start(workers: usize, service: Duration) -> (Upstream, watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (release_tx, release) = watch::channel(false);
        let upstream = Upstream {
            url: format!("http://{}", listener.local_addr().unwrap()),
            workers,
            service,
            pool: Arc::new(Semaphore::new(workers)),
            inside: Arc::new(AtomicU32::new(0)),
            queue_depths: Arc::default(),
            release,
        };
        let router = Router::new()
            .route("/work", get(work))
            .route("/held", get(held))
            .with_state(upstream.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (upstream, release_tx)
    }

    fn route(&self, prefix: &str) -> RawRoute {
        RawRoute {
            prefix: prefix.into(),
            upstream: format!("{}{prefix}", self.url),
            group: "work".into(),
            price: "0.001".into(),
            connect_timeout: "1s".into(),
            timeout: "30s".into(),
            ..RawRoute::default()
        }
    }

    fn mean_queue_depth(&self) -> f64 {
        let depths = self.queue_depths.lock().unwrap();
        depths.iter().map(|&d| f64::from(d)).sum::<f64>() / depths.len().max(1) as f64
    }
}

async fn work(axum::extract::State(upstream): axum::extract::State<Upstream>) -> &'static str {
    let ahead = upstream.inside.fetch_add(1, Ordering::SeqCst);
    let queued = ahead.saturating_sub(upstream.workers as u32);
    upstream.queue_depths.lock().unwrap().push(queued);
    {
        let _worker = upstream.pool.acquire().await.unwrap();
        tokio::time::sleep(upstream.service).await;
    }
    upstream.inside.fetch_sub(1, Ordering::SeqCst);
    "done"
}

async fn held(axum::extract::State(upstream): axum::extract::State<Upstream>) -> Body {
    let mut release = upstream.release.clone();
    Body::from_stream(futures_util::stream::once(async move {
        let _ = release.wait_for(|released| *released).await;
        Ok::<_, Infallible>(Bytes::from_static(b"done"))
    }))
}

fn shedding(initial: u32, min: u32, max: u32) -> RawLoadShedding {
    RawLoadShedding {
        enabled: true,
        initial_limit: initial,
        min_limit: min,
        max_limit: max,
        ..RawLoadShedding::default()
    }
}

async fn available(app: &TestApp, key: &str) -> i64 {
    let balance = app.get_json("/api/v1/billing/balance", key).await;
    balance["available"]["nanos"].as_i64().unwrap()
}

async fn until_idle(app: &TestApp) {
    let shedder = app.state.shedder.as_ref().unwrap();
    for _ in 0..500 {
        if shedder.in_flight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} requests still in flight", shedder.in_flight());
}

#[tokio::test]
async fn a_full_node_sheds_before_any_work_and_admits_a_tenant_under_its_share() {
    let (upstream, release) = Upstream::start(4, Duration::ZERO).await;
    // A fixed limit of 4: the last place is kept for tenants under their share.
    let app = spawn_app_with(|raw, _| {
        raw.rate_limits = Some(Vec::new());
        raw.load_shedding = shedding(4, 4, 4);
        raw.routes.push(upstream.route("/held"));
    })
    .await;
    let a = app.create_account("hog").await;
    let b = app.create_account("modest").await;
    let (a_start, b_start) = (
        available(&app, &a.master_key).await,
        available(&app, &b.master_key).await,
    );

    // Three of A's calls are answered, but their bodies have not ended: they are still in flight.
    let mut a_held = Vec::new();
    for _ in 0..3 {
        let response = app.get_as("/held", &a.master_key).await;
        assert_eq!(response.status(), 200);
        a_held.push(response);
    }
    let shed = app.get_as("/held", &a.master_key).await;
    assert_eq!(shed.headers()["retry-after"], "1");
    assert!(shed.headers().get("x-ratelimit-limit").is_none());
    let body = expect_error(shed, 429, "overloaded").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Nothing was charged"));

    // B holds nothing, so it is under its share and takes the place kept for it.
    let b_held = app.get_as("/held", &b.master_key).await;
    assert_eq!(b_held.status(), 200);

    // Now the node is full: everyone is shed, before the key is even looked up.
    let lookups = app.store.lookups();
    let unknown_key = ApiKey::generate(KeyEnv::Live);
    let shed = app.get_as("/echo/x", unknown_key.expose()).await;
    expect_error(shed, 429, "overloaded").await;
    let shed = app.get_as("/echo/x", &b.master_key).await;
    expect_error(shed, 429, "overloaded").await;
    assert_eq!(
        app.store.lookups(),
        lookups,
        "a shed request reached the store"
    );
    // Health checks are never shed.
    assert_eq!(app.get("/healthz").send().await.unwrap().status(), 200);

    release.send(true).unwrap();
    for response in a_held.into_iter().chain([b_held]) {
        assert_eq!(response.text().await.unwrap(), "done");
    }
    until_idle(&app).await;
    assert_eq!(app.get_as("/echo/x", &a.master_key).await.status(), 200);

    // Charged for the calls served (A: three held and one echo; B: one), nothing for the shed.
    let spent = |start: i64, now: i64| (start - now) / PRICE_NANOS;
    assert_eq!(spent(a_start, available(&app, &a.master_key).await), 4);
    assert_eq!(spent(b_start, available(&app, &b.master_key).await), 1);
}

/// One run of `clients` callers hammering `/work` for `duration`; a shed caller waits 50 ms.
struct LoadRun {
    admitted: Vec<u32>,
    shed: u32,
    other: Vec<u16>,
    latencies: Vec<Duration>,
}

async fn hammer(
    app: &Arc<TestApp>,
    keys: &[String],
    clients: usize,
    duration: Duration,
) -> LoadRun {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let app = app.clone();
            let account = client % keys.len();
            let key = keys[account].clone();
            tokio::spawn(async move {
                let (mut admitted, mut shed, mut other, mut latencies) =
                    (0, 0, Vec::new(), Vec::new());
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let response = app.get_as("/work", &key).await;
                    let status = response.status().as_u16();
                    let code = response.headers().get("x-tollgate-error").cloned();
                    let _ = response.bytes().await;
                    match (status, code) {
                        (200, None) => {
                            admitted += 1;
                            latencies.push(started.elapsed());
                        }
                        (429, Some(code)) if code == "overloaded" => {
                            shed += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        _ => other.push(status),
                    }
                }
                (account, admitted, shed, other, latencies)
            })
        })
        .collect();
    let mut run = LoadRun {
        admitted: vec![0; keys.len()],
        shed: 0,
        other: Vec::new(),
        latencies: Vec::new(),
    };
    for task in tasks {
        let (account, admitted, shed, other, latencies) = task.await.unwrap();
        run.admitted[account] += admitted;
        run.shed += shed;
        run.other.extend(other);
        run.latencies.extend(latencies);
    }
    run.latencies.sort();
    run
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_load_the_upstream_cannot_serve_the_limit_learns_and_the_queue_stays_short() {
    const CLIENTS: usize = 48;
    const INITIAL: u32 = 40;
    let mut queue_depths = Vec::new();
    for enabled in [false, true] {
        // Four workers at 20 ms: 200 calls a second; 48 clients want far more.
        let (upstream, _release) = Upstream::start(4, Duration::from_millis(20)).await;
        let app = Arc::new(
            spawn_app_with(|raw, _| {
                raw.rate_limits = Some(Vec::new());
                raw.billing.starter_credits = "100".into();
                raw.load_shedding = RawLoadShedding {
                    enabled,
                    ..shedding(INITIAL, 2, 100)
                };
                raw.routes.push(upstream.route("/work"));
            })
            .await,
        );
        let mut keys = Vec::new();
        let mut starts = Vec::new();
        for name in ["a", "b", "c"] {
            let account = app.create_account(name).await;
            starts.push(available(&app, &account.master_key).await);
            keys.push(account.master_key);
        }
        let run = hammer(&app, &keys, CLIENTS, Duration::from_secs(2)).await;
        until_idle_or_off(&app).await;
        println!(
            "shedding {enabled}: admitted {:?}, shed {}, p50 {:?}, p99 {:?}, mean upstream queue {:.1}, limit {:?}",
            run.admitted,
            run.shed,
            percentile(&run.latencies, 0.5),
            percentile(&run.latencies, 0.99),
            upstream.mean_queue_depth(),
            app.state.shedder.as_ref().map(|s| s.limit()),
        );
        assert!(
            run.other.is_empty(),
            "unexpected statuses {:?}",
            &run.other[..run.other.len().min(10)]
        );
        assert!(run.admitted.iter().all(|&n| n > 0), "{:?}", run.admitted);
        // Exactly the admitted calls were charged; a shed call cost nothing.
        for ((key, start), admitted) in keys.iter().zip(&starts).zip(&run.admitted) {
            let spent = start - available(&app, key).await;
            assert_eq!(spent, i64::from(*admitted) * PRICE_NANOS);
        }
        if enabled {
            assert!(run.shed > 0, "nothing was shed");
            let limit = app.state.shedder.as_ref().unwrap().limit();
            assert!(limit < INITIAL, "the limit did not learn: {limit}");
        } else {
            assert_eq!(run.shed, 0);
        }
        queue_depths.push(upstream.mean_queue_depth());
    }
    // Shedding keeps the upstream's queue, and so the admitted calls' latency, far shorter.
    assert!(
        queue_depths[1] * 2.0 < queue_depths[0],
        "queue depth without {:.1}, with {:.1}",
        queue_depths[0],
        queue_depths[1]
    );
}

async fn until_idle_or_off(app: &TestApp) {
    if app.state.shedder.is_some() {
        until_idle(app).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_pressure_backs_the_limit_off() {
    let app = spawn_app_with(|raw, _| {
        raw.load_shedding = RawLoadShedding {
            cpu_threshold: Some(0.2),
            ..shedding(100, 1, 100)
        };
    })
    .await;
    let shedder = app.state.shedder.clone().unwrap();
    // With no traffic, only CPU pressure can move the limit below where it started. The reading is
    // machine-wide, so other tests running beside this one may already have pushed it down: the
    // test asks only that it falls, not when.
    // Keep every core busy until the limit has backed off (at most ten seconds).
    let spinning = Arc::new(AtomicBool::new(true));
    let spinners: Vec<_> = (0..std::thread::available_parallelism().map_or(2, |n| n.get()))
        .map(|_| {
            let spinning = spinning.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while spinning.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    let started = Instant::now();
    while shedder.limit() >= 100 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    spinning.store(false, Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().unwrap();
    }
    assert!(shedder.limit() < 100, "the limit ignored CPU pressure");
}
