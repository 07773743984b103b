//! The embedded default: one SQLite file in WAL mode, migrations applied at open.

use crate::rows::{self, SubscriptionRow, UnitBucketRow, UNIT_BUCKET_COLUMNS};
use crate::rows::{
    convert, corrupt, from_millis, millis, parse_id, push_usage_filter, spend_deltas, split_column,
    to_json, AccountRow, ActivityRow, AuditHeadRow, AuditRow, BucketRow, HoldRow, IdempotencyRow,
    KeyRow, SlotRow, StandingRow, TransferRow, UsageDbRow, ACCOUNT_SELECT, HOLD_COLUMNS,
    KEY_COLUMNS, UPSERT_SPEND, UPSERT_SPEND_CONFLICT, USAGE_COLUMNS,
};
use crate::rows::{
    statuses_before, AutoTopUpRow, PaymentEventRow, TopUpRow, AUTO_TOPUP_COLUMNS, TOPUP_COLUMNS,
};
use crate::units::{self, DrawsOf, UnitBucket, UnitStore, UnitsAnswer, UnitsAsk};
use crate::{
    Account, AccountStore, AuditStore, BalanceSheet, BatchId, ChangeFeed, HoldRecord,
    IdempotencyBegin, IdempotencyClaim, IdempotencyStore, InsertKeyOutcome, KeyActivity, KeyChange,
    KeyLookup, KeyRecord, KeyStore, LedgerStore, LedgerWrite, RevokeOutcome, SeriesSlot,
    SeriesSplit, SessionRecord, SessionStore, Sharing, StoreError, StoreHealth, StoredResponse,
    TransferRecord, UsageBucket, UsageFilter, UsageGroup, UsageRow, UsageStore,
};
use crate::{AutoTopUp, PaymentEvent, PaymentStore, TopUp};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::time::Duration;
use tollgate_core::audit::AuditEntry;
use tollgate_core::ledger::{month_start, LedgerAccount, Transfer, TransferKind, Wallet};
use tollgate_core::payment::TopUpStatus;
use tollgate_core::plan::Subscription;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::TopUpId;
use tollgate_core::{AccountId, HoldId, KeyHash, KeyId, Nanos, RequestId};

crate::notify::notify_store!(SqliteStore, sqlx::Sqlite, crate::notify::as_is, "");
crate::export::export_store!(
    SqliteStore,
    crate::notify::as_is,
    crate::export::numbered_on_insert
);

mod ledger;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How much of the file the ledger connection maps (address space, not memory: pages are the
/// kernel's page cache).
const MMAP_BYTES: u64 = 1 << 30;

/// How many prepared statements the ledger writer keeps: its one-row statements, and the watches'
/// reads, one per count of accounts or keys a batch moves.
const LEDGER_STATEMENTS: usize = 64;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The ledger writer's own connection ([`ledger`]): its page cache stays warm from one
    /// batch to the next, and a batch is one call to its thread.
    ledger: ledger::LedgerConnection,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode: a power cut may lose the last commits, never corrupt the file.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // The pool's connections do not map the file (the ledger connection does): a read
        // transaction that finds the WAL changed since its connection's last one drops the
        // whole mapping, and on a busy node that is nearly every read, so a point read paid an
        // munmap and fresh page faults.
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(store_error)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")))?;
        let ledger = ledger::LedgerConnection::open(path).await?;
        Ok(SqliteStore { pool, ledger })
    }

    /// Applies pending migrations and reports how many the database now has.
    pub async fn migrate(path: &Path) -> Result<usize, StoreError> {
        let store = SqliteStore::open(path).await?;
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&store.pool)
            .await
            .map_err(store_error)?;
        Ok(applied as usize)
    }

    /// Closes the pool; the file is consistent afterwards.
    pub async fn close(&self) {
        self.ledger.close().await;
        self.pool.close().await;
    }
}

/// A statement the database refuses by a constraint or a trigger (SQLite's `SQLITE_CONSTRAINT`
/// family, and a value too big or of the wrong type) would be refused again: that is corrupt
/// data, which the caller must not retry, not an outage. Everything else is an outage.
fn store_error(e: sqlx::Error) -> StoreError {
    let refused = e.as_database_error().is_some_and(|d| {
        let primary = d
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .map(|code| code & 0xff);
        !matches!(d.kind(), sqlx::error::ErrorKind::Other)
            || matches!(
                primary,
                Some(SQLITE_CONSTRAINT | SQLITE_TOOBIG | SQLITE_MISMATCH)
            )
    });
    if refused {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// SQLite's primary result codes for writes it refuses as they are.
const SQLITE_TOOBIG: i32 = 18;
const SQLITE_CONSTRAINT: i32 = 19;
const SQLITE_MISMATCH: i32 = 20;

/// Inserts the key; with `limit`, only if the account has fewer unrevoked keys than its override
/// or else `limit` (one statement, so the count and the insert cannot be split by another
/// writer). Returns whether a row was inserted.
async fn insert_key_with<'e, E>(
    executor: E,
    key: &KeyRecord,
    limit: Option<u32>,
) -> Result<bool, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let guard = if limit.is_some() {
        " WHERE (SELECT COUNT(*) FROM api_keys WHERE account_id = ?1 AND status <> 'revoked') \
         < COALESCE((SELECT max_keys FROM accounts WHERE id = ?1), ?2)"
    } else {
        ""
    };
    let inserted = sqlx::query(&format!(
        "INSERT INTO api_keys ({KEY_COLUMNS}) \
         SELECT ?3, ?1, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15{guard}"
    ))
    .bind(key.account_id.to_string())
    .bind(limit.map(i64::from))
    .bind(key.id.to_string())
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
    .execute(executor)
    .await
    .map_err(store_error)?
    .rows_affected();
    Ok(inserted == 1)
}

#[async_trait]
impl AccountStore for SqliteStore {
    async fn create_account(
        &self,
        id: AccountId,
        name: &str,
        starter_credits: Nanos,
        master_key: KeyRecord,
        at: DateTime<Utc>,
    ) -> Result<Account, StoreError> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        sqlx::query(
            "INSERT INTO accounts (id, name, status, created_at) VALUES (?, ?, 'active', ?)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(millis(at))
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        sqlx::query("INSERT INTO wallets (account_id, balance_nanos) VALUES (?, ?)")
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
            insert_transfer(&mut tx, &grant, id, "starter credits", "", at).await?;
        }
        insert_key_with(&mut *tx, &master_key, None).await?;
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
        let row = sqlx::query_as::<_, AccountRow>(&format!("{ACCOUNT_SELECT} WHERE a.id = ?"))
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
            "{ACCOUNT_SELECT} WHERE (?1 IS NULL OR a.id > ?1) AND (?2 IS NULL OR a.status = ?2) \
             ORDER BY a.id LIMIT ?3"
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
            "{ACCOUNT_SELECT} WHERE (a.id = ?1 OR instr(lower(a.name), lower(?1)) > 0) \
             AND (?2 IS NULL OR a.id > ?2) ORDER BY a.id LIMIT ?3"
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
            "UPDATE accounts SET name = ?, status = ?, max_keys = ?, rate_limits = ? WHERE id = ?",
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

async fn insert_transfer(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    transfer: &Transfer,
    account: AccountId,
    memo: &str,
    reference: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO ledger_transfers (debit_account, credit_account, amount_nanos, kind, \
         account_id, memo, reference, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(transfer.debit.to_string())
    .bind(transfer.credit.to_string())
    .bind(transfer.amount.0)
    .bind(transfer.kind.as_str())
    .bind(account.to_string())
    .bind(memo)
    .bind(reference)
    .bind(millis(at))
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    add_spend(tx, spend_deltas([(transfer, account, at)])).await
}

/// Adds a transfer's charge to the account's monthly total, in its transaction.
async fn add_spend(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    deltas: Vec<(String, i64, i64)>,
) -> Result<(), StoreError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(UPSERT_SPEND);
    query.push_values(&deltas, |mut row, (account, month, charged)| {
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
    Ok(())
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        default_limit: u32,
    ) -> Result<InsertKeyOutcome, StoreError> {
        if insert_key_with(&self.pool, key, Some(default_limit)).await? {
            return Ok(InsertKeyOutcome::Inserted);
        }
        let limit: Option<i64> = sqlx::query_scalar("SELECT max_keys FROM accounts WHERE id = ?")
            .bind(key.account_id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?
            .flatten();
        let limit = limit.and_then(|n| u32::try_from(n).ok());
        Ok(InsertKeyOutcome::LimitReached {
            limit: limit.unwrap_or(default_limit),
        })
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError> {
        let current = sqlx::query_as::<_, KeyRow>(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"
        ))
        .bind(hash.0.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        if let Some(row) = current {
            return Ok(Some(self.lookup(row.try_into()?, None).await?));
        }
        let retired =
            sqlx::query("SELECT key_id, expires_at FROM retired_key_secrets WHERE key_hash = ?")
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
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"
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
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE (?1 IS NULL OR account_id = ?1) \
             AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3"
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
        // One conditional UPDATE decides the race: only the first revoke changes a row.
        let changed = sqlx::query(
            "UPDATE api_keys SET status = 'revoked', revoked_at = ? \
             WHERE id = ? AND status <> 'revoked'",
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
            "UPDATE api_keys SET name = ?, scopes = ?, allowed_ips = ?, expires_at = ?, \
             status = ?, monthly_spend_cap_nanos = ?, rate_limits = ? \
             WHERE id = ? AND status <> 'revoked'",
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
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        // Writing first takes SQLite's write lock, so the two statements see one state.
        let retired = sqlx::query(
            "INSERT INTO retired_key_secrets (key_hash, key_id, expires_at, retired_at) \
             SELECT key_hash, id, ?, ? FROM api_keys WHERE id = ? AND status <> 'revoked'",
        )
        .bind(millis(old_secret_expires_at))
        .bind(millis(at))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected();
        if retired == 1 {
            sqlx::query("UPDATE api_keys SET key_hash = ?, display_prefix = ? WHERE id = ?")
                .bind(new_hash.0.as_slice())
                .bind(display_prefix)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)?;
        self.key_change(id, retired == 1).await
    }
}

impl SqliteStore {
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
             LEFT JOIN subscriptions s ON s.account_id = a.id WHERE a.id = ?",
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
impl LedgerStore for SqliteStore {
    async fn ledger_balance(&self, account: AccountId) -> Result<Nanos, StoreError> {
        let wallet = LedgerAccount::Wallet(account).to_string();
        let sum: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(CASE WHEN credit_account = ?1 THEN amount_nanos ELSE 0 END) \
                           - SUM(CASE WHEN debit_account = ?1 THEN amount_nanos ELSE 0 END), 0) \
             FROM ledger_transfers WHERE account_id = ?2",
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
            "SELECT balance_nanos, held_nanos, debt_nanos FROM wallets WHERE account_id = ?",
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
            "SELECT COALESCE(SUM(charged_nanos), 0) FROM holds \
             WHERE key_id = ? AND resolved_at >= ?",
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
             WHERE s.account_id = w.account_id AND s.month_start = ?), 0) \
             FROM wallets w WHERE w.account_id = ?",
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
            "SELECT {HOLD_COLUMNS} FROM holds WHERE status = 'pending' AND expires_at <= ? \
             ORDER BY id"
        ))
        .bind(millis(cutoff))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn hold(&self, id: HoldId) -> Result<Option<HoldRecord>, StoreError> {
        let row =
            sqlx::query_as::<_, HoldRow>(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = ?"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        row.map(HoldRecord::try_from).transpose()
    }

    async fn commit(&self, batch: BatchId, writes: &[LedgerWrite]) -> Result<(), StoreError> {
        self.ledger.commit(batch, writes.to_vec()).await
    }

    async fn transfers(
        &self,
        account: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TransferRecord>, StoreError> {
        let rows = sqlx::query_as::<_, TransferRow>(
            "SELECT id, debit_account, credit_account, amount_nanos, kind, memo, reference, created_at \
             FROM ledger_transfers WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
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
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM ledger_transfers WHERE account_id = ? AND reference = ? LIMIT 1",
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
            "SELECT COALESCE(SUM(amount_nanos), 0) FROM ledger_transfers \
             WHERE account_id = ?1 AND substr(reference, 1, length(?2)) = ?2",
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
            "SELECT account, SUM(amount) FROM ( \
               SELECT credit_account AS account, amount_nanos AS amount FROM ledger_transfers \
               UNION ALL \
               SELECT debit_account, -amount_nanos FROM ledger_transfers) \
             GROUP BY account ORDER BY account",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn begin_idempotent(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<IdempotencyBegin, StoreError> {
        let now = millis(claim.now);
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        // The upsert takes the write lock, so the row read next is the one it decided on. It
        // replaces a row only when that row has expired or its owner's lease ran out.
        sqlx::query(
            "INSERT INTO idempotency_keys \
             (scope, key, fingerprint, owner, state, lease_until, expires_at, created_at) \
             VALUES (?1, ?2, ?3, ?4, 'in_flight', ?5, ?6, ?7) \
             ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
             owner = excluded.owner, state = 'in_flight', lease_until = excluded.lease_until, \
             expires_at = excluded.expires_at, created_at = excluded.created_at, \
             status = NULL, headers = NULL, body = NULL \
             WHERE idempotency_keys.expires_at <= ?7 \
             OR (idempotency_keys.state = 'in_flight' AND idempotency_keys.lease_until <= ?7)",
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
             FROM idempotency_keys WHERE scope = ? AND key = ?",
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
            "UPDATE idempotency_keys SET state = 'completed', status = ?, headers = ?, body = ? \
             WHERE scope = ? AND key = ? AND owner = ? AND state = 'in_flight'",
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
             WHERE scope = ? AND key = ? AND owner = ? AND state = 'in_flight'",
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
            "DELETE FROM idempotency_keys WHERE expires_at <= ?1 \
             AND (state = 'completed' OR lease_until <= ?1)",
        )
        .bind(millis(now))
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        // Batch ids only need to outlive the retries of their batch.
        let day_ago = millis(now) - 24 * 3600 * 1000;
        sqlx::query("DELETE FROM ledger_batches WHERE committed_at < ?")
            .bind(day_ago)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(purged)
    }
}

/// The last entry's number and hash, as the head row records them (`None`: empty log).
async fn read_audit_head<'e, E>(executor: E) -> Result<Option<(u64, [u8; 32])>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    sqlx::query_as::<_, AuditHeadRow>("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(executor)
        .await
        .map_err(store_error)?
        .head()
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditEntry, StoreError> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        // Writing first takes SQLite's write lock, so no other append reads the same head.
        sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1")
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        let entry = entry.seal(read_audit_head(&mut *tx).await?);
        let seq = i64::try_from(entry.seq).map_err(|_| corrupt("audit seq", "overflow"))?;
        sqlx::query(
            "INSERT INTO audit_log (seq, at, actor, action, target, request_id, before, after, \
             prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        sqlx::query("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1")
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
             FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        convert(rows)
    }

    async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        read_audit_head(&self.pool).await
    }
}

#[async_trait]
impl UsageStore for SqliteStore {
    async fn requests(&self, filter: &UsageFilter) -> Result<Vec<UsageRow>, StoreError> {
        let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
            "SELECT {USAGE_COLUMNS} FROM requests WHERE 1 = 1"
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
            UsageGroup::Day => "strftime('%Y-%m-%d', created_at / 1000, 'unixepoch')",
            UsageGroup::Key => "key_id",
            UsageGroup::Route => "route",
            UsageGroup::Model => "COALESCE(model, '')",
        };
        let rows = sqlx::query_as::<_, BucketRow>(&format!(
            "SELECT {group} AS grp, COUNT(*) AS requests, \
             SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors, \
             COALESCE(SUM(input_tokens), 0) AS input_tokens, \
             COALESCE(SUM(cached_input_tokens), 0) AS cached_input_tokens, \
             COALESCE(SUM(output_tokens), 0) AS output_tokens, \
             COALESCE(SUM(cost_nanos), 0) AS cost_nanos \
             FROM requests WHERE account_id = ?1 \
             AND (?2 IS NULL OR created_at >= ?2) AND (?3 IS NULL OR created_at < ?3) \
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
            "SELECT slot_start AS slot, {} AS grp, SUM(requests) AS requests, \
             SUM(errors) AS errors, SUM(input_tokens) AS input_tokens, \
             SUM(cached_input_tokens) AS cached_input_tokens, \
             SUM(output_tokens) AS output_tokens, SUM(cost_nanos) AS cost_nanos \
             FROM usage_slots WHERE account_id = ?1 AND slot_start >= ?2 AND slot_start < ?3 \
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
        let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT k.id AS id, (SELECT COALESCE(SUM(h.charged_nanos), 0) FROM holds h \
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
            "SELECT id, spent, NULL AS last_used FROM ( \
             SELECT k.id AS id, k.monthly_spend_cap_nanos AS cap, \
             (SELECT COALESCE(SUM(h.charged_nanos), 0) FROM holds h \
              WHERE h.key_id = k.id AND h.resolved_at >= ?2) AS spent \
             FROM api_keys k WHERE k.account_id = ?1 AND k.monthly_spend_cap_nanos IS NOT NULL \
             AND k.status <> 'revoked') \
             WHERE spent * 100 >= cap * ?3 ORDER BY id LIMIT ?4",
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
            "SELECT COUNT(*), COALESCE(SUM(charged_nanos), 0) FROM holds \
             WHERE account_id = ?1 AND source = 'api' AND status = 'settled' \
             AND (?2 IS NULL OR resolved_at >= ?2) AND (?3 IS NULL OR resolved_at < ?3)",
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
            "SELECT {USAGE_COLUMNS} FROM requests WHERE request_id = ?"
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
        sqlx::query("DELETE FROM usage_slots WHERE slot_start <= ?")
            .bind(millis(cutoff) - slot)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(sqlx::query("DELETE FROM requests WHERE created_at < ?")
            .bind(millis(cutoff))
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected())
    }
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, key_id, created_at, last_seen_at) \
             VALUES (?, ?, ?, ?)",
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
            "SELECT key_id, created_at, last_seen_at FROM console_sessions WHERE id_hash = ?",
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
            "UPDATE console_sessions SET last_seen_at = ? \
             WHERE id_hash = ? AND last_seen_at < ?",
        )
        .bind(millis(at))
        .bind(id_hash.to_vec())
        .bind(millis(at))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn end_session(&self, id_hash: &[u8; 32]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_sessions WHERE id_hash = ?")
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
            sqlx::query("DELETE FROM console_sessions WHERE last_seen_at < ? OR created_at < ?")
                .bind(millis(idle_cutoff))
                .bind(millis(absolute_cutoff))
                .execute(&self.pool)
                .await
                .map_err(store_error)?
                .rows_affected(),
        )
    }
}

/// The embedded store belongs to one node, which invalidates its own caches.
impl ChangeFeed for SqliteStore {}

impl Sharing for SqliteStore {}

#[async_trait]
impl StoreHealth for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

#[async_trait]
impl PaymentStore for SqliteStore {
    async fn create_topup(&self, topup: &TopUp) -> Result<bool, StoreError> {
        let inserted = sqlx::query(&format!(
            "INSERT INTO topups ({TOPUP_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
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
            sqlx::query_as(&format!("SELECT {TOPUP_COLUMNS} FROM topups WHERE id = ?1"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        row.map(TopUp::try_from).transpose()
    }

    async fn topup_by_provider_id(&self, provider_id: &str) -> Result<Option<TopUp>, StoreError> {
        let row: Option<TopUpRow> = sqlx::query_as(&format!(
            "SELECT {TOPUP_COLUMNS} FROM topups \
             WHERE checkout_session = ?1 OR payment_intent = ?1 LIMIT 1"
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
            "SELECT {TOPUP_COLUMNS} FROM topups WHERE account_id = ?1 \
             AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
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
            "UPDATE topups SET checkout_session = ?1, checkout_url = ?2, updated_at = ?3 \
             WHERE id = ?4",
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
            "UPDATE topups SET status = ?1, payment_intent = COALESCE(payment_intent, ?2), \
             failure = COALESCE(failure, ?3), updated_at = ?4 \
             WHERE id = ?5 AND status IN ({})",
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
            "UPDATE topups SET dispute = ?1, updated_at = ?2 WHERE id = ?3 AND \
             (dispute IS NULL OR (?1 <> 'open' AND dispute = 'open'))",
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
            "UPDATE topups SET review = COALESCE(review, ?1), updated_at = ?2 WHERE id = ?3",
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
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
            sqlx::query_scalar("SELECT handled_at FROM payment_events WHERE id = ?1")
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
            "UPDATE payment_events SET handled_at = COALESCE(handled_at, ?1), outcome = ?2 \
             WHERE id = ?3",
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
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (account_id) DO UPDATE SET \
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
             enabled, disabled_reason, updated_at) VALUES (?1, ?2, ?3, ?4, 1, NULL, ?5) \
             ON CONFLICT (account_id) DO UPDATE SET threshold_nanos = excluded.threshold_nanos, \
             amount_nanos = excluded.amount_nanos, max_per_month = excluded.max_per_month, \
             enabled = 1, disabled_reason = NULL, updated_at = excluded.updated_at",
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
            "SELECT {AUTO_TOPUP_COLUMNS} FROM auto_topups WHERE account_id = ?1"
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
            "UPDATE auto_topups SET enabled = 0, disabled_reason = ?1, updated_at = ?2 \
             WHERE account_id = ?3",
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
            "SELECT COUNT(*) FROM topups WHERE account_id = ?1 AND origin = 'auto' \
             AND created_at >= ?2",
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
             WHERE handled_at IS NULL AND (topup_id = ?1 OR payment_intent = ?2) \
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
impl UnitStore for SqliteStore {
    async fn subscription(&self, account: AccountId) -> Result<Option<Subscription>, StoreError> {
        let row: Option<SubscriptionRow> = sqlx::query_as(
            "SELECT plan, status, since, started_at FROM subscriptions WHERE account_id = ?",
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
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET plan = excluded.plan, \
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
        let mut tx = self.pool.begin().await.map_err(store_error)?;
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
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        // The plan's own buckets first, created or raised, in lock order (on SQLite the first
        // write takes the write lock: what follows reads one state).
        for own in ask.own_buckets() {
            let rollover = ask
                .rollover
                .as_ref()
                .filter(|_| own.bucket == ask.allowance.bucket);
            open_bucket(&mut tx, own, rollover, ask.at).await?;
        }
        let names: Vec<&str> = ask
            .own_buckets()
            .iter()
            .map(|b| b.bucket.as_str())
            .collect();
        let placeholders = vec!["?"; names.len()].join(", ");
        let sql = format!(
            "SELECT {UNIT_BUCKET_COLUMNS} FROM unit_buckets WHERE account_id = ? \
             AND (bucket IN ({placeholders}) OR (source = 'pack' AND meter = ? AND ends_at > ? \
             AND used + held < granted))"
        );
        let mut query = sqlx::query_as(&sql).bind(account.to_string());
        for name in &names {
            query = query.bind(*name);
        }
        let candidates: Vec<UnitBucketRow> = query
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
            sqlx::query(
                "UPDATE unit_buckets SET held = held + ? WHERE account_id = ? AND bucket = ?",
            )
            .bind(rows::units(*held))
            .bind(account.to_string())
            .bind(bucket)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
            sqlx::query(
                "INSERT INTO unit_draws (request_id, position, account_id, bucket, units, expires_at, mirror) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&reference)
            .bind(position as i64)
            .bind(account.to_string())
            .bind(bucket)
            .bind(rows::units(*held))
            .bind(millis(ask.expires_at))
            .bind(mirror)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
            unit_entry(
                &mut tx,
                account,
                bucket,
                "hold",
                *held,
                Some(&reference),
                ask.at,
            )
            .await?;
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
        let mut tx = self.pool.begin().await.map_err(store_error)?;
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
        let mut tx = self.pool.begin().await.map_err(store_error)?;
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
            "SELECT {UNIT_BUCKET_COLUMNS} FROM unit_buckets WHERE account_id = ? \
             AND starts_at <= ? AND ends_at > ? ORDER BY source, ends_at, bucket"
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
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let used: Option<i64> = sqlx::query_scalar(
            "UPDATE unit_buckets SET used = used WHERE account_id = ? AND bucket = ? RETURNING used",
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
            "SELECT id FROM unit_entries WHERE account_id = ? AND reference = ? AND kind = 'reset'",
        )
        .bind(account.to_string())
        .bind(reference)
        .fetch_optional(&mut *tx)
        .await
        .map_err(store_error)?;
        if done.is_some() {
            return Ok(Some(false));
        }
        sqlx::query("UPDATE unit_buckets SET used = 0 WHERE account_id = ? AND bucket = ?")
            .bind(account.to_string())
            .bind(bucket)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        // A reset of nothing is recorded too, so its reference is spent.
        sqlx::query(
            "INSERT INTO unit_entries (account_id, bucket, kind, units, reference, at) \
             VALUES (?, ?, 'reset', ?, ?, ?)",
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
            sqlx::query_as(&units::ENTRY_SUMS.replace("{account}", "?"))
                .bind(account.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
        Ok(units::sums(rows))
    }
}

/// Writes a new bucket; `false` if the account has one of that name.
async fn insert_bucket(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    bucket: &UnitBucket,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(&format!(
        "INSERT INTO unit_buckets ({UNIT_BUCKET_COLUMNS}, base) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 0, ?7, ?8, ?6) \
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
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
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
        "SELECT granted - used - held FROM unit_buckets WHERE account_id = ? AND bucket = ?",
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
            "UPDATE unit_buckets SET granted = granted + ? WHERE account_id = ? AND bucket = ?",
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
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    bucket: &UnitBucket,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let base: i64 =
        sqlx::query_scalar("SELECT base FROM unit_buckets WHERE account_id = ? AND bucket = ?")
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
        "UPDATE unit_buckets SET granted = granted + ?, base = ? WHERE account_id = ? AND bucket = ?",
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
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
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
         VALUES (?, ?, ?, ?, ?, ?)",
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
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    of: DrawsOf<'_>,
) -> Result<Vec<units::Draw>, StoreError> {
    const RETURNING: &str = "RETURNING request_id, position, account_id, bucket, units, mirror";
    let sql = match of {
        DrawsOf::Request(_) => format!("DELETE FROM unit_draws WHERE request_id = ? {RETURNING}"),
        DrawsOf::ExpiredBy(_) => {
            format!("DELETE FROM unit_draws WHERE expires_at <= ? {RETURNING}")
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
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    account: AccountId,
    bucket: &str,
    used: u64,
    returned: u64,
    kind: &str,
    reference: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE unit_buckets SET held = held - ?, used = used + ? WHERE account_id = ? AND bucket = ?",
    )
    .bind(rows::units(used + returned))
    .bind(rows::units(used))
    .bind(account.to_string())
    .bind(bucket)
    .execute(&mut **tx)
    .await
    .map_err(store_error)?;
    unit_entry(tx, account, bucket, "use", used, Some(reference), at).await?;
    unit_entry(tx, account, bucket, kind, returned, Some(reference), at).await
}
