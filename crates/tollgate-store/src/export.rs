//! Usage export in the store: the log of charged usage in commit order, each sink's cursor,
//! the records parked for the operator, and the accounts' customer ids in each sink.
//!
//! A ledger batch writes its charged usage rows (settled, partial, estimated; never released
//! or expired) to `usage_exports` in its own transaction, numbered in commit order (see the
//! migrations for how each backend guarantees that). An exporter reads past its sink's cursor
//! and moves the cursor only when the sink has acknowledged, or when what it could not take is
//! parked in the same transaction: nothing between the old and new cursor is ever lost.

use crate::rows::{from_millis, parse_id};
use crate::{StoreError, UsageRow};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tollgate_core::ledger::BillingStatus;
use tollgate_core::{AccountId, KeyId, Nanos, RequestId};

/// One call's charged usage, as sinks receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRecord {
    /// Its place in commit order.
    pub seq: i64,
    pub request_id: RequestId,
    pub account: AccountId,
    pub key: KeyId,
    pub route: String,
    pub model: Option<String>,
    pub status: BillingStatus,
    pub cost: Nanos,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    /// When the call's usage was final.
    pub at: DateTime<Utc>,
}

/// Why a record waits aside instead of at its sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParkReason {
    /// The account has no customer id in this sink yet; sent once it has one.
    Unmapped,
    /// Older than the sink accepts: a dead letter.
    TooOld,
    /// The sink refused it as it is: a dead letter.
    Rejected,
}

impl ParkReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ParkReason::Unmapped => "unmapped",
            ParkReason::TooOld => "too_old",
            ParkReason::Rejected => "rejected",
        }
    }

    pub fn parse(text: &str) -> Option<ParkReason> {
        [
            ParkReason::Unmapped,
            ParkReason::TooOld,
            ParkReason::Rejected,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

/// A record set aside, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRecord {
    pub record: ExportRecord,
    pub reason: ParkReason,
    pub detail: String,
    pub parked_at: DateTime<Utc>,
}

/// Where a sink stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStanding {
    pub cursor: i64,
    /// The newest record's seq.
    pub head: i64,
    /// Records past the cursor (counted by seq: a rolled-back batch's numbers count too).
    pub pending: u64,
    /// When the oldest of them was final.
    pub oldest_pending: Option<DateTime<Utc>>,
    pub unmapped: u64,
    pub dead: u64,
}

/// One account's charged usage on one UTC day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DayTotal {
    pub account: AccountId,
    /// Midnight UTC.
    pub day: DateTime<Utc>,
    pub requests: u64,
    pub cost: Nanos,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
}

#[async_trait]
pub trait ExportStore: Send + Sync {
    /// Up to `limit` records after `after`, in commit order.
    async fn export_records(&self, after: i64, limit: u32)
        -> Result<Vec<ExportRecord>, StoreError>;

    /// The sink's cursor: 0 before its first acknowledgement.
    async fn export_cursor(&self, sink: &str) -> Result<i64, StoreError>;

    /// A sink seen for the first time starts at the newest record: it is sent what is charged
    /// from now on, never the history the log already holds. Its cursor, new or not.
    async fn start_export(&self, sink: &str, at: DateTime<Utc>) -> Result<i64, StoreError>;

    /// Moves the sink's cursor from `from` to `to` and parks `parked` (seq, reason, detail) in
    /// one transaction; false (and nothing changed) if the cursor is no longer at `from`.
    async fn advance_export(
        &self,
        sink: &str,
        from: i64,
        to: i64,
        parked: &[(i64, ParkReason, String)],
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// The sink's parked records after `after`, oldest first; of one reason, or all.
    async fn parked_exports(
        &self,
        sink: &str,
        reason: Option<ParkReason>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ParkedRecord>, StoreError>;

    /// Up to `limit` records parked as unmapped whose account now has a customer id in the sink
    /// (with `card_customers`, a Stripe customer saved by a card checkout counts), oldest first.
    async fn newly_mapped_exports(
        &self,
        sink: &str,
        card_customers: bool,
        limit: u32,
    ) -> Result<Vec<ExportRecord>, StoreError>;

    /// Re-parks a parked record with a new reason (a mapped account's record the sink then
    /// refused), or takes it off the list (`None`: delivered). False if it was not parked.
    async fn repark_export(
        &self,
        sink: &str,
        seq: i64,
        now: Option<(ParkReason, String)>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// The customer ids these accounts have in the sink. With `card_customers`, an account
    /// with none set falls back to the Stripe customer its card checkout saved.
    async fn export_customers(
        &self,
        sink: &str,
        card_customers: bool,
        accounts: &[AccountId],
    ) -> Result<Vec<(AccountId, String)>, StoreError>;

    /// Sets (or, with `None`, removes) the account's customer id in the sink.
    async fn set_export_customer(
        &self,
        account: AccountId,
        sink: &str,
        customer: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    async fn export_standing(&self, sink: &str) -> Result<SinkStanding, StoreError>;

    /// Charged usage per account and UTC day, for records final in `[from, to)`.
    async fn export_day_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<DayTotal>, StoreError>;

    /// Deletes records final before `cutoff` that every named sink has passed and none has
    /// parked.
    async fn purge_exports(
        &self,
        cutoff: DateTime<Utc>,
        sinks: &[String],
    ) -> Result<u64, StoreError>;
}

/// The usage rows a batch exports: those that charged.
pub(crate) fn exported<'a>(usage: &'a [&'a UsageRow]) -> impl Iterator<Item = &'a UsageRow> + 'a {
    usage.iter().copied().filter(|row| {
        matches!(
            row.billing_status,
            BillingStatus::Settled | BillingStatus::Partial | BillingStatus::Estimated
        )
    })
}

/// Whether the export log is kept: once any sink has started (it has a cursor). Before that
/// nobody reads the log, and a sink that starts later begins at the newest record.
pub(crate) const EXPORTING: &str = "SELECT EXISTS (SELECT 1 FROM export_cursors)";

pub(crate) const EXPORT_COLUMNS: &str = "request_id, account_id, key_id, route, model, \
     billing_status, cost_nanos, input_tokens, cached_input_tokens, output_tokens, at";

/// One export row's values (after its seq, if the backend binds one).
pub(crate) fn export_cells(row: &UsageRow) -> [crate::rows::Cell; 11] {
    use crate::rows::Cell;
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let tokens = row.tokens.unwrap_or_default();
    [
        Cell::Text(row.request_id.to_string()),
        Cell::Text(row.account_id.to_string()),
        Cell::Text(row.key_id.to_string()),
        Cell::Text(row.route.clone()),
        Cell::MaybeText(row.model.clone()),
        Cell::Text(row.billing_status.as_str().to_string()),
        Cell::Int(row.cost.0),
        Cell::Int(count(tokens.input)),
        Cell::Int(count(tokens.cached_input)),
        Cell::Int(count(tokens.output)),
        Cell::Int(crate::rows::millis(row.completed_at)),
    ]
}

pub(crate) type ExportRow = (
    i64,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
);

pub(crate) const SELECT_EXPORT: &str = "e.seq, e.request_id, e.account_id, e.key_id, e.route, \
     e.model, e.billing_status, e.cost_nanos, e.input_tokens, e.cached_input_tokens, \
     e.output_tokens, e.at";

pub(crate) fn record_from_row(row: ExportRow) -> Result<ExportRecord, StoreError> {
    let (seq, request, account, key, route, model, status, cost, input, cached, output, at) = row;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(ExportRecord {
        seq,
        request_id: parse_id("request id", &request)?,
        account: parse_id("account id", &account)?,
        key: parse_id("key id", &key)?,
        route,
        model,
        status: BillingStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown billing status '{status}'")))?,
        cost: Nanos(cost),
        input_tokens: count(input),
        cached_input_tokens: count(cached),
        output_tokens: count(output),
        at: from_millis(at)?,
    })
}

/// For a backend whose rows are numbered in commit order as they are inserted (SQLite: one
/// writer at a time, `AUTOINCREMENT`): nothing to do before a read.
pub(crate) async fn numbered_on_insert(_pool: &sqlx::SqlitePool) -> Result<(), StoreError> {
    Ok(())
}

/// Implements [`ExportStore`] for a backend; `$sql` numbers placeholders as it needs, and
/// `$number` numbers committed rows before the log is read.
macro_rules! export_store {
    ($store:ty, $sql:path, $number:path) => {
        #[async_trait::async_trait]
        impl $crate::export::ExportStore for $store {
            async fn export_records(
                &self,
                after: i64,
                limit: u32,
            ) -> Result<Vec<$crate::export::ExportRecord>, $crate::StoreError> {
                use $crate::export::*;
                $number(&self.pool).await?;
                let rows: Vec<ExportRow> = sqlx::query_as(&$sql(&format!(
                    "SELECT {SELECT_EXPORT} FROM usage_exports e WHERE e.seq > ? \
                     ORDER BY e.seq LIMIT ?"
                )))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                rows.into_iter().map(record_from_row).collect()
            }

            async fn export_cursor(&self, sink: &str) -> Result<i64, $crate::StoreError> {
                let seq: Option<i64> =
                    sqlx::query_scalar(&$sql("SELECT seq FROM export_cursors WHERE sink = ?"))
                        .bind(sink)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(store_error)?;
                Ok(seq.unwrap_or(0))
            }

            async fn start_export(
                &self,
                sink: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> Result<i64, $crate::StoreError> {
                $number(&self.pool).await?;
                sqlx::query(&$sql(
                    "INSERT INTO export_cursors (sink, seq, updated_at) \
                     SELECT ?, COALESCE(MAX(seq), 0), ? FROM usage_exports WHERE true \
                     ON CONFLICT (sink) DO NOTHING",
                ))
                .bind(sink)
                .bind(crate::rows::millis(at))
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                $crate::export::ExportStore::export_cursor(self, sink).await
            }

            async fn advance_export(
                &self,
                sink: &str,
                from: i64,
                to: i64,
                parked: &[(i64, $crate::export::ParkReason, String)],
                at: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::StoreError> {
                let at = crate::rows::millis(at);
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                // A missing row is a cursor at 0: only an advance from 0 may create it.
                let moved = if from == 0 {
                    sqlx::query(&$sql(
                        "INSERT INTO export_cursors (sink, seq, updated_at) VALUES (?, ?, ?) \
                         ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq, \
                         updated_at = excluded.updated_at WHERE export_cursors.seq = 0",
                    ))
                    .bind(sink)
                    .bind(to)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                } else {
                    sqlx::query(&$sql(
                        "UPDATE export_cursors SET seq = ?, updated_at = ? \
                         WHERE sink = ? AND seq = ?",
                    ))
                    .bind(to)
                    .bind(at)
                    .bind(sink)
                    .bind(from)
                    .execute(&mut *tx)
                    .await
                }
                .map_err(store_error)?
                .rows_affected();
                if moved != 1 {
                    tx.rollback().await.map_err(store_error)?;
                    return Ok(false);
                }
                for (seq, reason, detail) in parked {
                    sqlx::query(&$sql(
                        "INSERT INTO export_parked (sink, seq, reason, detail, parked_at) \
                         VALUES (?, ?, ?, ?, ?) ON CONFLICT (sink, seq) DO NOTHING",
                    ))
                    .bind(sink)
                    .bind(*seq)
                    .bind(reason.as_str())
                    .bind(detail)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                }
                tx.commit().await.map_err(store_error)?;
                Ok(true)
            }

            async fn parked_exports(
                &self,
                sink: &str,
                reason: Option<$crate::export::ParkReason>,
                after: i64,
                limit: u32,
            ) -> Result<Vec<$crate::export::ParkedRecord>, $crate::StoreError> {
                use $crate::export::*;
                let rows: Vec<(i64, String, String, String, String, Option<String>, String,
                               i64, i64, i64, i64, i64, String, String, i64)> =
                    sqlx::query_as(&$sql(&format!(
                        "SELECT {SELECT_EXPORT}, p.reason, p.detail, p.parked_at \
                         FROM export_parked p JOIN usage_exports e ON e.seq = p.seq \
                         WHERE p.sink = ? AND (? = '' OR p.reason = ?) AND p.seq > ? \
                         ORDER BY p.seq LIMIT ?"
                    )))
                    .bind(sink)
                    .bind(reason.map_or("", |r| r.as_str()))
                    .bind(reason.map_or("", |r| r.as_str()))
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(store_error)?;
                rows.into_iter()
                    .map(|r| {
                        let record = record_from_row((
                            r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9, r.10, r.11,
                        ))?;
                        Ok(ParkedRecord {
                            record,
                            reason: ParkReason::parse(&r.12).ok_or_else(|| {
                                $crate::StoreError::Corrupt(format!(
                                    "unknown park reason '{}'",
                                    r.12
                                ))
                            })?,
                            detail: r.13,
                            parked_at: crate::rows::from_millis(r.14)?,
                        })
                    })
                    .collect()
            }

            async fn newly_mapped_exports(
                &self,
                sink: &str,
                card_customers: bool,
                limit: u32,
            ) -> Result<Vec<$crate::export::ExportRecord>, $crate::StoreError> {
                use $crate::export::*;
                let rows: Vec<ExportRow> = sqlx::query_as(&$sql(&format!(
                    "SELECT {SELECT_EXPORT} FROM export_parked p \
                     JOIN usage_exports e ON e.seq = p.seq \
                     WHERE p.sink = ? AND p.reason = 'unmapped' AND (EXISTS (SELECT 1 FROM \
                     export_customers c WHERE c.account_id = e.account_id AND c.sink = ?) \
                     OR (? = 1 AND EXISTS (SELECT 1 FROM auto_topups a \
                     WHERE a.account_id = e.account_id AND a.customer IS NOT NULL))) \
                     ORDER BY p.seq LIMIT ?"
                )))
                .bind(sink)
                .bind(sink)
                .bind(i64::from(card_customers))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                rows.into_iter().map(record_from_row).collect()
            }

            async fn repark_export(
                &self,
                sink: &str,
                seq: i64,
                now: Option<($crate::export::ParkReason, String)>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::StoreError> {
                let changed = match now {
                    None => sqlx::query(&$sql(
                        "DELETE FROM export_parked WHERE sink = ? AND seq = ?",
                    ))
                    .bind(sink)
                    .bind(seq)
                    .execute(&self.pool)
                    .await,
                    Some((reason, detail)) => sqlx::query(&$sql(
                        "UPDATE export_parked SET reason = ?, detail = ?, parked_at = ? \
                         WHERE sink = ? AND seq = ?",
                    ))
                    .bind(reason.as_str())
                    .bind(detail)
                    .bind(crate::rows::millis(at))
                    .bind(sink)
                    .bind(seq)
                    .execute(&self.pool)
                    .await,
                }
                .map_err(store_error)?
                .rows_affected();
                Ok(changed == 1)
            }

            async fn export_customers(
                &self,
                sink: &str,
                card_customers: bool,
                accounts: &[tollgate_core::AccountId],
            ) -> Result<Vec<(tollgate_core::AccountId, String)>, $crate::StoreError> {
                let mut found = Vec::new();
                for account in accounts {
                    let customer: Option<Option<String>> = sqlx::query_scalar(&$sql(
                        "SELECT COALESCE((SELECT customer FROM export_customers \
                         WHERE account_id = ? AND sink = ?), \
                         (SELECT customer FROM auto_topups WHERE account_id = ? AND ? = 1))",
                    ))
                    .bind(account.to_string())
                    .bind(sink)
                    .bind(account.to_string())
                    .bind(i64::from(card_customers))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(store_error)?;
                    if let Some(Some(customer)) = customer {
                        found.push((*account, customer));
                    }
                }
                Ok(found)
            }

            async fn set_export_customer(
                &self,
                account: tollgate_core::AccountId,
                sink: &str,
                customer: Option<&str>,
                at: chrono::DateTime<chrono::Utc>,
            ) -> Result<(), $crate::StoreError> {
                match customer {
                    Some(customer) => sqlx::query(&$sql(
                        "INSERT INTO export_customers (account_id, sink, customer, updated_at) \
                         VALUES (?, ?, ?, ?) ON CONFLICT (account_id, sink) DO UPDATE \
                         SET customer = excluded.customer, updated_at = excluded.updated_at",
                    ))
                    .bind(account.to_string())
                    .bind(sink)
                    .bind(customer)
                    .bind(crate::rows::millis(at))
                    .execute(&self.pool)
                    .await,
                    None => sqlx::query(&$sql(
                        "DELETE FROM export_customers WHERE account_id = ? AND sink = ?",
                    ))
                    .bind(account.to_string())
                    .bind(sink)
                    .execute(&self.pool)
                    .await,
                }
                .map_err(store_error)?;
                Ok(())
            }

            async fn export_standing(
                &self,
                sink: &str,
            ) -> Result<$crate::export::SinkStanding, $crate::StoreError> {
                $number(&self.pool).await?;
                let cursor = $crate::export::ExportStore::export_cursor(self, sink).await?;
                // Index lookups only: this runs every export round, however long the backlog.
                let (head, oldest): (Option<i64>, Option<i64>) = sqlx::query_as(&$sql(
                    "SELECT (SELECT MAX(seq) FROM usage_exports), \
                     (SELECT at FROM usage_exports WHERE seq > ? ORDER BY seq LIMIT 1)",
                ))
                .bind(cursor)
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)?;
                let head = head.unwrap_or(0);
                // Seqs are handed out without gaps (a failed numbering aside), so this is how
                // many records wait.
                let pending = if oldest.is_some() { (head - cursor).max(0) } else { 0 };
                let (unmapped, dead): (i64, i64) = sqlx::query_as(&$sql(
                    "SELECT COUNT(*) FILTER (WHERE reason = 'unmapped'), \
                     COUNT(*) FILTER (WHERE reason <> 'unmapped') \
                     FROM export_parked WHERE sink = ?",
                ))
                .bind(sink)
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)?;
                let count = |n: i64| u64::try_from(n).unwrap_or(0);
                Ok($crate::export::SinkStanding {
                    cursor,
                    head,
                    pending: count(pending),
                    oldest_pending: oldest.map(crate::rows::from_millis).transpose()?,
                    unmapped: count(unmapped),
                    dead: count(dead),
                })
            }

            async fn export_day_totals(
                &self,
                from: chrono::DateTime<chrono::Utc>,
                to: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<$crate::export::DayTotal>, $crate::StoreError> {
                let rows: Vec<(String, i64, i64, i64, i64, i64, i64)> = sqlx::query_as(&$sql(
                    "SELECT account_id, (at / 86400000) * 86400000 AS day, COUNT(*), \
                     CAST(SUM(cost_nanos) AS BIGINT), CAST(SUM(input_tokens) AS BIGINT), \
                     CAST(SUM(cached_input_tokens) AS BIGINT), \
                     CAST(SUM(output_tokens) AS BIGINT) FROM usage_exports WHERE at >= ? AND at < ? \
                     GROUP BY account_id, (at / 86400000) * 86400000 ORDER BY 2, 1",
                ))
                .bind(crate::rows::millis(from))
                .bind(crate::rows::millis(to))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                let count = |n: i64| u64::try_from(n).unwrap_or(0);
                rows.into_iter()
                    .map(|(account, day, requests, cost, input, cached, output)| {
                        Ok($crate::export::DayTotal {
                            account: crate::rows::parse_id("account id", &account)?,
                            day: crate::rows::from_millis(day)?,
                            requests: count(requests),
                            cost: tollgate_core::Nanos(cost),
                            input_tokens: count(input),
                            cached_input_tokens: count(cached),
                            output_tokens: count(output),
                        })
                    })
                    .collect()
            }

            async fn purge_exports(
                &self,
                cutoff: chrono::DateTime<chrono::Utc>,
                sinks: &[String],
            ) -> Result<u64, $crate::StoreError> {
                let mut passed = i64::MAX;
                for sink in sinks {
                    passed =
                        passed.min($crate::export::ExportStore::export_cursor(self, sink).await?);
                }
                let purged = sqlx::query(&$sql(
                    "DELETE FROM usage_exports WHERE at < ? AND seq <= ? \
                     AND NOT EXISTS (SELECT 1 FROM export_parked p WHERE p.seq = usage_exports.seq)",
                ))
                .bind(crate::rows::millis(cutoff))
                .bind(passed)
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected();
                Ok(purged)
            }
        }

    };
}

pub(crate) use export_store;
