//! Does a request cost the same with a million keys and ten million usage rows in the store?
//! One Tollgate (everything on, SQLite) is measured fresh, then again after its database is
//! seeded, offline, with copies of its own rows: keys that authenticate, usage rows as it writes
//! them.

use crate::contenders::{self, Contender, Env, Step};
use crate::load::{self, Run};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{Connection, Row, SqliteConnection};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_core::{ApiKey, KeyEnv, KeyId};

/// The scale node's directory under the work directory.
const SLUG: &str = "tollgate-scale";

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ScaleResults {
    pub keys_total: u64,
    pub usage_rows: u64,
    /// 10 keys in the store, requests spread over them.
    pub ten_keys: Vec<Run>,
    /// `keys_total` keys in the store, requests spread over 10 of them.
    pub many_keys_ten_hot: Vec<Run>,
    /// `keys_total` keys in the store, each request with one drawn at random from all of them.
    pub many_keys_all_used: Vec<Run>,
    /// 10 keys and `usage_rows` usage rows.
    pub many_usage_rows: Vec<Run>,
    pub seed_keys_seconds: f64,
    pub seed_rows_seconds: f64,
    pub database_mib: f64,
    /// The console's pages over the `usage_rows` rows, all of one account: how long each takes.
    #[serde(default)]
    pub console: Vec<PageTimes>,
    /// Why the console's pages could not be timed, if they could not.
    #[serde(default)]
    pub console_error: Option<String>,
}

/// One console page, fetched one at a time as a signed-in account holder.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PageTimes {
    pub page: String,
    pub fetches: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
}

/// How many times each console page is fetched.
const PAGE_FETCHES: usize = 40;

pub async fn run(
    env: &Env,
    upstream: SocketAddr,
    keys_total: u64,
    usage_rows: u64,
    duration: Duration,
    rounds: usize,
) -> anyhow::Result<ScaleResults> {
    let mut results = ScaleResults {
        keys_total,
        usage_rows,
        ..ScaleResults::default()
    };
    let node = contenders::tollgate_node(env, SLUG, Step::UsageLog, upstream).await?;
    let db = env.work.join(SLUG).join("tollgate.db");
    let master = node.tollgate_key.clone().context("no key")?;
    let mut hot = vec![master.clone()];
    for i in 0..9 {
        let created: Value = env
            .http
            .post(format!("{}/api/v1/keys", node.bases[0]))
            .bearer_auth(&master)
            .json(&json!({"name": format!("hot-{i}"), "scopes": ["llm"]}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        hot.push(
            created["secret"]
                .as_str()
                .context("key secret")?
                .to_string(),
        );
    }
    let hot = Arc::new(hot);
    let body = contenders::chat_body(false);
    // A restarted node listens on a new port, so the URL is the node's of the moment.
    let measure = |node: &Contender, keys: Arc<Vec<String>>| {
        let pids = node.pids();
        let url = format!("{}/v1/chat/completions", node.bases[0]);
        let body = body.clone();
        async move { load::rotating_keys(&url, &body, keys, 32, duration, &pids).await }
    };
    // Warm-up, then the baseline.
    measure(&node, hot.clone()).await?;
    for _ in 0..rounds {
        results.ten_keys.push(measure(&node, hot.clone()).await?);
    }

    stop(node);
    let started = Instant::now();
    let cold = seed_keys(&db, keys_total.saturating_sub(10)).await?;
    results.seed_keys_seconds = started.elapsed().as_secs_f64();
    let mut all = hot.as_ref().clone();
    all.extend(cold);
    let all = Arc::new(all);
    let node = contenders::tollgate_reopen(env, SLUG, Step::UsageLog, upstream).await?;
    measure(&node, hot.clone()).await?;
    for _ in 0..rounds {
        results
            .many_keys_ten_hot
            .push(measure(&node, hot.clone()).await?);
        results
            .many_keys_all_used
            .push(measure(&node, all.clone()).await?);
    }

    stop(node);
    let started = Instant::now();
    seed_usage(&db, usage_rows).await?;
    results.seed_rows_seconds = started.elapsed().as_secs_f64();
    results.database_mib = std::fs::metadata(&db).map_or(0.0, |m| m.len() as f64 / 1048576.0);
    let node = contenders::tollgate_reopen(env, SLUG, Step::UsageLog, upstream).await?;
    measure(&node, hot.clone()).await?;
    for _ in 0..rounds {
        results
            .many_usage_rows
            .push(measure(&node, hot.clone()).await?);
    }
    match console_pages(&node.bases[0], &master, &db).await {
        Ok(times) => results.console = times,
        Err(e) => results.console_error = Some(format!("{e:#}")),
    }
    drop(node);
    Ok(results)
}

/// Times the console's pages as the seeded account's holder sees them: finding a request by its
/// ID, the newest requests, the usage charts by day and by hour, and the overview.
async fn console_pages(base: &str, master: &str, db: &Path) -> anyhow::Result<Vec<PageTimes>> {
    // A browser's view: the sign-in's own answer carries the cookie, so no redirect is followed.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let signed_in = http
        .post(format!("{base}/console/sign-in"))
        .header("sec-fetch-site", "same-origin")
        .form(&[("credential", master)])
        .send()
        .await?;
    let cookie = signed_in
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("the console set no session cookie")?
        .to_string();
    let mut conn = connect(db).await?;
    let found: String =
        sqlx::query_scalar("SELECT request_id FROM requests WHERE request_id >= 'req_01' LIMIT 1")
            .fetch_one(&mut conn)
            .await?;
    let today = chrono::Utc::now().date_naive();
    let week_ago = today - chrono::Duration::days(6);
    let pages = [
        format!("/console/requests?id={found}"),
        "/console/requests".to_string(),
        "/console/usage".to_string(),
        format!("/console/usage?step=hour&from={week_ago}&to={today}&by=model"),
        "/console/".to_string(),
    ];
    let mut times = Vec::new();
    for page in pages {
        let mut took = Vec::with_capacity(PAGE_FETCHES);
        for _ in 0..PAGE_FETCHES {
            let started = Instant::now();
            let response = http
                .get(format!("{base}{page}"))
                .header("cookie", &cookie)
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "{page} answered {}",
                response.status()
            );
            response.bytes().await?;
            took.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        took.sort_by(f64::total_cmp);
        let at = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
        times.push(PageTimes {
            page,
            fetches: took.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
        });
    }
    Ok(times)
}

/// Stops the node gracefully, so everything it holds in memory is in the database.
fn stop(node: Contender) {
    for proc in node.procs {
        proc.stop(Duration::from_secs(10));
    }
}

async fn connect(db: &Path) -> anyhow::Result<SqliteConnection> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Off);
    Ok(SqliteConnection::connect_with(&options).await?)
}

/// Adds `count` working keys, each a copy of the newest key row with its own id, secret and hash;
/// returns their secrets.
async fn seed_keys(db: &Path, count: u64) -> anyhow::Result<Vec<String>> {
    let mut conn = connect(db).await?;
    let columns: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('api_keys')")
        .fetch_all(&mut conn)
        .await?
        .iter()
        .map(|row| row.get::<String, _>(0))
        .filter(|c| !["id", "key_hash", "display_prefix", "name"].contains(&c.as_str()))
        .collect();
    let template: String = sqlx::query_scalar(
        "SELECT id FROM api_keys WHERE kind = 'usage' ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await?;
    let rest = columns.join(", ");
    let insert = format!(
        "INSERT INTO api_keys (id, key_hash, display_prefix, name, {rest}) \
         SELECT ?, ?, ?, ?, {rest} FROM api_keys WHERE id = ?"
    );
    let mut secrets = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut tx = conn.begin().await?;
    for i in 0..count {
        let key = ApiKey::generate(KeyEnv::Live);
        sqlx::query(&insert)
            .bind(KeyId::new().to_string())
            .bind(key.hash().0.to_vec())
            .bind(key.display_prefix().to_string())
            .bind(format!("seeded-{i}"))
            .bind(&template)
            .execute(&mut *tx)
            .await?;
        secrets.push(key.expose().to_string());
    }
    tx.commit().await?;
    Ok(secrets)
}

/// Adds `count` usage rows, copies of an existing one with their own request ids, in batches of
/// a million. The ids are ULIDs of digits (`req_000…042`), valid and older than any real one
/// (whose time part starts `01`), which tells seeded rows apart.
async fn seed_usage(db: &Path, count: u64) -> anyhow::Result<()> {
    let mut conn = connect(db).await?;
    let columns: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('requests')")
        .fetch_all(&mut conn)
        .await?
        .iter()
        .map(|row| row.get::<String, _>(0))
        .filter(|c| c != "request_id")
        .collect();
    let rest = columns.join(", ");
    let template: String = sqlx::query_scalar("SELECT request_id FROM requests LIMIT 1")
        .fetch_one(&mut conn)
        .await
        .context("no usage row to copy")?;
    let mut done = 0;
    while done < count {
        let batch = (count - done).min(1_000_000);
        // Spread over the last 60 days, a row every few seconds, as a busy account's log is.
        let spread = rest.replace(
            "created_at",
            "created_at - (n.i * 5183 % 5184000) * 1000 AS created_at",
        );
        let insert = format!(
            "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2) \
             INSERT INTO requests (request_id, {rest}) \
             SELECT printf('req_%026d', n.i), {spread} FROM n, requests t \
             WHERE t.request_id = ?3"
        );
        sqlx::query(&insert)
            .bind(i64::try_from(done).unwrap_or(0))
            .bind(i64::try_from(done + batch - 1).unwrap_or(0))
            .bind(&template)
            .execute(&mut conn)
            .await?;
        done += batch;
    }
    // The quarter-hour totals the console's charts read, as the node keeps them for its rows.
    sqlx::query(
        "INSERT INTO usage_slots SELECT account_id, (created_at / 900000) * 900000, key_id, \
         route, COALESCE(model, ''), COUNT(*), SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), \
         COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cached_input_tokens), 0), \
         COALESCE(SUM(output_tokens), 0), SUM(cost_nanos) \
         FROM requests WHERE request_id < 'req_01' GROUP BY 1, 2, 3, 4, 5 \
         ON CONFLICT (account_id, slot_start, key_id, route, model) DO UPDATE SET \
         requests = requests + excluded.requests, errors = errors + excluded.errors, \
         input_tokens = input_tokens + excluded.input_tokens, \
         cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens, \
         output_tokens = output_tokens + excluded.output_tokens, \
         cost_nanos = cost_nanos + excluded.cost_nanos",
    )
    .execute(&mut conn)
    .await?;
    Ok(())
}
