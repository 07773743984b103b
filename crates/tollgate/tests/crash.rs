//! The gateway killed with SIGKILL under load, then restarted: no hold stays pending, the books
//! balance, and nobody was charged for a request that did not succeed. On each store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{create_account, echo_route, send_json, serve, write_config_with_store};
use serde_json::Value;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tollgate_store::postgres::PostgresStore;
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::testing::TestSchema;
use tollgate_store::Store;

const ADMIN: &str = "crash-test-admin-token";

#[tokio::test]
async fn sigkill_under_load_loses_no_customer_money_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    sigkill_under_load(dir.path(), &url).await;
}

#[tokio::test]
async fn sigkill_under_load_loses_no_customer_money_on_postgres() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    sigkill_under_load(dir.path(), schema.url()).await;
}

/// The store behind `url`, opened beside the running server to read the books.
async fn open_store(url: &str) -> Arc<dyn Store> {
    match url.strip_prefix("sqlite://") {
        Some(path) => Arc::new(SqliteStore::open(path.as_ref()).await.unwrap()),
        None => Arc::new(PostgresStore::open(url).await.unwrap()),
    }
}

async fn sigkill_under_load(dir: &std::path::Path, store_url: &str) {
    let mock = tollgate_mock::MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let config = write_config_with_store(
        dir,
        store_url,
        &format!(
            "[billing]\nrequest_hold_ttl = \"5s\"\nsweep_interval = \"100ms\"\n{}",
            echo_route(&mock.url())
        ),
    );
    let (mut first, url) = serve(&config, ADMIN).await;
    let http = reqwest::Client::new();
    let (account, key) = create_account(&http, &url, ADMIN, "load").await;

    // 400 paid calls, each taking 0-1000 ms upstream; the gateway dies in the middle of them,
    // once the first ten have succeeded (however busy the machine, so the kill lands mid-load).
    let done = Arc::new(tokio::sync::Semaphore::new(0));
    let calls = (0..400).map(|i| {
        let done = done.clone();
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
            if ok {
                done.add_permits(1);
            }
            ok.then_some(id)
        }
    });
    let load = tokio::spawn(futures_util::future::join_all(calls));
    tokio::time::timeout(Duration::from_secs(30), done.acquire_many(10))
        .await
        .expect("ten calls succeed")
        .unwrap()
        .forget();
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    let succeeded: HashSet<String> = load.await.unwrap().into_iter().flatten().collect();
    assert!(
        !succeeded.is_empty() && succeeded.len() < 400,
        "the kill should land mid-load ({} succeeded)",
        succeeded.len()
    );

    // The embedded store releases the dead process's holds at start. A shared store cannot tell
    // them from a live node's, so they are released once past their TTL (5 s) and the grace (1 s).
    let (_second, url) = serve(&config, ADMIN).await;
    let restarted = std::time::Instant::now();
    let balance = loop {
        let balance: Value = send_json(
            http.get(format!("{url}/api/v1/billing/balance?account_id={account}"))
                .bearer_auth(ADMIN),
        )
        .await;
        if balance["held"]["nanos"] == 0 {
            break balance;
        }
        assert!(
            store_url.starts_with("postgres") && restarted.elapsed() < Duration::from_secs(15),
            "the dead process's holds are still pending: {balance}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

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

    // The books balance (read straight from the store, beside the running server).
    let store = open_store(store_url).await;
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

/// An event stored with the ledger batch that caused it survives a SIGKILL that comes before
/// any delivery: the next process sends it, once, under the id it was stored with.
#[tokio::test]
async fn an_event_committed_before_a_sigkill_is_delivered_once_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let mock = tollgate_mock::MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let inbox =
        tollgate_mock::receiver::WebhookReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
    // The first process looks for events only as it starts; the second every 50 ms.
    let config = |poll: &str| {
        write_config_with_store(
            dir.path(),
            &store_url,
            &format!(
                "[webhooks]\nallow_http = true\nallow_private = [\"127.0.0.0/8\"]\n\
                 poll_interval = \"{poll}\"\n{}",
                echo_route(&mock.url())
            ),
        )
    };
    let (mut first, url) = serve(&config("1h"), ADMIN).await;
    let http = reqwest::Client::new();
    let (account, key) = create_account(&http, &url, ADMIN, "hooked").await;
    let endpoint: Value = send_json(
        http.post(format!("{url}/api/v1/webhook-endpoints"))
            .bearer_auth(&key)
            .json(&serde_json::json!({"url": inbox.url("/hooks"), "events": ["balance.low"]})),
    )
    .await;
    let _: Value = send_json(
        http.put(format!("{url}/api/v1/accounts/{account}/balance-alert"))
            .bearer_auth(&key)
            .json(&serde_json::json!({"low_balance": "9.9995"})),
    )
    .await;
    let call = http
        .get(format!("{url}/echo/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
    let request = call.headers()["x-request-id"].to_str().unwrap().to_string();
    call.bytes().await.unwrap();
    // The call's usage row is stored with its charge, in the batch the event rides in.
    loop {
        let row = http
            .get(format!("{url}/api/v1/requests/{request}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        if row.status() == 200 {
            let row: Value = row.json().await.unwrap();
            if row["billing_status"] == "settled" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    assert!(
        inbox.received().is_empty(),
        "nothing was sent before the kill"
    );

    let (_second, url) = serve(&config("50ms"), ADMIN).await;
    let received = inbox.wait_for("/hooks", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(inbox.received().len(), 1, "delivered once");
    let event: Value = serde_json::from_str(&received[0].body).unwrap();
    assert_eq!(event["type"], "balance.low");
    assert_eq!(event["data"]["request_id"], request);
    let log: Value = send_json(
        http.get(format!(
            "{url}/api/v1/webhook-endpoints/{}/deliveries",
            endpoint["id"].as_str().unwrap()
        ))
        .bearer_auth(&key),
    )
    .await;
    assert_eq!(log["data"][0]["status"], "delivered");
    assert_eq!(
        log["data"][0]["event_id"].as_str(),
        received[0].webhook_id.as_deref(),
        "the id it was stored with"
    );
}
