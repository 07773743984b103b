//! Each contender started the way its users would run it, in front of the same upstream: nothing
//! (direct), the bare proxy, nginx, Tollgate at each step on SQLite and as a two-node cluster on
//! PostgreSQL + Redis, and LiteLLM's proxy.

use crate::load::Target;
use crate::procs::{self, Proc};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
const LITELLM_MASTER_KEY: &str = "sk-bench-master-key";
/// The model the mock serves and every contender routes.
pub const MODEL: &str = "mock-gpt";

/// The request every run sends: a short chat completion.
pub fn chat_body(stream: bool) -> String {
    let mut body = json!({
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hello there, how are you today?"}],
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body.to_string()
}

/// Where things are and which cores they run on.
pub struct Env {
    pub tollgate: PathBuf,
    pub bench: PathBuf,
    pub work: PathBuf,
    pub contender_core: usize,
    pub generator_core: usize,
    pub http: reqwest::Client,
    /// Keeps side-by-side clusters apart: each tag has its own PostgreSQL schemas and Redis
    /// databases (0 for the suite and a comparison's baseline, 1 for its candidate).
    pub tag: usize,
}

impl Env {
    fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

/// A running contender: its processes (measured together) and the endpoints load goes to (one
/// per node).
pub struct Contender {
    pub name: String,
    pub procs: Vec<Proc>,
    pub bases: Vec<String>,
    /// Headers every request carries (the API key).
    pub headers: Vec<(String, String)>,
    /// The account's master key, where the contender is Tollgate.
    pub tollgate_key: Option<String>,
}

impl Contender {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    pub fn targets(&self, stream: bool) -> Vec<Target> {
        self.bases
            .iter()
            .map(|base| Target {
                url: format!("{base}/v1/chat/completions"),
                headers: self.headers.clone(),
                body: chat_body(stream),
            })
            .collect()
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }
}

/// The mock upstream, with `latency` before each answer.
pub async fn upstream(env: &Env, latency: Duration) -> anyhow::Result<(Proc, SocketAddr)> {
    let port = procs::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = env.dir(&format!("upstream-{}ms", latency.as_millis()))?;
    let mut proc = Proc::start(
        "upstream",
        Some(env.generator_core),
        &env.bench,
        &[
            "upstream",
            "--listen",
            &addr.to_string(),
            "--latency-ms",
            &latency.as_millis().to_string(),
        ],
        &[],
        &log.join("log"),
    )?;
    // The mock answers GET on its echo API.
    procs::wait_ready(
        &env.http,
        &format!("http://{addr}/echo"),
        Duration::from_secs(10),
        &mut proc,
    )
    .await?;
    Ok((proc, addr))
}

pub fn direct(upstream: SocketAddr) -> Contender {
    Contender {
        name: "direct".into(),
        procs: Vec::new(),
        bases: vec![format!("http://{upstream}")],
        headers: Vec::new(),
        tollgate_key: None,
    }
}

pub async fn bare_proxy(env: &Env, upstream: SocketAddr) -> anyhow::Result<Contender> {
    let port = procs::free_port()?;
    let dir = env.dir("bare-proxy")?;
    let mut proc = Proc::start(
        "bare proxy",
        Some(env.contender_core),
        &env.bench,
        &[
            "bare-proxy",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &upstream.to_string(),
        ],
        &[],
        &dir.join("log"),
    )?;
    let base = format!("http://127.0.0.1:{port}");
    procs::wait_ready(
        &env.http,
        &format!("{base}/echo"),
        Duration::from_secs(10),
        &mut proc,
    )
    .await?;
    Ok(Contender {
        name: "bare hyper proxy".into(),
        procs: vec![proc],
        bases: vec![base],
        headers: Vec::new(),
        tollgate_key: None,
    })
}

/// nginx as the fast-proxy anchor: a static map of ten API keys, `limit_req` per key, keep-alive
/// to the upstream, no access log.
pub async fn nginx(env: &Env, upstream: SocketAddr) -> anyhow::Result<Contender> {
    let port = procs::free_port()?;
    let dir = env.dir("nginx")?;
    let keys: Vec<String> = (0..10).map(|i| format!("nk_bench_key_{i:02}")).collect();
    let mut map = String::new();
    for (i, key) in keys.iter().enumerate() {
        let _ = writeln!(map, "    \"Bearer {key}\" client{i};");
    }
    let d = dir.display();
    let conf = format!(
        r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  map $http_authorization $api_client {{
    default "";
{map}  }}
  limit_req_zone $api_client zone=per_key:10m rate=1000000r/s;
  upstream mock {{ server {upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      if ($api_client = "") {{ return 401 '{{"error":"invalid_api_key"}}'; }}
      limit_req zone=per_key burst=1000000 nodelay;
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let nginx = which("nginx").context("nginx is not installed (apt-get install nginx-light)")?;
    let mut proc = Proc::start(
        "nginx",
        Some(env.contender_core),
        &nginx,
        &[
            "-p",
            &dir.display().to_string(),
            "-e",
            &dir.join("error.log").display().to_string(),
            "-c",
            &conf_path.display().to_string(),
            "-g",
            "daemon off;",
        ],
        &[],
        &dir.join("log"),
    )?;
    let base = format!("http://127.0.0.1:{port}");
    let headers = vec![("authorization".into(), format!("Bearer {}", keys[3]))];
    wait_answering(env, &base, &headers, &mut proc).await?;
    Ok(Contender {
        name: "nginx (key map + limit_req)".into(),
        procs: vec![proc],
        bases: vec![base],
        headers,
        tollgate_key: None,
    })
}

/// What a Tollgate contender has switched on, cumulatively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Step {
    PassThrough,
    KeyAuth,
    RateLimits,
    HoldSettle,
    UsageLog,
}

impl Step {
    pub const ALL: [Step; 5] = [
        Step::PassThrough,
        Step::KeyAuth,
        Step::RateLimits,
        Step::HoldSettle,
        Step::UsageLog,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Step::PassThrough => "pass-through",
            Step::KeyAuth => "+ key auth",
            Step::RateLimits => "+ rate limits",
            Step::HoldSettle => "+ hold/settle",
            Step::UsageLog => "+ usage log (everything on)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Step::PassThrough => "pass",
            Step::KeyAuth => "auth",
            Step::RateLimits => "limits",
            Step::HoldSettle => "hold",
            Step::UsageLog => "all",
        }
    }
}

/// Tollgate's config for `step`: one `/v1` route to the upstream. Rate limits are set so high
/// that they are checked on every request but never refuse; prices are per model, so a call is
/// held, metered from the response's usage and settled.
fn tollgate_config(step: Step, upstream: SocketAddr, store: &str, redis: Option<&str>) -> String {
    let mut toml = String::new();
    if step < Step::RateLimits {
        // No policies at all (the defaults would limit the load).
        toml.push_str("rate_limits = []\n");
    }
    let _ = write!(
        toml,
        "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"{store}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n[billing]\nusage_log = {}\n",
        step >= Step::UsageLog
    );
    if let Some(redis) = redis {
        let _ = write!(toml, "[redis]\nurl = \"{redis}\"\n");
    }
    if step >= Step::RateLimits {
        for scope in ["key", "account"] {
            let _ = write!(
                toml,
                "[[rate_limits]]\nname = \"per-{scope}\"\nscope = \"{scope}\"\nlimit = 1000000000\nwindow = \"1s\"\nburst = 1000000000\n"
            );
        }
    }
    let _ = write!(
        toml,
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{upstream}/v1\"\ngroup = \"llm\"\n"
    );
    if step == Step::PassThrough {
        toml.push_str("auth = \"none\"\n");
    }
    if step >= Step::HoldSettle {
        let _ = write!(
            toml,
            "kind = \"openai\"\nerror_profile = \"openai\"\n[routes.models.\"{MODEL}\"]\ninput = \"1\"\noutput = \"2\"\n"
        );
    }
    toml
}

/// Tollgate at `step`: one node on SQLite, or (`cluster`) two nodes sharing PostgreSQL and Redis,
/// with an account of a million credits.
pub async fn tollgate(
    env: &Env,
    step: Step,
    cluster: bool,
    upstream: SocketAddr,
) -> anyhow::Result<Contender> {
    let store = if cluster { "pg" } else { "sqlite" };
    let slug = format!("tollgate-{store}-{}", step.slug());
    let mut contender = start_nodes(env, &slug, step, cluster, upstream, true).await?;
    contender.name = format!(
        "Tollgate {} {}",
        if cluster { "2-node PG+Redis" } else { "SQLite" },
        step.label()
    );
    let key = create_account(&env.http, &contender.bases[0], "bench").await?;
    if step != Step::PassThrough {
        contender.headers = vec![("authorization".into(), format!("Bearer {key}"))];
    }
    contender.tollgate_key = Some(key);
    for base in contender.bases.clone() {
        wait_answering(env, &base, &contender.headers, &mut contender.procs[0]).await?;
    }
    Ok(contender)
}

/// One SQLite node at `step` in its own fresh directory `slug`, with an account.
pub async fn tollgate_node(
    env: &Env,
    slug: &str,
    step: Step,
    upstream: SocketAddr,
) -> anyhow::Result<Contender> {
    let mut contender = start_nodes(env, slug, step, false, upstream, true).await?;
    let key = create_account(&env.http, &contender.bases[0], "bench").await?;
    contender.headers = vec![("authorization".into(), format!("Bearer {key}"))];
    contender.tollgate_key = Some(key);
    Ok(contender)
}

/// The node of [`tollgate_node`] started again over the data it left.
pub async fn tollgate_reopen(
    env: &Env,
    slug: &str,
    step: Step,
    upstream: SocketAddr,
) -> anyhow::Result<Contender> {
    start_nodes(env, slug, step, false, upstream, false).await
}

async fn start_nodes(
    env: &Env,
    slug: &str,
    step: Step,
    cluster: bool,
    upstream: SocketAddr,
    fresh: bool,
) -> anyhow::Result<Contender> {
    let dir = if fresh {
        env.dir(slug)?
    } else {
        env.work.join(slug)
    };
    let (store, redis) = if cluster {
        let schema = match env.tag {
            0 => format!("bench_{}", step.slug()),
            tag => format!("bench_{}_{tag}", step.slug()),
        };
        psql(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};"
        ))?;
        let step_index = Step::ALL.iter().position(|s| *s == step).unwrap_or(0);
        let db = env.tag * Step::ALL.len() + step_index + 1;
        (
            format!("postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D{schema}"),
            Some(format!("redis://127.0.0.1:6379/{db}")),
        )
    } else {
        (
            format!("sqlite://{}", dir.join("tollgate.db").display()),
            None,
        )
    };
    let config = dir.join("tollgate.toml");
    std::fs::write(
        &config,
        tollgate_config(step, upstream, &store, redis.as_deref()),
    )?;
    let nodes = if cluster { 2 } else { 1 };
    let mut procs = Vec::new();
    let mut bases = Vec::new();
    for node in 0..nodes {
        let port = procs::free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut proc = Proc::start(
            &format!("{slug} node {node}"),
            Some(env.contender_core),
            &env.tollgate,
            &["serve", "--config", &config.display().to_string()],
            &[("TOLLGATE_LISTEN", &listen), ("TOLLGATE_LOG", "warn")],
            &dir.join(format!("node{node}.log")),
        )?;
        let base = format!("http://{listen}");
        procs::wait_ready(
            &env.http,
            &format!("{base}/readyz"),
            Duration::from_secs(60),
            &mut proc,
        )
        .await?;
        procs.push(proc);
        bases.push(base);
    }
    Ok(Contender {
        name: slug.to_string(),
        procs,
        bases,
        headers: Vec::new(),
        tollgate_key: None,
    })
}

/// Creates an account with a million credits; returns its master key.
pub async fn create_account(
    http: &reqwest::Client,
    base: &str,
    name: &str,
) -> anyhow::Result<String> {
    let created: Value = http
        .post(format!("{base}/api/v1/accounts"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": name}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["account"]["id"].as_str().context("account id")?;
    let key = created["master_key"]["secret"]
        .as_str()
        .context("master key")?
        .to_string();
    http.post(format!("{base}/api/v1/accounts/{id}/credits"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"amount": "1000000", "reason": "benchmark"}))
        .send()
        .await?
        .error_for_status()?;
    Ok(key)
}

/// LiteLLM's proxy with one worker per core. First with virtual keys and budgets in PostgreSQL;
/// if that cannot start here, with its master key and in-config limits. Returns the contender and
/// the exact error of the database mode, if it failed.
pub async fn litellm(
    env: &Env,
    upstream: SocketAddr,
    litellm: &Path,
    workers: usize,
) -> anyhow::Result<(Contender, Option<String>)> {
    let dir = env.dir("litellm")?;
    let database = "postgresql://postgres@127.0.0.1:5432/litellm_bench";
    let _ = psql("DROP DATABASE IF EXISTS litellm_bench");
    psql("CREATE DATABASE litellm_bench")?;
    let model_list = format!(
        "model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n      api_base: http://{upstream}/v1\n      api_key: sk-upstream\n      rpm: 100000000\n"
    );
    let with_db = format!(
        "{model_list}general_settings:\n  master_key: {LITELLM_MASTER_KEY}\n  database_url: {database}\n"
    );
    match start_litellm(env, &dir, "db", &with_db, litellm, workers).await {
        Ok((proc, base)) => {
            // A virtual key with a budget, as a paying customer would hold.
            let key: Value = env
                .http
                .post(format!("{base}/key/generate"))
                .bearer_auth(LITELLM_MASTER_KEY)
                .json(&json!({"max_budget": 1000000, "models": [MODEL], "rpm_limit": 100000000}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let key = key["key"].as_str().context("virtual key")?.to_string();
            let mut contender = Contender {
                name: "LiteLLM (virtual key + budget, PostgreSQL)".into(),
                procs: vec![proc],
                bases: vec![base.clone()],
                headers: vec![("authorization".into(), format!("Bearer {key}"))],
                tollgate_key: None,
            };
            wait_answering(
                env,
                &base,
                &contender.headers.clone(),
                &mut contender.procs[0],
            )
            .await?;
            Ok((contender, None))
        }
        Err(db_error) => {
            let fallback = format!(
                "{model_list}general_settings:\n  master_key: {LITELLM_MASTER_KEY}\nlitellm_settings:\n  max_budget: 1000000\n  budget_duration: 30d\n"
            );
            let (mut proc, base) =
                start_litellm(env, &dir, "config", &fallback, litellm, workers).await?;
            let headers = vec![(
                "authorization".to_string(),
                format!("Bearer {LITELLM_MASTER_KEY}"),
            )];
            wait_answering(env, &base, &headers, &mut proc).await?;
            Ok((
                Contender {
                    name: "LiteLLM (master key + in-config limits)".into(),
                    procs: vec![proc],
                    bases: vec![base],
                    headers,
                    tollgate_key: None,
                },
                Some(format!("{db_error:#}")),
            ))
        }
    }
}

async fn start_litellm(
    env: &Env,
    dir: &Path,
    name: &str,
    config: &str,
    litellm: &Path,
    workers: usize,
) -> anyhow::Result<(Proc, String)> {
    let config_path = dir.join(format!("{name}.yaml"));
    std::fs::write(&config_path, config)?;
    let port = procs::free_port()?;
    let log = dir.join(format!("{name}.log"));
    let mut proc = Proc::start(
        &format!("litellm ({name})"),
        None,
        litellm,
        &[
            "--config",
            &config_path.display().to_string(),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--num_workers",
            &workers.to_string(),
        ],
        &[
            ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
            ("LITELLM_LOG", "ERROR"),
            ("DISABLE_ADMIN_UI", "True"),
        ],
        &log,
    )?;
    let base = format!("http://127.0.0.1:{port}");
    let ready = procs::wait_ready(
        &env.http,
        &format!("{base}/health/liveliness"),
        Duration::from_secs(180),
        &mut proc,
    )
    .await;
    if let Err(e) = ready {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{e}; its log ends: {}", tail.join(" | "));
    }
    Ok((proc, base))
}

/// Sends one chat completion and fails unless it succeeds: a contender is only measured once it
/// serves the benchmark request end to end.
async fn wait_answering(
    env: &Env,
    base: &str,
    headers: &[(String, String)],
    proc: &mut Proc,
) -> anyhow::Result<()> {
    let mut last = String::new();
    for _ in 0..100 {
        proc.check_alive()?;
        let mut request = env
            .http
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat_body(false));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                last = format!(
                    "{}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                )
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{} does not serve the benchmark request: {last}", proc.name)
}

/// Runs SQL on the local PostgreSQL's `test` database.
pub fn psql(sql: &str) -> anyhow::Result<()> {
    let output = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-q",
            "-c",
            sql,
        ])
        .output()
        .context("running psql")?;
    if !output.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}
