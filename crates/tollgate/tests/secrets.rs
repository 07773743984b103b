//! A full run of `tollgate serve` that issues, rolls, uses, misuses and revokes keys, then greps
//! the database files and every log line for each secret it handed out: none may appear.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{echo_route, send_json, serve_logged, write_config};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

const ADMIN: &str = "secrets-test-admin-token";

#[tokio::test]
async fn no_issued_key_is_found_in_clear_in_the_database_or_the_logs() {
    let mock = tollgate_mock::MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &data.join("tollgate.db"),
        &format!(
            "[billing]\nstarter_credits = \"10\"\n{}",
            echo_route(&mock.url())
        ),
    );
    // Trace level, every crate: the most an operator could turn on while investigating.
    let (mut server, url, log) = serve_logged(&config, ADMIN, "trace").await;
    let http = reqwest::Client::new();
    let mut issued: Vec<String> = Vec::new();
    let mut key_ids: Vec<String> = Vec::new();

    let created: Value = send_json(
        http.post(format!("{url}/api/v1/accounts"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "acme"})),
    )
    .await;
    let master = created["master_key"]["secret"]
        .as_str()
        .unwrap()
        .to_string();
    issued.push(master.clone());
    key_ids.push(created["master_key"]["id"].as_str().unwrap().to_string());

    for body in [
        json!({"name": "plain"}),
        json!({"name": "fenced", "allowed_ips": ["10.0.0.0/8"]}),
        json!({"name": "to-roll"}),
    ] {
        let key: Value = send_json(
            http.post(format!("{url}/api/v1/keys"))
                .bearer_auth(&master)
                .json(&body),
        )
        .await;
        issued.push(key["secret"].as_str().unwrap().to_string());
        key_ids.push(key["id"].as_str().unwrap().to_string());
    }
    let rolled: Value = send_json(
        http.post(format!("{url}/api/v1/keys/{}/roll", key_ids[3]))
            .bearer_auth(&master)
            .json(&json!({"grace_period_seconds": 3600})),
    )
    .await;
    issued.push(rolled["secret"].as_str().unwrap().to_string());

    // Use every secret every way a client might: both headers, a query string, management calls,
    // calls that fail (IP not allowed, revoked, mistyped).
    let echo = |secret: &str| http.get(format!("{url}/echo/x")).bearer_auth(secret);
    let mut statuses = Vec::new();
    for secret in &issued {
        let mistyped = format!("{}x", &secret[..secret.len() - 1]);
        for request in [
            echo(secret),
            http.get(format!("{url}/echo/x"))
                .header("x-api-key", secret),
            http.get(format!("{url}/echo/x?api_key={secret}"))
                .bearer_auth(secret),
            http.get(format!("{url}/api/v1/key")).bearer_auth(secret),
            echo(&mistyped),
        ] {
            statuses.push(request.send().await.unwrap().status().as_u16());
        }
    }
    http.post(format!("{url}/api/v1/keys/{}/revoke", key_ids[1]))
        .bearer_auth(&master)
        .send()
        .await
        .unwrap();
    statuses.push(echo(&issued[1]).send().await.unwrap().status().as_u16());
    // The run exercised successes and each kind of refusal.
    for status in [200, 401, 403] {
        assert!(statuses.contains(&status), "{status} missing: {statuses:?}");
    }

    // Stop gracefully, so every log line and write is flushed.
    let pid = server.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut stored = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap() {
        stored.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let logged = log.lock().unwrap().join("\n");
    let contains = |haystack: &[u8], needle: &str| {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    };
    // The greps can find things: the database holds each key's display prefix, the log its id.
    assert!(contains(&stored, &issued[0][..12]));
    assert!(key_ids.iter().all(|id| logged.contains(id.as_str())));
    for secret in &issued {
        // The whole key, and its random part alone (in case something strips the prefix).
        for needle in [secret.as_str(), &secret[8..40]] {
            assert!(!contains(&stored, needle), "a key is in the database");
            assert!(!logged.contains(needle), "a key is in the logs");
        }
    }
}
