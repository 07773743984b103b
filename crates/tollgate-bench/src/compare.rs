//! Two Tollgate builds side by side at one step: the A/B check for a performance change. Both
//! nodes run on SQLite, pinned to the same core, in front of the same upstream, and are loaded in
//! alternation (closed loop, or open loop at a set rate) for a number of rounds, so drift on the
//! machine hits both alike. The answer is each build's CPU per request and throughput, and the
//! candidate's ratio to the baseline, taken round by round and summarised by the median.
//!
//! With [`Load::HoldPairs`] the load is the suite's billing-API one instead of proxied calls:
//! holds opened and settled in pairs, and the figures are per pair.

use crate::contenders::{self, Contender, Env, Step};
use crate::load::{self, Mode, Run};
use crate::report::show;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

pub struct Options {
    pub baseline: PathBuf,
    pub candidate: PathBuf,
    pub bench: PathBuf,
    pub oha: PathBuf,
    pub work: PathBuf,
    pub step: Step,
    pub rounds: usize,
    pub seconds: f64,
    pub load: Load,
    /// Two-node clusters on PostgreSQL and Redis instead of one SQLite node each.
    pub cluster: bool,
}

/// What each round sends.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// Proxied calls through the data plane, from oha.
    Proxy(Mode),
    /// `connections` callers opening and settling holds through the billing API, closed loop.
    HoldPairs { connections: usize },
}

/// Runs the comparison and returns its report (markdown).
pub async fn run(options: Options) -> anyhow::Result<String> {
    let env = |tollgate: &PathBuf, dir: &str, tag: usize| Env {
        tag,
        tollgate: tollgate.clone(),
        bench: options.bench.clone(),
        work: options.work.join(dir),
        contender_core: 1,
        generator_core: 0,
        http: reqwest::Client::new(),
    };
    let shared = env(&options.baseline, "compare", 0);
    std::fs::create_dir_all(&shared.work)?;
    let (_upstream_proc, upstream) = contenders::upstream(&shared, Duration::ZERO).await?;
    let mut contenders: Vec<Contender> = Vec::new();
    for (tag, (name, binary)) in [
        ("baseline", &options.baseline),
        ("candidate", &options.candidate),
    ]
    .into_iter()
    .enumerate()
    {
        let env = env(binary, &format!("compare-{name}"), tag);
        std::fs::create_dir_all(&env.work)?;
        let mut contender =
            contenders::tollgate(&env, options.step, options.cluster, upstream).await?;
        contender.name = name.to_string();
        contenders.push(contender);
    }
    let raw_dir = options.work.join("compare-raw");
    std::fs::create_dir_all(&raw_dir)?;
    let load = |contender: &Contender, seconds: f64, what: String| {
        let duration = Duration::from_secs_f64(seconds);
        let (oha, raw_dir) = (options.oha.clone(), raw_dir.clone());
        let targets = contender.targets(false);
        let (base, key) = (
            contender.bases[0].clone(),
            contender.tollgate_key.clone().unwrap_or_default(),
        );
        let pids = contender.pids();
        async move {
            match options.load {
                Load::Proxy(mode) => {
                    let raw = load::raw_path(&raw_dir, &what);
                    load::oha(&oha, targets, mode, duration, 0, pids, raw).await
                }
                Load::HoldPairs { connections } => {
                    load::hold_settle(&base, &key, connections, duration, &pids).await
                }
            }
        }
    };
    for contender in &contenders {
        load(contender, 2.0, format!("warmup-{}", contender.name)).await?;
    }
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 0..options.rounds {
        // Alternate which build goes first, so neither always follows the other.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let contender = &mut contenders[i];
            contender.check_alive()?;
            eprintln!("round {round}: {}", contender.name);
            let what = format!("{}-{round}", contender.name);
            runs[i].push(load(contender, options.seconds, what).await?);
        }
    }
    let rss_mib = contenders
        .iter()
        .map(|c| crate::procs::rss_kib(&c.pids()) as f64 / 1024.0)
        .collect::<Vec<_>>();
    Ok(render(&options, &runs[0], &runs[1], &rss_mib))
}

fn render(options: &Options, baseline: &[Run], candidate: &[Run], rss_mib: &[f64]) -> String {
    let figure =
        |runs: &[Run], f: fn(&Run) -> f64| show(&runs.iter().map(f).collect::<Vec<_>>(), 1);
    // Per round: the two runs of a round are neighbours in time, so drift cancels.
    let ratio = |f: fn(&Run) -> f64| {
        let per_round: Vec<f64> = baseline
            .iter()
            .zip(candidate)
            .map(|(b, c)| f(c) / f(b))
            .collect();
        format!("× {}", show(&per_round, 3))
    };
    let cpu: fn(&Run) -> f64 = |r| r.cpu_us_per_request;
    let rps: fn(&Run) -> f64 = |r| r.rps;
    let errors: u64 = baseline.iter().chain(candidate).map(|r| r.errors).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Tollgate {} on {}, one core each, {}, {} rounds of {} s (medians, min–max):\n",
        options.step.label(),
        if options.cluster {
            "two nodes sharing PostgreSQL and Redis"
        } else {
            "SQLite"
        },
        match options.load {
            Load::Proxy(Mode::Open { rate, connections }) => {
                format!("open loop at {rate} requests/s over {connections} connections")
            }
            Load::Proxy(Mode::Closed { connections }) => {
                format!("closed loop with {connections} connections")
            }
            Load::Proxy(Mode::Sequential) => "one request at a time".into(),
            Load::HoldPairs { connections } => format!(
                "billing-API holds opened and settled in pairs by {connections} callers \
                 (figures per pair)"
            ),
        },
        options.rounds,
        options.seconds
    );
    let rss = |i: usize| rss_mib.get(i).map_or("—".into(), |m| format!("{m:.0}"));
    let rss_ratio = match rss_mib {
        [b, c] => format!("{:.2}×", c / b),
        _ => "—".into(),
    };
    let _ = writeln!(out, "| | CPU µs/request | requests/s | RSS after, MiB |");
    let _ = writeln!(out, "|---|---|---|---|");
    let _ = writeln!(
        out,
        "| baseline `{}` | {} | {} | {} |",
        options.baseline.display(),
        figure(baseline, cpu),
        figure(baseline, rps),
        rss(0)
    );
    let _ = writeln!(
        out,
        "| candidate `{}` | {} | {} | {} |",
        options.candidate.display(),
        figure(candidate, cpu),
        figure(candidate, rps),
        rss(1)
    );
    let _ = writeln!(
        out,
        "| candidate ÷ baseline (CPU and rps round by round) | {} | {} | {rss_ratio} |",
        ratio(cpu),
        ratio(rps)
    );
    if errors > 0 {
        let _ = writeln!(out, "\n{errors} requests failed: the figures are suspect.");
    }
    out
}
