//! The admin CLI against a running `tollgate serve`: create an account and a key, use the key,
//! look its request up, grant credits, roll and revoke, in tables and as JSON; a refusal is
//! explained with its code and request ID and exits 1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{echo_route, serve, write_config, BIN};
use serde_json::Value;
use std::net::SocketAddr;

const ADMIN: &str = "cli-test-admin-token-0123";

struct Cli {
    url: String,
}

impl Cli {
    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        self.run_with(args, &[("TOLLGATE_ADMIN_TOKEN", ADMIN)])
            .await
    }

    /// Runs as a customer: the master key, and no admin token.
    async fn run_as(&self, key: &str, args: &[&str]) -> (i32, String, String) {
        self.run_with(args, &[("TOLLGATE_KEY", key)]).await
    }

    async fn json_as(&self, key: &str, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let (code, stdout, stderr) = self.run_as(key, &args).await;
        assert_eq!(code, 0, "{args:?}: {stderr}");
        serde_json::from_str(&stdout).unwrap()
    }

    async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let output = tokio::process::Command::new(BIN)
            .args(args)
            .args(["--url", &self.url])
            .env_remove("TOLLGATE_ADMIN_TOKEN")
            .env_remove("TOLLGATE_KEY")
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let (code, stdout, stderr) = self.run(&args).await;
        assert_eq!(code, 0, "{args:?}: {stderr}");
        serde_json::from_str(&stdout).unwrap()
    }
}

/// A `tollgate serve` with an echo route on the mock, and starter credits of 5.
struct Server {
    _mock: tollgate_mock::MockUpstream,
    _dir: tempfile::TempDir,
    _server: tokio::process::Child,
}

impl Server {
    async fn start() -> (Server, Cli) {
        let mock = tollgate_mock::MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            &dir.path().join("tollgate.db"),
            &format!(
                "[billing]\nstarter_credits = \"5\"\n{}",
                echo_route(&mock.url())
            ),
        );
        let (server, url) = serve(&config, ADMIN).await;
        let running = Server {
            _mock: mock,
            _dir: dir,
            _server: server,
        };
        (running, Cli { url })
    }
}

#[tokio::test]
async fn an_operator_manages_accounts_and_keys_and_reads_a_request_from_the_command_line() {
    let (_server, cli) = Server::start().await;
    let url = cli.url.clone();

    // Tables by default: the account, then its master key's secret on a line of its own.
    let (code, stdout, _) = cli
        .run(&["accounts", "create", "--name", "Acme Corp"])
        .await;
    assert_eq!(code, 0);
    let mut lines = stdout.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("ID") && header.contains("NAME") && header.contains("BALANCE"));
    let row = lines.next().unwrap();
    assert!(
        row.contains("Acme Corp") && row.contains("active") && row.contains(" 5 "),
        "{row}"
    );
    assert!(
        stdout.contains("master key key_") && stdout.contains("tg_live_"),
        "{stdout}"
    );
    let account = row.split_whitespace().next().unwrap().to_string();

    let key = cli
        .json(&[
            "keys",
            "create",
            "--account",
            &account,
            "--name",
            "ci",
            "--scope",
            "echo",
        ])
        .await;
    let (key_id, secret) = (
        key["id"].as_str().unwrap().to_string(),
        key["secret"].as_str().unwrap().to_string(),
    );
    assert_eq!(key["scopes"], serde_json::json!(["echo"]));

    let call = reqwest::Client::new()
        .get(format!("{url}/echo/hello"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
    let request_id = call.headers()["x-request-id"].to_str().unwrap().to_string();
    // The usage row is written with the charge; ask until it is there.
    let mut shown = String::new();
    for _ in 0..50 {
        let (code, stdout, _) = cli.run(&["requests", "show", &request_id]).await;
        if code == 0 {
            shown = stdout;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(shown.starts_with("REQUEST"), "{shown}");
    assert!(shown.contains(&request_id) && shown.contains(&key_id) && shown.contains("/echo"));
    assert!(shown.contains("0.001"), "{shown}");

    let listed = cli.json(&["accounts", "list"]).await;
    assert_eq!(listed["data"][0]["id"], account);
    let shown = cli.json(&["accounts", "show", &account]).await;
    assert_eq!(shown["name"], "Acme Corp");
    let (_, keys, _) = cli.run(&["keys", "list", "--account", &account]).await;
    assert_eq!(keys.lines().count(), 3, "header, master, ci:\n{keys}");

    let granted = cli
        .json(&["credits", "grant", &account, "2.5", "--reason", "goodwill"])
        .await;
    assert_eq!(granted["available"]["credits"], "7.499");

    let rolled = cli
        .json(&["keys", "roll", &key_id, "--grace-seconds", "0"])
        .await;
    assert_ne!(rolled["secret"], secret.as_str());
    let (code, stdout, _) = cli.run(&["keys", "revoke", &key_id]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("revoked"), "{stdout}");

    // A refusal: the server's code and message, the request ID, exit status 1.
    let (code, _, stderr) = cli.run(&["keys", "revoke", &key_id]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("409 already_revoked"), "{stderr}");
    assert!(stderr.contains("(request req_"), "{stderr}");
}

/// A customer runs its own account from the command line with its master key: keys, their
/// policy, balance, ledger, usage, the request log and billing-API holds; the operator suspends
/// and edits accounts and lists the audit log. Every management endpoint has its command.
#[tokio::test]
async fn a_customer_with_a_master_key_and_the_operator_reach_every_endpoint_from_the_command_line()
{
    let (_server, cli) = Server::start().await;
    let url = cli.url.clone();
    let created = cli.json(&["accounts", "create", "--name", "Acme"]).await;
    let account = created["account"]["id"].as_str().unwrap().to_string();
    let master = created["master_key"]["secret"]
        .as_str()
        .unwrap()
        .to_string();

    // No credential at all: told what to give.
    let (code, _, stderr) = cli.run_with(&["balance"], &[]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--key") && stderr.contains("--admin-token"),
        "{stderr}"
    );

    let me = cli.json_as(&master, &["keys", "show", "me"]).await;
    assert_eq!(me["kind"], "master");
    let key = cli
        .json_as(
            &master,
            &[
                "keys",
                "create",
                "--name",
                "job",
                "--scope",
                "echo",
                "--allowed-ip",
                "10.0.0.0/8",
                "--monthly-spend-cap",
                "1",
            ],
        )
        .await;
    let (key_id, secret) = (
        key["id"].as_str().unwrap().to_string(),
        key["secret"].as_str().unwrap().to_string(),
    );
    assert_eq!(key["account_id"], account.as_str());
    assert_eq!(key["allowed_ips"], serde_json::json!(["10.0.0.0/8"]));
    let edited = cli
        .json_as(
            &master,
            &[
                "keys",
                "edit",
                &key_id,
                "--anywhere",
                "--no-spend-cap",
                "--name",
                "job-2",
                "--expires-at",
                "2099-01-01T00:00:00.250Z",
            ],
        )
        .await;
    assert_eq!(edited["allowed_ips"], serde_json::json!([]));
    assert!(edited["monthly_spend_cap"].is_null());
    assert_eq!(edited["name"], "job-2");
    assert_eq!(edited["expires_at"], "2099-01-01T00:00:00.250Z");

    let http = reqwest::Client::new();
    let call = http
        .get(format!("{url}/echo/hello"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
    call.bytes().await.unwrap();

    let hold = cli
        .json_as(
            &master,
            &[
                "holds",
                "create",
                "0.5",
                "--metadata",
                "{\"job\": \"render\"}",
            ],
        )
        .await;
    let hold_id = hold["id"].as_str().unwrap().to_string();
    assert_eq!(hold["metadata"]["job"], "render");
    let shown = cli.json_as(&master, &["holds", "show", &hold_id]).await;
    assert_eq!(shown["status"], "pending");
    let settled = cli
        .json_as(&master, &["holds", "settle", &hold_id, "0.2"])
        .await;
    assert_eq!(settled["charged"]["credits"], "0.2");
    let other = cli.json_as(&master, &["holds", "create", "0.1"]).await;
    let released = cli
        .json_as(
            &master,
            &["holds", "release", other["id"].as_str().unwrap()],
        )
        .await;
    assert_eq!(released["status"], "released");

    let balance = cli.json_as(&master, &["balance"]).await;
    assert_eq!(balance["available"]["credits"], "4.799");
    let usage = cli
        .json_as(&master, &["usage", "--group-by", "route"])
        .await;
    assert_eq!(usage["data"][0]["group"], "/echo");
    assert_eq!(usage["billing_api"]["cost"]["credits"], "0.2");
    assert_eq!(usage["cost"]["credits"], "0.201");
    let (code, table, _) = cli.run_as(&master, &["usage"]).await;
    assert_eq!(code, 0);
    assert!(table.contains("total charged: 0.201"), "{table}");
    let ledger = cli.json_as(&master, &["ledger", "--limit", "2"]).await;
    assert_eq!(ledger["data"].as_array().unwrap().len(), 2);
    assert_eq!(ledger["data"][0]["kind"], "release");
    let requests = cli
        .json_as(
            &master,
            &["requests", "list", "--route", "/echo", "--status", "200"],
        )
        .await;
    assert_eq!(requests["data"][0]["key_id"], key_id.as_str());

    // A customer may not do the operator's work: the server's refusal, exit status 1.
    let (code, _, stderr) = cli
        .run_as(&master, &["accounts", "suspend", &account])
        .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("403 forbidden"), "{stderr}");

    // The operator: the account's balance by name, edits, suspension, the audit log.
    let balance = cli.json(&["balance", "--account", &account]).await;
    assert_eq!(balance["available"]["credits"], "4.799");
    let edited = cli
        .json(&[
            "accounts",
            "edit",
            &account,
            "--max-keys",
            "3",
            "--name",
            "Acme 2",
        ])
        .await;
    assert_eq!(
        (edited["max_keys"].as_u64(), edited["name"].as_str()),
        (Some(3), Some("Acme 2"))
    );
    let suspended = cli.json(&["accounts", "suspend", &account]).await;
    assert_eq!(suspended["status"], "suspended");
    let refused = http
        .get(format!("{url}/echo/hello"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let reactivated = cli.json(&["accounts", "reactivate", &account]).await;
    assert_eq!(reactivated["status"], "active");
    let granted = cli
        .json(&[
            "credits",
            "grant",
            &account,
            "1",
            "--reason",
            "sorry",
            "--reference",
            "inv-1",
        ])
        .await;
    assert_eq!(granted["available"]["credits"], "5.799");
    let audit = cli.json(&["audit", "list"]).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"account.suspend"), "{actions:?}");
    let (code, stdout, _) = cli.run(&["audit", "verify"]).await;
    assert_eq!(code, 0, "{stdout}");
}

/// A payment whose webhook never arrived is credited by `tollgate payments reconcile`, once.
#[tokio::test]
async fn payments_reconcile_credits_a_payment_whose_webhook_never_arrived() {
    use tollgate_mock::stripe::{FakeStripe, FakeStripeConfig};
    let stripe = FakeStripe::start(FakeStripeConfig {
        secret_key: "sk_test_cli".into(),
        webhook_secret: "whsec_cli".into(),
        webhook_url: None,
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &dir.path().join("tollgate.db"),
        &format!(
            "[billing]\nstarter_credits = \"0\"\n[payments.stripe]\nsecret_key = \"sk_test_cli\"\n\
             webhook_secrets = [\"whsec_cli\"]\napi_base = \"{}\"\n\
             success_url = \"http://127.0.0.1/ok\"\ncancel_url = \"http://127.0.0.1/no\"\n\
             reconcile_interval = \"0s\"\n",
            stripe.url()
        ),
    );
    let (_server, url) = serve(&config, ADMIN).await;
    let cli = Cli { url: url.clone() };
    let created = cli.json(&["accounts", "create", "--name", "buyer"]).await;
    let master = created["master_key"]["secret"].as_str().unwrap();
    let topup: Value = reqwest::Client::new()
        .post(format!("{url}/api/v1/topups"))
        .bearer_auth(master)
        .json(&serde_json::json!({"amount": "25"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stripe
        .pay(topup["checkout_session"].as_str().unwrap())
        .await
        .unwrap();
    let since = "2020-01-01T00:00:00Z";
    let found = cli.json(&["payments", "reconcile", "--since", since]).await;
    assert_eq!(
        (found["events"].as_u64(), found["handled"].as_u64()),
        (Some(2), Some(2))
    );
    let (code, table, _) = cli.run(&["payments", "reconcile", "--since", since]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("EVENTS") && table.contains("HANDLED"),
        "{table}"
    );
    let balance = cli.json_as(master, &["balance"]).await;
    assert_eq!(balance["available"]["credits"], "25");
}
