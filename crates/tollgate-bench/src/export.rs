//! Usage export throughput: a Tollgate node whose export log holds `rows` charged calls sends
//! them all to a signed-CloudEvents sink on loopback (the fake in `tollgate-mock`, keeping only
//! counts). Measured: the time to drain the log, and the node's peak memory, which must not
//! grow with the backlog (the exporter reads one batch at a time).

use crate::procs::{free_port, rss_kib, wait_ready, Proc};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};
use tollgate_mock::sinks::FakeSinks;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Records per request to the sink.
const BATCH: u32 = 1000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportRun {
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// The node's largest resident set while it exported, sampled every 20 ms.
    pub peak_rss_mib: f64,
}

/// Exports `rows` records from a fresh node; the node's directory is `work/export-<rows>`.
pub async fn run(tollgate: &Path, work: &Path, rows: u64) -> anyhow::Result<ExportRun> {
    let dir = work.join(format!("export-{rows}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sink = FakeSinks::start(SECRET, false).await?;
    let port = free_port()?;
    let config = dir.join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [store]\nurl = \"sqlite://{db}\"\n\
             [export]\npoll_interval = \"50ms\"\n\
             [[export.sinks]]\nname = \"bench\"\nkind = \"webhook\"\n\
             url = \"{url}/cloudevents\"\nsecret = \"{SECRET}\"\n\
             meters = {{ cost = \"cost\", output_tokens = \"tokens_out\" }}\n\
             batch_size = {BATCH}\n",
            db = dir.join("tollgate.db").display(),
            url = sink.url(),
        ),
    )?;
    let migrate = std::process::Command::new(tollgate)
        .args(["migrate", "--config"])
        .arg(&config)
        .output()
        .context("running tollgate migrate")?;
    if !migrate.status.success() {
        bail!(
            "tollgate migrate failed: {}",
            String::from_utf8_lossy(&migrate.stderr)
        );
    }
    seed(&dir.join("tollgate.db"), rows).await?;

    let started = Instant::now();
    let config_arg = config.display().to_string();
    let mut node = Proc::start(
        "tollgate (export)",
        None,
        tollgate,
        &["serve", "--config", &config_arg],
        &[("TOLLGATE_LOG", "warn")],
        &dir.join("tollgate.log"),
    )?;
    wait_ready(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_secs(30),
        &mut node,
    )
    .await?;
    // Each record is two values at the sink (cost and output tokens).
    let expected = rows * 2;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut peak_kib = 0;
    loop {
        peak_kib = peak_kib.max(rss_kib(&[node.pid()]));
        let (accepted, _) = sink.counts();
        if accepted >= expected {
            break;
        }
        node.check_alive()?;
        if Instant::now() > deadline {
            bail!("the export of {rows} rows did not finish in 10 minutes ({accepted} values)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    node.stop(Duration::from_secs(5));
    Ok(ExportRun {
        rows,
        seconds,
        rows_per_second: rows as f64 / seconds,
        peak_rss_mib: peak_kib as f64 / 1024.0,
    })
}

/// Writes `rows` charged calls into the export log directly, over 100 accounts and a day, and
/// the sink's cursor before them.
async fn seed(db: &Path, rows: u64) -> anyhow::Result<()> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
    let now = chrono::Utc::now().timestamp_millis();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
         INSERT INTO usage_exports (request_id, account_id, key_id, route, model, \
         billing_status, cost_nanos, input_tokens, cached_input_tokens, output_tokens, at) \
         SELECT printf('req_%026d', i), printf('acct_%026d', i % 100), \
         printf('key_%026d', i % 100), '/v1', 'bench-model', 'settled', 1000 + i % 7919, \
         10, 0, 20 + i % 13, ?2 - 86400000 + i % 86400000 FROM n",
    )
    .bind(i64::try_from(rows)?)
    .bind(now)
    .execute(&pool)
    .await
    .context("seeding the export log")?;
    // A sink seen for the first time starts at the newest record (it is never sent the history);
    // this one is a sink that fell behind, with every seeded record still to send.
    sqlx::query("INSERT INTO export_cursors (sink, seq, updated_at) VALUES ('bench', 0, ?1)")
        .bind(now)
        .execute(&pool)
        .await
        .context("placing the sink's cursor before the seeded records")?;
    pool.close().await;
    Ok(())
}
