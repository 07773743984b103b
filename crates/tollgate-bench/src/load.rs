//! Load: oha (open loop at a fixed rate, or closed loop for throughput) for the main figures,
//! and two drivers of our own for what oha cannot do: a different API key on every request,
//! and billing holds opened and settled in pairs.

use crate::procs;
use anyhow::{bail, Context};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a request looks like: one endpoint of a contender.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// How long a contender may stay busy after a run's last answer, finishing what the run left
/// (counted in the run's CPU).
const QUIET_WITHIN: Duration = Duration::from_secs(10);

/// How load is applied.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Mode {
    /// `connections` callers, each sending its next request when the last is answered.
    Closed { connections: u32 },
    /// Requests sent at `rate` a second whatever the answers do, latency measured from when each
    /// was due (coordinated omission corrected).
    Open { rate: u32, connections: u32 },
    /// One caller at a time: for time to first byte.
    Sequential,
}

/// One measured run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Run {
    #[serde(deserialize_with = "nan_if_null")]
    pub rps: f64,
    pub ok: u64,
    /// Non-2xx answers and transport errors.
    pub errors: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p50_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p99_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p999_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ttfb_p50_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ttfb_p99_ms: f64,
    /// CPU the contender's processes used per successful request.
    #[serde(deserialize_with = "nan_if_null")]
    pub cpu_us_per_request: f64,
    /// The contender's CPU use during the run, in cores (1.0: one core busy).
    #[serde(deserialize_with = "nan_if_null")]
    pub cores_busy: f64,
}

/// JSON has no NaN: a figure a run could not measure is written as `null` and read back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Runs oha against each target at once (one per node of a contender), splitting the load evenly
/// between them; the contender is `measured` (its root processes). Latency percentiles are the
/// worst of the targets'.
pub async fn oha(
    oha: &Path,
    targets: Vec<Target>,
    mode: Mode,
    duration: Duration,
    generator_core: usize,
    measured: Vec<u32>,
    raw: PathBuf,
) -> anyhow::Result<Run> {
    let measured = measured.as_slice();
    let ticks = procs::clock_ticks();
    let parts = u32::try_from(targets.len()).unwrap_or(1).max(1);
    let cpu_before = procs::cpu_micros(measured, ticks);
    let started = Instant::now();
    let mut runs = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let mut args: Vec<String> = vec![
            "-c".into(),
            generator_core.to_string(),
            oha.display().to_string(),
            "--no-tui".into(),
            "--output-format".into(),
            "json".into(),
            "--worker-threads".into(),
            "1".into(),
            "-w".into(),
            "-m".into(),
            "POST".into(),
            "-T".into(),
            "application/json".into(),
            "-d".into(),
            target.body.clone(),
        ];
        for (name, value) in &target.headers {
            args.push("-H".into());
            args.push(format!("{name}: {value}"));
        }
        match mode {
            Mode::Closed { connections } => {
                args.extend(["-c".into(), (connections / parts).max(1).to_string()]);
                args.extend(["-z".into(), format!("{}ms", duration.as_millis())]);
            }
            Mode::Open { rate, connections } => {
                args.extend(["-c".into(), (connections / parts).max(1).to_string()]);
                args.extend(["-q".into(), (rate / parts).max(1).to_string()]);
                args.push("--latency-correction".into());
                args.extend(["-z".into(), format!("{}ms", duration.as_millis())]);
            }
            Mode::Sequential => {
                args.extend(["-c".into(), "1".into()]);
                args.extend(["-z".into(), format!("{}ms", duration.as_millis())]);
            }
        }
        args.push(target.url.clone());
        let out = raw.with_extension(format!("{i}.json"));
        runs.push((
            out,
            tokio::process::Command::new("taskset")
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output(),
        ));
    }
    let mut results = Vec::new();
    for (out, run) in runs {
        let output = run.await.context("running oha")?;
        if !output.status.success() {
            bail!(
                "oha failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        std::fs::write(&out, &output.stdout)?;
        let json: Value = serde_json::from_slice(&output.stdout).context("reading oha's JSON")?;
        results.push(json);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = procs::cpu_micros_when_quiet(measured, ticks, QUIET_WITHIN)
        .await
        .saturating_sub(cpu_before);
    let mut run = Run::default();
    for json in &results {
        let statuses = json["statusCodeDistribution"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (status, count) in statuses {
            let count = count.as_u64().unwrap_or(0);
            if status.starts_with('2') {
                run.ok += count;
            } else {
                run.errors += count;
            }
        }
        run.errors += json["errorDistribution"]
            .as_object()
            .map_or(0, |e| e.values().filter_map(Value::as_u64).sum());
        run.rps += json["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0);
        let ms = |section: &str, p: &str| json[section][p].as_f64().unwrap_or(f64::NAN) * 1000.0;
        run.p50_ms = run.p50_ms.max(ms("latencyPercentiles", "p50"));
        run.p99_ms = run.p99_ms.max(ms("latencyPercentiles", "p99"));
        run.p999_ms = run.p999_ms.max(ms("latencyPercentiles", "p99.9"));
        run.ttfb_p50_ms = run.ttfb_p50_ms.max(ms("firstBytePercentiles", "p50"));
        run.ttfb_p99_ms = run.ttfb_p99_ms.max(ms("firstBytePercentiles", "p99"));
    }
    // Only answered requests count as throughput; errors make a run unusable for "max rps".
    let total = (run.ok + run.errors).max(1) as f64;
    run.rps *= run.ok as f64 / total;
    run.cpu_us_per_request = cpu as f64 / run.ok.max(1) as f64;
    run.cores_busy = cpu as f64 / 1e6 / elapsed;
    Ok(run)
}

/// Closed-loop load where each request presents a key drawn at random from `keys`, so a large
/// key set is exercised the way many customers would (most keys cold in the cache).
pub async fn rotating_keys(
    url: &str,
    body: &str,
    keys: Arc<Vec<String>>,
    connections: usize,
    duration: Duration,
    measured: &[u32],
) -> anyhow::Result<Run> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()?;
    let (url, body) = (Arc::new(url.to_string()), Arc::new(body.to_string()));
    closed_loop(connections, duration, measured, move || {
        let (http, keys, url, body) = (http.clone(), keys.clone(), url.clone(), body.clone());
        async move {
            let key = &keys[rand::thread_rng().gen_range(0..keys.len())];
            let response = http
                .post(url.as_str())
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body.as_str().to_owned())
                .send()
                .await?
                .error_for_status()?;
            response.bytes().await?;
            Ok(())
        }
    })
    .await
}

/// Opens and settles billing holds in pairs through the billing API, closed loop; `ok` counts
/// pairs (each a hold and its settlement).
pub async fn hold_settle(
    base: &str,
    key: &str,
    connections: usize,
    duration: Duration,
    measured: &[u32],
) -> anyhow::Result<Run> {
    let http = reqwest::Client::new();
    let (base, key) = (Arc::new(base.to_string()), Arc::new(key.to_string()));
    closed_loop(connections, duration, measured, move || {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        async move { open_and_settle(&http, &base, &key).await }
    })
    .await
}

/// `connections` callers each running `operation` again as soon as it ends, for `duration`;
/// an operation's latency counts when it succeeds, its failure as an error. CPU is that of the
/// `measured` processes over the run and until they are quiet after it.
async fn closed_loop<F, Fut>(
    connections: usize,
    duration: Duration,
    measured: &[u32],
    operation: F,
) -> anyhow::Result<Run>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let ticks = procs::clock_ticks();
    let cpu_before = procs::cpu_micros(measured, ticks);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (operation, stop) = (operation.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                match operation().await {
                    Ok(()) => latencies.push(sent.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = procs::cpu_micros_when_quiet(measured, ticks, QUIET_WITHIN)
        .await
        .saturating_sub(cpu_before);
    Ok(summarize(latencies, errors, elapsed, cpu))
}

async fn open_and_settle(http: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<()> {
    let hold: Value = http
        .post(format!("{base}/api/v1/holds"))
        .bearer_auth(key)
        .json(&serde_json::json!({"amount": "0.001", "ttl_seconds": 60}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = hold["id"].as_str().context("hold without an id")?;
    http.post(format!("{base}/api/v1/holds/{id}/settle"))
        .bearer_auth(key)
        .json(&serde_json::json!({"amount": "0.0005"}))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

fn summarize(mut latencies: Vec<Duration>, errors: u64, elapsed: f64, cpu_us: u64) -> Run {
    latencies.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1);
        latencies
            .get(i.min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    let ok = latencies.len() as u64;
    Run {
        rps: ok as f64 / elapsed,
        ok,
        errors,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        ttfb_p50_ms: f64::NAN,
        ttfb_p99_ms: f64::NAN,
        cpu_us_per_request: cpu_us as f64 / ok.max(1) as f64,
        cores_busy: cpu_us as f64 / 1e6 / elapsed,
    }
}

/// Where a run's raw output goes: `<dir>/<name>.json`.
pub fn raw_path(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(safe)
}
