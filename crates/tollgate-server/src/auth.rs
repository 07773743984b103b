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
    if let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, secret) = value.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| secret.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
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

impl HttpError {
    fn with_detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.error = self.error.with_detail(key, value);
        self
    }
}

/// Who is calling the management API.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The operator, with the admin token.
    Admin,
    Key(Arc<KeyRecord>),
}

impl Caller {
    /// The key, if it is a master key; usage keys may not manage anything.
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
