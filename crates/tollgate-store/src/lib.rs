//! Tollgate's storage. One trait per concern ([`AccountStore`], [`KeyStore`], [`LedgerStore`],
//! [`UsageStore`], [`StoreHealth`]); [`Store`] is all of them. The server holds an `Arc<dyn Store>` and never sees
//! SQL. [`sqlite::SqliteStore`] is the embedded default; every backend passes the conformance
//! suite in `tests/conformance.rs`.

mod batch;
pub mod deadline;
pub mod export;
pub mod notify;
pub mod postgres;
mod rows;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;
pub mod units;

pub use export::{DayTotal, ExportRecord, ExportStore, ParkReason, ParkedRecord, SinkStanding};
pub use notify::{
    Attempt, AttemptOutcome, Crossing, DeliveryRecord, DeliveryStatus, DueDelivery, EndpointRecord,
    NotifyStore,
};
pub use units::{BucketSource, UnitBucket, UnitStore, UnitsAnswer, UnitsAsk};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use tollgate_core::audit::AuditEntry;
use tollgate_core::ledger::{BillingStatus, Hold, Transfer, Wallet};
use tollgate_core::metering::TokenUsage;
use tollgate_core::payment::TopUpStatus;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::{
    AccountId, ApiKey, HoldId, KeyEnv, KeyHash, KeyId, KeyKind, KeyStatus, Nanos, NodeId,
    RequestId, TopUpId,
};

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
    /// Overrides the configured keys-per-account limit.
    pub max_keys: Option<u32>,
    /// The operator's numbers for the account's policies (and its keys' per-key policies).
    pub rate_limits: Overrides,
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
    /// Where the key may be used from; empty means anywhere.
    pub allowed_ips: Vec<IpNet>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The most this key may be charged per calendar month (UTC).
    pub monthly_spend_cap: Option<Nanos>,
    /// The operator's numbers for this key's per-key policies.
    pub rate_limits: Overrides,
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
    pub allowed_ips: Vec<IpNet>,
    pub expires_at: Option<DateTime<Utc>>,
    pub monthly_spend_cap: Option<Nanos>,
}

impl NewKey {
    /// A key for everything (`*`), from anywhere, with no expiry or spend cap.
    pub fn new(account_id: AccountId, kind: KeyKind, name: &str) -> NewKey {
        NewKey {
            account_id,
            kind,
            name: name.to_string(),
            scopes: vec![tollgate_core::access::ALL.to_string()],
            allowed_ips: Vec::new(),
            expires_at: None,
            monthly_spend_cap: None,
        }
    }
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
            allowed_ips: key.allowed_ips,
            expires_at: key.expires_at,
            monthly_spend_cap: key.monthly_spend_cap,
            rate_limits: Overrides::new(),
            created_at: now,
            revoked_at: None,
        };
        (secret, record)
    }
}

/// A key found by one of its secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLookup {
    pub key: KeyRecord,
    /// Set when the secret is one a roll replaced: it works until then, and is revoked after.
    pub secret_expires_at: Option<DateTime<Utc>>,
    /// The key's account's rate-limit overrides, which apply to the key's requests too.
    pub account_rate_limits: Overrides,
    /// Whether the key's account is suspended (its keys are refused).
    pub account_suspended: bool,
    /// What the key's account owes (its keys open no hold until it is paid).
    pub account_debt: Nanos,
    /// The account's plan and subscription, if it has one.
    pub subscription: Option<tollgate_core::plan::Subscription>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertKeyOutcome {
    Inserted,
    /// The account already has `limit` keys that are not revoked.
    LimitReached {
        limit: u32,
    },
}

/// The result of changing a key that may have been revoked meanwhile.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyChange {
    /// The key as it is now.
    Changed(KeyRecord),
    /// Revoked keys do not change; the record as it is.
    Revoked(KeyRecord),
    NotFound,
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

    /// Accounts in id order (ULIDs: creation order to the millisecond) after `after`,
    /// optionally only those with `status`.
    async fn accounts(
        &self,
        after: Option<AccountId>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError>;

    /// Accounts whose id is `text` or whose name contains it (ignoring ASCII case), in id
    /// order after `after`: the operator's search.
    async fn search_accounts(
        &self,
        text: &str,
        after: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError>;

    /// Writes the account's settings (name, status, key limit, rate-limit overrides; not its
    /// balance); the account as it is now, or `None` if there is no such account.
    async fn update_account(&self, account: &Account) -> Result<Option<Account>, StoreError>;
}

#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Inserts the key unless its account already has as many unrevoked keys as its limit (the
    /// account's override, else `default_limit`). Counting and inserting are one atomic step, so
    /// concurrent creations cannot overshoot.
    async fn insert_key(
        &self,
        key: &KeyRecord,
        default_limit: u32,
    ) -> Result<InsertKeyOutcome, StoreError>;
    /// The key whose current secret, or a secret a roll replaced, has this hash.
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError>;
    async fn key_by_id(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// Up to `limit` keys after `after` in id order (oldest first, to the millisecond): the
    /// account's, or every account's when `account` is `None`.
    async fn keys(
        &self,
        account: Option<AccountId>,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError>;
    /// Revokes the key if it is not revoked yet; atomic, so two revokes cannot both succeed.
    async fn revoke_key(&self, id: KeyId, at: DateTime<Utc>) -> Result<RevokeOutcome, StoreError>;
    /// Writes the key's policy (name, scopes, allowed IPs, expiry, status, spend cap, rate-limit
    /// overrides) unless it
    /// has been revoked; atomic against a concurrent revoke.
    async fn update_key(&self, key: &KeyRecord) -> Result<KeyChange, StoreError>;
    /// Gives the key a new secret (hash and display prefix); the current one keeps working until
    /// `old_secret_expires_at`. Refused for a revoked key.
    async fn roll_key(
        &self,
        id: KeyId,
        new_hash: KeyHash,
        display_prefix: &str,
        old_secret_expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<KeyChange, StoreError>;
}

/// Who opened a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldSource {
    /// The proxy, for one data-plane request; dies with the process that opened it.
    Request,
    /// The billing API, for the operator's own long-running work; outlives restarts until its TTL.
    Api,
}

impl HoldSource {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldSource::Request => "request",
            HoldSource::Api => "api",
        }
    }
}

/// A hold as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRecord {
    pub hold: Hold,
    pub source: HoldSource,
    pub request_id: Option<RequestId>,
    /// A JSON object the billing API caller attached; `{}` for the proxy's holds.
    pub metadata: serde_json::Value,
}

/// One durable ledger change. The writer commits a batch of them in one transaction.
#[derive(Debug, Clone)]
pub enum LedgerWrite {
    /// A transfer made outside any hold, on the free balance: a grant, a card payment, its
    /// refund or dispute, a debt repaid; with its memo and the reference it is filed under.
    Transfer {
        account: AccountId,
        transfer: Transfer,
        memo: String,
        reference: String,
        at: DateTime<Utc>,
    },
    OpenHold {
        record: HoldRecord,
        transfer: Option<Transfer>,
        /// The key's monthly spend cap when the hold was opened. A store several nodes share
        /// decides it: the opening is refused if the key's month would pass it.
        key_cap: Option<Nanos>,
    },
    /// The hold as resolved (status, charged, resolved_at) and the transfers resolving made.
    ResolveHold {
        hold: Hold,
        transfers: Vec<Transfer>,
        /// Resolved outside any node's book: a billing-API hold handed to a shared store. What
        /// it does not charge goes to the wallet's free balance, never to a node's lease.
        detached: bool,
    },
    Usage(Box<UsageRow>),
    /// An event to send, written with the change that caused it (a top-up credited).
    Event(Box<tollgate_core::notify::Event>),
}

/// A ledger batch's id: the same for every attempt to commit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId(ulid::Ulid);

impl BatchId {
    pub fn new() -> BatchId {
        BatchId(ulid::Ulid::new())
    }
}

impl Default for BatchId {
    fn default() -> Self {
        BatchId::new()
    }
}

impl std::fmt::Display for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A ledger transfer as stored, for the ledger listing.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRecord {
    /// Increasing in commit order; the listing's cursor.
    pub seq: i64,
    pub debit: String,
    pub credit: String,
    pub amount: Nanos,
    pub kind: String,
    pub memo: String,
    pub reference: String,
    pub created_at: DateTime<Utc>,
}

/// An account's wallet, and what it has been charged in a month, as of one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceSheet {
    pub wallet: Wallet,
    pub spent_in_month: Nanos,
}

#[async_trait]
pub trait LedgerStore: Send + Sync {
    /// The wallet balance recomputed from the ledger alone (the cached balance must equal it).
    async fn ledger_balance(&self, account: AccountId) -> Result<Nanos, StoreError>;
    /// The account's cached wallet and holds balances.
    async fn wallet(&self, account: AccountId) -> Result<Option<Wallet>, StoreError>;
    /// What the key's holds have charged since `since`.
    async fn key_spent_since(&self, key: KeyId, since: DateTime<Utc>) -> Result<Nanos, StoreError>;
    /// The account's wallet and what it has been charged in the calendar month (UTC) of `at`
    /// (a total kept with the charges, `account_spend`, not a sum over them), read in one
    /// statement: a charge committed meanwhile shows in both or in neither.
    async fn balance_sheet(
        &self,
        account: AccountId,
        at: DateTime<Utc>,
    ) -> Result<Option<BalanceSheet>, StoreError>;
    async fn pending_holds(&self) -> Result<Vec<HoldRecord>, StoreError>;
    /// Pending holds whose TTL passed at or before `cutoff`.
    async fn holds_expired_by(&self, cutoff: DateTime<Utc>) -> Result<Vec<HoldRecord>, StoreError>;
    async fn hold(&self, id: HoldId) -> Result<Option<HoldRecord>, StoreError>;
    /// Applies the writes in order, in one transaction: all or nothing. Cached wallet balances
    /// move with the transfers. A batch whose id was already committed is not applied again
    /// (`Ok`): a retry after a commit whose answer was lost is safe.
    async fn commit(&self, batch: BatchId, writes: &[LedgerWrite]) -> Result<(), StoreError>;
    /// The account's transfers, newest first, those before `before` (a `seq`) if given.
    async fn transfers(
        &self,
        account: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TransferRecord>, StoreError>;
    /// Every ledger account's balance rebuilt from the transfers (they sum to zero).
    async fn trial_balance(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// Whether a transfer filed under `reference` has been committed to the account.
    async fn filed(&self, account: AccountId, reference: &str) -> Result<bool, StoreError>;
    /// What the account's transfers filed under a reference starting with `prefix` moved, in
    /// all (a top-up's refunds: `payment:<top-up>:refund:`).
    async fn filed_total(&self, account: AccountId, prefix: &str) -> Result<Nanos, StoreError>;
}

/// One data-plane request, as the usage log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub request_id: RequestId,
    pub client_request_id: Option<String>,
    pub account_id: AccountId,
    pub key_id: KeyId,
    /// The route's prefix.
    pub route: String,
    pub model: Option<String>,
    pub method: String,
    pub path: String,
    /// What the client was answered.
    pub status: u16,
    pub upstream_status: Option<u16>,
    /// Units read from the response (per-unit pricing), an exact decimal.
    pub units: Option<String>,
    pub tokens: Option<TokenUsage>,
    pub cost: Nanos,
    pub hold: Nanos,
    /// What the usage cost beyond the hold, which capped the charge: the house's loss on an
    /// undersized hold. Zero for every call whose hold covered it.
    pub uncovered: Nanos,
    pub hold_id: Option<HoldId>,
    pub billing_status: BillingStatus,
    pub latency_ms: u64,
    pub error_code: Option<String>,
    /// The refusal's message, in English.
    pub error_message: Option<String>,
    /// A replay's original request: the one whose stored answer it was given.
    pub replay_of: Option<RequestId>,
    pub created_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

/// One key's spend and last use, as the console's keys page shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyActivity {
    pub key: KeyId,
    pub spent: Nanos,
    pub last_used: Option<DateTime<Utc>>,
}

/// Which usage rows to list: newest first, all filters optional.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub account: Option<AccountId>,
    pub key: Option<KeyId>,
    pub route: Option<String>,
    pub model: Option<String>,
    pub status: Option<u16>,
    /// The status's hundreds: 2 for 2xx, 4 for 4xx.
    pub status_class: Option<u8>,
    pub error_code: Option<String>,
    pub billing_status: Option<BillingStatus>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Cursor: rows with an id before this one.
    pub before: Option<RequestId>,
    pub limit: u32,
}

/// How usage rows are grouped in a summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    /// Calendar day, UTC (`2026-11-22`).
    Day,
    Key,
    /// The route's prefix.
    Route,
    /// The model (empty for calls without one).
    Model,
}

/// What a usage series is split by, besides time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesSplit {
    /// One series: the account's total.
    Total,
    Key,
    Route,
    Model,
}

/// The width of a usage series' slots: a quarter hour, so that every time zone's hours and days
/// (whose offsets are all whole quarter hours) are exact sums of slots.
pub const SERIES_SLOT: chrono::TimeDelta = chrono::TimeDelta::minutes(15);

/// One slot of one series: the usage of requests created in `[start, start + SERIES_SLOT)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesSlot {
    pub start: DateTime<Utc>,
    /// The series' totals; its `group` is the key, route or model (empty for `Total`).
    pub totals: UsageBucket,
}

/// One group's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    pub group: String,
    pub requests: u64,
    /// Requests answered with a status of 400 or more.
    pub errors: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost: Nanos,
}

#[async_trait]
pub trait UsageStore: Send + Sync {
    /// An account's usage in `[from, to)` (either end open when `None`), grouped, in group order.
    async fn usage_summary(
        &self,
        account: AccountId,
        group_by: UsageGroup,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageBucket>, StoreError>;
    /// An account's usage in the quarter-hour slots ([`SERIES_SLOT`]) that start in
    /// `[from, to)`, split by `split`; slots with no requests are absent. Ordered by slot, then
    /// group. Read from totals kept with the rows (`usage_slots`), not from the rows: as fast
    /// for ten million rows as for ten.
    async fn usage_series(
        &self,
        account: AccountId,
        split: SeriesSplit,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<SeriesSlot>, StoreError>;
    /// For each of `keys` (a page of them, not thousands): what holds charged it since `since`,
    /// and when it was last used (its newest request row), in key order.
    async fn key_activity(
        &self,
        keys: &[KeyId],
        since: DateTime<Utc>,
    ) -> Result<Vec<KeyActivity>, StoreError>;
    /// The account's unrevoked capped keys whose charges since `since` have reached `percent` of
    /// their monthly cap, at most `limit`, in key order (their `last_used` is not read). Found
    /// among capped keys only (by a partial index), however many keys the account has.
    async fn keys_near_cap(
        &self,
        account: AccountId,
        since: DateTime<Utc>,
        percent: u32,
        limit: u32,
    ) -> Result<Vec<KeyActivity>, StoreError>;
    /// What the billing API's holds (the operator's own jobs, not data-plane calls) charged the
    /// account, settled in `[from, to)`: how many holds, and the total.
    async fn api_charges(
        &self,
        account: AccountId,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<(u64, Nanos), StoreError>;
    async fn requests(&self, filter: &UsageFilter) -> Result<Vec<UsageRow>, StoreError>;
    async fn request(&self, id: RequestId) -> Result<Option<UsageRow>, StoreError>;
    /// Deletes rows created before `cutoff` (the retention setting), and the slot totals of
    /// slots wholly before it; returns how many rows.
    async fn purge_requests_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// A response kept for replay under an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// Header names and values, in order (text values only).
    pub headers: Vec<(String, String)>,
    /// `None` when the body could not be kept whole (over the size limit, or it never reached
    /// its end): the outcome is known, but it cannot be replayed.
    pub body: Option<Vec<u8>>,
}

/// A request's claim on an idempotency key.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    /// Whose keys these are: an account id, or `admin`.
    pub scope: String,
    pub key: String,
    /// SHA-256 over method, path and the body's SHA-256.
    pub fingerprint: [u8; 32],
    /// The request making the claim; only it may complete or release it.
    pub owner: RequestId,
    pub now: DateTime<Utc>,
    /// Until then the key is locked for `owner`; after it (a crashed node), anyone may take it.
    pub lease_until: DateTime<Utc>,
    /// When the record, completed or not, is forgotten.
    pub expires_at: DateTime<Utc>,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The key was free (or its record expired, or its lease ran out): the claimant runs.
    Started,
    /// The same request is running under another owner.
    InFlight {
        owner: RequestId,
        lease_until: DateTime<Utc>,
    },
    /// The same request finished: replay it.
    Completed {
        owner: RequestId,
        response: StoredResponse,
    },
    /// The key was used for a different request.
    Mismatch,
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims the key atomically: of concurrent claims on a free key exactly one is `Started`.
    async fn begin_idempotent(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<IdempotencyBegin, StoreError>;
    /// Keeps the outcome of the owner's request for replay (if the owner still holds the key).
    async fn complete_idempotent(
        &self,
        scope: &str,
        key: &str,
        owner: RequestId,
        response: &StoredResponse,
    ) -> Result<(), StoreError>;
    /// Frees the key (if the owner still holds it and has not completed), so a retry runs afresh.
    async fn release_idempotent(
        &self,
        scope: &str,
        key: &str,
        owner: RequestId,
    ) -> Result<(), StoreError>;
    /// Deletes records past their expiry (and abandoned claims past their lease); how many.
    /// Also forgets ledger batch ids older than a day.
    async fn purge_idempotency(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Seals `entry` onto the end of the chain (its `seq`, `prev_hash` and `hash` are set here,
    /// atomically with reading the current end) and returns it as stored.
    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditEntry, StoreError>;
    /// Up to `limit` entries after `after_seq`, in order.
    async fn audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;
    /// The last entry's number and hash as the head records them (`None`: empty log).
    async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError>;
}

/// How a top-up began: a customer's checkout, or the account's automatic top-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopUpOrigin {
    Checkout,
    Auto,
}

impl TopUpOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            TopUpOrigin::Checkout => "checkout",
            TopUpOrigin::Auto => "auto",
        }
    }

    pub fn parse(text: &str) -> Option<TopUpOrigin> {
        [TopUpOrigin::Checkout, TopUpOrigin::Auto]
            .into_iter()
            .find(|o| o.as_str() == text)
    }
}

/// A card top-up as stored: what it buys, what the card is charged, and the payment
/// provider's ids once known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUp {
    pub id: TopUpId,
    pub account_id: AccountId,
    /// The credits it buys.
    pub amount: Nanos,
    /// What the card is charged, in the currency's minor unit (cents).
    pub amount_minor: i64,
    /// Lower-case ISO 4217, as the provider writes it.
    pub currency: String,
    pub status: TopUpStatus,
    pub origin: TopUpOrigin,
    pub checkout_session: Option<String>,
    pub checkout_url: Option<String>,
    pub payment_intent: Option<String>,
    /// Where a dispute of its payment stands: `open`, `won` or `lost`.
    pub dispute: Option<String>,
    /// Why an event about it was not applied (its amount or currency disagreed): for a person
    /// to look at.
    pub review: Option<String>,
    pub failure: Option<String>,
    /// An automatic top-up's key (the account and which of the month's it is): one per key.
    pub auto_key: Option<String>,
    /// The credit pack (a `[[packs]]` name) the top-up buys once it is credited.
    pub pack: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An account's automatic top-up: its rule, whether it is on, and the card it charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoTopUp {
    pub account_id: AccountId,
    /// Below this balance a top-up starts.
    pub threshold: Nanos,
    /// What it buys.
    pub amount: Nanos,
    /// At most this many a calendar month (UTC).
    pub max_per_month: u32,
    pub enabled: bool,
    /// Why it was turned off by Tollgate (a payment that needed the customer).
    pub disabled_reason: Option<String>,
    /// The card saved by a checkout: Stripe's customer and payment method.
    pub customer: Option<String>,
    pub payment_method: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// A payment provider's event as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentEvent {
    /// The provider's id (`evt_...`): an event is recorded once.
    pub id: String,
    pub kind: String,
    /// The top-up it is about, when it names one.
    pub topup: Option<TopUpId>,
    /// The payment intent it is about, when it names one.
    pub payment_intent: Option<String>,
    /// The event as the provider sent it (JSON).
    pub payload: String,
    pub received_at: DateTime<Utc>,
}

#[async_trait]
pub trait PaymentStore: Send + Sync {
    /// Writes a new top-up; `false` if one with its `auto_key` exists (nothing written).
    async fn create_topup(&self, topup: &TopUp) -> Result<bool, StoreError>;
    async fn topup(&self, id: TopUpId) -> Result<Option<TopUp>, StoreError>;
    /// The top-up with this checkout session or payment intent id.
    async fn topup_by_provider_id(&self, provider_id: &str) -> Result<Option<TopUp>, StoreError>;
    /// The account's top-ups, newest first, those before `before` if given.
    async fn topups(
        &self,
        account: AccountId,
        before: Option<TopUpId>,
        limit: u32,
    ) -> Result<Vec<TopUp>, StoreError>;
    /// Records the checkout session made for a top-up.
    async fn set_checkout(
        &self,
        id: TopUpId,
        session: &str,
        url: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Moves the top-up to `status` if its current one may become it
    /// ([`TopUpStatus::comes_from`]), keeping the first payment intent and note it is given;
    /// whether it moved.
    async fn move_topup(
        &self,
        id: TopUpId,
        status: TopUpStatus,
        payment_intent: Option<&str>,
        failure: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Records where a dispute of the top-up's payment stands: `open` only if none was
    /// recorded, `won` or `lost` unless one of them was; whether it changed.
    async fn set_dispute(
        &self,
        id: TopUpId,
        status: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Flags a top-up for a person to review, keeping the first reason.
    async fn flag_topup(
        &self,
        id: TopUpId,
        review: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Records an event unless one with its id was recorded before; whether it has been
    /// handled (a redelivery of an event already handled).
    async fn record_event(&self, event: &PaymentEvent) -> Result<bool, StoreError>;
    async fn finish_event(
        &self,
        id: &str,
        outcome: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Keeps the card a checkout saved, for automatic top-ups.
    async fn save_card(
        &self,
        account: AccountId,
        customer: &str,
        payment_method: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Sets the account's rule and turns it on (the saved card is kept).
    async fn set_auto_topup(&self, rule: &AutoTopUp) -> Result<(), StoreError>;
    async fn auto_topup(&self, account: AccountId) -> Result<Option<AutoTopUp>, StoreError>;
    /// Turns it off, with why (`None`: the customer turned it off).
    async fn disable_auto_topup(
        &self,
        account: AccountId,
        reason: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// The rules that are on, have a card, and whose account's balance is below the threshold.
    async fn auto_topups_due(&self) -> Result<Vec<AutoTopUp>, StoreError>;
    /// How many automatic top-ups the account started since `since`.
    async fn auto_topups_since(
        &self,
        account: AccountId,
        since: DateTime<Utc>,
    ) -> Result<u32, StoreError>;
    /// The events not yet handled about a top-up or its payment intent, oldest first.
    async fn waiting_events(
        &self,
        topup: TopUpId,
        payment_intent: Option<&str>,
    ) -> Result<Vec<PaymentEvent>, StoreError>;
}

/// A console session: who signed in (the operator, or an account's master key), kept by the
/// SHA-256 of its cookie's secret, so a copy of the store signs no one in. Every node reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id_hash: [u8; 32],
    /// The master key signed in with; `None` for the operator.
    pub key: Option<KeyId>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError>;
    /// The session with this hash, unless it was ended or purged.
    async fn session(&self, id_hash: &[u8; 32]) -> Result<Option<SessionRecord>, StoreError>;
    /// Moves `last_seen_at` forward to `at` (never back).
    async fn touch_session(&self, id_hash: &[u8; 32], at: DateTime<Utc>) -> Result<(), StoreError>;
    async fn end_session(&self, id_hash: &[u8; 32]) -> Result<(), StoreError>;
    /// Deletes the sessions last seen before `idle_cutoff` or created before `absolute_cutoff`;
    /// how many.
    async fn purge_sessions(
        &self,
        idle_cutoff: DateTime<Utc>,
        absolute_cutoff: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
}

#[async_trait]
pub trait StoreHealth: Send + Sync {
    /// Answers `Ok` only when the store can serve a query now.
    async fn ping(&self) -> Result<(), StoreError>;
    /// A short name for readiness reports and logs: `sqlite`, `postgres`.
    fn backend(&self) -> &'static str;
}

/// Everything the server needs from storage.
/// A change another node (or anyone) made to the store, for caches to drop what they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreChange {
    Key(KeyId),
    Account(AccountId),
    /// A node could not carve a hold from the account's free balance while other nodes' leases
    /// hold enough: every other node gives its lease on the account back.
    Recall {
        account: AccountId,
        by: NodeId,
    },
    /// Announcements may have been missed (the feed reconnected): drop everything cached.
    Resync,
}

#[async_trait]
pub trait ChangeFeed: Send + Sync {
    /// Announcements of key and account changes, as they commit. `None`: the store belongs to
    /// one node, which sees its own changes (the embedded store).
    async fn changes(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<StoreChange>>, StoreError> {
        Ok(None)
    }
}

/// A credit carved from a wallet into a node's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carve {
    /// Added to the node's lease: zero when the free balance could not cover what was needed.
    pub granted: Nanos,
    /// What no node's lease holds, after the carve.
    pub free: Nanos,
    /// What the other nodes' leases hold. When `granted` is zero but `free + leased` covers the
    /// hold, the store has announced a [`StoreChange::Recall`].
    pub leased: Nanos,
}

/// Credit leases, on a store several nodes share. A lease is the part of a wallet's balance one
/// node may spend without asking the store: its book decides holds against it in memory. The
/// leases of an account never sum to more than its balance: a lease is carved only from the free
/// balance, under the wallet's lock, and a node's ledger batches move its lease together with the
/// balance. See docs/cluster.md.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// [`LedgerStore::commit`], where every change the batch's holds make to a wallet's balance
    /// is made to `node`'s lease on it too (holds come out of the lease, what they return goes
    /// back). Grants go to the free balance, for any node to carve. A hold that needs more than
    /// the lease holds (the lease was reclaimed while the node was cut off) takes the rest from
    /// the free balance; a batch that neither can cover is refused as [`StoreError::Corrupt`].
    async fn commit_leased(
        &self,
        batch: BatchId,
        node: NodeId,
        writes: &[LedgerWrite],
    ) -> Result<(), StoreError>;
    /// Gives `give_back` of the node's lease back to the wallet, then carves a lease for a hold
    /// of `needed` from what is free ([`tollgate_core::ledger::lease_size`]), in one transaction.
    /// If what is free cannot cover it but the other nodes' leases can, it announces a
    /// [`StoreChange::Recall`] at commit.
    async fn carve(
        &self,
        account: AccountId,
        node: NodeId,
        give_back: Nanos,
        needed: Nanos,
        at: DateTime<Utc>,
    ) -> Result<Carve, StoreError>;
    /// Gives `amount` of the node's lease back to the wallet (at most what the lease holds).
    async fn return_lease(
        &self,
        account: AccountId,
        node: NodeId,
        amount: Nanos,
    ) -> Result<(), StoreError>;
    /// Marks every lease of the node as renewed at `at` (a heartbeat), and drops its empty ones.
    async fn renew_leases(&self, node: NodeId, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// Ends the leases not renewed since `cutoff` (their node stopped): their credit is free
    /// again. Returns how many.
    async fn reclaim_leases(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError>;
    /// A key's spend this month as the store decides caps on it: (charged, held by pending
    /// holds), as of `now`'s month.
    async fn key_spend(&self, key: KeyId, now: DateTime<Utc>)
        -> Result<(Nanos, Nanos), StoreError>;
    /// The account's leases by node.
    async fn leases_of(&self, account: AccountId) -> Result<Vec<(NodeId, Nanos)>, StoreError>;
}

/// Whether the store is shared by several nodes, and so leases credit to each.
pub trait Sharing {
    /// `None`: the store belongs to one node, whose book may spend whole wallets (the embedded
    /// store).
    fn leases(&self) -> Option<std::sync::Arc<dyn LeaseStore>> {
        None
    }
}

pub trait Store:
    AccountStore
    + KeyStore
    + LedgerStore
    + UsageStore
    + IdempotencyStore
    + AuditStore
    + SessionStore
    + PaymentStore
    + UnitStore
    + NotifyStore
    + ExportStore
    + StoreHealth
    + ChangeFeed
    + Sharing
{
}
impl<T> Store for T where
    T: AccountStore
        + KeyStore
        + LedgerStore
        + UsageStore
        + IdempotencyStore
        + AuditStore
        + SessionStore
        + PaymentStore
        + UnitStore
        + NotifyStore
        + ExportStore
        + StoreHealth
        + ChangeFeed
        + Sharing
{
}
