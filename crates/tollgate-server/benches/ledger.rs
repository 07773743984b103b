//! Hold + settle throughput on SQLite: the ledger service (decisions in memory, writes
//! group-committed) against the baseline of one transaction per hold and per settle.
//!
//! `cargo bench -p tollgate-server --bench ledger`. Each iteration runs `PAIRS` hold + settle
//! pairs and waits until they are durable, so both sides pay for the same writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::ledger::{Book, HoldRequest, Resolve};
use tollgate_core::{AccountId, HoldId, KeyEnv, KeyKind, Nanos, SystemClock};
use tollgate_server::billing::ledger::{HoldSpec, Ledger};
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::{BatchId, HoldRecord, HoldSource, KeyRecord, LedgerWrite, NewKey, Store};

const PAIRS: u64 = 1_000;

async fn store_with_account(dir: &std::path::Path) -> (Arc<dyn Store>, KeyRecord) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("b.db")).await.unwrap());
    let account = AccountId::new();
    let (_, key) = KeyRecord::issue(
        KeyEnv::Live,
        NewKey::new(account, KeyKind::Master, "m"),
        Utc::now(),
    );
    store
        .create_account(
            account,
            "bench",
            Nanos(i64::MAX / 4),
            key.clone(),
            Utc::now(),
        )
        .await
        .unwrap();
    (store, key)
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (store, key) = runtime.block_on(store_with_account(dir.path()));
    let ledger = runtime.block_on(async { Ledger::start(store.clone(), Arc::new(SystemClock)) });

    let mut group = c.benchmark_group("hold_settle_sqlite");
    group.throughput(Throughput::Elements(PAIRS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));

    group.bench_function("ledger_group_commit", |b| {
        b.to_async(&runtime).iter(|| async {
            // Like the proxy: many requests in flight at once, each holding then settling.
            let tasks = (0..PAIRS).map(|_| {
                let ledger = ledger.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let hold = ledger
                        .open(HoldSpec {
                            account: key.account_id,
                            key: Some(key.id),
                            key_cap: None,
                            account_debt: Nanos::ZERO,
                            amount: Nanos(1_000),
                            ttl: Duration::from_secs(60),
                            source: HoldSource::Request,
                            request_id: None,
                            metadata: serde_json::json!({}),
                        })
                        .await
                        .unwrap();
                    ledger.resolve(hold.id, Resolve::Settle(Nanos(600)));
                })
            });
            for task in futures_util::future::join_all(tasks).await {
                task.unwrap();
            }
            ledger.flush().await.unwrap();
        })
    });

    // Baseline: the same decisions, each write committed in its own transaction.
    let book = std::sync::Mutex::new(Book::new());
    runtime.block_on(async {
        let wallet = store.wallet(key.account_id).await.unwrap().unwrap();
        let mut book = book.lock().unwrap();
        book.load_wallet(key.account_id, wallet);
        book.load_key_spend(key.id, Utc::now(), Nanos::ZERO);
    });
    group.bench_function("transaction_per_write", |b| {
        b.to_async(&runtime).iter(|| async {
            for _ in 0..PAIRS {
                let now = Utc::now();
                let (hold, transfer) = book
                    .lock()
                    .unwrap()
                    .open(HoldRequest {
                        id: HoldId::new(),
                        account: key.account_id,
                        key: Some(key.id),
                        amount: Nanos(1_000),
                        key_cap: None,
                        at: now,
                        expires_at: now + chrono::Duration::seconds(60),
                        reference: None,
                    })
                    .unwrap();
                let id = hold.id;
                let open = LedgerWrite::OpenHold {
                    record: HoldRecord {
                        hold,
                        source: HoldSource::Request,
                        request_id: None,
                        metadata: serde_json::json!({}),
                    },
                    transfer,
                    key_cap: None,
                };
                store.commit(BatchId::new(), &[open]).await.unwrap();
                let resolution = book
                    .lock()
                    .unwrap()
                    .resolve(id, Resolve::Settle(Nanos(600)), now)
                    .unwrap();
                let settle = LedgerWrite::ResolveHold {
                    hold: resolution.hold,
                    transfers: resolution.transfers,
                    detached: false,
                };
                store.commit(BatchId::new(), &[settle]).await.unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
