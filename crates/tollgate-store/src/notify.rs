//! Webhooks in the store: endpoints, the event outbox, deliveries, and the crossings that make a
//! threshold fire once per episode.
//!
//! Both SQL backends run the same statements (written with `?`, numbered for PostgreSQL by
//! [`numbered`]), so one macro implements [`NotifyStore`] for each. Concurrency is decided by
//! the database: a crossing is a primary key inserted once, a delivery is claimed by a lease
//! the `UPDATE` re-checks, so nodes sharing a store neither fire twice nor send twice at once.

use crate::rows::{from_millis, parse_id};
use crate::StoreError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use std::borrow::Cow;
use std::collections::BTreeMap;
use tollgate_core::notify::{amount, Event, EventFilter, EventType};
use tollgate_core::{AccountId, EndpointId, EventId, Nanos, RequestId};

/// A URL an account receives events at.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRecord {
    pub id: EndpointId,
    pub account_id: AccountId,
    pub url: String,
    pub description: String,
    pub events: EventFilter,
    pub enabled: bool,
    /// Why Tollgate disabled it (a receiver that answered 410), or `None`.
    pub disabled_reason: Option<String>,
    /// `whsec_...`
    pub secret: String,
    /// The secret before the last rotation, still signing until `previous_until`.
    pub previous_secret: Option<String>,
    pub previous_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A threshold a subject crossed: once per (subject, kind, period) until it is recovered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// An account or key id.
    pub subject: String,
    pub kind: EventType,
    pub period: String,
    pub currency: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Result<DeliveryStatus, StoreError> {
        match text {
            "pending" => Ok(DeliveryStatus::Pending),
            "delivered" => Ok(DeliveryStatus::Delivered),
            "failed" => Ok(DeliveryStatus::Failed),
            other => Err(crate::rows::corrupt("delivery status", other)),
        }
    }
}

/// One event for one endpoint, as the delivery log shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub endpoint_id: EndpointId,
    pub event_id: EventId,
    pub event_type: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    /// When the next attempt is due, while pending.
    pub next_at: Option<DateTime<Utc>>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A delivery claimed for one attempt: the event and where it goes.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub endpoint: EndpointRecord,
    pub event: Event,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Delivered,
    /// Try again at this time.
    Retry(DateTime<Utc>),
    /// No more attempts.
    Failed,
    /// The receiver answered 410 Gone: the delivery fails and the endpoint is disabled.
    Gone,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub endpoint: EndpointId,
    pub event: EventId,
    pub at: DateTime<Utc>,
    /// The receiver's status, if it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub outcome: AttemptOutcome,
}

#[async_trait]
pub trait NotifyStore: Send + Sync {
    /// Inserts the endpoint unless the account already has `limit` (counted in the statement
    /// that inserts, so concurrent creations cannot pass it); false when it has.
    async fn create_endpoint(
        &self,
        endpoint: &EndpointRecord,
        limit: u32,
    ) -> Result<bool, StoreError>;
    async fn endpoint(&self, id: EndpointId) -> Result<Option<EndpointRecord>, StoreError>;
    /// The account's endpoints, oldest first.
    async fn endpoints(&self, account: AccountId) -> Result<Vec<EndpointRecord>, StoreError>;
    /// Stores every field but the id, account and creation time; false if it is gone.
    async fn update_endpoint(&self, endpoint: &EndpointRecord) -> Result<bool, StoreError>;
    /// Deletes the endpoint and its deliveries; false if it was not there.
    async fn delete_endpoint(&self, id: EndpointId) -> Result<bool, StoreError>;

    /// Records the deployment's currency, which events the store writes itself carry.
    async fn set_currency(&self, currency: &str) -> Result<(), StoreError>;

    /// The amount under which the account's settled balance is low (`None`: no alert).
    async fn set_low_balance(
        &self,
        account: AccountId,
        low: Option<Nanos>,
        currency: &str,
    ) -> Result<(), StoreError>;
    async fn low_balance(&self, account: AccountId) -> Result<Option<Nanos>, StoreError>;

    /// Records `crossing` and writes `event` in one transaction, unless it was crossed already
    /// (and not recovered from); true if this call crossed it.
    async fn cross(&self, crossing: &Crossing, event: &Event) -> Result<bool, StoreError>;
    /// Deletes the subject's crossing of `kind` (any period): the threshold is re-armed. True if
    /// there was one.
    async fn clear_crossing(&self, subject: &str, kind: EventType) -> Result<bool, StoreError>;
    /// Writes an event that has no threshold (a top-up, a revoked key).
    async fn emit(&self, event: &Event) -> Result<(), StoreError>;
    /// Writes an event for one endpoint only (a test ping), due at once.
    async fn emit_to(&self, event: &Event, endpoint: EndpointId) -> Result<(), StoreError>;

    /// Active keys that expire after `now` and by `horizon` whose expiry has not been announced
    /// (no `key.expiring` crossing for that expiry time).
    async fn keys_expiring(
        &self,
        now: DateTime<Utc>,
        horizon: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<tollgate_core::KeyId>, StoreError>;

    /// Gives up to `limit` events not yet fanned out a pending delivery for each enabled
    /// endpoint of their account whose filter admits them; how many events it handled.
    async fn fan_out(&self, now: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;
    /// Claims up to `limit` due deliveries until `lease_until` (a claim whose lease runs out,
    /// its worker gone, is due again).
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DueDelivery>, StoreError>;
    /// Records an attempt's outcome on its delivery (and disables the endpoint on 410).
    async fn finish_attempt(&self, attempt: &Attempt) -> Result<(), StoreError>;
    /// The endpoint's deliveries, newest event first, before `before`.
    async fn deliveries(
        &self,
        endpoint: EndpointId,
        before: Option<EventId>,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;
    /// Forgets events made before `cutoff` whose deliveries are all over (delivered or failed),
    /// with those deliveries; how many events went.
    async fn purge_events(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Makes a delivery pending and due at `now` again; false if there is no such delivery.
    async fn redeliver(
        &self,
        endpoint: EndpointId,
        event: EventId,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
}

/// `?` placeholders as PostgreSQL numbers them (`$1`, `$2`, ...). Statements here have no `?`
/// inside string literals.
pub(crate) fn numbered(sql: &str) -> Cow<'_, str> {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

pub(crate) fn as_is(sql: &str) -> Cow<'_, str> {
    Cow::Borrowed(sql)
}

pub(crate) const ENDPOINT_COLUMNS: &str = "id, account_id, url, description, event_types, \
     enabled, disabled_reason, secret, previous_secret, previous_until, created_at, updated_at";

pub(crate) type EndpointRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
    String,
    Option<String>,
    Option<i64>,
    i64,
    i64,
);

pub(crate) fn endpoint_from_row(row: EndpointRow) -> Result<EndpointRecord, StoreError> {
    let (id, account, url, description, types, enabled, reason, secret, previous, until, c, u) =
        row;
    let names: Vec<String> = serde_json::from_str(&types)
        .map_err(|_| crate::rows::corrupt("endpoint event types", &types))?;
    Ok(EndpointRecord {
        id: parse_id("endpoint id", &id)?,
        account_id: parse_id("account id", &account)?,
        url,
        description,
        events: EventFilter::parse(&names)
            .map_err(|name| crate::rows::corrupt("endpoint event type", &name))?,
        enabled: enabled != 0,
        disabled_reason: reason,
        secret,
        previous_secret: previous,
        previous_until: until.map(from_millis).transpose()?,
        created_at: from_millis(c)?,
        updated_at: from_millis(u)?,
    })
}

pub(crate) type EventRow = (String, String, String, String, i64);

pub(crate) fn event_from_row(row: EventRow) -> Result<Event, StoreError> {
    let (id, account, kind, body, at) = row;
    Ok(Event {
        id: parse_id("event id", &id)?,
        account: parse_id("account id", &account)?,
        kind: EventType::parse(&kind).ok_or_else(|| crate::rows::corrupt("event type", &kind))?,
        created_at: from_millis(at)?,
        body,
    })
}

pub(crate) type DeliveryRow = (
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    i64,
    i64,
);

pub(crate) fn delivery_from_row(row: DeliveryRow) -> Result<DeliveryRecord, StoreError> {
    let (endpoint, event, kind, status, attempts, next_at, last_status, last_error, created, at) =
        row;
    let status = DeliveryStatus::parse(&status)?;
    Ok(DeliveryRecord {
        endpoint_id: parse_id("endpoint id", &endpoint)?,
        event_id: parse_id("event id", &event)?,
        event_type: kind,
        status,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_at: match status {
            DeliveryStatus::Pending => Some(from_millis(next_at)?),
            _ => None,
        },
        last_status: last_status.and_then(|s| u16::try_from(s).ok()),
        last_error,
        created_at: from_millis(created)?,
        updated_at: from_millis(at)?,
    })
}

pub(crate) fn event_types_json(filter: &EventFilter) -> Result<String, StoreError> {
    crate::rows::to_json(&filter.names())
}

/// What a ledger batch did to settled balances (available + held − debt): per account, each
/// change in the order the batch made it, with the request it was made for, so a crossing is
/// told at the call that crossed, not at the batch's end.
#[derive(Debug)]
pub(crate) struct BalanceMoves {
    pub moves: BTreeMap<AccountId, Vec<(i64, Option<RequestId>)>>,
    /// Each key the batch charged: the month it charged in, and the request it charged last.
    pub keys: BTreeMap<tollgate_core::KeyId, (i32, Option<RequestId>)>,
    /// When the batch's last transfer was made: the events' time.
    pub at: DateTime<Utc>,
}

impl BalanceMoves {
    pub fn new(batch: &crate::batch::Batch<'_>) -> BalanceMoves {
        let mut moves: BTreeMap<AccountId, Vec<(i64, Option<RequestId>)>> = BTreeMap::new();
        for (transfer, _, _, reference, _) in &batch.transfers {
            for moved in transfer.balance_moves() {
                let settled = moved.available + moved.held - moved.debt;
                if settled != 0 {
                    moves
                        .entry(moved.account)
                        .or_default()
                        .push((settled, RequestId::parse(reference)));
                }
            }
        }
        moves.retain(|_, steps| steps.iter().map(|(n, _)| n).sum::<i64>() != 0);
        let mut keys: BTreeMap<tollgate_core::KeyId, (i32, Option<RequestId>)> = batch
            .key_spend
            .iter()
            .filter(|(_, delta)| delta.spent > 0)
            .map(|(key, delta)| (*key, (delta.month, None)))
            .collect();
        // The last call that charged the key (a refused call's row charges nothing).
        for row in batch.usage.iter().filter(|row| row.cost > Nanos::ZERO) {
            if let Some(entry) = keys.get_mut(&row.key_id) {
                entry.1 = Some(row.request_id);
            }
        }
        let at = batch
            .transfers
            .iter()
            .map(|(.., at)| *at)
            .max()
            .unwrap_or_else(Utc::now);
        BalanceMoves { moves, keys, at }
    }
}

/// Where a batch's steps first took a balance that ended at `after` under `low`: the balance
/// then and the request that did it.
pub(crate) fn first_under(
    steps: &[(i64, Option<RequestId>)],
    after: i64,
    low: i64,
) -> (i64, Option<RequestId>) {
    let mut running = after - steps.iter().map(|(n, _)| n).sum::<i64>();
    for (step, request) in steps {
        running += step;
        if running < low {
            return (running, *request);
        }
    }
    (after, steps.last().and_then(|(_, r)| *r))
}

/// A plan allowance's bucket as its events read it: name, meter, granted, used, period.
pub(crate) type AllowanceRow = (String, String, i64, i64, i64, i64);

/// Whether a bucket is an allowance's period (`<allowance>@<start>`), not a window of one
/// (`<allowance>/<window>@<start>`) or a pack.
pub(crate) fn is_period_bucket(bucket: &str) -> bool {
    bucket
        .split_once('@')
        .is_some_and(|(name, _)| !name.contains('/'))
        && !bucket.starts_with("pack:")
}

/// An allowance event's `data`: the allowance, its meter, the period and its units.
pub(crate) fn allowance_data(row: &AllowanceRow) -> Result<serde_json::Value, StoreError> {
    let (bucket, meter, granted, used, starts, ends) = row;
    let allowance = bucket
        .split_once('@')
        .map_or(bucket.as_str(), |(name, _)| name);
    Ok(json!({
        "allowance": allowance,
        "meter": meter,
        "granted": granted,
        "used": used,
        "period_start": tollgate_core::clock::rfc3339(from_millis(*starts)?),
        "period_end": tollgate_core::clock::rfc3339(from_millis(*ends)?),
    }))
}

/// The shares of a key's monthly cap, and of an allowance's grant, that send an event.
pub(crate) const THRESHOLDS: [u8; 2] = [80, 100];

/// A capped key the batch charged, as the key spend watch reads it.
pub(crate) struct CappedKey {
    pub key: String,
    pub month: i64,
    pub spent: i64,
    pub cap: i64,
    pub account: String,
    pub prefix: String,
    pub name: String,
    /// The deployment's currency, as the server recorded it.
    pub currency: Option<String>,
}

pub(crate) type CappedKeyRow = (
    String,
    i64,
    i64,
    i64,
    String,
    String,
    String,
    Option<String>,
);

impl From<CappedKeyRow> for CappedKey {
    fn from(row: CappedKeyRow) -> CappedKey {
        let (key, month, spent, cap, account, prefix, name, currency) = row;
        CappedKey {
            key,
            month,
            spent,
            cap,
            account,
            prefix,
            name,
            currency,
        }
    }
}

impl CappedKey {
    /// A `key.spend_threshold` event's `data`.
    pub fn data(
        &self,
        percent: u8,
        currency: &str,
        request: Option<RequestId>,
    ) -> serde_json::Value {
        json!({
            "key_id": self.key,
            "key_prefix": self.prefix,
            "name": self.name,
            "percent": percent,
            "spent": amount(Nanos(self.spent), currency),
            "monthly_spend_cap": amount(Nanos(self.cap), currency),
            "request_id": request.map(|r| r.to_string()),
        })
    }
}

/// A balance event's `data`.
pub(crate) fn balance_data(
    balance: i64,
    low: Option<i64>,
    currency: &str,
    request: Option<RequestId>,
) -> serde_json::Value {
    json!({
        "balance": amount(Nanos(balance), currency),
        "low_balance": low.map(|low| amount(Nanos(low), currency)),
        "request_id": request.map(|r| r.to_string()),
    })
}

/// `n` bind placeholders, comma-separated.
pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

pub(crate) const INSERT_EVENT: &str = "INSERT INTO webhook_events \
     (id, account_id, type, body, created_at, fanned_out) VALUES (?, ?, ?, ?, ?, 0)";

pub(crate) const INSERT_CROSSING: &str = "INSERT INTO notify_crossings \
     (subject, kind, period, currency, crossed_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING";

/// A recovered balance's crossings, by account id.
pub(crate) const DELETE_BALANCE_CROSSINGS: &str = "DELETE FROM notify_crossings \
     WHERE subject = ? AND kind IN ('balance.low', 'balance.depleted') AND period = ''";

/// The balance watch's read, for `accounts` account ids bound in order: each watched account's
/// settled balance, its low-balance alert and currency, and the currency of an open crossing.
pub(crate) fn watched_balances_sql(accounts: usize) -> String {
    format!(
        "SELECT w.account_id, w.balance_nanos + w.held_nanos - w.debt_nanos, \
         a.low_nanos, a.currency, \
         (SELECT MIN(c.currency) FROM notify_crossings c WHERE c.subject = w.account_id \
          AND c.kind IN ('balance.low', 'balance.depleted') AND c.period = '') \
         FROM wallets w LEFT JOIN balance_alerts a ON a.account_id = w.account_id \
         WHERE w.account_id IN ({}) AND (a.low_nanos IS NOT NULL OR EXISTS \
         (SELECT 1 FROM notify_crossings c WHERE c.subject = w.account_id))",
        placeholders(accounts)
    )
}

pub(crate) type WatchedBalanceRow = (String, i64, Option<i64>, Option<String>, Option<String>);

/// What a batch's balance moves call for.
pub(crate) enum BalanceWatch {
    /// A watched balance fell under its low amount: `balance.low`, once per episode.
    Cross(Crossing, tollgate_core::notify::Event),
    /// A balance rose to its low amount (or, unwatched, rose at all after a refusal): its
    /// crossings are deleted, and if there were any, the event is sent.
    Recover {
        account: String,
        event: tollgate_core::notify::Event,
    },
}

/// Decides, from what [`watched_balances_sql`] read after the batch, which balances crossed.
pub(crate) fn balance_watches(
    moves: &BalanceMoves,
    rows: Vec<WatchedBalanceRow>,
) -> Result<Vec<BalanceWatch>, StoreError> {
    let mut watches = Vec::new();
    for (account, balance, low, alert_currency, crossed_currency) in rows {
        let id: AccountId = parse_id("account id", &account)?;
        let Some(steps) = moves.moves.get(&id) else {
            continue;
        };
        let moved: i64 = steps.iter().map(|(n, _)| n).sum();
        let fell_low = moved < 0 && low.is_some_and(|low| balance < low);
        let recovered = moved > 0 && low.is_none_or(|low| balance >= low);
        if let (true, Some(low_at)) = (fell_low, low) {
            let currency = alert_currency.unwrap_or_default();
            let (then, request) = first_under(steps, balance, low_at);
            let event = Event::new(
                id,
                EventType::BalanceLow,
                moves.at,
                balance_data(then, low, &currency, request),
            );
            let crossing = Crossing {
                subject: account,
                kind: EventType::BalanceLow,
                period: String::new(),
                currency,
            };
            watches.push(BalanceWatch::Cross(crossing, event));
        } else if recovered {
            if let Some(currency) = crossed_currency {
                let request = steps.iter().rev().find_map(|(_, r)| *r);
                let event = Event::new(
                    id,
                    EventType::BalanceRecovered,
                    moves.at,
                    balance_data(balance, low, &currency, request),
                );
                watches.push(BalanceWatch::Recover { account, event });
            }
        }
    }
    Ok(watches)
}

/// The key spend watch's read, for `keys` key ids bound in order: each capped key's month and
/// spend, its cap, and what its event names.
pub(crate) fn capped_keys_sql(keys: usize) -> String {
    format!(
        "SELECT s.key_id, CAST(s.month AS BIGINT), s.spent_nanos, k.monthly_spend_cap_nanos, \
         k.account_id, k.display_prefix, k.name, \
         (SELECT value FROM notify_settings WHERE name = 'currency') \
         FROM key_spend s JOIN api_keys k ON k.id = s.key_id \
         WHERE k.monthly_spend_cap_nanos IS NOT NULL AND s.key_id IN ({})",
        placeholders(keys)
    )
}

/// Decides, from what [`capped_keys_sql`] read after the batch, which capped keys' spend
/// reached 80 % or 100 % of the cap this month: one crossing per threshold and month.
pub(crate) fn key_spend_watches(
    moves: &BalanceMoves,
    rows: Vec<CappedKeyRow>,
) -> Result<Vec<(Crossing, tollgate_core::notify::Event)>, StoreError> {
    let mut watches = Vec::new();
    for capped in rows.into_iter().map(CappedKey::from) {
        let id: tollgate_core::KeyId = parse_id("key id", &capped.key)?;
        let Some((charged_in, request)) = moves.keys.get(&id).copied() else {
            continue;
        };
        if i64::from(charged_in) != capped.month || capped.cap <= 0 {
            continue;
        }
        let account: AccountId = parse_id("account id", &capped.account)?;
        let currency = capped.currency.clone().unwrap_or_else(|| "USD".into());
        for percent in THRESHOLDS {
            let reached =
                i128::from(capped.spent) * 100 >= i128::from(capped.cap) * i128::from(percent);
            if !reached {
                continue;
            }
            let event = Event::new(
                account,
                EventType::KeySpendThreshold,
                moves.at,
                capped.data(percent, &currency, request),
            );
            let crossing = Crossing {
                subject: capped.key.clone(),
                kind: EventType::KeySpendThreshold,
                period: format!("{}:{percent}", capped.month),
                currency: currency.clone(),
            };
            watches.push((crossing, event));
        }
    }
    Ok(watches)
}

/// Implements [`NotifyStore`] for a backend, and the crossings and events its writes record.
macro_rules! notify_store {
    ($store:ty, $db:ty, $sql:path, $skip_locked:literal) => {
        /// After units are settled, in that transaction: a plan allowance's period bucket (not
        /// a window's) whose used units reached 80 % or 100 % of its grant crosses that
        /// threshold, once per period.
        pub(crate) async fn watch_units(
            tx: &mut sqlx::Transaction<'_, $db>,
            account: tollgate_core::AccountId,
            buckets: &[String],
            request: tollgate_core::RequestId,
            at: chrono::DateTime<chrono::Utc>,
        ) -> Result<(), $crate::StoreError> {
            use $crate::notify::*;
            let periods: Vec<&String> = buckets.iter().filter(|b| is_period_bucket(b)).collect();
            if periods.is_empty() {
                return Ok(());
            }
            let mut query = sqlx::QueryBuilder::<$db>::new(
                "SELECT bucket, meter, granted, used, starts_at, ends_at FROM unit_buckets \
                 WHERE source = 'allowance' AND account_id = ",
            );
            query.push_bind(account.to_string());
            query.push(" AND bucket IN (");
            let mut list = query.separated(", ");
            for bucket in &periods {
                list.push_bind(bucket.as_str());
            }
            query.push(")");
            let rows: Vec<AllowanceRow> = query
                .build_query_as()
                .fetch_all(&mut **tx)
                .await
                .map_err(store_error)?;
            for row in rows {
                let (bucket, _, granted, used, _, _) = &row;
                for percent in THRESHOLDS {
                    let reached = *granted > 0
                        && i128::from(*used) * 100 >= i128::from(*granted) * i128::from(percent);
                    if !reached {
                        continue;
                    }
                    let mut data = allowance_data(&row)?;
                    data["percent"] = serde_json::json!(percent);
                    data["request_id"] = serde_json::json!(request.to_string());
                    let event = tollgate_core::notify::Event::new(
                        account,
                        tollgate_core::notify::EventType::AllowanceThreshold,
                        at,
                        data,
                    );
                    let crossing = Crossing {
                        subject: account.to_string(),
                        kind: tollgate_core::notify::EventType::AllowanceThreshold,
                        period: format!("{bucket}:{percent}"),
                        currency: String::new(),
                    };
                    cross_in(tx, &crossing, &event).await?;
                }
            }
            Ok(())
        }

        /// `allowance.reset` for a plan allowance's period bucket whose units are whole again
        /// (`how`: `period` or `manual`); a manual reset re-arms its thresholds.
        pub(crate) async fn announce_reset(
            tx: &mut sqlx::Transaction<'_, $db>,
            account: tollgate_core::AccountId,
            bucket: &str,
            how: &str,
            at: chrono::DateTime<chrono::Utc>,
        ) -> Result<(), $crate::StoreError> {
            use $crate::notify::*;
            if !is_period_bucket(bucket) {
                return Ok(());
            }
            let row: Option<AllowanceRow> = sqlx::query_as(&$sql(
                "SELECT bucket, meter, granted, used, starts_at, ends_at FROM unit_buckets \
                 WHERE source = 'allowance' AND account_id = ? AND bucket = ?",
            ))
            .bind(account.to_string())
            .bind(bucket)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?;
            let Some(row) = row else {
                return Ok(());
            };
            if how == "manual" {
                let prefix = format!("{bucket}:");
                sqlx::query(&$sql(
                    "DELETE FROM notify_crossings WHERE subject = ? AND kind = ? \
                     AND substr(period, 1, length(?)) = ?",
                ))
                .bind(account.to_string())
                .bind(tollgate_core::notify::EventType::AllowanceThreshold.as_str())
                .bind(&prefix)
                .bind(&prefix)
                .execute(&mut **tx)
                .await
                .map_err(store_error)?;
            }
            let mut data = allowance_data(&row)?;
            data["how"] = serde_json::json!(how);
            let event = tollgate_core::notify::Event::new(
                account,
                tollgate_core::notify::EventType::AllowanceReset,
                at,
                data,
            );
            insert_event(tx, &event).await
        }

        async fn insert_event(
            tx: &mut sqlx::Transaction<'_, $db>,
            event: &tollgate_core::notify::Event,
        ) -> Result<(), $crate::StoreError> {
            sqlx::query(&$sql($crate::notify::INSERT_EVENT))
            .bind(event.id.to_string())
            .bind(event.account.to_string())
            .bind(event.kind.as_str())
            .bind(&event.body)
            .bind(crate::rows::millis(event.created_at))
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
            Ok(())
        }

        /// Inserts the crossing and, if this inserted it, the event.
        async fn cross_in(
            tx: &mut sqlx::Transaction<'_, $db>,
            crossing: &$crate::notify::Crossing,
            event: &tollgate_core::notify::Event,
        ) -> Result<bool, $crate::StoreError> {
            let inserted = sqlx::query(&$sql($crate::notify::INSERT_CROSSING))
            .bind(&crossing.subject)
            .bind(crossing.kind.as_str())
            .bind(&crossing.period)
            .bind(&crossing.currency)
            .bind(crate::rows::millis(event.created_at))
            .execute(&mut **tx)
            .await
            .map_err(store_error)?
            .rows_affected()
                == 1;
            if inserted {
                insert_event(tx, event).await?;
            }
            Ok(inserted)
        }

        #[async_trait::async_trait]
        impl $crate::notify::NotifyStore for $store {
            async fn create_endpoint(
                &self,
                endpoint: &$crate::notify::EndpointRecord,
                limit: u32,
            ) -> Result<bool, $crate::StoreError> {
                use $crate::notify::*;
                let inserted = sqlx::query(&$sql(&format!(
                    "INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}) \
                     SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? \
                     WHERE (SELECT COUNT(*) FROM webhook_endpoints WHERE account_id = ?) < ?"
                )))
                .bind(endpoint.id.to_string())
                .bind(endpoint.account_id.to_string())
                .bind(&endpoint.url)
                .bind(&endpoint.description)
                .bind(event_types_json(&endpoint.events)?)
                .bind(i64::from(endpoint.enabled))
                .bind(&endpoint.disabled_reason)
                .bind(&endpoint.secret)
                .bind(&endpoint.previous_secret)
                .bind(endpoint.previous_until.map(crate::rows::millis))
                .bind(crate::rows::millis(endpoint.created_at))
                .bind(crate::rows::millis(endpoint.updated_at))
                .bind(endpoint.account_id.to_string())
                .bind(i64::from(limit))
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected();
                Ok(inserted == 1)
            }

            async fn endpoint(
                &self,
                id: tollgate_core::EndpointId,
            ) -> Result<Option<$crate::notify::EndpointRecord>, $crate::StoreError> {
                use $crate::notify::*;
                let row = sqlx::query_as(&$sql(&format!(
                    "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = ?"
                )))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
                row.map(endpoint_from_row).transpose()
            }

            async fn endpoints(
                &self,
                account: tollgate_core::AccountId,
            ) -> Result<Vec<$crate::notify::EndpointRecord>, $crate::StoreError> {
                use $crate::notify::*;
                let rows = sqlx::query_as(&$sql(&format!(
                    "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE account_id = ? \
                     ORDER BY id"
                )))
                .bind(account.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                rows.into_iter().map(endpoint_from_row).collect()
            }

            async fn update_endpoint(
                &self,
                endpoint: &$crate::notify::EndpointRecord,
            ) -> Result<bool, $crate::StoreError> {
                use $crate::notify::*;
                let changed = sqlx::query(&$sql(
                    "UPDATE webhook_endpoints SET url = ?, description = ?, event_types = ?, \
                     enabled = ?, disabled_reason = ?, secret = ?, previous_secret = ?, \
                     previous_until = ?, updated_at = ? WHERE id = ?",
                ))
                .bind(&endpoint.url)
                .bind(&endpoint.description)
                .bind(event_types_json(&endpoint.events)?)
                .bind(i64::from(endpoint.enabled))
                .bind(&endpoint.disabled_reason)
                .bind(&endpoint.secret)
                .bind(&endpoint.previous_secret)
                .bind(endpoint.previous_until.map(crate::rows::millis))
                .bind(crate::rows::millis(endpoint.updated_at))
                .bind(endpoint.id.to_string())
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected();
                Ok(changed == 1)
            }

            async fn delete_endpoint(
                &self,
                id: tollgate_core::EndpointId,
            ) -> Result<bool, $crate::StoreError> {
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                sqlx::query(&$sql("DELETE FROM webhook_deliveries WHERE endpoint_id = ?"))
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                let deleted = sqlx::query(&$sql("DELETE FROM webhook_endpoints WHERE id = ?"))
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?
                    .rows_affected();
                tx.commit().await.map_err(store_error)?;
                Ok(deleted == 1)
            }

            async fn set_currency(&self, currency: &str) -> Result<(), $crate::StoreError> {
                sqlx::query(&$sql(
                    "INSERT INTO notify_settings (name, value) VALUES ('currency', ?) \
                     ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                ))
                .bind(currency)
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(())
            }

            async fn set_low_balance(
                &self,
                account: tollgate_core::AccountId,
                low: Option<tollgate_core::Nanos>,
                currency: &str,
            ) -> Result<(), $crate::StoreError> {
                let upsert = $sql(
                    "INSERT INTO balance_alerts (account_id, low_nanos, currency) \
                     VALUES (?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET \
                     low_nanos = EXCLUDED.low_nanos, currency = EXCLUDED.currency",
                );
                let delete = $sql("DELETE FROM balance_alerts WHERE account_id = ?");
                match low {
                    Some(low) => sqlx::query(&upsert)
                        .bind(account.to_string())
                        .bind(low.0)
                        .bind(currency),
                    None => sqlx::query(&delete).bind(account.to_string()),
                }
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(())
            }

            async fn low_balance(
                &self,
                account: tollgate_core::AccountId,
            ) -> Result<Option<tollgate_core::Nanos>, $crate::StoreError> {
                let low: Option<i64> = sqlx::query_scalar(&$sql(
                    "SELECT low_nanos FROM balance_alerts WHERE account_id = ?",
                ))
                .bind(account.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(low.map(tollgate_core::Nanos))
            }

            async fn cross(
                &self,
                crossing: &$crate::notify::Crossing,
                event: &tollgate_core::notify::Event,
            ) -> Result<bool, $crate::StoreError> {
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                let crossed = cross_in(&mut tx, crossing, event).await?;
                tx.commit().await.map_err(store_error)?;
                Ok(crossed)
            }

            async fn clear_crossing(
                &self,
                subject: &str,
                kind: tollgate_core::notify::EventType,
            ) -> Result<bool, $crate::StoreError> {
                let deleted = sqlx::query(&$sql(
                    "DELETE FROM notify_crossings WHERE subject = ? AND kind = ?",
                ))
                .bind(subject)
                .bind(kind.as_str())
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected();
                Ok(deleted > 0)
            }

            async fn emit(
                &self,
                event: &tollgate_core::notify::Event,
            ) -> Result<(), $crate::StoreError> {
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                insert_event(&mut tx, event).await?;
                tx.commit().await.map_err(store_error)
            }

            async fn emit_to(
                &self,
                event: &tollgate_core::notify::Event,
                endpoint: tollgate_core::EndpointId,
            ) -> Result<(), $crate::StoreError> {
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                insert_event(&mut tx, event).await?;
                let at = crate::rows::millis(event.created_at);
                sqlx::query(&$sql("UPDATE webhook_events SET fanned_out = 1 WHERE id = ?"))
                    .bind(event.id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                sqlx::query(&$sql(
                    "INSERT INTO webhook_deliveries (endpoint_id, event_id, status, attempts, \
                     next_at, leased_until, updated_at) VALUES (?, ?, 'pending', 0, ?, 0, ?)",
                ))
                .bind(endpoint.to_string())
                .bind(event.id.to_string())
                .bind(at)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
                tx.commit().await.map_err(store_error)
            }

            async fn keys_expiring(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                horizon: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<Vec<tollgate_core::KeyId>, $crate::StoreError> {
                let ids: Vec<String> = sqlx::query_scalar(&$sql(
                    "SELECT k.id FROM api_keys k WHERE k.expires_at > ? AND k.expires_at <= ? \
                     AND k.status = 'active' AND NOT EXISTS (SELECT 1 FROM notify_crossings c \
                     WHERE c.subject = k.id AND c.kind = 'key.expiring' \
                     AND c.period = CAST(k.expires_at AS TEXT)) ORDER BY k.expires_at LIMIT ?",
                ))
                .bind(crate::rows::millis(now))
                .bind(crate::rows::millis(horizon))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                ids.iter().map(|id| crate::rows::parse_id("key id", id)).collect()
            }

            async fn fan_out(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<u64, $crate::StoreError> {
                use $crate::notify::*;
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                let waiting: Vec<(String, String, String)> = sqlx::query_as(&$sql(&format!(
                    "SELECT id, account_id, type FROM webhook_events WHERE fanned_out = 0 \
                     ORDER BY id LIMIT ? {}",
                    $skip_locked
                )))
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(store_error)?;
                let mut endpoints: std::collections::HashMap<String, Vec<EndpointRecord>> =
                    std::collections::HashMap::new();
                for (event, account, kind) in &waiting {
                    if !endpoints.contains_key(account) {
                        let rows = sqlx::query_as(&$sql(&format!(
                            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints \
                             WHERE account_id = ? AND enabled = 1"
                        )))
                        .bind(account)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(store_error)?;
                        let rows = rows
                            .into_iter()
                            .map(endpoint_from_row)
                            .collect::<Result<Vec<_>, _>>()?;
                        endpoints.insert(account.clone(), rows);
                    }
                    let kind = tollgate_core::notify::EventType::parse(kind)
                        .ok_or_else(|| crate::rows::corrupt("event type", kind))?;
                    for endpoint in endpoints.get(account).into_iter().flatten() {
                        if !endpoint.events.admits(kind) {
                            continue;
                        }
                        sqlx::query(&$sql(
                            "INSERT INTO webhook_deliveries (endpoint_id, event_id, status, \
                             attempts, next_at, leased_until, updated_at) \
                             VALUES (?, ?, 'pending', 0, ?, 0, ?) ON CONFLICT DO NOTHING",
                        ))
                        .bind(endpoint.id.to_string())
                        .bind(event)
                        .bind(crate::rows::millis(now))
                        .bind(crate::rows::millis(now))
                        .execute(&mut *tx)
                        .await
                        .map_err(store_error)?;
                    }
                    sqlx::query(&$sql("UPDATE webhook_events SET fanned_out = 1 WHERE id = ?"))
                        .bind(event)
                        .execute(&mut *tx)
                        .await
                        .map_err(store_error)?;
                }
                tx.commit().await.map_err(store_error)?;
                Ok(waiting.len() as u64)
            }

            async fn claim_deliveries(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                lease_until: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<Vec<$crate::notify::DueDelivery>, $crate::StoreError> {
                use $crate::notify::*;
                let now = crate::rows::millis(now);
                // The oldest due delivery of each endpoint with none in flight: a receiver gets
                // one attempt at a time, and a slow one holds up only itself. The outer
                // conditions are checked again on each row as it is locked, so of two nodes
                // claiming at once only one takes a delivery.
                let claimed: Vec<(String, String, i64)> = sqlx::query_as(&$sql(
                    "UPDATE webhook_deliveries SET leased_until = ? \
                     WHERE status = 'pending' AND next_at <= ? AND leased_until <= ? \
                     AND (endpoint_id, event_id) IN (SELECT d.endpoint_id, MIN(d.event_id) \
                     FROM webhook_deliveries d WHERE d.status = 'pending' AND d.next_at <= ? \
                     AND NOT EXISTS (SELECT 1 FROM webhook_deliveries busy \
                     WHERE busy.endpoint_id = d.endpoint_id AND busy.leased_until > ?) \
                     GROUP BY d.endpoint_id ORDER BY MIN(d.next_at) LIMIT ?) \
                     RETURNING endpoint_id, event_id, attempts",
                ))
                .bind(crate::rows::millis(lease_until))
                .bind(now)
                .bind(now)
                .bind(now)
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                let mut due = Vec::with_capacity(claimed.len());
                for (endpoint, event, attempts) in claimed {
                    let endpoint_row = sqlx::query_as(&$sql(&format!(
                        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = ?"
                    )))
                    .bind(&endpoint)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(store_error)?;
                    let event_row = sqlx::query_as(&$sql(
                        "SELECT id, account_id, type, body, created_at FROM webhook_events \
                         WHERE id = ?",
                    ))
                    .bind(&event)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(store_error)?;
                    // An endpoint deleted since the claim takes its deliveries with it.
                    if let (Some(endpoint), Some(event)) = (endpoint_row, event_row) {
                        due.push(DueDelivery {
                            endpoint: endpoint_from_row(endpoint)?,
                            event: event_from_row(event)?,
                            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                        });
                    }
                }
                Ok(due)
            }

            async fn finish_attempt(
                &self,
                attempt: &$crate::notify::Attempt,
            ) -> Result<(), $crate::StoreError> {
                use $crate::notify::*;
                let (status, next_at) = match &attempt.outcome {
                    AttemptOutcome::Delivered => (DeliveryStatus::Delivered, attempt.at),
                    AttemptOutcome::Retry(at) => (DeliveryStatus::Pending, *at),
                    AttemptOutcome::Failed | AttemptOutcome::Gone => {
                        (DeliveryStatus::Failed, attempt.at)
                    }
                };
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                sqlx::query(&$sql(
                    "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, \
                     next_at = ?, leased_until = 0, last_status = ?, last_error = ?, \
                     updated_at = ? WHERE endpoint_id = ? AND event_id = ?",
                ))
                .bind(status.as_str())
                .bind(crate::rows::millis(next_at))
                .bind(attempt.status.map(i64::from))
                .bind(&attempt.error)
                .bind(crate::rows::millis(attempt.at))
                .bind(attempt.endpoint.to_string())
                .bind(attempt.event.to_string())
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
                if attempt.outcome == AttemptOutcome::Gone {
                    sqlx::query(&$sql(
                        "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ?, \
                         updated_at = ? WHERE id = ?",
                    ))
                    .bind("the receiver answered 410 Gone")
                    .bind(crate::rows::millis(attempt.at))
                    .bind(attempt.endpoint.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                }
                tx.commit().await.map_err(store_error)
            }

            async fn deliveries(
                &self,
                endpoint: tollgate_core::EndpointId,
                before: Option<tollgate_core::EventId>,
                limit: u32,
            ) -> Result<Vec<$crate::notify::DeliveryRecord>, $crate::StoreError> {
                use $crate::notify::*;
                let rows: Vec<DeliveryRow> = sqlx::query_as(&$sql(
                    "SELECT d.endpoint_id, d.event_id, e.type, d.status, d.attempts, d.next_at, \
                     d.last_status, d.last_error, e.created_at, d.updated_at \
                     FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id \
                     WHERE d.endpoint_id = ? AND d.event_id < ? ORDER BY d.event_id DESC LIMIT ?",
                ))
                .bind(endpoint.to_string())
                .bind(before.map_or_else(|| "~".to_string(), |id| id.to_string()))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                rows.into_iter().map(delivery_from_row).collect()
            }

            async fn purge_events(
                &self,
                cutoff: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::StoreError> {
                let cutoff = crate::rows::millis(cutoff);
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                let old = "SELECT e.id FROM webhook_events e WHERE e.created_at < ? \
                     AND e.fanned_out = 1 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d \
                     WHERE d.event_id = e.id AND d.status = 'pending')";
                sqlx::query(&$sql(&format!(
                    "DELETE FROM webhook_deliveries WHERE event_id IN ({old})"
                )))
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
                let purged = sqlx::query(&$sql(&format!(
                    "DELETE FROM webhook_events WHERE id IN ({old})"
                )))
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?
                .rows_affected();
                tx.commit().await.map_err(store_error)?;
                Ok(purged)
            }

            async fn redeliver(
                &self,
                endpoint: tollgate_core::EndpointId,
                event: tollgate_core::EventId,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::StoreError> {
                let changed = sqlx::query(&$sql(
                    "UPDATE webhook_deliveries SET status = 'pending', next_at = ?, \
                     updated_at = ? WHERE endpoint_id = ? AND event_id = ?",
                ))
                .bind(crate::rows::millis(now))
                .bind(crate::rows::millis(now))
                .bind(endpoint.to_string())
                .bind(event.to_string())
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected();
                Ok(changed == 1)
            }
        }
    };
}

pub(crate) use notify_store;
