//! Black-box tests of the data plane: a real Tollgate in front of a real mock upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{expect_error, mock_route, redact_request_id, spawn_app, spawn_app_with};
use expect_test::expect;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tollgate_core::{ApiKey, KeyEnv};
use tollgate_wire::ErrorProfile;

const CHAT: &str = "/v1/chat/completions";

fn chat_body(stream: bool) -> Value {
    json!({
        "model": "mock-gpt",
        "stream": stream,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hello there, gateway!"}],
    })
}

#[tokio::test]
async fn no_key_is_401_invalid_api_key_with_the_request_id_in_body_and_header() {
    let app = spawn_app().await;
    let response = app.get("/echo/hello").send().await.unwrap();
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body = expect_error(response, 401, "invalid_api_key").await;
    expect![[r#"{"error":{"code":"invalid_api_key","details":{},"message":"No API key was provided. Send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.","request_id":"req_…","type":"authentication_error"}}"#]]
        .assert_eq(&redact_request_id(body).to_string());
}

#[tokio::test]
async fn a_malformed_key_is_rejected_before_any_store_lookup() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let good = &account.master_key;
    let bad_checksum = format!(
        "{}{}",
        &good[..good.len() - 1],
        if good.ends_with('a') { 'b' } else { 'a' }
    );
    let lookups_before = app.store.lookups();
    for (key, reason) in [
        ("sk-not-ours", "does not start with tg_live_ or tg_test_"),
        ("tg_live_tooshort", "wrong length or characters"),
        (bad_checksum.as_str(), "checksum does not match"),
    ] {
        let response = app.get_as("/echo/x", key).await;
        let body = expect_error(response, 401, "invalid_api_key").await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{message}");
    }
    assert_eq!(
        app.store.lookups(),
        lookups_before,
        "a malformed key reached the store"
    );

    // A well-formed key that does not exist is looked up, and is just as invalid.
    let stranger = ApiKey::generate(KeyEnv::Live);
    let response = app.get_as("/echo/x", stranger.expose()).await;
    expect_error(response, 401, "invalid_api_key").await;
    assert_eq!(app.store.lookups(), lookups_before + 1);
}

#[tokio::test]
async fn keys_are_verified_from_memory_after_the_first_request() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    for _ in 0..5 {
        let response = app.get_as("/echo/x", &account.master_key).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        app.store.lookups(),
        1,
        "only the first request should read the store"
    );
}

#[tokio::test]
async fn the_demo_key_reaches_echo_and_the_request_id_goes_upstream_but_the_key_does_not() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let response = app
        .post("/echo/some/path?x=1&y=two")
        .header("x-api-key", &account.master_key)
        .header("x-custom", "kept")
        .header("x-request-id", "client-chosen-id")
        .body("hello upstream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        request_id.starts_with("req_"),
        "Tollgate always uses its own ID"
    );
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["path"], "/echo/some/path");
    assert_eq!(echoed["query"], "x=1&y=two");
    assert_eq!(echoed["body"], "hello upstream");
    assert_eq!(echoed["headers"]["x-custom"], "kept");
    assert_eq!(echoed["headers"]["x-request-id"], request_id.as_str());
    assert_eq!(echoed["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(
        echoed["headers"].get("x-api-key").is_none(),
        "the Tollgate key leaked upstream"
    );
    assert!(echoed["headers"].get("authorization").is_none());
}

#[tokio::test]
async fn chat_completions_pass_through_as_json() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let response = app
        .post(CHAT)
        .bearer_auth(&account.master_key)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["usage"]["prompt_tokens"], 6,
        "21 characters of input is 6 tokens"
    );
    assert_eq!(body["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn sse_chunks_leave_as_they_arrive() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let chunk_delay = Duration::from_millis(150);
    let response = app
        .post(CHAT)
        .bearer_auth(&account.master_key)
        .header("x-mock-chunks", "4")
        .header("x-mock-chunk-delay-ms", chunk_delay.as_millis().to_string())
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        let events = String::from_utf8_lossy(&chunk).matches("data: ").count();
        arrivals.extend(std::iter::repeat_n(Instant::now(), events));
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // role chunk + 4 content chunks + finish chunk + usage chunk + [DONE]
    assert_eq!(arrivals.len(), 8, "{text}");
    assert!(text.contains(r#""usage":{"completion_tokens":4"#), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    // The mock sleeps before each event. Had the proxy buffered the stream, every event would
    // arrive together; streamed, the first arrives about 7 delays before the last.
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= chunk_delay * 5,
        "events arrived together ({spread:?}): the stream was buffered"
    );
}

#[tokio::test]
async fn anthropic_streams_pass_through_with_a_request_id_header() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let response = app
        .post("/anthropic/v1/messages")
        .header("x-api-key", &account.master_key)
        .json(
            &json!({"model": "mock-claude", "max_tokens": 10, "stream": true,
                      "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["request-id"],
        response.headers()["x-request-id"]
    );
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert!(events.contains(&"message_delta"));
    assert_eq!(events.last(), Some(&"message_stop"));
}

/// A body without a length (a stream, or any chunked answer) is over for the client when the
/// upstream's is: the meter, which waits up to a second for the client to take the last frame
/// before it settles, must not hold back the end the client waits for. Before the fix, every such
/// answer ended a full second late; the bound is that second, less room for a loaded machine.
#[tokio::test]
async fn a_stream_ends_for_the_client_when_the_upstream_ends_it() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    for _ in 0..3 {
        let started = Instant::now();
        let response = app
            .post("/anthropic/v1/messages")
            .header("x-api-key", &account.master_key)
            .json(
                &json!({"model": "mock-claude", "max_tokens": 10, "stream": true,
                          "messages": [{"role": "user", "content": "Hi"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.content_length().is_none(), "not a chunked answer");
        let text = response.text().await.unwrap();
        assert!(text.contains("message_stop"), "{text}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(800),
            "the stream's end reached the client {took:?} after the request"
        );
    }
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let direct = reqwest::Client::new()
        .post(format!("{}{CHAT}", app.mock.url()))
        .header("x-mock-status", "503")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    let direct_body = direct.text().await.unwrap();

    let response = app
        .post(CHAT)
        .bearer_auth(&account.master_key)
        .header("x-mock-status", "503")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(
        response.headers().get("x-tollgate-error").is_none(),
        "not Tollgate's error"
    );
    assert!(response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    assert_eq!(response.text().await.unwrap(), direct_body);
}

#[tokio::test]
async fn an_upstream_that_is_down_is_502_upstream_error() {
    // A port that was free a moment ago and has nothing listening now.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = spawn_app_with(|raw, mock| {
        let mut route = mock_route(mock, "/down", "", "down", ErrorProfile::Native);
        route.upstream = format!("http://{closed}");
        raw.routes.push(route);
    })
    .await;
    let account = app.create_account("acme").await;
    let response = app.get_as("/down/x", &account.master_key).await;
    assert_eq!(response.headers()["x-should-retry"], "true");
    let body = expect_error(response, 502, "upstream_error").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not be reached"));
}

#[tokio::test]
async fn a_slow_upstream_is_504_upstream_timeout() {
    let app = spawn_app_with(|raw, mock| {
        let mut route = mock_route(mock, "/slow", "/echo", "slow", ErrorProfile::Native);
        route.timeout = "200ms".into();
        raw.routes.push(route);
    })
    .await;
    let account = app.create_account("acme").await;
    let response = app
        .get("/slow/x")
        .bearer_auth(&account.master_key)
        .header("x-mock-delay-ms", "3000")
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 504, "upstream_timeout").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("200 ms"));
}

#[tokio::test]
async fn an_unknown_path_is_404_not_found() {
    let app = spawn_app().await;
    let response = app.get("/nowhere/at/all").send().await.unwrap();
    let body = expect_error(response, 404, "not_found").await;
    assert_eq!(
        body["error"]["message"],
        "No route for GET /nowhere/at/all."
    );
    // A prefix matches whole segments only: /echoes is not under /echo.
    let response = app.get("/echoes").send().await.unwrap();
    expect_error(response, 404, "not_found").await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_whether_declared_or_streamed() {
    let app = spawn_app_with(|raw, _| raw.server.max_body_bytes = 1024).await;
    let account = app.create_account("acme").await;

    let declared = app
        .post("/echo/x")
        .bearer_auth(&account.master_key)
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    let body = expect_error(declared, 413, "payload_too_large").await;
    assert_eq!(body["error"]["details"]["limit_bytes"], 1024);

    // Chunked, with no Content-Length: caught while streaming to the upstream.
    let chunks =
        futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b'b'; 512])));
    let streamed = app
        .post("/echo/x")
        .bearer_auth(&account.master_key)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    expect_error(streamed, 413, "payload_too_large").await;

    let within = app
        .post("/echo/x")
        .bearer_auth(&account.master_key)
        .body(vec![b'c'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(within.status(), 200);
}

#[tokio::test]
async fn a_revoked_key_is_401_key_revoked_on_the_very_next_request() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (usage, id) = app.create_usage_key(&account.master_key, json!({})).await;
    // Warm the cache so the revocation has something to invalidate.
    let ok = app.get_as("/echo/x", &usage).await;
    assert_eq!(ok.status(), 200);

    let revoked = app
        .post(&format!("/api/v1/keys/{id}/revoke"))
        .bearer_auth(&account.master_key)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let response = app.get_as("/echo/x", &usage).await;
    let body = expect_error(response, 401, "key_revoked").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&id.to_string()));
}

#[tokio::test]
async fn an_expired_key_is_401_key_expired_the_moment_it_expires() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let expires_at = app_now(&app) + chrono::Duration::hours(1);
    let (usage, _) = app
        .create_usage_key(&account.master_key, json!({"expires_at": expires_at}))
        .await;
    assert_eq!(app.get_as("/echo/x", &usage).await.status(), 200);

    app.clock.advance(chrono::Duration::hours(1));
    let response = app.get_as("/echo/x", &usage).await;
    let body = expect_error(response, 401, "key_expired").await;
    assert_eq!(
        body["error"]["details"]["expired_at"],
        tollgate_core::clock::rfc3339(expires_at)
    );
}

fn app_now(app: &common::TestApp) -> chrono::DateTime<chrono::Utc> {
    use tollgate_core::Clock;
    app.clock.now()
}

#[tokio::test]
async fn an_inactive_key_is_401_key_inactive_until_reactivated() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (secret, id) = app.create_usage_key(&account.master_key, json!({})).await;
    // The key is cached by its first call; the change must still apply to the next one.
    assert_eq!(app.get_as("/echo/x", &secret).await.status(), 200);
    let master = &account.master_key;
    let patched = app
        .patch_key(master, id, json!({"status": "inactive"}))
        .await;
    assert_eq!(patched.status(), 200);
    expect_error(app.get_as("/echo/x", &secret).await, 401, "key_inactive").await;
    let patched = app.patch_key(master, id, json!({"status": "active"})).await;
    assert_eq!(patched.status(), 200);
    assert_eq!(app.get_as("/echo/x", &secret).await.status(), 200);
}

#[tokio::test]
async fn a_key_outside_its_scopes_is_403_insufficient_scope_naming_the_scope() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (echo_only, _) = app
        .create_usage_key(&account.master_key, json!({"scopes": ["echo"]}))
        .await;
    assert_eq!(app.get_as("/echo/x", &echo_only).await.status(), 200);
    let response = app
        .post(CHAT)
        .bearer_auth(&echo_only)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-tollgate-error"], "insufficient_scope");
    let body: Value = response.json().await.unwrap();
    // The /v1 route uses the openai profile.
    assert_eq!(body["error"]["code"], "insufficient_scope");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("'openai'"));
}

#[tokio::test]
async fn each_route_renders_errors_in_its_own_profile() {
    let app = spawn_app().await;
    let mut bodies = String::new();
    for (path, content_type) in [
        ("/echo/x", "application/json"),
        ("/v1/models", "application/json"),
        ("/anthropic/v1/messages", "application/json"),
        ("/problem/x", "application/problem+json"),
    ] {
        let response = app.get(path).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        assert_eq!(response.headers()["x-tollgate-error"], "invalid_api_key");
        if path.starts_with("/anthropic") {
            assert_eq!(
                response.headers()["request-id"],
                response.headers()["x-request-id"]
            );
        }
        let body: Value = response.json().await.unwrap();
        bodies.push_str(&format!("{path} {}\n", redact_request_id(body)));
    }
    expect![[r#"
        /echo/x {"error":{"code":"invalid_api_key","details":{},"message":"No API key was provided. Send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.","request_id":"req_…","type":"authentication_error"}}
        /v1/models {"error":{"code":"invalid_api_key","message":"No API key was provided. Send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.","param":null,"type":"authentication_error"}}
        /anthropic/v1/messages {"error":{"message":"No API key was provided. Send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.","type":"authentication_error"},"request_id":"req_…","type":"error"}
        /problem/x {"code":"invalid_api_key","detail":"No API key was provided. Send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.","request_id":"req_…","status":401,"title":"No API key was sent, or it is malformed or unknown.","type":"urn:tollgate:error:invalid_api_key"}
    "#]]
    .assert_eq(&bodies);
}

#[tokio::test]
async fn upstream_headers_from_config_reach_the_upstream() {
    let app = spawn_app_with(|raw, mock| {
        let mut route = mock_route(mock, "/keyed", "/echo", "keyed", ErrorProfile::Native);
        route.upstream_headers.insert(
            "authorization".into(),
            tollgate_server::config::Secret("Bearer sk-upstream".into()),
        );
        raw.routes.push(route);
    })
    .await;
    let account = app.create_account("acme").await;
    let response = app.get_as("/keyed/x", &account.master_key).await;
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["headers"]["authorization"], "Bearer sk-upstream");
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_kept_alive() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let mut peers = std::collections::HashSet::new();
    for _ in 0..5 {
        // Sequential requests: each finds the previous one's connection idle in the pool.
        let echoed = app.get_json("/echo/x", &account.master_key).await;
        peers.insert(echoed["peer"].as_str().unwrap().to_string());
    }
    assert_eq!(
        peers.len(),
        1,
        "each request opened a new upstream connection: {peers:?}"
    );
}

#[tokio::test]
async fn the_request_id_header_name_is_configurable() {
    let app =
        spawn_app_with(|raw, _| raw.server.request_id_header = "x-correlation-id".into()).await;
    let account = app.create_account("acme").await;
    let response = app.get_as("/echo/x", &account.master_key).await;
    let id = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(id.starts_with("req_"));
    assert!(response.headers().get("x-request-id").is_none());
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["headers"]["x-correlation-id"], id.as_str());

    let rejected = app.get("/echo/x").send().await.unwrap();
    let id = rejected.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = rejected.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], id.as_str());
}

#[tokio::test]
async fn a_public_route_needs_no_key_and_charges_or_logs_nothing() {
    let app = spawn_app_with(|raw, mock| {
        let mut public = mock_route(mock, "/public", "/echo", "public", ErrorProfile::Native);
        public.auth = tollgate_server::config::RouteAuth::None;
        public.price = "0".into();
        raw.routes.push(public);
    })
    .await;
    let account = app.create_account("acme").await;
    let response = app
        .post("/public/status")
        .header("x-api-key", &account.master_key)
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["path"], "/echo/status");
    assert_eq!(echoed["body"], "hi");
    assert!(
        echoed["headers"].get("x-api-key").is_none(),
        "credentials never reach the upstream, even on a public route"
    );
    let anonymous = app.get("/public/x").send().await.unwrap();
    assert_eq!(anonymous.status(), 200);
    app.state.ledger.flush().await.unwrap();
    let page = app.get_json("/api/v1/requests", &account.master_key).await;
    assert_eq!(page["data"], json!([]), "nothing is logged: {page}");
    // The key-protected routes beside it still need a key.
    let protected = app.get("/echo/x").send().await.unwrap();
    expect_error(protected, 401, "invalid_api_key").await;
}

/// `GET /v1/models` lists the route's priced models that the key may use, in the API's own
/// shape, without calling the upstream; one model is retrieved the same way.
#[tokio::test]
async fn an_llm_route_lists_the_models_the_key_can_use_from_its_price_table() {
    let app = spawn_app_with(|raw, _| {
        let large = raw.routes[0].models["mock-gpt"].clone();
        raw.routes[0].models.insert("mock-gpt-large".into(), large);
    })
    .await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let ids = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = app.get_json("/v1/models", master).await;
    assert_eq!(all["object"], "list");
    assert_eq!(ids(&all), ["mock-gpt", "mock-gpt-large"]);
    assert_eq!(all["data"][0]["object"], "model");

    let (narrow, _) = app
        .create_usage_key(master, json!({"scopes": ["openai:mock-gpt-large"]}))
        .await;
    assert_eq!(
        ids(&app.get_json("/v1/models", &narrow).await),
        ["mock-gpt-large"]
    );
    let one = app.get_json("/v1/models/mock-gpt-large", &narrow).await;
    assert_eq!(one["id"], "mock-gpt-large");
    let hidden = app.get_as("/v1/models/mock-gpt", &narrow).await;
    let body = expect_error(hidden, 404, "model_not_found").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Available: mock-gpt-large."));

    let anthropic = app.get_json("/anthropic/v1/models", master).await;
    assert_eq!(ids(&anthropic), ["mock-claude"]);
    assert_eq!(anthropic["data"][0]["type"], "model");
    assert_eq!(anthropic["has_more"], false);
    // Listing is free, and needs a key like any call.
    assert_eq!(
        common::available(&app, master).await,
        5_000_000_000,
        "nothing charged"
    );
    expect_error(
        app.get("/v1/models").send().await.unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
}

/// The demo's mock reads what the gateway forwards: a 5 MiB chat body is answered, not refused by
/// the mock.
#[tokio::test]
async fn a_large_body_the_gateway_accepts_reaches_the_mock_and_is_answered() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let content = "a".repeat(5 * 1024 * 1024);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "mock-gpt", "max_tokens": 5, "messages": [{"role": "user", "content": content}]}),
        ),
        ("/echo/big", json!({"content": content})),
    ] {
        let response = app
            .post(path)
            .bearer_auth(&account.master_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}
