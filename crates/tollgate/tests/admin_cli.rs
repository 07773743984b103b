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
        let output = tokio::process::Command::new(BIN)
            .args(args)
            .args(["--url", &self.url])
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN)
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

#[tokio::test]
async fn an_operator_manages_accounts_and_keys_and_reads_a_request_from_the_command_line() {
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
    let (_server, url) = serve(&config, ADMIN).await;
    let cli = Cli { url: url.clone() };

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
