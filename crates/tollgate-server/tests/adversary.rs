//! The adversary suite: a customer holding only its own master and usage keys tries every way
//! it can think of to get a paid call for less than its usage (headers, body fields, endpoints,
//! disconnects, the billing API), and an honest one must never be charged more than its usage
//! or for a failure. Each test is named after the hole it pins; docs/billing.md lists what a
//! client can and cannot do to what it pays.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    assert_books_balance, available, expect_error, llm_route, mock_route, request_id, spawn_app,
    spawn_app_with, usage_of, TestApp, ADMIN_TOKEN,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate_server::config::{OtherEndpoints, RouteKind};
use tollgate_store::{HoldSource, LedgerStore};
use tollgate_wire::ErrorProfile;

/// Prices on the standard `/v1` route (mock-gpt): 1 and 2 nanos a token (per million: "1"/"2"
/// credits), so a cost is `input × 1 000 + output × 2 000` nanos.
fn gpt_cost(input: i64, output: i64) -> i64 {
    input * 1_000 + output * 2_000
}

/// The mock's token count for `text`: four characters a token, at least one.
fn tokens(text: &str) -> i64 {
    (text.chars().count() as i64 + 3) / 4
}

async fn post_json(app: &TestApp, path: &str, key: &str, body: Value) -> reqwest::Response {
    app.post(path)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Waits for the one pending data-plane hold the store knows.
async fn pending_request_hold(app: &TestApp) -> tollgate_store::HoldRecord {
    for _ in 0..100 {
        let pending = app.store.pending_holds().await.unwrap();
        if let Some(record) = pending
            .into_iter()
            .find(|r| r.source == HoldSource::Request)
        {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no pending data-plane hold");
}

#[tokio::test]
async fn the_billing_api_cannot_release_a_streaming_requests_hold() {
    let app = spawn_app().await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .header("x-mock-chunks", "10")
        .header("x-mock-chunk-delay-ms", "150")
        .json(
            &json!({"model": "mock-gpt", "stream": true, "max_tokens": 100,
            "messages": [{"role": "user", "content": "Tell me a story"}]}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let hold = pending_request_hold(&app).await;

    // The ledger names the request, never an id the billing API takes.
    let ledger = app.get_json("/api/v1/ledger?limit=500", key).await;
    let references: Vec<&str> = ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reference"].as_str())
        .collect();
    assert!(references.contains(&id.as_str()), "{references:?}");
    assert!(!references.contains(&hold.hold.id.to_string().as_str()));

    // Even knowing the hold's id, every billing-API call answers as for a missing hold.
    let path = format!("/api/v1/holds/{}", hold.hold.id);
    expect_error(app.get_as(&path, key).await, 404, "not_found").await;
    for (action, body) in [("release", json!({})), ("settle", json!({"amount": "0"}))] {
        for token in [key.as_str(), ADMIN_TOKEN] {
            let response = post_json(&app, &format!("{path}/{action}"), token, body.clone()).await;
            expect_error(response, 404, "not_found").await;
        }
    }

    let text = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("tok9"));
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["billing_status"], "settled");
    let cost = gpt_cost(tokens("Tell me a story"), 10);
    assert_eq!(row["cost"]["nanos"], cost);
    assert_eq!(available(&app, key).await, before - cost);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_billing_api_hold_answers_only_its_key_the_accounts_masters_and_the_admin() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let other = app.create_account("other").await;
    let (opener, _) = app.create_usage_key(&account.master_key, json!({})).await;
    let (sibling, _) = app.create_usage_key(&account.master_key, json!({})).await;
    let open = |token: &str| {
        let token = token.to_string();
        let app = &app;
        async move {
            let response = post_json(app, "/api/v1/holds", &token, json!({"amount": "0.01"})).await;
            assert_eq!(response.status(), 201);
            let hold: Value = response.json().await.unwrap();
            format!("/api/v1/holds/{}", hold["id"].as_str().unwrap())
        }
    };

    // Another usage key of the account, and another account's master: as if it did not exist.
    let path = open(&opener).await;
    for stranger in [sibling.as_str(), other.master_key.as_str()] {
        expect_error(app.get_as(&path, stranger).await, 404, "not_found").await;
        let release = post_json(&app, &format!("{path}/release"), stranger, json!({})).await;
        expect_error(release, 404, "not_found").await;
    }
    // The key that opened it settles it.
    let settle = post_json(
        &app,
        &format!("{path}/settle"),
        &opener,
        json!({"amount": "0.004"}),
    )
    .await;
    assert_eq!(settle.status(), 200);
    let settled: Value = settle.json().await.unwrap();
    assert_eq!(settled["charged"]["credits"], "0.004");

    // The account's master key and the admin may resolve any of the account's API holds.
    let path = open(&opener).await;
    assert_eq!(app.get_as(&path, &account.master_key).await.status(), 200);
    let release = post_json(
        &app,
        &format!("{path}/release"),
        &account.master_key,
        json!({}),
    )
    .await;
    assert_eq!(release.status(), 200);
    let path = open(&opener).await;
    let release = post_json(&app, &format!("{path}/release"), ADMIN_TOKEN, json!({})).await;
    assert_eq!(release.status(), 200);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn include_usage_false_does_not_opt_out_of_paying() {
    let app = spawn_app().await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let prompt = "Free tokens, please";
    for options in [json!({"include_usage": false}), json!("not an object")] {
        let response = post_json(
            &app,
            "/v1/chat/completions",
            key,
            json!({"model": "mock-gpt", "stream": true, "stream_options": options,
                "messages": [{"role": "user", "content": prompt}]}),
        )
        .await;
        let id = request_id(&response);
        let text = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
        // The client sees what it asked for; the meter sees everything.
        assert!(!text.contains("prompt_tokens"), "{text}");
        let row = usage_of(&app, key, &id).await;
        assert_eq!(row["billing_status"], "settled");
        assert_eq!(row["cost"]["nanos"], gpt_cost(tokens(prompt), 5));
    }
    // The same through the legacy completions endpoint.
    let response = post_json(
        &app,
        "/v1/completions",
        key,
        json!({"model": "mock-gpt", "stream": true, "prompt": prompt,
            "stream_options": {"include_usage": false}}),
    )
    .await;
    let id = request_id(&response);
    let text = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    assert!(
        !text.contains("prompt_tokens") && text.contains("tok4"),
        "{text}"
    );
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["cost"]["nanos"], gpt_cost(tokens(prompt), 5));
    assert_eq!(
        available(&app, key).await,
        before - 3 * gpt_cost(tokens(prompt), 5)
    );
}

#[tokio::test]
async fn accept_encoding_cannot_hide_the_usage_from_the_meter() {
    let app = spawn_app().await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let prompt = "Compressed, so unreadable?";
    let expected = gpt_cost(tokens(prompt), 5);
    // An upstream that honours Accept-Encoding is asked for identity: the client still gets a
    // plain answer, and it is metered.
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .header("accept-encoding", "gzip, br, zstd")
        .json(&json!({"model": "mock-gpt", "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("content-encoding").is_none());
    let id = request_id(&response);
    response.bytes().await.unwrap();
    assert_eq!(usage_of(&app, key, &id).await["cost"]["nanos"], expected);

    // An upstream that compresses whatever it is asked: decoded for the meter alone, and the
    // client gets the bytes the upstream sent.
    for encoding in ["gzip", "br", "deflate", "zstd"] {
        for stream in [false, true] {
            let response = app
                .post("/v1/chat/completions")
                .bearer_auth(key)
                .header("accept-encoding", encoding)
                .header("x-mock-compress", encoding)
                .json(&json!({"model": "mock-gpt", "stream": stream,
                    "messages": [{"role": "user", "content": prompt}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.headers()["content-encoding"], encoding);
            let id = request_id(&response);
            response.bytes().await.unwrap();
            let row = usage_of(&app, key, &id).await;
            assert_eq!(
                row["billing_status"], "settled",
                "{encoding} stream={stream}"
            );
            assert_eq!(row["cost"]["nanos"], expected, "{encoding} stream={stream}");
        }
    }
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn the_responses_api_is_metered_in_json_and_in_every_final_event() {
    let app = spawn_app().await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let input = "Respond, but for free";
    let expected = gpt_cost(tokens(input), 5);
    let mut charged = 0;
    for (stream, final_event) in [
        (false, "completed"),
        (true, "completed"),
        (true, "incomplete"),
        (true, "failed"),
    ] {
        let response = app
            .post("/v1/responses")
            .bearer_auth(key)
            .header("x-mock-final-event", final_event)
            .json(&json!({"model": "mock-gpt", "input": input, "stream": stream}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        response.bytes().await.unwrap();
        let row = usage_of(&app, key, &id).await;
        assert_eq!(row["billing_status"], "settled", "{final_event}");
        assert_eq!(row["cost"]["nanos"], expected, "{final_event}");
        charged += expected;
    }
    // The client leaves a Responses stream early: charged on what the upstream reports.
    let response = app
        .post("/v1/responses")
        .bearer_auth(key)
        .header("x-mock-chunks", "12")
        .header("x-mock-chunk-delay-ms", "20")
        .json(&json!({"model": "mock-gpt", "input": input, "stream": true}))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["billing_status"], "partial");
    assert_eq!(row["cost"]["nanos"], gpt_cost(tokens(input), 12));
    charged += gpt_cost(tokens(input), 12);
    assert_eq!(available(&app, key).await, before - charged);
}

#[tokio::test]
async fn embeddings_are_charged_their_input_and_count_tokens_is_free() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let text = "embed these words";
    let response = post_json(
        &app,
        "/v1/embeddings",
        key,
        json!({"model": "mock-gpt", "input": [text]}),
    )
    .await;
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["cost"]["nanos"], gpt_cost(tokens(text), 0));

    let response = app
        .post("/anthropic/v1/messages/count_tokens")
        .header("x-api-key", key)
        .json(&json!({"model": "mock-claude", "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let counted: Value = response.json().await.unwrap();
    assert_eq!(counted["input_tokens"], tokens(text));
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["cost"]["nanos"], 0);
    assert_eq!(row["hold"]["nanos"], 0);
    assert_eq!(
        available(&app, key).await,
        before - gpt_cost(tokens(text), 0)
    );
}

#[tokio::test]
async fn an_endpoint_the_meter_cannot_read_is_refused_not_free() {
    let app = spawn_app().await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    for path in [
        "/v1/images/generations",
        "/v1/responses/resp_1/cancel",
        // Paths an upstream could normalise into a metered endpoint other than the one named
        // (the HTTP client normalises `.` and `..` itself; the core's tests cover those).
        "/v1/chat/completions/",
        "/v1//chat/completions",
    ] {
        let response = post_json(&app, path, key, json!({"model": "mock-gpt"})).await;
        let body = expect_error(response, 403, "forbidden").await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(path), "{message}");
    }
    let response = app
        .post("/anthropic/v1/messages/batches")
        .header("x-api-key", key)
        .json(&json!({"requests": []}))
        .send()
        .await
        .unwrap();
    expect_error(response, 403, "forbidden").await;
    assert_eq!(available(&app, key).await, before);
}

#[tokio::test]
async fn an_endpoint_the_meter_cannot_read_may_be_charged_a_configured_price() {
    let app = spawn_app_with(|raw, mock| {
        let mut route = llm_route(
            mock,
            "/priced",
            "/v1",
            RouteKind::Openai,
            "mock-gpt",
            ("1", "2"),
        );
        route.other_endpoints = OtherEndpoints::MaxHold;
        route.max_hold = Some("0.05".into());
        raw.routes.push(route);
    })
    .await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let response = post_json(
        &app,
        "/priced/images/generations",
        key,
        json!({"prompt": "a cat"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["cost"]["credits"], "0.05");
    assert_eq!(available(&app, key).await, before - 50_000_000);
}

#[test]
fn a_free_price_for_other_endpoints_is_a_config_error() {
    use tollgate_server::config::{RawConfig, RawRoute};
    let mut raw = RawConfig::default();
    raw.routes.push(RawRoute {
        prefix: "/v1".into(),
        upstream: "http://127.0.0.1:9".into(),
        group: "openai".into(),
        kind: RouteKind::Openai,
        models: [(
            "m".to_string(),
            tollgate_server::config::RawModel {
                input: "1".into(),
                output: "1".into(),
                cached_input: None,
            },
        )]
        .into(),
        other_endpoints: OtherEndpoints::Flat,
        ..RawRoute::default()
    });
    let problems = tollgate_server::Config::from_raw(raw)
        .unwrap_err()
        .to_string();
    assert!(
        problems.contains("other_endpoints") && problems.contains("free"),
        "{problems}"
    );
}

#[tokio::test]
async fn a_request_without_max_tokens_cannot_outrun_its_hold() {
    let app = spawn_app_with(|raw, _| {
        raw.routes[0].default_max_tokens = 3;
    })
    .await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let prompt = "Write forever";
    // No cap in the body: the route's default is written into it, so the upstream stops there.
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .header("x-mock-chunks", "50")
        .json(&json!({"model": "mock-gpt", "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["cost"]["nanos"], gpt_cost(tokens(prompt), 3));
    assert_eq!(row["over_hold"], false);

    // A cap that is not a whole number is refused, not read as absent.
    for cap in [json!(1e12), json!("100"), json!(-1)] {
        let response = post_json(
            &app,
            "/v1/chat/completions",
            key,
            json!({"model": "mock-gpt", "max_tokens": cap, "messages": []}),
        )
        .await;
        let body = expect_error(response, 400, "validation_error").await;
        assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    }
}

#[tokio::test]
async fn a_call_that_costs_more_than_its_hold_is_flagged_and_counted() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    // An upstream that ignores the cap: the charge stops at the hold, and the loss shows.
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .header("x-mock-chunks", "40")
        .header("x-mock-ignore-max-tokens", "1")
        .json(&json!({"model": "mock-gpt", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = usage_of(&app, key, &id).await;
    let hold = row["hold"]["nanos"].as_i64().unwrap();
    assert_eq!(row["cost"]["nanos"], hold);
    assert_eq!(row["over_hold"], true);
    assert_eq!(
        row["uncovered"]["nanos"].as_i64().unwrap(),
        gpt_cost(tokens("Hi"), 40) - hold
    );
    let metrics = app
        .get_as("/metrics", ADMIN_TOKEN)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_over_hold_calls_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_flat_priced_body_the_upstream_breaks_off_is_released() {
    let app = spawn_app_with(|raw, mock| {
        raw.routes.push(mock_route(
            mock,
            "/flat",
            "/v1",
            "echo",
            ErrorProfile::Native,
        ));
    })
    .await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let response = app
        .post("/flat/chat/completions")
        .bearer_auth(key)
        .header("x-mock-chunks", "10")
        .header("x-mock-abort-after", "3")
        .header("x-mock-chunk-delay-ms", "20")
        .json(&json!({"model": "mock-gpt", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    assert_eq!(response.status(), 200, "the body had begun");
    assert!(response.bytes().await.is_err(), "the client sees the cut");
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["billing_status"], "released");
    assert_eq!(available(&app, key).await, before);
}

#[tokio::test]
async fn the_upstream_reads_the_body_the_meter_priced() {
    // An LLM route whose upstream is the echo API, so the test sees what was forwarded.
    let app = spawn_app_with(|raw, mock| {
        raw.routes.push(llm_route(
            mock,
            "/mirror",
            "/echo",
            RouteKind::Openai,
            "mock-gpt",
            ("1", "2"),
        ));
    })
    .await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    // Duplicate keys: a parser that keeps the first would see a small cap the hold never saw.
    let body = r#"{"model":"mock-gpt","max_tokens":1,"max_tokens":7,"messages":[]}"#;
    let response = app
        .post("/mirror/chat/completions")
        .bearer_auth(key)
        .header("content-type", "application/json")
        .header("x-http-method-override", "GET")
        .header("accept-encoding", "gzip")
        .header("range", "bytes=0-10")
        .header("if-none-match", "\"etag\"")
        .body(body)
        .send()
        .await
        .unwrap();
    let echoed: Value = response.json().await.unwrap();
    let forwarded: Value = serde_json::from_str(echoed["body"].as_str().unwrap()).unwrap();
    assert_eq!(forwarded["max_tokens"], 7);
    let raw_forwarded = echoed["body"].as_str().unwrap();
    assert_eq!(
        raw_forwarded.matches("max_tokens").count(),
        1,
        "{raw_forwarded}"
    );
    let headers = &echoed["headers"];
    for stripped in ["x-http-method-override", "range", "if-none-match"] {
        assert!(headers.get(stripped).is_none(), "{stripped}: {headers}");
    }
    assert_eq!(headers["accept-encoding"], "identity");
}

#[tokio::test]
async fn an_anthropic_stream_that_reports_no_usage_is_estimated_not_free() {
    let app = spawn_app().await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let response = app
        .post("/anthropic/v1/messages")
        .header("x-api-key", key)
        .header("x-mock-no-usage", "1")
        .header("x-mock-chunks", "8")
        .json(
            &json!({"model": "mock-claude", "max_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["billing_status"], "estimated");
    assert!(row["input_tokens"].as_i64().unwrap() > 0);
    assert_eq!(row["output_tokens"], 10, "40 characters of text");
    assert!(row["cost"]["nanos"].as_i64().unwrap() > 10 * 15_000);
}

/// Makes every ledger commit fail until the returned guard is dropped.
struct CommitsFail<'a>(&'a TestApp);

impl<'a> CommitsFail<'a> {
    fn start(app: &'a TestApp) -> Self {
        app.store
            .commits_fail
            .store(true, std::sync::atomic::Ordering::SeqCst);
        CommitsFail(app)
    }
}

impl Drop for CommitsFail<'_> {
    fn drop(&mut self) {
        self.0
            .store
            .commits_fail
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_grant_the_store_did_not_confirm_says_so_and_its_retry_applies_it_once() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let grant = json!({"amount": "7", "reason": "invoice 1", "reference": "inv-1"});
    let path = format!("/api/v1/accounts/{}/credits", account.id);
    {
        let _outage = CommitsFail::start(&app);
        let response = app.admin_post(&path, grant.clone()).send().await.unwrap();
        let body = expect_error(response, 503, "service_unavailable").await;
        // Not "nothing was charged": the grant is queued, and the caller is told how to confirm.
        assert_eq!(body["error"]["details"]["grant"], "queued", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("same reference"), "{message}");
    }
    // The store answers again: the queued grant lands, and the retry finds it.
    let response = app.admin_post(&path, grant.clone()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-grant"], "already_applied");
    assert_eq!(available(&app, key).await, before + 7_000_000_000);
    let response = app.admin_post(&path, grant).send().await.unwrap();
    assert_eq!(response.headers()["x-tollgate-grant"], "already_applied");
    assert_eq!(available(&app, key).await, before + 7_000_000_000);
    // A new reference is a new grant.
    let response = app
        .admin_post(
            &path,
            json!({"amount": "1", "reason": "invoice 2", "reference": "inv-2"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-tollgate-grant"], "applied");
    assert_eq!(available(&app, key).await, before + 8_000_000_000);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_grant_past_the_balance_limit_is_400_naming_the_limit() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let path = format!("/api/v1/accounts/{}/credits", account.id);
    // With the starter credits, the largest amount a grant takes passes the limit of a billion.
    let response = app
        .admin_post(
            &path,
            json!({"amount": "999999999.999999999", "reason": "too much"}),
        )
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 400, "validation_error").await;
    let message = body["error"]["field_errors"]["amount"][0].as_str().unwrap();
    assert!(message.contains("limit of 1000000000 credits"), "{message}");
    // More than an i64 of nano-units: refused as it is parsed, never a 500.
    let response = app
        .admin_post(
            &path,
            json!({"amount": "99999999999999999", "reason": "too much"}),
        )
        .send()
        .await
        .unwrap();
    expect_error(response, 400, "validation_error").await;
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_billing_api_hold_the_store_did_not_confirm_is_released_not_stranded() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    {
        let _outage = CommitsFail::start(&app);
        let response = post_json(&app, "/api/v1/holds", key, json!({"amount": "2"})).await;
        let body = expect_error(response, 503, "service_unavailable").await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("released"), "{message}");
    }
    // Once the store answers, the opening and its release land together: nothing reserved.
    let balance = app.get_json("/api/v1/billing/balance", key).await;
    assert_eq!(balance["available"]["nanos"], before);
    assert_eq!(balance["held"]["nanos"], 0);
    assert!(app
        .store
        .pending_holds()
        .await
        .unwrap()
        .iter()
        .all(|r| r.hold.account != account.id));
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_settlement_the_store_did_not_confirm_says_it_is_queued_and_applies_once() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let hold = post_json(&app, "/api/v1/holds", key, json!({"amount": "2"})).await;
    assert_eq!(hold.status(), 201);
    let id = hold.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let settle = format!("/api/v1/holds/{id}/settle");
    {
        let _outage = CommitsFail::start(&app);
        let response = post_json(&app, &settle, key, json!({"amount": "1.5"})).await;
        let body = expect_error(response, 503, "service_unavailable").await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("queued"), "{message}");
        assert!(!message.contains("Nothing was charged"), "{message}");
        // The hold reads as settled at once: this node's book has the queued settlement.
        let read = app.get_json(&format!("/api/v1/holds/{id}"), key).await;
        assert_eq!(read["status"], "settled");
    }
    // A retry, with another amount, answers the first outcome; the charge lands once.
    let response = post_json(&app, &settle, key, json!({"amount": "0.5"})).await;
    assert_eq!(response.status(), 200);
    let settled: Value = response.json().await.unwrap();
    assert_eq!(settled["status"], "settled");
    assert_eq!(settled["charged"]["nanos"], 1_500_000_000);
    let stored = app
        .store
        .hold(tollgate_core::HoldId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.hold.charged.0, 1_500_000_000);
    let balance = app.get_json("/api/v1/billing/balance", key).await;
    assert_eq!(balance["available"]["nanos"], before - 1_500_000_000);
    assert_eq!(balance["held"]["nanos"], 0);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_node_whose_ledger_writer_stopped_refuses_paid_calls_and_is_unready() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    app.store
        .commit_panics
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // This call's writes reach the writer, whose commit panics.
    let response = app.get("/echo/hi").bearer_auth(key).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut ready = app.get("/readyz").send().await.unwrap();
    for _ in 0..100 {
        if ready.status() == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready = app.get("/readyz").send().await.unwrap();
    }
    let body = expect_error(ready, 503, "service_unavailable").await;
    assert_eq!(body["error"]["details"]["dependency"], "ledger_writer");
    // Nothing it could not record is admitted: 503 before any work, nothing charged.
    let response = app.get("/echo/hi").bearer_auth(key).send().await.unwrap();
    let body = expect_error(response, 503, "service_unavailable").await;
    assert_eq!(body["error"]["details"]["dependency"], "store");
}

#[tokio::test]
async fn an_idempotent_retry_after_the_first_runs_past_its_hold_is_charged_once() {
    let app = spawn_app_with(|raw, _| raw.billing.request_hold_ttl = "2s".into()).await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let body = json!({"model": "mock-gpt", "stream": true, "max_tokens": 20,
        "messages": [{"role": "user", "content": "Once only"}]});
    let first = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .header("idempotency-key", "order-7")
        .header("x-mock-chunks", "10")
        .header("x-mock-chunk-delay-ms", "50")
        .json(&body)
        .send()
        .await
        .unwrap();
    let first_id = request_id(&first);
    // The first run outlives its claim, and the hold it opened within it.
    app.clock.advance(chrono::Duration::seconds(3));
    let retry = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .header("idempotency-key", "order-7")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    let retry_id = request_id(&retry);
    retry.bytes().await.unwrap();
    first.bytes().await.unwrap();
    let cost = gpt_cost(tokens("Once only"), 5);
    assert_eq!(usage_of(&app, key, &retry_id).await["cost"]["nanos"], cost);
    let first_row = usage_of(&app, key, &first_id).await;
    assert_eq!(first_row["billing_status"], "expired");
    assert_eq!(first_row["cost"]["nanos"], 0);
    assert_eq!(available(&app, key).await, before - cost);
}

#[tokio::test]
async fn an_idempotent_replay_is_not_served_to_a_key_that_may_not_make_the_call() {
    let app = spawn_app_with(|raw, _| {
        let mini = raw.routes[0].models["mock-gpt"].clone();
        raw.routes[0].models.insert("mock-gpt-mini".into(), mini);
    })
    .await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let body = json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "Hi"}]});
    let send = |key: String| {
        let app = &app;
        let body = body.clone();
        async move {
            app.post("/v1/chat/completions")
                .bearer_auth(key)
                .header("idempotency-key", "shared-1")
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let first = send(master.clone()).await;
    assert_eq!(first.status(), 200);
    // Read to its end: the outcome is recorded before the client sees the end.
    first.bytes().await.unwrap();
    let (echo_only, _) = app
        .create_usage_key(master, json!({"scopes": ["echo"]}))
        .await;
    expect_error(send(echo_only).await, 403, "insufficient_scope").await;
    let (other_model, _) = app
        .create_usage_key(master, json!({"scopes": ["openai:mock-gpt-mini"]}))
        .await;
    expect_error(send(other_model).await, 403, "model_not_allowed").await;
    // A key that may make the call gets the stored answer, charged nothing again.
    let (allowed, _) = app
        .create_usage_key(master, json!({"scopes": ["openai"]}))
        .await;
    let replay = send(allowed).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn several_choices_are_held_for_each_and_odd_fields_are_refused() {
    let app = spawn_app().await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let hold_of = |body: Value| {
        let app = &app;
        async move {
            let response = post_json(app, "/v1/chat/completions", key, body).await;
            let id = request_id(&response);
            response.bytes().await.unwrap();
            usage_of(app, key, &id).await["hold"]["nanos"]
                .as_i64()
                .unwrap()
        }
    };
    let one = hold_of(json!({"model": "mock-gpt", "max_tokens": 100, "messages": []})).await;
    let four =
        hold_of(json!({"model": "mock-gpt", "max_tokens": 100, "n": 4, "messages": []})).await;
    // Three more choices of up to 100 tokens each, at 2 000 nanos a token (the body is a few
    // bytes longer, so its input estimate a token or two more).
    assert!(four - one >= 3 * 100 * 2_000, "one {one}, four {four}");
    // Fields whose meaning the meter would have to guess are refused, not guessed.
    for (field, value) in [("n", json!("4")), ("stream", json!("true"))] {
        let mut body = json!({"model": "mock-gpt", "messages": []});
        body[field] = value;
        let response = post_json(&app, "/v1/chat/completions", key, body).await;
        let body = expect_error(response, 400, "validation_error").await;
        assert_eq!(body["error"]["param"], field, "{body}");
    }
}

#[tokio::test]
async fn a_client_that_reads_slowly_cannot_outlast_its_hold() {
    let app = spawn_app_with(|raw, _| raw.billing.request_hold_ttl = "2s".into()).await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .header("x-mock-chunks", "30")
        .json(
            &json!({"model": "mock-gpt", "stream": true, "max_tokens": 50,
            "messages": [{"role": "user", "content": "Slowly"}]}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    // The client takes nothing yet: Tollgate reads the upstream ahead of it and settles as soon as
    // the usage has passed, well before the hold's deadline.
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["billing_status"], "settled");
    let cost = gpt_cost(tokens("Slowly"), 30);
    assert_eq!(row["cost"]["nanos"], cost);
    // Past the deadline, the client still gets the whole answer, charged once.
    app.clock.advance(chrono::Duration::seconds(3));
    let text = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    assert!(
        text.contains("tok29") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert_eq!(available(&app, key).await, before - cost);
}

#[tokio::test]
async fn a_background_response_is_refused_not_free() {
    let app = spawn_app().await;
    let account = app.create_account("mallory").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let response = post_json(
        &app,
        "/v1/responses",
        key,
        json!({"model": "mock-gpt", "input": "later, for free", "background": true}),
    )
    .await;
    let body = expect_error(response, 403, "forbidden").await;
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(available(&app, key).await, before);
}
