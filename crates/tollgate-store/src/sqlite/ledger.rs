//! The SQLite ledger writer's connection: a batch is committed in one call to the thread that
//! owns it, with one-row statements prepared once and bound in a loop.
//!
//! Through sqlx, every statement of a batch was a round trip between the writer task and sqlx's
//! connection thread (two wake-ups each, about fourteen statements a batch), and the batch's
//! multi-row statements had to be built as text and bound on the task's side first. That
//! traffic was a sixth of the node's CPU under load (docs/performance.md). sqlx cannot run code
//! on its connection's thread, so the writer has a connection of its own, from rusqlite on the
//! same SQLite library, driven by `tokio-rusqlite`. Every other query stays on sqlx's pool.

use super::{LEDGER_STATEMENTS, MMAP_BYTES};
use crate::batch::{not_pending, Batch};
use crate::notify::{
    balance_watches, capped_keys_sql, key_spend_watches, watched_balances_sql, BalanceMoves,
    BalanceWatch, Crossing, DELETE_BALANCE_CROSSINGS, INSERT_CROSSING, INSERT_EVENT,
};
use crate::rows::{
    hold_cells, millis, slot_cells, slot_deltas, spend_deltas, usage_cells, Cell, HOLD_COLUMNS,
    UPSERT_SLOTS, UPSERT_SLOTS_CONFLICT, UPSERT_SPEND, UPSERT_SPEND_CONFLICT, USAGE_COLUMNS,
};
use crate::{BatchId, LedgerWrite, StoreError};
use rusqlite::types::{ToSqlOutput, Value};
use rusqlite::{params, params_from_iter, ErrorCode, Transaction, TransactionBehavior};
use std::path::Path;
use std::time::Duration;
use tollgate_core::notify::Event;

#[derive(Clone)]
pub(super) struct LedgerConnection(tokio_rusqlite::Connection);

impl std::fmt::Debug for LedgerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerConnection")
    }
}

impl LedgerConnection {
    /// Opens the writer's connection to a database whose migrations have run (WAL mode is the
    /// file's, set by the first connection).
    pub async fn open(path: &Path) -> Result<LedgerConnection, StoreError> {
        let connection = tokio_rusqlite::Connection::open(path)
            .await
            .map_err(connection_error)?;
        connection
            .call(|c| {
                // As the pool's connections: see `SqliteStore::open`.
                c.pragma_update(None, "synchronous", "NORMAL")?;
                c.pragma_update(None, "foreign_keys", true)?;
                c.pragma_update(None, "mmap_size", MMAP_BYTES)?;
                c.busy_timeout(Duration::from_secs(5))?;
                c.set_prepared_statement_cache_capacity(LEDGER_STATEMENTS);
                Ok(())
            })
            .await
            .map_err(connection_error)?;
        Ok(LedgerConnection(connection))
    }

    /// Commits a batch in one transaction, once: a batch id already stored was committed by an
    /// earlier attempt whose answer was lost, and is not applied again.
    pub async fn commit(&self, batch: BatchId, writes: Vec<LedgerWrite>) -> Result<(), StoreError> {
        self.0
            .call(move |c| Ok(commit(c, batch, &writes)))
            .await
            .map_err(connection_error)?
    }

    /// Closes the connection; what it committed is in the file.
    pub async fn close(&self) {
        let connection = self.0.clone();
        if let Err(e) = connection.close().await {
            tracing::warn!(error = %e, "closing the ledger writer's connection");
        }
    }
}

fn commit(
    c: &mut rusqlite::Connection,
    batch: BatchId,
    writes: &[LedgerWrite],
) -> Result<(), StoreError> {
    let planned = Batch::plan(writes);
    let watched = BalanceMoves::new(&planned);
    // IMMEDIATE: the write lock is taken at the start, so a pool connection's write cannot
    // make this transaction fail half-way when it upgrades.
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(store_error)?;
    let first_time = tx
        .prepare_cached(
            "INSERT INTO ledger_batches (id, committed_at) VALUES (?1, ?2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                batch.to_string(),
                chrono::Utc::now().timestamp_millis()
            ])
        })
        .map_err(store_error)?
        == 1;
    if !first_time {
        // Dropped: rolled back.
        return Ok(());
    }
    {
        let sql = format!(
            "INSERT INTO holds ({HOLD_COLUMNS}) VALUES ({})",
            crate::notify::placeholders(column_count(HOLD_COLUMNS))
        );
        let mut insert = tx.prepare_cached(&sql).map_err(store_error)?;
        for hold in &planned.holds {
            insert
                .execute(params_from_iter(hold_cells(hold)))
                .map_err(store_error)?;
        }
        let mut resolve = tx
            .prepare_cached(
                "UPDATE holds SET status = ?1, charged_nanos = ?2, resolved_at = ?3 \
                 WHERE id = ?4 AND status = 'pending'",
            )
            .map_err(store_error)?;
        let mut changed = 0;
        for hold in &planned.resolutions {
            changed += resolve
                .execute(params![
                    hold.status.as_str(),
                    hold.charged.0,
                    hold.resolved_at.map(millis),
                    hold.id.to_string()
                ])
                .map_err(store_error)? as u64;
        }
        if changed != planned.resolutions.len() as u64 {
            return Err(not_pending(&planned.resolutions, changed));
        }
        let mut transfer = tx
            .prepare_cached(
                "INSERT INTO ledger_transfers (debit_account, credit_account, amount_nanos, \
                 kind, account_id, memo, reference, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(store_error)?;
        for (moved, account, memo, reference, at) in &planned.transfers {
            transfer
                .execute(params![
                    moved.debit.to_string(),
                    moved.credit.to_string(),
                    moved.amount.0,
                    moved.kind.as_str(),
                    account.to_string(),
                    memo,
                    reference,
                    millis(*at)
                ])
                .map_err(store_error)?;
        }
        let spend = spend_deltas(
            planned
                .transfers
                .iter()
                .map(|(t, account, _, _, at)| (*t, *account, *at)),
        );
        let mut upsert = tx
            .prepare_cached(&format!(
                "{UPSERT_SPEND} VALUES (?1, ?2, ?3){UPSERT_SPEND_CONFLICT}"
            ))
            .map_err(store_error)?;
        for (account, month, charged) in &spend {
            upsert
                .execute(params![account, month, charged])
                .map_err(store_error)?;
        }
    }
    insert_usage(&tx, &planned.usage)?;
    {
        let mut wallet = tx
            .prepare_cached(
                "UPDATE wallets SET balance_nanos = balance_nanos + ?1, \
                 held_nanos = held_nanos + ?2, debt_nanos = debt_nanos + ?3 \
                 WHERE account_id = ?4",
            )
            .map_err(store_error)?;
        for (account, (available, held, debt)) in &planned.deltas {
            if (*available, *held, *debt) != (0, 0, 0) {
                wallet
                    .execute(params![available, held, debt, account.to_string()])
                    .map_err(store_error)?;
            }
        }
        let mut key_spend = tx
            .prepare_cached(
                "INSERT INTO key_spend (key_id, month, spent_nanos) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key_id) DO UPDATE SET spent_nanos = CASE \
                 WHEN excluded.month > key_spend.month THEN excluded.spent_nanos \
                 ELSE key_spend.spent_nanos + excluded.spent_nanos END, \
                 month = MAX(key_spend.month, excluded.month)",
            )
            .map_err(store_error)?;
        for (key, delta) in planned.key_spend.iter().filter(|(_, d)| d.spent > 0) {
            key_spend
                .execute(params![key.to_string(), delta.month, delta.spent])
                .map_err(store_error)?;
        }
    }
    for event in &planned.events {
        insert_event(&tx, event)?;
    }
    watch_balances(&tx, &watched)?;
    watch_key_spend(&tx, &watched)?;
    tx.commit().map_err(store_error)
}

/// The usage rows, their quarter-hour totals, and the export log's rows for those that charged
/// (once a sink has started).
fn insert_usage(tx: &Transaction<'_>, rows: &[&crate::UsageRow]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO requests ({USAGE_COLUMNS}) VALUES ({})",
        crate::notify::placeholders(column_count(USAGE_COLUMNS))
    );
    let mut insert = tx.prepare_cached(&sql).map_err(store_error)?;
    for row in rows {
        insert
            .execute(params_from_iter(usage_cells(row)))
            .map_err(store_error)?;
    }
    let sql = format!(
        "{UPSERT_SLOTS} VALUES ({}){UPSERT_SLOTS_CONFLICT}",
        crate::notify::placeholders(11)
    );
    let mut slot = tx.prepare_cached(&sql).map_err(store_error)?;
    for delta in slot_deltas(rows) {
        slot.execute(params_from_iter(slot_cells(&delta)))
            .map_err(store_error)?;
    }
    let mut exported = crate::export::exported(rows).peekable();
    if exported.peek().is_none() || !exporting(tx)? {
        return Ok(());
    }
    // One writer commits at a time, so AUTOINCREMENT numbers the export log in commit order.
    let sql = format!(
        "INSERT INTO usage_exports ({}) VALUES ({})",
        crate::export::EXPORT_COLUMNS,
        crate::notify::placeholders(column_count(crate::export::EXPORT_COLUMNS))
    );
    let mut export = tx.prepare_cached(&sql).map_err(store_error)?;
    for row in exported {
        export
            .execute(params_from_iter(crate::export::export_cells(row)))
            .map_err(store_error)?;
    }
    Ok(())
}

/// Whether a sink has ever started ([`crate::ExportStore::start_export`]). Until one has, the
/// export log has no reader, and a sink that starts later begins at the newest record anyway.
fn exporting(tx: &Transaction<'_>) -> Result<bool, StoreError> {
    tx.prepare_cached(crate::export::EXPORTING)
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(store_error)
}

fn insert_event(tx: &Transaction<'_>, event: &Event) -> Result<(), StoreError> {
    tx.prepare_cached(INSERT_EVENT)
        .and_then(|mut s| {
            s.execute(params![
                event.id.to_string(),
                event.account.to_string(),
                event.kind.as_str(),
                &event.body,
                millis(event.created_at)
            ])
        })
        .map_err(store_error)?;
    Ok(())
}

/// Inserts the crossing and, if this inserted it, the event.
fn cross_in(tx: &Transaction<'_>, crossing: &Crossing, event: &Event) -> Result<(), StoreError> {
    let inserted = tx
        .prepare_cached(INSERT_CROSSING)
        .and_then(|mut s| {
            s.execute(params![
                crossing.subject,
                crossing.kind.as_str(),
                crossing.period,
                crossing.currency,
                millis(event.created_at)
            ])
        })
        .map_err(store_error)?;
    if inserted == 1 {
        insert_event(tx, event)?;
    }
    Ok(())
}

/// After the batch's wallet updates: what [`balance_watches`] finds, written.
fn watch_balances(tx: &Transaction<'_>, moves: &BalanceMoves) -> Result<(), StoreError> {
    if moves.moves.is_empty() {
        return Ok(());
    }
    let mut read = tx
        .prepare_cached(&watched_balances_sql(moves.moves.len()))
        .map_err(store_error)?;
    let rows = read
        .query_map(
            params_from_iter(moves.moves.keys().map(|a| a.to_string())),
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(store_error)?;
    for watch in balance_watches(moves, rows)? {
        match watch {
            BalanceWatch::Cross(crossing, event) => cross_in(tx, &crossing, &event)?,
            BalanceWatch::Recover { account, event } => {
                let deleted = tx
                    .prepare_cached(DELETE_BALANCE_CROSSINGS)
                    .and_then(|mut s| s.execute(params![account]))
                    .map_err(store_error)?;
                if deleted > 0 {
                    insert_event(tx, &event)?;
                }
            }
        }
    }
    Ok(())
}

/// After the batch's key spend: what [`key_spend_watches`] finds, written.
fn watch_key_spend(tx: &Transaction<'_>, moves: &BalanceMoves) -> Result<(), StoreError> {
    if moves.keys.is_empty() {
        return Ok(());
    }
    let mut read = tx
        .prepare_cached(&capped_keys_sql(moves.keys.len()))
        .map_err(store_error)?;
    let rows = read
        .query_map(
            params_from_iter(moves.keys.keys().map(|k| k.to_string())),
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            },
        )
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(store_error)?;
    for (crossing, event) in key_spend_watches(moves, rows)? {
        cross_in(tx, &crossing, &event)?;
    }
    Ok(())
}

fn column_count(columns: &str) -> usize {
    columns.split(',').count()
}

impl rusqlite::ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Cell::Text(text) | Cell::MaybeText(Some(text)) => ToSqlOutput::from(text.as_str()),
            Cell::Int(n) | Cell::MaybeInt(Some(n)) => ToSqlOutput::from(*n),
            Cell::MaybeText(None) | Cell::MaybeInt(None) => ToSqlOutput::Owned(Value::Null),
        })
    }
}

/// As the pool's errors (see `store_error` in the parent): a write SQLite refuses as it is (a
/// constraint, a value too big or of the wrong type) is corrupt data, which a retry would not
/// fix; everything else is an outage.
fn store_error(e: rusqlite::Error) -> StoreError {
    let refused = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch)
    );
    if refused {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

fn connection_error(e: tokio_rusqlite::Error) -> StoreError {
    match e {
        tokio_rusqlite::Error::Rusqlite(e) => store_error(e),
        other => StoreError::Unavailable(format!("the ledger writer's connection: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use crate::sqlite::SqliteStore;
    use crate::{BatchId, LedgerStore, LedgerWrite, StoreError};
    use tollgate_core::ledger::{LedgerAccount, Transfer, TransferKind};
    use tollgate_core::{AccountId, Nanos};

    /// A batch sent after the store closed is an outage the writer retries, not a panic or a
    /// hang, and not corrupt data it would drop.
    #[tokio::test]
    async fn a_batch_after_close_is_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        store.close().await;
        let account = AccountId::new();
        let grant = LedgerWrite::Transfer {
            account,
            transfer: Transfer {
                debit: LedgerAccount::External,
                credit: LedgerAccount::Wallet(account),
                amount: Nanos(5),
                kind: TransferKind::Grant,
            },
            memo: String::new(),
            reference: String::new(),
            at: chrono::Utc::now(),
        };
        let outcome = store.commit(BatchId::new(), &[grant]).await;
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
    }
}
