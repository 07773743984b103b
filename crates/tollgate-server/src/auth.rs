//! Authentication: who is calling, decided from memory on the hot path.
//!
//! A key is checked for format and checksum first (a malformed key never reaches the store), then
//! looked up by its SHA-256 in the [`KeyCache`], which falls back to the store on a miss. Status
//! and expiry are judged on every request against the clock, so an expired key fails the moment
//! it expires; a revocation invalidates the cache entry, so it takes effect on the next request.

use crate::error::HttpError;
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tollgate_core::key::secret_matches;
use tollgate_core::{ApiKey, ErrorCode, KeyHash, KeyKind, KeyStatus};
use tollgate_store::{KeyRecord, KeyStore, StoreError};

/// The credential a request presents: `Authorization: Bearer <secret>` or `X-Api-Key: <secret>`.
pub fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let bearer = header(http::header::AUTHORIZATION.as_str()).and_then(|value| {
        let (scheme, secret) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| secret.trim())
    });
    bearer
        .or_else(|| header("x-api-key"))
        .filter(|secret| !secret.is_empty())
}

/// Verifies an API key and its status; the key's record on success.
pub async fn authenticate_key(
    state: &AppState,
    secret: Option<&str>,
) -> Result<Arc<KeyRecord>, HttpError> {
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
    let record = state
        .keys
        .get(&hash, &*state.store)
        .await?
        .filter(|record| record.hash.ct_eq(&hash))
        .ok_or_else(|| HttpError::new(ErrorCode::InvalidApiKey, "The API key is not valid."))?;
    check_status(&record, state)?;
    Ok(record)
}

fn check_status(record: &KeyRecord, state: &AppState) -> Result<(), HttpError> {
    match record.status {
        KeyStatus::Revoked => {
            return Err(HttpError::new(
                ErrorCode::KeyRevoked,
                format!("The API key {} has been revoked.", record.id),
            ))
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
        if expires_at <= state.clock.now() {
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

/// Who is calling the management API.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The operator, with the admin token.
    Admin,
    Key(Arc<KeyRecord>),
}

impl Caller {
    /// Passes for the admin and master keys; usage keys may not manage anything (403 `forbidden`).
    pub fn require_master_or_admin(&self) -> Result<(), HttpError> {
        match self {
            Caller::Key(key) if key.kind == KeyKind::Usage => Err(HttpError::new(
                ErrorCode::Forbidden,
                "Usage keys cannot manage anything. Use a master key or the admin token.",
            )),
            _ => Ok(()),
        }
    }

    pub fn require_admin(&self) -> Result<(), HttpError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Key(_) => Err(HttpError::new(
                ErrorCode::Forbidden,
                "This operation needs the admin token.",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, HttpError> {
        let secret = presented_secret(&parts.headers);
        if let (Some(secret), Some(admin)) = (secret, &state.config.admin_token) {
            if !secret.starts_with("tg_") {
                return if secret_matches(secret, &admin.0) {
                    Ok(Caller::Admin)
                } else {
                    Err(HttpError::new(
                        ErrorCode::InvalidApiKey,
                        "The API key or admin token is not valid.",
                    ))
                };
            }
        }
        authenticate_key(state, secret).await.map(Caller::Key)
    }
}

/// Key records by hash, in memory, bounded.
///
/// Hand-written rather than a cache crate because an invalidation must win over a concurrent
/// load: a load that read the store before a revocation must not put the stale record back after
/// it. Every invalidation bumps `generation`; a load caches its result only if no invalidation
/// happened while it read the store. When full, an arbitrary entry is evicted (O(1)).
pub struct KeyCache {
    entries: RwLock<HashMap<KeyHash, Arc<KeyRecord>>>,
    generation: AtomicU64,
    capacity: usize,
}

impl KeyCache {
    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            entries: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            capacity: capacity.max(1),
        }
    }

    /// The key with this hash, from memory or else the store. Unknown keys are not cached.
    pub async fn get(
        &self,
        hash: &KeyHash,
        store: &dyn KeyStore,
    ) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        if let Some(hit) = self.read().get(hash) {
            return Ok(Some(hit.clone()));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Some(record) = store.key_by_hash(hash).await? else {
            return Ok(None);
        };
        let record = Arc::new(record);
        let mut entries = self.write();
        if self.generation.load(Ordering::Acquire) == generation {
            if entries.len() >= self.capacity {
                if let Some(victim) = entries.keys().next().copied() {
                    entries.remove(&victim);
                }
            }
            entries.insert(*hash, record.clone());
        }
        Ok(Some(record))
    }

    /// Forgets a key so the next request reads it afresh. Call after every change to a key.
    pub fn invalidate(&self, hash: &KeyHash) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.write().remove(hash);
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<KeyHash, Arc<KeyRecord>>> {
        self.entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<KeyHash, Arc<KeyRecord>>> {
        self.entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use tokio::sync::Notify;
    use tollgate_core::{AccountId, KeyEnv, KeyId};
    use tollgate_store::{NewKey, RevokeOutcome};

    /// A key store whose lookups wait for `release`, to stage a load racing an invalidation.
    struct SlowStore {
        record: KeyRecord,
        release: Notify,
        lookups: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl KeyStore for SlowStore {
        async fn key_by_hash(&self, _: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            self.release.notified().await;
            Ok(Some(self.record.clone()))
        }
        async fn insert_key(&self, _: &KeyRecord) -> Result<(), StoreError> {
            unreachable!()
        }
        async fn key_by_id(&self, _: KeyId) -> Result<Option<KeyRecord>, StoreError> {
            unreachable!()
        }
        async fn keys_of_account(&self, _: AccountId) -> Result<Vec<KeyRecord>, StoreError> {
            unreachable!()
        }
        async fn all_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
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
        let key = NewKey {
            monthly_spend_cap: None,
            account_id: AccountId::new(),
            kind: KeyKind::Usage,
            name: "k".into(),
            scopes: vec!["*".into()],
            expires_at: None,
        };
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
        cache.invalidate(&hash);
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

    #[test]
    fn credentials_come_from_bearer_or_x_api_key() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, http::HeaderValue::from_static(value));
            }
            map
        };
        assert_eq!(
            presented_secret(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            presented_secret(&headers(&[("authorization", "bearer  abc ")])),
            Some("abc")
        );
        assert_eq!(
            presented_secret(&headers(&[("x-api-key", "abc")])),
            Some("abc")
        );
        assert_eq!(
            presented_secret(&headers(&[
                ("authorization", "Basic xyz"),
                ("x-api-key", "abc")
            ])),
            Some("abc")
        );
        assert_eq!(
            presented_secret(&headers(&[("authorization", "Basic xyz")])),
            None
        );
        assert_eq!(presented_secret(&headers(&[("x-api-key", " ")])), None);
        assert_eq!(presented_secret(&headers(&[])), None);
    }
}
