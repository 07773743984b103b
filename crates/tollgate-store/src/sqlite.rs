//! The embedded default: one SQLite file in WAL mode, migrations applied at open.

use crate::{
    Account, AccountStore, AuditStore, HoldRecord, HoldSource, IdempotencyBegin, IdempotencyClaim,
    IdempotencyStore, InsertKeyOutcome, KeyChange, KeyLookup, KeyRecord, KeyStore, LedgerStore,
    LedgerWrite, RevokeOutcome, StoreError, StoreHealth, StoredResponse, TransferRecord,
    UsageBucket, UsageFilter, UsageGroup, UsageRow, UsageStore,
};
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use tollgate_core::audit::AuditEntry;
use tollgate_core::ledger::{
    BillingStatus, Hold, HoldStatus, LedgerAccount, Transfer, TransferKind, Wallet,
};
use tollgate_core::metering::TokenUsage;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::{AccountId, HoldId, KeyHash, KeyId, KeyKind, KeyStatus, Nanos, RequestId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
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
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")))?;
        Ok(SqliteStore { pool })
    }

    /// Applies pending migrations and reports how many the database now has.
    pub async fn migrate(path: &Path) -> Result<usize, StoreError> {
        let store = SqliteStore::open(path).await?;
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&store.pool)
            .await
            .map_err(unavailable)?;
        Ok(applied as usize)
    }

    /// Closes the pool; the file is consistent afterwards.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn from_millis(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value:?}"))
}

const KEY_COLUMNS: &str = "id, account_id, key_hash, display_prefix, kind, status, name, scopes, \
                           allowed_ips, expires_at, monthly_spend_cap_nanos, created_at, revoked_at, \
                           rate_limits";

fn key_from_row(row: &SqliteRow) -> Result<KeyRecord, StoreError> {
    let get_text = |col: &str| row.try_get::<String, _>(col).map_err(unavailable);
    let id = get_text("id")?;
    let account_id = get_text("account_id")?;
    let hash: Vec<u8> = row.try_get("key_hash").map_err(unavailable)?;
    let kind = get_text("kind")?;
    let status = get_text("status")?;
    let scopes = get_text("scopes")?;
    let allowed_ips = get_text("allowed_ips")?;
    let rate_limits = get_text("rate_limits")?;
    let expires_at: Option<i64> = row.try_get("expires_at").map_err(unavailable)?;
    let revoked_at: Option<i64> = row.try_get("revoked_at").map_err(unavailable)?;
    let cap: Option<i64> = row
        .try_get("monthly_spend_cap_nanos")
        .map_err(unavailable)?;
    Ok(KeyRecord {
        id: KeyId::from_str(&id).map_err(|_| corrupt("key id", &id))?,
        account_id: AccountId::from_str(&account_id)
            .map_err(|_| corrupt("account id", &account_id))?,
        hash: KeyHash(hash.try_into().map_err(|_| corrupt("key hash", &id))?),
        display_prefix: get_text("display_prefix")?,
        kind: KeyKind::parse(&kind).ok_or_else(|| corrupt("key kind", &kind))?,
        status: KeyStatus::parse(&status).ok_or_else(|| corrupt("key status", &status))?,
        name: get_text("name")?,
        scopes: serde_json::from_str(&scopes).map_err(|_| corrupt("key scopes", &scopes))?,
        allowed_ips: serde_json::from_str(&allowed_ips)
            .map_err(|_| corrupt("key allowed_ips", &allowed_ips))?,
        expires_at: expires_at.map(from_millis).transpose()?,
        monthly_spend_cap: cap.map(Nanos),
        rate_limits: serde_json::from_str(&rate_limits)
            .map_err(|_| corrupt("key rate_limits", &rate_limits))?,
        created_at: from_millis(row.try_get("created_at").map_err(unavailable)?)?,
        revoked_at: revoked_at.map(from_millis).transpose()?,
    })
}

const ACCOUNT_SELECT: &str =
    "SELECT a.id, a.name, a.status, a.created_at, a.max_keys, a.rate_limits, w.balance_nanos \
     FROM accounts a JOIN wallets w ON w.account_id = a.id";

fn account_from_row(row: &SqliteRow) -> Result<Account, StoreError> {
    let id: String = row.try_get("id").map_err(unavailable)?;
    let rate_limits: String = row.try_get("rate_limits").map_err(unavailable)?;
    Ok(Account {
        id: parse_id("account id", &id)?,
        name: row.try_get("name").map_err(unavailable)?,
        status: row.try_get("status").map_err(unavailable)?,
        balance: Nanos(row.try_get("balance_nanos").map_err(unavailable)?),
        max_keys: row
            .try_get::<Option<i64>, _>("max_keys")
            .map_err(unavailable)?
            .map(|n| u32::try_from(n).map_err(|_| corrupt("max_keys", &n.to_string())))
            .transpose()?,
        rate_limits: serde_json::from_str(&rate_limits)
            .map_err(|_| corrupt("account rate_limits", &rate_limits))?,
        created_at: from_millis(row.try_get("created_at").map_err(unavailable)?)?,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("to JSON: {e}")))
}

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
    .map_err(unavailable)?
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
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO accounts (id, name, status, created_at) VALUES (?, ?, 'active', ?)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(millis(at))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("INSERT INTO wallets (account_id, balance_nanos) VALUES (?, ?)")
            .bind(id.to_string())
            .bind(starter_credits.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
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
        tx.commit().await.map_err(unavailable)?;
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
        let row = sqlx::query(&format!("{ACCOUNT_SELECT} WHERE a.id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(account_from_row).transpose()
    }

    async fn accounts(
        &self,
        after: Option<AccountId>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query(&format!(
            "{ACCOUNT_SELECT} WHERE (?1 IS NULL OR a.id > ?1) AND (?2 IS NULL OR a.status = ?2) \
             ORDER BY a.id LIMIT ?3"
        ))
        .bind(after.map(|id| id.to_string()))
        .bind(status)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(account_from_row).collect()
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
        .map_err(unavailable)?;
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
    .map_err(unavailable)?;
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
            .map_err(unavailable)?
            .flatten();
        let limit = limit.and_then(|n| u32::try_from(n).ok());
        Ok(InsertKeyOutcome::LimitReached {
            limit: limit.unwrap_or(default_limit),
        })
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError> {
        let current = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"
        ))
        .bind(hash.0.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        if let Some(row) = current {
            return Ok(Some(self.lookup(key_from_row(&row)?, None).await?));
        }
        let retired =
            sqlx::query("SELECT key_id, expires_at FROM retired_key_secrets WHERE key_hash = ?")
                .bind(hash.0.as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        let Some(retired) = retired else {
            return Ok(None);
        };
        let key_id: String = retired.try_get("key_id").map_err(unavailable)?;
        let key_id = parse_id("key id", &key_id)?;
        let expires_at = from_millis(retired.try_get("expires_at").map_err(unavailable)?)?;
        let Some(key) = self.key_by_id(key_id).await? else {
            return Ok(None);
        };
        Ok(Some(self.lookup(key, Some(expires_at)).await?))
    }

    async fn key_by_id(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn keys(
        &self,
        account: Option<AccountId>,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE (?1 IS NULL OR account_id = ?1) \
             AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3"
        ))
        .bind(account.map(|a| a.to_string()))
        .bind(after.map(|k| k.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(key_from_row).collect()
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
        .map_err(unavailable)?
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
        .map_err(unavailable)?
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
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
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
        .map_err(unavailable)?
        .rows_affected();
        if retired == 1 {
            sqlx::query("UPDATE api_keys SET key_hash = ?, display_prefix = ? WHERE id = ?")
                .bind(new_hash.0.as_slice())
                .bind(display_prefix)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
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
        let row = sqlx::query("SELECT status, rate_limits FROM accounts WHERE id = ?")
            .bind(key.account_id.to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        let status: String = row.try_get("status").map_err(unavailable)?;
        let overrides: String = row.try_get("rate_limits").map_err(unavailable)?;
        Ok(KeyLookup {
            key,
            secret_expires_at,
            account_rate_limits: serde_json::from_str(&overrides)
                .map_err(|_| corrupt("account rate_limits", &overrides))?,
            account_suspended: status == "suspended",
        })
    }

    async fn key_change(&self, id: KeyId, changed: bool) -> Result<KeyChange, StoreError> {
        Ok(match self.key_by_id(id).await? {
            None => KeyChange::NotFound,
            Some(key) if changed => KeyChange::Changed(key),
            Some(key) => KeyChange::Revoked(key),
        })
    }
}

/// Rows per multi-row INSERT: well inside SQLite's limit of 32766 bound parameters.
const ROWS_PER_INSERT: usize = 500;

const HOLD_COLUMNS: &str = "id, account_id, key_id, source, request_id, amount_nanos, \
                            charged_nanos, status, metadata, created_at, expires_at, resolved_at";

fn parse_id<T: FromStr>(what: &str, text: &str) -> Result<T, StoreError> {
    T::from_str(text).map_err(|_| corrupt(what, text))
}

fn hold_from_row(row: &SqliteRow) -> Result<HoldRecord, StoreError> {
    let text = |col: &str| row.try_get::<String, _>(col).map_err(unavailable);
    let opt_text = |col: &str| row.try_get::<Option<String>, _>(col).map_err(unavailable);
    let int = |col: &str| row.try_get::<i64, _>(col).map_err(unavailable);
    let status = text("status")?;
    let source = text("source")?;
    let metadata = text("metadata")?;
    let resolved_at: Option<i64> = row.try_get("resolved_at").map_err(unavailable)?;
    Ok(HoldRecord {
        hold: Hold {
            id: parse_id("hold id", &text("id")?)?,
            account: parse_id("account id", &text("account_id")?)?,
            key: opt_text("key_id")?
                .map(|k| parse_id("key id", &k))
                .transpose()?,
            amount: Nanos(int("amount_nanos")?),
            created_at: from_millis(int("created_at")?)?,
            expires_at: from_millis(int("expires_at")?)?,
            status: HoldStatus::parse(&status).ok_or_else(|| corrupt("hold status", &status))?,
            charged: Nanos(int("charged_nanos")?),
            resolved_at: resolved_at.map(from_millis).transpose()?,
        },
        source: match source.as_str() {
            "request" => HoldSource::Request,
            "api" => HoldSource::Api,
            _ => return Err(corrupt("hold source", &source)),
        },
        request_id: opt_text("request_id")?
            .map(|r| parse_id("request id", &r))
            .transpose()?,
        metadata: serde_json::from_str(&metadata).map_err(|_| corrupt("metadata", &metadata))?,
    })
}

/// How a transfer moves an account's cached (available, held) balances.
fn wallet_deltas(transfer: &Transfer, deltas: &mut HashMap<AccountId, (i64, i64)>) {
    let amount = transfer.amount.0;
    for (side, sign) in [(transfer.debit, -1), (transfer.credit, 1)] {
        match side {
            LedgerAccount::Wallet(a) => deltas.entry(a).or_default().0 += sign * amount,
            LedgerAccount::Holds(a) => deltas.entry(a).or_default().1 += sign * amount,
            LedgerAccount::External | LedgerAccount::Revenue => {}
        }
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
        .map_err(unavailable)?;
        Ok(Nanos(sum))
    }

    async fn wallet(&self, account: AccountId) -> Result<Option<Wallet>, StoreError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT balance_nanos, held_nanos FROM wallets WHERE account_id = ?")
                .bind(account.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(row.map(|(available, held)| Wallet {
            available: Nanos(available),
            held: Nanos(held),
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
        .map_err(unavailable)?;
        Ok(Nanos(sum))
    }

    async fn account_spent_since(
        &self,
        account: AccountId,
        since: DateTime<Utc>,
    ) -> Result<Nanos, StoreError> {
        let sum: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(amount_nanos), 0) FROM ledger_transfers \
             WHERE account_id = ? AND kind = 'charge' AND created_at >= ?",
        )
        .bind(account.to_string())
        .bind(millis(since))
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(Nanos(sum))
    }

    async fn pending_holds(&self) -> Result<Vec<HoldRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {HOLD_COLUMNS} FROM holds WHERE status = 'pending' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(hold_from_row).collect()
    }

    async fn hold(&self, id: HoldId) -> Result<Option<HoldRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(hold_from_row).transpose()
    }

    async fn commit(&self, writes: &[LedgerWrite]) -> Result<(), StoreError> {
        // A batch becomes a handful of multi-row statements: per-statement overhead, not the
        // disk, is what limits SQLite here. A hold opened and resolved in the same batch (the
        // common case) is inserted once, already resolved.
        let resolved_here: HashMap<HoldId, &Hold> = writes
            .iter()
            .filter_map(|w| match w {
                LedgerWrite::ResolveHold { hold, .. } => Some((hold.id, hold)),
                _ => None,
            })
            .collect();
        let mut opened_here: std::collections::HashSet<HoldId> = Default::default();
        let mut holds: Vec<(&HoldRecord, &Hold)> = Vec::new();
        let mut transfers: Vec<(&Transfer, AccountId, &str, String, DateTime<Utc>)> = Vec::new();
        let mut resolutions: Vec<&Hold> = Vec::new();
        let mut usage: Vec<&UsageRow> = Vec::new();
        let mut deltas: HashMap<AccountId, (i64, i64)> = HashMap::new();
        for write in writes {
            match write {
                LedgerWrite::Grant {
                    account,
                    transfer,
                    memo,
                    reference,
                    at,
                } => transfers.push((transfer, *account, memo, reference.clone(), *at)),
                LedgerWrite::OpenHold { record, transfer } => {
                    let hold = &record.hold;
                    let state = resolved_here.get(&hold.id).copied().unwrap_or(hold);
                    opened_here.insert(hold.id);
                    holds.push((record, state));
                    if let Some(transfer) = transfer {
                        let at = hold.created_at;
                        transfers.push((transfer, hold.account, "", hold.id.to_string(), at));
                    }
                }
                LedgerWrite::ResolveHold {
                    hold,
                    transfers: moved,
                } => {
                    if !opened_here.contains(&hold.id) {
                        resolutions.push(hold);
                    }
                    let at = hold.resolved_at.unwrap_or(hold.created_at);
                    for transfer in moved {
                        transfers.push((transfer, hold.account, "", hold.id.to_string(), at));
                    }
                }
                LedgerWrite::Usage(row) => usage.push(row),
            }
        }
        for (transfer, ..) in &transfers {
            wallet_deltas(transfer, &mut deltas);
        }

        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for chunk in holds.chunks(ROWS_PER_INSERT) {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
                "INSERT INTO holds ({HOLD_COLUMNS}) "
            ));
            query.push_values(chunk, |mut row, (record, state)| {
                let hold = &record.hold;
                row.push_bind(hold.id.to_string())
                    .push_bind(hold.account.to_string())
                    .push_bind(hold.key.map(|k| k.to_string()))
                    .push_bind(record.source.as_str())
                    .push_bind(record.request_id.map(|r| r.to_string()))
                    .push_bind(hold.amount.0)
                    .push_bind(state.charged.0)
                    .push_bind(state.status.as_str())
                    .push_bind(record.metadata.to_string())
                    .push_bind(millis(hold.created_at))
                    .push_bind(millis(hold.expires_at))
                    .push_bind(state.resolved_at.map(millis));
            });
            query.build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        for hold in resolutions {
            let changed = sqlx::query(
                "UPDATE holds SET status = ?, charged_nanos = ?, resolved_at = ? \
                 WHERE id = ? AND status = 'pending'",
            )
            .bind(hold.status.as_str())
            .bind(hold.charged.0)
            .bind(hold.resolved_at.map(millis))
            .bind(hold.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
            if changed != 1 {
                return Err(StoreError::Corrupt(format!(
                    "hold {} is not pending; it cannot be resolved again",
                    hold.id
                )));
            }
        }
        for chunk in transfers.chunks(ROWS_PER_INSERT) {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
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
                        .push_bind(*memo)
                        .push_bind(reference.as_str())
                        .push_bind(millis(*at));
                },
            );
            query.build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        for chunk in usage.chunks(ROWS_PER_INSERT / 2) {
            insert_usage(&mut tx, chunk).await?;
        }
        // One update per account per batch.
        for (account, (available, held)) in deltas {
            if available == 0 && held == 0 {
                continue;
            }
            sqlx::query(
                "UPDATE wallets SET balance_nanos = balance_nanos + ?, held_nanos = held_nanos + ? \
                 WHERE account_id = ?",
            )
            .bind(available)
            .bind(held)
            .bind(account.to_string())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn transfers(
        &self,
        account: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TransferRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, debit_account, credit_account, amount_nanos, kind, memo, reference, created_at \
             FROM ledger_transfers WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
        )
        .bind(account.to_string())
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                Ok(TransferRecord {
                    seq: row.try_get("id").map_err(unavailable)?,
                    debit: row.try_get("debit_account").map_err(unavailable)?,
                    credit: row.try_get("credit_account").map_err(unavailable)?,
                    amount: Nanos(row.try_get("amount_nanos").map_err(unavailable)?),
                    kind: row.try_get("kind").map_err(unavailable)?,
                    memo: row.try_get("memo").map_err(unavailable)?,
                    reference: row.try_get("reference").map_err(unavailable)?,
                    created_at: from_millis(row.try_get("created_at").map_err(unavailable)?)?,
                })
            })
            .collect()
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
        .map_err(unavailable)
    }
}

const USAGE_COLUMNS: &str = "request_id, client_request_id, account_id, key_id, route, model, \
    method, path, status, upstream_status, units, input_tokens, cached_input_tokens, \
    output_tokens, cost_nanos, hold_nanos, hold_id, billing_status, latency_ms, error_code, \
    created_at, completed_at";

async fn insert_usage(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    rows: &[&UsageRow],
) -> Result<(), StoreError> {
    let mut query =
        sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!("INSERT INTO requests ({USAGE_COLUMNS}) "));
    query.push_values(rows, |mut out, row| {
        let tokens = row.tokens;
        out.push_bind(row.request_id.to_string())
            .push_bind(row.client_request_id.clone())
            .push_bind(row.account_id.to_string())
            .push_bind(row.key_id.to_string())
            .push_bind(row.route.clone())
            .push_bind(row.model.clone())
            .push_bind(row.method.clone())
            .push_bind(row.path.clone())
            .push_bind(i64::from(row.status))
            .push_bind(row.upstream_status.map(i64::from))
            .push_bind(row.units.clone())
            .push_bind(tokens.map(|t| t.input as i64))
            .push_bind(tokens.map(|t| t.cached_input as i64))
            .push_bind(tokens.map(|t| t.output as i64))
            .push_bind(row.cost.0)
            .push_bind(row.hold.0)
            .push_bind(row.hold_id.map(|h| h.to_string()))
            .push_bind(row.billing_status.as_str())
            .push_bind(i64::try_from(row.latency_ms).unwrap_or(i64::MAX))
            .push_bind(row.error_code.clone())
            .push_bind(millis(row.created_at))
            .push_bind(millis(row.completed_at));
    });
    query
        .build()
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(())
}

fn usage_from_row(row: &SqliteRow) -> Result<UsageRow, StoreError> {
    let text = |col: &str| row.try_get::<String, _>(col).map_err(unavailable);
    let opt_text = |col: &str| row.try_get::<Option<String>, _>(col).map_err(unavailable);
    let int = |col: &str| row.try_get::<i64, _>(col).map_err(unavailable);
    let opt_int = |col: &str| row.try_get::<Option<i64>, _>(col).map_err(unavailable);
    let status = text("billing_status")?;
    let tokens = match (
        opt_int("input_tokens")?,
        opt_int("cached_input_tokens")?,
        opt_int("output_tokens")?,
    ) {
        (Some(input), cached, Some(output)) => Some(TokenUsage {
            input: input as u64,
            cached_input: cached.unwrap_or(0) as u64,
            output: output as u64,
        }),
        _ => None,
    };
    Ok(UsageRow {
        request_id: parse_id("request id", &text("request_id")?)?,
        client_request_id: opt_text("client_request_id")?,
        account_id: parse_id("account id", &text("account_id")?)?,
        key_id: parse_id("key id", &text("key_id")?)?,
        route: text("route")?,
        model: opt_text("model")?,
        method: text("method")?,
        path: text("path")?,
        status: int("status")? as u16,
        upstream_status: opt_int("upstream_status")?.map(|s| s as u16),
        units: opt_text("units")?,
        tokens,
        cost: Nanos(int("cost_nanos")?),
        hold: Nanos(int("hold_nanos")?),
        hold_id: opt_text("hold_id")?
            .map(|h| parse_id("hold id", &h))
            .transpose()?,
        billing_status: BillingStatus::parse(&status)
            .ok_or_else(|| corrupt("billing status", &status))?,
        latency_ms: int("latency_ms")? as u64,
        error_code: opt_text("error_code")?,
        created_at: from_millis(int("created_at")?)?,
        completed_at: from_millis(int("completed_at")?)?,
    })
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn begin_idempotent(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<IdempotencyBegin, StoreError> {
        let now = millis(claim.now);
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
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
        .map_err(unavailable)?;
        let row = sqlx::query(
            "SELECT fingerprint, owner, state, lease_until, status, headers, body \
             FROM idempotency_keys WHERE scope = ? AND key = ?",
        )
        .bind(&claim.scope)
        .bind(&claim.key)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        let owner: String = row.try_get("owner").map_err(unavailable)?;
        let owner: RequestId = parse_id("idempotency owner", &owner)?;
        if owner == claim.owner {
            return Ok(IdempotencyBegin::Started);
        }
        let fingerprint: Vec<u8> = row.try_get("fingerprint").map_err(unavailable)?;
        if fingerprint != claim.fingerprint {
            return Ok(IdempotencyBegin::Mismatch);
        }
        let state: String = row.try_get("state").map_err(unavailable)?;
        if state == "in_flight" {
            return Ok(IdempotencyBegin::InFlight {
                owner,
                lease_until: from_millis(row.try_get("lease_until").map_err(unavailable)?)?,
            });
        }
        let status: i64 = row.try_get("status").map_err(unavailable)?;
        let headers: String = row.try_get("headers").map_err(unavailable)?;
        Ok(IdempotencyBegin::Completed {
            owner,
            response: StoredResponse {
                status: u16::try_from(status)
                    .map_err(|_| corrupt("idempotency status", &status.to_string()))?,
                headers: serde_json::from_str(&headers)
                    .map_err(|_| corrupt("idempotency headers", &headers))?,
                body: row.try_get("body").map_err(unavailable)?,
            },
        })
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
        .map_err(unavailable)?;
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
        .map_err(unavailable)?;
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
        .map_err(unavailable)?
        .rows_affected();
        Ok(purged)
    }
}

fn hash32(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

/// The last entry's number and hash, as the head row records them (`None`: empty log).
async fn read_audit_head<'e, E>(executor: E) -> Result<Option<(u64, [u8; 32])>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(executor)
        .await
        .map_err(unavailable)?;
    let seq: i64 = row.try_get("seq").map_err(unavailable)?;
    let hash = hash32(row.try_get("hash").map_err(unavailable)?, "audit head")?;
    Ok(u64::try_from(seq)
        .ok()
        .filter(|&seq| seq > 0)
        .map(|seq| (seq, hash)))
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditEntry, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // Writing first takes SQLite's write lock, so no other append reads the same head.
        sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
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
        .map_err(unavailable)?;
        sqlx::query("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1")
            .bind(seq)
            .bind(entry.hash.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(entry)
    }

    async fn audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, request_id, before, after, prev_hash, hash \
             FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("seq").map_err(unavailable)?;
                Ok(AuditEntry {
                    seq: u64::try_from(seq).map_err(|_| corrupt("audit seq", &seq.to_string()))?,
                    at: from_millis(row.try_get("at").map_err(unavailable)?)?,
                    actor: row.try_get("actor").map_err(unavailable)?,
                    action: row.try_get("action").map_err(unavailable)?,
                    target: row.try_get("target").map_err(unavailable)?,
                    request_id: row.try_get("request_id").map_err(unavailable)?,
                    before: row.try_get("before").map_err(unavailable)?,
                    after: row.try_get("after").map_err(unavailable)?,
                    prev_hash: hash32(row.try_get("prev_hash").map_err(unavailable)?, "prev_hash")?,
                    hash: hash32(row.try_get("hash").map_err(unavailable)?, "hash")?,
                })
            })
            .collect()
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
        if let Some(account) = filter.account {
            query
                .push(" AND account_id = ")
                .push_bind(account.to_string());
        }
        if let Some(key) = filter.key {
            query.push(" AND key_id = ").push_bind(key.to_string());
        }
        if let Some(route) = &filter.route {
            query.push(" AND route = ").push_bind(route.clone());
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(i64::from(status));
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
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(usage_from_row).collect()
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
        let rows = sqlx::query(&format!(
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
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let count = |col: &str| -> Result<u64, StoreError> {
                    let n: i64 = row.try_get(col).map_err(unavailable)?;
                    u64::try_from(n).map_err(|_| corrupt(col, &n.to_string()))
                };
                Ok(UsageBucket {
                    group: row.try_get("grp").map_err(unavailable)?,
                    requests: count("requests")?,
                    errors: count("errors")?,
                    input_tokens: count("input_tokens")?,
                    cached_input_tokens: count("cached_input_tokens")?,
                    output_tokens: count("output_tokens")?,
                    cost: Nanos(row.try_get("cost_nanos").map_err(unavailable)?),
                })
            })
            .collect()
    }

    async fn request(&self, id: RequestId) -> Result<Option<UsageRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {USAGE_COLUMNS} FROM requests WHERE request_id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(usage_from_row).transpose()
    }

    async fn purge_requests_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM requests WHERE created_at < ?")
            .bind(millis(cutoff))
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected())
    }
}

#[async_trait]
impl StoreHealth for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}
