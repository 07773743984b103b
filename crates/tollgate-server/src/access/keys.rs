//! Authentication: who is calling, decided from memory on the hot path. It takes the key cache,
//! the store and the time it needs, and knows no request beyond the secret and address given.
//!
//! A key is checked for format and checksum first (a malformed key never reaches the store), then
//! looked up by its SHA-256 in the [`KeyCache`], which falls back to the store on a miss. Status,
//! expiry, a rolled secret's grace period and the IP allowlist are judged on every request against
//! the clock and the client address, so an expired key fails the moment it expires; every change
//! to a key invalidates its cache entries, so it takes effect on the next request.

use crate::http::error::HttpError;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tollgate_core::key::secret_matches;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::{access, AccountId, ApiKey, ErrorCode, KeyHash, KeyId, KeyStatus, Nanos};
use tollgate_store::{KeyRecord, KeyStore, StoreError};

/// Verifies an API key, its status and where it is used from; the key as cached on success.
pub async fn authenticate_key(
    keys: &KeyCache,
    store: &dyn KeyStore,
    now: DateTime<Utc>,
    secret: Option<&str>,
    client: Option<IpAddr>,
) -> Result<CachedKey, HttpError> {
    let found = find_key(keys, store, secret).await?;
    admit_key(&found, now, client)?;
    Ok(found)
}

/// The key a secret belongs to: its format and checksum checked, then looked up. Whether it may
/// be used ([`admit_key`]) is a separate question, so a refusal can still be filed under the
/// key's account.
pub async fn find_key(
    keys: &KeyCache,
    store: &dyn KeyStore,
    secret: Option<&str>,
) -> Result<CachedKey, HttpError> {
    let Some(secret) = secret else {
        return Err(HttpError::new(
            ErrorCode::InvalidApiKey,
            "No API key was provided. Send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.",
        ));
    };
    let key = ApiKey::parse(secret).map_err(|reason| {
        HttpError::new(
            ErrorCode::InvalidApiKey,
            format!("The API key is malformed: {reason}."),
        )
    })?;
    let hash = key.hash();
    keys.get(&hash, store)
        .await?
        .ok_or_else(|| HttpError::new(ErrorCode::InvalidApiKey, "The API key is not valid."))
}

/// Whether a found key may be used now, from `client`: its status, expiry, account and IP
/// allowlist.
pub fn admit_key(
    found: &CachedKey,
    now: DateTime<Utc>,
    client: Option<IpAddr>,
) -> Result<(), HttpError> {
    check_status(found, now)?;
    let record = &found.record;
    if found.account_suspended {
        return Err(HttpError::new(
            ErrorCode::Forbidden,
            format!(
                "The account {} is suspended; its keys cannot be used. Contact the operator.",
                record.account_id
            ),
        ));
    }
    if !access::ip_allowed(&record.allowed_ips, client.unwrap_or(UNKNOWN_CLIENT)) {
        let shown = client.map_or("unknown".to_string(), |ip| ip.to_string());
        return Err(HttpError::new(
            ErrorCode::IpNotAllowed,
            format!(
                "The API key {} may not be used from {shown}; its IP allowlist does not include it.",
                record.id
            ),
        )
        .with_detail("client_ip", shown));
    }
    Ok(())
}

/// Stands in for a client whose address is unknown: inside no allowlist anyone would write.
const UNKNOWN_CLIENT: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

fn check_status(found: &CachedKey, now: DateTime<Utc>) -> Result<(), HttpError> {
    let record = &*found.record;
    if let (KeyStatus::Active | KeyStatus::Inactive, Some(deadline)) =
        (record.status, found.secret_expires_at)
    {
        if deadline <= now {
            let at = tollgate_core::clock::rfc3339(deadline);
            return Err(HttpError::new(
                ErrorCode::KeyRevoked,
                format!(
                    "This secret of API key {} was replaced when the key was rolled, and stopped \
                     working at {at}. Use the new secret.",
                    record.id
                ),
            )
            .with_detail("revoked_at", at));
        }
    }
    match record.status {
        KeyStatus::Revoked => {
            let mut error = HttpError::new(
                ErrorCode::KeyRevoked,
                format!("The API key {} has been revoked.", record.id),
            );
            if let Some(at) = record.revoked_at {
                error = error.with_detail("revoked_at", tollgate_core::clock::rfc3339(at));
            }
            return Err(error);
        }
        KeyStatus::Inactive => {
            return Err(HttpError::new(
                ErrorCode::KeyInactive,
                format!("The API key {} is inactive.", record.id),
            ))
        }
        KeyStatus::Active => {}
    }
    if let Some(expires_at) = record.expires_at {
        if expires_at <= now {
            return Err(HttpError::new(
                ErrorCode::KeyExpired,
                format!(
                    "The API key {} expired at {}.",
                    record.id,
                    tollgate_core::clock::rfc3339(expires_at)
                ),
            )
            .with_detail("expired_at", tollgate_core::clock::rfc3339(expires_at)));
        }
    }
    Ok(())
}

/// Who presented the request's credential, before any rate limit or permission is judged.
#[derive(Debug, Clone)]
pub enum Identity {
    Admin,
    Key(CachedKey),
}

/// The admin token (any credential not shaped like an API key is compared with it) or an API
/// key, verified as [`authenticate_key`] does.
pub async fn identify(
    admin_token: Option<&str>,
    keys: &KeyCache,
    store: &dyn KeyStore,
    now: DateTime<Utc>,
    secret: Option<&str>,
    client: Option<IpAddr>,
) -> Result<Identity, HttpError> {
    if let (Some(secret), Some(admin)) = (secret, admin_token) {
        if !secret.starts_with("tg_") {
            return if secret_matches(secret, admin) {
                Ok(Identity::Admin)
            } else {
                Err(HttpError::new(
                    ErrorCode::InvalidApiKey,
                    "The API key or admin token is not valid.",
                ))
            };
        }
    }
    Ok(Identity::Key(
        authenticate_key(keys, store, now, secret, client).await?,
    ))
}

/// A key as cached under one of its secrets.
#[derive(Debug, Clone)]
pub struct CachedKey {
    pub record: Arc<KeyRecord>,
    /// Set for a secret a roll replaced: when it stops working.
    pub secret_expires_at: Option<DateTime<Utc>>,
    /// The key's account's rate-limit overrides.
    pub account_rate_limits: Arc<Overrides>,
    pub account_suspended: bool,
    /// What the account owed when this was read: its keys open no hold while it owes.
    pub account_debt: Nanos,
    /// The account's plan and subscription, if it has one of its own.
    pub subscription: Option<Arc<tollgate_core::plan::Subscription>>,
}

/// Key records by secret hash, in memory, bounded.
///
/// Hand-written rather than a cache crate because an invalidation must win over a concurrent
/// load: a load that read the store before a change must not put the stale record back after
/// it. Every invalidation bumps `generation`; a load caches its result only if no invalidation
/// happened while it read the store. A rolled key is cached under each of its secrets, so entries
/// are also indexed by key id and a change to a key drops them all. When full, an arbitrary entry
/// is evicted (O(1)).
pub struct KeyCache {
    entries: RwLock<Entries>,
    generation: AtomicU64,
    capacity: usize,
    /// Lookups answered from memory, and those that read the store (for `/metrics`).
    pub hits: Counter,
    pub misses: Counter,
}

#[derive(Default)]
struct Entries {
    by_hash: HashMap<KeyHash, CachedKey>,
    hashes_of: HashMap<KeyId, Vec<KeyHash>>,
}

impl Entries {
    fn remove(&mut self, hash: &KeyHash) {
        let Some(entry) = self.by_hash.remove(hash) else {
            return;
        };
        if let Some(hashes) = self.hashes_of.get_mut(&entry.record.id) {
            hashes.retain(|h| h != hash);
            if hashes.is_empty() {
                self.hashes_of.remove(&entry.record.id);
            }
        }
    }
}

impl KeyCache {
    /// Registers the counters this keeps, for `/metrics`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "key_cache_hits",
            "API key lookups answered from memory",
            self.hits.clone(),
        );
        registry.register(
            "key_cache_misses",
            "API key lookups that read the store",
            self.misses.clone(),
        );
    }

    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            entries: RwLock::new(Entries::default()),
            generation: AtomicU64::new(0),
            capacity: capacity.max(1),
            hits: Counter::default(),
            misses: Counter::default(),
        }
    }

    /// The key with this secret hash, from memory or else the store. Unknown keys are not cached.
    pub async fn get(
        &self,
        hash: &KeyHash,
        store: &dyn KeyStore,
    ) -> Result<Option<CachedKey>, StoreError> {
        if let Some(hit) = self.read().by_hash.get(hash) {
            self.hits.inc();
            return Ok(Some(hit.clone()));
        }
        self.misses.inc();
        let generation = self.generation.load(Ordering::Acquire);
        let Some(found) = store.key_by_hash(hash).await? else {
            return Ok(None);
        };
        let entry = CachedKey {
            record: Arc::new(found.key),
            secret_expires_at: found.secret_expires_at,
            account_rate_limits: Arc::new(found.account_rate_limits),
            account_suspended: found.account_suspended,
            account_debt: found.account_debt,
            subscription: found.subscription.map(Arc::new),
        };
        let mut entries = self.write();
        if self.generation.load(Ordering::Acquire) == generation {
            if entries.by_hash.len() >= self.capacity {
                if let Some(victim) = entries.by_hash.keys().next().copied() {
                    entries.remove(&victim);
                }
            }
            entries.remove(hash);
            entries
                .hashes_of
                .entry(entry.record.id)
                .or_default()
                .push(*hash);
            entries.by_hash.insert(*hash, entry.clone());
        }
        Ok(Some(entry))
    }

    /// The account of a cached key, from memory only (the load shedder's view of who is calling).
    pub fn cached_account(&self, hash: &KeyHash) -> Option<AccountId> {
        self.read()
            .by_hash
            .get(hash)
            .map(|entry| entry.record.account_id)
    }

    /// Forgets every key of an account (after a change to the account's settings). A scan of
    /// the cache, acceptable for a rare operator action.
    pub fn invalidate_account(&self, account: AccountId) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut entries = self.write();
        let keys: Vec<KeyId> = entries
            .hashes_of
            .keys()
            .copied()
            .filter(|id| {
                entries.hashes_of[id].first().is_some_and(|hash| {
                    entries
                        .by_hash
                        .get(hash)
                        .is_some_and(|e| e.record.account_id == account)
                })
            })
            .collect();
        for key in keys {
            for hash in entries.hashes_of.remove(&key).unwrap_or_default() {
                entries.by_hash.remove(&hash);
            }
        }
    }

    /// Forgets every secret of a key so the next request reads it afresh. Call after every
    /// change to a key.
    pub fn invalidate(&self, key: KeyId) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut entries = self.write();
        for hash in entries.hashes_of.remove(&key).unwrap_or_default() {
            entries.by_hash.remove(&hash);
        }
    }

    /// Forgets everything (when change announcements may have been missed).
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let mut entries = self.write();
        entries.by_hash.clear();
        entries.hashes_of.clear();
    }

    pub fn len(&self) -> usize {
        self.read().by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Notify;
    use tollgate_core::KeyKind;
    use tollgate_core::{AccountId, KeyEnv};
    use tollgate_store::{InsertKeyOutcome, KeyChange, KeyLookup, NewKey, RevokeOutcome};

    /// A key store whose lookups wait for `release`, to stage a load racing an invalidation.
    struct SlowStore {
        record: KeyRecord,
        release: Notify,
        lookups: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl KeyStore for SlowStore {
        async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            self.release.notified().await;
            // Any other hash is a secret the key's roll replaced.
            let rolled = (*hash != self.record.hash).then(Utc::now);
            Ok(Some(KeyLookup {
                key: self.record.clone(),
                secret_expires_at: rolled,
                account_rate_limits: Default::default(),
                account_suspended: false,
                account_debt: Nanos::ZERO,
                subscription: None,
            }))
        }
        async fn insert_key(&self, _: &KeyRecord, _: u32) -> Result<InsertKeyOutcome, StoreError> {
            unreachable!()
        }
        async fn update_key(&self, _: &KeyRecord) -> Result<KeyChange, StoreError> {
            unreachable!()
        }
        async fn roll_key(
            &self,
            _: KeyId,
            _: KeyHash,
            _: &str,
            _: DateTime<Utc>,
            _: DateTime<Utc>,
        ) -> Result<KeyChange, StoreError> {
            unreachable!()
        }
        async fn key_by_id(&self, _: KeyId) -> Result<Option<KeyRecord>, StoreError> {
            unreachable!()
        }
        async fn keys(
            &self,
            _: Option<AccountId>,
            _: Option<KeyId>,
            _: u32,
        ) -> Result<Vec<KeyRecord>, StoreError> {
            unreachable!()
        }
        async fn revoke_key(
            &self,
            _: KeyId,
            _: chrono::DateTime<Utc>,
        ) -> Result<RevokeOutcome, StoreError> {
            unreachable!()
        }
    }

    fn slow_store() -> Arc<SlowStore> {
        let key = NewKey::new(AccountId::new(), KeyKind::Usage, "k");
        Arc::new(SlowStore {
            record: KeyRecord::issue(KeyEnv::Live, key, Utc::now()).1,
            release: Notify::new(),
            lookups: Default::default(),
        })
    }

    #[tokio::test]
    async fn a_load_that_raced_an_invalidation_is_not_cached() {
        let store = slow_store();
        let cache = Arc::new(KeyCache::new(10));
        let hash = store.record.hash;
        let load = tokio::spawn({
            let (cache, store) = (cache.clone(), store.clone());
            async move { cache.get(&hash, &*store).await }
        });
        // The load has read the store (it is waiting for its answer) when the key changes.
        while store.lookups.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        cache.invalidate(store.record.id);
        store.release.notify_one();
        assert!(load.await.unwrap().unwrap().is_some());
        assert!(
            cache.is_empty(),
            "a record read before the invalidation was cached"
        );
    }

    #[tokio::test]
    async fn loads_are_cached_and_the_cache_stays_bounded() {
        let store = slow_store();
        let cache = KeyCache::new(1);
        store.release.notify_one();
        cache.get(&store.record.hash, &*store).await.unwrap();
        assert_eq!(cache.len(), 1);
        // A hit does not ask the store again.
        cache.get(&store.record.hash, &*store).await.unwrap();
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
        // Another key evicts the first rather than growing past the capacity.
        let other = KeyHash([7; 32]);
        store.release.notify_one();
        cache.get(&other, &*store).await.unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn invalidating_a_rolled_key_forgets_every_secret() {
        let store = slow_store();
        let cache = KeyCache::new(10);
        let old_secret = KeyHash([7; 32]);
        for hash in [store.record.hash, old_secret] {
            store.release.notify_one();
            cache.get(&hash, &*store).await.unwrap();
        }
        assert_eq!(cache.len(), 2);
        let old = cache.get(&old_secret, &*store).await.unwrap().unwrap();
        assert!(old.secret_expires_at.is_some());
        cache.invalidate(store.record.id);
        assert!(cache.is_empty());
        assert!(cache.read().hashes_of.is_empty());
    }
}
