//! Request and response bodies of the management API (`/api/v1/...`).
//! **API Boundary:** add fields freely; never rename or remove one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tollgate_core::{AccountId, KeyId, KeyKind, KeyStatus, Nanos};

/// An amount of money: exact nano-units, the same as a decimal string of credits, and the currency.
/// `credits` is exact and safe for any JSON parser; `nanos` is exact up to 2⁵³ in JavaScript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    pub nanos: i64,
    pub credits: String,
    pub currency: String,
}

impl Money {
    pub fn new(amount: Nanos, currency: &str) -> Self {
        Money {
            nanos: amount.0,
            credits: amount.to_string(),
            currency: currency.to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccountRequest {
    pub name: String,
    /// Credits to grant at creation, as a decimal string; the configured starter credits if omitted.
    #[serde(default)]
    pub starter_credits: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub status: String,
    pub balance: Money,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateAccountResponse {
    pub account: Account,
    /// The account's first master key. Its `secret` is shown here once and never again.
    pub master_key: CreatedKey,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub name: String,
    /// Admin only: the account to create the key for. A master key creates keys for its own account.
    #[serde(default)]
    pub account_id: Option<String>,
    /// `usage` (default) or `master`; only the admin may create master keys.
    #[serde(default)]
    pub kind: Option<KeyKind>,
    /// Route groups the key may call; `["*"]` (default) means every group.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// An API key as the API shows it: everything but the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub id: KeyId,
    pub account_id: AccountId,
    pub name: String,
    pub kind: KeyKind,
    pub status: KeyStatus,
    /// The non-secret start of the key, to recognise it: `tg_live_AbC1`.
    pub prefix: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: ApiKeyInfo,
    /// The plaintext key. Shown once, in this response only; Tollgate keeps only its SHA-256.
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List<T> {
    pub data: Vec<T>,
}
