//! The whole benchmark, in the order BENCHMARKS.md reports it: every contender started side by
//! side, warmed up, then measured in interleaved rounds so that drift on a shared machine hits
//! them all alike.

use crate::contenders::{self, Contender, Env, Step};
use crate::load::{self, Mode, Run};
use crate::scale::{self, ScaleResults};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// What to run and where the results go.
pub struct Options {
    pub tollgate: PathBuf,
    pub bench: PathBuf,
    pub oha: PathBuf,
    /// LiteLLM's `litellm` command, if installed.
    pub litellm: Option<PathBuf>,
    pub work: PathBuf,
    pub quick: bool,
    /// Only the cost-at-scale section (its figures replace those of an earlier run's report).
    pub scale_only: bool,
    /// Only the usage export section (its figures replace those of an earlier run's report).
    pub export_only: bool,
}

/// Load settings, written into the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub run_seconds: f64,
    pub rounds: usize,
    pub warmup_seconds: f64,
    pub closed_connections: u32,
    pub open_rate: u32,
    pub open_connections: u32,
    pub latency_mode_ms: u64,
    pub latency_mode_rate: u32,
    pub latency_mode_connections: u32,
    pub hold_connections: usize,
    pub scale_keys: u64,
    pub scale_usage_rows: u64,
    /// Records in the export log the export section drains.
    #[serde(default)]
    pub export_rows: u64,
    pub contender_core: usize,
    pub generator_core: usize,
}

/// One contender's runs, one per round each.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Measured {
    pub name: String,
    /// Closed loop: maximum throughput.
    pub closed: Vec<Run>,
    /// Open loop at the fixed rate: latency.
    pub open: Vec<Run>,
    /// One streamed request at a time: time to first byte.
    pub stream: Vec<Run>,
    pub rss_mib: f64,
    /// Why it could not be measured, if it could not.
    pub error: Option<String>,
}

impl Measured {
    /// No runs yet.
    fn named(name: &str) -> Measured {
        Measured {
            name: name.to_string(),
            ..Measured::default()
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LitellmResults {
    pub name: String,
    /// Why the database mode (virtual keys and budgets) could not run, if it could not.
    pub database_mode_error: Option<String>,
    pub max: Vec<Run>,
    /// The open-loop rate used for the comparison: its own sustainable maximum.
    pub rate: u32,
    /// direct, Tollgate everything-on (SQLite) and LiteLLM at `rate`, per round.
    pub at_its_rate: Vec<Measured>,
    pub rss_mib: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub commit: String,
    pub machine: Vec<(String, String)>,
    pub settings: Option<Settings>,
    pub main: Vec<Measured>,
    pub latency_mode: Vec<Measured>,
    pub latency_mode_error: Option<String>,
    pub litellm: Option<LitellmResults>,
    pub litellm_error: Option<String>,
    pub holds: Vec<Measured>,
    pub scale: Option<ScaleResults>,
    pub scale_error: Option<String>,
    /// When the scale section was run on its own (`--scale-only`), after the rest.
    #[serde(default)]
    pub scale_date: Option<String>,
    /// Usage export: a tenth of the records, then all of them.
    #[serde(default)]
    pub export: Vec<crate::export::ExportRun>,
    #[serde(default)]
    pub export_error: Option<String>,
    /// When the export section was run on its own (`--export-only`), after the rest.
    #[serde(default)]
    pub export_date: Option<String>,
}

pub async fn run(options: Options) -> anyhow::Result<Results> {
    let settings = Settings {
        run_seconds: if options.quick { 1.0 } else { 5.0 },
        rounds: if options.quick { 1 } else { 3 },
        warmup_seconds: if options.quick { 0.5 } else { 2.0 },
        closed_connections: 64,
        open_rate: 5000,
        open_connections: 64,
        latency_mode_ms: 50,
        latency_mode_rate: 1000,
        latency_mode_connections: 128,
        hold_connections: 16,
        scale_keys: if options.quick { 10_000 } else { 1_000_000 },
        scale_usage_rows: if options.quick { 100_000 } else { 10_000_000 },
        export_rows: if options.quick { 20_000 } else { 1_000_000 },
        contender_core: 1,
        generator_core: 0,
    };
    std::fs::create_dir_all(&options.work)?;
    let raw_dir = options.work.join("raw");
    std::fs::create_dir_all(&raw_dir)?;
    let env = Env {
        tollgate: options.tollgate.clone(),
        bench: options.bench.clone(),
        work: options.work.clone(),
        contender_core: settings.contender_core,
        generator_core: settings.generator_core,
        http: reqwest::Client::new(),
        tag: 0,
    };
    let run_for = Duration::from_secs_f64(settings.run_seconds);
    let mut results = Results {
        settings: Some(settings.clone()),
        ..Results::default()
    };

    if options.export_only {
        (results.export, results.export_error) = export_section(&options, &settings).await;
        return Ok(results);
    }
    // Zero-latency upstream: the proxies' own cost, unmasked.
    let (upstream_proc, upstream) = contenders::upstream(&env, Duration::ZERO).await?;
    if options.scale_only {
        (results.scale, results.scale_error) = scale_section(&env, upstream, &settings).await;
        return Ok(results);
    }
    let mut contenders: Vec<Contender> = vec![contenders::direct(upstream)];
    let mut failed = Vec::new();
    let mut add = |name: &str, started: anyhow::Result<Contender>| match started {
        Ok(c) => contenders.push(c),
        Err(e) => {
            eprintln!("{name} cannot run: {e:#}");
            failed.push(Measured {
                name: name.to_string(),
                error: Some(format!("{e:#}")),
                ..Measured::default()
            });
        }
    };
    eprintln!("starting contenders");
    add(
        "bare hyper proxy",
        contenders::bare_proxy(&env, upstream).await,
    );
    add("nginx", contenders::nginx(&env, upstream).await);
    for cluster in [false, true] {
        for step in Step::ALL {
            let name = format!("Tollgate {step:?} cluster={cluster}");
            add(
                &name,
                contenders::tollgate(&env, step, cluster, upstream).await,
            );
        }
    }
    let mut measured: Vec<Measured> = contenders
        .iter()
        .map(|c| Measured::named(&c.name))
        .collect();
    eprintln!("warming up");
    for contender in &contenders {
        load::oha(
            &options.oha,
            contender.targets(false),
            Mode::Closed {
                connections: settings.closed_connections,
            },
            Duration::from_secs_f64(settings.warmup_seconds),
            settings.generator_core,
            contender.pids(),
            load::raw_path(&raw_dir, &format!("warmup-{}", contender.name)),
        )
        .await?;
    }
    for round in 0..settings.rounds {
        for (contender, into) in contenders.iter_mut().zip(measured.iter_mut()) {
            eprintln!("round {round}: {}", contender.name);
            contender.check_alive()?;
            let raw = |what: &str| {
                load::raw_path(&raw_dir, &format!("{what}-{round}-{}", contender.name))
            };
            let oha = |targets, mode, duration, raw| {
                load::oha(
                    &options.oha,
                    targets,
                    mode,
                    duration,
                    settings.generator_core,
                    contender.pids(),
                    raw,
                )
            };
            into.closed.push(
                oha(
                    contender.targets(false),
                    Mode::Closed {
                        connections: settings.closed_connections,
                    },
                    run_for,
                    raw("closed"),
                )
                .await?,
            );
            into.open.push(
                oha(
                    contender.targets(false),
                    Mode::Open {
                        rate: settings.open_rate,
                        connections: settings.open_connections,
                    },
                    run_for,
                    raw("open"),
                )
                .await?,
            );
            into.stream.push(
                oha(
                    contender.targets(true),
                    Mode::Sequential,
                    run_for / 2,
                    raw("stream"),
                )
                .await?,
            );
        }
    }
    for (contender, into) in contenders.iter().zip(measured.iter_mut()) {
        into.rss_mib = crate::procs::rss_kib(&contender.pids()) as f64 / 1024.0;
    }
    measured.extend(failed);
    results.main = measured;

    // Holds opened and settled through the billing API.
    eprintln!("hold + settle");
    let billing: Vec<&Contender> = contenders
        .iter()
        .filter(|c| c.name.contains("everything on"))
        .collect();
    let mut holds: Vec<Measured> = billing.iter().map(|c| Measured::named(&c.name)).collect();
    for _ in 0..settings.rounds {
        for (contender, into) in billing.iter().zip(holds.iter_mut()) {
            let key = contender.tollgate_key.clone().unwrap_or_default();
            into.closed.push(
                load::hold_settle(
                    &contender.bases[0],
                    &key,
                    settings.hold_connections,
                    run_for,
                    &contender.pids(),
                )
                .await?,
            );
        }
    }
    results.holds = holds;

    // LiteLLM: its own maximum first, then everyone at that rate.
    if let Some(litellm) = &options.litellm {
        eprintln!("LiteLLM");
        match litellm_runs(
            &env,
            &options,
            &settings,
            upstream,
            litellm,
            &contenders,
            &raw_dir,
        )
        .await
        {
            Ok(l) => results.litellm = Some(l),
            Err(e) => results.litellm_error = Some(format!("{e:#}")),
        }
    } else {
        results.litellm_error = Some("LiteLLM is not installed (scripts/bench installs it with pip into target/bench/litellm-venv)".into());
    }
    drop(contenders);

    // A realistic upstream: 50 ms before every answer.
    eprintln!("latency mode");
    match latency_mode(&env, &options, &settings, &raw_dir).await {
        Ok(m) => results.latency_mode = m,
        Err(e) => results.latency_mode_error = Some(format!("{e:#}")),
    }

    (results.scale, results.scale_error) = scale_section(&env, upstream, &settings).await;
    drop(upstream_proc);

    (results.export, results.export_error) = export_section(&options, &settings).await;
    Ok(results)
}

/// Usage export: a tenth of the records, then all of them; stops at the first failure.
async fn export_section(
    options: &Options,
    settings: &Settings,
) -> (Vec<crate::export::ExportRun>, Option<String>) {
    eprintln!("usage export");
    let mut runs = Vec::new();
    for rows in [settings.export_rows / 10, settings.export_rows] {
        match crate::export::run(&options.tollgate, &options.work, rows.max(1)).await {
            Ok(run) => runs.push(run),
            Err(e) => return (runs, Some(format!("{e:#}"))),
        }
    }
    (runs, None)
}

async fn scale_section(
    env: &Env,
    upstream: std::net::SocketAddr,
    settings: &Settings,
) -> (Option<ScaleResults>, Option<String>) {
    eprintln!("scale");
    let run = scale::run(
        env,
        upstream,
        settings.scale_keys,
        settings.scale_usage_rows,
        Duration::from_secs_f64(settings.run_seconds),
        settings.rounds,
    )
    .await;
    match run {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn litellm_runs(
    env: &Env,
    options: &Options,
    settings: &Settings,
    upstream: std::net::SocketAddr,
    litellm: &std::path::Path,
    contenders: &[Contender],
    raw_dir: &std::path::Path,
) -> anyhow::Result<LitellmResults> {
    let run_for = Duration::from_secs_f64(settings.run_seconds);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (mut lite, db_error) = contenders::litellm(env, upstream, litellm, workers).await?;
    let mut out = LitellmResults {
        name: lite.name.clone(),
        database_mode_error: db_error,
        ..LitellmResults::default()
    };
    let oha = |c: &Contender, mode, duration, raw: String| {
        let targets = c.targets(false);
        let pids = c.pids();
        let path = load::raw_path(raw_dir, &raw);
        async move {
            load::oha(
                &options.oha,
                targets,
                mode,
                duration,
                settings.generator_core,
                pids,
                path,
            )
            .await
        }
    };
    let closed = Mode::Closed { connections: 32 };
    oha(
        &lite,
        closed,
        Duration::from_secs_f64(settings.warmup_seconds),
        "litellm-warmup".into(),
    )
    .await?;
    for round in 0..settings.rounds {
        lite.check_alive()?;
        out.max
            .push(oha(&lite, closed, run_for, format!("litellm-max-{round}")).await?);
    }
    let mut max: Vec<f64> = out
        .max
        .iter()
        .filter(|r| r.errors == 0)
        .map(|r| r.rps)
        .collect();
    max.sort_by(f64::total_cmp);
    let sustainable = max.get(max.len() / 2).copied().unwrap_or(0.0) * 0.9;
    out.rate = (sustainable as u32).max(1);
    let direct = &contenders[0];
    let tollgate = contenders
        .iter()
        .find(|c| c.name.contains("SQLite") && c.name.contains("everything on"));
    let mut peers: Vec<&Contender> = vec![direct];
    peers.extend(tollgate);
    peers.push(&lite);
    out.at_its_rate = peers.iter().map(|c| Measured::named(&c.name)).collect();
    let mode = Mode::Open {
        rate: out.rate,
        connections: 64,
    };
    for round in 0..settings.rounds {
        for (c, into) in peers.iter().zip(out.at_its_rate.iter_mut()) {
            into.open.push(
                oha(
                    c,
                    mode,
                    run_for,
                    format!("at-litellm-rate-{round}-{}", c.name),
                )
                .await?,
            );
            let stream = load::oha(
                &options.oha,
                c.targets(true),
                Mode::Sequential,
                run_for / 2,
                settings.generator_core,
                c.pids(),
                load::raw_path(raw_dir, &format!("litellm-stream-{round}-{}", c.name)),
            )
            .await?;
            into.stream.push(stream);
        }
    }
    out.rss_mib = crate::procs::rss_kib(&lite.pids()) as f64 / 1024.0;
    Ok(out)
}

async fn latency_mode(
    env: &Env,
    options: &Options,
    settings: &Settings,
    raw_dir: &std::path::Path,
) -> anyhow::Result<Vec<Measured>> {
    let run_for = Duration::from_secs_f64(settings.run_seconds);
    let (_upstream_proc, upstream) =
        contenders::upstream(env, Duration::from_millis(settings.latency_mode_ms)).await?;
    let mut contenders = vec![contenders::direct(upstream)];
    contenders.push(contenders::bare_proxy(env, upstream).await?);
    contenders.push(contenders::nginx(env, upstream).await?);
    contenders.push(contenders::tollgate(env, Step::UsageLog, false, upstream).await?);
    contenders.push(contenders::tollgate(env, Step::UsageLog, true, upstream).await?);
    let mut measured: Vec<Measured> = contenders
        .iter()
        .map(|c| Measured::named(&c.name))
        .collect();
    let mode = Mode::Open {
        rate: settings.latency_mode_rate,
        connections: settings.latency_mode_connections,
    };
    for contender in &contenders {
        load::oha(
            &options.oha,
            contender.targets(false),
            mode,
            Duration::from_secs_f64(settings.warmup_seconds),
            settings.generator_core,
            contender.pids(),
            load::raw_path(raw_dir, &format!("latency-warmup-{}", contender.name)),
        )
        .await?;
    }
    for round in 0..settings.rounds {
        for (contender, into) in contenders.iter_mut().zip(measured.iter_mut()) {
            contender.check_alive()?;
            into.open.push(
                load::oha(
                    &options.oha,
                    contender.targets(false),
                    mode,
                    run_for,
                    settings.generator_core,
                    contender.pids(),
                    load::raw_path(raw_dir, &format!("latency-{round}-{}", contender.name)),
                )
                .await?,
            );
        }
    }
    Ok(measured)
}
