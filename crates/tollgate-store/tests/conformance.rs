//! The store conformance suite: every behaviour the server relies on, written once and run
//! against each backend by `store_suite!`. A new backend adds one line at the bottom. The
//! PostgreSQL run gives each test a schema of its own; without a server it skips, and under
//! `CI=true` it fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use std::sync::Arc;
use tollgate_core::allowance::Overage;
use tollgate_core::audit::AuditEntry;
use tollgate_core::ledger::{
    BillingStatus, Book, HoldRequest, HoldStatus, Resolve, Transfer, Wallet,
};
use tollgate_core::metering::TokenUsage;
use tollgate_core::notify::EventFilter;
use tollgate_core::plan::{Meter, Subscription, SubscriptionStatus};
use tollgate_core::ratelimit::LimitOverride;
use tollgate_core::{
    AccountId, ApiKey, HoldId, KeyEnv, KeyId, KeyKind, KeyStatus, Nanos, RequestId,
};
use tollgate_store::testing::TestSchema;
use tollgate_store::BatchId;
use tollgate_store::{BucketSource, UnitBucket, UnitsAnswer, UnitsAsk};
use tollgate_store::{
    HoldRecord, HoldSource, IdempotencyBegin, IdempotencyClaim, InsertKeyOutcome, KeyActivity,
    KeyChange, KeyRecord, LedgerWrite, NewKey, RevokeOutcome, SeriesSplit, SessionRecord, Store,
    StoredResponse, UsageBucket, UsageFilter, UsageGroup, UsageRow,
};

fn key_for(account: AccountId, kind: KeyKind, name: &str) -> (ApiKey, KeyRecord) {
    let key = NewKey::new(account, kind, name);
    KeyRecord::issue(
        KeyEnv::Live,
        key,
        Utc.timestamp_millis_opt(1_700_000_000_123).unwrap(),
    )
}

/// Inserts a key under a generous key limit.
async fn insert(store: &dyn Store, key: &KeyRecord) {
    assert_eq!(
        store.insert_key(key, 100).await.unwrap(),
        InsertKeyOutcome::Inserted
    );
}

/// The key whose current secret has this hash.
async fn current(store: &dyn Store, hash: &tollgate_core::KeyHash) -> Option<KeyRecord> {
    store.key_by_hash(hash).await.unwrap().map(|found| {
        assert_eq!(
            found.secret_expires_at, None,
            "a current secret never expires"
        );
        found.key
    })
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
    assert_eq!(current(&*store, &secret.hash()).await, Some(master));
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
    usage.monthly_spend_cap = Some(Nanos(7));
    usage.allowed_ips = vec![
        "10.0.0.0/8".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    insert(&*store, &usage).await;
    assert_eq!(
        store.key_by_id(usage.id).await.unwrap(),
        Some(usage.clone())
    );
    assert_eq!(current(&*store, &usage.hash).await, Some(usage));
}

pub async fn lists_keys_per_account_oldest_first(store: Arc<dyn Store>) {
    let (a, _, master_a) = new_account(&*store, Nanos::ZERO).await;
    let (b, _, master_b) = new_account(&*store, Nanos::ZERO).await;
    let (_, usage_a) = key_for(a, KeyKind::Usage, "second");
    insert(&*store, &usage_a).await;
    let ids = |keys: Vec<KeyRecord>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
    let mut of_a = vec![master_a.id, usage_a.id];
    of_a.sort();
    assert_eq!(ids(store.keys(Some(a), None, 10).await.unwrap()), of_a);
    assert_eq!(
        ids(store.keys(Some(b), None, 10).await.unwrap()),
        vec![master_b.id]
    );
    // Paged: after the first, the rest.
    assert_eq!(ids(store.keys(Some(a), None, 1).await.unwrap()), of_a[..1]);
    assert_eq!(
        ids(store.keys(Some(a), Some(of_a[0]), 10).await.unwrap()),
        of_a[1..]
    );
    let all = ids(store.keys(None, None, 100).await.unwrap());
    for id in [master_a.id, usage_a.id, master_b.id] {
        assert!(all.contains(&id));
    }
}

pub async fn revoke_happens_once(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let (_, usage) = key_for(account, KeyKind::Usage, "u");
    insert(&*store, &usage).await;
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
    insert(&*store, &usage).await;
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
    let refused = store.insert_key(&clash, 100).await;
    // Refused as it is (a retry would be refused again), not an outage to retry.
    assert!(
        matches!(refused, Err(tollgate_store::StoreError::Corrupt(_))),
        "{refused:?}"
    );
}

pub async fn key_limit_counts_unrevoked_keys_and_honours_the_override(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    // The master key is one of two allowed.
    let (_, second) = key_for(account, KeyKind::Usage, "second");
    assert_eq!(
        store.insert_key(&second, 2).await.unwrap(),
        InsertKeyOutcome::Inserted
    );
    let (_, third) = key_for(account, KeyKind::Usage, "third");
    assert_eq!(
        store.insert_key(&third, 2).await.unwrap(),
        InsertKeyOutcome::LimitReached { limit: 2 }
    );
    // A revoked key frees its place.
    store.revoke_key(second.id, Utc::now()).await.unwrap();
    assert_eq!(
        store.insert_key(&third, 2).await.unwrap(),
        InsertKeyOutcome::Inserted
    );
    // The account's override wins over the default, both ways.
    let mut settings = store.account(account).await.unwrap().unwrap();
    settings.name = "Renamed".into();
    settings.max_keys = Some(5);
    let updated = store.update_account(&settings).await.unwrap().unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.max_keys),
        ("Renamed", Some(5))
    );
    let (_, fourth) = key_for(account, KeyKind::Usage, "fourth");
    assert_eq!(
        store.insert_key(&fourth, 2).await.unwrap(),
        InsertKeyOutcome::Inserted
    );
    settings.max_keys = Some(0);
    store.update_account(&settings).await.unwrap();
    let (_, fifth) = key_for(account, KeyKind::Usage, "fifth");
    assert_eq!(
        store.insert_key(&fifth, 100).await.unwrap(),
        InsertKeyOutcome::LimitReached { limit: 0 }
    );
    settings.id = AccountId::new();
    assert!(store.update_account(&settings).await.unwrap().is_none());
}

pub async fn rate_limit_overrides_round_trip_and_reach_the_key_lookup(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let (_, mut key) = key_for(account, KeyKind::Usage, "u");
    insert(&*store, &key).await;
    let lookup = store.key_by_hash(&key.hash).await.unwrap().unwrap();
    assert!(lookup.key.rate_limits.is_empty() && lookup.account_rate_limits.is_empty());

    let own = LimitOverride {
        limit: 5,
        window_seconds: Some(1),
        burst: None,
    };
    key.rate_limits = [("per-key".to_string(), own)].into();
    store.update_key(&key).await.unwrap();
    let mut settings = store.account(account).await.unwrap().unwrap();
    let shared = LimitOverride {
        limit: 600,
        window_seconds: None,
        burst: Some(10),
    };
    settings.rate_limits = [("per-account".to_string(), shared)].into();
    let updated = store.update_account(&settings).await.unwrap().unwrap();
    assert_eq!(updated.rate_limits, settings.rate_limits);

    let lookup = store.key_by_hash(&key.hash).await.unwrap().unwrap();
    assert_eq!(lookup.key.rate_limits, key.rate_limits);
    assert_eq!(lookup.account_rate_limits, settings.rate_limits);
    assert!(!lookup.account_suspended);
    assert_eq!(store.key_by_id(key.id).await.unwrap(), Some(key.clone()));

    // Suspending the account reaches its keys' lookups; reactivating undoes it.
    settings.status = "suspended".into();
    let suspended = store.update_account(&settings).await.unwrap().unwrap();
    assert_eq!(suspended.status, "suspended");
    assert!(
        store
            .key_by_hash(&key.hash)
            .await
            .unwrap()
            .unwrap()
            .account_suspended
    );
    settings.status = "active".into();
    store.update_account(&settings).await.unwrap();
    assert!(
        !store
            .key_by_hash(&key.hash)
            .await
            .unwrap()
            .unwrap()
            .account_suspended
    );
}

fn claim(scope: &str, key: &str, fingerprint: u8, now: DateTime<Utc>) -> IdempotencyClaim {
    IdempotencyClaim {
        scope: scope.into(),
        key: key.into(),
        fingerprint: [fingerprint; 32],
        owner: RequestId::new(),
        now,
        lease_until: now + chrono::Duration::minutes(15),
        expires_at: now + chrono::Duration::hours(24),
    }
}

pub async fn idempotency_claims_have_one_winner_and_replay_what_it_kept(store: Arc<dyn Store>) {
    let now = Utc.timestamp_millis_opt(1_800_000_000_000).unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let claim = claim("acct_a", "k1", 1, now);
            tokio::spawn(
                async move { (claim.owner, store.begin_idempotent(&claim).await.unwrap()) },
            )
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (owner, IdempotencyBegin::Started) => winners.push(owner),
            (_, IdempotencyBegin::InFlight { .. }) => {}
            (_, other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claim runs");
    let owner = winners[0];

    // Another owner cannot complete or release it.
    let response = StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Some(b"{\"id\":1}".to_vec()),
    };
    store
        .release_idempotent("acct_a", "k1", RequestId::new())
        .await
        .unwrap();
    store
        .complete_idempotent("acct_a", "k1", owner, &response)
        .await
        .unwrap();
    assert_eq!(
        store
            .begin_idempotent(&claim("acct_a", "k1", 1, now))
            .await
            .unwrap(),
        IdempotencyBegin::Completed {
            owner,
            response: response.clone()
        }
    );
    // A completed record is not released.
    store
        .release_idempotent("acct_a", "k1", owner)
        .await
        .unwrap();
    assert!(matches!(
        store
            .begin_idempotent(&claim("acct_a", "k1", 1, now))
            .await
            .unwrap(),
        IdempotencyBegin::Completed { .. }
    ));
    assert_eq!(
        store
            .begin_idempotent(&claim("acct_a", "k1", 2, now))
            .await
            .unwrap(),
        IdempotencyBegin::Mismatch
    );
    // Keys are per scope.
    assert_eq!(
        store
            .begin_idempotent(&claim("acct_b", "k1", 2, now))
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );
    // A body that could not be kept reads back as none.
    let first = claim("acct_a", "k2", 1, now);
    store.begin_idempotent(&first).await.unwrap();
    let unkept = StoredResponse {
        body: None,
        ..response
    };
    store
        .complete_idempotent("acct_a", "k2", first.owner, &unkept)
        .await
        .unwrap();
    let IdempotencyBegin::Completed { response, .. } = store
        .begin_idempotent(&claim("acct_a", "k2", 1, now))
        .await
        .unwrap()
    else {
        panic!("not completed");
    };
    assert_eq!(response, unkept);
}

pub async fn idempotency_keys_free_on_release_lease_end_and_expiry(store: Arc<dyn Store>) {
    let now = Utc.timestamp_millis_opt(1_800_000_000_000).unwrap();
    // Released: the next claim runs afresh.
    let first = claim("acct_a", "released", 1, now);
    assert_eq!(
        store.begin_idempotent(&first).await.unwrap(),
        IdempotencyBegin::Started
    );
    store
        .release_idempotent("acct_a", "released", first.owner)
        .await
        .unwrap();
    assert_eq!(
        store
            .begin_idempotent(&claim("acct_a", "released", 1, now))
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );

    // A claim whose owner died is taken over once its lease runs out, and the dead owner can no
    // longer complete it.
    let dead = claim("acct_a", "leased", 1, now);
    store.begin_idempotent(&dead).await.unwrap();
    let during = claim("acct_a", "leased", 1, now + chrono::Duration::minutes(14));
    assert!(matches!(
        store.begin_idempotent(&during).await.unwrap(),
        IdempotencyBegin::InFlight { owner, .. } if owner == dead.owner
    ));
    let after = claim("acct_a", "leased", 1, dead.lease_until);
    assert_eq!(
        store.begin_idempotent(&after).await.unwrap(),
        IdempotencyBegin::Started
    );
    let late = StoredResponse {
        status: 200,
        headers: Vec::new(),
        body: Some(Vec::new()),
    };
    store
        .complete_idempotent("acct_a", "leased", dead.owner, &late)
        .await
        .unwrap();
    assert!(matches!(
        store.begin_idempotent(&claim("acct_a", "leased", 1, dead.lease_until)).await.unwrap(),
        IdempotencyBegin::InFlight { owner, .. } if owner == after.owner
    ));

    // A completed record is forgotten at its expiry, even for another request.
    let done = claim("acct_a", "expiring", 1, now);
    store.begin_idempotent(&done).await.unwrap();
    store
        .complete_idempotent("acct_a", "expiring", done.owner, &late)
        .await
        .unwrap();
    assert_eq!(
        store
            .begin_idempotent(&claim("acct_a", "expiring", 2, done.expires_at))
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );

    // Purging removes what has expired and nothing else.
    let purge_at = now + chrono::Duration::hours(48);
    let kept = claim("acct_a", "fresh", 1, purge_at);
    store.begin_idempotent(&kept).await.unwrap();
    assert_eq!(store.purge_idempotency(purge_at).await.unwrap(), 3);
    assert!(matches!(
        store
            .begin_idempotent(&claim("acct_a", "fresh", 1, purge_at))
            .await
            .unwrap(),
        IdempotencyBegin::InFlight { .. }
    ));
}

pub async fn accounts_list_in_id_order_by_page_and_status(store: Arc<dyn Store>) {
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(new_account(&*store, Nanos(7)).await.0);
    }
    // Ids are ULIDs: creation order to the millisecond.
    ids.sort();
    let mut suspended = store.account(ids[1]).await.unwrap().unwrap();
    suspended.status = "suspended".into();
    store.update_account(&suspended).await.unwrap();

    let first = store.accounts(None, None, 3).await.unwrap();
    let rest = store.accounts(Some(first[2].id), None, 3).await.unwrap();
    let listed: Vec<AccountId> = first.iter().chain(&rest).map(|a| a.id).collect();
    assert_eq!(listed, ids);
    assert_eq!(first[0], store.account(ids[0]).await.unwrap().unwrap());
    assert_eq!(first[0].balance, Nanos(7));
    let only: Vec<AccountId> = store
        .accounts(None, Some("suspended"), 10)
        .await
        .unwrap()
        .iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(only, [ids[1]]);
    assert_eq!(
        store
            .accounts(None, Some("active"), 10)
            .await
            .unwrap()
            .len(),
        4
    );
}

pub async fn concurrent_audit_appends_form_one_unbroken_chain(store: Arc<dyn Store>) {
    assert_eq!(store.audit_head().await.unwrap(), None);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let entry = AuditEntry {
                    seq: 0,
                    at: Utc::now(),
                    actor: "admin".into(),
                    action: "key.revoke".into(),
                    target: format!("key_{i}"),
                    request_id: RequestId::new().to_string(),
                    before: (i % 2 == 0).then(|| format!("{{\"n\":{i}}}")),
                    after: None,
                    prev_hash: [0; 32],
                    hash: [0; 32],
                };
                store.append_audit(entry).await.unwrap()
            })
        })
        .collect();
    let mut appended = Vec::new();
    for task in tasks {
        appended.push(task.await.unwrap());
    }
    // Read back in pages of seven: exactly what was appended, chained without a break.
    let mut entries = Vec::new();
    loop {
        let page = store
            .audit_entries(entries.last().map_or(0, |e: &AuditEntry| e.seq), 7)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        entries.extend(page);
    }
    appended.sort_by_key(|e| e.seq);
    assert_eq!(entries, appended);
    let head = store.audit_head().await.unwrap();
    assert_eq!(head, Some((20, entries[19].hash)));
    assert_eq!(tollgate_core::audit::verify(&entries, head), Ok(20));
}

pub async fn concurrent_inserts_never_overshoot_the_key_limit(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let store = store.clone();
            let (_, key) = key_for(account, KeyKind::Usage, &format!("k{i}"));
            tokio::spawn(async move { store.insert_key(&key, 5).await.unwrap() })
        })
        .collect();
    let mut inserted = 0;
    for task in tasks {
        if task.await.unwrap() == InsertKeyOutcome::Inserted {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 4, "the master key plus four fill a limit of five");
    assert_eq!(store.keys(Some(account), None, 100).await.unwrap().len(), 5);
}

pub async fn updates_change_policy_but_never_a_revoked_key(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let (_, mut key) = key_for(account, KeyKind::Usage, "u");
    insert(&*store, &key).await;
    key.name = "renamed".into();
    key.scopes = vec!["echo".into(), "openai:gpt-mini".into()];
    key.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()];
    key.status = KeyStatus::Inactive;
    key.expires_at = Some(Utc.timestamp_millis_opt(1_900_000_000_000).unwrap());
    key.monthly_spend_cap = Some(Nanos(42));
    assert_eq!(
        store.update_key(&key).await.unwrap(),
        KeyChange::Changed(key.clone())
    );
    assert_eq!(current(&*store, &key.hash).await, Some(key.clone()));
    store.revoke_key(key.id, Utc::now()).await.unwrap();
    let mut after = key.clone();
    after.status = KeyStatus::Active;
    let KeyChange::Revoked(stored) = store.update_key(&after).await.unwrap() else {
        panic!("a revoked key was changed");
    };
    assert_eq!(stored.status, KeyStatus::Revoked);
    let mut stranger = key.clone();
    stranger.id = KeyId::new();
    assert_eq!(
        store.update_key(&stranger).await.unwrap(),
        KeyChange::NotFound
    );
}

pub async fn a_rolled_key_answers_to_both_secrets_with_the_old_ones_deadline(
    store: Arc<dyn Store>,
) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let (old_secret, key) = key_for(account, KeyKind::Usage, "u");
    insert(&*store, &key).await;
    let new_secret = ApiKey::generate(KeyEnv::Live);
    let now = Utc.timestamp_millis_opt(1_750_000_000_000).unwrap();
    let deadline = now + Duration::seconds(60);
    let KeyChange::Changed(rolled) = store
        .roll_key(
            key.id,
            new_secret.hash(),
            new_secret.display_prefix(),
            deadline,
            now,
        )
        .await
        .unwrap()
    else {
        panic!("roll refused");
    };
    assert_eq!(rolled.id, key.id);
    assert_eq!(rolled.hash, new_secret.hash());
    assert_eq!(rolled.display_prefix, new_secret.display_prefix());
    assert_eq!(
        current(&*store, &new_secret.hash()).await,
        Some(rolled.clone())
    );
    let old = store
        .key_by_hash(&old_secret.hash())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((old.key, old.secret_expires_at), (rolled, Some(deadline)));
    // A revoked key cannot be rolled.
    store.revoke_key(key.id, now).await.unwrap();
    let another = ApiKey::generate(KeyEnv::Live);
    assert!(matches!(
        store
            .roll_key(
                key.id,
                another.hash(),
                another.display_prefix(),
                deadline,
                now
            )
            .await
            .unwrap(),
        KeyChange::Revoked(_)
    ));
    assert!(store.key_by_hash(&another.hash()).await.unwrap().is_none());
    assert_eq!(
        store
            .roll_key(KeyId::new(), another.hash(), "x", deadline, now)
            .await
            .unwrap(),
        KeyChange::NotFound
    );
}

pub async fn console_sessions_round_trip_touch_end_and_purge(store: Arc<dyn Store>) {
    let key = KeyId::new();
    let signed_in = |byte: u8, key: Option<KeyId>, ms: i64| SessionRecord {
        id_hash: [byte; 32],
        key,
        created_at: at(ms),
        last_seen_at: at(ms),
    };
    let holder = signed_in(1, Some(key), 1_000);
    let operator = signed_in(2, None, 5_000);
    store.create_session(&holder).await.unwrap();
    store.create_session(&operator).await.unwrap();
    assert_eq!(store.session(&[1; 32]).await.unwrap(), Some(holder.clone()));
    assert_eq!(store.session(&[2; 32]).await.unwrap(), Some(operator));
    assert_eq!(store.session(&[3; 32]).await.unwrap(), None);
    // The same id twice is refused: a session id is never reused.
    assert!(store.create_session(&holder).await.is_err());

    // Seen later moves forward; an older sighting never moves it back.
    store.touch_session(&[1; 32], at(9_000)).await.unwrap();
    store.touch_session(&[1; 32], at(4_000)).await.unwrap();
    let touched = store.session(&[1; 32]).await.unwrap().unwrap();
    assert_eq!(
        (touched.created_at, touched.last_seen_at),
        (at(1_000), at(9_000))
    );

    // Idle past the cutoff, or older than the absolute cutoff: purged; the rest stay.
    store
        .create_session(&signed_in(4, Some(key), 8_000))
        .await
        .unwrap();
    let purged = store.purge_sessions(at(6_000), at(2_000)).await.unwrap();
    assert_eq!(
        purged, 2,
        "the holder's (created too early) and the operator's (idle)"
    );
    assert_eq!(store.session(&[1; 32]).await.unwrap(), None);
    assert_eq!(store.session(&[2; 32]).await.unwrap(), None);
    assert!(store.session(&[4; 32]).await.unwrap().is_some());

    store.end_session(&[4; 32]).await.unwrap();
    assert_eq!(store.session(&[4; 32]).await.unwrap(), None);
    // Ending a session that is gone is not an error.
    store.end_session(&[4; 32]).await.unwrap();
}

pub async fn ping_answers(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
    assert!(!store.backend().is_empty());
}

fn at(ms: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).unwrap()
}

/// Opens a hold in `book` and returns the write that persists it.
fn open_hold(book: &mut Book, account: AccountId, key: KeyId, amount: i64, ms: i64) -> LedgerWrite {
    let (hold, transfer) = book
        .open(HoldRequest {
            id: HoldId::new(),
            account,
            key: Some(key),
            amount: Nanos(amount),
            key_cap: None,
            at: at(ms),
            expires_at: at(ms + 60_000),
            reference: None,
        })
        .unwrap();
    LedgerWrite::OpenHold {
        record: HoldRecord {
            hold,
            source: HoldSource::Api,
            request_id: None,
            metadata: serde_json::json!({"job": "render"}),
        },
        transfer,
        key_cap: None,
    }
}

fn resolve(book: &mut Book, write: &LedgerWrite, how: Resolve, ms: i64) -> LedgerWrite {
    let LedgerWrite::OpenHold { record, .. } = write else {
        panic!("not an open hold")
    };
    let resolution = book.resolve(record.hold.id, how, at(ms)).unwrap();
    LedgerWrite::ResolveHold {
        hold: resolution.hold,
        transfers: resolution.transfers,
        detached: false,
    }
}

/// What `account` was charged in the month of `at`.
async fn spent_in_month(store: &dyn Store, account: AccountId, at: DateTime<Utc>) -> Nanos {
    let sheet = store.balance_sheet(account, at).await.unwrap();
    sheet.expect("the account has a wallet").spent_in_month
}

async fn assert_books_balance(store: &dyn Store, account: AccountId, book: &Book) {
    let trial = store.trial_balance().await.unwrap();
    assert_eq!(trial.iter().map(|(_, n)| n).sum::<i64>(), 0, "{trial:?}");
    let stored = store.wallet(account).await.unwrap().unwrap();
    assert_eq!(Some(stored), book.wallet(account), "cached wallet = book");
    assert_eq!(
        store.ledger_balance(account).await.unwrap(),
        stored.available
    );
}

pub async fn holds_commit_settle_and_release_in_batches(store: Arc<dyn Store>) {
    let (account, _, master) = new_account(&*store, Nanos(1_000)).await;
    let mut book = Book::new();
    book.load_wallet(account, store.wallet(account).await.unwrap().unwrap());
    book.load_key_spend(master.id, at(1_000), Nanos::ZERO);
    let a = open_hold(&mut book, account, master.id, 300, 1_000);
    let b = open_hold(&mut book, account, master.id, 200, 1_000);
    let first = BatchId::new();
    store.commit(first, &[a.clone(), b.clone()]).await.unwrap();
    // The same batch again, as after a commit whose answer was lost: applied once.
    store.commit(first, &[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(
        store.wallet(account).await.unwrap(),
        Some(Wallet {
            available: Nanos(500),
            held: Nanos(500),
            debt: Nanos(0),
        })
    );
    assert_eq!(store.pending_holds().await.unwrap().len(), 2);
    // Both expire at 61 s: not yet at 60.999 s, both from then on.
    assert!(store.holds_expired_by(at(60_999)).await.unwrap().is_empty());
    assert_eq!(store.holds_expired_by(at(61_000)).await.unwrap().len(), 2);

    let settle = resolve(&mut book, &a, Resolve::Settle(Nanos(120)), 2_000);
    let release = resolve(&mut book, &b, Resolve::Release, 2_000);
    store
        .commit(BatchId::new(), &[settle.clone(), release])
        .await
        .unwrap();
    assert_books_balance(&*store, account, &book).await;
    assert_eq!(
        store.wallet(account).await.unwrap().unwrap().available,
        Nanos(880)
    );
    // The billing API's settled holds, by when they were settled: the release charged nothing.
    assert_eq!(
        store.api_charges(account, None, None).await.unwrap(),
        (1, Nanos(120))
    );
    assert_eq!(
        store
            .api_charges(account, Some(at(2_000)), Some(at(2_001)))
            .await
            .unwrap(),
        (1, Nanos(120))
    );
    assert_eq!(
        store
            .api_charges(account, Some(at(2_001)), None)
            .await
            .unwrap(),
        (0, Nanos::ZERO)
    );
    assert!(store.pending_holds().await.unwrap().is_empty());
    assert!(
        store.holds_expired_by(at(61_000)).await.unwrap().is_empty(),
        "only pending ones"
    );

    let LedgerWrite::OpenHold { record, .. } = &a else {
        unreachable!()
    };
    let stored = store.hold(record.hold.id).await.unwrap().unwrap();
    assert_eq!(stored.hold.status, HoldStatus::Settled);
    assert_eq!(stored.hold.charged, Nanos(120));
    assert_eq!(stored.metadata, serde_json::json!({"job": "render"}));
    assert_eq!(
        store.key_spent_since(master.id, at(1_500)).await.unwrap(),
        Nanos(120)
    );
    assert_eq!(
        store.key_spent_since(master.id, at(2_001)).await.unwrap(),
        Nanos(0)
    );
    assert_eq!(spent_in_month(&*store, account, at(0)).await, Nanos(120));

    // Resolving again is refused by the store, and the failed batch leaves nothing behind.
    let usage = LedgerWrite::Usage(Box::new(usage_row(account, master.id, 5_000)));
    let refused = store.commit(BatchId::new(), &[usage, settle]).await;
    assert!(
        matches!(refused, Err(tollgate_store::StoreError::Corrupt(_))),
        "{refused:?}"
    );
    assert!(store
        .requests(&UsageFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
    assert_books_balance(&*store, account, &book).await;

    let transfers = store.transfers(account, None, 10).await.unwrap();
    let kinds: Vec<&str> = transfers.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["release", "release", "charge", "hold", "hold", "grant"]
    );
    let older = store
        .transfers(account, Some(transfers[2].seq), 10)
        .await
        .unwrap();
    assert_eq!(older.len(), 3);
}

/// More resolutions than one statement carries, each of a hold opened in an earlier batch; then
/// a batch that resolves one of them again among fresh ones is refused whole.
pub async fn many_resolutions_commit_together_and_a_repeat_refuses_the_batch(
    store: Arc<dyn Store>,
) {
    const HOLDS: i64 = 1_100;
    let (account, _, master) = new_account(&*store, Nanos(10 * (HOLDS + 1))).await;
    let mut book = Book::new();
    book.load_wallet(account, store.wallet(account).await.unwrap().unwrap());
    book.load_key_spend(master.id, at(1_000), Nanos::ZERO);
    let opened: Vec<LedgerWrite> = (0..=HOLDS)
        .map(|_| open_hold(&mut book, account, master.id, 10, 1_000))
        .collect();
    store.commit(BatchId::new(), &opened).await.unwrap();
    let (last, first) = opened.split_last().unwrap();
    let settled: Vec<LedgerWrite> = first
        .iter()
        .map(|w| resolve(&mut book, w, Resolve::Settle(Nanos(3)), 2_000))
        .collect();
    store.commit(BatchId::new(), &settled).await.unwrap();
    assert_books_balance(&*store, account, &book).await;
    assert_eq!(store.pending_holds().await.unwrap().len(), 1);
    assert_eq!(
        spent_in_month(&*store, account, at(0)).await,
        Nanos(3 * HOLDS)
    );

    let mut again = vec![resolve(&mut book, last, Resolve::Release, 3_000)];
    again.push(settled[HOLDS as usize - 1].clone());
    let refused = store.commit(BatchId::new(), &again).await;
    assert!(
        matches!(refused, Err(tollgate_store::StoreError::Corrupt(_))),
        "{refused:?}"
    );
    // Nothing of the refused batch stands: the last hold is still pending.
    assert_eq!(store.pending_holds().await.unwrap().len(), 1);
    // Alone, a repeated resolution names its hold.
    let LedgerWrite::ResolveHold { hold, .. } = &settled[0] else {
        unreachable!()
    };
    let refused = store.commit(BatchId::new(), &settled[..1]).await;
    assert!(
        matches!(&refused, Err(tollgate_store::StoreError::Corrupt(m)) if m.contains(&hold.id.to_string())),
        "{refused:?}"
    );
}

pub async fn a_wallet_never_goes_negative_in_the_store(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos(10)).await;
    let overdraw = LedgerWrite::Transfer {
        account,
        transfer: Transfer {
            debit: tollgate_core::ledger::LedgerAccount::Wallet(account),
            credit: tollgate_core::ledger::LedgerAccount::External,
            amount: Nanos(11),
            kind: tollgate_core::ledger::TransferKind::Grant,
        },
        memo: String::new(),
        reference: String::new(),
        at: at(0),
    };
    let refused = store.commit(BatchId::new(), &[overdraw]).await;
    assert!(
        matches!(refused, Err(tollgate_store::StoreError::Corrupt(_))),
        "{refused:?}"
    );
    assert_eq!(store.ledger_balance(account).await.unwrap(), Nanos(10));
}

/// A payment movement as the ledger service writes it: the book's transfers, filed under
/// `reference`.
fn payment_writes(
    account: AccountId,
    transfers: Vec<Transfer>,
    reference: &str,
) -> Vec<LedgerWrite> {
    transfers
        .into_iter()
        .map(|transfer| LedgerWrite::Transfer {
            account,
            transfer,
            memo: "card".into(),
            reference: reference.into(),
            at: at(0),
        })
        .collect()
}

pub async fn a_refund_past_the_wallet_is_debt_that_new_credit_repays_once_per_reference(
    store: Arc<dyn Store>,
) {
    use tollgate_core::ledger::{LedgerAccount, TransferKind};
    let (account, _, _) = new_account(&*store, Nanos(30)).await;
    let mut book = Book::new();
    book.load_wallet(account, store.wallet(account).await.unwrap().unwrap());
    let refund = book
        .take(
            account,
            Nanos(50),
            LedgerAccount::External,
            TransferKind::Refund,
        )
        .unwrap();
    let reference = "payment:topup_1:refund:re_1";
    let writes = payment_writes(account, refund, reference);
    store.commit(BatchId::new(), &writes).await.unwrap();
    let wallet = store.wallet(account).await.unwrap().unwrap();
    assert_eq!((wallet.available, wallet.debt), (Nanos(0), Nanos(20)));
    assert_eq!(wallet, book.wallet(account).unwrap());
    assert!(store.filed(account, reference).await.unwrap());
    assert!(!store
        .filed(account, "payment:topup_1:refund:re_2")
        .await
        .unwrap());
    assert_eq!(
        store
            .filed_total(account, "payment:topup_1:refund:")
            .await
            .unwrap(),
        Nanos(50)
    );
    assert_eq!(
        store
            .filed_total(account, "payment:topup_2:")
            .await
            .unwrap(),
        Nanos(0)
    );
    // The same movement again, in another batch: refused by the store itself.
    let again = store.commit(BatchId::new(), &writes).await;
    assert!(
        matches!(again, Err(tollgate_store::StoreError::Corrupt(_))),
        "{again:?}"
    );
    // Repaying more than is owed is refused too: debt never goes below zero.
    let overpay = payment_writes(
        account,
        vec![Transfer {
            debit: LedgerAccount::Wallet(account),
            credit: LedgerAccount::Debt(account),
            amount: Nanos(21),
            kind: TransferKind::Repay,
        }],
        "payment:topup_x:credit",
    );
    assert!(store.commit(BatchId::new(), &overpay).await.is_err());

    let credit = book
        .credit(account, Nanos(25), LedgerAccount::External)
        .unwrap();
    store
        .commit(
            BatchId::new(),
            &payment_writes(account, credit, "payment:topup_2:credit"),
        )
        .await
        .unwrap();
    let wallet = store.wallet(account).await.unwrap().unwrap();
    assert_eq!((wallet.available, wallet.debt), (Nanos(5), Nanos(0)));
    assert_eq!(store.ledger_balance(account).await.unwrap(), Nanos(5));
    let trial = store.trial_balance().await.unwrap();
    assert_eq!(trial.iter().map(|(_, n)| n).sum::<i64>(), 0);
    assert!(trial
        .iter()
        .all(|(name, n)| !name.starts_with("debt:") || *n == 0));
}

fn topup(account: AccountId, ms: i64) -> tollgate_store::TopUp {
    tollgate_store::TopUp {
        id: tollgate_core::TopUpId::new(),
        account_id: account,
        amount: Nanos::parse_amount("25").unwrap(),
        amount_minor: 2500,
        currency: "usd".into(),
        status: tollgate_core::payment::TopUpStatus::Pending,
        origin: tollgate_store::TopUpOrigin::Checkout,
        checkout_session: None,
        checkout_url: None,
        payment_intent: None,
        dispute: None,
        review: None,
        failure: None,
        auto_key: None,
        pack: None,
        created_at: at(ms),
        updated_at: at(ms),
    }
}

pub async fn an_auto_top_up_is_due_below_its_threshold_with_a_card_and_starts_once_per_key(
    store: Arc<dyn Store>,
) {
    let (account, _, _) = new_account(&*store, Nanos(10)).await;
    let rule = tollgate_store::AutoTopUp {
        account_id: account,
        threshold: Nanos(11),
        amount: Nanos(50),
        max_per_month: 2,
        enabled: true,
        disabled_reason: None,
        customer: None,
        payment_method: None,
        updated_at: at(1),
    };
    store.set_auto_topup(&rule).await.unwrap();
    assert!(
        store.auto_topups_due().await.unwrap().is_empty(),
        "no card yet"
    );
    store
        .save_card(account, "cus_1", "pm_1", at(2))
        .await
        .unwrap();
    let due = store.auto_topups_due().await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (
            due[0].customer.as_deref(),
            due[0].payment_method.as_deref(),
            due[0].amount
        ),
        (Some("cus_1"), Some("pm_1"), Nanos(50))
    );
    // Setting the rule again keeps the card; a balance at the threshold is not below it.
    store
        .set_auto_topup(&tollgate_store::AutoTopUp {
            threshold: Nanos(10),
            ..rule.clone()
        })
        .await
        .unwrap();
    assert!(store.auto_topups_due().await.unwrap().is_empty());
    store.set_auto_topup(&rule).await.unwrap();
    assert_eq!(store.auto_topups_due().await.unwrap().len(), 1);

    let auto = |key: &str| tollgate_store::TopUp {
        origin: tollgate_store::TopUpOrigin::Auto,
        auto_key: Some(key.into()),
        pack: None,
        ..topup(account, 3)
    };
    assert!(store.create_topup(&auto("auto:1")).await.unwrap());
    assert!(
        !store.create_topup(&auto("auto:1")).await.unwrap(),
        "one per key"
    );
    assert!(store.create_topup(&auto("auto:2")).await.unwrap());
    assert!(store.create_topup(&topup(account, 3)).await.unwrap());
    assert_eq!(store.auto_topups_since(account, at(0)).await.unwrap(), 2);
    assert_eq!(store.auto_topups_since(account, at(4)).await.unwrap(), 0);

    store
        .disable_auto_topup(account, Some("the card needs the customer"), at(5))
        .await
        .unwrap();
    assert!(store.auto_topups_due().await.unwrap().is_empty());
    let off = store.auto_topup(account).await.unwrap().unwrap();
    assert!(!off.enabled);
    assert_eq!(
        off.disabled_reason.as_deref(),
        Some("the card needs the customer")
    );
    assert_eq!(off.payment_method.as_deref(), Some("pm_1"));
}

pub async fn topups_round_trip_list_newest_first_and_never_leave_paid(store: Arc<dyn Store>) {
    use tollgate_core::payment::TopUpStatus::*;
    let (account, _, _) = new_account(&*store, Nanos(0)).await;
    let (other, _, _) = new_account(&*store, Nanos(0)).await;
    let first = topup(account, 1);
    let second = topup(account, 2);
    for t in [&first, &second, &topup(other, 3)] {
        assert!(store.create_topup(t).await.unwrap());
    }
    assert_eq!(store.topup(first.id).await.unwrap().as_ref(), Some(&first));
    let listed = store.topups(account, None, 10).await.unwrap();
    assert_eq!(listed, [second.clone(), first.clone()]);
    let after = store.topups(account, Some(second.id), 10).await.unwrap();
    assert_eq!(after, std::slice::from_ref(&first));

    store
        .set_checkout(first.id, "cs_1", "https://pay.example/cs_1", at(5))
        .await
        .unwrap();
    assert_eq!(
        store
            .topup_by_provider_id("cs_1")
            .await
            .unwrap()
            .map(|t| t.id),
        Some(first.id)
    );
    // Expired, then paid after all (money received wins), then nothing moves it again.
    assert!(store
        .move_topup(first.id, Expired, None, Some("expired"), at(6))
        .await
        .unwrap());
    assert!(store
        .move_topup(first.id, Paid, Some("pi_1"), None, at(7))
        .await
        .unwrap());
    assert!(!store
        .move_topup(first.id, Failed, Some("pi_2"), Some("declined"), at(8))
        .await
        .unwrap());
    assert!(!store
        .move_topup(first.id, Paid, Some("pi_2"), None, at(8))
        .await
        .unwrap());
    let paid = store.topup(first.id).await.unwrap().unwrap();
    assert_eq!(
        (paid.status, paid.payment_intent.as_deref(), paid.updated_at),
        (Paid, Some("pi_1"), at(7))
    );
    assert_eq!(
        store
            .topup_by_provider_id("pi_1")
            .await
            .unwrap()
            .map(|t| t.id),
        Some(first.id)
    );
    // Pending cannot be gone back to, and a final status is not left for another one.
    assert!(!store
        .move_topup(second.id, Pending, None, None, at(9))
        .await
        .unwrap());
    assert!(store
        .move_topup(second.id, Processing, None, None, at(9))
        .await
        .unwrap());
    assert!(store
        .move_topup(second.id, Failed, None, Some("declined"), at(9))
        .await
        .unwrap());
    assert!(!store
        .move_topup(second.id, Expired, None, Some("late"), at(9))
        .await
        .unwrap());
    let failed = store.topup(second.id).await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.failure.as_deref()),
        (Failed, Some("declined"))
    );

    store
        .flag_topup(first.id, "amount 1 usd, asked 25 usd", at(10))
        .await
        .unwrap();
    store
        .flag_topup(first.id, "second reason", at(11))
        .await
        .unwrap();
    let flagged = store.topup(first.id).await.unwrap().unwrap();
    assert_eq!(
        flagged.review.as_deref(),
        Some("amount 1 usd, asked 25 usd")
    );
    assert!(store
        .topup_by_provider_id("pi_unknown")
        .await
        .unwrap()
        .is_none());
}

pub async fn payment_events_are_recorded_once_and_wait_until_handled(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos(0)).await;
    let t = topup(account, 1);
    store.create_topup(&t).await.unwrap();
    let event = |id: &str, ms| tollgate_store::PaymentEvent {
        id: id.into(),
        kind: "refund.created".into(),
        topup: Some(t.id),
        payment_intent: None,
        payload: format!("{{\"id\":\"{id}\"}}"),
        received_at: at(ms),
    };
    assert!(!store.record_event(&event("evt_1", 1)).await.unwrap());
    assert!(
        !store.record_event(&event("evt_1", 2)).await.unwrap(),
        "recorded, not handled"
    );
    assert!(!store.record_event(&event("evt_2", 3)).await.unwrap());
    // About the payment only (a refund before its top-up is known): found by the intent.
    let by_intent = tollgate_store::PaymentEvent {
        topup: None,
        payment_intent: Some("pi_9".into()),
        ..event("evt_3", 4)
    };
    assert!(!store.record_event(&by_intent).await.unwrap());
    assert_eq!(
        store.waiting_events(t.id, None).await.unwrap(),
        [event("evt_1", 1), event("evt_2", 3)]
    );
    assert_eq!(
        store.waiting_events(t.id, Some("pi_9")).await.unwrap(),
        [event("evt_1", 1), event("evt_2", 3), by_intent]
    );
    store
        .finish_event("evt_1", "refunded", at(4))
        .await
        .unwrap();
    assert!(store.record_event(&event("evt_1", 5)).await.unwrap());
    assert_eq!(
        store.waiting_events(t.id, None).await.unwrap(),
        [event("evt_2", 3)]
    );
}

fn usage_row(account: AccountId, key: KeyId, ms: i64) -> UsageRow {
    UsageRow {
        request_id: RequestId::new(),
        client_request_id: Some("client-1".into()),
        account_id: account,
        key_id: key,
        route: "/v1".into(),
        model: Some("mock-gpt".into()),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        status: 200,
        upstream_status: Some(200),
        units: Some("1.5".into()),
        tokens: Some(TokenUsage {
            input: 10,
            cached_input: 2,
            output: 5,
        }),
        cost: Nanos(42),
        hold: Nanos(100),
        uncovered: Nanos(7),
        hold_id: Some(HoldId::new()),
        billing_status: BillingStatus::Partial,
        latency_ms: 12,
        error_code: None,
        error_message: None,
        replay_of: None,
        created_at: at(ms),
        completed_at: at(ms + 12),
    }
}

pub async fn usage_summaries_group_and_total_by_day_key_route_and_model(store: Arc<dyn Store>) {
    const DAY: i64 = 86_400_000;
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    let (other, _, other_master) = new_account(&*store, Nanos::ZERO).await;
    let second_key = KeyId::new();
    let mut rows = [
        usage_row(account, master.id, 0),
        usage_row(account, second_key, 1_000),
        usage_row(account, master.id, DAY + 5),
        usage_row(other, other_master.id, 10),
    ];
    rows[1].route = "/echo".into();
    rows[1].model = None;
    rows[1].tokens = None;
    rows[1].status = 502;
    rows[1].cost = Nanos::ZERO;
    let writes: Vec<LedgerWrite> = rows
        .iter()
        .cloned()
        .map(|r| LedgerWrite::Usage(Box::new(r)))
        .collect();
    store.commit(BatchId::new(), &writes).await.unwrap();
    let day = |ms: i64| at(ms).format("%Y-%m-%d").to_string();

    let by_day = store
        .usage_summary(account, UsageGroup::Day, None, None)
        .await
        .unwrap();
    assert_eq!(
        by_day,
        vec![
            UsageBucket {
                group: day(0),
                requests: 2,
                errors: 1,
                input_tokens: 10,
                cached_input_tokens: 2,
                output_tokens: 5,
                cost: Nanos(42),
            },
            UsageBucket {
                group: day(DAY + 5),
                requests: 1,
                errors: 0,
                input_tokens: 10,
                cached_input_tokens: 2,
                output_tokens: 5,
                cost: Nanos(42),
            },
        ]
    );
    let groups = |buckets: Vec<UsageBucket>| -> Vec<(String, u64)> {
        buckets.into_iter().map(|b| (b.group, b.requests)).collect()
    };
    let mut keys = vec![(master.id.to_string(), 2), (second_key.to_string(), 1)];
    keys.sort();
    let summary = |group| store.usage_summary(account, group, None, None);
    assert_eq!(groups(summary(UsageGroup::Key).await.unwrap()), keys);
    assert_eq!(
        groups(summary(UsageGroup::Route).await.unwrap()),
        [("/echo".to_string(), 1), ("/v1".to_string(), 2)]
    );
    assert_eq!(
        groups(summary(UsageGroup::Model).await.unwrap()),
        [(String::new(), 1), ("mock-gpt".to_string(), 2)]
    );
    // The window is [from, to).
    let first_day = store
        .usage_summary(account, UsageGroup::Route, Some(at(0)), Some(at(DAY)))
        .await
        .unwrap();
    assert_eq!(
        groups(first_day),
        [("/echo".to_string(), 1), ("/v1".to_string(), 1)]
    );
}

pub async fn accounts_are_found_by_id_or_by_part_of_their_name(store: Arc<dyn Store>) {
    let mut made = Vec::new();
    for name in ["Acme Robotics", "acme labs", "Globex", "100% Real_Name"] {
        let account = AccountId::new();
        let (_, master) = key_for(account, KeyKind::Master, "master");
        store
            .create_account(account, name, Nanos::ZERO, master, at(0))
            .await
            .unwrap();
        made.push(account);
    }
    let names = |found: Vec<tollgate_store::Account>| -> Vec<String> {
        found.into_iter().map(|a| a.name).collect()
    };
    let found = store.search_accounts("ACME", None, 10).await.unwrap();
    assert_eq!(names(found.clone()), ["Acme Robotics", "acme labs"]);
    // Paged by id, as the account list is.
    let rest = store
        .search_accounts("acme", Some(found[0].id), 10)
        .await
        .unwrap();
    assert_eq!(names(rest), ["acme labs"]);
    // `%` and `_` are text, not patterns.
    assert_eq!(
        names(store.search_accounts("0% real_", None, 10).await.unwrap()),
        ["100% Real_Name"]
    );
    assert!(store.search_accounts("_", None, 10).await.unwrap().len() == 1);
    let by_id = store
        .search_accounts(&made[2].to_string(), None, 10)
        .await
        .unwrap();
    assert_eq!(names(by_id), ["Globex"]);
    assert!(store
        .search_accounts("initech", None, 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn an_accounts_monthly_spend_is_kept_per_calendar_month(store: Arc<dyn Store>) {
    const DAY: i64 = 86_400_000;
    let (account, _, master) = new_account(&*store, Nanos(1_000)).await;
    let mut book = Book::new();
    book.load_wallet(account, store.wallet(account).await.unwrap().unwrap());
    book.load_key_spend(master.id, at(0), Nanos::ZERO);
    // Settled on 31 January and on 1 February 1970, in two batches; a release charges nothing.
    let january = open_hold(&mut book, account, master.id, 100, 30 * DAY);
    let settle_january = resolve(
        &mut book,
        &january,
        Resolve::Settle(Nanos(40)),
        30 * DAY + 5,
    );
    store
        .commit(BatchId::new(), &[january, settle_january])
        .await
        .unwrap();
    let february = open_hold(&mut book, account, master.id, 100, 31 * DAY);
    let settle_february = resolve(
        &mut book,
        &february,
        Resolve::Settle(Nanos(25)),
        31 * DAY + 5,
    );
    let released = open_hold(&mut book, account, master.id, 100, 31 * DAY);
    let release = resolve(&mut book, &released, Resolve::Release, 31 * DAY + 6);
    let again = open_hold(&mut book, account, master.id, 100, 32 * DAY);
    let settle_again = resolve(&mut book, &again, Resolve::Settle(Nanos(7)), 32 * DAY + 5);
    store
        .commit(
            BatchId::new(),
            &[
                february,
                settle_february,
                released,
                release,
                again,
                settle_again,
            ],
        )
        .await
        .unwrap();
    let spent = |ms| spent_in_month(&*store, account, at(ms));
    assert_eq!(spent(0).await, Nanos(40));
    assert_eq!(spent(30 * DAY + 1).await, Nanos(40));
    assert_eq!(spent(31 * DAY).await, Nanos(32));
    assert_eq!(spent(58 * DAY).await, Nanos(32), "28 February");
    assert_eq!(spent(59 * DAY).await, Nanos::ZERO, "1 March");
    let (other, _, _) = new_account(&*store, Nanos(1_000)).await;
    assert_eq!(
        spent_in_month(&*store, other, at(0)).await,
        Nanos::ZERO,
        "starter credits are not spend"
    );
}

pub async fn usage_series_sum_quarter_hours_split_by_key_route_and_model(store: Arc<dyn Store>) {
    const QUARTER: i64 = 15 * 60 * 1000;
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    let (other, _, other_master) = new_account(&*store, Nanos::ZERO).await;
    let mut rows = [
        usage_row(account, master.id, QUARTER + 1),
        usage_row(account, master.id, 2 * QUARTER - 1),
        usage_row(account, master.id, 2 * QUARTER),
        usage_row(account, master.id, 5 * QUARTER),
        usage_row(other, other_master.id, QUARTER + 1),
    ];
    rows[1].model = None;
    rows[1].status = 500;
    let writes: Vec<LedgerWrite> = rows
        .iter()
        .cloned()
        .map(|r| LedgerWrite::Usage(Box::new(r)))
        .collect();
    store.commit(BatchId::new(), &writes).await.unwrap();
    let series = |split| store.usage_series(account, split, at(0), at(5 * QUARTER));
    let total = series(SeriesSplit::Total).await.unwrap();
    // [from, to): the row at 5 quarters is out; the others fall in quarters 1 and 2.
    let slots: Vec<(i64, String, u64, u64, i64)> = total
        .iter()
        .map(|s| {
            let t = &s.totals;
            (
                s.start.timestamp_millis(),
                t.group.clone(),
                t.requests,
                t.errors,
                t.cost.0,
            )
        })
        .collect();
    assert_eq!(
        slots,
        [
            (QUARTER, String::new(), 2, 1, 84),
            (2 * QUARTER, String::new(), 1, 0, 42),
        ]
    );
    let by_model: Vec<(i64, String, u64)> = series(SeriesSplit::Model)
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            (
                s.start.timestamp_millis(),
                s.totals.group,
                s.totals.requests,
            )
        })
        .collect();
    assert_eq!(
        by_model,
        [
            (QUARTER, String::new(), 1),
            (QUARTER, "mock-gpt".into(), 1),
            (2 * QUARTER, "mock-gpt".into(), 1),
        ]
    );
    let by_key = series(SeriesSplit::Key).await.unwrap();
    assert!(by_key
        .iter()
        .all(|s| s.totals.group == master.id.to_string()));
    let by_route = series(SeriesSplit::Route).await.unwrap();
    assert!(by_route.iter().all(|s| s.totals.group == "/v1"));

    // A later batch adds to a slot already there.
    let late = usage_row(account, master.id, QUARTER + 7);
    store
        .commit(BatchId::new(), &[LedgerWrite::Usage(Box::new(late))])
        .await
        .unwrap();
    let total = series(SeriesSplit::Total).await.unwrap();
    assert_eq!((total[0].totals.requests, total[0].totals.cost.0), (3, 126));
    // Purged with the rows: a slot wholly before the cutoff goes, the next stays.
    store
        .purge_requests_before(at(2 * QUARTER + 1))
        .await
        .unwrap();
    let left: Vec<i64> = series(SeriesSplit::Total)
        .await
        .unwrap()
        .iter()
        .map(|s| s.start.timestamp_millis())
        .collect();
    assert_eq!(left, [2 * QUARTER]);
}

pub async fn key_activity_sums_each_keys_charges_and_finds_its_last_use(store: Arc<dyn Store>) {
    let (account, _, master) = new_account(&*store, Nanos(1_000)).await;
    let (_, spare) = key_for(account, KeyKind::Usage, "spare");
    insert(&*store, &spare).await;
    let (_, capped) = key_for(account, KeyKind::Usage, "capped");
    let capped = KeyRecord {
        monthly_spend_cap: Some(Nanos(150)),
        ..capped
    };
    insert(&*store, &capped).await;
    let mut book = Book::new();
    book.load_wallet(account, store.wallet(account).await.unwrap().unwrap());
    book.load_key_spend(master.id, at(1_000), Nanos::ZERO);
    book.load_key_spend(capped.id, at(1_000), Nanos::ZERO);
    let open = open_hold(&mut book, account, master.id, 300, 1_000);
    let settle = resolve(&mut book, &open, Resolve::Settle(Nanos(120)), 2_000);
    let on_capped = open_hold(&mut book, account, capped.id, 300, 1_000);
    let settle_capped = resolve(&mut book, &on_capped, Resolve::Settle(Nanos(119)), 2_000);
    let used = LedgerWrite::Usage(Box::new(usage_row(account, master.id, 5_000)));
    store
        .commit(
            BatchId::new(),
            &[open, settle, on_capped, settle_capped, used],
        )
        .await
        .unwrap();
    let ids = [master.id, spare.id];
    let activity = store.key_activity(&ids, at(0)).await.unwrap();
    let mut expected = vec![
        KeyActivity {
            key: master.id,
            spent: Nanos(120),
            last_used: Some(at(5_000)),
        },
        KeyActivity {
            key: spare.id,
            spent: Nanos::ZERO,
            last_used: None,
        },
    ];
    expected.sort_by_key(|a| a.key.to_string());
    assert_eq!(activity, expected, "only the keys asked for");
    // Only charges resolved since `since` count; the last use does not depend on it.
    let later = store.key_activity(&ids, at(2_001)).await.unwrap();
    assert!(later.iter().all(|a| a.spent == Nanos::ZERO));
    assert_eq!(later.iter().filter(|a| a.last_used.is_some()).count(), 1);
    assert!(store.key_activity(&[], at(0)).await.unwrap().is_empty());

    // 119 of a 150 cap is 79.3 %: near at 79 %, not at 80 %. Uncapped keys are never near.
    let near = |percent| store.keys_near_cap(account, at(0), percent, 10);
    let found: Vec<(KeyId, Nanos)> = near(79)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.key, a.spent))
        .collect();
    assert_eq!(found, [(capped.id, Nanos(119))]);
    assert!(near(80).await.unwrap().is_empty());
    assert!(store
        .keys_near_cap(account, at(2_001), 1, 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn usage_rows_round_trip_filter_and_page(store: Arc<dyn Store>) {
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    let (other, _, _) = new_account(&*store, Nanos::ZERO).await;
    let mut rows = Vec::new();
    for i in 0..5 {
        let mut row = usage_row(account, master.id, 1_000 * i);
        if i == 4 {
            row.status = 402;
            row.tokens = None;
            row.error_code = Some("insufficient_balance".into());
            row.error_message = Some("The account's balance is 0.".into());
            row.billing_status = BillingStatus::Released;
        }
        if i == 3 {
            row.replay_of = Some(RequestId::new());
            row.cost = Nanos::ZERO;
        }
        rows.push(row);
    }
    // Rows list newest id first; ids made in one millisecond are not ordered, so sort them.
    let mut ids: Vec<RequestId> = rows.iter().map(|r| r.request_id).collect();
    ids.sort();
    for (row, id) in rows.iter_mut().zip(ids) {
        row.request_id = id;
    }
    let writes: Vec<LedgerWrite> = rows
        .iter()
        .cloned()
        .map(|r| LedgerWrite::Usage(Box::new(r)))
        .collect();
    store.commit(BatchId::new(), &writes).await.unwrap();
    assert_eq!(
        store.request(rows[4].request_id).await.unwrap().as_ref(),
        Some(&rows[4])
    );
    assert_eq!(
        store.request(rows[3].request_id).await.unwrap().as_ref(),
        Some(&rows[3])
    );
    assert_eq!(
        store.request(rows[0].request_id).await.unwrap().as_ref(),
        Some(&rows[0])
    );

    let mine = UsageFilter {
        account: Some(account),
        limit: 2,
        ..Default::default()
    };
    let page = store.requests(&mine).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.request_id).collect::<Vec<_>>(),
        [rows[4].request_id, rows[3].request_id]
    );
    let next = store
        .requests(&UsageFilter {
            before: Some(rows[3].request_id),
            ..mine.clone()
        })
        .await
        .unwrap();
    assert_eq!(next[0].request_id, rows[2].request_id);
    let failed = UsageFilter {
        status: Some(402),
        limit: 10,
        ..mine.clone()
    };
    assert_eq!(store.requests(&failed).await.unwrap().len(), 1);
    let window = UsageFilter {
        from: Some(at(1_000)),
        to: Some(at(3_000)),
        limit: 10,
        ..mine.clone()
    };
    assert_eq!(store.requests(&window).await.unwrap().len(), 2);
    // Every other filter, each alone selecting the one refused row or none.
    let refused = rows[4].request_id;
    for (filter, expected) in [
        (
            UsageFilter {
                status_class: Some(4),
                ..mine.clone()
            },
            Some(refused),
        ),
        (
            UsageFilter {
                status_class: Some(5),
                ..mine.clone()
            },
            None,
        ),
        (
            UsageFilter {
                error_code: Some("insufficient_balance".into()),
                ..mine.clone()
            },
            Some(refused),
        ),
        (
            UsageFilter {
                billing_status: Some(BillingStatus::Released),
                ..mine.clone()
            },
            Some(refused),
        ),
        (
            UsageFilter {
                model: Some("other-model".into()),
                ..mine.clone()
            },
            None,
        ),
        (
            UsageFilter {
                route: Some("/echo".into()),
                ..mine.clone()
            },
            None,
        ),
    ] {
        let found: Vec<RequestId> = store
            .requests(&UsageFilter {
                limit: 10,
                ..filter.clone()
            })
            .await
            .unwrap()
            .iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(
            found,
            expected.into_iter().collect::<Vec<_>>(),
            "{filter:?}"
        );
    }
    let by_model = UsageFilter {
        model: Some("mock-gpt".into()),
        status_class: Some(2),
        key: Some(master.id),
        limit: 10,
        ..mine.clone()
    };
    assert_eq!(store.requests(&by_model).await.unwrap().len(), 4);
    let theirs = UsageFilter {
        account: Some(other),
        limit: 10,
        ..Default::default()
    };
    assert!(store.requests(&theirs).await.unwrap().is_empty());

    assert_eq!(store.purge_requests_before(at(2_000)).await.unwrap(), 2);
    assert!(store.request(rows[0].request_id).await.unwrap().is_none());
}

fn allowance_bucket(account: AccountId, granted: u64, start: i64) -> UnitBucket {
    UnitBucket {
        account,
        bucket: format!("requests@{start}"),
        source: BucketSource::Allowance,
        meter: Meter::Requests,
        routes: None,
        granted,
        used: 0,
        held: 0,
        starts_at: at(start),
        ends_at: at(start + 1_000),
    }
}

fn ask(allowance: UnitBucket, units: u64, overage: Overage, now: i64) -> UnitsAsk {
    UnitsAsk {
        request: RequestId::new(),
        allowance,
        windows: Vec::new(),
        rollover: None,
        group: "default".into(),
        units,
        worst_cost: Nanos(units as i64 * 10),
        overage,
        at: at(now),
        expires_at: at(now + 60),
    }
}

/// The columns of the buckets usable at `now` are the sums of their entries.
async fn assert_units_balance(store: &dyn Store, account: AccountId, now: i64) {
    let mut buckets = store.unit_buckets(account, at(now)).await.unwrap();
    buckets.sort_by(|a, b| a.bucket.cmp(&b.bucket));
    let mut sums = store.unit_entry_sums(account).await.unwrap();
    sums.retain(|(name, ..)| buckets.iter().any(|b| &b.bucket == name));
    let columns: Vec<_> = buckets
        .iter()
        .map(|b| (b.bucket.clone(), b.granted, b.held, b.used))
        .collect();
    assert_eq!(columns, sums);
}

async fn units_reserve_in_draw_order_settle_return_and_never_pass_a_grant(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let allowance = allowance_bucket(account, 5, 1_000);
    // A pack expiring later than another: the earlier one is drawn first, then the later, then
    // the allowance.
    for (id, units, expires) in [("late", 2, 1_900), ("early", 1, 1_500)] {
        let pack = UnitBucket {
            bucket: format!("pack:{id}"),
            source: BucketSource::Pack,
            granted: units,
            starts_at: at(900),
            ends_at: at(expires),
            ..allowance.clone()
        };
        assert!(store.add_pack(&pack, at(900)).await.unwrap());
        assert!(!store.add_pack(&pack, at(900)).await.unwrap(), "once");
    }
    let first = ask(allowance.clone(), 4, Overage::Block, 1_100);
    let UnitsAnswer::Reserved {
        draws,
        allowance: after,
        packs_remaining,
        ..
    } = store.reserve_units(&first).await.unwrap()
    else {
        panic!("4 of 8 units are there");
    };
    assert_eq!(
        draws,
        [
            ("pack:early".to_string(), 1),
            ("pack:late".to_string(), 2),
            ("requests@1000".to_string(), 1)
        ]
    );
    assert_eq!(
        (after.granted, after.held, after.used, packs_remaining),
        (5, 1, 0, 0)
    );
    assert_units_balance(&*store, account, 1_100).await;
    // It used 2: the early pack's 1 and one of the late pack's; the rest returns.
    assert!(store
        .settle_units(first.request, 2, at(1_101))
        .await
        .unwrap());
    assert!(
        !store
            .settle_units(first.request, 2, at(1_101))
            .await
            .unwrap(),
        "once"
    );
    let buckets = store.unit_buckets(account, at(1_102)).await.unwrap();
    let state: Vec<_> = buckets
        .iter()
        .map(|b| (b.bucket.as_str(), b.used, b.held, b.remaining()))
        .collect();
    assert!(state.contains(&("pack:early", 1, 0, 0)));
    assert!(state.contains(&("pack:late", 1, 0, 1)));
    assert!(state.contains(&("requests@1000", 0, 0, 5)));

    // 6 left; a call of 7 is refused under `block` and holds nothing; `wallet` covers the rest.
    let refused = ask(allowance.clone(), 7, Overage::Block, 1_200);
    let UnitsAnswer::Exhausted {
        allowance: standing,
        packs_remaining,
        ..
    } = store.reserve_units(&refused).await.unwrap()
    else {
        panic!("7 of 6 is refused");
    };
    assert_eq!(
        (
            standing.granted,
            standing.used,
            standing.held,
            packs_remaining
        ),
        (5, 0, 0, 1)
    );
    let over = ask(allowance.clone(), 7, Overage::Wallet, 1_200);
    let UnitsAnswer::Reserved { reservation, .. } = store.reserve_units(&over).await.unwrap()
    else {
        panic!("wallet overage");
    };
    assert_eq!(
        (reservation.uncovered, reservation.wallet_hold),
        (1, Nanos(10))
    );
    // It failed: everything returns.
    assert!(store
        .settle_units(over.request, 0, at(1_201))
        .await
        .unwrap());

    // An upgrade raises the period's grant at once; a downgrade does not lower it.
    let upgraded = UnitBucket {
        granted: 8,
        ..allowance.clone()
    };
    let call = ask(upgraded, 1, Overage::Block, 1_300);
    let UnitsAnswer::Reserved {
        allowance: after, ..
    } = store.reserve_units(&call).await.unwrap()
    else {
        panic!("upgrade");
    };
    assert_eq!(after.granted, 8);
    let downgraded = UnitBucket {
        granted: 2,
        ..allowance.clone()
    };
    let call = ask(downgraded, 1, Overage::Block, 1_300);
    let UnitsAnswer::Reserved {
        allowance: after, ..
    } = store.reserve_units(&call).await.unwrap()
    else {
        panic!("downgrade");
    };
    assert_eq!(after.granted, 8);
    // Unsettled reservations return their units at expiry.
    assert_eq!(store.expire_units(at(1_400)).await.unwrap(), 2);
    assert_eq!(store.expire_units(at(1_400)).await.unwrap(), 0);
    let buckets = store.unit_buckets(account, at(1_400)).await.unwrap();
    assert!(buckets.iter().all(|b| b.held == 0));
    assert_units_balance(&*store, account, 1_400).await;

    // A reset puts the period's used units back, once per reference; the period stays.
    let call = ask(allowance.clone(), 3, Overage::Block, 1_500);
    store.reserve_units(&call).await.unwrap();
    store
        .settle_units(call.request, 3, at(1_500))
        .await
        .unwrap();
    assert_eq!(
        store
            .reset_bucket(account, "requests@1000", "r1", at(1_501))
            .await
            .unwrap(),
        Some(true)
    );
    assert_eq!(
        store
            .reset_bucket(account, "requests@1000", "r1", at(1_502))
            .await
            .unwrap(),
        Some(false)
    );
    assert_eq!(
        store
            .reset_bucket(account, "nope", "r2", at(1_502))
            .await
            .unwrap(),
        None
    );
    let bucket = store
        .unit_buckets(account, at(1_503))
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.bucket == "requests@1000")
        .unwrap();
    assert_eq!(
        (bucket.used, bucket.starts_at, bucket.ends_at),
        (0, at(1_000), at(2_000))
    );
    assert_units_balance(&*store, account, 1_503).await;
    // A new period is a new bucket, granted once by its first call.
    let next = allowance_bucket(account, 5, 2_000);
    let call = ask(next, 1, Overage::Block, 2_000);
    let UnitsAnswer::Reserved {
        allowance: after, ..
    } = store.reserve_units(&call).await.unwrap()
    else {
        panic!("a new period");
    };
    assert_eq!(
        (after.bucket.as_str(), after.granted, after.held),
        ("requests@2000", 5, 1)
    );
}

async fn a_window_caps_its_allowance_and_a_new_period_takes_over_unused_units_once(
    store: Arc<dyn Store>,
) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let month = allowance_bucket(account, 10, 1_000);
    let day = |start: i64| UnitBucket {
        bucket: format!("requests/day@{start}"),
        granted: 3,
        starts_at: at(start),
        ends_at: at(start + 100),
        ..month.clone()
    };
    let with_window = |start: i64, units: u64, now: i64| UnitsAsk {
        windows: vec![day(start)],
        ..ask(month.clone(), units, Overage::Block, now)
    };
    let first = with_window(1_000, 2, 1_010);
    let UnitsAnswer::Reserved {
        window_draws,
        windows,
        ..
    } = store.reserve_units(&first).await.unwrap()
    else {
        panic!("2 of the day's 3");
    };
    assert_eq!(window_draws, [("requests/day@1000".to_string(), 2)]);
    assert_eq!((windows[0].held, windows[0].remaining()), (2, 1));
    // The month has 8 left, but the day only 1.
    let UnitsAnswer::Exhausted {
        allowance, windows, ..
    } = store
        .reserve_units(&with_window(1_000, 2, 1_020))
        .await
        .unwrap()
    else {
        panic!("the day has 1 left");
    };
    assert_eq!((allowance.remaining(), windows[0].remaining()), (8, 1));
    // Used 1 of 2: the day and the month both count 1.
    store
        .settle_units(first.request, 1, at(1_030))
        .await
        .unwrap();
    let buckets = store.unit_buckets(account, at(1_030)).await.unwrap();
    let used: Vec<_> = buckets
        .iter()
        .map(|b| (b.bucket.as_str(), b.used, b.held))
        .collect();
    assert!(
        used.contains(&("requests/day@1000", 1, 0)) && used.contains(&("requests@1000", 1, 0)),
        "{used:?}"
    );
    // The next day resets on its own; the month goes on.
    let next_day = with_window(1_100, 3, 1_110);
    let UnitsAnswer::Reserved { allowance, .. } = store.reserve_units(&next_day).await.unwrap()
    else {
        panic!("a new day");
    };
    assert_eq!(allowance.held, 3);
    store
        .settle_units(next_day.request, 3, at(1_120))
        .await
        .unwrap();
    assert_units_balance(&*store, account, 1_120).await;

    // The next month takes over at most 5 of the 6 unused, once, and they leave the old month.
    let june = UnitsAsk {
        rollover: Some(("requests@1000".into(), 5)),
        ..ask(
            allowance_bucket(account, 10, 2_000),
            1,
            Overage::Block,
            2_010,
        )
    };
    let UnitsAnswer::Reserved { allowance, .. } = store.reserve_units(&june).await.unwrap() else {
        panic!("a new month");
    };
    assert_eq!(allowance.granted, 15);
    let again = UnitsAsk {
        request: RequestId::new(),
        ..june.clone()
    };
    let UnitsAnswer::Reserved { allowance, .. } = store.reserve_units(&again).await.unwrap() else {
        panic!("the same month");
    };
    assert_eq!(allowance.granted, 15, "carried once");
    let sums = store.unit_entry_sums(account).await.unwrap();
    let may = sums
        .iter()
        .find(|(name, ..)| name == "requests@1000")
        .unwrap();
    assert_eq!(
        (may.1, may.3),
        (5, 4),
        "the old month keeps what was used, minus what was carried"
    );
    assert_units_balance(&*store, account, 2_010).await;
}

async fn concurrent_reservations_never_draw_more_than_the_grant(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos::ZERO).await;
    let allowance = allowance_bucket(account, 10, 1_000);
    let calls = (0..40).map(|_| {
        let store = store.clone();
        let call = ask(allowance.clone(), 1, Overage::Block, 1_100);
        tokio::spawn(async move {
            match store.reserve_units(&call).await.unwrap() {
                UnitsAnswer::Reserved { .. } => {
                    store
                        .settle_units(call.request, 1, at(1_101))
                        .await
                        .unwrap();
                    1
                }
                UnitsAnswer::Exhausted { .. } => 0,
            }
        })
    });
    let mut admitted = 0;
    for call in calls.collect::<Vec<_>>() {
        admitted += call.await.unwrap();
    }
    assert_eq!(admitted, 10);
    let bucket = &store.unit_buckets(account, at(1_200)).await.unwrap()[0];
    assert_eq!((bucket.used, bucket.held), (10, 0));
    assert_units_balance(&*store, account, 1_200).await;
}

async fn a_subscription_round_trips_and_reaches_the_key_lookup(store: Arc<dyn Store>) {
    let (account, secret, _) = new_account(&*store, Nanos::ZERO).await;
    assert_eq!(store.subscription(account).await.unwrap(), None);
    let subscription = Subscription {
        plan: "pro".into(),
        status: SubscriptionStatus::PastDue,
        since: at(2_000),
        started_at: at(1_000),
    };
    store
        .set_subscription(account, &subscription)
        .await
        .unwrap();
    assert_eq!(
        store.subscription(account).await.unwrap(),
        Some(subscription.clone())
    );
    let found = store.key_by_hash(&secret.hash()).await.unwrap().unwrap();
    assert_eq!(found.subscription, Some(subscription.clone()));
    let active = Subscription {
        status: SubscriptionStatus::Active,
        ..subscription
    };
    store.set_subscription(account, &active).await.unwrap();
    assert_eq!(store.subscription(account).await.unwrap(), Some(active));
}

// ---------------------------------------------------------------------------------------------
// Webhooks

fn endpoint_for(account: AccountId, filter: &[&str], ms: i64) -> tollgate_store::EndpointRecord {
    let names: Vec<String> = filter.iter().map(|n| n.to_string()).collect();
    tollgate_store::EndpointRecord {
        id: tollgate_core::EndpointId::new(),
        account_id: account,
        url: "https://hooks.example.com/in".into(),
        description: "ops".into(),
        events: EventFilter::parse(&names).unwrap(),
        enabled: true,
        disabled_reason: None,
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        previous_secret: None,
        previous_until: None,
        created_at: at(ms),
        updated_at: at(ms),
    }
}

/// Fans out everything waiting and claims every due delivery: the events each endpoint gets.
async fn delivered_types(store: &dyn Store, ms: i64) -> Vec<(String, serde_json::Value)> {
    store.fan_out(at(ms), 1000).await.unwrap();
    let mut seen = Vec::new();
    // One delivery per endpoint is claimed at a time: claim until none is left.
    while let Some(delivery) = store
        .claim_deliveries(at(ms), at(ms + 30_000), 1000)
        .await
        .unwrap()
        .pop()
    {
        store
            .finish_attempt(&tollgate_store::Attempt {
                endpoint: delivery.endpoint.id,
                event: delivery.event.id,
                at: at(ms),
                status: Some(200),
                error: None,
                outcome: tollgate_store::AttemptOutcome::Delivered,
            })
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_str(&delivery.event.body).unwrap();
        seen.push((delivery.event.kind.as_str().to_string(), body));
    }
    seen
}

/// A charge of `amount` by a hold opened and settled in one batch.
async fn charge(store: &dyn Store, book: &mut Book, account: AccountId, key: KeyId, amount: i64) {
    let open = open_hold(book, account, key, amount, 1_000);
    let settle = resolve(book, &open, Resolve::Settle(Nanos(amount)), 1_001);
    store.commit(BatchId::new(), &[open, settle]).await.unwrap();
}

pub async fn a_low_balance_fires_once_per_episode_and_recovery_rearms_it(store: Arc<dyn Store>) {
    use tollgate_core::ledger::LedgerAccount;
    let (account, _, master) = new_account(&*store, Nanos(10_000)).await;
    store
        .create_endpoint(&endpoint_for(account, &["*"], 0), 10)
        .await
        .unwrap();
    store
        .set_low_balance(account, Some(Nanos(5_000)), "USD")
        .await
        .unwrap();
    assert_eq!(
        store.low_balance(account).await.unwrap(),
        Some(Nanos(5_000))
    );
    let mut book = Book::new();
    book.load_wallet(account, store.wallet(account).await.unwrap().unwrap());
    book.load_key_spend(master.id, at(0), Nanos::ZERO);
    charge(&*store, &mut book, account, master.id, 4_000).await;
    assert!(
        delivered_types(&*store, 2_000).await.is_empty(),
        "6000 is not low"
    );
    charge(&*store, &mut book, account, master.id, 2_000).await;
    let low = delivered_types(&*store, 3_000).await;
    assert_eq!(low.len(), 1, "{low:?}");
    assert_eq!(low[0].0, "balance.low");
    assert_eq!(low[0].1["data"]["balance"]["nanos"], 4_000);
    assert_eq!(low[0].1["data"]["low_balance"]["credits"], "0.000005");
    assert_eq!(low[0].1["data"]["balance"]["currency"], "USD");
    charge(&*store, &mut book, account, master.id, 1_000).await;
    assert!(
        delivered_types(&*store, 4_000).await.is_empty(),
        "still the same episode"
    );
    // A credit that leaves the balance low does not recover it; one that reaches the amount does.
    let credit_book = |book: &mut Book, amount: i64| {
        payment_writes(
            account,
            book.credit(account, Nanos(amount), LedgerAccount::External)
                .unwrap(),
            "grant",
        )
    };
    store
        .commit(BatchId::new(), &credit_book(&mut book, 1_000))
        .await
        .unwrap();
    assert!(delivered_types(&*store, 5_000).await.is_empty());
    store
        .commit(BatchId::new(), &credit_book(&mut book, 3_000))
        .await
        .unwrap();
    let recovered = delivered_types(&*store, 6_000).await;
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0].0, "balance.recovered");
    assert_eq!(recovered[0].1["data"]["balance"]["nanos"], 7_000);
    // Re-armed: the next fall fires again.
    charge(&*store, &mut book, account, master.id, 3_000).await;
    let again = delivered_types(&*store, 7_000).await;
    assert_eq!(
        again.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["balance.low"]
    );
    // With the alert off, falls send nothing.
    store.set_low_balance(account, None, "USD").await.unwrap();
    store
        .commit(BatchId::new(), &credit_book(&mut book, 10_000))
        .await
        .unwrap();
    charge(&*store, &mut book, account, master.id, 10_000).await;
    let off = delivered_types(&*store, 8_000).await;
    assert_eq!(
        off.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["balance.recovered"],
        "the open episode ends with the credit; no new one starts"
    );
}

pub async fn a_crossing_is_recorded_once_among_concurrent_callers(store: Arc<dyn Store>) {
    use tollgate_core::notify::{Event, EventType};
    let (account, _, _) = new_account(&*store, Nanos(0)).await;
    store
        .create_endpoint(&endpoint_for(account, &["balance.depleted"], 0), 10)
        .await
        .unwrap();
    let crossing = tollgate_store::Crossing {
        subject: account.to_string(),
        kind: EventType::BalanceDepleted,
        period: String::new(),
        currency: "USD".into(),
    };
    let attempts = (0..20).map(|_| {
        let store = store.clone();
        let crossing = crossing.clone();
        tokio::spawn(async move {
            let event = Event::new(
                account,
                EventType::BalanceDepleted,
                at(1_000),
                serde_json::json!({}),
            );
            store.cross(&crossing, &event).await.unwrap()
        })
    });
    let mut crossed = 0;
    for attempt in attempts.collect::<Vec<_>>() {
        crossed += usize::from(attempt.await.unwrap());
    }
    assert_eq!(crossed, 1);
    assert_eq!(delivered_types(&*store, 2_000).await.len(), 1);
}

pub async fn endpoints_keep_their_limit_and_deliveries_retry_fail_and_redeliver(
    store: Arc<dyn Store>,
) {
    use tollgate_core::notify::{Event, EventType};
    use tollgate_store::{Attempt, AttemptOutcome, DeliveryStatus};
    let (account, _, _) = new_account(&*store, Nanos(0)).await;
    let first = endpoint_for(account, &["topup.succeeded"], 0);
    let second = endpoint_for(account, &["*"], 1);
    assert!(store.create_endpoint(&first, 2).await.unwrap());
    assert!(store.create_endpoint(&second, 2).await.unwrap());
    assert!(
        !store
            .create_endpoint(&endpoint_for(account, &["*"], 2), 2)
            .await
            .unwrap(),
        "the limit"
    );
    assert_eq!(store.endpoint(first.id).await.unwrap(), Some(first.clone()));
    assert_eq!(
        store.endpoints(account).await.unwrap(),
        vec![first.clone(), second.clone()]
    );
    let mut changed = first.clone();
    changed.url = "https://hooks.example.com/v2".into();
    changed.previous_secret = Some(first.secret.clone());
    changed.previous_until = Some(at(90_000));
    changed.updated_at = at(5);
    assert!(store.update_endpoint(&changed).await.unwrap());
    assert_eq!(store.endpoint(first.id).await.unwrap(), Some(changed));

    // A key event reaches only the endpoint that takes every event.
    let revoked = Event::new(
        account,
        EventType::KeyRevoked,
        at(10),
        serde_json::json!({}),
    );
    store.emit(&revoked).await.unwrap();
    let topup = Event::new(
        account,
        EventType::TopUpSucceeded,
        at(11),
        serde_json::json!({}),
    );
    store
        .commit(
            BatchId::new(),
            &[LedgerWrite::Event(Box::new(topup.clone()))],
        )
        .await
        .unwrap();
    assert_eq!(store.fan_out(at(20), 100).await.unwrap(), 2);
    assert_eq!(
        store.fan_out(at(20), 100).await.unwrap(),
        0,
        "each event once"
    );
    let due = store
        .claim_deliveries(at(20), at(30_020), 100)
        .await
        .unwrap();
    assert_eq!(
        due.len(),
        2,
        "one delivery per endpoint at a time, its oldest"
    );
    let to_second = due.iter().find(|d| d.endpoint.id == second.id).unwrap();
    assert_eq!(to_second.event.id, revoked.id);
    assert!(
        store
            .claim_deliveries(at(21), at(30_021), 100)
            .await
            .unwrap()
            .is_empty(),
        "claimed deliveries are not claimed again while their lease runs"
    );
    let to_first = due.iter().find(|d| d.endpoint.id == first.id).unwrap();
    assert_eq!(to_first.event, topup);
    // A retry is due at its time, and not before.
    store
        .finish_attempt(&Attempt {
            endpoint: first.id,
            event: topup.id,
            at: at(30),
            status: Some(500),
            error: Some("500 Internal Server Error".into()),
            outcome: AttemptOutcome::Retry(at(5_000)),
        })
        .await
        .unwrap();
    assert!(store
        .claim_deliveries(at(4_999), at(9_999), 100)
        .await
        .unwrap()
        .is_empty());
    let retried = store
        .claim_deliveries(at(5_000), at(35_000), 100)
        .await
        .unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].attempts, 1);
    // A 410 fails the delivery and disables the endpoint.
    store
        .finish_attempt(&Attempt {
            endpoint: first.id,
            event: topup.id,
            at: at(5_001),
            status: Some(410),
            error: None,
            outcome: AttemptOutcome::Gone,
        })
        .await
        .unwrap();
    let gone = store.endpoint(first.id).await.unwrap().unwrap();
    assert!(!gone.enabled);
    assert!(gone.disabled_reason.unwrap().contains("410"));
    let log = store.deliveries(first.id, None, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status, DeliveryStatus::Failed);
    assert_eq!((log[0].attempts, log[0].last_status), (2, Some(410)));
    assert_eq!(log[0].event_type, "topup.succeeded");
    // A disabled endpoint gets no new deliveries; a redelivery makes a failed one due again.
    let later = Event::new(
        account,
        EventType::TopUpSucceeded,
        at(6_000),
        serde_json::json!({}),
    );
    store.emit(&later).await.unwrap();
    store.fan_out(at(6_000), 100).await.unwrap();
    assert_eq!(store.deliveries(first.id, None, 10).await.unwrap().len(), 1);
    assert!(store
        .redeliver(first.id, topup.id, at(7_000))
        .await
        .unwrap());
    assert!(!store
        .redeliver(first.id, tollgate_core::EventId::new(), at(7_000))
        .await
        .unwrap());
    let again = store
        .claim_deliveries(at(7_000), at(37_000), 100)
        .await
        .unwrap();
    assert!(again.iter().any(|d| d.event.id == topup.id));
    // The second endpoint's log pages newest first.
    let page = store.deliveries(second.id, None, 1).await.unwrap();
    assert_eq!(page[0].event_id, later.id);
    let next = store
        .deliveries(second.id, Some(later.id), 10)
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|d| d.event_id).collect::<Vec<_>>(),
        vec![topup.id, revoked.id]
    );
    // Past retention, events whose deliveries are all over go; one still pending stays.
    let (quiet, _, _) = new_account(&*store, Nanos(0)).await;
    let hook = endpoint_for(quiet, &["*"], 0);
    assert!(store.create_endpoint(&hook, 2).await.unwrap());
    for n in 0..2 {
        let done = Event::new(
            quiet,
            EventType::KeyRevoked,
            at(8_000 + n),
            serde_json::json!({}),
        );
        store.emit(&done).await.unwrap();
    }
    assert_eq!(delivered_types(&*store, 9_000).await.len(), 2);
    let pending = Event::new(
        quiet,
        EventType::KeyRevoked,
        at(9_500),
        serde_json::json!({}),
    );
    store.emit(&pending).await.unwrap();
    store.fan_out(at(9_500), 100).await.unwrap();
    assert_eq!(
        store.purge_events(at(5)).await.unwrap(),
        0,
        "nothing that old"
    );
    let before = store.deliveries(hook.id, None, 10).await.unwrap();
    assert_eq!(before.len(), 3);
    store.purge_events(at(100_000)).await.unwrap();
    let after = store.deliveries(hook.id, None, 10).await.unwrap();
    assert_eq!(
        after
            .iter()
            .map(|d| (d.event_id, d.status))
            .collect::<Vec<_>>(),
        vec![(pending.id, DeliveryStatus::Pending)],
        "the delivered events went, the pending one stays"
    );
    // Deleting an endpoint takes its deliveries with it.
    assert!(store.delete_endpoint(second.id).await.unwrap());
    assert!(!store.delete_endpoint(second.id).await.unwrap());
    assert!(store
        .deliveries(second.id, None, 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn a_capped_keys_spend_crosses_80_and_100_percent_once_a_month(store: Arc<dyn Store>) {
    let (account, _, _) = new_account(&*store, Nanos(1_000_000)).await;
    store.set_currency("EUR").await.unwrap();
    store
        .create_endpoint(&endpoint_for(account, &["key.spend_threshold"], 0), 10)
        .await
        .unwrap();
    let (_, mut capped) = key_for(account, KeyKind::Usage, "capped");
    capped.monthly_spend_cap = Some(Nanos(10_000));
    insert(&*store, &capped).await;
    let (_, uncapped) = key_for(account, KeyKind::Usage, "free");
    insert(&*store, &uncapped).await;
    let mut book = Book::new();
    book.load_wallet(account, store.wallet(account).await.unwrap().unwrap());
    book.load_key_spend(capped.id, at(1_000), Nanos::ZERO);
    book.load_key_spend(uncapped.id, at(1_000), Nanos::ZERO);
    charge(&*store, &mut book, account, capped.id, 7_000).await;
    charge(&*store, &mut book, account, uncapped.id, 50_000).await;
    assert!(
        delivered_types(&*store, 2_000).await.is_empty(),
        "70 %, and no cap"
    );
    charge(&*store, &mut book, account, capped.id, 1_500).await;
    let eighty = delivered_types(&*store, 3_000).await;
    assert_eq!(eighty.len(), 1, "{eighty:?}");
    assert_eq!(eighty[0].0, "key.spend_threshold");
    let data = &eighty[0].1["data"];
    assert_eq!(data["percent"], 80);
    assert_eq!(data["key_id"], capped.id.to_string());
    assert_eq!(data["spent"]["nanos"], 8_500);
    assert_eq!(data["spent"]["currency"], "EUR");
    assert_eq!(data["monthly_spend_cap"]["nanos"], 10_000);
    charge(&*store, &mut book, account, capped.id, 500).await;
    assert!(
        delivered_types(&*store, 4_000).await.is_empty(),
        "80 % fired once"
    );
    charge(&*store, &mut book, account, capped.id, 1_000).await;
    let hundred = delivered_types(&*store, 5_000).await;
    assert_eq!(hundred.len(), 1);
    assert_eq!(hundred[0].1["data"]["percent"], 100);
}

/// Usage rows of every billing status, committed in two batches.
async fn commit_usage(
    store: &dyn Store,
    account: AccountId,
    key: KeyId,
    statuses: &[BillingStatus],
    ms: i64,
) -> Vec<RequestId> {
    let rows: Vec<UsageRow> = statuses
        .iter()
        .map(|status| UsageRow {
            billing_status: *status,
            ..usage_row(account, key, ms)
        })
        .collect();
    let writes: Vec<LedgerWrite> = rows
        .iter()
        .map(|row| LedgerWrite::Usage(Box::new(row.clone())))
        .collect();
    store.commit(BatchId::new(), &writes).await.unwrap();
    rows.iter().map(|row| row.request_id).collect()
}

/// Until a sink has started, the export log has no reader and is not written: a sink that starts
/// later begins at the newest record, so it would never read what came before it.
pub async fn no_export_log_is_kept_before_a_sink_starts(store: Arc<dyn Store>) {
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    commit_usage(
        &*store,
        account,
        master.id,
        &[BillingStatus::Settled],
        1_000,
    )
    .await;
    assert!(store.export_records(0, 100).await.unwrap().is_empty());
    assert_eq!(store.start_export("lago", at(2_000)).await.unwrap(), 0);
    let logged = commit_usage(
        &*store,
        account,
        master.id,
        &[BillingStatus::Settled],
        3_000,
    )
    .await;
    let records = store.export_records(0, 100).await.unwrap();
    assert_eq!(
        records.iter().map(|r| r.request_id).collect::<Vec<_>>(),
        logged
    );
}

pub async fn only_charged_usage_is_logged_for_export_in_commit_order(store: Arc<dyn Store>) {
    use tollgate_store::ParkReason;
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    // The log is kept once a sink has started.
    assert_eq!(store.start_export("lago", at(0)).await.unwrap(), 0);
    let first = commit_usage(
        &*store,
        account,
        master.id,
        &[
            BillingStatus::Settled,
            BillingStatus::Released,
            BillingStatus::Partial,
            BillingStatus::Expired,
            BillingStatus::Estimated,
        ],
        1_000,
    )
    .await;
    let second = commit_usage(
        &*store,
        account,
        master.id,
        &[BillingStatus::Settled],
        2_000,
    )
    .await;
    let records = store.export_records(0, 100).await.unwrap();
    let ids: Vec<RequestId> = records.iter().map(|r| r.request_id).collect();
    assert_eq!(ids, vec![first[0], first[2], first[4], second[0]]);
    assert!(records.windows(2).all(|w| w[0].seq < w[1].seq));
    let record = &records[0];
    assert_eq!(record.cost, Nanos(42));
    assert_eq!(
        (
            record.input_tokens,
            record.cached_input_tokens,
            record.output_tokens
        ),
        (10, 2, 5)
    );
    assert_eq!(record.at, at(1_012));
    assert_eq!(
        store.export_records(records[1].seq, 2).await.unwrap().len(),
        2
    );

    // A sink seen for the first time starts at the newest record, and only once.
    assert_eq!(
        store.start_export("late", at(3_000)).await.unwrap(),
        records[3].seq
    );
    assert!(store
        .advance_export("late", records[3].seq, records[3].seq + 5, &[], at(3_000))
        .await
        .unwrap());
    assert_eq!(
        store.start_export("late", at(3_000)).await.unwrap(),
        records[3].seq + 5
    );

    // The cursor moves only from where it is; what it passes unsent is parked with it.
    let sink = "lago";
    assert_eq!(store.export_cursor(sink).await.unwrap(), 0);
    assert!(!store
        .advance_export(sink, 5, 9, &[], at(3_000))
        .await
        .unwrap());
    let parked = vec![(
        records[1].seq,
        ParkReason::Unmapped,
        "no customer".to_string(),
    )];
    assert!(store
        .advance_export(sink, 0, records[2].seq, &parked, at(3_000))
        .await
        .unwrap());
    assert!(!store
        .advance_export(sink, 0, records[3].seq, &[], at(3_000))
        .await
        .unwrap());
    assert_eq!(store.export_cursor(sink).await.unwrap(), records[2].seq);
    assert_eq!(
        store.export_cursor("stripe").await.unwrap(),
        0,
        "cursors are per sink"
    );
    let standing = store.export_standing(sink).await.unwrap();
    assert_eq!(
        (standing.pending, standing.unmapped, standing.dead),
        (1, 1, 0)
    );
    assert_eq!(standing.head, records[3].seq);
    assert_eq!(standing.oldest_pending, Some(at(2_012)));

    let waiting = store
        .parked_exports(sink, Some(ParkReason::Unmapped), 0, 10)
        .await
        .unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].record, records[1]);
    assert!(store
        .parked_exports(sink, Some(ParkReason::Rejected), 0, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .repark_export(
            sink,
            records[1].seq,
            Some((ParkReason::Rejected, "400".into())),
            at(4_000)
        )
        .await
        .unwrap());
    assert_eq!(store.export_standing(sink).await.unwrap().dead, 1);

    // Nothing parked or unsent is purged; once sent and past, it is.
    let sinks = vec![sink.to_string()];
    assert_eq!(store.purge_exports(at(10_000), &sinks).await.unwrap(), 2);
    assert!(store
        .repark_export(sink, records[1].seq, None, at(5_000))
        .await
        .unwrap());
    assert!(!store
        .repark_export(sink, records[1].seq, None, at(5_000))
        .await
        .unwrap());
    assert_eq!(store.purge_exports(at(10_000), &sinks).await.unwrap(), 1);
    let left = store.export_records(0, 100).await.unwrap();
    assert_eq!(left, vec![records[3].clone()], "the unsent record stays");
}

pub async fn export_totals_sum_per_account_and_day_and_customers_map_per_sink(
    store: Arc<dyn Store>,
) {
    const DAY: i64 = 86_400_000;
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    let (other, _, other_master) = new_account(&*store, Nanos::ZERO).await;
    store.start_export("lago", at(0)).await.unwrap();
    commit_usage(
        &*store,
        account,
        master.id,
        &[BillingStatus::Settled; 3],
        DAY + 5,
    )
    .await;
    commit_usage(
        &*store,
        account,
        master.id,
        &[BillingStatus::Estimated],
        2 * DAY + 5,
    )
    .await;
    commit_usage(
        &*store,
        other,
        other_master.id,
        &[BillingStatus::Released, BillingStatus::Settled],
        DAY,
    )
    .await;
    let totals = store.export_day_totals(at(DAY), at(3 * DAY)).await.unwrap();
    let mut seen: Vec<(AccountId, i64, u64, i64, u64)> = totals
        .iter()
        .map(|t| {
            (
                t.account,
                t.day.timestamp_millis(),
                t.requests,
                t.cost.0,
                t.output_tokens,
            )
        })
        .collect();
    seen.sort_by_key(|s| (s.1, s.0.to_string()));
    let mut expected = vec![
        (account, DAY, 3, 126, 15),
        (other, DAY, 1, 42, 5),
        (account, 2 * DAY, 1, 42, 5),
    ];
    expected.sort_by_key(|s| (s.1, s.0.to_string()));
    assert_eq!(seen, expected);
    assert!(store
        .export_day_totals(at(3 * DAY), at(4 * DAY))
        .await
        .unwrap()
        .is_empty());

    assert!(store
        .export_customers("stripe", true, &[account, other])
        .await
        .unwrap()
        .is_empty());
    store
        .set_export_customer(account, "stripe", Some("cus_A"), at(0))
        .await
        .unwrap();
    store
        .set_export_customer(account, "stripe", Some("cus_B"), at(1))
        .await
        .unwrap();
    assert_eq!(
        store
            .export_customers("stripe", true, &[account, other])
            .await
            .unwrap(),
        vec![(account, "cus_B".to_string())]
    );
    assert!(store
        .export_customers("lago", false, &[account])
        .await
        .unwrap()
        .is_empty());
    store
        .set_export_customer(account, "stripe", None, at(2))
        .await
        .unwrap();
    assert!(store
        .export_customers("stripe", true, &[account])
        .await
        .unwrap()
        .is_empty());
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
                key_limit_counts_unrevoked_keys_and_honours_the_override,
                concurrent_inserts_never_overshoot_the_key_limit,
                updates_change_policy_but_never_a_revoked_key,
                rate_limit_overrides_round_trip_and_reach_the_key_lookup,
                idempotency_claims_have_one_winner_and_replay_what_it_kept,
                concurrent_audit_appends_form_one_unbroken_chain,
                accounts_list_in_id_order_by_page_and_status,
                idempotency_keys_free_on_release_lease_end_and_expiry,
                a_rolled_key_answers_to_both_secrets_with_the_old_ones_deadline,
                ping_answers,
                holds_commit_settle_and_release_in_batches,
                many_resolutions_commit_together_and_a_repeat_refuses_the_batch,
                a_wallet_never_goes_negative_in_the_store,
                usage_rows_round_trip_filter_and_page,
                usage_summaries_group_and_total_by_day_key_route_and_model,
                usage_series_sum_quarter_hours_split_by_key_route_and_model,
                accounts_are_found_by_id_or_by_part_of_their_name,
                an_accounts_monthly_spend_is_kept_per_calendar_month,
                key_activity_sums_each_keys_charges_and_finds_its_last_use,
                console_sessions_round_trip_touch_end_and_purge,
                a_refund_past_the_wallet_is_debt_that_new_credit_repays_once_per_reference,
                topups_round_trip_list_newest_first_and_never_leave_paid,
                payment_events_are_recorded_once_and_wait_until_handled,
                an_auto_top_up_is_due_below_its_threshold_with_a_card_and_starts_once_per_key,
                units_reserve_in_draw_order_settle_return_and_never_pass_a_grant,
                concurrent_reservations_never_draw_more_than_the_grant,
                a_window_caps_its_allowance_and_a_new_period_takes_over_unused_units_once,
                a_subscription_round_trips_and_reaches_the_key_lookup,
                a_low_balance_fires_once_per_episode_and_recovery_rearms_it,
                a_crossing_is_recorded_once_among_concurrent_callers,
                endpoints_keep_their_limit_and_deliveries_retry_fail_and_redeliver,
                a_capped_keys_spend_crosses_80_and_100_percent_once_a_month,
                no_export_log_is_kept_before_a_sink_starts,
                only_charged_usage_is_logged_for_export_in_commit_order,
                export_totals_sum_per_account_and_day_and_customers_map_per_sink,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                // `None`: the backend's server is not running here (never under CI).
                let Some((store, _guard)) = $make.await else {
                    return;
                };
                super::$test(store).await;
            }
        )*
    };
}

async fn sqlite_store() -> Option<(Arc<dyn Store>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate_store::sqlite::SqliteStore::open(&dir.path().join("t.db"))
        .await
        .unwrap();
    Some((Arc::new(store), dir))
}

async fn postgres_store() -> Option<(Arc<dyn Store>, TestSchema)> {
    let schema = TestSchema::create().await?;
    let store = tollgate_store::postgres::PostgresStore::open(schema.url())
        .await
        .unwrap();
    Some((Arc::new(store), schema))
}

store_suite!(sqlite, sqlite_store());
store_suite!(postgres, postgres_store());

async fn next_change(
    changes: &mut tokio::sync::mpsc::Receiver<tollgate_store::StoreChange>,
) -> tollgate_store::StoreChange {
    tokio::time::timeout(std::time::Duration::from_secs(5), changes.recv())
        .await
        .expect("announced")
        .expect("feed open")
}

/// Two nodes on one PostgreSQL: what one changes, the other hears of at commit.
#[tokio::test]
async fn postgres_announces_key_and_account_changes_to_every_listener() {
    use tollgate_store::postgres::PostgresStore;
    use tollgate_store::StoreChange;
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let writer: Arc<dyn Store> = Arc::new(PostgresStore::open(schema.url()).await.unwrap());
    let other: Arc<dyn Store> = Arc::new(PostgresStore::open(schema.url()).await.unwrap());
    let mut changes = other
        .changes()
        .await
        .unwrap()
        .expect("a shared store has a feed");

    let (account, _, master) = new_account(&*writer, Nanos(0)).await;
    writer.revoke_key(master.id, Utc::now()).await.unwrap();
    assert_eq!(next_change(&mut changes).await, StoreChange::Key(master.id));

    let mut stored = writer.account(account).await.unwrap().unwrap();
    stored.status = "suspended".into();
    writer.update_account(&stored).await.unwrap();
    assert_eq!(
        next_change(&mut changes).await,
        StoreChange::Account(account)
    );

    // A new key is nobody's cache yet, so only its roll is announced.
    let (_, usage) = key_for(account, KeyKind::Usage, "rolled");
    insert(&*writer, &usage).await;
    let (_, replacement) = key_for(account, KeyKind::Usage, "new secret");
    writer
        .roll_key(
            usage.id,
            replacement.hash,
            "tg_live_x",
            Utc::now(),
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(next_change(&mut changes).await, StoreChange::Key(usage.id));
    assert!(changes.try_recv().is_err(), "nothing else was announced");
}

async fn postgres_leases() -> Option<(
    Arc<dyn Store>,
    Arc<dyn tollgate_store::LeaseStore>,
    TestSchema,
)> {
    let (store, schema) = postgres_store().await?;
    let leases = store.leases().expect("a shared store leases credit");
    Some((store, leases, schema))
}

/// Nodes racing to carve one wallet never lease more than its balance, and carve every last
/// hold's worth of it.
#[tokio::test]
async fn postgres_concurrent_carves_never_lease_more_than_the_balance() {
    use tollgate_core::NodeId;
    let Some((store, leases, _schema)) = postgres_leases().await else {
        return;
    };
    let (account, _, _) = new_account(&*store, Nanos(1_000)).await;
    let nodes = [NodeId::new(), NodeId::new(), NodeId::new()];
    let mut carves = tokio::task::JoinSet::new();
    for i in 0..60 {
        let leases = leases.clone();
        let node = nodes[i % 3];
        carves.spawn(async move {
            leases
                .carve(account, node, Nanos::ZERO, Nanos(10), Utc::now())
                .await
                .unwrap()
        });
    }
    let carved = carves.join_all().await;
    let granted: i64 = carved.iter().map(|c| c.granted.0).sum();
    let leased: i64 = leases
        .leases_of(account)
        .await
        .unwrap()
        .iter()
        .map(|(_, amount)| amount.0)
        .sum();
    assert_eq!(granted, leased);
    assert!(leased <= 1_000, "leased {leased} of 1000");
    // Demand (60 × 10) exceeds the balance: only less than one hold's worth stays free.
    assert!(1_000 - leased < 10, "leased {leased} of 1000");
    assert!(carved.iter().all(|c| c.granted.0 == 0 || c.granted.0 >= 10));
    // Leases are not ledger entries: the balance is the customer's, whoever leases it.
    assert_eq!(
        store.wallet(account).await.unwrap().unwrap().available,
        Nanos(1_000)
    );
}

/// A node's batches move its lease with the balance; a batch that would overdraw its lease
/// is refused whole; give-backs free credit; a lease not renewed is reclaimed.
#[tokio::test]
async fn postgres_a_nodes_batches_move_its_lease_and_never_overdraw_it() {
    use tollgate_core::NodeId;
    let Some((store, leases, _schema)) = postgres_leases().await else {
        return;
    };
    let (account, _, master) = new_account(&*store, Nanos(800)).await;
    let node = NodeId::new();
    let lease_of = |leases: Arc<dyn tollgate_store::LeaseStore>| async move {
        leases.leases_of(account).await.unwrap()
    };
    let carve = leases
        .carve(account, node, Nanos::ZERO, Nanos(60), at(0))
        .await
        .unwrap();
    // An eighth of what is free (100) in whole holds: one.
    assert_eq!(
        carve,
        tollgate_store::Carve {
            granted: Nanos(60),
            free: Nanos(740),
            leased: Nanos::ZERO,
        }
    );

    let mut book = Book::new();
    book.load_wallet(account, Wallet::default());
    book.load_key_spend(master.id, at(0), Nanos::ZERO);
    book.add_lease(account, carve.granted);
    let open = open_hold(&mut book, account, master.id, 60, 1);
    let settle = resolve(&mut book, &open, Resolve::Settle(Nanos(25)), 2);
    leases
        .commit_leased(BatchId::new(), node, &[open])
        .await
        .unwrap();
    assert_eq!(lease_of(leases.clone()).await, vec![(node, Nanos(0))]);
    leases
        .commit_leased(BatchId::new(), node, &[settle])
        .await
        .unwrap();
    // 35 of the 60 held came back to the lease; the balance lost the 25 charged.
    assert_eq!(lease_of(leases.clone()).await, vec![(node, Nanos(35))]);
    assert_eq!(
        store.wallet(account).await.unwrap().unwrap().available,
        Nanos(775)
    );

    // A book that spends more than its lease (35) takes the rest from the free balance (its
    // lease may have been reclaimed while it was cut off); what neither covers is refused, and
    // nothing of it is applied. Another node leases all but 40 of what is free.
    let other = NodeId::new();
    leases
        .carve(account, other, Nanos::ZERO, Nanos(700), at(3))
        .await
        .unwrap();
    let mut rogue = Book::new();
    rogue.load_wallet(account, Wallet::default());
    rogue.load_key_spend(master.id, at(0), Nanos::ZERO);
    rogue.add_lease(account, Nanos(500));
    let overdraw = open_hold(&mut rogue, account, master.id, 80, 3);
    assert!(matches!(
        leases
            .commit_leased(BatchId::new(), node, &[overdraw])
            .await,
        Err(tollgate_store::StoreError::Corrupt(_))
    ));
    assert_eq!(
        lease_of(leases.clone()).await,
        vec![(node, Nanos(35)), (other, Nanos(700))]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    let covered = open_hold(&mut rogue, account, master.id, 70, 3);
    leases
        .commit_leased(BatchId::new(), node, &[covered])
        .await
        .unwrap();
    assert_eq!(
        store.wallet(account).await.unwrap().unwrap().available,
        Nanos(705)
    );
    leases
        .return_lease(account, other, Nanos(700))
        .await
        .unwrap();
    // The node's lease is spent, the free balance gave the other 35.
    assert_eq!(
        lease_of(leases.clone())
            .await
            .iter()
            .map(|(_, n)| n.0)
            .sum::<i64>(),
        0
    );

    // Carving for a hold larger than an eighth of what is free.
    let carve = leases
        .carve(account, node, Nanos::ZERO, Nanos(200), at(4))
        .await
        .unwrap();
    assert_eq!(
        carve,
        tollgate_store::Carve {
            granted: Nanos(200),
            free: Nanos(505),
            leased: Nanos::ZERO,
        }
    );
    leases
        .return_lease(account, node, Nanos(150))
        .await
        .unwrap();
    assert_eq!(
        lease_of(leases.clone())
            .await
            .iter()
            .map(|(_, n)| n.0)
            .sum::<i64>(),
        50
    );
    // Asking for more than is free grants nothing but still gives back.
    let carve = leases
        .carve(account, node, Nanos(50), Nanos(10_000), at(5))
        .await
        .unwrap();
    assert_eq!(
        carve,
        tollgate_store::Carve {
            granted: Nanos::ZERO,
            free: Nanos(705),
            leased: Nanos::ZERO,
        }
    );

    // Renewal drops empty leases and keeps the rest from being reclaimed.
    leases
        .carve(account, node, Nanos::ZERO, Nanos(1), at(6))
        .await
        .unwrap();
    leases
        .carve(account, other, Nanos::ZERO, Nanos(1), at(6))
        .await
        .unwrap();
    leases.renew_leases(node, at(10_000)).await.unwrap();
    assert_eq!(
        leases.reclaim_leases(at(5_000)).await.unwrap(),
        1,
        "the other node's"
    );
    let left = lease_of(leases.clone()).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, node);
    assert_books_balance_only(&*store).await;
}

async fn assert_books_balance_only(store: &dyn Store) {
    let trial = store.trial_balance().await.unwrap();
    assert_eq!(trial.iter().map(|(_, n)| n).sum::<i64>(), 0, "{trial:?}");
}

/// The store keeps each key's month (charged, held) from every batch, and refuses a batch that
/// opens a hold past the key's cap, whichever node sends it; a new month starts from what is
/// still held.
#[tokio::test]
async fn postgres_key_spend_follows_every_batch_and_refuses_a_hold_past_the_cap() {
    use tollgate_core::NodeId;
    let Some((store, leases, _schema)) = postgres_leases().await else {
        return;
    };
    let (account, _, master) = new_account(&*store, Nanos(1_000)).await;
    let (node, other) = (NodeId::new(), NodeId::new());
    let mut book = Book::new();
    book.load_wallet(account, Wallet::default());
    book.load_key_spend(master.id, at(0), Nanos::ZERO);
    let capped = |write: LedgerWrite, cap: i64| match write {
        LedgerWrite::OpenHold {
            record, transfer, ..
        } => LedgerWrite::OpenHold {
            record,
            transfer,
            key_cap: Some(Nanos(cap)),
        },
        other => other,
    };
    for n in [node, other] {
        leases
            .carve(account, n, Nanos::ZERO, Nanos(400), at(0))
            .await
            .unwrap();
    }
    book.add_lease(account, Nanos(800));
    // Two nodes each open 40 against a cap of 100; a third 40 is refused.
    let a = capped(open_hold(&mut book, account, master.id, 40, 1), 100);
    let b = capped(open_hold(&mut book, account, master.id, 40, 2), 100);
    let c = capped(open_hold(&mut book, account, master.id, 40, 3), 100);
    leases
        .commit_leased(BatchId::new(), node, std::slice::from_ref(&a))
        .await
        .unwrap();
    leases
        .commit_leased(BatchId::new(), other, &[b])
        .await
        .unwrap();
    assert!(matches!(
        leases.commit_leased(BatchId::new(), node, &[c]).await,
        Err(tollgate_store::StoreError::Corrupt(_))
    ));
    let now = at(10);
    assert_eq!(
        leases.key_spend(master.id, now).await.unwrap(),
        (Nanos(0), Nanos(80))
    );
    // A settle of 15 of the first 40: 15 spent, 40 held; then 60 more fit under the cap.
    let settle = resolve(&mut book, &a, Resolve::Settle(Nanos(15)), 11);
    leases
        .commit_leased(BatchId::new(), node, &[settle])
        .await
        .unwrap();
    assert_eq!(
        leases.key_spend(master.id, now).await.unwrap(),
        (Nanos(15), Nanos(40))
    );
    let d = capped(open_hold(&mut book, account, master.id, 45, 12), 100);
    leases
        .commit_leased(BatchId::new(), node, &[d])
        .await
        .unwrap();
    // Uncapped holds count too, so a cap set later starts from the truth.
    let e = open_hold(&mut book, account, master.id, 5, 13);
    leases
        .commit_leased(BatchId::new(), node, &[e])
        .await
        .unwrap();
    assert_eq!(
        leases.key_spend(master.id, now).await.unwrap(),
        (Nanos(15), Nanos(90))
    );
    // Read in a later month: nothing spent there yet, the pending holds still held.
    assert_eq!(
        leases
            .key_spend(master.id, at(40 * 86_400_000))
            .await
            .unwrap(),
        (Nanos(0), Nanos(90))
    );
}

/// A refund or dispute takes only the free balance: a batch taking credit a node leases is
/// refused, so leases never sum to more than the wallet.
#[tokio::test]
async fn postgres_a_take_from_outside_never_reaches_leased_credit() {
    use tollgate_core::ledger::{LedgerAccount, TransferKind};
    use tollgate_core::NodeId;
    let Some((store, leases, _schema)) = postgres_leases().await else {
        return;
    };
    let (account, _, _) = new_account(&*store, Nanos(100)).await;
    let node = NodeId::new();
    let carved = leases
        .carve(account, node, Nanos::ZERO, Nanos(80), Utc::now())
        .await
        .unwrap();
    assert_eq!(carved.granted, Nanos(80));
    let take = |amount: i64, reference: &str| {
        payment_writes(
            account,
            vec![Transfer {
                debit: LedgerAccount::Wallet(account),
                credit: LedgerAccount::External,
                amount: Nanos(amount),
                kind: TransferKind::Refund,
            }],
            reference,
        )
    };
    let refused = store
        .commit(BatchId::new(), &take(21, "payment:t:refund:re_1"))
        .await;
    assert!(
        matches!(refused, Err(tollgate_store::StoreError::Corrupt(_))),
        "{refused:?}"
    );
    store
        .commit(BatchId::new(), &take(20, "payment:t:refund:re_2"))
        .await
        .unwrap();
    let wallet = store.wallet(account).await.unwrap().unwrap();
    assert_eq!(wallet.available, Nanos(80));
    let leased: i64 = leases
        .leases_of(account)
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n.0)
        .sum();
    assert_eq!(leased, 80);
}

/// A batch that inserted its export rows but has not committed yet, while a later batch commits
/// and a reader moves past it: once it commits, the reader still finds its rows. Numbers taken at
/// insert would put them behind the reader's cursor, and they would never be sent.
#[tokio::test]
async fn postgres_a_batch_committing_late_is_still_read_after_the_cursor() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(
        tollgate_store::postgres::PostgresStore::open(schema.url())
            .await
            .unwrap(),
    );
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    store.start_export("lago", at(0)).await.unwrap();
    // The late batch, by hand: the statement the store's batches run, left uncommitted.
    let raw = sqlx::PgPool::connect(schema.url()).await.unwrap();
    let mut late = raw.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO usage_exports (request_id, account_id, key_id, route, model, billing_status, \
         cost_nanos, input_tokens, cached_input_tokens, output_tokens, at) \
         VALUES ('req_01JXATE0000000000000000000', $1, $2, '/v1', NULL, 'settled', 7, 0, 0, 0, 1000)",
    )
    .bind(account.to_string())
    .bind(master.id.to_string())
    .execute(&mut *late)
    .await
    .unwrap();
    let early = commit_usage(
        &*store,
        account,
        master.id,
        &[BillingStatus::Settled],
        2_000,
    )
    .await;
    let seen = store.export_records(0, 100).await.unwrap();
    assert_eq!(seen.iter().map(|r| r.request_id).collect::<Vec<_>>(), early);
    let cursor = seen.last().unwrap().seq;
    late.commit().await.unwrap();
    let after = store.export_records(cursor, 100).await.unwrap();
    assert_eq!(
        after.len(),
        1,
        "the late batch's row comes after the cursor"
    );
    assert_eq!(
        after[0].request_id.to_string(),
        "req_01JXATE0000000000000000000"
    );
    raw.close().await;
}

/// Batches committing at once on several connections, while a reader follows the export log
/// by its last seq: it must see every record. A sequence numbered at insert would let the
/// reader pass a number whose batch had not committed yet, and lose that record.
#[tokio::test]
async fn postgres_the_export_log_is_read_in_commit_order_under_concurrent_batches() {
    let Some((store, _schema)) = postgres_store().await else {
        return;
    };
    let (account, _, master) = new_account(&*store, Nanos::ZERO).await;
    store.start_export("lago", at(0)).await.unwrap();
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..25 {
                    ids.extend(
                        commit_usage(
                            &*store,
                            account,
                            master.id,
                            &[BillingStatus::Settled; 3],
                            1_000,
                        )
                        .await,
                    );
                }
                ids
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut after = 0;
    let mut done = false;
    while !done {
        done = writers.iter().all(|w| w.is_finished());
        for record in store.export_records(after, 1_000).await.unwrap() {
            after = record.seq;
            seen.insert(record.request_id);
        }
    }
    let mut written = std::collections::HashSet::new();
    for writer in writers {
        written.extend(writer.await.unwrap());
    }
    for record in store.export_records(after, 1_000).await.unwrap() {
        seen.insert(record.request_id);
    }
    assert_eq!(written.len(), 600);
    assert_eq!(
        seen, written,
        "the reader following the log saw every record"
    );
}
