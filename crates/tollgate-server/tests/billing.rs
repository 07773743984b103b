//! Black-box tests of every charging rule: what is held, when it settles or releases, streams
//! cut by either side, 402 bodies, the billing API, credits, the ledger and the usage log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    assert_books_balance, available, expect_error, llm_route, mock_route, request_id, spawn_app,
    spawn_app_with, usage_of, TestApp, ADMIN_TOKEN,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate_core::{AccountId, Clock};
use tollgate_server::config::{RouteKind, StreamPolicy};
use tollgate_wire::ErrorProfile;

const ECHO_PRICE: i64 = 1_000_000; // "0.001" credits in nanos

async fn echo(app: &TestApp, key: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app.get("/echo/hi").bearer_auth(key);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn each_call_lowers_the_balance_by_exactly_its_price() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let before = available(&app, &account.master_key).await;
    let mut last = String::new();
    for _ in 0..3 {
        let response = echo(&app, &account.master_key, &[]).await;
        assert_eq!(response.status(), 200);
        last = request_id(&response);
        response.bytes().await.unwrap();
    }
    assert_eq!(
        available(&app, &account.master_key).await,
        before - 3 * ECHO_PRICE
    );
    let row = usage_of(&app, &account.master_key, &last).await;
    assert_eq!(row["billing_status"], "settled");
    assert_eq!(row["cost"]["credits"], "0.001");
    assert_eq!(row["hold"]["credits"], "0.001");
    assert_eq!(row["status"], 200);
    assert_eq!(row["route"], "/echo");
    let balance = app
        .get_json("/api/v1/billing/balance", &account.master_key)
        .await;
    assert_eq!(balance["held"]["nanos"], 0);
    assert_eq!(balance["spent_this_month"]["nanos"], 3 * ECHO_PRICE);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn failed_calls_charge_nothing() {
    let app = spawn_app_with(|raw, mock| {
        let mut slow = mock_route(mock, "/slow", "/echo", "echo", ErrorProfile::Native);
        slow.timeout = "100ms".into();
        let mut dead = mock_route(mock, "/dead", "/echo", "echo", ErrorProfile::Native);
        dead.upstream = "http://127.0.0.1:9/echo".into();
        raw.routes.extend([slow, dead]);
    })
    .await;
    let account = app.create_account("acme").await;
    let before = available(&app, &account.master_key).await;

    let failed = echo(&app, &account.master_key, &[("x-mock-status", "500")]).await;
    assert_eq!(failed.status(), 500, "the upstream's 500 passes through");
    let failed_id = request_id(&failed);
    let timed_out = app
        .get("/slow/x")
        .bearer_auth(&account.master_key)
        .header("x-mock-delay-ms", "1000")
        .send()
        .await
        .unwrap();
    let timed_out_id = request_id(&timed_out);
    expect_error(timed_out, 504, "upstream_timeout").await;
    let unreachable = app
        .get("/dead/x")
        .bearer_auth(&account.master_key)
        .send()
        .await
        .unwrap();
    expect_error(unreachable, 502, "upstream_error").await;
    let not_found = echo(&app, &account.master_key, &[("x-mock-status", "404")]).await;
    assert_eq!(not_found.status(), 404);

    assert_eq!(available(&app, &account.master_key).await, before);
    let row = usage_of(&app, &account.master_key, &failed_id).await;
    assert_eq!(row["billing_status"], "released");
    assert_eq!(row["upstream_status"], 500);
    assert_eq!(row["cost"]["nanos"], 0);
    let row = usage_of(&app, &account.master_key, &timed_out_id).await;
    assert_eq!(row["error_code"], "upstream_timeout");
    assert_eq!(row["status"], 504);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn insufficient_balance_is_402_with_the_required_amount_and_the_balance() {
    let app = spawn_app().await;
    let response = app
        .admin_post(
            "/api/v1/accounts",
            json!({"name": "poor", "starter_credits": "0.0005"}),
        )
        .send()
        .await
        .unwrap();
    let key = response.json::<Value>().await.unwrap()["master_key"]["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = echo(&app, &key, &[]).await;
    let refused_id = request_id(&refused);
    let body = expect_error(refused, 402, "insufficient_balance").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("0.001 USD") && message.contains("0.0005 USD"),
        "{message}"
    );
    assert_eq!(body["error"]["details"]["required"]["credits"], "0.001");
    assert_eq!(body["error"]["details"]["balance"]["credits"], "0.0005");
    assert_eq!(body["error"]["details"]["balance"]["currency"], "USD");
    assert_eq!(available(&app, &key).await, 500_000, "nothing charged");
    let row = usage_of(&app, &key, &refused_id).await;
    assert_eq!(row["error_code"], "insufficient_balance");
    assert_eq!(row["billing_status"], "released");
}

#[tokio::test]
async fn two_hundred_concurrent_calls_against_a_balance_for_fifty() {
    let app = spawn_app_with(|raw, _| raw.billing.starter_credits = "0.05".into()).await;
    let account = app.create_account("acme").await;
    let calls = (0..200).map(|_| {
        let request = app.get("/echo/hi").bearer_auth(&account.master_key);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let code = response
                .headers()
                .get("x-tollgate-error")
                .map(|v| v.to_str().unwrap().to_string());
            response.bytes().await.unwrap();
            (status, code)
        }
    });
    let outcomes = futures_util::future::join_all(calls).await;
    let ok = outcomes.iter().filter(|(s, _)| *s == 200).count();
    let refused = outcomes
        .iter()
        .filter(|(s, c)| *s == 402 && c.as_deref() == Some("insufficient_balance"))
        .count();
    assert_eq!((ok, refused), (50, 150), "{outcomes:?}");
    assert_eq!(available(&app, &account.master_key).await, 0);
    assert_books_balance(&app, account.id).await;
}

/// The cost of an OpenAI response on the test route (1 and 2 credits per million tokens).
fn openai_cost(usage: &Value) -> i64 {
    usage["prompt_tokens"].as_i64().unwrap() * 1_000
        + usage["completion_tokens"].as_i64().unwrap() * 2_000
}

#[tokio::test]
async fn llm_json_calls_are_charged_on_the_reported_tokens() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let before = available(&app, &account.master_key).await;
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(&account.master_key)
        .json(&json!({"model": "mock-gpt", "max_tokens": 50,
            "messages": [{"role": "user", "content": "Tell me about metered APIs, briefly."}]}))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    let cost = openai_cost(&body["usage"]);
    assert!(cost > 0);
    assert_eq!(available(&app, &account.master_key).await, before - cost);
    let row = usage_of(&app, &account.master_key, &id).await;
    assert_eq!(row["model"], "mock-gpt");
    assert_eq!(row["output_tokens"], body["usage"]["completion_tokens"]);
    assert_eq!(row["billing_status"], "settled");
    // The hold was the input estimate (body bytes / 4) plus 50 output tokens.
    assert!(row["hold"]["nanos"].as_i64().unwrap() >= 50 * 2_000);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn unknown_model_is_404_listing_the_models_and_free() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(&account.master_key)
        .json(&json!({"model": "gpt-9", "messages": []}))
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 404, "model_not_found").await;
    // The OpenAI profile has no `details`; the message lists the models.
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.ends_with("Available: mock-gpt."), "{message}");
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(&account.master_key)
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 400, "validation_error").await;
    assert_eq!(body["error"]["param"], "model");
}

/// Reads an SSE response to its end and returns the final usage the client saw.
async fn read_stream(response: reqwest::Response) -> String {
    String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn openai_streams_are_charged_on_a_usage_chunk_the_client_did_not_ask_for_and_does_not_see() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let before = available(&app, &account.master_key).await;
    // No stream_options: Tollgate asks the upstream for the usage chunk itself, reads it, and
    // cuts it from what the client gets, which is what the client asked for.
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(&account.master_key)
        .json(&json!({"model": "mock-gpt", "stream": true,
            "messages": [{"role": "user", "content": "Hello there"}]}))
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let text = read_stream(response).await;
    assert!(!text.contains("prompt_tokens"), "{text}");
    assert!(
        text.contains("tok4") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    // "Hello there": 11 characters, 3 tokens in; 5 words out.
    let cost = 3 * 1_000 + 5 * 2_000;
    let row = usage_of(&app, &account.master_key, &id).await;
    assert_eq!(row["billing_status"], "settled");
    assert_eq!(row["cost"]["nanos"], cost);
    assert_eq!(available(&app, &account.master_key).await, before - cost);

    // Asked for, it arrives, and costs the same.
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(&account.master_key)
        .json(&json!({"model": "mock-gpt", "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Hello there"}]}))
        .send()
        .await
        .unwrap();
    let text = read_stream(response).await;
    let usage_line = text
        .lines()
        .find(|l| l.contains("\"usage\"") && l.contains("prompt_tokens"))
        .expect("the stream ends with a usage chunk");
    let chunk: Value = serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
    assert_eq!(openai_cost(&chunk["usage"]), cost);
}

#[tokio::test]
async fn a_stream_without_usage_follows_the_route_policy() {
    let app = spawn_app_with(|raw, mock| {
        let mut release = llm_route(
            mock,
            "/releasing",
            "/v1",
            RouteKind::Openai,
            "mock-gpt",
            ("1", "2"),
        );
        release.stream_policy = StreamPolicy::Release;
        raw.routes.push(release);
    })
    .await;
    let account = app.create_account("acme").await;
    let body = json!({"model": "mock-gpt", "stream": true,
        "messages": [{"role": "user", "content": "Hello"}]});
    // An upstream that reports no usage at all: `release` is an explicit opt-in.
    let released = app
        .post("/releasing/chat/completions")
        .bearer_auth(&account.master_key)
        .header("x-mock-chunks", "8")
        .header("x-mock-no-usage", "1")
        .json(&body)
        .send()
        .await
        .unwrap();
    let released_id = request_id(&released);
    read_stream(released).await;
    let row = usage_of(&app, &account.master_key, &released_id).await;
    assert_eq!(row["billing_status"], "released");
    assert_eq!(row["cost"]["nanos"], 0);

    // The default, `estimate`: input from the request body as forwarded, output from the text.
    let estimated = app
        .post("/v1/chat/completions")
        .bearer_auth(&account.master_key)
        .header("x-mock-chunks", "8")
        .header("x-mock-no-usage", "1")
        .json(&body)
        .send()
        .await
        .unwrap();
    let estimated_id = request_id(&estimated);
    read_stream(estimated).await;
    let row = usage_of(&app, &account.master_key, &estimated_id).await;
    assert_eq!(row["billing_status"], "estimated");
    // Eight chunks of "tokN " (5 characters): 40 characters, 10 tokens at 2 per million.
    assert_eq!(row["output_tokens"], 10);
    let input = row["input_tokens"].as_i64().unwrap();
    assert!(
        input >= 20,
        "about a quarter of the forwarded body's bytes, not 0: {input}"
    );
    assert_eq!(row["cost"]["nanos"], input * 1_000 + 10 * 2_000);
}

#[tokio::test]
async fn a_stream_the_client_abandons_is_settled_on_the_usage_the_upstream_reports() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let before = available(&app, &account.master_key).await;
    let response = app
        .post("/anthropic/v1/messages")
        .header("x-api-key", &account.master_key)
        .header("x-mock-chunks", "20")
        .header("x-mock-chunk-delay-ms", "30")
        .json(
            &json!({"model": "mock-claude", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "A long story, please."}]}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream); // the client leaves after the first event

    let row = usage_of(&app, &account.master_key, &id).await;
    assert_eq!(row["billing_status"], "partial");
    assert_eq!(
        row["output_tokens"], 20,
        "the mock's final count, not what was seen"
    );
    let input = row["input_tokens"].as_i64().unwrap();
    let cost = input * 3_000 + 20 * 15_000;
    assert_eq!(row["cost"]["nanos"], cost);
    assert_eq!(row["status"], 499);
    assert_eq!(available(&app, &account.master_key).await, before - cost);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_stream_the_upstream_breaks_off_charges_nothing() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let before = available(&app, &account.master_key).await;
    let response = app
        .post("/anthropic/v1/messages")
        .header("x-api-key", &account.master_key)
        .header("x-mock-chunks", "10")
        .header("x-mock-abort-after", "4")
        .header("x-mock-chunk-delay-ms", "20")
        .json(
            &json!({"model": "mock-claude", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    assert_eq!(response.status(), 200, "the stream had begun");
    assert!(
        response.bytes().await.is_err(),
        "the client sees the cut too"
    );
    let row = usage_of(&app, &account.master_key, &id).await;
    assert_eq!(row["billing_status"], "released");
    assert_eq!(available(&app, &account.master_key).await, before);
}

#[tokio::test]
async fn per_unit_prices_read_units_from_a_json_pointer_or_a_header() {
    let app = spawn_app_with(|raw, mock| {
        let mut by_body = mock_route(mock, "/units", "/echo", "echo", ErrorProfile::Native);
        by_body.price = "0".into();
        by_body.unit_price = Some("0.01".into());
        by_body.units_from = Some("/headers/x-units-in-body".into());
        by_body.max_hold = Some("1".into());
        let mut by_header = mock_route(mock, "/hdr", "/echo", "echo", ErrorProfile::Native);
        by_header.price = "0.001".into();
        by_header.unit_price = Some("0.01".into());
        by_header.units_from = Some("header:x-units".into());
        by_header.max_hold = Some("1".into());
        raw.routes.extend([by_body, by_header]);
    })
    .await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    // The echo API reflects request headers in its JSON body.
    let response = app
        .get("/units/x")
        .bearer_auth(key)
        .header("x-units-in-body", "2.5")
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["units"], "2.5");
    assert_eq!(row["cost"]["credits"], "0.025");
    assert_eq!(row["hold"]["credits"], "1");

    let response = app
        .get("/hdr/x")
        .bearer_auth(key)
        .header("x-mock-units", "3")
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["cost"]["credits"], "0.031", "flat 0.001 + 3 × 0.01");

    // No units in the response: the estimate policy (the default) charges the flat price.
    let response = app.get("/hdr/x").bearer_auth(key).send().await.unwrap();
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["billing_status"], "estimated");
    assert_eq!(row["cost"]["credits"], "0.001");
    assert_eq!(
        available(&app, key).await,
        before - 25_000_000 - 31_000_000 - 1_000_000
    );
}

#[tokio::test]
async fn a_key_over_its_monthly_cap_gets_402_until_the_next_month() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (key, _) = app
        .create_usage_key(&account.master_key, json!({"monthly_spend_cap": "0.002"}))
        .await;
    for _ in 0..2 {
        let response = echo(&app, &key, &[]).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let body = expect_error(echo(&app, &key, &[]).await, 402, "key_quota_exceeded").await;
    assert_eq!(body["error"]["details"]["cap"]["credits"], "0.002");
    assert_eq!(body["error"]["details"]["spent"]["credits"], "0.002");
    // The master key has no cap.
    assert_eq!(echo(&app, &account.master_key, &[]).await.status(), 200);
    app.clock.advance(chrono::Duration::days(32));
    assert_eq!(echo(&app, &key, &[]).await.status(), 200, "a new month");
}

/// A cap refusal gives the hold this call needed (the real cause), and on an LLM call which
/// field lowers it; the same call with a lower cap then fits.
#[tokio::test]
async fn a_cap_refusal_says_what_the_call_needed_and_how_to_need_less() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (key, _) = app
        .create_usage_key(&account.master_key, json!({"monthly_spend_cap": "0.005"}))
        .await;
    let chat = |body: Value| {
        app.post("/v1/chat/completions")
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let messages = json!([{"role": "user", "content": "Hello!"}]);
    // 4096 output tokens (the route's default cap) at 2 per million: over the cap on its own.
    let refused = chat(json!({"model": "mock-gpt", "messages": messages}))
        .await
        .unwrap();
    let body = expect_error(refused, 402, "key_quota_exceeded").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("needs a hold of 0.008217 USD"),
        "{message}"
    );
    assert!(message.contains("leaves 0.005"), "{message}");
    assert!(
        message.contains("4096 output tokens") && message.contains("'max_completion_tokens'"),
        "{message}"
    );
    let fits = chat(json!({"model": "mock-gpt", "messages": messages, "max_tokens": 100}))
        .await
        .unwrap();
    assert_eq!(fits.status(), 200);
}

/// Bad query values are named with what they take, not the parser's words.
#[tokio::test]
async fn a_bad_query_value_says_what_the_parameter_takes() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    for (query, field, expected) in [
        ("from=2026-12", "from", "RFC 3339"),
        ("to=yesterday", "to", "RFC 3339"),
        ("status=ok", "status", "HTTP status code"),
        ("limit=-1", "limit", "whole number"),
    ] {
        let response = app.get_as(&format!("/api/v1/requests?{query}"), key).await;
        let body = expect_error(response, 400, "validation_error").await;
        let said = body["error"]["field_errors"][field][0].as_str().unwrap();
        assert!(said.contains(expected), "{query}: {said}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(!message.contains("premature") && !message.contains("invalid digit"));
    }
    let response = app.get_as("/api/v1/usage?from=2026-12", key).await;
    let body = expect_error(response, 400, "validation_error").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("RFC 3339"));
}

async fn create_hold(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.post("/api/v1/holds")
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn billing_api_holds_settle_once_and_release() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let response = create_hold(
        &app,
        key,
        json!({"amount": "1.5", "ttl_seconds": 600, "metadata": {"job": "render-42"}}),
    )
    .await;
    assert_eq!(response.status(), 201);
    let hold: Value = response.json().await.unwrap();
    assert_eq!(hold["status"], "pending");
    assert_eq!(hold["metadata"]["job"], "render-42");
    let id = hold["id"].as_str().unwrap();
    let balance = app.get_json("/api/v1/billing/balance", key).await;
    assert_eq!(balance["held"]["credits"], "1.5");
    assert_eq!(balance["available"]["credits"], "3.5");

    let too_much = app
        .post(&format!("/api/v1/holds/{id}/settle"))
        .bearer_auth(key)
        .json(&json!({"amount": "2"}))
        .send()
        .await
        .unwrap();
    expect_error(too_much, 400, "validation_error").await;
    let settle = |amount: &str| {
        app.post(&format!("/api/v1/holds/{id}/settle"))
            .bearer_auth(key)
            .json(&json!({ "amount": amount }))
            .send()
    };
    let first: Value = settle("0.4").await.unwrap().json().await.unwrap();
    assert_eq!(first["status"], "settled");
    assert_eq!(first["charged"]["credits"], "0.4");
    // Settling again, or releasing, returns the first outcome and changes nothing.
    let again: Value = settle("1").await.unwrap().json().await.unwrap();
    assert_eq!(again, first);
    let release: Value = app
        .post(&format!("/api/v1/holds/{id}/release"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(release, first);
    assert_eq!(available(&app, key).await, 4_600_000_000);

    let second: Value = create_hold(&app, key, json!({"amount": "1"}))
        .await
        .json()
        .await
        .unwrap();
    let released: Value = app
        .post(&format!(
            "/api/v1/holds/{}/release",
            second["id"].as_str().unwrap()
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(released["status"], "released");
    assert_eq!(available(&app, key).await, 4_600_000_000);

    // Another account's hold does not exist for this one.
    let other = app.create_account("other").await;
    let response = app
        .get_as(&format!("/api/v1/holds/{id}"), &other.master_key)
        .await;
    expect_error(response, 404, "not_found").await;
    let response = create_hold(&app, key, json!({"amount": "100"})).await;
    expect_error(response, 402, "insufficient_balance").await;
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_billing_api_hold_never_settled_is_released_at_its_ttl() {
    let app = spawn_app_with(|raw, _| raw.billing.sweep_interval = "20ms".into()).await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let hold: Value = create_hold(&app, key, json!({"amount": "2", "ttl_seconds": 60}))
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/api/v1/holds/{}", hold["id"].as_str().unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.get_json(&path, key).await["status"], "pending");
    app.clock.advance(chrono::Duration::seconds(61));
    let mut status = Value::Null;
    for _ in 0..100 {
        status = app.get_json(&path, key).await["status"].clone();
        if status != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, "expired");
    assert_eq!(available(&app, key).await, 5_000_000_000);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn admin_grants_credits_and_the_ledger_pages_through_every_transfer() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let response = app
        .admin_post(
            &format!("/api/v1/accounts/{}/credits", account.id),
            json!({"amount": "2.5", "reason": "support credit"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let balance: Value = response.json().await.unwrap();
    assert_eq!(balance["available"]["credits"], "7.5");
    for bad in [
        json!({"amount": "0", "reason": "x"}),
        json!({"amount": "-1", "reason": "x"}),
        json!({"amount": "1", "reason": ""}),
    ] {
        let response = app
            .admin_post(&format!("/api/v1/accounts/{}/credits", account.id), bad)
            .send()
            .await
            .unwrap();
        expect_error(response, 400, "validation_error").await;
    }
    let response = app
        .post(&format!("/api/v1/accounts/{}/credits", account.id))
        .bearer_auth(key)
        .json(&json!({"amount": "1", "reason": "self-service"}))
        .send()
        .await
        .unwrap();
    expect_error(response, 403, "forbidden").await;
    let response = app
        .admin_post(
            &format!("/api/v1/accounts/{}/credits", AccountId::new()),
            json!({"amount": "1", "reason": "x"}),
        )
        .send()
        .await
        .unwrap();
    expect_error(response, 404, "not_found").await;

    echo(&app, key, &[]).await.bytes().await.unwrap(); // hold, charge: two more transfers
    let first = app.get_json("/api/v1/ledger?limit=2", key).await;
    let kinds: Vec<&str> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["charge", "hold"]);
    // Each entry says which way the money went.
    let wallet = format!("wallet:{}", account.id);
    let holds = format!("holds:{}", account.id);
    assert_eq!(first["data"][0]["from"], holds.as_str());
    assert_eq!(first["data"][0]["to"], "revenue");
    assert_eq!(first["data"][1]["from"], wallet.as_str());
    assert_eq!(first["data"][1]["to"], holds.as_str());
    let cursor = first["next_cursor"].as_str().unwrap();
    let rest = app
        .get_json(&format!("/api/v1/ledger?limit=10&cursor={cursor}"), key)
        .await;
    let entries = rest["data"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["memo"], "support credit");
    assert_eq!(entries[1]["memo"], "starter credits");
    assert!(rest["next_cursor"].is_null());
    let response = app.get_as("/api/v1/ledger?cursor=nope", key).await;
    expect_error(response, 400, "validation_error").await;
}

/// A request ID locates its call whatever the answer was: a refusal of a known key, a replay and
/// an idempotency conflict are rows like any other, charged nothing.
#[tokio::test]
async fn every_request_id_an_account_was_answered_with_can_be_looked_up() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let lookup = |id: String| {
        let app = &app;
        async move { usage_of(app, key, &id).await }
    };

    let (far_away, _) = app
        .create_usage_key(key, json!({"allowed_ips": ["10.0.0.0/8"]}))
        .await;
    let refused = app.get_as("/echo/x", &far_away).await;
    let refused_id = request_id(&refused);
    expect_error(refused, 403, "ip_not_allowed").await;
    let row = lookup(refused_id).await;
    assert_eq!(row["status"], 403);
    assert_eq!(row["error_code"], "ip_not_allowed");
    assert!(row["error_message"]
        .as_str()
        .unwrap()
        .contains("IP allowlist"));
    assert_eq!(row["cost"]["nanos"], 0);
    assert_eq!(row["billing_status"], "released");

    let post = |body: &'static str| {
        app.post("/echo/work")
            .bearer_auth(key)
            .header("idempotency-key", "order-7")
            .body(body)
    };
    let first = post("one").send().await.unwrap();
    let first_id = request_id(&first);
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let replayed = post("one").send().await.unwrap();
    let replay_id = request_id(&replayed);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    replayed.bytes().await.unwrap();
    let mismatch = post("two").send().await.unwrap();
    let mismatch_id = request_id(&mismatch);
    expect_error(mismatch, 422, "idempotency_key_mismatch").await;

    let row = lookup(replay_id).await;
    assert_eq!(row["status"], 200);
    assert_eq!(row["replay_of"], first_id.as_str());
    assert_eq!(row["cost"]["nanos"], 0);
    assert!(row["error_code"].is_null());
    let row = lookup(mismatch_id).await;
    assert_eq!(row["status"], 422);
    assert_eq!(row["error_code"], "idempotency_key_mismatch");
    assert!(row["replay_of"].is_null());
    let original = lookup(first_id).await;
    assert_eq!(original["cost"]["nanos"], ECHO_PRICE);

    // Only the one call that ran was charged.
    assert_eq!(available(&app, key).await, before - ECHO_PRICE);
    let listed = app.get_json("/api/v1/requests?status=422", key).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn the_usage_log_lists_and_finds_requests_per_account() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let other = app.create_account("other").await;
    let key = &account.master_key;
    let ok = echo(&app, key, &[("x-request-id", "client-abc")]).await;
    let ok_id = request_id(&ok);
    ok.bytes().await.unwrap();
    let failed = echo(&app, key, &[("x-mock-status", "503")]).await;
    failed.bytes().await.unwrap();
    echo(&app, &other.master_key, &[])
        .await
        .bytes()
        .await
        .unwrap();

    let row = usage_of(&app, key, &ok_id).await;
    assert_eq!(row["client_request_id"], "client-abc");
    assert_eq!(row["account_id"], account.id.to_string());
    let mine = app.get_json("/api/v1/requests", key).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 2);
    let page = app.get_json("/api/v1/requests?limit=1", key).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert!(page["next_cursor"].is_string());
    let failed_only = app.get_json("/api/v1/requests?status=503", key).await;
    assert_eq!(failed_only["data"][0]["upstream_status"], 503);
    assert_eq!(failed_only["data"].as_array().unwrap().len(), 1);
    let all = app.get_json("/api/v1/requests", ADMIN_TOKEN).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 3);
    // Another account's request is not found, exactly like a missing one.
    let theirs = app
        .get_as(&format!("/api/v1/requests/{ok_id}"), &other.master_key)
        .await;
    expect_error(theirs, 404, "not_found").await;
    let response = app.get_as("/api/v1/requests?limit=0", key).await;
    expect_error(response, 400, "validation_error").await;
}

#[tokio::test]
async fn the_management_fee_is_charged_only_for_calls_that_succeed() {
    let app = spawn_app_with(|raw, _| raw.billing.management_fee = "0.01".into()).await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    app.create_usage_key(key, json!({})).await;
    assert_eq!(available(&app, key).await, before - 10_000_000);
    let response = app
        .post("/api/v1/keys")
        .bearer_auth(key)
        .json(&json!({"name": "bad", "scopes": ["no-such-group"]}))
        .send()
        .await
        .unwrap();
    expect_error(response, 400, "validation_error").await;
    let response = app
        .post("/api/v1/keys")
        .bearer_auth(key)
        .json(&json!({"name": "master", "kind": "master"}))
        .send()
        .await
        .unwrap();
    expect_error(response, 403, "forbidden").await;
    assert_eq!(
        available(&app, key).await,
        before - 10_000_000,
        "failed calls are free"
    );
    assert_eq!(
        app.get_json("/api/v1/ledger", key).await["data"][0]["kind"],
        "charge"
    );
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_request_that_outlives_its_hold_is_charged_nothing() {
    let app = spawn_app_with(|raw, _| {
        raw.billing.sweep_interval = "20ms".into();
        raw.billing.request_hold_ttl = "1m".into();
    })
    .await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    let call = app
        .get("/echo/slow")
        .bearer_auth(key)
        .header("x-mock-delay-ms", "400")
        .send();
    let advance = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        app.clock.advance(chrono::Duration::minutes(2));
    };
    let (response, ()) = tokio::join!(call, advance);
    let response = response.unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let row = usage_of(&app, key, &id).await;
    assert_eq!(row["billing_status"], "expired");
    assert_eq!(row["cost"]["nanos"], 0);
    assert_eq!(available(&app, key).await, before);
    assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn usage_totals_group_by_model_route_key_and_day_and_add_up_to_the_charges() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let (second, second_id) = app.create_usage_key(key, json!({})).await;
    let before = available(&app, key).await;
    for caller in [key.as_str(), second.as_str()] {
        let chat = app
            .post("/v1/chat/completions")
            .bearer_auth(caller)
            .json(&json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "hello there"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(chat.status(), 200);
        chat.bytes().await.unwrap();
    }
    assert_eq!(app.get_as("/echo/x", key).await.status(), 200);
    let failed = app
        .get("/echo/x")
        .bearer_auth(key)
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    let spent = before - available(&app, key).await;

    let by = |group: &str| {
        let app = &app;
        let path = format!("/api/v1/usage?group_by={group}");
        async move { app.get_json(&path, key).await }
    };
    let models = by("model").await;
    assert_eq!(models["group_by"], "model");
    let rows = models["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{models}");
    assert_eq!(
        (rows[0]["group"].as_str(), rows[0]["requests"].as_u64()),
        (Some(""), Some(2))
    );
    assert_eq!(rows[0]["errors"], 1);
    assert_eq!(rows[1]["group"], "mock-gpt");
    assert_eq!(rows[1]["requests"], 2);
    assert!(rows[1]["input_tokens"].as_u64().unwrap() > 0);
    let total: i64 = rows
        .iter()
        .map(|r| r["cost"]["nanos"].as_i64().unwrap())
        .sum();
    assert_eq!(total, spent, "the totals are what was charged");
    assert_eq!(models["billing_api"]["holds"], 0);
    assert_eq!(models["cost"]["nanos"], spent);

    // A job the operator bills through the billing API counts in the total beside the calls.
    let hold: Value = create_hold(&app, key, json!({"amount": "0.5"}))
        .await
        .json()
        .await
        .unwrap();
    let settled = app
        .post(&format!(
            "/api/v1/holds/{}/settle",
            hold["id"].as_str().unwrap()
        ))
        .bearer_auth(key)
        .json(&json!({"amount": "0.25"}))
        .send()
        .await
        .unwrap();
    assert_eq!(settled.status(), 200);
    let spent = before - available(&app, key).await;
    let models = by("model").await;
    assert_eq!(models["billing_api"]["holds"], 1);
    assert_eq!(models["billing_api"]["cost"]["credits"], "0.25");
    assert_eq!(
        models["cost"]["nanos"], spent,
        "the total is everything charged"
    );
    assert_eq!(
        models["data"].as_array().unwrap().len(),
        2,
        "calls stay per group"
    );

    let routes = by("route").await;
    let routes: Vec<(&str, u64)> = routes["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["group"].as_str().unwrap(),
                r["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(routes, [("/echo", 2), ("/v1", 2)]);
    let keys = by("key").await;
    let second_row = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"] == second_id.to_string())
        .unwrap()
        .clone();
    assert_eq!(second_row["requests"], 1);
    let days = by("day").await;
    assert_eq!(days["data"][0]["requests"], 4);
    assert_eq!(
        days["data"][0]["group"],
        app.clock.now().format("%Y-%m-%d").to_string()
    );
    // An empty window, and the ways to ask wrongly.
    let later = (app.clock.now() + chrono::Duration::days(1)).to_rfc3339();
    let empty = app
        .get_json(
            &format!("/api/v1/usage?from={}", later.replace('+', "%2B")),
            key,
        )
        .await;
    assert_eq!(empty["data"], json!([]));
    assert_eq!(empty["cost"]["nanos"], 0);
    expect_error(
        app.get_as("/api/v1/usage?group_by=hour", key).await,
        400,
        "validation_error",
    )
    .await;
    expect_error(
        app.get_as("/api/v1/usage", ADMIN_TOKEN).await,
        400,
        "validation_error",
    )
    .await;
    let admin = app
        .get_json(
            &format!("/api/v1/usage?account_id={}", account.id),
            ADMIN_TOKEN,
        )
        .await;
    assert_eq!(admin["data"][0]["requests"], 4);
}

#[tokio::test]
async fn with_the_usage_log_off_calls_are_charged_but_leave_no_usage_row() {
    let app = spawn_app_with(|raw, _| raw.billing.usage_log = false).await;
    let account = app.create_account("acme").await;
    let before = available(&app, &account.master_key).await;
    for _ in 0..3 {
        let response = echo(&app, &account.master_key, &[]).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    app.state.ledger.flush().await.unwrap();
    assert_eq!(
        available(&app, &account.master_key).await,
        before - 3 * ECHO_PRICE
    );
    let page = app.get_json("/api/v1/requests", &account.master_key).await;
    assert_eq!(page["data"], json!([]), "{page}");
    assert_books_balance(&app, account.id).await;
}
