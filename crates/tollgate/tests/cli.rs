//! Tests that run the real `tollgate` binary, as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{serve, write_config, BIN};
use expect_test::expect;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `tollgate demo` (killed when dropped), its welcome text and script lines.
struct RunningDemo {
    _child: Child,
    /// Kept open, as a terminal would keep it.
    _stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    welcome: String,
    vars: HashMap<String, String>,
}

async fn start_demo(data_dir: &Path) -> RunningDemo {
    start_demo_with(data_dir, &[]).await
}

async fn start_demo_with(data_dir: &Path, args: &[&str]) -> RunningDemo {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut welcome = String::new();
    let mut vars = HashMap::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            welcome.push_str(&line);
            welcome.push('\n');
            if let Some((name, value)) = line
                .split_once('=')
                .filter(|(n, _)| n.starts_with("TOLLGATE_"))
            {
                vars.insert(name.to_string(), value.to_string());
                if name == "TOLLGATE_ADMIN_TOKEN" {
                    return;
                }
            }
        }
        panic!("the demo stopped before printing its script lines:\n{welcome}");
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the demo did not start in 30 s");
    RunningDemo {
        _child: child,
        _stdout: lines,
        welcome,
        vars,
    }
}

/// The status of an echo call through a running demo.
async fn echo_status(url: &str, key: &str) -> u16 {
    let response = reqwest::Client::new()
        .get(format!("{url}/echo/hi"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

#[tokio::test]
async fn demo_prints_working_script_lines() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let url = &demo.vars["TOLLGATE_URL"];
    let key = &demo.vars["TOLLGATE_DEMO_KEY"];
    assert!(
        url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"),
        "{url}"
    );
    assert!(key.starts_with("tg_live_"));
    assert!(demo.vars["TOLLGATE_ADMIN_TOKEN"].len() >= 16);

    let http = reqwest::Client::new();
    assert_eq!(echo_status(url, key).await, 200);
    let chat = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    let no_key = http.get(format!("{url}/echo/hi")).send().await.unwrap();
    assert_eq!(no_key.status(), 401);
    assert_eq!(no_key.headers()["x-tollgate-error"], "invalid_api_key");
}

#[tokio::test]
async fn the_printed_curl_calls_work_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let calls: Vec<&str> = demo
        .welcome
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert!(calls.len() >= 6, "{}", demo.welcome);
    for call in calls {
        // Run the line exactly as printed, asking curl only to report the status it got.
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!("{call} -o /dev/null -w '%{{http_code}}'"))
            .output()
            .await
            .expect("curl must be installed to run this test");
        let status = String::from_utf8_lossy(&output.stdout).to_string();
        let expected = if call.contains("-si ") {
            "401"
        } else if call.contains("/keys")
            || call.contains("/topups")
            || call.contains("/webhook-endpoints")
        {
            "201"
        } else {
            "200"
        };
        assert_eq!(
            status,
            expected,
            "{call}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test]
async fn a_restarted_demo_reuses_its_account_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let first = start_demo(dir.path()).await;
    let (key, token) = (
        first.vars["TOLLGATE_DEMO_KEY"].clone(),
        first.vars["TOLLGATE_ADMIN_TOKEN"].clone(),
    );
    assert!(first.welcome.contains("(new;"));
    drop(first);
    let second = start_demo(dir.path()).await;
    assert_eq!(second.vars["TOLLGATE_DEMO_KEY"], key);
    assert_eq!(second.vars["TOLLGATE_ADMIN_TOKEN"], token);
    assert!(second.welcome.contains("(reused from the last run;"));
    let url = &second.vars["TOLLGATE_URL"];
    assert_eq!(echo_status(url, &key).await, 200);
}

/// The demo account's available balance, in nano-units.
async fn demo_balance(url: &str, key: &str) -> i64 {
    let balance: serde_json::Value = reqwest::Client::new()
        .get(format!("{url}/api/v1/billing/balance"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    balance["available"]["nanos"].as_i64().unwrap()
}

#[tokio::test]
async fn the_demo_charges_each_call_its_price_and_a_failure_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let (url, key) = (&demo.vars["TOLLGATE_URL"], &demo.vars["TOLLGATE_DEMO_KEY"]);
    let start = demo_balance(url, key).await;
    assert_eq!(echo_status(url, key).await, 200);
    assert_eq!(echo_status(url, key).await, 200);
    assert_eq!(
        demo_balance(url, key).await,
        start - 2_000_000,
        "0.001 a call"
    );
    let failed = reqwest::Client::new()
        .get(format!("{url}/echo/hi"))
        .bearer_auth(key)
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    assert_eq!(demo_balance(url, key).await, start - 2_000_000, "free");
}

#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tollgate.toml");
    std::fs::write(
        &file,
        "[admin]\ntoken = \"an-admin-token-that-is-long\"\n\
         [[routes]]\nprefix = \"/v1\"\nupstream = \"https://api.example.com/v1\"\ngroup = \"llm\"\n\
         upstream_headers = { authorization = \"Bearer sk-secret\", \"anthropic-version\" = \"2023-06-01\" }\n",
    )
    .unwrap();
    let check = |file: std::path::PathBuf| async move {
        let output = Command::new(BIN)
            .arg("check-config")
            .arg(&file)
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        (
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (stdout, stderr) = check(file).await;
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("token = \"<redacted>\""), "{stdout}");
    assert!(
        stdout.contains("authorization = \"<redacted>\""),
        "{stdout}"
    );
    assert!(!stdout.contains("sk-secret") && !stdout.contains("an-admin-token-that-is-long"));
    // Only secrets are redacted; the defaults the file left out are shown, rate limits included.
    assert!(
        stdout.contains("anthropic-version = \"2023-06-01\""),
        "{stdout}"
    );
    assert!(stdout.contains("name = \"per-key\""), "{stdout}");
    assert!(stdout.contains("max_body_bytes = 10485760"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");

    // Without an admin token the config is valid, with a warning that says what that means.
    let bare = dir.path().join("bare.toml");
    std::fs::write(
        &bare,
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"https://api.example.com/v1\"\ngroup = \"llm\"\n",
    )
    .unwrap();
    let (_, stderr) = check(bare).await;
    assert!(
        stderr.contains("warning: no admin token is set"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_config_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"nowhere\"\n[[routes]]\nprefix = \"/api/x\"\nupstream = \"http://h\"\ngroup = \"g\"\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .arg("check-config")
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("2 problems in the config"), "{stderr}");
    assert!(
        stderr.contains("server.listen: must be an address and port"),
        "{stderr}"
    );
    assert!(
        stderr.contains("routes[0].prefix: '/api/x' overlaps '/api'"),
        "{stderr}"
    );
}

#[tokio::test]
async fn help_lists_the_commands() {
    let output = Command::new(BIN).arg("--help").output().await.unwrap();
    expect![[r#"
        Tollgate: a metered API gateway. Accounts with prepaid wallets, API keys, exact billing and one clear error for every failure, in front of any HTTP API

        Usage: tollgate [OPTIONS] <COMMAND>

        Commands:
          serve         Run the gateway with a config file
          demo          Run everything on this machine with nothing installed: the gateway on SQLite, a mock OpenAI/Anthropic/echo upstream, and a ready account and key
          check-config  Check a config file: print every problem, or the effective config with secrets redacted
          migrate       Apply pending database migrations and exit
          export        Usage export to billing systems
          accounts      Accounts of a running server (--url/TOLLGATE_URL; as the operator with --admin-token/TOLLGATE_ADMIN_TOKEN, or as a customer with --key/TOLLGATE_KEY)
          keys          API keys of a running server
          credits       Grant credits on a running server
          payments      Card payments on a running server
          balance       An account's balance: available, held, spent this month, debt
          ledger        An account's ledger: every transfer, newest first
          usage         An account's usage totals per day, key, route or model
          requests      The usage log: one request by its ID, or a filtered list
          holds         The billing API's holds: reserve, settle, release
          audit         The audit log of a running server
          help          Print this message or the help of the given subcommand(s)

        Options:
              --log-format <LOG_FORMAT>  Log format on stderr. The filter comes from TOLLGATE_LOG (default "info") [env: TOLLGATE_LOG_FORMAT=] [default: text] [possible values: text, json]
          -h, --help                     Print help
          -V, --version                  Print version
    "#]].assert_eq(&String::from_utf8_lossy(&output.stdout));
}

#[tokio::test]
async fn serve_runs_a_config_file_and_migrate_prepares_its_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/tollgate.db");
    let file = write_config(dir.path(), &db, "");

    let migrate = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert!(db.exists());

    let (_server, url) = serve(&file, "a-long-enough-admin-token").await;
    let http = reqwest::Client::new();
    let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // The admin token came from the environment.
    let created = http
        .post(format!("{url}/api/v1/accounts"))
        .bearer_auth("a-long-enough-admin-token")
        .json(&serde_json::json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
}

/// `tollgate export verify`: 0 when the sink holds what Tollgate charged, 1 with each difference
/// printed, 2 when it cannot compare.
#[tokio::test]
async fn export_verify_exits_0_on_a_match_1_on_a_difference_and_2_when_it_cannot_compare() {
    use tollgate_mock::sinks::{Api, FakeSinks};
    let sinks = FakeSinks::start("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", true)
        .await
        .unwrap();
    let mock = tollgate_mock::MockUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(
        dir.path(),
        &dir.path().join("tollgate.db"),
        &format!(
            "[export]\npoll_interval = \"20ms\"\n[[export.sinks]]\nname = \"lago\"\nkind = \"lago\"\n\
             url = \"{}\"\nsecret = \"lago-key\"\n\
             meters = {{ cost = \"api_cost\", requests = \"calls\" }}\n{}",
            sinks.url(),
            common::echo_route(&mock.url())
        ),
    );
    let admin = "a-long-enough-admin-token";
    let (server, url) = serve(&file, admin).await;
    let http = reqwest::Client::new();
    let (_, key) = common::create_account(&http, &url, admin, "acme").await;
    for _ in 0..3 {
        let call = http
            .get(format!("{url}/echo/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(call.status(), 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sinks.held(Api::Lago).len() < 6 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sinks.held(Api::Lago).len(), 6);
    drop(server);

    let tomorrow = (chrono::Utc::now() + chrono::TimeDelta::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let verify = |sink: &str| {
        let mut command = Command::new(BIN);
        command
            .args(["export", "verify", "--config"])
            .arg(&file)
            .args(["--sink", sink, "--from", "2020-01-01", "--to", &tomorrow]);
        command.output()
    };
    let matched = verify("lago").await.unwrap();
    let out = String::from_utf8_lossy(&matched.stdout).to_string();
    assert_eq!(
        matched.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&matched.stderr)
    );
    assert!(out.contains("2 totals compared, 0 differ"), "{out}");

    // A charged call the sink never got.
    let db = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    sqlx::query(
        "INSERT INTO usage_exports (request_id, account_id, key_id, route, model, billing_status, \
         cost_nanos, input_tokens, cached_input_tokens, output_tokens, at) \
         SELECT 'req_01JXTRA0000000000000000000', account_id, key_id, route, NULL, 'settled', \
         2500000, 0, 0, 0, at FROM usage_exports LIMIT 1",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let differs = verify("lago").await.unwrap();
    let out = String::from_utf8_lossy(&differs.stdout).to_string();
    assert_eq!(differs.status.code(), Some(1), "{out}");
    assert!(out.contains(" cost tollgate=0.0055 sink=0.003"), "{out}");
    assert!(out.contains(" requests tollgate=4 sink=3"), "{out}");

    let unknown = verify("nope").await.unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no sink named 'nope'"));
}

#[tokio::test]
async fn the_demo_keeps_serving_when_its_stdout_is_closed() {
    // As in `tollgate demo | head -3`: the reader goes away after the welcome.
    let dir = tempfile::tempdir().unwrap();
    let RunningDemo {
        _child: child,
        _stdout: stdout,
        vars,
        ..
    } = start_demo(dir.path()).await;
    drop(stdout);
    for _ in 0..3 {
        let status = echo_status(&vars["TOLLGATE_URL"], &vars["TOLLGATE_DEMO_KEY"]).await;
        assert_eq!(status, 200);
    }
    drop(child);
}

#[tokio::test]
async fn the_official_openai_and_anthropic_sdks_work_unchanged() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = repo.join("target/test-venv/bin/python");
    if !python.exists() {
        let message = "the official SDKs are not installed: run scripts/install-test-tools";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("SKIPPED the_official_openai_and_anthropic_sdks_work_unchanged: {message}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let output = Command::new(python)
        .arg(repo.join("crates/tollgate/tests/python/check_sdks.py"))
        .env("TOLLGATE_URL", &demo.vars["TOLLGATE_URL"])
        .env("TOLLGATE_DEMO_KEY", &demo.vars["TOLLGATE_DEMO_KEY"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout, "openai ok\nanthropic ok\n");
}

/// The repository and the Python that drives Chromium with Playwright; `None` (the test skips)
/// where they are not installed, which fails under `CI=true`.
fn browser_tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = repo.join("target/test-venv/bin/python");
    if python.exists() && Path::new("/usr/bin/chromium").exists() {
        return Some((repo, python));
    }
    let message = "Playwright or Chromium is missing: run scripts/install-test-tools and \
                   apt-get install chromium";
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
    eprintln!("SKIPPED {test}: {message}");
    None
}

#[tokio::test]
async fn the_swagger_ui_renders_offline_and_try_it_out_works_against_the_demo() {
    let Some((repo, python)) =
        browser_tools("the_swagger_ui_renders_offline_and_try_it_out_works_against_the_demo")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let screenshot = repo.join("target/swagger-ui.png");
    let output = Command::new(python)
        .arg(repo.join("crates/tollgate/tests/python/check_docs.py"))
        .env("TOLLGATE_URL", &demo.vars["TOLLGATE_URL"])
        .env("TOLLGATE_DEMO_KEY", &demo.vars["TOLLGATE_DEMO_KEY"])
        .env("SCREENSHOT", &screenshot)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for line in [
        "openapi.json is valid OpenAPI 3.1.0",
        "authorized with the demo key",
        "GET /api/v1/billing/balance answered 200",
        "POST /api/v1/keys with the example body answered 201",
        "no request left this server",
    ] {
        assert!(stdout.contains(line), "{line}\n{stdout}");
    }
}

#[tokio::test]
async fn the_console_signs_in_shows_the_balance_and_signs_out_in_a_real_browser() {
    let Some((repo, python)) =
        browser_tools("the_console_signs_in_shows_the_balance_and_signs_out_in_a_real_browser")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    assert!(demo.welcome.contains("/console/"), "{}", demo.welcome);
    // Pictures of every page, kept as test artefacts.
    let screenshots = repo.join("target/console-screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    let output = Command::new(python)
        .arg(repo.join("crates/tollgate/tests/python/check_console.py"))
        .env("TOLLGATE_URL", &demo.vars["TOLLGATE_URL"])
        .env("TOLLGATE_DEMO_KEY", &demo.vars["TOLLGATE_DEMO_KEY"])
        .env("TOLLGATE_ADMIN_TOKEN", &demo.vars["TOLLGATE_ADMIN_TOKEN"])
        .env("TOLLGATE_DEMO_STRIPE", &demo.vars["TOLLGATE_DEMO_STRIPE"])
        .env(
            "TOLLGATE_DEMO_WEBHOOKS",
            &demo.vars["TOLLGATE_DEMO_WEBHOOKS"],
        )
        .env("SCREENSHOTS", &screenshots)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for size in ["desktop", "phone"] {
        for line in [
            "signed in with the demo key and saw the balance",
            "the session is one HttpOnly, Secure, SameSite=Strict cookie; no script sees it",
            "signed out; the cookie is gone",
        ] {
            assert!(
                stdout.contains(&format!("{size}: {line}")),
                "{size}: {line}\n{stdout}"
            );
        }
    }
    for line in [
        "desktop: made a key, called with it, the balance moved by",
        "desktop: found the call by its request ID; it was charged what the balance moved",
        "desktop: revoked the key in the console; it is refused",
        "desktop: rolled a key; both secrets work through the grace period; the copy button shows",
        "desktop: the usage charts drew; the requests filter showed only 2xx, in place",
        "phone: the usage charts drew; the requests filter showed only 2xx, in place",
        "desktop: revoking the key a session was made with ended the session; the key is refused",
        "operator: signed in with the admin token, saw the accounts, signed out",
        "desktop: added 25 credits by card at the payment page; the balance shows them once",
        "desktop: refunded 10 at the payment provider; the wallet took back exactly that",
        "desktop: added a webhook endpoint, saw its secret once; a test arrived signed and shows in its log",
    ] {
        assert!(stdout.contains(line), "{line}\n{stdout}");
    }
    assert!(
        stdout.contains("no request left this server, none failed, and the policy refused nothing"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_config_file_laid_over_the_demo_replaces_what_it_sets_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("over.toml");
    std::fs::write(
        &file,
        "[[rate_limits]]\nname = \"anonymous-per-ip\"\nscope = \"ip\"\nunit = \"requests\"\n\
         limit = 2\nwindow = \"1m\"\nburst = 2\n",
    )
    .unwrap();
    let demo = start_demo_with(
        &dir.path().join("data"),
        &["--config", file.to_str().unwrap()],
    )
    .await;
    let url = &demo.vars["TOLLGATE_URL"];
    // The demo's routes and key are still there...
    assert_eq!(echo_status(url, &demo.vars["TOLLGATE_DEMO_KEY"]).await, 200);
    // ... and its anonymous limit is the file's (the demo's own allows 100 at once): a burst
    // of two calls without a key, then 429.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(echo_status(url, "").await);
    }
    assert_eq!(statuses[..2], [401, 401]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
}

/// schemathesis, every check, with the admin token and with the demo's master key: the document
/// describes what the server does (crates/tollgate/tests/schemathesis/ says how it runs).
#[tokio::test]
async fn schemathesis_finds_no_difference_between_the_document_and_the_server() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let schemathesis = repo.join("target/test-venv/bin/schemathesis");
    if !schemathesis.exists() {
        let message = "schemathesis is not installed: run scripts/install-test-tools";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("SKIPPED schemathesis_finds_no_difference_between_the_document_and_the_server: {message}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let suite = repo.join("crates/tollgate/tests/schemathesis");
    let overrides = suite.join("demo.toml");
    let demo = start_demo_with(dir.path(), &["--config", overrides.to_str().unwrap()]).await;
    let url = &demo.vars["TOLLGATE_URL"];
    for (who, credential) in [
        ("admin token", &demo.vars["TOLLGATE_ADMIN_TOKEN"]),
        ("master key", &demo.vars["TOLLGATE_DEMO_KEY"]),
    ] {
        let output = Command::new(&schemathesis)
            .current_dir(&suite)
            .env("PYTHONPATH", &suite)
            .args([
                "--config-file",
                "schemathesis.toml",
                "run",
                "--checks",
                "all",
                "--no-color",
            ])
            .arg("-H")
            .arg(format!("Authorization: Bearer {credential}"))
            .arg(format!("{url}/api/openapi.json"))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "with the {who}:\n{stdout}\n{stderr}"
        );
        let summary = stdout.lines().last().unwrap_or_default();
        assert!(!summary.contains("failure"), "with the {who}: {summary}");
        eprintln!("schemathesis with the {who}: {summary}");
    }
}

#[tokio::test]
async fn migrate_and_check_config_on_postgresql_given_by_the_environment() {
    let Some(schema) = tollgate_store::testing::TestSchema::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The file names SQLite; TOLLGATE_DATABASE_URL replaces it.
    let file = write_config(dir.path(), &dir.path().join("unused.db"), "");
    let migrate = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&file)
        .env("TOLLGATE_DATABASE_URL", schema.url())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&migrate.stdout);
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert_eq!(stdout.trim(), "PostgreSQL: migrations applied");
    assert!(!dir.path().join("unused.db").exists());

    // check-config shows the URL without its password.
    let with_password = schema.url().replacen("postgres@", "postgres:hunter2@", 1);
    let checked = Command::new(BIN)
        .args(["check-config"])
        .arg(&file)
        .env("TOLLGATE_DATABASE_URL", &with_password)
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{shown}");
    assert!(shown.contains("postgres://postgres:<redacted>@"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// The README's tour runs as written against the demo, in one shell, with `tollgate` on the
/// `PATH`: every `curl` annotated with a status (`# 403 ip_not_allowed`) must get it, and every
/// other command must succeed. api.md's rate-limit override examples are sent too, on the demo's
/// own key and account. Only the tour's first line is not run: it is the template for the
/// demo's printed values, which the test exports itself.
#[tokio::test]
async fn the_readme_tour_and_the_api_examples_run_as_written_against_the_demo() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let tour = readme
        .split("## A five-minute tour")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has its tour");
    let mut script = String::from("set -euo pipefail\n");
    let mut expected = Vec::new();
    for block in tour.split("```sh\n").skip(1) {
        let block = block.split("```").next().unwrap();
        for line in block.lines() {
            if line.starts_with("export TOLLGATE_URL=") {
                continue;
            }
            let annotated = line
                .starts_with("curl ")
                .then(|| line.rsplit_once("# "))
                .flatten()
                .filter(|(_, note)| {
                    note.len() >= 3 && note[..3].bytes().all(|b| b.is_ascii_digit())
                });
            match annotated {
                Some((command, note)) => {
                    expected.push(format!("{} {}", &note[..3], line.trim()));
                    script.push_str(&format!(
                        "{} -o /dev/null -w '\\ntour-status %{{http_code}}\\n'\n",
                        command.trim_end()
                    ));
                }
                None => {
                    script.push_str(line);
                    script.push('\n');
                }
            }
        }
    }
    assert!(
        expected.len() >= 5,
        "the tour's annotated calls: {expected:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path()).await;
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .envs(&demo.vars)
        .env("PATH", path)
        .env_remove("TOLLGATE_KEY")
        .output()
        .await
        .expect("bash and curl run the tour");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the tour stopped:\n{stdout}\n{stderr}\n--- script ---\n{script}"
    );
    let got: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("tour-status "))
        .collect();
    assert_eq!(got.len(), expected.len(), "{stdout}");
    for (status, call) in got.iter().zip(&expected) {
        assert_eq!(*status, &call[..3], "{call}");
    }
    assert!(stdout.contains("audit log intact"), "{stdout}");

    // api.md's override examples, on the demo's own key and account, by the admin token.
    let api = std::fs::read_to_string(repo.join("docs/api.md")).unwrap();
    let url = &demo.vars["TOLLGATE_URL"];
    let http = reqwest::Client::new();
    let me: serde_json::Value = http
        .get(format!("{url}/api/v1/key"))
        .bearer_auth(&demo.vars["TOLLGATE_DEMO_KEY"])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let examples: Vec<&str> = api
        .lines()
        .filter(|l| l.starts_with("PATCH /api/v1/"))
        .collect();
    assert!(examples.len() >= 2, "api.md's override examples");
    for example in examples {
        let (target, body) = example["PATCH ".len()..]
            .split_once(char::is_whitespace)
            .unwrap();
        let target = target
            .replace("key_...", me["id"].as_str().unwrap())
            .replace("acct_...", me["account_id"].as_str().unwrap());
        let body: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
        let response = http
            .patch(format!("{url}{target}"))
            .bearer_auth(&demo.vars["TOLLGATE_ADMIN_TOKEN"])
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(status, 200, "{example}: {}", response.text().await.unwrap());
    }
}
