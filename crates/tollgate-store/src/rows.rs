//! Rows as both SQL backends store them, and their conversion to the domain types. The two
//! schemas use the same representation (text ids, integer nano-units, Unix-millisecond times, JSON
//! as text, hashes as bytes), so each row type is decoded by either driver (`sqlx::FromRow`) and
//! checked here once.

use crate::{
    Account, BalanceSheet, HoldRecord, HoldSource, IdempotencyBegin, IdempotencyClaim, KeyLookup,
    KeyRecord, StoreError, StoredResponse, TransferRecord, UsageRow,
};
use chrono::{DateTime, TimeZone, Utc};
use std::str::FromStr;
use tollgate_core::audit::AuditEntry;
use tollgate_core::ledger::{BillingStatus, Hold, HoldStatus, Wallet};
use tollgate_core::metering::TokenUsage;
use tollgate_core::payment::TopUpStatus;
use tollgate_core::{AccountId, KeyHash, KeyKind, KeyStatus, Nanos, RequestId};

pub(crate) fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

/// A wallet's balance, holds and debt, and its month's spend, in nano-units.
pub(crate) type BalanceSheetRow = (i64, i64, i64, i64);

pub(crate) fn balance_sheet((available, held, debt, spent): BalanceSheetRow) -> BalanceSheet {
    BalanceSheet {
        wallet: Wallet {
            available: Nanos(available),
            held: Nanos(held),
            debt: Nanos(debt),
        },
        spent_in_month: Nanos(spent),
    }
}

pub(crate) fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value:?}"))
}

pub(crate) fn parse_id<T: FromStr>(what: &str, text: &str) -> Result<T, StoreError> {
    T::from_str(text).map_err(|_| corrupt(what, text))
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("to JSON: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|_| corrupt(what, text))
}

pub(crate) fn hash32(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

fn unsigned(what: &str, n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| corrupt(what, &n.to_string()))
}

pub(crate) const KEY_COLUMNS: &str = "id, account_id, key_hash, display_prefix, kind, status, \
    name, scopes, allowed_ips, expires_at, monthly_spend_cap_nanos, created_at, revoked_at, \
    rate_limits";

#[derive(sqlx::FromRow)]
pub(crate) struct KeyRow {
    id: String,
    account_id: String,
    key_hash: Vec<u8>,
    display_prefix: String,
    kind: String,
    status: String,
    name: String,
    scopes: String,
    allowed_ips: String,
    expires_at: Option<i64>,
    monthly_spend_cap_nanos: Option<i64>,
    created_at: i64,
    revoked_at: Option<i64>,
    rate_limits: String,
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        Ok(KeyRecord {
            account_id: parse_id("account id", &row.account_id)?,
            hash: KeyHash(hash32(row.key_hash, "key hash")?),
            display_prefix: row.display_prefix,
            kind: KeyKind::parse(&row.kind).ok_or_else(|| corrupt("key kind", &row.kind))?,
            status: KeyStatus::parse(&row.status)
                .ok_or_else(|| corrupt("key status", &row.status))?,
            name: row.name,
            scopes: from_json("key scopes", &row.scopes)?,
            allowed_ips: from_json("key allowed_ips", &row.allowed_ips)?,
            expires_at: row.expires_at.map(from_millis).transpose()?,
            monthly_spend_cap: row.monthly_spend_cap_nanos.map(Nanos),
            rate_limits: from_json("key rate_limits", &row.rate_limits)?,
            created_at: from_millis(row.created_at)?,
            revoked_at: row.revoked_at.map(from_millis).transpose()?,
            id: parse_id("key id", &row.id)?,
        })
    }
}

pub(crate) const ACCOUNT_SELECT: &str =
    "SELECT a.id, a.name, a.status, a.created_at, a.max_keys, a.rate_limits, w.balance_nanos \
     FROM accounts a JOIN wallets w ON w.account_id = a.id";

#[derive(sqlx::FromRow)]
pub(crate) struct AccountRow {
    id: String,
    name: String,
    status: String,
    created_at: i64,
    max_keys: Option<i64>,
    rate_limits: String,
    balance_nanos: i64,
}

impl TryFrom<AccountRow> for Account {
    type Error = StoreError;

    fn try_from(row: AccountRow) -> Result<Self, StoreError> {
        Ok(Account {
            id: parse_id("account id", &row.id)?,
            name: row.name,
            status: row.status,
            balance: Nanos(row.balance_nanos),
            max_keys: row
                .max_keys
                .map(|n| u32::try_from(n).map_err(|_| corrupt("max_keys", &n.to_string())))
                .transpose()?,
            rate_limits: from_json("account rate_limits", &row.rate_limits)?,
            created_at: from_millis(row.created_at)?,
        })
    }
}

pub(crate) const TOPUP_COLUMNS: &str = "id, account_id, amount_nanos, amount_minor, currency, \
    status, origin, checkout_session, checkout_url, payment_intent, dispute, review, failure, \
    auto_key, created_at, updated_at, pack";

#[derive(sqlx::FromRow)]
pub(crate) struct TopUpRow {
    id: String,
    account_id: String,
    amount_nanos: i64,
    amount_minor: i64,
    currency: String,
    status: String,
    origin: String,
    checkout_session: Option<String>,
    checkout_url: Option<String>,
    payment_intent: Option<String>,
    dispute: Option<String>,
    review: Option<String>,
    failure: Option<String>,
    auto_key: Option<String>,
    created_at: i64,
    updated_at: i64,
    pack: Option<String>,
}

impl TryFrom<TopUpRow> for crate::TopUp {
    type Error = StoreError;

    fn try_from(row: TopUpRow) -> Result<Self, StoreError> {
        Ok(crate::TopUp {
            id: parse_id("top-up id", &row.id)?,
            account_id: parse_id("account id", &row.account_id)?,
            amount: Nanos(row.amount_nanos),
            amount_minor: row.amount_minor,
            currency: row.currency,
            status: TopUpStatus::parse(&row.status)
                .ok_or_else(|| corrupt("top-up status", &row.status))?,
            origin: crate::TopUpOrigin::parse(&row.origin)
                .ok_or_else(|| corrupt("top-up origin", &row.origin))?,
            checkout_session: row.checkout_session,
            checkout_url: row.checkout_url,
            payment_intent: row.payment_intent,
            dispute: row.dispute,
            review: row.review,
            failure: row.failure,
            auto_key: row.auto_key,
            pack: row.pack,
            created_at: from_millis(row.created_at)?,
            updated_at: from_millis(row.updated_at)?,
        })
    }
}

pub(crate) const AUTO_TOPUP_COLUMNS: &str = "account_id, threshold_nanos, amount_nanos, \
    max_per_month, enabled, disabled_reason, customer, payment_method, updated_at";

#[derive(sqlx::FromRow)]
pub(crate) struct AutoTopUpRow {
    account_id: String,
    threshold_nanos: i64,
    amount_nanos: i64,
    max_per_month: i64,
    enabled: bool,
    disabled_reason: Option<String>,
    customer: Option<String>,
    payment_method: Option<String>,
    updated_at: i64,
}

impl TryFrom<AutoTopUpRow> for crate::AutoTopUp {
    type Error = StoreError;

    fn try_from(row: AutoTopUpRow) -> Result<Self, StoreError> {
        Ok(crate::AutoTopUp {
            account_id: parse_id("account id", &row.account_id)?,
            threshold: Nanos(row.threshold_nanos),
            amount: Nanos(row.amount_nanos),
            max_per_month: u32::try_from(row.max_per_month)
                .map_err(|_| corrupt("max_per_month", &row.max_per_month.to_string()))?,
            enabled: row.enabled,
            disabled_reason: row.disabled_reason,
            customer: row.customer,
            payment_method: row.payment_method,
            updated_at: from_millis(row.updated_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct PaymentEventRow {
    id: String,
    kind: String,
    topup_id: Option<String>,
    payment_intent: Option<String>,
    payload: String,
    received_at: i64,
}

impl TryFrom<PaymentEventRow> for crate::PaymentEvent {
    type Error = StoreError;

    fn try_from(row: PaymentEventRow) -> Result<Self, StoreError> {
        Ok(crate::PaymentEvent {
            id: row.id,
            kind: row.kind,
            topup: row
                .topup_id
                .as_deref()
                .map(|t| parse_id("top-up id", t))
                .transpose()?,
            payment_intent: row.payment_intent,
            payload: row.payload,
            received_at: from_millis(row.received_at)?,
        })
    }
}

/// The statuses a top-up may move to `status` from, as a SQL list (`'pending', ...`), or
/// `NULL` when none may.
pub(crate) fn statuses_before(status: TopUpStatus) -> String {
    let list: Vec<String> = status
        .comes_from()
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    if list.is_empty() {
        "NULL".into()
    } else {
        list.join(", ")
    }
}

pub(crate) const HOLD_COLUMNS: &str = "id, account_id, key_id, source, request_id, amount_nanos, \
    charged_nanos, status, metadata, created_at, expires_at, resolved_at";

#[derive(sqlx::FromRow)]
pub(crate) struct HoldRow {
    id: String,
    account_id: String,
    key_id: Option<String>,
    source: String,
    request_id: Option<String>,
    amount_nanos: i64,
    charged_nanos: i64,
    status: String,
    metadata: String,
    created_at: i64,
    expires_at: i64,
    resolved_at: Option<i64>,
}

impl TryFrom<HoldRow> for HoldRecord {
    type Error = StoreError;

    fn try_from(row: HoldRow) -> Result<Self, StoreError> {
        let source = match row.source.as_str() {
            "request" => HoldSource::Request,
            "api" => HoldSource::Api,
            _ => return Err(corrupt("hold source", &row.source)),
        };
        let request_id: Option<RequestId> = row
            .request_id
            .map(|r| parse_id("request id", &r))
            .transpose()?;
        Ok(HoldRecord {
            hold: Hold {
                id: parse_id("hold id", &row.id)?,
                account: parse_id("account id", &row.account_id)?,
                key: row.key_id.map(|k| parse_id("key id", &k)).transpose()?,
                amount: Nanos(row.amount_nanos),
                created_at: from_millis(row.created_at)?,
                expires_at: from_millis(row.expires_at)?,
                status: HoldStatus::parse(&row.status)
                    .ok_or_else(|| corrupt("hold status", &row.status))?,
                charged: Nanos(row.charged_nanos),
                resolved_at: row.resolved_at.map(from_millis).transpose()?,
                reference: request_id.filter(|_| source == HoldSource::Request),
            },
            source,
            request_id,
            metadata: from_json("metadata", &row.metadata)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct TransferRow {
    id: i64,
    debit_account: String,
    credit_account: String,
    amount_nanos: i64,
    kind: String,
    memo: String,
    reference: String,
    created_at: i64,
}

impl TryFrom<TransferRow> for TransferRecord {
    type Error = StoreError;

    fn try_from(row: TransferRow) -> Result<Self, StoreError> {
        Ok(TransferRecord {
            seq: row.id,
            debit: row.debit_account,
            credit: row.credit_account,
            amount: Nanos(row.amount_nanos),
            kind: row.kind,
            memo: row.memo,
            reference: row.reference,
            created_at: from_millis(row.created_at)?,
        })
    }
}

pub(crate) const USAGE_COLUMNS: &str = "request_id, client_request_id, account_id, key_id, route, \
    model, method, path, status, upstream_status, units, input_tokens, cached_input_tokens, \
    output_tokens, cost_nanos, hold_nanos, hold_id, billing_status, latency_ms, error_code, \
    created_at, completed_at, uncovered_nanos, error_message, replay_of";

#[derive(sqlx::FromRow)]
pub(crate) struct UsageDbRow {
    request_id: String,
    client_request_id: Option<String>,
    account_id: String,
    key_id: String,
    route: String,
    model: Option<String>,
    method: String,
    path: String,
    status: i64,
    upstream_status: Option<i64>,
    units: Option<String>,
    input_tokens: Option<i64>,
    cached_input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cost_nanos: i64,
    hold_nanos: i64,
    hold_id: Option<String>,
    billing_status: String,
    latency_ms: i64,
    error_code: Option<String>,
    created_at: i64,
    completed_at: i64,
    uncovered_nanos: i64,
    error_message: Option<String>,
    replay_of: Option<String>,
}

impl TryFrom<UsageDbRow> for UsageRow {
    type Error = StoreError;

    fn try_from(row: UsageDbRow) -> Result<Self, StoreError> {
        let tokens = match (row.input_tokens, row.cached_input_tokens, row.output_tokens) {
            (Some(input), cached, Some(output)) => Some(TokenUsage {
                input: unsigned("input_tokens", input)?,
                cached_input: unsigned("cached_input_tokens", cached.unwrap_or(0))?,
                output: unsigned("output_tokens", output)?,
            }),
            _ => None,
        };
        let status_code =
            |what: &str, n: i64| u16::try_from(n).map_err(|_| corrupt(what, &n.to_string()));
        Ok(UsageRow {
            request_id: parse_id("request id", &row.request_id)?,
            client_request_id: row.client_request_id,
            account_id: parse_id("account id", &row.account_id)?,
            key_id: parse_id("key id", &row.key_id)?,
            route: row.route,
            model: row.model,
            method: row.method,
            path: row.path,
            status: status_code("status", row.status)?,
            upstream_status: row
                .upstream_status
                .map(|s| status_code("upstream_status", s))
                .transpose()?,
            units: row.units,
            tokens,
            cost: Nanos(row.cost_nanos),
            hold: Nanos(row.hold_nanos),
            uncovered: Nanos(row.uncovered_nanos),
            hold_id: row.hold_id.map(|h| parse_id("hold id", &h)).transpose()?,
            billing_status: BillingStatus::parse(&row.billing_status)
                .ok_or_else(|| corrupt("billing status", &row.billing_status))?,
            latency_ms: unsigned("latency_ms", row.latency_ms)?,
            error_code: row.error_code,
            error_message: row.error_message,
            replay_of: row
                .replay_of
                .map(|r| parse_id("request id", &r))
                .transpose()?,
            created_at: from_millis(row.created_at)?,
            completed_at: from_millis(row.completed_at)?,
        })
    }
}

/// The start of the quarter-hour slot `at` falls in, in Unix milliseconds.
fn slot_of(at: DateTime<Utc>) -> i64 {
    let slot = crate::SERIES_SLOT.num_milliseconds();
    millis(at).div_euclid(slot) * slot
}

/// One slot's totals for one key, route and model: what a batch adds to `usage_slots`.
pub(crate) struct SlotDelta {
    account: String,
    slot: i64,
    key: String,
    route: String,
    model: String,
    totals: [i64; 6],
}

/// A batch's usage rows summed per slot, key, route and model: one upsert each, so that no
/// statement touches a slot twice (PostgreSQL refuses that).
pub(crate) fn slot_deltas(rows: &[&UsageRow]) -> Vec<SlotDelta> {
    let mut sums: std::collections::BTreeMap<(String, i64, String, String, String), [i64; 6]> =
        std::collections::BTreeMap::new();
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    for row in rows {
        let tokens = row.tokens.unwrap_or_default();
        let sum = sums
            .entry((
                row.account_id.to_string(),
                slot_of(row.created_at),
                row.key_id.to_string(),
                row.route.clone(),
                row.model.clone().unwrap_or_default(),
            ))
            .or_default();
        for (total, add) in sum.iter_mut().zip([
            1,
            i64::from(row.status >= 400),
            count(tokens.input),
            count(tokens.cached_input),
            count(tokens.output),
            row.cost.0,
        ]) {
            *total = total.saturating_add(add);
        }
    }
    sums.into_iter()
        .map(|((account, slot, key, route, model), totals)| SlotDelta {
            account,
            slot,
            key,
            route,
            model,
            totals,
        })
        .collect()
}

/// The statement that adds [`SlotDelta`]s, the same on both backends: its values follow.
pub(crate) const UPSERT_SLOTS: &str = "INSERT INTO usage_slots (account_id, slot_start, key_id, \
     route, model, requests, errors, input_tokens, cached_input_tokens, output_tokens, cost_nanos) ";

/// What follows [`UPSERT_SLOTS`]' values: a slot already there is added to.
pub(crate) const UPSERT_SLOTS_CONFLICT: &str = " ON CONFLICT (account_id, slot_start, key_id, \
     route, model) DO UPDATE SET requests = usage_slots.requests + excluded.requests, \
     errors = usage_slots.errors + excluded.errors, \
     input_tokens = usage_slots.input_tokens + excluded.input_tokens, \
     cached_input_tokens = usage_slots.cached_input_tokens + excluded.cached_input_tokens, \
     output_tokens = usage_slots.output_tokens + excluded.output_tokens, \
     cost_nanos = usage_slots.cost_nanos + excluded.cost_nanos";

/// The values of `delta`, in [`UPSERT_SLOTS`] order.
pub(crate) fn slot_cells(delta: &SlotDelta) -> [Cell; 11] {
    let [requests, errors, input, cached, output, cost] = delta.totals.map(Cell::Int);
    [
        Cell::Text(delta.account.clone()),
        Cell::Int(delta.slot),
        Cell::Text(delta.key.clone()),
        Cell::Text(delta.route.clone()),
        Cell::Text(delta.model.clone()),
        requests,
        errors,
        input,
        cached,
        output,
        cost,
    ]
}

/// The charges among a batch's transfers (each with its account and time), summed per account
/// and calendar month (UTC, as Unix milliseconds): what the batch adds to `account_spend`.
pub(crate) fn spend_deltas<'t>(
    transfers: impl IntoIterator<
        Item = (
            &'t tollgate_core::ledger::Transfer,
            AccountId,
            DateTime<Utc>,
        ),
    >,
) -> Vec<(String, i64, i64)> {
    let mut sums: std::collections::BTreeMap<(String, i64), i64> =
        std::collections::BTreeMap::new();
    for (transfer, account, at) in transfers {
        if transfer.kind == tollgate_core::ledger::TransferKind::Charge {
            let month = millis(tollgate_core::ledger::month_start(at));
            let sum = sums.entry((account.to_string(), month)).or_default();
            *sum = sum.saturating_add(transfer.amount.0);
        }
    }
    sums.into_iter()
        .map(|((account, month), charged)| (account, month, charged))
        .collect()
}

/// The statement that adds [`spend_deltas`] to `account_spend`, the same on both backends: its
/// values, then [`UPSERT_SPEND_CONFLICT`].
pub(crate) const UPSERT_SPEND: &str =
    "INSERT INTO account_spend (account_id, month_start, charged_nanos) ";
pub(crate) const UPSERT_SPEND_CONFLICT: &str = " ON CONFLICT (account_id, month_start) \
     DO UPDATE SET charged_nanos = account_spend.charged_nanos + excluded.charged_nanos";

/// The columns of a hold to insert (as `state`: a hold resolved in its own batch is inserted
/// resolved), in [`HOLD_COLUMNS`] order.
pub(crate) fn hold_cells((record, state): &(&crate::HoldRecord, &Hold)) -> [Cell; 12] {
    let hold = &record.hold;
    [
        Cell::Text(hold.id.to_string()),
        Cell::Text(hold.account.to_string()),
        Cell::MaybeText(hold.key.map(|k| k.to_string())),
        Cell::Text(record.source.as_str().to_string()),
        Cell::MaybeText(record.request_id.map(|r| r.to_string())),
        Cell::Int(hold.amount.0),
        Cell::Int(state.charged.0),
        Cell::Text(state.status.as_str().to_string()),
        Cell::Text(record.metadata.to_string()),
        Cell::Int(millis(hold.created_at)),
        Cell::Int(millis(hold.expires_at)),
        Cell::MaybeInt(state.resolved_at.map(millis)),
    ]
}

/// The usage columns of `row`, in [`USAGE_COLUMNS`] order.
pub(crate) fn usage_cells(row: &UsageRow) -> [Cell; 25] {
    let tokens = row.tokens;
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    [
        Cell::Text(row.request_id.to_string()),
        Cell::MaybeText(row.client_request_id.clone()),
        Cell::Text(row.account_id.to_string()),
        Cell::Text(row.key_id.to_string()),
        Cell::Text(row.route.clone()),
        Cell::MaybeText(row.model.clone()),
        Cell::Text(row.method.clone()),
        Cell::Text(row.path.clone()),
        Cell::Int(i64::from(row.status)),
        Cell::MaybeInt(row.upstream_status.map(i64::from)),
        Cell::MaybeText(row.units.clone()),
        Cell::MaybeInt(tokens.map(|t| count(t.input))),
        Cell::MaybeInt(tokens.map(|t| count(t.cached_input))),
        Cell::MaybeInt(tokens.map(|t| count(t.output))),
        Cell::Int(row.cost.0),
        Cell::Int(row.hold.0),
        Cell::MaybeText(row.hold_id.map(|h| h.to_string())),
        Cell::Text(row.billing_status.as_str().to_string()),
        Cell::Int(count(row.latency_ms)),
        Cell::MaybeText(row.error_code.clone()),
        Cell::Int(millis(row.created_at)),
        Cell::Int(millis(row.completed_at)),
        Cell::Int(row.uncovered.0),
        Cell::MaybeText(row.error_message.clone()),
        Cell::MaybeText(row.replay_of.map(|r| r.to_string())),
    ]
}

/// One value of a row to write, typed, so that either driver binds it (PostgreSQL types even a
/// NULL by its parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cell {
    Text(String),
    MaybeText(Option<String>),
    Int(i64),
    MaybeInt(Option<i64>),
}

/// Binds `cells` as one row of a multi-row insert.
pub(crate) fn push_cells<'a, DB>(
    mut out: sqlx::query_builder::Separated<'_, 'a, DB, &'static str>,
    cells: impl IntoIterator<Item = Cell>,
) where
    DB: sqlx::Database,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    for cell in cells {
        match cell {
            Cell::Text(v) => out.push_bind(v),
            Cell::MaybeText(v) => out.push_bind(v),
            Cell::Int(v) => out.push_bind(v),
            Cell::MaybeInt(v) => out.push_bind(v),
        };
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    seq: i64,
    at: i64,
    actor: String,
    action: String,
    target: String,
    request_id: String,
    before: Option<String>,
    after: Option<String>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

impl TryFrom<AuditRow> for AuditEntry {
    type Error = StoreError;

    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        Ok(AuditEntry {
            seq: unsigned("audit seq", row.seq)?,
            at: from_millis(row.at)?,
            actor: row.actor,
            action: row.action,
            target: row.target,
            request_id: row.request_id,
            before: row.before,
            after: row.after,
            prev_hash: hash32(row.prev_hash, "prev_hash")?,
            hash: hash32(row.hash, "hash")?,
        })
    }
}

/// The usage totals of one group, as `usage_summary` selects them.
#[derive(sqlx::FromRow)]
pub(crate) struct BucketRow {
    grp: String,
    requests: i64,
    errors: i64,
    input_tokens: i64,
    cached_input_tokens: i64,
    output_tokens: i64,
    cost_nanos: i64,
}

impl TryFrom<BucketRow> for crate::UsageBucket {
    type Error = StoreError;

    fn try_from(row: BucketRow) -> Result<Self, StoreError> {
        Ok(crate::UsageBucket {
            group: row.grp,
            requests: unsigned("requests", row.requests)?,
            errors: unsigned("errors", row.errors)?,
            input_tokens: unsigned("input_tokens", row.input_tokens)?,
            cached_input_tokens: unsigned("cached_input_tokens", row.cached_input_tokens)?,
            output_tokens: unsigned("output_tokens", row.output_tokens)?,
            cost: Nanos(row.cost_nanos),
        })
    }
}

/// One slot of a usage series, as `usage_series` selects it.
#[derive(sqlx::FromRow)]
pub(crate) struct SlotRow {
    slot: i64,
    #[sqlx(flatten)]
    totals: BucketRow,
}

impl TryFrom<SlotRow> for crate::SeriesSlot {
    type Error = StoreError;

    fn try_from(row: SlotRow) -> Result<Self, StoreError> {
        Ok(crate::SeriesSlot {
            start: from_millis(row.slot)?,
            totals: row.totals.try_into()?,
        })
    }
}

/// A key's spend and last use, as `key_activity` selects them.
#[derive(sqlx::FromRow)]
pub(crate) struct ActivityRow {
    id: String,
    spent: i64,
    last_used: Option<i64>,
}

impl TryFrom<ActivityRow> for crate::KeyActivity {
    type Error = StoreError;

    fn try_from(row: ActivityRow) -> Result<Self, StoreError> {
        Ok(crate::KeyActivity {
            key: parse_id("key id", &row.id)?,
            spent: Nanos(row.spent),
            last_used: row.last_used.map(from_millis).transpose()?,
        })
    }
}

/// The `usage_slots` column a usage series is split by, the same on both backends.
pub(crate) fn split_column(split: crate::SeriesSplit) -> &'static str {
    match split {
        crate::SeriesSplit::Total => "''",
        crate::SeriesSplit::Key => "key_id",
        crate::SeriesSplit::Route => "route",
        crate::SeriesSplit::Model => "model",
    }
}

/// Appends a usage listing's conditions, order and limit to `query`: one rendering of
/// [`crate::UsageFilter`] for both backends.
pub(crate) fn push_usage_filter<'a, DB>(
    query: &mut sqlx::QueryBuilder<'a, DB>,
    filter: &crate::UsageFilter,
) where
    DB: sqlx::Database,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let text: [(&str, Option<String>); 6] = [
        ("account_id", filter.account.map(|a| a.to_string())),
        ("key_id", filter.key.map(|k| k.to_string())),
        ("route", filter.route.clone()),
        ("model", filter.model.clone()),
        ("error_code", filter.error_code.clone()),
        (
            "billing_status",
            filter.billing_status.map(|b| b.as_str().to_string()),
        ),
    ];
    for (column, value) in text {
        if let Some(value) = value {
            query.push(format!(" AND {column} = ")).push_bind(value);
        }
    }
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(i64::from(status));
    }
    if let Some(class) = filter.status_class {
        let low = i64::from(class) * 100;
        query.push(" AND status >= ").push_bind(low);
        query.push(" AND status < ").push_bind(low + 100);
    }
    if let Some(from) = filter.from {
        query.push(" AND created_at >= ").push_bind(millis(from));
    }
    if let Some(to) = filter.to {
        query.push(" AND created_at < ").push_bind(millis(to));
    }
    if let Some(before) = filter.before {
        query
            .push(" AND request_id < ")
            .push_bind(before.to_string());
    }
    query
        .push(" ORDER BY request_id DESC LIMIT ")
        .push_bind(i64::from(filter.limit));
}

/// Converts decoded rows, stopping at the first that is not valid.
pub(crate) fn convert<R, T: TryFrom<R, Error = StoreError>>(
    rows: Vec<R>,
) -> Result<Vec<T>, StoreError> {
    rows.into_iter().map(T::try_from).collect()
}

/// What an account decides about its keys' requests, read with every key lookup.
#[derive(sqlx::FromRow)]
pub(crate) struct StandingRow {
    status: String,
    rate_limits: String,
    debt_nanos: i64,
    plan: Option<String>,
    plan_status: Option<String>,
    plan_since: Option<i64>,
    plan_started_at: Option<i64>,
}

impl StandingRow {
    /// The lookup of `key`, found by its current secret (`None`) or a retired one.
    pub(crate) fn lookup(
        self,
        key: KeyRecord,
        secret_expires_at: Option<DateTime<Utc>>,
    ) -> Result<KeyLookup, StoreError> {
        Ok(KeyLookup {
            key,
            secret_expires_at,
            account_rate_limits: from_json("account rate_limits", &self.rate_limits)?,
            account_suspended: self.status == "suspended",
            account_debt: Nanos(self.debt_nanos),
            subscription: match (
                self.plan,
                self.plan_status,
                self.plan_since,
                self.plan_started_at,
            ) {
                (Some(plan), Some(status), Some(since), Some(started_at)) => Some(
                    SubscriptionRow {
                        plan,
                        status,
                        since,
                        started_at,
                    }
                    .try_into()?,
                ),
                _ => None,
            },
        })
    }
}

/// The head row of the audit log.
#[derive(sqlx::FromRow)]
pub(crate) struct AuditHeadRow {
    seq: i64,
    hash: Vec<u8>,
}

impl AuditHeadRow {
    /// The last entry's number and hash (`None`: the log is empty).
    pub(crate) fn head(self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let hash = hash32(self.hash, "audit head")?;
        Ok(u64::try_from(self.seq)
            .ok()
            .filter(|&seq| seq > 0)
            .map(|seq| (seq, hash)))
    }
}

/// An idempotency key's row, read after a claim's upsert.
#[derive(sqlx::FromRow)]
pub(crate) struct IdempotencyRow {
    fingerprint: Vec<u8>,
    owner: String,
    state: String,
    lease_until: i64,
    status: Option<i64>,
    headers: Option<String>,
    body: Option<Vec<u8>>,
}

impl IdempotencyRow {
    /// What the claim met: its own new row, another request's, or a different request's.
    pub(crate) fn outcome(self, claim: &IdempotencyClaim) -> Result<IdempotencyBegin, StoreError> {
        let owner: RequestId = parse_id("idempotency owner", &self.owner)?;
        if owner == claim.owner {
            return Ok(IdempotencyBegin::Started);
        }
        if self.fingerprint != claim.fingerprint {
            return Ok(IdempotencyBegin::Mismatch);
        }
        if self.state == "in_flight" {
            return Ok(IdempotencyBegin::InFlight {
                owner,
                lease_until: from_millis(self.lease_until)?,
            });
        }
        let status = self.status.unwrap_or_default();
        let headers = self.headers.unwrap_or_default();
        Ok(IdempotencyBegin::Completed {
            owner,
            response: StoredResponse {
                status: u16::try_from(status)
                    .map_err(|_| corrupt("idempotency status", &status.to_string()))?,
                headers: from_json("idempotency headers", &headers)?,
                body: self.body,
            },
        })
    }
}

pub(crate) const UNIT_BUCKET_COLUMNS: &str =
    "account_id, bucket, source, meter, routes, granted, used, held, starts_at, ends_at";

#[derive(sqlx::FromRow)]
pub(crate) struct UnitBucketRow {
    account_id: String,
    bucket: String,
    source: String,
    meter: String,
    routes: Option<String>,
    granted: i64,
    used: i64,
    held: i64,
    starts_at: i64,
    ends_at: i64,
}

impl TryFrom<UnitBucketRow> for crate::units::UnitBucket {
    type Error = StoreError;

    fn try_from(row: UnitBucketRow) -> Result<Self, StoreError> {
        let count =
            |what: &str, n: i64| u64::try_from(n).map_err(|_| corrupt(what, &n.to_string()));
        Ok(crate::units::UnitBucket {
            account: parse_id("account id", &row.account_id)?,
            source: crate::units::BucketSource::parse(&row.source)
                .ok_or_else(|| corrupt("bucket source", &row.source))?,
            meter: tollgate_core::plan::Meter::parse(&row.meter)
                .ok_or_else(|| corrupt("bucket meter", &row.meter))?,
            routes: row.routes,
            granted: count("granted units", row.granted)?,
            used: count("used units", row.used)?,
            held: count("held units", row.held)?,
            starts_at: from_millis(row.starts_at)?,
            ends_at: from_millis(row.ends_at)?,
            bucket: row.bucket,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SubscriptionRow {
    plan: String,
    status: String,
    since: i64,
    started_at: i64,
}

impl TryFrom<SubscriptionRow> for tollgate_core::plan::Subscription {
    type Error = StoreError;

    fn try_from(row: SubscriptionRow) -> Result<Self, StoreError> {
        Ok(tollgate_core::plan::Subscription {
            status: tollgate_core::plan::SubscriptionStatus::parse(&row.status)
                .ok_or_else(|| corrupt("subscription status", &row.status))?,
            plan: row.plan,
            since: from_millis(row.since)?,
            started_at: from_millis(row.started_at)?,
        })
    }
}

/// A stored count of units; the schema keeps them within `i64`.
pub(crate) fn units(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
