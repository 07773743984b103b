//! The store conformance suite: every behaviour the server relies on, written once and run
//! against each backend by `store_suite!`. A new backend adds one line at the bottom.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{Duration, TimeZone, Utc};
use std::sync::Arc;
use tollgate_core::{AccountId, ApiKey, KeyEnv, KeyId, KeyKind, KeyStatus, Nanos};
use tollgate_store::{KeyRecord, NewKey, RevokeOutcome, Store};

fn key_for(account: AccountId, kind: KeyKind, name: &str) -> (ApiKey, KeyRecord) {
    let key = NewKey {
        account_id: account,
        kind,
        name: name.to_string(),
        scopes: vec!["*".to_string()],
        expires_at: None,
    };
    KeyRecord::issue(
        KeyEnv::Live,
        key,
        Utc.timestamp_millis_opt(1_700_000_000_123).unwrap(),
    )
}

async fn new_account(store: &dyn Store, credits: Nanos) -> (AccountId, ApiKey, KeyRecord) {
    let id = AccountId::new();
    let (secret, master) = key_for(id, KeyKind::Master, "master");
    store
        .create_account(id, "Acme", credits, master.clone(), Utc::now())
        .await
        .unwrap();
    (id, secret, master)
}

pub async fn creates_account_with_wallet_ledger_and_master_key(store: Arc<dyn Store>) {
    let (id, secret, master) = new_account(&*store, Nanos(5_000_000_000)).await;
    let account = store.account(id).await.unwrap().unwrap();
    assert_eq!(account.name, "Acme");
    assert_eq!(account.status, "active");
    assert_eq!(account.balance, Nanos(5_000_000_000));
    // The cached balance equals the balance rebuilt from the ledger.
    assert_eq!(store.ledger_balance(id).await.unwrap(), account.balance);
    assert_eq!(
        store.key_by_hash(&secret.hash()).await.unwrap(),
        Some(master)
    );
}

pub async fn account_without_starter_credits_has_an_empty_ledger(store: Arc<dyn Store>) {
    let (id, _, _) = new_account(&*store, Nanos::ZERO).await;
    assert_eq!(
        store.account(id).await.unwrap().unwrap().balance,
        Nanos::ZERO
    );
    assert_eq!(store.ledger_balance(id).await.unwrap(), Nanos::ZERO);
}

pub async fn unknown_ids_are_none(store: Arc<dyn Store>) {
    assert!(store.account(AccountId::new()).await.unwrap().is_none());
    assert!(store.key_by_id(KeyId::new()).await.unwrap().is_none());
    let stranger = ApiKey::generate(KeyEnv::Live);
    assert!(store.key_by_hash(&stranger.hash()).await.unwrap().is_none());
    assert_eq!(
        store.revoke_key(KeyId::new(), Utc::now()).await.unwrap(),
        RevokeOutcome::NotFound
    );
}

pub async fn keys_round_trip_every_field(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let (_, mut usage) = key_for(account, KeyKind::Usage, "ci runner");
    usage.scopes = vec!["echo".into(), "llm".into()];
    usage.expires_at = Some(Utc.timestamp_millis_opt(1_800_000_000_456).unwrap());
    usage.status = KeyStatus::Inactive;
    store.insert_key(&usage).await.unwrap();
    assert_eq!(
        store.key_by_id(usage.id).await.unwrap(),
        Some(usage.clone())
    );
    assert_eq!(store.key_by_hash(&usage.hash).await.unwrap(), Some(usage));
}

pub async fn lists_keys_per_account_oldest_first(store: Arc<dyn Store>) {
    let (a, _, master_a) = new_account(&*store, Nanos::ZERO).await;
    let (b, _, master_b) = new_account(&*store, Nanos::ZERO).await;
    let (_, usage_a) = key_for(a, KeyKind::Usage, "second");
    store.insert_key(&usage_a).await.unwrap();
    let ids = |keys: Vec<KeyRecord>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.keys_of_account(a).await.unwrap()),
        vec![master_a.id, usage_a.id]
    );
    assert_eq!(
        ids(store.keys_of_account(b).await.unwrap()),
        vec![master_b.id]
    );
    let all = ids(store.all_keys().await.unwrap());
    for id in [master_a.id, usage_a.id, master_b.id] {
        assert!(all.contains(&id));
    }
}

pub async fn revoke_happens_once(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let (_, usage) = key_for(account, KeyKind::Usage, "u");
    store.insert_key(&usage).await.unwrap();
    let first_at = Utc.timestamp_millis_opt(1_750_000_000_000).unwrap();
    let first = store.revoke_key(usage.id, first_at).await.unwrap();
    let RevokeOutcome::Revoked(revoked) = first else {
        panic!("{first:?}")
    };
    assert_eq!(revoked.status, KeyStatus::Revoked);
    assert_eq!(revoked.revoked_at, Some(first_at));
    let second = store
        .revoke_key(usage.id, first_at + Duration::hours(1))
        .await
        .unwrap();
    let RevokeOutcome::AlreadyRevoked(again) = second else {
        panic!("{second:?}")
    };
    assert_eq!(
        again.revoked_at,
        Some(first_at),
        "a second revoke changes nothing"
    );
}

pub async fn concurrent_revokes_have_one_winner(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let (_, usage) = key_for(account, KeyKind::Usage, "u");
    store.insert_key(&usage).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.revoke_key(usage.id, Utc::now()).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        if matches!(task.await.unwrap(), RevokeOutcome::Revoked(_)) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

pub async fn duplicate_key_hash_is_refused(store: Arc<dyn Store>) {
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    let mut clash = master.clone();
    clash.id = KeyId::new();
    clash.account_id = account;
    assert!(store.insert_key(&clash).await.is_err());
}

pub async fn ping_answers(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
    assert!(!store.backend().is_empty());
}

/// Runs every conformance test against one backend: `store_suite!(module, async_constructor)`.
macro_rules! store_suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            store_suite!(@tests $make;
                creates_account_with_wallet_ledger_and_master_key,
                account_without_starter_credits_has_an_empty_ledger,
                unknown_ids_are_none,
                keys_round_trip_every_field,
                lists_keys_per_account_oldest_first,
                revoke_happens_once,
                concurrent_revokes_have_one_winner,
                duplicate_key_hash_is_refused,
                ping_answers,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                let (store, _guard) = $make.await;
                super::$test(store).await;
            }
        )*
    };
}

async fn sqlite_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate_store::sqlite::SqliteStore::open(&dir.path().join("t.db"))
        .await
        .unwrap();
    (Arc::new(store), dir)
}

store_suite!(sqlite, sqlite_store());
