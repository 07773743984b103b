//! The ledger service over a real SQLite store: random concurrent histories keep the books
//! balanced, and a restart recovers pending holds as the rules say.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::Utc;
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::ledger::{HoldStatus, Resolve};
use tollgate_core::{AccountId, ApiKey, Clock, KeyEnv, KeyKind, ManualClock, Nanos, SystemClock};
use tollgate_server::billing::ledger::{HoldRefused, HoldSpec, Ledger};
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::{HoldSource, KeyRecord, NewKey, Store};

async fn store_with_accounts(dir: &std::path::Path, n: usize) -> (Arc<dyn Store>, Vec<KeyRecord>) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("t.db")).await.unwrap());
    let mut keys = Vec::new();
    for _ in 0..n {
        let account = AccountId::new();
        let (_, key): (ApiKey, KeyRecord) = KeyRecord::issue(
            KeyEnv::Live,
            NewKey::new(account, KeyKind::Master, "m"),
            Utc::now(),
        );
        store
            .create_account(account, "a", Nanos(1_000), key.clone(), Utc::now())
            .await
            .unwrap();
        keys.push(key);
    }
    (store, keys)
}

fn spec(key: &KeyRecord, amount: i64, cap: Option<i64>, source: HoldSource) -> HoldSpec {
    HoldSpec {
        account: key.account_id,
        key: Some(key.id),
        key_cap: cap.map(Nanos),
        account_debt: Nanos::ZERO,
        amount: Nanos(amount),
        ttl: Duration::from_secs(30),
        source,
        request_id: None,
        metadata: serde_json::json!({}),
    }
}

/// After everything is committed: every ledger account sums to zero, each wallet's cached
/// balances equal the book's and the ledger's, and nothing is below zero.
async fn assert_consistent(store: &dyn Store, ledger: &Ledger, keys: &[KeyRecord]) {
    ledger.flush().await.unwrap();
    let trial = store.trial_balance().await.unwrap();
    assert_eq!(trial.iter().map(|(_, n)| n).sum::<i64>(), 0, "{trial:?}");
    for key in keys {
        let wallet = store.wallet(key.account_id).await.unwrap().unwrap();
        assert!(wallet.available.0 >= 0 && wallet.held.0 >= 0);
        assert_eq!(
            store.ledger_balance(key.account_id).await.unwrap(),
            wallet.available
        );
        let holds_account = format!("holds:{}", key.account_id);
        let held = trial
            .iter()
            .find(|(a, _)| *a == holds_account)
            .map_or(0, |(_, n)| *n);
        assert_eq!(held, wallet.held.0);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Grant(usize, i64),
    Hold(usize, i64, Option<i64>),
    Settle(usize, i64),
    Release(usize),
    Expire(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, 1..500i64).prop_map(|(a, n)| Op::Grant(a, n)),
        (0..3usize, 0..400i64, proptest::option::of(0..1_000i64))
            .prop_map(|(a, n, c)| Op::Hold(a, n, c)),
        (0..40usize, 0..500i64).prop_map(|(h, c)| Op::Settle(h, c)),
        (0..40usize).prop_map(Op::Release),
        (1..60i64).prop_map(Op::Expire),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random histories, run as four concurrent streams of operations against one ledger.
    #[test]
    fn concurrent_histories_keep_the_books(streams in proptest::collection::vec(
        proptest::collection::vec(op(), 1..40), 4)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let (store, keys) = store_with_accounts(dir.path(), 3).await;
            let clock = Arc::new(ManualClock::new(SystemClock.now()));
            let ledger = Ledger::start(store.clone(), clock.clone());
            let opened = Arc::new(std::sync::Mutex::new(Vec::new()));
            let tasks = streams.into_iter().map(|ops| {
                let (ledger, keys, clock, opened, store) =
                    (ledger.clone(), keys.clone(), clock.clone(), opened.clone(), store.clone());
                tokio::spawn(async move {
                    for op in ops {
                        let pick = |i: usize| opened.lock().unwrap().get(i).copied();
                        match op {
                            Op::Grant(a, n) => {
                                ledger.grant(keys[a].account_id, Nanos(n), "test", "", false).await.unwrap();
                            }
                            Op::Hold(a, n, cap) => {
                                match ledger.open(spec(&keys[a], n, cap, HoldSource::Api)).await {
                                    Ok(hold) => opened.lock().unwrap().push(hold.id),
                                    Err(HoldRefused::Store(e)) => panic!("{e}"),
                                    Err(_) => {}
                                }
                            }
                            Op::Settle(i, cost) => {
                                if let Some(id) = pick(i) {
                                    let record = store.hold(id).await.unwrap().unwrap();
                                    ledger.resolve_durably(&record, Resolve::Settle(Nanos(cost))).await.unwrap();
                                }
                            }
                            Op::Release(i) => {
                                if let Some(id) = pick(i) {
                                    ledger.resolve(id, Resolve::Release);
                                }
                            }
                            Op::Expire(s) => {
                                clock.advance(chrono::Duration::seconds(s));
                                ledger.expire_due();
                            }
                        }
                        tokio::task::yield_now().await;
                    }
                })
            });
            for task in futures_util::future::join_all(tasks).await {
                task.unwrap();
            }
            assert_consistent(&*store, &ledger, &keys).await;
            // Every hold resolved at most once: its stored state matches the book's rules.
            let ids: Vec<_> = opened.lock().unwrap().clone();
            for id in ids {
                let record = store.hold(id).await.unwrap().unwrap();
                assert!(record.hold.charged <= record.hold.amount);
                if record.hold.status != HoldStatus::Settled {
                    assert_eq!(record.hold.charged, Nanos::ZERO);
                }
            }
        });
    }
}

#[tokio::test]
async fn a_restart_expires_request_holds_and_keeps_billing_api_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (store, keys) = store_with_accounts(dir.path(), 1).await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let first = Ledger::start(store.clone(), clock.clone());
    first
        .open(spec(&keys[0], 300, None, HoldSource::Request))
        .await
        .unwrap();
    let job = first
        .open(spec(&keys[0], 200, None, HoldSource::Api))
        .await
        .unwrap();
    first.flush().await.unwrap();
    drop(first); // the process dies with both holds pending

    let second = Ledger::start(store.clone(), clock);
    assert_eq!(
        second.recover().await.unwrap(),
        1,
        "the request's hold is expired"
    );
    assert_eq!(
        second.pending_holds(),
        1,
        "the job's hold lives on until its TTL"
    );
    second.flush().await.unwrap();
    let wallet = store.wallet(keys[0].account_id).await.unwrap().unwrap();
    assert_eq!((wallet.available, wallet.held), (Nanos(800), Nanos(200)));
    // The restored hold still counts against its key's cap of 250.
    assert!(matches!(
        second
            .open(spec(&keys[0], 100, Some(250), HoldSource::Api))
            .await,
        Err(HoldRefused::KeyCapReached { .. })
    ));
    let record = store.hold(job.id).await.unwrap().unwrap();
    let settled = second
        .resolve_durably(&record, Resolve::Settle(Nanos(150)))
        .await
        .unwrap();
    assert_eq!(settled.charged, Nanos(150));
    assert_consistent(&*store, &second, &keys).await;
}

fn usage_row(key: &KeyRecord, request_id: tollgate_core::RequestId) -> tollgate_store::UsageRow {
    tollgate_store::UsageRow {
        request_id,
        client_request_id: None,
        account_id: key.account_id,
        key_id: key.id,
        route: "/v1".into(),
        model: None,
        method: "POST".into(),
        path: "/v1/x".into(),
        status: 200,
        upstream_status: Some(200),
        units: None,
        tokens: None,
        cost: Nanos::ZERO,
        hold: Nanos::ZERO,
        uncovered: Nanos::ZERO,
        hold_id: None,
        billing_status: tollgate_core::ledger::BillingStatus::Settled,
        latency_ms: 1,
        error_code: None,
        error_message: None,
        replay_of: None,
        created_at: Utc::now(),
        completed_at: Utc::now(),
    }
}

/// A batch with one write the store refuses (a usage row whose request ID is taken) stores every
/// other write, drops the refused one with its charge (a charge and its row stand or fall
/// together), and corrects the book, so book and store agree to the nano.
#[tokio::test]
async fn a_refused_write_is_isolated_and_the_book_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let (store, keys) = store_with_accounts(dir.path(), 1).await;
    let ledger = Ledger::start(store.clone(), Arc::new(SystemClock));
    let key = &keys[0];
    let taken = tollgate_core::RequestId::new();
    // Each call is queued before the writer can take the one before: one batch (or a few).
    let mut holds = Vec::new();
    for _ in 0..3 {
        holds.push(
            ledger
                .open(spec(key, 100, None, HoldSource::Request))
                .await
                .unwrap(),
        );
    }
    for (hold, (cost, request_id)) in holds.iter().zip([
        (60, taken),
        (50, taken),
        (40, tollgate_core::RequestId::new()),
    ]) {
        ledger.finish_request(Some((hold.id, Resolve::Settle(Nanos(cost)))), |_| {
            Some(usage_row(key, request_id))
        });
    }
    ledger.flush().await.unwrap();
    // The first and third are charged; the second's charge was refused with its row, so its
    // hold is still pending in the store.
    let wallet = store.wallet(key.account_id).await.unwrap().unwrap();
    assert_eq!(wallet.available, Nanos(1_000 - 60 - 100 - 40));
    assert_eq!(wallet.held, Nanos(100));
    let pending = store.pending_holds().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].hold.id, holds[1].id);
    // The book agrees: exactly what the store says is available can be held, and no more.
    let refused = ledger.open(spec(key, 801, None, HoldSource::Request)).await;
    assert!(
        matches!(
            refused,
            Err(HoldRefused::InsufficientBalance {
                available: Nanos(800),
                ..
            })
        ),
        "{refused:?}"
    );
    ledger
        .open(spec(key, 800, None, HoldSource::Request))
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    let trial = store.trial_balance().await.unwrap();
    assert_eq!(trial.iter().map(|(_, n)| n).sum::<i64>(), 0, "{trial:?}");
}

/// A data-plane request with a hold of 300 open on a wallet of 1 000, as the proxy leaves it.
async fn request_in_flight(
    dir: &std::path::Path,
) -> (
    Arc<dyn Store>,
    Arc<Ledger>,
    KeyRecord,
    tollgate_core::ledger::Hold,
    tollgate_server::billing::meter::Billing,
) {
    let (store, keys) = store_with_accounts(dir, 1).await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ledger = Ledger::start(store.clone(), clock.clone());
    let key = keys[0].clone();
    let hold = ledger
        .open(spec(&key, 300, None, HoldSource::Request))
        .await
        .unwrap();
    let row = usage_row(&key, tollgate_core::RequestId::new());
    let mut billing =
        tollgate_server::billing::meter::Billing::new(ledger.clone(), clock, row, true);
    billing.set_hold(hold.clone());
    (store, ledger, key, hold, billing)
}

/// Whatever panics on a request's path after its hold is opened (the catch-panic layer turns it
/// into a 500) unwinds through the request's billing, which releases the hold: a panic is a
/// failure, and a failure is never charged.
#[tokio::test]
async fn a_panic_after_the_hold_is_opened_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, key, hold, billing) = request_in_flight(dir.path()).await;
    let request = tokio::spawn(async move {
        let _billing = billing;
        panic!("a bug on the request path");
    });
    assert!(request.await.unwrap_err().is_panic());
    ledger.flush().await.unwrap();
    let stored = store.hold(hold.id).await.unwrap().unwrap();
    assert_eq!(stored.hold.status, HoldStatus::Released);
    let wallet = store.wallet(key.account_id).await.unwrap().unwrap();
    assert_eq!((wallet.available, wallet.held), (Nanos(1_000), Nanos(0)));
}

/// Only its request resolves a data-plane hold. Should anything else ever resolve it first, the
/// request's usage row tells what the hold became, never "settled" at a price it did not charge.
#[tokio::test]
async fn a_request_whose_hold_something_else_resolved_never_reads_settled_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ledger, key, hold, billing) = request_in_flight(dir.path()).await;
    ledger.resolve(hold.id, Resolve::Release).unwrap();
    billing.finish(tollgate_server::billing::meter::Outcome {
        status: 200,
        upstream_status: Some(200),
        charge: Some((Nanos(120), tollgate_core::ledger::BillingStatus::Settled)),
        tokens: None,
        units: None,
        error_code: None,
        error_message: None,
    });
    ledger.flush().await.unwrap();
    let rows = store
        .requests(&tollgate_store::UsageFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let row = &rows[0];
    assert_eq!(
        row.billing_status,
        tollgate_core::ledger::BillingStatus::Released
    );
    assert_eq!(row.cost, Nanos::ZERO);
    let wallet = store.wallet(key.account_id).await.unwrap().unwrap();
    assert_eq!(wallet.available, Nanos(1_000));
}

/// How many batches the ledger has committed to the SQLite file in `dir`.
async fn batches_committed(dir: &std::path::Path) -> i64 {
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let count = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_batches")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    count
}

/// Ten data-plane holds opened a millisecond apart: how many commits they took, with this
/// window for small batches to gather in.
async fn commits_for_ten_holds(gather: Duration) -> i64 {
    let dir = tempfile::tempdir().unwrap();
    let (store, keys) = store_with_accounts(dir.path(), 1).await;
    let ledger = Ledger::start_gathering(store.clone(), Arc::new(SystemClock), gather);
    // Loads the wallet, so the opens below touch only memory.
    ledger
        .open(spec(&keys[0], 1, None, HoldSource::Request))
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    let before = batches_committed(dir.path()).await;
    for _ in 0..10 {
        ledger
            .open(spec(&keys[0], 1, None, HoldSource::Request))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let flushed = std::time::Instant::now();
    ledger.flush().await.unwrap();
    assert!(
        flushed.elapsed() < Duration::from_secs(5),
        "a flush is committed at once, whatever the window"
    );
    batches_committed(dir.path()).await - before
}

/// A batch nobody waits for gathers what is queued within its window, so a steady trickle of
/// requests shares commits; a flush ends the window at once.
#[tokio::test]
async fn small_batches_nobody_waits_for_gather_into_one_commit() {
    assert_eq!(commits_for_ten_holds(Duration::from_secs(60)).await, 1);
    // Without one, the writer commits what it has as soon as it has it.
    let alone = commits_for_ten_holds(Duration::ZERO).await;
    assert!(alone > 1, "without a window: {alone} commit");
}

#[tokio::test]
async fn billing_api_holds_are_read_from_memory_within_a_budget_until_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let (store, keys) = store_with_accounts(dir.path(), 1).await;
    let ledger = Ledger::start(store.clone(), Arc::new(SystemClock));
    let small = ledger
        .open(spec(&keys[0], 100, None, HoldSource::Api))
        .await
        .unwrap();
    // A record past the node's budget for them (16 MiB) is read from the store instead.
    let mut big = spec(&keys[0], 100, None, HoldSource::Api);
    big.metadata = serde_json::json!({"blob": "x".repeat(17 << 20)});
    let big = ledger.open(big).await.unwrap();
    // A data-plane hold is never a billing-API record.
    let request = ledger
        .open(spec(&keys[0], 100, None, HoldSource::Request))
        .await
        .unwrap();
    let kept = ledger.api_hold(small.id).expect("kept in memory");
    assert_eq!(kept.hold, small);
    assert_eq!(kept.metadata, serde_json::json!({}));
    assert_eq!(kept.source, HoldSource::Api);
    assert!(ledger.api_hold(big.id).is_none());
    assert!(store.hold(big.id).await.unwrap().is_some());
    assert!(ledger.api_hold(request.id).is_none());
    // Resolved in the book: read with the book's state until the resolution is stored.
    let record = store.hold(small.id).await.unwrap().unwrap();
    let settled = ledger
        .resolve_durably(&record, Resolve::Settle(Nanos(40)))
        .await
        .unwrap();
    assert_eq!(settled.charged, Nanos(40));
    assert!(ledger.api_hold(small.id).is_none(), "let go once stored");
    let stored = store.hold(small.id).await.unwrap().unwrap();
    assert_eq!(stored.hold, settled);
    ledger.resolve(request.id, Resolve::Release);
    let record = store.hold(big.id).await.unwrap().unwrap();
    ledger
        .resolve_durably(&record, Resolve::Release)
        .await
        .unwrap();
    assert_consistent(&*store, &ledger, &keys).await;
}
