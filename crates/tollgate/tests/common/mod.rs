//! What the binary's tests share: running `tollgate serve`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Writes a config listening on port 0 with its SQLite database at `db`, plus `extra` (more
/// sections, routes), to `<dir>/tollgate.toml`, and returns its path.
pub fn write_config(dir: &Path, db: &Path, extra: &str) -> PathBuf {
    write_config_with_store(dir, &format!("sqlite://{}", db.display()), extra)
}

/// [`write_config`] with any store URL.
pub fn write_config_with_store(dir: &Path, store_url: &str, extra: &str) -> PathBuf {
    let path = dir.join("tollgate.toml");
    let text =
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"{store_url}\"\n{extra}");
    std::fs::write(&path, text).unwrap();
    path
}

/// A route to the mock upstream's echo API at 0.001 a call, as config text.
pub fn echo_route(mock_url: &str) -> String {
    format!(
        "[[routes]]\nprefix = \"/echo\"\nupstream = \"{mock_url}/echo\"\ngroup = \"echo\"\nprice = \"0.001\"\n"
    )
}

/// Creates an account with 10 credits through `url` as the operator; its id and master key.
pub async fn create_account(
    http: &reqwest::Client,
    url: &str,
    admin_token: &str,
    name: &str,
) -> (String, String) {
    create_account_with(http, url, admin_token, name, "10").await
}

/// [`create_account`] with `starter_credits` (a decimal string).
pub async fn create_account_with(
    http: &reqwest::Client,
    url: &str,
    admin_token: &str,
    name: &str,
    starter_credits: &str,
) -> (String, String) {
    let created = send_json(
        http.post(format!("{url}/api/v1/accounts"))
            .bearer_auth(admin_token)
            .json(&serde_json::json!({"name": name, "starter_credits": starter_credits})),
    )
    .await;
    (
        created["account"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{created}"))
            .to_string(),
        created["master_key"]["secret"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

/// Sends the request and reads its JSON answer.
pub async fn send_json(request: reqwest::RequestBuilder) -> serde_json::Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Starts `tollgate serve --config <config>` with `admin_token` from the environment, and returns
/// it (killed when dropped) with its base URL, read from its JSON log.
pub async fn serve(config: &Path, admin_token: &str) -> (Child, String) {
    let (child, url, _) = serve_logged(config, admin_token, "info").await;
    (child, url)
}

/// Every line a server has logged so far.
pub type Log = Arc<Mutex<Vec<String>>>;

/// [`serve`] with the log filter `filter` (`TOLLGATE_LOG`), keeping every log line.
pub async fn serve_logged(config: &Path, admin_token: &str, filter: &str) -> (Child, String, Log) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("TOLLGATE_ADMIN_TOKEN", admin_token)
        .env("TOLLGATE_LOG_FORMAT", "json")
        .env("TOLLGATE_LOG", filter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log: Log = Arc::default();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.lock().unwrap().push(line.clone());
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["fields"]["message"] == "tollgate listening" {
                return entry["fields"]["addr"].as_str().unwrap().to_string();
            }
        }
        panic!("serve stopped before listening");
    })
    .await
    .unwrap();
    // Keep draining the log so the server never blocks on a full pipe.
    let kept = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    (child, format!("http://{addr}"), log)
}
