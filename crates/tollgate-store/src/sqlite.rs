//! The embedded default: one SQLite file in WAL mode, migrations applied at open.

use crate::{
    ledger_account, Account, AccountStore, KeyRecord, KeyStore, LedgerStore, RevokeOutcome,
    StoreError, StoreHealth,
};
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use tollgate_core::{AccountId, KeyHash, KeyId, KeyKind, KeyStatus, Nanos};

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
                           expires_at, created_at, revoked_at";

fn key_from_row(row: &SqliteRow) -> Result<KeyRecord, StoreError> {
    let get_text = |col: &str| row.try_get::<String, _>(col).map_err(unavailable);
    let id = get_text("id")?;
    let account_id = get_text("account_id")?;
    let hash: Vec<u8> = row.try_get("key_hash").map_err(unavailable)?;
    let kind = get_text("kind")?;
    let status = get_text("status")?;
    let scopes = get_text("scopes")?;
    let expires_at: Option<i64> = row.try_get("expires_at").map_err(unavailable)?;
    let revoked_at: Option<i64> = row.try_get("revoked_at").map_err(unavailable)?;
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
        expires_at: expires_at.map(from_millis).transpose()?,
        created_at: from_millis(row.try_get("created_at").map_err(unavailable)?)?,
        revoked_at: revoked_at.map(from_millis).transpose()?,
    })
}

async fn insert_key_with<'e, E>(executor: E, key: &KeyRecord) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let scopes = serde_json::to_string(&key.scopes)
        .map_err(|e| StoreError::Corrupt(format!("scopes: {e}")))?;
    sqlx::query(&format!(
        "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ))
    .bind(key.id.to_string())
    .bind(key.account_id.to_string())
    .bind(key.hash.0.as_slice())
    .bind(&key.display_prefix)
    .bind(key.kind.as_str())
    .bind(key.status.as_str())
    .bind(&key.name)
    .bind(scopes)
    .bind(key.expires_at.map(millis))
    .bind(millis(key.created_at))
    .bind(key.revoked_at.map(millis))
    .execute(executor)
    .await
    .map_err(unavailable)?;
    Ok(())
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
            insert_transfer(
                &mut tx,
                ledger_account::EXTERNAL,
                &ledger_account::wallet(id),
                starter_credits,
                "grant",
                id,
                "starter credits",
                at,
            )
            .await?;
        }
        insert_key_with(&mut *tx, &master_key).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Account {
            id,
            name: name.to_string(),
            status: "active".to_string(),
            balance: starter_credits,
            created_at: at,
        })
    }

    async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query(
            "SELECT a.name, a.status, a.created_at, w.balance_nanos \
             FROM accounts a JOIN wallets w ON w.account_id = a.id WHERE a.id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|row| {
            Ok(Account {
                id,
                name: row.try_get("name").map_err(unavailable)?,
                status: row.try_get("status").map_err(unavailable)?,
                balance: Nanos(row.try_get("balance_nanos").map_err(unavailable)?),
                created_at: from_millis(row.try_get("created_at").map_err(unavailable)?)?,
            })
        })
        .transpose()
    }
}

#[allow(clippy::too_many_arguments)]
async fn insert_transfer(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    debit: &str,
    credit: &str,
    amount: Nanos,
    kind: &str,
    account: AccountId,
    memo: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO ledger_transfers \
         (debit_account, credit_account, amount_nanos, kind, account_id, memo, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(debit)
    .bind(credit)
    .bind(amount.0)
    .bind(kind)
    .bind(account.to_string())
    .bind(memo)
    .bind(millis(at))
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        insert_key_with(&self.pool, key).await
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"
        ))
        .bind(hash.0.as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn key_by_id(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn keys_of_account(&self, account: AccountId) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = ? ORDER BY id"
        ))
        .bind(account.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn all_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"))
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
}

#[async_trait]
impl LedgerStore for SqliteStore {
    async fn ledger_balance(&self, account: AccountId) -> Result<Nanos, StoreError> {
        let wallet = ledger_account::wallet(account);
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
