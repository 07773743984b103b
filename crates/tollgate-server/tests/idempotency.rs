//! `Idempotency-Key` end to end: replay byte for byte and free, one upstream call and one charge
//! under a retry storm, 409 while in flight, 422 for another request, retryable outcomes free
//! the key, streams replayed whole or refused whole, management calls, expiry.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use common::{expect_error, spawn_app_with, TestApp, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tollgate_server::config::{RawConfig, RawRoute};

const PRICE_NANOS: i64 = 1_000_000; // "0.001"

/// An upstream that counts its calls and answers each with its number, so a replay can be told
/// from a second call. `x-delay-ms` delays the answer; `x-status` sets its status.
async fn counting_upstream() -> (String, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let router = Router::new().route(
        "/work",
        post(move |headers: HeaderMap, body: String| {
            let counter = counter.clone();
            async move {
                let call = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let number = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                };
                if let Some(ms) = number("x-delay-ms") {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let status = number("x-status").unwrap_or(200) as u16;
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    [("x-upstream-call", call.to_string())],
                    axum::Json(json!({ "call": call, "received": body })),
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, calls)
}

fn work_route(url: &str) -> RawRoute {
    RawRoute {
        prefix: "/work".into(),
        upstream: format!("{url}/work"),
        group: "work".into(),
        price: "0.001".into(),
        connect_timeout: "1s".into(),
        timeout: "10s".into(),
        ..RawRoute::default()
    }
}

struct Setup {
    app: TestApp,
    calls: Arc<AtomicU32>,
    key: String,
}

async fn setup(customize: impl FnOnce(&mut RawConfig)) -> Setup {
    let (url, calls) = counting_upstream().await;
    let app = spawn_app_with(|raw, _| {
        raw.rate_limits = Some(Vec::new());
        raw.routes.push(work_route(&url));
        customize(raw);
    })
    .await;
    let account = app.create_account("acme").await;
    Setup {
        app,
        calls,
        key: account.master_key,
    }
}

async fn available(app: &TestApp, key: &str) -> i64 {
    let balance = app.get_json("/api/v1/billing/balance", key).await;
    balance["available"]["nanos"].as_i64().unwrap()
}

fn work(s: &Setup, idempotency_key: &str, body: &str) -> reqwest::RequestBuilder {
    s.app
        .post("/work")
        .bearer_auth(&s.key)
        .header("idempotency-key", idempotency_key)
        .body(body.to_string())
}

#[tokio::test]
async fn a_retried_paid_call_replays_the_same_bytes_and_is_charged_once() {
    let s = setup(|_| {}).await;
    let before = available(&s.app, &s.key).await;
    let first = work(&s, "order-1", "{\"n\":1}").send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_id = first.headers()["x-request-id"].clone();
    let first_body = first.bytes().await.unwrap();

    let retry = work(&s, "order-1", "{\"n\":1}").send().await.unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["original-request-id"], first_id);
    assert_ne!(
        retry.headers()["x-request-id"],
        first_id,
        "a replay is a new request"
    );
    assert_eq!(retry.headers()["x-upstream-call"], "1");
    assert_eq!(retry.headers()["content-type"], "application/json");
    assert_eq!(retry.bytes().await.unwrap(), first_body);

    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    assert_eq!(before - available(&s.app, &s.key).await, PRICE_NANOS);
    // The replay has a row of its own, charged nothing and pointing to the first.
    let rows = s.app.get_json("/api/v1/requests", &s.key).await;
    let rows = rows["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["replay_of"], first_id.to_str().unwrap());
    assert_eq!(rows[0]["cost"]["nanos"], 0);
    assert_eq!(rows[1]["request_id"], first_id.to_str().unwrap());
    assert_eq!(rows[1]["cost"]["nanos"], PRICE_NANOS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_storm_reaches_the_upstream_once_and_pays_once() {
    let s = Arc::new(setup(|_| {}).await);
    let before = available(&s.app, &s.key).await;
    let storm: Vec<_> = (0..50)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let response = work(&s, "storm", "{\"n\":2}")
                    .header("x-delay-ms", "300")
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let replayed = response.headers().contains_key("idempotent-replayed");
                let retry_after = response.headers().get("retry-after").cloned();
                let code = response.headers().get("x-tollgate-error").cloned();
                (
                    status,
                    replayed,
                    retry_after,
                    code,
                    response.bytes().await.unwrap(),
                )
            })
        })
        .collect();
    let (mut originals, mut replays, mut in_progress) = (0, 0, 0);
    let mut bodies = Vec::new();
    for call in storm {
        let (status, replayed, retry_after, code, body) = call.await.unwrap();
        match (status, replayed) {
            (200, false) => {
                originals += 1;
                bodies.push(body);
            }
            (200, true) => {
                replays += 1;
                bodies.push(body);
            }
            (409, _) => {
                in_progress += 1;
                assert_eq!(code.unwrap(), "idempotency_in_progress");
                assert_eq!(retry_after.unwrap(), "1");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(originals, 1);
    assert_eq!(originals + replays + in_progress, 50);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(s.calls.load(Ordering::SeqCst), 1, "one upstream call");
    assert_eq!(
        before - available(&s.app, &s.key).await,
        PRICE_NANOS,
        "one charge"
    );
    // Once it is done, every retry is a replay.
    let after = work(&s, "storm", "{\"n\":2}").send().await.unwrap();
    assert_eq!(after.headers()["idempotent-replayed"], "true");
    assert_eq!(after.bytes().await.unwrap(), bodies[0]);
}

#[tokio::test]
async fn the_same_key_for_another_request_is_refused_with_422() {
    let s = setup(|_| {}).await;
    assert_eq!(
        work(&s, "k", "{\"n\":1}").send().await.unwrap().status(),
        200
    );
    let other_body = work(&s, "k", "{\"n\":2}").send().await.unwrap();
    expect_error(other_body, 422, "idempotency_key_mismatch").await;
    let other_path = s
        .app
        .post("/work?variant=2")
        .bearer_auth(&s.key)
        .header("idempotency-key", "k")
        .body("{\"n\":1}")
        .send()
        .await
        .unwrap();
    expect_error(other_path, 422, "idempotency_key_mismatch").await;
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    // Keys are the account's own: another account's identical key is unrelated.
    let other = s.app.create_account("other").await;
    let theirs = s
        .app
        .post("/work")
        .bearer_auth(&other.master_key)
        .header("idempotency-key", "k")
        .body("{\"n\":2}")
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), 200);
    assert!(theirs.headers().get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn a_retryable_outcome_frees_the_key_and_the_retry_is_charged_once() {
    let s = setup(|_| {}).await;
    let before = available(&s.app, &s.key).await;
    let failed = work(&s, "flaky", "{}")
        .header("x-status", "503")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 503);
    assert_eq!(
        before,
        available(&s.app, &s.key).await,
        "a 503 costs nothing"
    );
    // An error Tollgate originates before forwarding frees the key too: here, a key of the
    // same account whose scopes do not reach the route.
    let (echo_only, _) = s
        .app
        .create_usage_key(&s.key, json!({"scopes": ["echo"]}))
        .await;
    let refused = s
        .app
        .post("/work")
        .bearer_auth(&echo_only)
        .header("idempotency-key", "flaky")
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_error(refused, 403, "insufficient_scope").await;

    let retry = work(&s, "flaky", "{}").send().await.unwrap();
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    retry.bytes().await.unwrap();
    let again = work(&s, "flaky", "{}").send().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(s.calls.load(Ordering::SeqCst), 2);
    assert_eq!(before - available(&s.app, &s.key).await, PRICE_NANOS);
}

#[tokio::test]
async fn a_final_upstream_error_is_kept_and_replayed() {
    let s = setup(|_| {}).await;
    let first = work(&s, "bad", "{}")
        .header("x-status", "400")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 400);
    first.bytes().await.unwrap();
    let retry = work(&s, "bad", "{}").send().await.unwrap();
    assert_eq!(retry.status(), 400);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn streams_are_replayed_whole_or_refused_whole() {
    let app = spawn_app_with(|raw, _| {
        raw.rate_limits = Some(Vec::new());
        raw.idempotency.max_response_bytes = 4096;
    })
    .await;
    let account = app.create_account("acme").await;
    let stream = |key: &str, chunks: u32| {
        app.post("/v1/chat/completions")
            .bearer_auth(&account.master_key)
            .header("idempotency-key", key)
            .header("x-mock-chunks", chunks.to_string())
            .json(&json!({
                "model": "mock-gpt",
                "stream": true,
                "messages": [{"role": "user", "content": "hello there"}]
            }))
    };
    let before = available(&app, &account.master_key).await;
    let first = stream("small", 3).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let first = first.bytes().await.unwrap();
    assert!(first.ends_with(b"data: [DONE]\n\n"), "{first:?}");
    let charged = before - available(&app, &account.master_key).await;
    assert!(charged > 0);
    let replay = stream("small", 3).send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["content-type"], "text/event-stream");
    assert_eq!(replay.bytes().await.unwrap(), first);

    // Over the replay limit: the first call streams through whole; a retry is refused, not
    // truncated, and not charged again.
    let before = available(&app, &account.master_key).await;
    let big = stream("big", 200).send().await.unwrap();
    assert!(big.bytes().await.unwrap().len() > 4096);
    let spent = before - available(&app, &account.master_key).await;
    let refused = stream("big", 200).send().await.unwrap();
    // The OpenAI profile has no details object: the message names the original request.
    let body = expect_error(refused, 409, "conflict").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("The request req_"));
    assert_eq!(before - available(&app, &account.master_key).await, spent);
}

#[tokio::test]
async fn creating_a_key_twice_with_one_idempotency_key_creates_one_key_and_stores_no_secret() {
    let app = spawn_app_with(|_, _| {}).await;
    let account = app.create_account("acme").await;
    let create = || {
        app.post("/api/v1/keys")
            .bearer_auth(&account.master_key)
            .header("idempotency-key", "new-key-1")
            .json(&json!({"name": "ci"}))
    };
    let first = create().send().await.unwrap();
    assert_eq!(first.status(), 201);
    let secret = first.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    // The retry learns the key exists, but the secret was never stored to replay.
    let retry = create().send().await.unwrap();
    let body = expect_error(retry, 409, "conflict").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("secret"));
    let keys = app.get_json("/api/v1/keys", &account.master_key).await;
    let names: Vec<_> = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["master", "ci"]);
    let db = std::fs::read(app.dir.path().join("tollgate.db")).unwrap();
    let wal = std::fs::read(app.dir.path().join("tollgate.db-wal")).unwrap_or_default();
    for file in [db, wal] {
        assert!(!file.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }

    // A PATCH without a secret in its answer is replayed.
    let patch = || {
        app.patch(&format!("/api/v1/accounts/{}", account.id))
            .bearer_auth(ADMIN_TOKEN)
            .header("idempotency-key", "rename-1")
            .json(&json!({"name": "Acme Corp"}))
    };
    let first = patch().send().await.unwrap();
    assert_eq!(first.status(), 200);
    let first = first.bytes().await.unwrap();
    let retry = patch().send().await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.bytes().await.unwrap(), first);
}

#[tokio::test]
async fn a_key_is_forgotten_after_the_retention_period() {
    let s = setup(|raw| raw.idempotency.retention = "1h".into()).await;
    let first = work(&s, "daily", "{}").send().await.unwrap();
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    s.app.clock.advance(chrono::Duration::minutes(59));
    let replay = work(&s, "daily", "{}").send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    s.app.clock.advance(chrono::Duration::minutes(1));
    let fresh = work(&s, "daily", "{}").send().await.unwrap();
    assert!(fresh.headers().get("idempotent-replayed").is_none());
    assert_eq!(s.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_a_validation_error() {
    let s = setup(|_| {}).await;
    for bad in ["x".repeat(256), String::new()] {
        let response = work(&s, &bad, "{}").send().await.unwrap();
        let body = expect_error(response, 400, "validation_error").await;
        assert!(body["error"]["field_errors"]["Idempotency-Key"].is_array());
    }
    let non_ascii = s
        .app
        .post("/work")
        .bearer_auth(&s.key)
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
        )
        .body("{}")
        .send()
        .await
        .unwrap();
    let body = expect_error(non_ascii, 400, "validation_error").await;
    assert_eq!(
        body["error"]["field_errors"]["Idempotency-Key"],
        json!(["must be printable ASCII"])
    );
    // 255 characters is fine.
    let longest = work(&s, &"x".repeat(255), "{}").send().await.unwrap();
    assert_eq!(longest.status(), 200);
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_that_times_out_and_retries_gets_one_answer_and_pays_once() {
    let s = setup(|_| {}).await;
    let before = available(&s.app, &s.key).await;
    let timed_out = work(&s, "slow", "{}")
        .header("x-delay-ms", "600")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(timed_out.unwrap_err().is_timeout());
    // Retry as a client should: on 409, wait and try again.
    let mut answer = None;
    for _ in 0..50 {
        let response = work(&s, "slow", "{}").send().await.unwrap();
        if response.status() == 409 {
            assert_eq!(
                response.headers()["x-tollgate-error"],
                "idempotency_in_progress"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        answer = Some(response);
        break;
    }
    let answer = answer.expect("the retry got an answer within five seconds");
    assert_eq!(answer.status(), 200);
    let replayed = answer.headers().contains_key("idempotent-replayed");
    let body: Value = answer.json().await.unwrap();
    // Either the first call ran on and this is its answer, or it was cancelled when its client
    // left (charging nothing) and this retry ran afresh: one charge both ways.
    assert_eq!(replayed, body["call"] == 1, "{body}");
    assert_eq!(before - available(&s.app, &s.key).await, PRICE_NANOS);
}
