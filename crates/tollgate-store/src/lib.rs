//! Tollgate's storage. One trait per concern ([`AccountStore`], [`KeyStore`], [`LedgerStore`],
//! [`StoreHealth`]); [`Store`] is all of them. The server holds an `Arc<dyn Store>` and never sees
//! SQL. [`sqlite::SqliteStore`] is the embedded default; every backend passes the conformance
//! suite in `tests/conformance.rs`.

pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tollgate_core::{AccountId, ApiKey, KeyEnv, KeyHash, KeyId, KeyKind, KeyStatus, Nanos};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or failed; the caller answers 503.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data that breaks an invariant (a bug or tampering); the caller answers 500.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub status: String,
    pub balance: Nanos,
    pub created_at: DateTime<Utc>,
}

/// A key as stored: everything but the plaintext, which is never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub account_id: AccountId,
    pub hash: KeyHash,
    pub display_prefix: String,
    pub kind: KeyKind,
    pub status: KeyStatus,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What a new key is for; [`KeyRecord::issue`] turns it into a secret and its record.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub account_id: AccountId,
    pub kind: KeyKind,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl KeyRecord {
    /// A fresh secret and the active record to store for it. The secret exists only in the
    /// return value: show it once, to the key's creator, and drop it.
    pub fn issue(env: KeyEnv, key: NewKey, now: DateTime<Utc>) -> (ApiKey, KeyRecord) {
        let secret = ApiKey::generate(env);
        let record = KeyRecord {
            id: KeyId::new(),
            account_id: key.account_id,
            hash: secret.hash(),
            display_prefix: secret.display_prefix().to_string(),
            kind: key.kind,
            status: KeyStatus::Active,
            name: key.name,
            scopes: key.scopes,
            expires_at: key.expires_at,
            created_at: now,
            revoked_at: None,
        };
        (secret, record)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RevokeOutcome {
    Revoked(KeyRecord),
    /// Revoked before; the record shows when.
    AlreadyRevoked(KeyRecord),
    NotFound,
}

#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates the account, its wallet, a grant of `starter_credits` (if any) and its first master
    /// key, all in one transaction.
    async fn create_account(
        &self,
        id: AccountId,
        name: &str,
        starter_credits: Nanos,
        master_key: KeyRecord,
        at: DateTime<Utc>,
    ) -> Result<Account, StoreError>;

    async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError>;
}

#[async_trait]
pub trait KeyStore: Send + Sync {
    async fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError>;
    async fn key_by_id(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// The account's keys, oldest first.
    async fn keys_of_account(&self, account: AccountId) -> Result<Vec<KeyRecord>, StoreError>;
    /// Every key, oldest first (admin listing).
    async fn all_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// Revokes the key if it is not revoked yet; atomic, so two revokes cannot both succeed.
    async fn revoke_key(&self, id: KeyId, at: DateTime<Utc>) -> Result<RevokeOutcome, StoreError>;
}

#[async_trait]
pub trait LedgerStore: Send + Sync {
    /// The wallet balance recomputed from the ledger alone (the cached balance must equal it).
    async fn ledger_balance(&self, account: AccountId) -> Result<Nanos, StoreError>;
}

#[async_trait]
pub trait StoreHealth: Send + Sync {
    /// Answers `Ok` only when the store can serve a query now.
    async fn ping(&self) -> Result<(), StoreError>;
    /// A short name for readiness reports and logs: `sqlite`, `postgres`.
    fn backend(&self) -> &'static str;
}

/// Everything the server needs from storage.
pub trait Store: AccountStore + KeyStore + LedgerStore + StoreHealth {}
impl<T: AccountStore + KeyStore + LedgerStore + StoreHealth> Store for T {}

/// Ledger account names, shared by every backend.
pub mod ledger_account {
    use tollgate_core::AccountId;

    pub const EXTERNAL: &str = "external";

    pub fn wallet(account: AccountId) -> String {
        format!("wallet:{account}")
    }
}
