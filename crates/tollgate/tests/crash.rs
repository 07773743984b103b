//! The gateway killed with SIGKILL under load, then restarted: no hold stays pending, the books
//! balance, and nobody was charged for a request that did not succeed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{echo_route, send_json, serve, write_config};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::LedgerStore;

const ADMIN: &str = "crash-test-admin-token";

#[tokio::test]
async fn sigkill_under_load_loses_no_customer_money() {
    let mock = tollgate_mock::MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let config = write_config(
        dir.path(),
        &db,
        &format!(
            "[billing]\nrequest_hold_ttl = \"5s\"\nsweep_interval = \"100ms\"\n{}",
            echo_route(&mock.url())
        ),
    );
    let (mut first, url) = serve(&config, ADMIN).await;
    let http = reqwest::Client::new();
    let created: Value = send_json(
        http.post(format!("{url}/api/v1/accounts"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "load", "starter_credits": "10"})),
    )
    .await;
    let key = created["master_key"]["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let account = created["account"]["id"].as_str().unwrap().to_string();

    // 400 paid calls, each taking 0-1000 ms upstream; the gateway dies in the middle of them.
    let calls = (0..400).map(|i| {
        let request = http
            .get(format!("{url}/echo/{i}"))
            .bearer_auth(&key)
            .header("x-mock-delay-ms", (i * 37 % 1000).to_string());
        async move {
            let response = request.send().await.ok()?;
            let id = response
                .headers()
                .get("x-request-id")?
                .to_str()
                .ok()?
                .to_string();
            let ok = response.status() == 200;
            // A success counts only once the client has the whole body.
            response.bytes().await.ok()?;
            ok.then_some(id)
        }
    });
    let load = tokio::spawn(futures_util::future::join_all(calls));
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    let succeeded: HashSet<String> = load.await.unwrap().into_iter().flatten().collect();
    assert!(
        !succeeded.is_empty() && succeeded.len() < 400,
        "the kill should land mid-load ({} succeeded)",
        succeeded.len()
    );

    let (_second, url) = serve(&config, ADMIN).await;
    let balance: Value = send_json(
        http.get(format!("{url}/api/v1/billing/balance?account_id={account}"))
            .bearer_auth(ADMIN),
    )
    .await;
    assert_eq!(
        balance["held"]["nanos"], 0,
        "the dead process's holds were released at start"
    );

    // Every charge belongs to a request the client saw succeed, and each cost exactly its price.
    let mut charged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut page_url = format!("{url}/api/v1/requests?account_id={account}&limit=500");
        if let Some(c) = &cursor {
            page_url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = send_json(http.get(page_url).bearer_auth(ADMIN)).await;
        for row in page["data"].as_array().unwrap() {
            if row["cost"]["nanos"].as_i64().unwrap() > 0 {
                charged.push(row["request_id"].as_str().unwrap().to_string());
                assert_eq!(row["cost"]["nanos"], 1_000_000);
            }
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    for id in &charged {
        assert!(
            succeeded.contains(id),
            "{id} was charged but did not succeed"
        );
    }
    let spent = 10_000_000_000 - balance["available"]["nanos"].as_i64().unwrap();
    assert_eq!(
        spent,
        charged.len() as i64 * 1_000_000,
        "charges = usage rows"
    );

    // The books balance (read straight from the file, beside the running server).
    let store = SqliteStore::open(&db).await.unwrap();
    let trial = store.trial_balance().await.unwrap();
    assert_eq!(trial.iter().map(|(_, n)| n).sum::<i64>(), 0, "{trial:?}");
    let account_id = account.parse().unwrap();
    let wallet = store.wallet(account_id).await.unwrap().unwrap();
    assert_eq!(
        store.ledger_balance(account_id).await.unwrap(),
        wallet.available
    );
    assert!(store.pending_holds().await.unwrap().is_empty());
}
