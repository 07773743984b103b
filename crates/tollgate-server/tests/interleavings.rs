//! Random interleavings of everything that moves money, for a handful of fixed seeds: LLM calls
//! (OpenAI chat and Responses, Anthropic; JSON and SSE; plain or compressed), upstream failures,
//! broken streams, clients that leave, upstreams that report no usage, flat-priced calls,
//! billing-API holds settled or released, grants, many at once, and restarts of the node
//! between rounds (once its holds resolved). Afterwards the books must
//! hold: the ledger balances, revenue equals the usage rows' costs plus the API holds' charges,
//! no successful call that reported usage is free, no hold is left pending, and a funded wallet
//! never saw a 402.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{assert_books_balance, spawn_app, TestApp, ADMIN_TOKEN};
use futures_util::future::join_all;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::time::Duration;
use tollgate_store::LedgerStore;

/// What one operation saw: its status, and for an API hold what it charged.
struct Seen {
    status: u16,
    api_charge: i64,
}

async fn llm_call(app: &TestApp, key: &str, rng: &mut StdRng) -> Seen {
    let (path, body) = match rng.gen_range(0..3) {
        0 => (
            "/v1/chat/completions",
            json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "interleave"}]}),
        ),
        1 => (
            "/v1/responses",
            json!({"model": "mock-gpt", "input": "interleave"}),
        ),
        _ => (
            "/anthropic/v1/messages",
            json!({"model": "mock-claude", "max_tokens": 40,
                "messages": [{"role": "user", "content": "interleave"}]}),
        ),
    };
    let stream = rng.gen_bool(0.5);
    let mut body = body;
    body["stream"] = json!(stream);
    let mut request = app
        .post(path)
        .bearer_auth(key)
        .header("x-api-key", key)
        .header("x-mock-chunks", rng.gen_range(1..12).to_string())
        .json(&body);
    if rng.gen_bool(0.3) {
        let encoding = ["gzip", "br", "deflate", "zstd"][rng.gen_range(0..4)];
        request = request.header("x-mock-compress", encoding);
    }
    let leave_early = stream && rng.gen_bool(0.2);
    match rng.gen_range(0..10) {
        0 => request = request.header("x-mock-status", "500"),
        1 if stream => {
            request = request
                .header("x-mock-abort-after", "2")
                .header("x-mock-chunk-delay-ms", "5")
        }
        2 => request = request.header("x-mock-no-usage", "1"),
        _ if leave_early => request = request.header("x-mock-chunk-delay-ms", "10"),
        _ => {}
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    if leave_early {
        let mut chunks = response.bytes_stream();
        let _ = chunks.next().await;
    } else {
        let _ = response.bytes().await;
    }
    Seen {
        status,
        api_charge: 0,
    }
}

async fn api_hold(app: &TestApp, key: &str, rng: &mut StdRng) -> Seen {
    let amount = rng.gen_range(1..1_000_000);
    let response = app
        .post("/api/v1/holds")
        .bearer_auth(key)
        .json(&json!({"amount": format!("0.{amount:09}")}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status != 201 {
        return Seen {
            status,
            api_charge: 0,
        };
    }
    let hold: Value = response.json().await.unwrap();
    let id = hold["id"].as_str().unwrap();
    let (action, body, charge) = if rng.gen_bool(0.6) {
        let charge = rng.gen_range(0..=amount);
        (
            "settle",
            json!({"amount": format!("0.{charge:09}")}),
            charge,
        )
    } else {
        ("release", json!({}), 0)
    };
    let resolved = app
        .post(&format!("/api/v1/holds/{id}/{action}"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), 200);
    Seen {
        status,
        api_charge: charge,
    }
}

async fn operation(app: &TestApp, key: &str, account: &str, seed: u64) -> Seen {
    let mut rng = StdRng::seed_from_u64(seed);
    match rng.gen_range(0..10) {
        0..=5 => llm_call(app, key, &mut rng).await,
        6 | 7 => {
            let mut request = app.get("/echo/x").bearer_auth(key);
            if rng.gen_bool(0.3) {
                request = request.header("x-mock-status", "503");
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            Seen {
                status,
                api_charge: 0,
            }
        }
        8 => api_hold(app, key, &mut rng).await,
        _ => {
            let response = app
                .admin_post(
                    &format!("/api/v1/accounts/{account}/credits"),
                    json!({"amount": "0.5", "reason": "top-up"}),
                )
                .send()
                .await
                .unwrap();
            Seen {
                status: response.status().as_u16(),
                api_charge: 0,
            }
        }
    }
}

/// Waits until every hold has resolved (streams whose clients left are read on in the
/// background), and fails if one is left pending.
async fn settled(app: &TestApp, key: &str) {
    let mut pending = Vec::new();
    for _ in 0..200 {
        app.get_json("/api/v1/billing/balance", key).await;
        pending = app.store.pending_holds().await.unwrap();
        if pending.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("holds left pending: {pending:?}");
}

/// Every usage row of the account, following the cursor.
async fn usage_rows(app: &TestApp, account: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/requests?account_id={account}&limit=500");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = app.get_json(&path, ADMIN_TOKEN).await;
        rows.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return rows,
        }
    }
}

/// Runs one seed and checks the books; returns the billing statuses its usage rows reached.
async fn run_seed(seed: u64) -> std::collections::BTreeSet<String> {
    let mut app = spawn_app().await;
    let account = app.create_account("busy").await;
    let key = account.master_key.clone();
    let id = account.id.to_string();
    let response = app
        .admin_post(
            &format!("/api/v1/accounts/{id}/credits"),
            json!({"amount": "1000", "reason": "funded"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut seen = Vec::new();
    for round in 0..6u64 {
        let ops = (0..10u64).map(|i| operation(&app, &key, &id, seed * 1_000 + round * 10 + i));
        seen.extend(join_all(ops).await);
        if round % 2 == 1 {
            // The node restarts: the next one loads every wallet from what was stored.
            settled(&app, &key).await;
            app = app.restart().await;
        }
    }
    assert!(
        seen.iter().all(|s| s.status != 402),
        "a funded wallet saw a 402"
    );
    settled(&app, &key).await;
    assert_books_balance(&app, account.id).await;

    let rows = usage_rows(&app, &id).await;
    let usage_costs: i64 = rows
        .iter()
        .map(|r| r["cost"]["nanos"].as_i64().unwrap())
        .sum();
    let api_charges: i64 = seen.iter().map(|s| s.api_charge).sum();
    let trial = app.store.trial_balance().await.unwrap();
    let revenue = trial
        .iter()
        .find(|(name, _)| name == "revenue")
        .map_or(0, |(_, n)| *n);
    assert_eq!(revenue, usage_costs + api_charges, "seed {seed}");
    for row in &rows {
        let reported =
            row["status"] == 200 && row["billing_status"] == "settled" && row["route"] != "/echo";
        if reported {
            assert!(row["cost"]["nanos"].as_i64().unwrap() > 0, "{row}");
        }
        // 499: the client left an answer the upstream completed, charged on its usage.
        let failed = row["status"].as_u64().unwrap() >= 400 && row["status"] != 499;
        if failed {
            assert_eq!(row["cost"]["nanos"], 0, "a failure was charged: {row}");
        }
    }
    rows.iter()
        .filter_map(|r| r["billing_status"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_interleavings_keep_the_books_exact() {
    let mut reached = std::collections::BTreeSet::new();
    for seed in 1..=4 {
        reached.extend(run_seed(seed).await);
    }
    // The seeds reached every way a call can end.
    for status in ["settled", "partial", "estimated", "released"] {
        assert!(reached.contains(status), "no {status} call: {reached:?}");
    }
}
