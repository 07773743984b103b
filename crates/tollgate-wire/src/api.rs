//! Request and response bodies of the management API (`/api/v1/...`).
//! **API Boundary:** add fields freely; never rename or remove one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use tollgate_core::ratelimit::Overrides;
use tollgate_core::{
    AccountId, EndpointId, EventId, HoldId, KeyId, KeyKind, KeyStatus, Nanos, RequestId, TopUpId,
};
#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// An amount of money: exact nano-units, the same as a decimal string of credits, and the currency.
/// `credits` is exact and safe for any JSON parser; `nanos` is exact up to 2⁵³ in JavaScript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"nanos": 1500000000, "credits": "1.5", "currency": "USD"})))]
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
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"name": "Acme Corp", "starter_credits": "25.00"})))]
pub struct CreateAccountRequest {
    pub name: String,
    /// Credits to grant at creation (1 to 9 digits, optionally `.` and 1 to 9 decimals); the
    /// configured starter credits if omitted.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub starter_credits: Option<String>,
    /// Overrides the configured limit of unrevoked keys for this account.
    #[serde(default, deserialize_with = "whole")]
    #[cfg_attr(feature = "openapi", schema(maximum = 4_294_967_295_u32))]
    pub max_keys: Option<u32>,
}

/// Admin only. An omitted field is left as it is; `max_keys: null` returns the account to the
/// configured limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"name": "Acme Corporation", "max_keys": 50, "rate_limits": {"per-key": {"limit": 600}}})))]
pub struct UpdateAccountRequest {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "present_whole",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(maximum = 4_294_967_295_u32))]
    pub max_keys: Option<Option<u32>>,
    /// The account's own numbers for configured rate-limit policies (its `account` policies and
    /// its keys' `key` and `key+route` ones), by policy name; replaces the whole set, `null`
    /// clears it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<std::collections::BTreeMap<String, tollgate_core::ratelimit::LimitOverride>>))]
    pub rate_limits: Option<Option<Overrides>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub status: String,
    pub balance: Money,
    /// How many unrevoked keys the account may have (its override, else the configured limit).
    pub max_keys: u32,
    /// The operator's numbers for configured rate-limit policies, by policy name.
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::BTreeMap<String, tollgate_core::ratelimit::LimitOverride>))]
    pub rate_limits: Overrides,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreateAccountResponse {
    pub account: Account,
    /// The account's first master key. Its `secret` is shown here once and never again.
    pub master_key: CreatedKey,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"name": "production", "scopes": ["openai:mock-gpt", "echo"], "allowed_ips": ["10.0.0.0/8"], "expires_at": "2030-01-01T00:00:00Z", "monthly_spend_cap": "100.00"})))]
pub struct CreateKeyRequest {
    pub name: String,
    /// Admin only: the account to create the key for. A master key creates keys for its own account.
    #[serde(default)]
    pub account_id: Option<String>,
    /// `usage` (default) or `master`; only the admin may create master keys.
    #[serde(default)]
    pub kind: Option<KeyKind>,
    /// What the key may call: `"*"` (default) for everything, a route group (`"echo"`), or a
    /// group and one of its models (`"openai:gpt-4o-mini"`).
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// CIDRs the key may be used from (`"10.0.0.0/8"`, `"2001:db8::/32"`); omitted or empty means
    /// anywhere.
    #[serde(default)]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The most the key may be charged per calendar month (UTC), in credits: 1 to 9 digits,
    /// optionally `.` and 1 to 9 decimals.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub monthly_spend_cap: Option<String>,
}

/// `PATCH /keys/{id}`: an omitted field is left as it is, `null` clears it (no allowlist, no
/// expiry, no spend cap). `name`, `scopes` and `status` cannot be cleared.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"name": "production-eu", "allowed_ips": null, "monthly_spend_cap": "250.00"})))]
pub struct UpdateKeyRequest {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub scopes: Option<Option<Vec<String>>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub allowed_ips: Option<Option<Vec<String>>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// `active` or `inactive` (revoking has its own call).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub status: Option<Option<KeyStatus>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub monthly_spend_cap: Option<Option<String>>,
    /// Admin only: the key's own numbers for its `key` and `key+route` rate-limit policies, by
    /// policy name; replaces the whole set, `null` clears it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<std::collections::BTreeMap<String, tollgate_core::ratelimit::LimitOverride>>))]
    pub rate_limits: Option<Option<Overrides>>,
}

/// `POST /keys/{id}/roll`: the body may be omitted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"grace_period_seconds": 3600})))]
pub struct RollKeyRequest {
    /// How long the current secret keeps working next to the new one; default 0 (it stops now),
    /// at most 604800 (7 days).
    #[serde(default, deserialize_with = "whole")]
    #[cfg_attr(feature = "openapi", schema(maximum = 604_800))]
    pub grace_period_seconds: Option<u64>,
}

/// A whole number, also when sent as `60.0`: JSON has one kind of number, and JSON Schema's
/// `integer` (what the document declares) includes it, as do clients that send floats.
fn whole<'de, T: TryFrom<u64>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    // Below 2^53 a float is exact, so an integral one converts without loss.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    let whole = number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..EXACT).contains(f))
            .map(|f| f as u64)
    });
    whole
        .and_then(|n| T::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("{number} is not a whole number in range")))
}

/// [`whole`] for a field where `null` clears the value (see [`present`]).
fn present_whole<'de, T: TryFrom<u64>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    whole(deserializer).map(Some)
}

/// Tells a field sent as `null` (`Some(None)`) from one left out (`None`, via `#[serde(default)]`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// Whether a key works now, as the API shows it: its stored status, or `expired` for an active or
/// inactive key past its `expires_at` (give it a later one to bring it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Active,
    Inactive,
    Revoked,
    Expired,
}

impl KeyState {
    /// The state at `now` of a key with this stored status and expiry.
    pub fn at(status: KeyStatus, expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Self {
        match status {
            KeyStatus::Revoked => KeyState::Revoked,
            _ if expires_at.is_some_and(|at| at <= now) => KeyState::Expired,
            KeyStatus::Active => KeyState::Active,
            KeyStatus::Inactive => KeyState::Inactive,
        }
    }
}

/// An API key as the API shows it: everything but the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApiKeyInfo {
    pub id: KeyId,
    pub account_id: AccountId,
    pub name: String,
    pub kind: KeyKind,
    pub status: KeyState,
    /// The non-secret start of the key, to recognise it: `tg_live_AbC1`.
    pub prefix: String,
    pub scopes: Vec<String>,
    /// CIDRs the key may be used from; empty means anywhere.
    pub allowed_ips: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub monthly_spend_cap: Option<Money>,
    /// The operator's numbers for this key's rate-limit policies, by policy name.
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::BTreeMap<String, tollgate_core::ratelimit::LimitOverride>))]
    pub rate_limits: Overrides,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: ApiKeyInfo,
    /// The plaintext key. Shown once, in this response only; Tollgate keeps only its SHA-256.
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RolledKey {
    #[serde(flatten)]
    pub key: ApiKeyInfo,
    /// The new plaintext key, shown once, in this response only.
    pub secret: String,
    /// When the previous secret stops working.
    pub previous_secret_expires_at: DateTime<Utc>,
}

/// One page of a listing. `next_cursor`, when present, is passed as `?cursor=` for the next page.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"amount": "50.00", "reason": "invoice 2026-118 paid"})))]
pub struct GrantRequest {
    /// Credits to add, more than zero: 1 to 9 digits, optionally `.` and 1 to 9 decimals.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^(?!0+(\.0+)?$)[0-9]{1,9}(\.[0-9]{1,9})?$")
    )]
    pub amount: String,
    /// Why (kept in the ledger entry's memo).
    pub reason: String,
    /// The caller's own id for this grant (1 to 128 printable ASCII characters): a grant is
    /// applied at most once per account and reference, so a retry is always safe.
    #[serde(default)]
    pub reference: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Balance {
    pub account_id: AccountId,
    /// Spendable now.
    pub available: Money,
    /// Reserved by pending holds.
    pub held: Money,
    /// Charged since the start of this calendar month (UTC).
    pub spent_this_month: Money,
    /// What the account owes: credit a refund or dispute took back after it was spent. Paid
    /// calls are refused (`account_in_debt`) until new credit pays it.
    pub debt: Money,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LedgerEntry {
    /// Increasing in commit order.
    pub seq: i64,
    /// The ledger account the money left: `wallet:<account>`, `holds:<account>`,
    /// `debt:<account>`, `disputed:<account>` or `external`.
    pub from: String,
    /// The ledger account the money went to: `wallet:<account>`, `holds:<account>`,
    /// `debt:<account>`, `disputed:<account>`, `revenue` or `external`.
    pub to: String,
    pub amount: Money,
    /// `grant`, `hold`, `charge`, `release`, `refund`, `dispute`, `chargeback`, `debt`,
    /// `repay` or `fee`.
    pub kind: String,
    pub memo: String,
    /// The hold the entry belongs to, or a grant's request ID.
    pub reference: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"amount": "2.50", "ttl_seconds": 600, "metadata": {"job": "render-42"}})))]
pub struct CreateHoldRequest {
    /// The most the work may cost, in credits: 1 to 9 digits, optionally `.` and 1 to 9 decimals.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub amount: String,
    /// How long until an unresolved hold is released; default 3600, at most 604800 (7 days).
    #[serde(default, deserialize_with = "whole")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604_800))]
    pub ttl_seconds: Option<u64>,
    /// A JSON object kept with the hold.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Admin only: the account to hold credit from.
    #[serde(default)]
    pub account_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"amount": "1.75"})))]
pub struct SettleHoldRequest {
    /// The actual cost, at most the amount held: 1 to 9 digits, optionally `.` and 1 to 9
    /// decimals.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub amount: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HoldInfo {
    pub id: HoldId,
    pub account_id: AccountId,
    pub key_id: Option<KeyId>,
    pub amount: Money,
    pub charged: Money,
    /// `pending`, `settled`, `released` or `expired`.
    pub status: String,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// `GET /usage`: an account's usage totals per group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UsageSummary {
    pub account_id: AccountId,
    /// `day`, `key`, `route` or `model`.
    pub group_by: String,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Data-plane calls, per group.
    pub data: Vec<UsageTotals>,
    /// What the billing API's holds (the operator's own jobs) charged, settled in the range.
    pub billing_api: BillingApiTotals,
    /// Everything charged: every group's cost plus the billing API's.
    pub cost: Money,
}

/// The billing API's part of a usage summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BillingApiTotals {
    /// Holds settled.
    pub holds: u64,
    pub cost: Money,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UsageTotals {
    /// The day (`2026-11-22`, UTC), key id, route prefix or model (empty: calls without one).
    pub group: String,
    pub requests: u64,
    /// Requests answered with a status of 400 or more.
    pub errors: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost: Money,
}

/// One data-plane request from the usage log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UsageRecord {
    pub request_id: RequestId,
    pub client_request_id: Option<String>,
    pub account_id: AccountId,
    pub key_id: KeyId,
    pub route: String,
    pub model: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub units: Option<String>,
    pub input_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cost: Money,
    pub hold: Money,
    /// Whether the usage cost more than the hold, which capped the charge.
    pub over_hold: bool,
    /// What the usage cost beyond the hold: not charged, the house's loss.
    pub uncovered: Money,
    /// `settled`, `partial`, `estimated`, `released` or `expired`.
    pub billing_status: String,
    pub latency_ms: u64,
    /// Why Tollgate refused or failed the call; absent when the upstream answered.
    pub error_code: Option<String>,
    /// The refusal's message (in English, whatever language the caller was answered in).
    pub error_message: Option<String>,
    /// A replay (`Idempotent-Replayed: true`), a 409 `idempotency_in_progress`: the request
    /// whose answer it was, or is waiting for. Such a call is charged nothing.
    pub replay_of: Option<RequestId>,
    pub created_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

/// One audit-log entry. `before` and `after` are the changed object as the API showed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AuditEntry {
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// `admin`, or the id of the key that made the change.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub request_id: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    /// Hex SHA-256 of the previous entry, and of this one over its fields and that link.
    pub prev_hash: String,
    pub hash: String,
}

/// `GET /audit/verify`: whether every link of the chain holds, and if not, the first that does
/// not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AuditVerification {
    pub valid: bool,
    /// Entries checked (up to the broken one).
    pub entries: u64,
    pub broken_at: Option<u64>,
    pub reason: Option<String>,
    /// Hex hash of the last entry: keep it elsewhere to detect a rewrite of the whole log.
    pub head_hash: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn grace(json: &str) -> Result<Option<u64>, String> {
        serde_json::from_str::<RollKeyRequest>(json)
            .map(|r| r.grace_period_seconds)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_whole_number_may_be_sent_as_a_float_but_only_a_whole_one() {
        assert_eq!(grace(r#"{"grace_period_seconds": 172}"#), Ok(Some(172)));
        assert_eq!(grace(r#"{"grace_period_seconds": 172.0}"#), Ok(Some(172)));
        assert_eq!(grace(r#"{"grace_period_seconds": null}"#), Ok(None));
        assert_eq!(grace("{}"), Ok(None));
        for refused in ["172.5", "-1", "-1.0", "1e300", "\"172\""] {
            let json = format!(r#"{{"grace_period_seconds": {refused}}}"#);
            assert!(grace(&json).is_err(), "{refused}");
        }
        // In range of the field's own type.
        let max_keys =
            |json: &str| serde_json::from_str::<CreateAccountRequest>(json).map(|r| r.max_keys);
        assert_eq!(
            max_keys(r#"{"name": "a", "max_keys": 5.0}"#).unwrap(),
            Some(5)
        );
        assert!(max_keys(r#"{"name": "a", "max_keys": 4294967296}"#).is_err());
        let update = serde_json::from_str::<UpdateAccountRequest>(r#"{"max_keys": null}"#).unwrap();
        assert_eq!(update.max_keys, Some(None));
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"amount": "25"})))]
pub struct TopUpRequest {
    /// Credits to buy (one credit is one unit of the wallet's currency), within the configured
    /// minimum and maximum, in whole cents. Left out when buying a `pack`.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// A credit pack (a name from `GET /billing/packs`) to buy by card: the top-up is of its
    /// price, and buys the pack as soon as it is credited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<String>,
    /// Admin only (and required of the admin): the account that buys.
    #[serde(default)]
    pub account_id: Option<String>,
}

/// Where a top-up stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TopUpState {
    /// Waiting for the customer to pay at `checkout_url`.
    Pending,
    /// Paid by a method that settles later; credited when it does.
    Processing,
    /// Paid and credited.
    Paid,
    /// Paid and credited, then refunded in part.
    PartiallyRefunded,
    /// Paid and credited, then refunded in full.
    Refunded,
    /// Its payment is disputed (open, or lost): the disputed credit is out of the wallet.
    Disputed,
    /// The checkout ended unpaid.
    Expired,
    /// The payment was refused, or the payment provider could not be reached to start it.
    Failed,
}

impl TopUpState {
    /// The name it is sent as.
    pub fn as_str(self) -> &'static str {
        match self {
            TopUpState::Pending => "pending",
            TopUpState::Processing => "processing",
            TopUpState::Paid => "paid",
            TopUpState::PartiallyRefunded => "partially_refunded",
            TopUpState::Refunded => "refunded",
            TopUpState::Disputed => "disputed",
            TopUpState::Expired => "expired",
            TopUpState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TopUp {
    pub id: TopUpId,
    pub account_id: AccountId,
    /// The credits it buys.
    pub amount: Money,
    pub status: TopUpState,
    /// `checkout` (the customer paid at Stripe Checkout) or `auto` (an automatic top-up).
    pub origin: String,
    /// Where the customer pays, while the top-up is pending.
    pub checkout_url: Option<String>,
    pub checkout_session: Option<String>,
    pub payment_intent: Option<String>,
    /// Credits taken back by refunds.
    pub refunded: Money,
    /// `open`, `won` or `lost`, if its payment was disputed.
    pub dispute: Option<String>,
    /// Why the top-up failed.
    pub failure: Option<String>,
    /// Why an event about it was not applied (what was paid disagreed with what was asked):
    /// the operator looks into it; nothing was credited by that event.
    pub review: Option<String>,
    /// The credit pack it buys once credited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"since": "2026-12-01T00:00:00Z"})))]
pub struct ReconcileRequest {
    /// Read the payment provider's events created at or after this time (RFC 3339; at most
    /// 30 days back, as long as the provider keeps them).
    pub since: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Reconciliation {
    /// Events read.
    pub events: u64,
    /// Of them, those not handled before (deliveries that never arrived), handled now.
    pub handled: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"threshold": "5", "amount": "25", "max_per_month": 4})))]
pub struct AutoTopUpRequest {
    /// Below this balance, a top-up starts.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub threshold: String,
    /// The credits each automatic top-up buys (within the configured minimum and maximum).
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub amount: String,
    /// At most this many a calendar month (UTC), 1 to 100.
    pub max_per_month: u32,
    /// Admin only (and required of the admin): the account.
    #[serde(default)]
    pub account_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AutoTopUp {
    pub account_id: AccountId,
    pub enabled: bool,
    pub threshold: Money,
    pub amount: Money,
    pub max_per_month: u32,
    /// A card is saved (by paying once through checkout): automatic top-ups charge it.
    pub card_saved: bool,
    /// Why Tollgate turned it off (a payment that needed the customer, a refused card).
    pub disabled_reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Plans: subscriptions, credit packs, included units

/// Puts an account on a plan, or changes where its subscription stands (admin only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetSubscriptionRequest {
    /// A plan from the config's `[[plans]]`.
    pub plan: String,
    /// `active` (default), `trialing`, `past_due`, `unpaid` or `canceled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^(active|trialing|past_due|unpaid|canceled)$")
    )]
    pub status: Option<String>,
    /// When the subscription started: the anchor of `subscription`-anchored periods, between
    /// 2000-01-01 and now. Default: kept from the current subscription, or now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Subscription {
    pub plan: String,
    /// `active`, `trialing`, `past_due`, `unpaid` or `canceled`.
    pub status: String,
    /// When the status last changed.
    pub since: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
}

/// Grants a credit pack: units of one meter, usable until they expire (admin only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreatePackRequest {
    /// The pack's name within the account (1 to 64 of `A-Z a-z 0-9 - _ .`): granting a name
    /// again grants nothing. Default: the request's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[A-Za-z0-9._-]{1,64}$"))]
    pub id: Option<String>,
    /// `requests`, `tokens` or `cost`.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^(requests|tokens|cost)$"))]
    pub meter: String,
    /// A count of requests or tokens; for `cost`, nano-credits.
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 9_223_372_036_854_775_807_u64)
    )]
    pub units: u64,
    /// The route group whose calls may use it; every route when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// A credit pack customers may buy (`[[packs]]` in config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct PackOffer {
    pub name: String,
    /// `requests`, `tokens` or `cost`.
    pub meter: String,
    /// The route group its units serve; every route when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<String>,
    /// A count of requests or tokens; for `cost`, nano-credits.
    pub units: u64,
    pub price: Money,
    /// How long its units last after the purchase, in seconds.
    pub valid_for_seconds: u64,
}

/// Buys a credit pack from the wallet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BuyPackRequest {
    /// The purchase's id within the account (1 to 64 of `A-Z a-z 0-9 - _ .`): buying with an id
    /// again pays and grants nothing more, so a retry is safe. The pack is named `buy.<id>`.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[A-Za-z0-9._-]{1,64}$"))]
    pub id: String,
    /// Admin only (and required of the admin): the account that buys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

/// Sets the used units of an allowance's current period back to zero, once per reference
/// (admin only). The period and its end stay as they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResetAllowanceRequest {
    /// 1 to 128 printable ASCII characters; a second reset with it changes nothing.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[!-~]{1,128}$"))]
    pub reference: String,
    /// `day` or `week`: reset that window of the allowance instead of its period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^(day|week)$"))]
    pub window: Option<String>,
}

/// One bucket of included units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UnitBucket {
    /// `allowance` (the plan's, for the current period) or `pack`.
    pub source: String,
    /// The allowance's name, or the pack's id.
    pub name: String,
    /// `requests`, `tokens` or `cost` (nano-credits).
    pub meter: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<String>,
    pub granted: u64,
    pub used: u64,
    /// Held by calls in progress.
    pub held: u64,
    pub remaining: u64,
    /// When an allowance's period ends and a fresh one begins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<DateTime<Utc>>,
    /// When a pack's units stop being usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// What a call over it meets: `block`, `wallet` or `soft` (allowances only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overage: Option<String>,
}

/// An account's plan and its buckets of included units, in the order calls draw on them
/// (packs by earliest expiry, then the allowances).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Allowances {
    pub account_id: AccountId,
    /// The plan the account's calls follow (its subscription's, or the default plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription: Option<Subscription>,
    pub buckets: Vec<UnitBucket>,
}

// ---------------------------------------------------------------------------------------------
// Webhooks

/// `POST /webhook-endpoints`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"url": "https://hooks.example.com/tollgate", "events": ["balance.low", "balance.depleted", "topup.succeeded"], "description": "billing alerts"})))]
pub struct CreateEndpointRequest {
    /// Where events are POSTed: an `https://` URL on the public internet.
    pub url: String,
    /// Admin only: the account the endpoint is for. A master key creates its own account's.
    #[serde(default)]
    pub account_id: Option<String>,
    /// The event types to receive; omitted or `["*"]` for every type.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    #[serde(default)]
    pub description: Option<String>,
}

/// `PATCH /webhook-endpoints/{id}`: an omitted field is left as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"enabled": false})))]
pub struct UpdateEndpointRequest {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub events: Option<Vec<String>>,
    #[serde(default)]
    pub description: Option<String>,
    /// `false` stops deliveries; `true` resumes them (and clears why Tollgate disabled it).
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// A webhook endpoint as the API shows it: everything but its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct WebhookEndpoint {
    pub id: EndpointId,
    pub account_id: AccountId,
    pub url: String,
    pub description: String,
    /// The event types it receives; `["*"]` is every type.
    pub events: Vec<String>,
    pub enabled: bool,
    /// Why Tollgate disabled it (its receiver answered 410 Gone).
    pub disabled_reason: Option<String>,
    /// Until when deliveries are also signed with the secret before the last rotation.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A new endpoint, or one whose secret was just rotated: the secret is shown here only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EndpointWithSecret {
    #[serde(flatten)]
    pub endpoint: WebhookEndpoint,
    /// The signing secret, `whsec_...` (Standard Webhooks). Shown once.
    pub secret: String,
}

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct WebhookDelivery {
    /// The event's id: the `webhook-id` header of every attempt.
    pub event_id: EventId,
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: u32,
    /// When the next attempt is due, while pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The receiver's status at the last attempt, if it answered.
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An event queued for delivery (a test ping, a redelivery).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct QueuedEvent {
    pub event_id: EventId,
}

/// An account's balance alert.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BalanceAlert {
    /// `balance.low` fires when the settled balance falls below this; `null` is off.
    pub low_balance: Option<Money>,
}

/// `PUT /accounts/{id}/balance-alert`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", schema(example = json!({"low_balance": "5.00"})))]
pub struct SetBalanceAlertRequest {
    /// Credits, more than zero (1 to 9 digits, optionally `.` and 1 to 9 decimals), or `null`
    /// to turn the alert off.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub low_balance: Option<String>,
}

/// A usage export sink and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExportSink {
    pub name: String,
    /// `stripe`, `openmeter`, `lago` or `webhook`.
    pub kind: String,
    /// Tollgate's meters sent, each with its name in the sink.
    pub meters: std::collections::BTreeMap<String, String>,
    /// `account` or `mapped`.
    pub customer: String,
    /// Every record up to this one is acknowledged or parked.
    pub cursor: i64,
    /// The newest record's number.
    pub head: i64,
    /// Records past the cursor, waiting to be sent.
    pub pending: u64,
    /// How long the oldest of them has waited since its call ended, in seconds.
    pub lag_seconds: i64,
    /// Records waiting for their account's customer id in this sink.
    pub unmapped: u64,
    /// Dead letters: records the sink refused or that were older than it accepts.
    pub dead_letters: u64,
}

/// A usage record set aside by a sink, with why.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ParkedUsage {
    /// The record's number in the export log: the cursor of the next page, and what a retry names.
    pub seq: i64,
    pub request_id: RequestId,
    pub account_id: AccountId,
    /// `unmapped` (waiting for a customer id), `too_old` or `rejected` (dead letters).
    pub reason: String,
    pub detail: String,
    /// What the call charged.
    pub cost: Money,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    /// When the call's usage was final.
    pub at: DateTime<Utc>,
    pub parked_at: DateTime<Utc>,
}

/// The answer to a retry of a parked record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExportRetry {
    pub seq: i64,
    /// True if the sink took it now; false if it stays parked (with its new reason).
    pub delivered: bool,
}

/// An account's customer id in a sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExportCustomer {
    pub account_id: AccountId,
    pub sink: String,
    /// The id the sink bills: a Stripe customer (`cus_...`), a Lago subscription's external id,
    /// an OpenMeter subject.
    pub customer: Option<String>,
}

/// Sets an account's customer id in a sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetExportCustomer {
    /// 1 to 255 printable characters.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 255, example = "cus_NffrFeUfNV2Hib")
    )]
    pub customer: String,
}
