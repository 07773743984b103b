//! `--log-format json`: every line is one JSON object, and every line written while a request
//! is served carries that request's ID, the one its caller got in `X-Request-Id`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{echo_route, serve_logged, write_config, Log};
use serde_json::Value;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

const ADMIN: &str = "logs-test-admin-token";

/// The request IDs on the log's lines written inside a request's span, by line; panics on a line
/// that is not JSON, or a request line without an ID.
fn request_ids(log: &Log) -> Vec<String> {
    let lines = log.lock().unwrap().clone();
    lines
        .iter()
        .filter_map(|line| {
            let entry: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            let spans = entry["spans"].as_array()?;
            let request = spans.iter().find(|s| s["name"] == "request")?;
            let id = request["request_id"].as_str();
            let id = id.unwrap_or_else(|| panic!("a request line without its ID: {line}"));
            Some(id.to_string())
        })
        .collect()
}

#[tokio::test]
async fn json_logs_carry_the_request_id_on_every_line_of_a_request() {
    let mock = tollgate_mock::MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &dir.path().join("tollgate.db"),
        &echo_route(&mock.url()),
    );
    // Debug level: the store's statements and the proxy's upstream call are logged too.
    let (_server, url, log) = serve_logged(&config, ADMIN, "debug").await;
    let http = reqwest::Client::new();
    let mut answered = HashSet::new();
    let created = http
        .post(format!("{url}/api/v1/accounts"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"name": "acme", "starter_credits": "10"}))
        .send()
        .await
        .unwrap();
    answered.insert(
        created.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_string(),
    );
    let created: Value = created.json().await.unwrap();
    let key = created["master_key"]["secret"]
        .as_str()
        .unwrap()
        .to_string();

    for secret in [key.as_str(), "tg_live_not_a_real_key"] {
        let response = http
            .get(format!("{url}/echo/x"))
            .bearer_auth(secret)
            .send()
            .await
            .unwrap();
        let id = response.headers()["x-request-id"].to_str().unwrap();
        answered.insert(id.to_string());
    }

    // The writer is non-blocking: wait until both requests' lines are out.
    let mut logged = Vec::new();
    for _ in 0..100 {
        logged = request_ids(&log);
        if answered.iter().all(|id| logged.contains(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &answered {
        assert!(logged.contains(id), "no line of request {id} in the log");
    }
    // Every request line names a request some caller was answered with: none is made up.
    for id in &logged {
        assert!(
            answered.contains(id),
            "a line names request {id}, which nobody got"
        );
    }
}
