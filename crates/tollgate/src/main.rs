//! `tollgate`: a thin command line over `tollgate-server`. Arguments are parsed here; everything
//! else lives in the library crates.

mod remote;

/// mimalloc rather than glibc's malloc: a proxied request allocates and frees many small
/// buffers across threads, where glibc's allocator measured about a tenth of the CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tollgate_server::app::demo::{Demo, DemoOptions};
use tollgate_server::config::StoreConfig;
use tollgate_server::{Application, Config};

/// Tollgate: a metered API gateway. Accounts with prepaid wallets, API keys, exact billing and
/// one clear error for every failure, in front of any HTTP API.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version)]
struct Cli {
    /// Log format on stderr. The filter comes from TOLLGATE_LOG (default "info").
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TOLLGATE_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway with a config file.
    Serve {
        /// The TOML config file (environment overrides: TOLLGATE_LISTEN, TOLLGATE_DATABASE_URL,
        /// TOLLGATE_ADMIN_TOKEN).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run everything on this machine with nothing installed: the gateway on SQLite, a mock
    /// OpenAI/Anthropic/echo upstream, and a ready account and key.
    Demo {
        /// Address to listen on; port 0 picks a free port (the bound address is printed).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the SQLite database and the demo's secrets live.
        #[arg(long, default_value = "./tollgate-data")]
        data_dir: PathBuf,
        /// A TOML file laid over the demo's own config: each field it sets replaces the demo's,
        /// a list such as `[[rate_limits]]` as a whole.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a config file: print every problem, or the effective config with secrets redacted.
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Usage export to billing systems.
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// Accounts of a running server (--url/TOLLGATE_URL; as the operator with
    /// --admin-token/TOLLGATE_ADMIN_TOKEN, or as a customer with --key/TOLLGATE_KEY).
    Accounts {
        #[command(subcommand)]
        command: remote::AccountsCommand,
    },
    /// API keys of a running server.
    Keys {
        #[command(subcommand)]
        command: remote::KeysCommand,
    },
    /// Grant credits on a running server.
    Credits {
        #[command(subcommand)]
        command: remote::CreditsCommand,
    },
    /// Card payments on a running server.
    Payments {
        #[command(subcommand)]
        command: remote::PaymentsCommand,
    },
    /// An account's balance: available, held, spent this month, debt.
    Balance(remote::AccountQuery),
    /// An account's ledger: every transfer, newest first.
    Ledger(remote::LedgerArgs),
    /// An account's usage totals per day, key, route or model.
    Usage(remote::UsageArgs),
    /// The usage log: one request by its ID, or a filtered list.
    Requests {
        #[command(subcommand)]
        command: remote::RequestsCommand,
    },
    /// The billing API's holds: reserve, settle, release.
    Holds {
        #[command(subcommand)]
        command: remote::HoldsCommand,
    },
    /// The audit log of a running server.
    Audit {
        #[command(subcommand)]
        command: remote::AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ExportCommand {
    /// Compare Tollgate's charged usage per account, meter and UTC day with what a sink holds.
    /// Exits 0 when every total matches, 1 on any difference, 2 when it cannot compare.
    Verify {
        /// The TOML config file (its store and its `[[export.sinks]]`).
        #[arg(long, short)]
        config: PathBuf,
        /// The sink's name.
        #[arg(long)]
        sink: String,
        /// The first day (YYYY-MM-DD, UTC), or an RFC 3339 time (its day is taken whole).
        #[arg(long)]
        from: String,
        /// The day after the last (YYYY-MM-DD, UTC): `--from 2026-12-01 --to 2026-12-02` is one day.
        #[arg(long)]
        to: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => {
            let config = load_config(&config)?;
            let app = Application::build(config).await?;
            tracing::info!(addr = %app.local_addr(), "tollgate listening");
            app.run_until_stopped(shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            listen,
            data_dir,
            config,
        } => {
            let demo = Demo::start(DemoOptions {
                listen,
                data_dir,
                config,
            })
            .await?;
            // stdout carries only the welcome (scripts read it); logs go to stderr. A reader that
            // closes stdout early (`tollgate demo | head`) must not stop the demo, so write
            // errors are ignored rather than panicking as `println!` would.
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(demo.welcome().as_bytes())
                .and_then(|()| stdout.flush());
            demo.run_until_stopped(shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => match load_config(&file) {
            Ok(config) => {
                println!(
                    "# {} is valid. Effective config (secrets redacted):\n",
                    file.display()
                );
                print!("{}", config.raw.to_redacted_toml());
                if config.admin_token.is_none() {
                    eprintln!(
                        "warning: no admin token is set ([admin] token, or TOLLGATE_ADMIN_TOKEN): \
                         nobody can create accounts or grant credits through the management API"
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e:#}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Migrate { config } => {
            let config = load_config(&config)?;
            tollgate_server::app::open_store(&config.store).await?;
            match &config.store {
                StoreConfig::Sqlite { path } => {
                    println!("{}: migrations applied", path.display());
                }
                StoreConfig::Postgres { .. } => println!("PostgreSQL: migrations applied"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            command:
                ExportCommand::Verify {
                    config,
                    sink,
                    from,
                    to,
                },
        } => match verify_export(&config, &sink, &from, &to).await {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Accounts { command } => remote::accounts(command).await,
        Command::Keys { command } => remote::keys(command).await,
        Command::Credits { command } => remote::credits(command).await,
        Command::Payments { command } => remote::payments(command).await,
        Command::Requests { command } => remote::requests(command).await,
        Command::Balance(args) => remote::balance(args).await,
        Command::Ledger(args) => remote::ledger(args).await,
        Command::Usage(args) => remote::usage(args).await,
        Command::Holds { command } => remote::holds(command).await,
        Command::Audit { command } => remote::audit(command).await,
    }
}

/// A day as `--from`/`--to` take it: `YYYY-MM-DD`, or an RFC 3339 time.
fn parse_day(text: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|at| at.to_utc())
        .map_err(|_| anyhow::anyhow!("'{text}' is not a day (YYYY-MM-DD) or an RFC 3339 time"))
}

async fn verify_export(
    config: &Path,
    sink: &str,
    from: &str,
    to: &str,
) -> anyhow::Result<ExitCode> {
    use tollgate_server::notify::export::verify;
    use tollgate_server::notify::sinks::{render_scaled, SinkClient};
    let config = load_config(config)?;
    let (from, to) = (parse_day(from)?, parse_day(to)?);
    anyhow::ensure!(from < to, "--from must be before --to");
    let settings = config.export.sink(sink).cloned().ok_or_else(|| {
        let names: Vec<&str> = config
            .export
            .sinks
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        anyhow::anyhow!(
            "no sink named '{sink}' in the config (sinks: {})",
            names.join(", ")
        )
    })?;
    let store = tollgate_server::app::open_store(&config.store).await?;
    let report = verify(&*store, &SinkClient::new(settings), from, to).await?;
    let mut out = std::io::stdout().lock();
    for d in &report.differences {
        let customer = match (&d.customer, d.account) {
            (Some(customer), _) => customer.clone(),
            (None, Some(account)) => format!("(no customer id: {account})"),
            (None, None) => "-".to_string(),
        };
        writeln!(
            out,
            "DIFF {} {} {} tollgate={} sink={}",
            d.day.format("%Y-%m-%d"),
            customer,
            d.meter.as_str(),
            render_scaled(d.tollgate),
            render_scaled(d.sink)
        )?;
    }
    writeln!(
        out,
        "{} totals compared, {} differ{}",
        report.compared,
        report.differences.len(),
        if report.pending > 0 {
            format!(" ({} records are still waiting to be sent)", report.pending)
        } else {
            String::new()
        }
    )?;
    Ok(if report.differences.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Config::load(&text, std::env::vars()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Logs go to stderr through a background writer thread, so a request never waits on a log
/// write. The returned guard flushes what is queued when `main` returns.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// Resolves on Ctrl-C or SIGTERM, to finish in-flight requests and stop.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command's arguments are well formed (no two share a name): clap checks it here, so
    /// a clash fails the build's tests rather than a user's command.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
