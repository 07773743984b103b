//! `tollgate-bench`: the benchmark suite's one binary. `run` measures every contender and writes
//! BENCHMARKS.md; `upstream` and `bare-proxy` are the processes it starts (a mock provider and
//! the bare-proxy floor). `scripts/bench` installs the tools and runs it.

mod bare;
mod compare;
mod contenders;
mod export;
mod load;
mod procs;
mod report;
mod run;
mod scale;
mod upstream;

use anyhow::Context;
use clap::{Parser, Subcommand};
use contenders::Step;
use load::Mode;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "tollgate-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the mock OpenAI-compatible upstream.
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
        /// Wait this long before every answer.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Serve the bare pass-through proxy.
    BareProxy {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
    },
    /// Render BENCHMARKS.md again from a BENCHMARKS.json (after a change to the report).
    Report {
        #[arg(long, default_value = "BENCHMARKS.json")]
        from: PathBuf,
        #[arg(long, default_value = "BENCHMARKS.md")]
        to: PathBuf,
    },
    /// Two Tollgate builds side by side at one step, on SQLite: the A/B check for a performance
    /// change. Prints each build's CPU per request and throughput, and the candidate's ratio.
    Compare {
        /// The release `tollgate` binary measured against.
        #[arg(long)]
        baseline: PathBuf,
        /// The release `tollgate` binary with the change.
        #[arg(long)]
        candidate: PathBuf,
        #[arg(long)]
        oha: PathBuf,
        #[arg(long, value_enum, default_value_t = Step::UsageLog)]
        step: Step,
        #[arg(long, default_value_t = 6)]
        rounds: usize,
        /// Length of each measured run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        connections: u32,
        /// Open loop at this many requests a second instead of a closed loop: the load at which
        /// the suite's main table takes CPU per request (its open-loop runs).
        #[arg(long)]
        rate: Option<u32>,
        /// Load the billing API instead: holds opened and settled in pairs, closed loop, by this
        /// many callers (the suite's hold + settle table; figures are per pair).
        #[arg(long, conflicts_with = "rate")]
        holds: Option<usize>,
        /// Compare two-node clusters on the local PostgreSQL and Redis instead of SQLite nodes.
        #[arg(long)]
        cluster: bool,
        #[arg(long, default_value = "target/bench")]
        work: PathBuf,
    },
    /// Usage export throughput: a node drains an export log of `--rows` records to a sink on
    /// loopback; prints the time, rows per second and the node's peak memory, at a tenth of the
    /// rows and at all of them (the memory must not grow with the backlog).
    Export {
        /// The release `tollgate` binary.
        #[arg(long)]
        tollgate: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        #[arg(long, default_value = "target/bench")]
        work: PathBuf,
    },
    /// Run every benchmark and write BENCHMARKS.md and BENCHMARKS.json into `--out`.
    Run {
        /// The release `tollgate` binary.
        #[arg(long)]
        tollgate: PathBuf,
        /// The oha load generator.
        #[arg(long)]
        oha: PathBuf,
        /// LiteLLM's `litellm` command; without it LiteLLM is reported as not run.
        #[arg(long)]
        litellm: Option<PathBuf>,
        /// Scratch space: databases, logs, oha's raw output.
        #[arg(long, default_value = "target/bench")]
        work: PathBuf,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// One short round of everything, with a small scale test: checks the suite, measures
        /// nothing worth reporting.
        #[arg(long)]
        quick: bool,
        /// Run only the cost-at-scale section and put its figures into the BENCHMARKS.json and
        /// BENCHMARKS.md already in `--out`.
        #[arg(long, conflicts_with = "export_only")]
        scale_only: bool,
        /// Run only the usage export section and put its figures into the BENCHMARKS.json and
        /// BENCHMARKS.md already in `--out`.
        #[arg(long)]
        export_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Upstream { listen, latency_ms } => {
            upstream::serve(listen, Duration::from_millis(latency_ms)).await
        }
        Command::BareProxy { listen, upstream } => bare::serve(listen, upstream).await,
        Command::Report { from, to } => {
            let text =
                std::fs::read_to_string(&from).with_context(|| format!("reading {from:?}"))?;
            let results: run::Results = serde_json::from_str(&text)?;
            std::fs::write(&to, report::render(&results))?;
            Ok(())
        }
        Command::Compare {
            baseline,
            candidate,
            oha,
            step,
            rounds,
            seconds,
            connections,
            rate,
            holds,
            cluster,
            work,
        } => {
            let options = compare::Options {
                baseline: std::path::absolute(&baseline)?,
                candidate: std::path::absolute(&candidate)?,
                bench: std::env::current_exe().context("finding this binary")?,
                oha,
                work: std::path::absolute(&work)?,
                step,
                rounds: rounds.max(1),
                seconds,
                load: match (holds, rate) {
                    (Some(connections), _) => compare::Load::HoldPairs { connections },
                    (None, Some(rate)) => compare::Load::Proxy(Mode::Open { rate, connections }),
                    (None, None) => compare::Load::Proxy(Mode::Closed { connections }),
                },
                cluster,
            };
            print!("{}", compare::run(options).await?);
            Ok(())
        }
        Command::Export {
            tollgate,
            rows,
            work,
        } => {
            let work = std::path::absolute(&work)?;
            let tollgate = std::path::absolute(&tollgate)?;
            for rows in [rows / 10, rows] {
                let run = export::run(&tollgate, &work, rows.max(1)).await?;
                println!(
                    "{:>9} rows: {:>7.1} s, {:>8.0} rows/s, peak RSS {:>6.1} MiB",
                    run.rows, run.seconds, run.rows_per_second, run.peak_rss_mib
                );
            }
            Ok(())
        }
        Command::Run {
            tollgate,
            oha,
            litellm,
            work,
            out,
            quick,
            scale_only,
            export_only,
        } => {
            // Absolute, since contenders run in their own directories.
            let work = std::path::absolute(&work)?;
            let tollgate = std::path::absolute(&tollgate)?;
            let options = run::Options {
                tollgate,
                bench: std::env::current_exe().context("finding this binary")?,
                oha,
                litellm,
                work,
                quick,
                scale_only,
                export_only,
            };
            let measured = run::run(options).await?;
            let earlier = || -> anyhow::Result<run::Results> {
                let earlier = out.join("BENCHMARKS.json");
                let text = std::fs::read_to_string(&earlier)
                    .with_context(|| format!("reading {earlier:?}"))?;
                Ok(serde_json::from_str(&text)?)
            };
            let results = if scale_only {
                let mut results = earlier()?;
                results.scale = measured.scale;
                results.scale_error = measured.scale_error;
                results.scale_date =
                    Some(chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string());
                results
            } else if export_only {
                let mut results = earlier()?;
                results.export = measured.export;
                results.export_error = measured.export_error;
                results.export_date =
                    Some(chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string());
                results
            } else {
                let mut results = measured;
                results.date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
                results.commit = commit();
                results.machine = machine();
                results
            };
            std::fs::create_dir_all(&out)?;
            std::fs::write(
                out.join("BENCHMARKS.json"),
                serde_json::to_string_pretty(&results)?,
            )?;
            std::fs::write(out.join("BENCHMARKS.md"), report::render(&results))?;
            eprintln!("wrote {}", out.join("BENCHMARKS.md").display());
            Ok(())
        }
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn commit() -> String {
    let hash = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let dirty =
        !command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty {
        format!("{hash} (with uncommitted changes)")
    } else {
        hash
    }
}

fn machine() -> Vec<(String, String)> {
    let cpu = command_output("lscpu", &[])
        .lines()
        .find(|l| l.starts_with("Model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.replace("MemTotal:", "").trim().to_string())
        })
        .unwrap_or_default();
    vec![
        ("CPU".into(), cpu),
        ("cores".into(), command_output("nproc", &[])),
        ("memory".into(), memory),
        ("kernel".into(), command_output("uname", &["-sr"])),
        ("rustc".into(), command_output("rustc", &["--version"])),
        ("nginx".into(), {
            let out = std::process::Command::new(
                contenders::which("nginx").unwrap_or_else(|| "nginx".into()),
            )
            .arg("-v")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_default();
            out
        }),
    ]
}
