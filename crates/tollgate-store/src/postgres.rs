//! PostgreSQL, for several nodes sharing one database. Migrations are applied at open (under
//! sqlx's advisory lock, so nodes starting together apply them once).
//!
//! SQLite serialises every writer, so there one conditional statement settles a race. Here
//! concurrent transactions interleave, so every check-then-write locks what it checks first
//! (`SELECT ... FOR UPDATE`): the account row before counting its keys, the key row before a
//! roll, the audit head before an append. Wallets are updated in account order, so two batches
//! never deadlock on each other's rows.

use crate::batch::{not_pending, Batch, KeySpendDelta};
use crate::rows::{self, SubscriptionRow, UnitBucketRow, UNIT_BUCKET_COLUMNS};
use crate::rows::{
    convert, corrupt, from_millis, hold_cells, millis, parse_id, push_cells, push_usage_filter,
    slot_cells, slot_deltas, spend_deltas, split_column, to_json, usage_cells, AccountRow,
    ActivityRow, AuditHeadRow, AuditRow, BucketRow, HoldRow, IdempotencyRow, KeyRow, SlotRow,
    StandingRow, TransferRow, UsageDbRow, ACCOUNT_SELECT, HOLD_COLUMNS, KEY_COLUMNS, UPSERT_SLOTS,
    UPSERT_SLOTS_CONFLICT, UPSERT_SPEND, UPSERT_SPEND_CONFLICT, USAGE_COLUMNS,
};
use crate::rows::{
    statuses_before, AutoTopUpRow, PaymentEventRow, TopUpRow, AUTO_TOPUP_COLUMNS, TOPUP_COLUMNS,
};
use crate::units::{self, DrawsOf, UnitBucket, UnitStore, UnitsAnswer, UnitsAsk};
use crate::{
    Account, AccountStore, AuditStore, BalanceSheet, BatchId, Carve, ChangeFeed, HoldRecord,
    IdempotencyBegin, IdempotencyClaim, IdempotencyStore, InsertKeyOutcome, KeyActivity, KeyChange,
    KeyLookup, KeyRecord, KeyStore, LeaseStore, LedgerStore, LedgerWrite, RevokeOutcome,
    SeriesSlot, SeriesSplit, SessionRecord, SessionStore, Sharing, StoreChange, StoreError,
    StoreHealth, StoredResponse, TransferRecord, UsageBucket, UsageFilter, UsageGroup, UsageRow,
    UsageStore,
};
use crate::{AutoTopUp, PaymentEvent, PaymentStore, TopUp};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tollgate_core::audit::AuditEntry;
use tollgate_core::ledger::{lease_size, month_of};
use tollgate_core::ledger::{month_start, LedgerAccount, Transfer, TransferKind, Wallet};
use tollgate_core::payment::TopUpStatus;
use tollgate_core::plan::Subscription;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::TopUpId;
use tollgate_core::{AccountId, HoldId, KeyHash, KeyId, Nanos, NodeId, RequestId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Rows per multi-row INSERT: well inside PostgreSQL's limit of 65535 bound parameters.
const ROWS_PER_INSERT: usize = 500;

crate::notify::notify_store!(
    PostgresStore,
    Postgres,
    crate::notify::numbered,
    "FOR UPDATE SKIP LOCKED"
);
crate::export::export_store!(PostgresStore, crate::notify::numbered, number_exports);

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The health probe's own connection, outside the pool: a pool busy with work is a loaded
    /// store, not a down one, and a probe queued behind that work would call it down.
    probe: Arc<tokio::sync::Mutex<Option<PgConnection>>>,
    options: PgConnectOptions,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`; `?options=-c search_path=...` picks a
    /// schema) and applies pending migrations.
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL URL: {e}")))?
            // A transaction left open (a node stalled or killed mid-write) must not hold its row
            // locks for long: the server ends such a session after this.
            .options([("idle_in_transaction_session_timeout", "10s")]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(store_error)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")))?;
        Ok(PostgresStore {
            pool,
            probe: Arc::default(),
            options,
        })
    }

    /// Applies pending migrations and reports how many the database now has.
    pub async fn migrate(url: &str) -> Result<usize, StoreError> {
        let store = PostgresStore::open(url).await?;
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&store.pool)
            .await
            .map_err(store_error)?;
        Ok(applied as usize)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin(&self) -> Result<Transaction<'_, Postgres>, StoreError> {
        self.pool.begin().await.map_err(store_error)
    }

    /// Commits a ledger batch; with `lease`, every balance change is made to that node's lease
    /// on the wallet too.
    async fn commit_batch(
        &self,
        batch: BatchId,
        lease: Option<NodeId>,
        writes: &[LedgerWrite],
    ) -> Result<(), StoreError> {
        let planned = Batch::plan(writes);
        let watched = crate::notify::BalanceMoves::new(&planned);
        let Batch {
            holds,
            resolutions,
            transfers,
            usage,
            events,
            deltas,
            lease_deltas,
            key_spend,
        } = planned;
        let mut tx = self.begin().await?;
        let first_time = sqlx::query(
            "INSERT INTO ledger_batches (id, committed_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(batch.to_string())
        .bind(chrono::Utc::now().timestamp_millis())
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected()
            == 1;
        if !first_time {
            // Committed by an earlier attempt whose answer was lost.
            tx.rollback().await.map_err(store_error)?;
            return Ok(());
        }
        for chunk in holds.chunks(ROWS_PER_INSERT) {
            let mut query =
                sqlx::QueryBuilder::<Postgres>::new(format!("INSERT INTO holds ({HOLD_COLUMNS}) "));
            query.push_values(chunk, |out, hold| push_cells(out, hold_cells(hold)));
            query.build().execute(&mut *tx).await.map_err(store_error)?;
        }
        // Resolutions of holds opened in earlier batches: one statement per chunk, not per hold.
        for chunk in resolutions.chunks(ROWS_PER_INSERT) {
            let mut query = sqlx::QueryBuilder::<Postgres>::new(
                "UPDATE holds SET status = resolved.status, charged_nanos = resolved.charged_nanos, \
                 resolved_at = resolved.resolved_at FROM (",
            );
            query.push_values(chunk, |mut row, hold| {
                row.push_bind(hold.id.to_string())
                    .push_bind(hold.status.as_str())
                    .push_bind(hold.charged.0)
                    .push_bind(hold.resolved_at.map(millis));
            });
            query.push(
                ") AS resolved (id, status, charged_nanos, resolved_at) \
                 WHERE holds.id = resolved.id AND holds.status = 'pending'",
            );
            let changed = query
                .build()
                .execute(&mut *tx)
                .await
                .map_err(store_error)?
                .rows_affected();
            if changed != chunk.len() as u64 {
                tx.rollback().await.map_err(store_error)?;
                return Err(not_pending(chunk, changed));
            }
        }
        insert_transfers(&mut tx, &transfers).await?;
        for chunk in usage.chunks(ROWS_PER_INSERT / 2) {
            let mut query = sqlx::QueryBuilder::<Postgres>::new(format!(
                "INSERT INTO requests ({USAGE_COLUMNS}) "
            ));
            query.push_values(chunk, |out, row| push_cells(out, usage_cells(row)));
            query.build().execute(&mut *tx).await.map_err(store_error)?;
        }
        let slots = slot_deltas(&usage);
        for chunk in slots.chunks(ROWS_PER_INSERT / 2) {
            let mut query = sqlx::QueryBuilder::<Postgres>::new(UPSERT_SLOTS);
            query.push_values(chunk, |out, slot| push_cells(out, slot_cells(slot)));
            query.push(UPSERT_SLOTS_CONFLICT);
            query.build().execute(&mut *tx).await.map_err(store_error)?;
        }
        // Credit taken from outside a hold (a refund, a dispute) comes from the free balance:
        // never from what a node leases. The wallet rows are locked by the updates above, so no
        // carve runs between this check and the commit.
        let taken_free: Vec<AccountId> = deltas
            .iter()
            .filter(|(account, (available, ..))| {
                available - lease_deltas.get(account).copied().unwrap_or(0) < 0
            })
            .map(|(account, _)| *account)
            .collect();
        for (account, (available, held, debt)) in deltas {
            if available == 0 && held == 0 && debt == 0 {
                continue;
            }
            sqlx::query(
                "UPDATE wallets SET balance_nanos = balance_nanos + $1, \
                 held_nanos = held_nanos + $2, debt_nanos = debt_nanos + $3 WHERE account_id = $4",
            )
            .bind(available)
            .bind(held)
            .bind(debt)
            .bind(account.to_string())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        }
        if let Some(node) = lease {
            for (account, delta) in lease_deltas {
                if let Err(e) = move_lease(&mut tx, account, node, delta).await {
                    let _ = tx.rollback().await;
                    return Err(e);
                }
            }
        }
        for account in taken_free {
            let short: Option<i32> = sqlx::query_scalar(
                "SELECT 1 FROM wallets w WHERE w.account_id = $1 AND w.balance_nanos < \
                 (SELECT COALESCE(SUM(amount_nanos), 0) FROM wallet_leases l \
                  WHERE l.account_id = $1)",
            )
            .bind(account.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
            if short.is_some() {
                let _ = tx.rollback().await;
                return Err(StoreError::Corrupt(format!(
                    "the batch takes credit from account {account} that nodes lease"
                )));
            }
        }
        if let Err(e) = add_key_spend(&mut tx, &key_spend).await {
            let _ = tx.rollback().await;
            return Err(e);
        }
        for event in events {
            insert_event(&mut tx, event).await?;
        }
        watch_balances(&mut tx, &watched).await?;
        watch_key_spend(&mut tx, &watched).await?;
        record_exports(&mut tx, &usage).await?;
        tx.commit().await.map_err(store_error)
    }
}

/// After a batch's wallet updates, in its transaction: what [`balance_watches`] finds,
/// written. The wallet rows are locked by the batch's updates, so what is read here is
/// what the batch left, on any node.
async fn watch_balances(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    moves: &crate::notify::BalanceMoves,
) -> Result<(), crate::StoreError> {
    use crate::notify::*;
    if moves.moves.is_empty() {
        return Ok(());
    }
    let text = watched_balances_sql(moves.moves.len());
    let sql = crate::notify::numbered(&text);
    let mut query = sqlx::query_as(&sql);
    for account in moves.moves.keys() {
        query = query.bind(account.to_string());
    }
    let rows: Vec<WatchedBalanceRow> = query.fetch_all(&mut **tx).await.map_err(store_error)?;
    for watch in balance_watches(moves, rows)? {
        match watch {
            BalanceWatch::Cross(crossing, event) => {
                cross_in(tx, &crossing, &event).await?;
            }
            BalanceWatch::Recover { account, event } => {
                let deleted = sqlx::query(&crate::notify::numbered(DELETE_BALANCE_CROSSINGS))
                    .bind(&account)
                    .execute(&mut **tx)
                    .await
                    .map_err(store_error)?
                    .rows_affected();
                if deleted > 0 {
                    insert_event(tx, &event).await?;
                }
            }
        }
    }
    Ok(())
}

/// After a batch's key spend is stored, in its transaction: what
/// [`key_spend_watches`] finds, written.
async fn watch_key_spend(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    moves: &crate::notify::BalanceMoves,
) -> Result<(), crate::StoreError> {
    use crate::notify::*;
    if moves.keys.is_empty() {
        return Ok(());
    }
    let text = capped_keys_sql(moves.keys.len());
    let sql = crate::notify::numbered(&text);
    let mut query = sqlx::query_as(&sql);
    for key in moves.keys.keys() {
        query = query.bind(key.to_string());
    }
    let rows: Vec<CappedKeyRow> = query.fetch_all(&mut **tx).await.map_err(store_error)?;
    for (crossing, event) in key_spend_watches(moves, rows)? {
        cross_in(tx, &crossing, &event).await?;
    }
    Ok(())
}

/// Writes the batch's charged usage to the export log (once a sink has started), unnumbered: the
/// exporter numbers rows once they are committed ([`number_exports`]), so this takes no lock.
async fn record_exports(
    tx: &mut Transaction<'_, Postgres>,
    usage: &[&UsageRow],
) -> Result<(), StoreError> {
    let rows: Vec<&UsageRow> = crate::export::exported(usage).collect();
    for chunk in rows.chunks(ROWS_PER_INSERT / 2) {
        // Kept only once a sink has started: the check rides in the insert, no round trip.
        let mut query = sqlx::QueryBuilder::<Postgres>::new(format!(
            "INSERT INTO usage_exports ({}) SELECT * FROM (",
            crate::export::EXPORT_COLUMNS
        ));
        query.push_values(chunk, |out, row| {
            push_cells(out, crate::export::export_cells(row))
        });
        query.push(format!(") AS v WHERE ({})", crate::export::EXPORTING));
        query
            .build()
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
    }
    Ok(())
}

/// Rows numbered per call, oldest first.
const NUMBER_AT_ONCE: i64 = 10_000;

/// Numbers committed export rows, under a lock held until this commits: a numbering starts
/// only after the previous one is visible, so a reader that has seen a number has seen every
/// lower one, and a row that commits later gets a higher number.
pub(crate) async fn number_exports(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(store_error)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tollgate.usage_exports'))")
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
    sqlx::query(
        "UPDATE usage_exports SET seq = nextval('usage_export_seq') WHERE request_id IN \
         (SELECT request_id FROM usage_exports WHERE seq IS NULL ORDER BY at, request_id \
          LIMIT $1)",
    )
    .bind(NUMBER_AT_ONCE)
    .execute(&mut *tx)
    .await
    .map_err(store_error)?;
    tx.commit().await.map_err(store_error)
}

/// A statement the database refuses by a constraint or a trigger (SQLSTATE class 23, or a
/// trigger's `RAISE`) would be refused again: that is corrupt data, which the caller must not
/// retry, not an outage. Everything else (connections, serialisation failures) is an outage.
fn store_error(e: sqlx::Error) -> StoreError {
    let refused = e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("23") || code == "P0001");
    if refused {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

async fn insert_key(tx: &mut Transaction<'_, Postgres>, key: &KeyRecord) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO api_keys ({KEY_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    ))
    .bind(key.id.to_string())
    .bind(key.account_id.to_string())
    .bind(key.hash.0.as_slice())
    .bind(&key.display_prefix)
    .bind(key.kind.as_str())
    .bind(key.status.as_str())
    .bind(&key.name)
    .bind(to_json(&key.scopes)?)
    .bind(to_json(&key.allowed_ips)?)
    .bind(key.expires_at.map(millis))
    .bind(key.monthly_spend_cap.map(|n| n.0))
    .bind(millis(key.created_at))
    .bind(key.revoked_at.map(millis))
    .bind(to_json(&key.rate_limits)?)
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    Ok(())
}

async fn insert_transfers(
    tx: &mut Transaction<'_, Postgres>,
    transfers: &[(&Transfer, AccountId, &str, String, DateTime<Utc>)],
) -> Result<(), StoreError> {
    for chunk in transfers.chunks(ROWS_PER_INSERT) {
        let mut query = sqlx::QueryBuilder::<Postgres>::new(
            "INSERT INTO ledger_transfers (debit_account, credit_account, amount_nanos, kind, \
             account_id, memo, reference, created_at) ",
        );
        query.push_values(
            chunk,
            |mut row, (transfer, account, memo, reference, at)| {
                row.push_bind(transfer.debit.to_string())
                    .push_bind(transfer.credit.to_string())
                    .push_bind(transfer.amount.0)
                    .push_bind(transfer.kind.as_str())
                    .push_bind(account.to_string())
                    .push_bind(memo.to_string())
                    .push_bind(reference.clone())
                    .push_bind(millis(*at));
            },
        );
        query
            .build()
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
    }
    // The charges among them, added to the accounts' monthly totals.
    let deltas = spend_deltas(
        transfers
            .iter()
            .map(|(t, account, _, _, at)| (*t, *account, *at)),
    );
    for chunk in deltas.chunks(ROWS_PER_INSERT) {
        let mut query = sqlx::QueryBuilder::<Postgres>::new(UPSERT_SPEND);
        query.push_values(chunk, |mut row, (account, month, charged)| {
            row.push_bind(account.clone())
                .push_bind(*month)
                .push_bind(*charged);
        });
        query.push(UPSERT_SPEND_CONFLICT);
        query
            .build()
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
    }
    Ok(())
}

#[async_trait]
impl AccountStore for PostgresStore {
    async fn create_account(
        &self,
        id: AccountId,
        name: &str,
        starter_credits: Nanos,
        master_key: KeyRecord,
        at: DateTime<Utc>,
    ) -> Result<Account, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO accounts (id, name, status, created_at) VALUES ($1, $2, 'active', $3)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(millis(at))
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        sqlx::query("INSERT INTO wallets (account_id, balance_nanos) VALUES ($1, $2)")
            .bind(id.to_string())
            .bind(starter_credits.0)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        if starter_credits > Nanos::ZERO {
            let grant = Transfer {
                debit: LedgerAccount::External,
                credit: LedgerAccount::Wallet(id),
                amount: starter_credits,
                kind: TransferKind::Grant,
            };
            insert_transfers(
                &mut tx,
                &[(&grant, id, "starter credits", String::new(), at)],
            )
            .await?;
        }
        insert_key(&mut tx, &master_key).await?;
        tx.commit().await.map_err(store_error)?;
        Ok(Account {
            id,
            name: name.to_string(),
            status: "active".to_string(),
            balance: starter_credits,
            max_keys: None,
            rate_limits: Overrides::new(),
            created_at: at,
        })
    }

    async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query_as::<_, AccountRow>(&format!("{ACCOUNT_SELECT} WHERE a.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        row.map(Account::try_from).transpose()
    }

    async fn accounts(
        &self,
        after: Option<AccountId>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query_as::<_, AccountRow>(&format!(
            "{ACCOUNT_SELECT} WHERE ($1::TEXT IS NULL OR a.id > $1) \
             AND ($2::TEXT IS NULL OR a.status = $2) ORDER BY a.id LIMIT $3"
        ))
        .bind(after.map(|id| id.to_string()))
        .bind(status)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn search_accounts(
        &self,
        text: &str,
        after: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query_as::<_, AccountRow>(&format!(
            "{ACCOUNT_SELECT} WHERE (a.id = $1 OR strpos(lower(a.name), lower($1)) > 0) \
             AND ($2::TEXT IS NULL OR a.id > $2) ORDER BY a.id LIMIT $3"
        ))
        .bind(text)
        .bind(after.map(|id| id.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn update_account(&self, account: &Account) -> Result<Option<Account>, StoreError> {
        sqlx::query(
            "UPDATE accounts SET name = $1, status = $2, max_keys = $3, rate_limits = $4 \
             WHERE id = $5",
        )
        .bind(&account.name)
        .bind(&account.status)
        .bind(account.max_keys.map(i64::from))
        .bind(to_json(&account.rate_limits)?)
        .bind(account.id.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        self.account(account.id).await
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        default_limit: u32,
    ) -> Result<InsertKeyOutcome, StoreError> {
        let mut tx = self.begin().await?;
        // The account row's lock makes count-then-insert one step for this account.
        let max_keys: Option<Option<i64>> =
            sqlx::query_scalar("SELECT max_keys FROM accounts WHERE id = $1 FOR UPDATE")
                .bind(key.account_id.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(store_error)?;
        let limit = max_keys
            .flatten()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(default_limit);
        let unrevoked: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE account_id = $1 AND status <> 'revoked'",
        )
        .bind(key.account_id.to_string())
        .fetch_one(&mut *tx)
        .await
        .map_err(store_error)?;
        if unrevoked >= i64::from(limit) {
            // Ended now, not when the connection is next used: until then it holds the lock.
            tx.rollback().await.map_err(store_error)?;
            return Ok(InsertKeyOutcome::LimitReached { limit });
        }
        insert_key(&mut tx, key).await?;
        tx.commit().await.map_err(store_error)?;
        Ok(InsertKeyOutcome::Inserted)
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError> {
        let current = sqlx::query_as::<_, KeyRow>(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
        ))
        .bind(hash.0.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        if let Some(row) = current {
            return Ok(Some(self.lookup(row.try_into()?, None).await?));
        }
        let retired =
            sqlx::query("SELECT key_id, expires_at FROM retired_key_secrets WHERE key_hash = $1")
                .bind(hash.0.as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        let Some(retired) = retired else {
            return Ok(None);
        };
        let key_id: String = retired.try_get("key_id").map_err(store_error)?;
        let key_id = parse_id("key id", &key_id)?;
        let expires_at = from_millis(retired.try_get("expires_at").map_err(store_error)?)?;
        let Some(key) = self.key_by_id(key_id).await? else {
            return Ok(None);
        };
        Ok(Some(self.lookup(key, Some(expires_at)).await?))
    }

    async fn key_by_id(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query_as::<_, KeyRow>(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(KeyRecord::try_from).transpose()
    }

    async fn keys(
        &self,
        account: Option<AccountId>,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query_as::<_, KeyRow>(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE ($1::TEXT IS NULL OR account_id = $1) \
             AND ($2::TEXT IS NULL OR id > $2) ORDER BY id LIMIT $3"
        ))
        .bind(account.map(|a| a.to_string()))
        .bind(after.map(|k| k.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn revoke_key(&self, id: KeyId, at: DateTime<Utc>) -> Result<RevokeOutcome, StoreError> {
        // One conditional UPDATE decides the race: the row lock lets only the first change it.
        let changed = sqlx::query(
            "UPDATE api_keys SET status = 'revoked', revoked_at = $1 \
             WHERE id = $2 AND status <> 'revoked'",
        )
        .bind(millis(at))
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        Ok(match self.key_by_id(id).await? {
            None => RevokeOutcome::NotFound,
            Some(key) if changed == 1 => RevokeOutcome::Revoked(key),
            Some(key) => RevokeOutcome::AlreadyRevoked(key),
        })
    }

    async fn update_key(&self, key: &KeyRecord) -> Result<KeyChange, StoreError> {
        let changed = sqlx::query(
            "UPDATE api_keys SET name = $1, scopes = $2, allowed_ips = $3, expires_at = $4, \
             status = $5, monthly_spend_cap_nanos = $6, rate_limits = $7 \
             WHERE id = $8 AND status <> 'revoked'",
        )
        .bind(&key.name)
        .bind(to_json(&key.scopes)?)
        .bind(to_json(&key.allowed_ips)?)
        .bind(key.expires_at.map(millis))
        .bind(key.status.as_str())
        .bind(key.monthly_spend_cap.map(|n| n.0))
        .bind(to_json(&key.rate_limits)?)
        .bind(key.id.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        self.key_change(key.id, changed == 1).await
    }

    async fn roll_key(
        &self,
        id: KeyId,
        new_hash: KeyHash,
        display_prefix: &str,
        old_secret_expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<KeyChange, StoreError> {
        let mut tx = self.begin().await?;
        // Locked, so a concurrent roll waits and then retires the secret this one sets.
        let current: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT key_hash FROM api_keys WHERE id = $1 AND status <> 'revoked' FOR UPDATE",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(store_error)?;
        if let Some(old_hash) = &current {
            sqlx::query(
                "INSERT INTO retired_key_secrets (key_hash, key_id, expires_at, retired_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(old_hash.as_slice())
            .bind(id.to_string())
            .bind(millis(old_secret_expires_at))
            .bind(millis(at))
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
            sqlx::query("UPDATE api_keys SET key_hash = $1, display_prefix = $2 WHERE id = $3")
                .bind(new_hash.0.as_slice())
                .bind(display_prefix)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)?;
        self.key_change(id, current.is_some()).await
    }
}

impl PostgresStore {
    /// A key lookup: the key with what its account decides about its requests.
    async fn lookup(
        &self,
        key: KeyRecord,
        secret_expires_at: Option<DateTime<Utc>>,
    ) -> Result<KeyLookup, StoreError> {
        sqlx::query_as::<_, StandingRow>(
            "SELECT a.status, a.rate_limits, w.debt_nanos, s.plan, s.status AS plan_status, \
             s.since AS plan_since, s.started_at AS plan_started_at FROM accounts a \
             JOIN wallets w ON w.account_id = a.id \
             LEFT JOIN subscriptions s ON s.account_id = a.id WHERE a.id = $1",
        )
        .bind(key.account_id.to_string())
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?
        .lookup(key, secret_expires_at)
    }

    async fn key_change(&self, id: KeyId, changed: bool) -> Result<KeyChange, StoreError> {
        Ok(match self.key_by_id(id).await? {
            None => KeyChange::NotFound,
            Some(key) if changed => KeyChange::Changed(key),
            Some(key) => KeyChange::Revoked(key),
        })
    }
}

#[async_trait]
impl LedgerStore for PostgresStore {
    async fn ledger_balance(&self, account: AccountId) -> Result<Nanos, StoreError> {
        let wallet = LedgerAccount::Wallet(account).to_string();
        let sum: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(CASE WHEN credit_account = $1 THEN amount_nanos ELSE 0 END) \
                           - SUM(CASE WHEN debit_account = $1 THEN amount_nanos ELSE 0 END), 0)::BIGINT \
             FROM ledger_transfers WHERE account_id = $2",
        )
        .bind(&wallet)
        .bind(account.to_string())
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(Nanos(sum))
    }

    async fn wallet(&self, account: AccountId) -> Result<Option<Wallet>, StoreError> {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT balance_nanos, held_nanos, debt_nanos FROM wallets WHERE account_id = $1",
        )
        .bind(account.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(row.map(|(available, held, debt)| Wallet {
            available: Nanos(available),
            held: Nanos(held),
            debt: Nanos(debt),
        }))
    }

    async fn key_spent_since(&self, key: KeyId, since: DateTime<Utc>) -> Result<Nanos, StoreError> {
        let sum: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(charged_nanos), 0)::BIGINT FROM holds \
             WHERE key_id = $1 AND resolved_at >= $2",
        )
        .bind(key.to_string())
        .bind(millis(since))
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(Nanos(sum))
    }

    async fn balance_sheet(
        &self,
        account: AccountId,
        at: DateTime<Utc>,
    ) -> Result<Option<BalanceSheet>, StoreError> {
        let row: Option<rows::BalanceSheetRow> = sqlx::query_as(
            "SELECT w.balance_nanos, w.held_nanos, w.debt_nanos, \
             COALESCE((SELECT SUM(s.charged_nanos) FROM account_spend s \
             WHERE s.account_id = w.account_id AND s.month_start = $1), 0)::BIGINT \
             FROM wallets w WHERE w.account_id = $2",
        )
        .bind(millis(month_start(at)))
        .bind(account.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(row.map(rows::balance_sheet))
    }

    async fn pending_holds(&self) -> Result<Vec<HoldRecord>, StoreError> {
        let rows = sqlx::query_as::<_, HoldRow>(&format!(
            "SELECT {HOLD_COLUMNS} FROM holds WHERE status = 'pending' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn holds_expired_by(&self, cutoff: DateTime<Utc>) -> Result<Vec<HoldRecord>, StoreError> {
        let rows = sqlx::query_as::<_, HoldRow>(&format!(
            "SELECT {HOLD_COLUMNS} FROM holds WHERE status = 'pending' AND expires_at <= $1 \
             ORDER BY id"
        ))
        .bind(millis(cutoff))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn hold(&self, id: HoldId) -> Result<Option<HoldRecord>, StoreError> {
        let row = sqlx::query_as::<_, HoldRow>(&format!(
            "SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(HoldRecord::try_from).transpose()
    }

    async fn commit(&self, batch: BatchId, writes: &[LedgerWrite]) -> Result<(), StoreError> {
        self.commit_batch(batch, None, writes).await
    }

    async fn transfers(
        &self,
        account: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TransferRecord>, StoreError> {
        let rows = sqlx::query_as::<_, TransferRow>(
            "SELECT id, debit_account, credit_account, amount_nanos, kind, memo, reference, created_at \
             FROM ledger_transfers WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(account.to_string())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn filed(&self, account: AccountId, reference: &str) -> Result<bool, StoreError> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM ledger_transfers WHERE account_id = $1 AND reference = $2 LIMIT 1",
        )
        .bind(account.to_string())
        .bind(reference)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(found.is_some())
    }

    async fn filed_total(&self, account: AccountId, prefix: &str) -> Result<Nanos, StoreError> {
        let sum: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(amount_nanos), 0)::BIGINT FROM ledger_transfers \
             WHERE account_id = $1 AND substr(reference, 1, length($2)) = $2",
        )
        .bind(account.to_string())
        .bind(prefix)
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(Nanos(sum))
    }

    async fn trial_balance(&self) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query_as(
            "SELECT account, SUM(amount)::BIGINT FROM ( \
               SELECT credit_account AS account, amount_nanos AS amount FROM ledger_transfers \
               UNION ALL \
               SELECT debit_account, -amount_nanos FROM ledger_transfers) AS entries \
             GROUP BY account ORDER BY account",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn begin_idempotent(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<IdempotencyBegin, StoreError> {
        let now = millis(claim.now);
        let mut tx = self.begin().await?;
        // The upsert locks the row whether or not it replaces it (it replaces only an expired
        // row or one whose owner's lease ran out), so the read that follows sees what it decided.
        sqlx::query(
            "INSERT INTO idempotency_keys \
             (scope, key, fingerprint, owner, state, lease_until, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, 'in_flight', $5, $6, $7) \
             ON CONFLICT (scope, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
             owner = EXCLUDED.owner, state = 'in_flight', lease_until = EXCLUDED.lease_until, \
             expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at, \
             status = NULL, headers = NULL, body = NULL \
             WHERE idempotency_keys.expires_at <= $7 \
             OR (idempotency_keys.state = 'in_flight' AND idempotency_keys.lease_until <= $7)",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(claim.fingerprint.as_slice())
        .bind(claim.owner.to_string())
        .bind(millis(claim.lease_until))
        .bind(millis(claim.expires_at))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        let row = sqlx::query_as::<_, IdempotencyRow>(
            "SELECT fingerprint, owner, state, lease_until, status, headers, body \
             FROM idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .fetch_one(&mut *tx)
        .await
        .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        row.outcome(claim)
    }

    async fn complete_idempotent(
        &self,
        scope: &str,
        key: &str,
        owner: RequestId,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency_keys SET state = 'completed', status = $1, headers = $2, \
             body = $3 WHERE scope = $4 AND key = $5 AND owner = $6 AND state = 'in_flight'",
        )
        .bind(i64::from(response.status))
        .bind(to_json(&response.headers)?)
        .bind(response.body.as_deref())
        .bind(scope)
        .bind(key)
        .bind(owner.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn release_idempotent(
        &self,
        scope: &str,
        key: &str,
        owner: RequestId,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE scope = $1 AND key = $2 AND owner = $3 AND state = 'in_flight'",
        )
        .bind(scope)
        .bind(key)
        .bind(owner.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn purge_idempotency(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let purged = sqlx::query(
            "DELETE FROM idempotency_keys WHERE expires_at <= $1 \
             AND (state = 'completed' OR lease_until <= $1)",
        )
        .bind(millis(now))
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        // Batch ids only need to outlive the retries of their batch.
        let day_ago = millis(now) - 24 * 3600 * 1000;
        sqlx::query("DELETE FROM ledger_batches WHERE committed_at < $1")
            .bind(day_ago)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(purged)
    }
}

#[async_trait]
impl AuditStore for PostgresStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditEntry, StoreError> {
        let mut tx = self.begin().await?;
        // The head's lock makes appends take turns: no two read the same head.
        let head = sqlx::query_as::<_, AuditHeadRow>(
            "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(store_error)?;
        let entry = entry.seal(head.head()?);
        let seq = i64::try_from(entry.seq).map_err(|_| corrupt("audit seq", "overflow"))?;
        sqlx::query(
            "INSERT INTO audit_log (seq, at, actor, action, target, request_id, before, after, \
             prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(seq)
        .bind(millis(entry.at))
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(&entry.request_id)
        .bind(&entry.before)
        .bind(&entry.after)
        .bind(entry.prev_hash.as_slice())
        .bind(entry.hash.as_slice())
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq)
            .bind(entry.hash.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(entry)
    }

    async fn audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query_as::<_, AuditRow>(
            "SELECT seq, at, actor, action, target, request_id, before, after, prev_hash, hash \
             FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        sqlx::query_as::<_, AuditHeadRow>("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?
            .head()
    }
}

#[async_trait]
impl UsageStore for PostgresStore {
    async fn requests(&self, filter: &UsageFilter) -> Result<Vec<UsageRow>, StoreError> {
        let mut query = sqlx::QueryBuilder::<Postgres>::new(format!(
            "SELECT {USAGE_COLUMNS} FROM requests WHERE TRUE"
        ));
        push_usage_filter(&mut query, filter);
        let rows = query
            .build_query_as::<UsageDbRow>()
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        convert(rows)
    }

    async fn usage_summary(
        &self,
        account: AccountId,
        group_by: UsageGroup,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let group = match group_by {
            UsageGroup::Day => {
                "to_char(to_timestamp(created_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
            UsageGroup::Key => "key_id",
            UsageGroup::Route => "route",
            UsageGroup::Model => "COALESCE(model, '')",
        };
        let rows = sqlx::query_as::<_, BucketRow>(&format!(
            "SELECT {group} COLLATE \"C\" AS grp, COUNT(*) AS requests, \
             COUNT(*) FILTER (WHERE status >= 400) AS errors, \
             COALESCE(SUM(input_tokens), 0)::BIGINT AS input_tokens, \
             COALESCE(SUM(cached_input_tokens), 0)::BIGINT AS cached_input_tokens, \
             COALESCE(SUM(output_tokens), 0)::BIGINT AS output_tokens, \
             COALESCE(SUM(cost_nanos), 0)::BIGINT AS cost_nanos \
             FROM requests WHERE account_id = $1 \
             AND ($2::BIGINT IS NULL OR created_at >= $2) \
             AND ($3::BIGINT IS NULL OR created_at < $3) \
             GROUP BY grp ORDER BY grp"
        ))
        .bind(account.to_string())
        .bind(from.map(millis))
        .bind(to.map(millis))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn usage_series(
        &self,
        account: AccountId,
        split: SeriesSplit,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<SeriesSlot>, StoreError> {
        let rows = sqlx::query_as::<_, SlotRow>(&format!(
            "SELECT slot_start AS slot, {} AS grp, SUM(requests)::BIGINT AS requests, \
             SUM(errors)::BIGINT AS errors, SUM(input_tokens)::BIGINT AS input_tokens, \
             SUM(cached_input_tokens)::BIGINT AS cached_input_tokens, \
             SUM(output_tokens)::BIGINT AS output_tokens, SUM(cost_nanos)::BIGINT AS cost_nanos \
             FROM usage_slots WHERE account_id = $1 AND slot_start >= $2 AND slot_start < $3 \
             GROUP BY slot, grp ORDER BY slot, grp",
            split_column(split)
        ))
        .bind(account.to_string())
        .bind(millis(from))
        .bind(millis(to))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn key_activity(
        &self,
        keys: &[KeyId],
        since: DateTime<Utc>,
    ) -> Result<Vec<KeyActivity>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sqlx::QueryBuilder::<Postgres>::new(
            "SELECT k.id AS id, (SELECT COALESCE(SUM(h.charged_nanos), 0)::BIGINT FROM holds h \
             WHERE h.key_id = k.id AND h.resolved_at >= ",
        );
        query.push_bind(millis(since));
        query.push(
            ") AS spent, (SELECT r.created_at FROM requests r WHERE r.key_id = k.id \
             ORDER BY r.request_id DESC LIMIT 1) AS last_used FROM api_keys k WHERE k.id IN (",
        );
        let mut ids = query.separated(", ");
        for key in keys {
            ids.push_bind(key.to_string());
        }
        query.push(") ORDER BY k.id");
        let rows = query
            .build_query_as::<ActivityRow>()
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        convert(rows)
    }

    async fn keys_near_cap(
        &self,
        account: AccountId,
        since: DateTime<Utc>,
        percent: u32,
        limit: u32,
    ) -> Result<Vec<KeyActivity>, StoreError> {
        let rows = sqlx::query_as::<_, ActivityRow>(
            "SELECT id, spent, NULL::BIGINT AS last_used FROM ( \
             SELECT k.id AS id, k.monthly_spend_cap_nanos AS cap, \
             (SELECT COALESCE(SUM(h.charged_nanos), 0)::BIGINT FROM holds h \
              WHERE h.key_id = k.id AND h.resolved_at >= $2) AS spent \
             FROM api_keys k WHERE k.account_id = $1 AND k.monthly_spend_cap_nanos IS NOT NULL \
             AND k.status <> 'revoked') capped \
             WHERE spent::NUMERIC * 100 >= cap::NUMERIC * $3 ORDER BY id LIMIT $4",
        )
        .bind(account.to_string())
        .bind(millis(since))
        .bind(i64::from(percent))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn api_charges(
        &self,
        account: AccountId,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<(u64, Nanos), StoreError> {
        let (holds, charged): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*)::BIGINT, COALESCE(SUM(charged_nanos), 0)::BIGINT FROM holds \
             WHERE account_id = $1 AND source = 'api' AND status = 'settled' \
             AND ($2::BIGINT IS NULL OR resolved_at >= $2) AND ($3::BIGINT IS NULL OR resolved_at < $3)",
        )
        .bind(account.to_string())
        .bind(from.map(millis))
        .bind(to.map(millis))
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?;
        Ok((u64::try_from(holds).unwrap_or(0), Nanos(charged)))
    }

    async fn request(&self, id: RequestId) -> Result<Option<UsageRow>, StoreError> {
        let row = sqlx::query_as::<_, UsageDbRow>(&format!(
            "SELECT {USAGE_COLUMNS} FROM requests WHERE request_id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(UsageRow::try_from).transpose()
    }

    async fn purge_requests_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        // A slot's totals go with the last of its rows: when the whole slot is before the cutoff.
        let slot = crate::SERIES_SLOT.num_milliseconds();
        sqlx::query("DELETE FROM usage_slots WHERE slot_start <= $1")
            .bind(millis(cutoff) - slot)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(sqlx::query("DELETE FROM requests WHERE created_at < $1")
            .bind(millis(cutoff))
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected())
    }
}

#[async_trait]
impl SessionStore for PostgresStore {
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, key_id, created_at, last_seen_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(session.id_hash.to_vec())
        .bind(session.key.map(|k| k.to_string()))
        .bind(millis(session.created_at))
        .bind(millis(session.last_seen_at))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn session(&self, id_hash: &[u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        let row: Option<(Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT key_id, created_at, last_seen_at FROM console_sessions WHERE id_hash = $1",
        )
        .bind(id_hash.to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(|(key, created_at, last_seen_at)| {
            Ok(SessionRecord {
                id_hash: *id_hash,
                key: key
                    .as_deref()
                    .map(|k| parse_id("session key", k))
                    .transpose()?,
                created_at: from_millis(created_at)?,
                last_seen_at: from_millis(last_seen_at)?,
            })
        })
        .transpose()
    }

    async fn touch_session(&self, id_hash: &[u8; 32], at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE console_sessions SET last_seen_at = $1 \
             WHERE id_hash = $2 AND last_seen_at < $1",
        )
        .bind(millis(at))
        .bind(id_hash.to_vec())
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn end_session(&self, id_hash: &[u8; 32]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
            .bind(id_hash.to_vec())
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn purge_sessions(
        &self,
        idle_cutoff: DateTime<Utc>,
        absolute_cutoff: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM console_sessions WHERE last_seen_at < $1 OR created_at < $2")
                .bind(millis(idle_cutoff))
                .bind(millis(absolute_cutoff))
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected(),
        )
    }
}

/// The channel the database announces key and account changes on (migration 0002).
const CHANGES_CHANNEL: &str = "tollgate_changes";

impl Sharing for PostgresStore {
    fn leases(&self) -> Option<std::sync::Arc<dyn LeaseStore>> {
        Some(std::sync::Arc::new(self.clone()))
    }
}

#[async_trait]
impl LeaseStore for PostgresStore {
    async fn commit_leased(
        &self,
        batch: BatchId,
        node: NodeId,
        writes: &[LedgerWrite],
    ) -> Result<(), StoreError> {
        self.commit_batch(batch, Some(node), writes).await
    }

    async fn carve(
        &self,
        account: AccountId,
        node: NodeId,
        give_back: Nanos,
        needed: Nanos,
        at: DateTime<Utc>,
    ) -> Result<Carve, StoreError> {
        let mut tx = self.begin().await?;
        match carve_in(&mut tx, account, node, give_back, needed, at).await {
            Ok(carve) => {
                tx.commit().await.map_err(store_error)?;
                Ok(carve)
            }
            Err(e) => {
                // Explicitly, so the wallet's lock is not kept until the connection's next use.
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    async fn return_lease(
        &self,
        account: AccountId,
        node: NodeId,
        amount: Nanos,
    ) -> Result<(), StoreError> {
        // At most what the lease holds: a lease the other nodes reclaimed while this node was
        // cut off from the database has nothing left to give back.
        sqlx::query(
            "UPDATE wallet_leases SET amount_nanos = GREATEST(amount_nanos - $1, 0) \
             WHERE account_id = $2 AND node_id = $3",
        )
        .bind(amount.0)
        .bind(account.to_string())
        .bind(node.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn renew_leases(&self, node: NodeId, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM wallet_leases WHERE node_id = $1 AND amount_nanos = 0")
            .bind(node.to_string())
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        sqlx::query("UPDATE wallet_leases SET renewed_at = $1 WHERE node_id = $2")
            .bind(millis(at))
            .bind(node.to_string())
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn reclaim_leases(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM wallet_leases WHERE renewed_at < $1")
                .bind(millis(cutoff))
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected(),
        )
    }

    async fn key_spend(
        &self,
        key: KeyId,
        now: DateTime<Utc>,
    ) -> Result<(Nanos, Nanos), StoreError> {
        let row: Option<(i32, i64, i64)> = sqlx::query_as(
            "SELECT month, spent_nanos, held_nanos FROM key_spend WHERE key_id = $1",
        )
        .bind(key.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(match row {
            Some((month, spent, held)) if month >= month_of(now) => (Nanos(spent), Nanos(held)),
            Some((_, _, held)) => (Nanos::ZERO, Nanos(held)),
            None => (Nanos::ZERO, Nanos::ZERO),
        })
    }

    async fn leases_of(&self, account: AccountId) -> Result<Vec<(NodeId, Nanos)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT node_id, amount_nanos FROM wallet_leases WHERE account_id = $1 ORDER BY node_id",
        )
        .bind(account.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.into_iter()
            .map(|(node, amount)| Ok((parse_id("lease node", &node)?, Nanos(amount))))
            .collect()
    }
}

/// The carve's statements, in the caller's transaction.
async fn carve_in(
    tx: &mut Transaction<'_, Postgres>,
    account: AccountId,
    node: NodeId,
    give_back: Nanos,
    needed: Nanos,
    at: DateTime<Utc>,
) -> Result<Carve, StoreError> {
    // The wallet's lock makes carves of one account take turns, and waits for any ledger
    // batch moving its balance: the free balance read below stays true until commit.
    let balance: Option<i64> =
        sqlx::query_scalar("SELECT balance_nanos FROM wallets WHERE account_id = $1 FOR UPDATE")
            .bind(account.to_string())
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?;
    let Some(balance) = balance else {
        return Err(StoreError::Corrupt(format!(
            "account {account} has no wallet"
        )));
    };
    if give_back > Nanos::ZERO {
        give_back_lease(tx, account, node, give_back).await?;
    }
    let (leased, own): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(amount_nanos), 0)::BIGINT, \
         COALESCE(SUM(amount_nanos) FILTER (WHERE node_id = $2), 0)::BIGINT \
         FROM wallet_leases WHERE account_id = $1",
    )
    .bind(account.to_string())
    .bind(node.to_string())
    .fetch_one(&mut **tx)
    .await
    .map_err(store_error)?;
    let free = Nanos(balance - leased);
    let others = Nanos(leased - own);
    let granted = lease_size(free, needed).unwrap_or(Nanos::ZERO);
    if granted == Nanos::ZERO && needed > Nanos::ZERO && free.0 + others.0 >= needed.0 {
        // The other nodes hold what this hold needs: they give it back at this commit's notice.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(format!("recall:{account}:{node}"))
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
    }
    if granted > Nanos::ZERO {
        sqlx::query(
            "INSERT INTO wallet_leases (account_id, node_id, amount_nanos, renewed_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, node_id) \
                 DO UPDATE SET amount_nanos = wallet_leases.amount_nanos + EXCLUDED.amount_nanos, \
                 renewed_at = EXCLUDED.renewed_at",
        )
        .bind(account.to_string())
        .bind(node.to_string())
        .bind(granted.0)
        .bind(millis(at))
        .execute(&mut **tx)
        .await
        .map_err(store_error)?;
    }
    Ok(Carve {
        granted,
        free: Nanos(free.0 - granted.0),
        leased: others,
    })
}

/// Moves the node's lease on the account by `delta`, as its batch moved the balance. What comes
/// back to a lease the node no longer has (reclaimed, or given back) starts a new one. A hold
/// that needs more than the lease holds (it was reclaimed while the node was cut off) takes the
/// rest from the free balance, if that covers it: the credit is the customer's either way.
async fn move_lease(
    tx: &mut Transaction<'_, Postgres>,
    account: AccountId,
    node: NodeId,
    delta: i64,
) -> Result<(), StoreError> {
    if delta == 0 {
        return Ok(());
    }
    if delta < 0 {
        // The common case: the lease covers the batch's holds.
        let covered = sqlx::query(
            "UPDATE wallet_leases SET amount_nanos = amount_nanos + $1 \
             WHERE account_id = $2 AND node_id = $3 AND amount_nanos + $1 >= 0",
        )
        .bind(delta)
        .bind(account.to_string())
        .bind(node.to_string())
        .execute(&mut **tx)
        .await
        .map_err(store_error)?
        .rows_affected()
            == 1;
        if covered {
            return Ok(());
        }
    }
    sqlx::query(
        "INSERT INTO wallet_leases (account_id, node_id, amount_nanos, renewed_at) \
         VALUES ($1, $2, GREATEST($3, 0), $4) ON CONFLICT (account_id, node_id) \
         DO UPDATE SET amount_nanos = GREATEST(wallet_leases.amount_nanos + $3, 0)",
    )
    .bind(account.to_string())
    .bind(node.to_string())
    .bind(delta)
    .bind(chrono::Utc::now().timestamp_millis())
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    if delta > 0 {
        return Ok(());
    }
    // The batch has locked the wallet row (it updated it): the leases must still fit in it.
    let free: i64 = sqlx::query_scalar(
        "SELECT w.balance_nanos - COALESCE((SELECT SUM(l.amount_nanos) FROM wallet_leases l \
         WHERE l.account_id = w.account_id), 0)::BIGINT FROM wallets w WHERE w.account_id = $1",
    )
    .bind(account.to_string())
    .fetch_one(&mut **tx)
    .await
    .map_err(store_error)?;
    if free >= 0 {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "node {node}'s holds on account {account} need {} more than its lease and the free \
             balance hold",
            -free
        )))
    }
}

/// Adds a batch's changes to each key's monthly spend, and refuses the batch if a key it
/// opens a capped hold on would pass its cap.
async fn add_key_spend(
    tx: &mut Transaction<'_, Postgres>,
    key_spend: &std::collections::BTreeMap<KeyId, KeySpendDelta>,
) -> Result<(), StoreError> {
    for (key, delta) in key_spend {
        let (spent, held): (i64, i64) = sqlx::query_as(
            "INSERT INTO key_spend (key_id, month, spent_nanos, held_nanos) \
             VALUES ($1, $2, GREATEST($3, 0), GREATEST($4, 0)) ON CONFLICT (key_id) DO UPDATE SET \
             spent_nanos = CASE WHEN EXCLUDED.month > key_spend.month THEN $3 \
                           ELSE key_spend.spent_nanos + $3 END, \
             held_nanos = GREATEST(key_spend.held_nanos + $4, 0), \
             month = GREATEST(key_spend.month, EXCLUDED.month) \
             RETURNING spent_nanos, held_nanos",
        )
        .bind(key.to_string())
        .bind(delta.month)
        .bind(delta.spent)
        .bind(delta.held)
        .fetch_one(&mut **tx)
        .await
        .map_err(store_error)?;
        if let Some(cap) = delta.cap {
            if spent.saturating_add(held) > cap.0 {
                return Err(StoreError::Corrupt(format!(
                    "key {key} would pass its monthly spend cap of {cap} nanos (spent {spent}, \
                     held {held})"
                )));
            }
        }
    }
    Ok(())
}

/// Takes `amount` off the node's lease on the account (refused if the lease is smaller).
async fn give_back_lease(
    tx: &mut Transaction<'_, Postgres>,
    account: AccountId,
    node: NodeId,
    amount: Nanos,
) -> Result<(), StoreError> {
    let changed = sqlx::query(
        "UPDATE wallet_leases SET amount_nanos = amount_nanos - $1 \
         WHERE account_id = $2 AND node_id = $3",
    )
    .bind(amount.0)
    .bind(account.to_string())
    .bind(node.to_string())
    .execute(&mut **tx)
    .await
    .map_err(store_error)?
    .rows_affected();
    if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "node {node} has no lease on account {account} to give back"
        )))
    }
}

#[async_trait]
impl ChangeFeed for PostgresStore {
    /// Listens on its own connection. Announcements arrive at commit, so a change reaches every
    /// node in one round trip. When the connection drops, the listener reconnects and sends
    /// [`StoreChange::Resync`]: what was announced meanwhile is lost, so caches start afresh.
    async fn changes(&self) -> Result<Option<mpsc::Receiver<StoreChange>>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(store_error)?;
        listener
            .listen(CHANGES_CHANNEL)
            .await
            .map_err(store_error)?;
        let (changes, receiver) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let change = match listener.try_recv().await {
                    Ok(Some(notification)) => match parse_change(notification.payload()) {
                        Some(change) => change,
                        None => {
                            tracing::warn!(payload = notification.payload(), "unknown change");
                            continue;
                        }
                    },
                    Ok(None) => {
                        tracing::warn!("change feed reconnected; caches start afresh");
                        StoreChange::Resync
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "change feed lost; retrying in a second");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        StoreChange::Resync
                    }
                };
                if changes.send(change).await.is_err() {
                    return; // nobody listens any more
                }
            }
        });
        Ok(Some(receiver))
    }
}

fn parse_change(payload: &str) -> Option<StoreChange> {
    match payload.split_once(':')? {
        ("key", id) => id.parse().ok().map(StoreChange::Key),
        ("account", id) => id.parse().ok().map(StoreChange::Account),
        ("recall", rest) => {
            let (account, by) = rest.split_once(':')?;
            Some(StoreChange::Recall {
                account: account.parse().ok()?,
                by: by.parse().ok()?,
            })
        }
        _ => None,
    }
}

#[async_trait]
impl StoreHealth for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let mut slot = self.probe.lock().await;
        // Out of its slot while in use: a ping cut off by its deadline drops the connection,
        // and the next ping makes a fresh one rather than reading this one's late answer.
        let mut connection = match slot.take() {
            Some(connection) => connection,
            None => PgConnection::connect_with(&self.options)
                .await
                .map_err(store_error)?,
        };
        connection.ping().await.map_err(store_error)?;
        *slot = Some(connection);
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }
}

#[async_trait]
impl PaymentStore for PostgresStore {
    async fn create_topup(&self, topup: &TopUp) -> Result<bool, StoreError> {
        let inserted = sqlx::query(&format!(
            "INSERT INTO topups ({TOPUP_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT DO NOTHING"
        ))
        .bind(topup.id.to_string())
        .bind(topup.account_id.to_string())
        .bind(topup.amount.0)
        .bind(topup.amount_minor)
        .bind(&topup.currency)
        .bind(topup.status.as_str())
        .bind(topup.origin.as_str())
        .bind(&topup.checkout_session)
        .bind(&topup.checkout_url)
        .bind(&topup.payment_intent)
        .bind(&topup.dispute)
        .bind(&topup.review)
        .bind(&topup.failure)
        .bind(&topup.auto_key)
        .bind(millis(topup.created_at))
        .bind(millis(topup.updated_at))
        .bind(&topup.pack)
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn topup(&self, id: TopUpId) -> Result<Option<TopUp>, StoreError> {
        let row: Option<TopUpRow> =
            sqlx::query_as(&format!("SELECT {TOPUP_COLUMNS} FROM topups WHERE id = $1"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        row.map(TopUp::try_from).transpose()
    }

    async fn topup_by_provider_id(&self, provider_id: &str) -> Result<Option<TopUp>, StoreError> {
        let row: Option<TopUpRow> = sqlx::query_as(&format!(
            "SELECT {TOPUP_COLUMNS} FROM topups \
             WHERE checkout_session = $1 OR payment_intent = $1 LIMIT 1"
        ))
        .bind(provider_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(TopUp::try_from).transpose()
    }

    async fn topups(
        &self,
        account: AccountId,
        before: Option<TopUpId>,
        limit: u32,
    ) -> Result<Vec<TopUp>, StoreError> {
        let rows: Vec<TopUpRow> = sqlx::query_as(&format!(
            "SELECT {TOPUP_COLUMNS} FROM topups WHERE account_id = $1 \
             AND ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
        ))
        .bind(account.to_string())
        .bind(before.map(|id| id.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn set_checkout(
        &self,
        id: TopUpId,
        session: &str,
        url: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE topups SET checkout_session = $1, checkout_url = $2, updated_at = $3 \
             WHERE id = $4",
        )
        .bind(session)
        .bind(url)
        .bind(millis(at))
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn move_topup(
        &self,
        id: TopUpId,
        status: TopUpStatus,
        payment_intent: Option<&str>,
        failure: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let moved = sqlx::query(&format!(
            "UPDATE topups SET status = $1, payment_intent = COALESCE(payment_intent, $2), \
             failure = COALESCE(failure, $3), updated_at = $4 \
             WHERE id = $5 AND status IN ({})",
            statuses_before(status)
        ))
        .bind(status.as_str())
        .bind(payment_intent)
        .bind(failure)
        .bind(millis(at))
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        Ok(moved == 1)
    }

    async fn set_dispute(
        &self,
        id: TopUpId,
        status: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let changed = sqlx::query(
            "UPDATE topups SET dispute = $1, updated_at = $2 WHERE id = $3 AND \
             (dispute IS NULL OR ($1 <> 'open' AND dispute = 'open'))",
        )
        .bind(status)
        .bind(millis(at))
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        Ok(changed == 1)
    }

    async fn flag_topup(
        &self,
        id: TopUpId,
        review: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE topups SET review = COALESCE(review, $1), updated_at = $2 WHERE id = $3",
        )
        .bind(review)
        .bind(millis(at))
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn record_event(&self, event: &PaymentEvent) -> Result<bool, StoreError> {
        sqlx::query(
            "INSERT INTO payment_events (id, kind, topup_id, payment_intent, payload, received_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.kind)
        .bind(event.topup.map(|t| t.to_string()))
        .bind(&event.payment_intent)
        .bind(&event.payload)
        .bind(millis(event.received_at))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        let handled: Option<i64> =
            sqlx::query_scalar("SELECT handled_at FROM payment_events WHERE id = $1")
                .bind(&event.id)
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)?;
        Ok(handled.is_some())
    }

    async fn finish_event(
        &self,
        id: &str,
        outcome: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE payment_events SET handled_at = COALESCE(handled_at, $1), outcome = $2 \
             WHERE id = $3",
        )
        .bind(millis(at))
        .bind(outcome)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn save_card(
        &self,
        account: AccountId,
        customer: &str,
        payment_method: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO auto_topups (account_id, customer, payment_method, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (account_id) DO UPDATE SET \
             customer = excluded.customer, payment_method = excluded.payment_method, \
             updated_at = excluded.updated_at",
        )
        .bind(account.to_string())
        .bind(customer)
        .bind(payment_method)
        .bind(millis(at))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn set_auto_topup(&self, rule: &AutoTopUp) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO auto_topups (account_id, threshold_nanos, amount_nanos, max_per_month, \
             enabled, disabled_reason, updated_at) VALUES ($1, $2, $3, $4, TRUE, NULL, $5) \
             ON CONFLICT (account_id) DO UPDATE SET threshold_nanos = excluded.threshold_nanos, \
             amount_nanos = excluded.amount_nanos, max_per_month = excluded.max_per_month, \
             enabled = TRUE, disabled_reason = NULL, updated_at = excluded.updated_at",
        )
        .bind(rule.account_id.to_string())
        .bind(rule.threshold.0)
        .bind(rule.amount.0)
        .bind(i64::from(rule.max_per_month))
        .bind(millis(rule.updated_at))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn auto_topup(&self, account: AccountId) -> Result<Option<AutoTopUp>, StoreError> {
        let row: Option<AutoTopUpRow> = sqlx::query_as(&format!(
            "SELECT {AUTO_TOPUP_COLUMNS} FROM auto_topups WHERE account_id = $1"
        ))
        .bind(account.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(AutoTopUp::try_from).transpose()
    }

    async fn disable_auto_topup(
        &self,
        account: AccountId,
        reason: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE auto_topups SET enabled = FALSE, disabled_reason = $1, updated_at = $2 \
             WHERE account_id = $3",
        )
        .bind(reason)
        .bind(millis(at))
        .bind(account.to_string())
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn auto_topups_due(&self) -> Result<Vec<AutoTopUp>, StoreError> {
        let rows: Vec<AutoTopUpRow> = sqlx::query_as(
            "SELECT a.account_id, a.threshold_nanos, a.amount_nanos, a.max_per_month, a.enabled, \
             a.disabled_reason, a.customer, a.payment_method, a.updated_at \
             FROM auto_topups a JOIN wallets w ON w.account_id = a.account_id \
             WHERE a.enabled AND a.payment_method IS NOT NULL AND a.customer IS NOT NULL \
             AND w.balance_nanos < a.threshold_nanos",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn auto_topups_since(
        &self,
        account: AccountId,
        since: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM topups WHERE account_id = $1 AND origin = 'auto' \
             AND created_at >= $2",
        )
        .bind(account.to_string())
        .bind(millis(since))
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    async fn waiting_events(
        &self,
        topup: TopUpId,
        payment_intent: Option<&str>,
    ) -> Result<Vec<PaymentEvent>, StoreError> {
        let rows: Vec<PaymentEventRow> = sqlx::query_as(
            "SELECT id, kind, topup_id, payment_intent, payload, received_at FROM payment_events \
             WHERE handled_at IS NULL AND (topup_id = $1 OR payment_intent = $2) \
             ORDER BY received_at, id",
        )
        .bind(topup.to_string())
        .bind(payment_intent)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }
}

#[async_trait]
impl UnitStore for PostgresStore {
    async fn subscription(&self, account: AccountId) -> Result<Option<Subscription>, StoreError> {
        let row: Option<SubscriptionRow> = sqlx::query_as(
            "SELECT plan, status, since, started_at FROM subscriptions WHERE account_id = $1",
        )
        .bind(account.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.map(Subscription::try_from).transpose()
    }

    async fn set_subscription(
        &self,
        account: AccountId,
        subscription: &Subscription,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO subscriptions (account_id, plan, status, since, started_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id) DO UPDATE SET plan = excluded.plan, \
             status = excluded.status, since = excluded.since, started_at = excluded.started_at",
        )
        .bind(account.to_string())
        .bind(&subscription.plan)
        .bind(subscription.status.as_str())
        .bind(millis(subscription.since))
        .bind(millis(subscription.started_at))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn add_pack(&self, pack: &UnitBucket, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let added = insert_bucket(&mut tx, pack).await?;
        if added {
            unit_entry(
                &mut tx,
                pack.account,
                &pack.bucket,
                "grant",
                pack.granted,
                None,
                at,
            )
            .await?;
        }
        tx.commit().await.map_err(store_error)?;
        Ok(added)
    }

    async fn reserve_units(&self, ask: &UnitsAsk) -> Result<UnitsAnswer, StoreError> {
        let account = ask.allowance.account;
        let mut tx = self.begin().await?;
        // The plan's own buckets first, created or raised, in lock order (on SQLite the first
        // write takes the write lock: what follows reads one state).
        for own in ask.own_buckets() {
            let rollover = ask
                .rollover
                .as_ref()
                .filter(|_| own.bucket == ask.allowance.bucket);
            open_bucket(&mut tx, own, rollover, ask.at).await?;
        }
        let names: Vec<String> = ask.own_buckets().iter().map(|b| b.bucket.clone()).collect();
        let candidates: Vec<UnitBucketRow> = sqlx::query_as(&format!(
            "SELECT {UNIT_BUCKET_COLUMNS} FROM unit_buckets WHERE account_id = $1 \
             AND (bucket = ANY($2) OR (source = 'pack' AND meter = $3 AND ends_at > $4 \
             AND used + held < granted)) ORDER BY source = 'pack', bucket FOR UPDATE"
        ))
        .bind(account.to_string())
        .bind(&names)
        .bind(ask.allowance.meter.as_str())
        .bind(millis(ask.at))
        .fetch_all(&mut *tx)
        .await
        .map_err(store_error)?;
        let candidates = candidates
            .into_iter()
            .map(UnitBucket::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let answer = units::decide(ask, candidates);
        let UnitsAnswer::Reserved {
            draws,
            window_draws,
            ..
        } = &answer
        else {
            // Refused: nothing is held, but the period's buckets stay granted.
            tx.commit().await.map_err(store_error)?;
            return Ok(answer);
        };
        let reference = ask.request.to_string();
        let every = draws
            .iter()
            .map(|draw| (draw, false))
            .chain(window_draws.iter().map(|draw| (draw, true)));
        for (position, ((bucket, held), mirror)) in every.enumerate() {
            // One statement a draw: the buckets stay locked until commit, and every round trip
            // here is one more every other call on the account waits for.
            sqlx::query(
                "WITH bucket AS (UPDATE unit_buckets SET held = held + $1 \
                 WHERE account_id = $2 AND bucket = $3), \
                 draw AS (INSERT INTO unit_draws \
                 (request_id, position, account_id, bucket, units, expires_at, mirror) \
                 VALUES ($4, $5, $2, $3, $1, $6, $7)) \
                 INSERT INTO unit_entries (account_id, bucket, kind, units, reference, at) \
                 SELECT $2, $3, 'hold', $1, $4, $8 WHERE $1 > 0",
            )
            .bind(rows::units(*held))
            .bind(account.to_string())
            .bind(bucket)
            .bind(&reference)
            .bind(position as i64)
            .bind(millis(ask.expires_at))
            .bind(mirror)
            .bind(millis(ask.at))
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)?;
        Ok(answer)
    }

    async fn settle_units(
        &self,
        request: RequestId,
        units: u64,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let draws = take_draws(&mut tx, DrawsOf::Request(&request.to_string())).await?;
        let found = !draws.is_empty();
        let mut drawn: Vec<(AccountId, String)> = Vec::new();
        for (account, bucket, used, returned) in units::settlement(draws, units) {
            finish_draw(
                &mut tx,
                account,
                &bucket,
                used,
                returned,
                "return",
                &request.to_string(),
                at,
            )
            .await?;
            drawn.push((account, bucket));
        }
        if let Some((account, _)) = drawn.first() {
            let buckets: Vec<String> = drawn.iter().map(|(_, b)| b.clone()).collect();
            watch_units(&mut tx, *account, &buckets, request, at).await?;
        }
        tx.commit().await.map_err(store_error)?;
        Ok(found)
    }

    async fn expire_units(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let draws = take_draws(&mut tx, DrawsOf::ExpiredBy(millis(cutoff))).await?;
        let mut requests: Vec<&str> = draws.iter().map(|d| d.request.as_str()).collect();
        requests.sort_unstable();
        requests.dedup();
        let expired = requests.len() as u64;
        for draw in units::by_lock_order(&draws) {
            finish_draw(
                &mut tx,
                draw.account,
                &draw.bucket,
                0,
                draw.units,
                "expire",
                &draw.request,
                cutoff,
            )
            .await?;
        }
        tx.commit().await.map_err(store_error)?;
        Ok(expired)
    }

    async fn unit_buckets(
        &self,
        account: AccountId,
        at: DateTime<Utc>,
    ) -> Result<Vec<UnitBucket>, StoreError> {
        let rows: Vec<UnitBucketRow> = sqlx::query_as(&format!(
            "SELECT {UNIT_BUCKET_COLUMNS} FROM unit_buckets WHERE account_id = $1 \
             AND starts_at <= $2 AND ends_at > $3 ORDER BY source, ends_at, bucket"
        ))
        .bind(account.to_string())
        .bind(millis(at))
        .bind(millis(at))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.into_iter().map(UnitBucket::try_from).collect()
    }

    async fn reset_bucket(
        &self,
        account: AccountId,
        bucket: &str,
        reference: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<bool>, StoreError> {
        let mut tx = self.begin().await?;
        let used: Option<i64> = sqlx::query_scalar(
            "UPDATE unit_buckets SET used = used WHERE account_id = $1 AND bucket = $2 RETURNING used",
        )
        .bind(account.to_string())
        .bind(bucket)
        .fetch_optional(&mut *tx)
        .await
        .map_err(store_error)?;
        let Some(used) = used else {
            return Ok(None);
        };
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM unit_entries WHERE account_id = $1 AND reference = $2 AND kind = 'reset'",
        )
        .bind(account.to_string())
        .bind(reference)
        .fetch_optional(&mut *tx)
        .await
        .map_err(store_error)?;
        if done.is_some() {
            return Ok(Some(false));
        }
        sqlx::query("UPDATE unit_buckets SET used = 0 WHERE account_id = $1 AND bucket = $2")
            .bind(account.to_string())
            .bind(bucket)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        // A reset of nothing is recorded too, so its reference is spent.
        sqlx::query(
            "INSERT INTO unit_entries (account_id, bucket, kind, units, reference, at) \
             VALUES ($1, $2, 'reset', $3, $4, $5)",
        )
        .bind(account.to_string())
        .bind(bucket)
        .bind(used)
        .bind(reference)
        .bind(millis(at))
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        announce_reset(&mut tx, account, bucket, "manual", at).await?;
        tx.commit().await.map_err(store_error)?;
        Ok(Some(true))
    }

    async fn unit_entry_sums(
        &self,
        account: AccountId,
    ) -> Result<Vec<(String, u64, u64, u64)>, StoreError> {
        let rows: Vec<(String, i64, i64, i64)> =
            sqlx::query_as(&units::ENTRY_SUMS.replace("{account}", "$1"))
                .bind(account.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
        Ok(units::sums(rows))
    }
}

/// Writes a new bucket; `false` if the account has one of that name.
async fn insert_bucket(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    bucket: &UnitBucket,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(&format!(
        "INSERT INTO unit_buckets ({UNIT_BUCKET_COLUMNS}, base) VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $7, $8, $6) \
         ON CONFLICT DO NOTHING"
    ))
    .bind(bucket.account.to_string())
    .bind(&bucket.bucket)
    .bind(bucket.source.as_str())
    .bind(bucket.meter.as_str())
    .bind(&bucket.routes)
    .bind(rows::units(bucket.granted))
    .bind(millis(bucket.starts_at))
    .bind(millis(bucket.ends_at))
    .execute(&mut **tx)
    .await
    .map_err(store_error)?
    .rows_affected();
    Ok(inserted == 1)
}

/// Creates one of the plan's buckets for its period if no call has (granted once, whoever asks
/// first; a new allowance period takes over up to `rollover`'s cap of the previous period's
/// unused units, which leave that bucket), or raises an existing one's grant to the plan's.
async fn open_bucket(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    bucket: &UnitBucket,
    rollover: Option<&(String, u64)>,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    if !insert_bucket(tx, bucket).await? {
        return raise_grant(tx, bucket, at).await;
    }
    let account = bucket.account;
    announce_reset(tx, account, &bucket.bucket, "period", at).await?;
    unit_entry(
        tx,
        account,
        &bucket.bucket,
        "grant",
        bucket.granted,
        None,
        at,
    )
    .await?;
    let Some((previous, cap)) = rollover.filter(|(_, cap)| *cap > 0) else {
        return Ok(());
    };
    let left: Option<i64> = sqlx::query_scalar(
        "SELECT granted - used - held FROM unit_buckets WHERE account_id = $1 AND bucket = $2 FOR UPDATE",
    )
    .bind(account.to_string())
    .bind(previous)
    .fetch_optional(&mut **tx)
    .await
    .map_err(store_error)?;
    let carry = u64::try_from(left.unwrap_or(0)).unwrap_or(0).min(*cap);
    if carry == 0 {
        return Ok(());
    }
    for (name, change) in [
        (previous.as_str(), -rows::units(carry)),
        (bucket.bucket.as_str(), rows::units(carry)),
    ] {
        sqlx::query(
            "UPDATE unit_buckets SET granted = granted + $1 WHERE account_id = $2 AND bucket = $3",
        )
        .bind(change)
        .bind(account.to_string())
        .bind(name)
        .execute(&mut **tx)
        .await
        .map_err(store_error)?;
    }
    let reference = format!("rollover:{previous}");
    unit_entry(tx, account, previous, "carry", carry, Some(&reference), at).await?;
    unit_entry(
        tx,
        account,
        &bucket.bucket,
        "grant",
        carry,
        Some(&reference),
        at,
    )
    .await
}

/// Raises a bucket's grant to what the plan grants now, if that is more than the plan granted
/// it before (`base`, which rollover does not count): an upgrade applies at once; a downgrade
/// waits for the next period's bucket.
async fn raise_grant(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    bucket: &UnitBucket,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let base: i64 = sqlx::query_scalar(
        "SELECT base FROM unit_buckets WHERE account_id = $1 AND bucket = $2 FOR UPDATE",
    )
    .bind(bucket.account.to_string())
    .bind(&bucket.bucket)
    .fetch_one(&mut **tx)
    .await
    .map_err(store_error)?;
    let now = rows::units(bucket.granted);
    if now <= base {
        return Ok(());
    }
    sqlx::query(
        "UPDATE unit_buckets SET granted = granted + $1, base = $2 WHERE account_id = $3 AND bucket = $4",
    )
    .bind(now - base)
    .bind(now)
    .bind(bucket.account.to_string())
    .bind(&bucket.bucket)
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    let raised = u64::try_from(now - base).unwrap_or(0);
    unit_entry(
        tx,
        bucket.account,
        &bucket.bucket,
        "grant",
        raised,
        None,
        at,
    )
    .await
}

async fn unit_entry(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    account: AccountId,
    bucket: &str,
    kind: &str,
    units: u64,
    reference: Option<&str>,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    if units == 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO unit_entries (account_id, bucket, kind, units, reference, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(account.to_string())
    .bind(bucket)
    .bind(kind)
    .bind(rows::units(units))
    .bind(reference)
    .bind(millis(at))
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    Ok(())
}

/// Deletes and returns a request's draws, or those expired by a time.
async fn take_draws(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    of: DrawsOf<'_>,
) -> Result<Vec<units::Draw>, StoreError> {
    const RETURNING: &str = "RETURNING request_id, position, account_id, bucket, units, mirror";
    let sql = match of {
        DrawsOf::Request(_) => format!("DELETE FROM unit_draws WHERE request_id = $1 {RETURNING}"),
        DrawsOf::ExpiredBy(_) => {
            format!("DELETE FROM unit_draws WHERE expires_at <= $1 {RETURNING}")
        }
    };
    let query = sqlx::query_as(&sql);
    let query = match of {
        DrawsOf::Request(request) => query.bind(request.to_string()),
        DrawsOf::ExpiredBy(cutoff) => query.bind(cutoff),
    };
    let rows: Vec<(String, i64, String, String, i64, bool)> =
        query.fetch_all(&mut **tx).await.map_err(store_error)?;
    units::draws(rows)
}

/// Moves a finished draw's units: `used` from held to used, `returned` from held back to
/// remaining (`kind`: `return` or `expire`).
#[allow(clippy::too_many_arguments)]
async fn finish_draw(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    account: AccountId,
    bucket: &str,
    used: u64,
    returned: u64,
    kind: &str,
    reference: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    // One statement, as a reservation's draws are: the bucket is locked from here to commit.
    sqlx::query(
        "WITH bucket AS (UPDATE unit_buckets SET held = held - ($1 + $2), used = used + $1 \
         WHERE account_id = $3 AND bucket = $4) \
         INSERT INTO unit_entries (account_id, bucket, kind, units, reference, at) \
         SELECT $3, $4, e.kind, e.units, $5, $6 \
         FROM (VALUES (1, 'use', $1), (2, $7, $2)) AS e (n, kind, units) \
         WHERE e.units > 0 ORDER BY e.n",
    )
    .bind(rows::units(used))
    .bind(rows::units(returned))
    .bind(account.to_string())
    .bind(bucket)
    .bind(reference)
    .bind(millis(at))
    .bind(kind)
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    Ok(())
}
