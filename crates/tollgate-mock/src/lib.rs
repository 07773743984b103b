//! A mock upstream for demos, tests and benchmarks, all in one axum router:
//!
//! - `POST /v1/chat/completions` and `POST /v1/completions`: OpenAI-compatible; JSON, or SSE
//!   when `"stream": true` (with a final usage chunk when `stream_options.include_usage` is set).
//! - `POST /v1/responses`: OpenAI's Responses API; JSON, or its SSE events ending in
//!   `response.completed` with the usage (`x-mock-final-event: incomplete|failed` ends it in
//!   `response.incomplete` or `response.failed` instead).
//! - `POST /v1/embeddings`: input tokens only. `POST /v1/images/generations`: an endpoint
//!   without usage.
//! - `POST /v1/messages`: Anthropic-compatible; JSON, or its SSE event stream with usage in
//!   `message_start` and `message_delta`. `POST /v1/messages/count_tokens`.
//! - `GET /v1/models`: the mock's models, in OpenAI's shape or (with `anthropic-version`)
//!   Anthropic's. Every endpoint reads bodies up to 16 MiB, more than the gateway forwards.
//! - `/echo/...` (any method): answers with the request it received, as JSON (with the peer
//!   address of the connection, when served by [`MockUpstream`]).
//!
//! Token counts are derived from the input (about four characters a token, at least one), so a
//! test can predict them. Like a real provider, the output stops at the request's cap
//! (`max_tokens`, `max_completion_tokens`, `max_output_tokens`), unless
//! `x-mock-ignore-max-tokens` is set. Responses are compressed as `Accept-Encoding` allows, or
//! always in the encoding `x-mock-compress` names (`gzip`, `br`, `deflate`, `zstd`): an upstream
//! that compresses whatever it is asked. Faults are injected by request header:
//! `x-mock-status: <code>` answers that status, `x-mock-delay-ms` waits before answering, and for
//! streams `x-mock-chunks: <n>` and `x-mock-chunk-delay-ms: <ms>` shape the stream and
//! `x-mock-abort-after: <n>` breaks the connection after `n` events; `x-mock-no-usage` leaves
//! every usage report out (an upstream that reports none). The echo API answers
//! `x-mock-units: <n>` with the response header `x-units: <n>` (for per-unit pricing).
//!
//! Beside the upstream: a fake Stripe (`stripe.rs`) and a webhook receiver (`receiver.rs`).

pub mod receiver;
pub mod sinks;
pub mod stripe;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// How many chunks a stream has when `x-mock-chunks` is absent.
const DEFAULT_CHUNKS: usize = 5;
/// The largest body any endpoint reads: more than the gateway forwards (10 MiB by default), so
/// what the gateway accepts, the mock does.
const BODY_LIMIT: usize = 16 * 1024 * 1024;
/// The models `GET /v1/models` lists (the mock answers any model name it is sent).
const MODELS: [&str; 3] = ["mock-gpt", "mock-gpt-large", "mock-claude"];

pub fn router() -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/images/generations", post(images))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens_endpoint))
        .route("/v1/models", get(models))
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo))
        // As the real APIs do, an unknown path or method gets a JSON error, not an empty body.
        .fallback(|| async { unknown(StatusCode::NOT_FOUND) })
        .method_not_allowed_fallback(|| async { unknown(StatusCode::METHOD_NOT_ALLOWED) })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(
            tower_http::compression::CompressionLayer::new()
                .compress_when(tower_http::compression::predicate::SizeAbove::new(0)),
        )
        .layer(axum::middleware::map_request(forced_encoding))
}

/// `x-mock-compress: <encoding>` stands for the client's `Accept-Encoding`, so the answer is
/// compressed whatever the client (or a gateway) asked.
async fn forced_encoding(mut request: Request) -> Request {
    if let Some(forced) = request.headers().get("x-mock-compress").cloned() {
        request
            .headers_mut()
            .insert(axum::http::header::ACCEPT_ENCODING, forced);
    }
    request
}

/// A running mock server; it stops when dropped.
pub struct MockUpstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Serves the mock on `addr` (port 0 picks a free port).
    pub async fn start(addr: SocketAddr) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let service = router().into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, service).await {
                tracing::error!(error = %e, "mock upstream stopped");
            }
        });
        Ok(MockUpstream { addr, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fault-injection headers of one request.
struct Faults {
    status: Option<StatusCode>,
    delay: Duration,
    chunks: usize,
    chunk_delay: Duration,
    abort_after: Option<usize>,
    no_usage: bool,
}

impl Faults {
    fn from(headers: &HeaderMap) -> Faults {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Faults {
            status: number("x-mock-status")
                .and_then(|s| u16::try_from(s).ok())
                .and_then(|s| StatusCode::from_u16(s).ok()),
            delay: Duration::from_millis(number("x-mock-delay-ms").unwrap_or(0)),
            chunks: number("x-mock-chunks").map_or(DEFAULT_CHUNKS, |n| n.clamp(1, 10_000) as usize),
            chunk_delay: Duration::from_millis(number("x-mock-chunk-delay-ms").unwrap_or(0)),
            abort_after: number("x-mock-abort-after").map(|n| n as usize),
            no_usage: headers.contains_key("x-mock-no-usage"),
        }
    }

    /// Waits `x-mock-delay-ms`, then answers `x-mock-status` if it is not a success.
    async fn apply(&self, api_error_body: impl FnOnce(StatusCode) -> Value) -> Option<Response> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        match self.status {
            Some(status) if !status.is_success() => {
                Some((status, Json(api_error_body(status))).into_response())
            }
            _ => None,
        }
    }
}

/// About four characters a token, at least one: predictable for tests, close enough for demos.
pub fn count_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": message, "type": "invalid_request_error"}})),
    )
        .into_response()
}

/// All text in a request: an OpenAI `messages` array or an Anthropic `messages`/`system` body,
/// completions' `prompt`, or the Responses API's and embeddings' `input` (text, a list of texts,
/// or a list of messages).
fn input_text(body: &Value) -> String {
    fn collect(text: &mut String, content: &Value) {
        match content {
            Value::String(s) => text.push_str(s),
            Value::Array(parts) => {
                for part in parts {
                    match part {
                        Value::String(s) => text.push_str(s),
                        part => {
                            if let Some(s) = part.get("text").and_then(Value::as_str) {
                                text.push_str(s);
                            }
                            if let Some(content) = part.get("content") {
                                collect(text, content);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut text = String::new();
    for field in ["system", "prompt", "input"] {
        if let Some(value) = body.get(field) {
            collect(&mut text, value);
        }
    }
    for message in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(content) = message.get("content") {
            collect(&mut text, content);
        }
    }
    text
}

/// The completion: `chunks` words, so its token count is predictable.
fn completion_words(chunks: usize) -> Vec<String> {
    (0..chunks).map(|i| format!("tok{i} ")).collect()
}

fn sse(
    events: Vec<(Option<&'static str>, String)>,
    chunk_delay: Duration,
    abort_after: Option<usize>,
) -> Response {
    let abort_at = abort_after.unwrap_or(usize::MAX);
    let stream = futures_util::stream::iter(events.into_iter().enumerate()).then(
        move |(i, (event, data))| async move {
            if !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            if i >= abort_at {
                // An error item makes the server drop the connection mid-body.
                return Err(std::io::Error::other("mock upstream aborted the stream"));
            }
            let frame = match event {
                Some(name) => format!("event: {name}\ndata: {data}\n\n"),
                None => format!("data: {data}\n\n"),
            };
            Ok(Bytes::from(frame))
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// What both LLM APIs need from a request, after fault injection has had its say.
struct Completion {
    model: String,
    input_tokens: u64,
    /// One word per chunk: the output, whose token count is its length.
    words: Vec<String>,
    stream: bool,
    abort_after: Option<usize>,
    /// OpenAI's `stream_options.include_usage`: send a final usage chunk.
    include_usage: bool,
    /// Report no usage anywhere (`x-mock-no-usage`).
    no_usage: bool,
    chunk_delay: Duration,
}

impl Completion {
    /// Applies the fault headers (answering with `error_body` for an injected status), then reads
    /// the JSON body.
    async fn read(
        headers: &HeaderMap,
        body: &Bytes,
        default_model: &str,
        error_body: impl FnOnce(StatusCode) -> Value,
    ) -> Result<Completion, Response> {
        let faults = Faults::from(headers);
        if let Some(response) = faults.apply(error_body).await {
            return Err(response);
        }
        let request: Value =
            serde_json::from_slice(body).map_err(|_| bad_request("body is not JSON"))?;
        let cap = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .filter_map(|field| request.get(*field).and_then(Value::as_u64))
            .min()
            .filter(|_| !headers.contains_key("x-mock-ignore-max-tokens"))
            .map_or(usize::MAX, |cap| usize::try_from(cap).unwrap_or(usize::MAX));
        Ok(Completion {
            model: request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or(default_model)
                .to_string(),
            input_tokens: count_tokens(&input_text(&request)),
            words: completion_words(faults.chunks.min(cap)),
            stream: request.get("stream").and_then(Value::as_bool) == Some(true),
            abort_after: faults.abort_after,
            include_usage: request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true),
            no_usage: faults.no_usage,
            chunk_delay: faults.chunk_delay,
        })
    }

    fn output_tokens(&self) -> u64 {
        self.words.len() as u64
    }
}

/// `usage`, or `null` for an upstream that reports none (`x-mock-no-usage`).
fn reported(completion: &Completion, usage: Value) -> Value {
    if completion.no_usage {
        Value::Null
    } else {
        usage
    }
}

async fn chat_completions(headers: HeaderMap, body: Bytes) -> Response {
    let completion = match Completion::read(&headers, &body, "mock-gpt", |s| {
        json!({"error": {"message": format!("mock upstream answered {s}"), "type": "server_error", "param": null, "code": null}})
    })
    .await
    {
        Ok(completion) => completion,
        Err(response) => return response,
    };
    let Completion {
        model,
        input_tokens: prompt_tokens,
        words,
        ..
    } = &completion;
    let completion_tokens = completion.output_tokens();
    let usage = reported(
        &completion,
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }),
    );
    let id = "chatcmpl-mock";
    let created = 1_700_000_000;
    if !completion.stream {
        return Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": words.concat()},
                "finish_reason": "stop",
            }],
            "usage": usage,
        }))
        .into_response();
    }

    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
        .to_string()
    };
    let mut events = vec![(
        None,
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
    )];
    for word in words {
        events.push((None, chunk(json!({"content": word}), Value::Null)));
    }
    events.push((None, chunk(json!({}), json!("stop"))));
    if completion.include_usage && !completion.no_usage {
        events.push((
            None,
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": usage})
            .to_string(),
        ));
    }
    events.push((None, "[DONE]".to_string()));
    sse(events, completion.chunk_delay, completion.abort_after)
}

async fn messages(headers: HeaderMap, body: Bytes) -> Response {
    let completion = match Completion::read(&headers, &body, "mock-claude", |s| {
        json!({"type": "error", "error": {"type": "api_error", "message": format!("mock upstream answered {s}")}})
    })
    .await
    {
        Ok(completion) => completion,
        Err(response) => return response,
    };
    let Completion {
        model,
        input_tokens,
        words,
        ..
    } = &completion;
    let output_tokens = completion.output_tokens();
    let id = "msg_mock";
    if !completion.stream {
        return Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": words.concat()}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": reported(&completion, json!({"input_tokens": input_tokens, "output_tokens": output_tokens})),
        }))
        .into_response();
    }
    let mut events = vec![
        (
            Some("message_start"),
            json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": reported(&completion, json!({"input_tokens": input_tokens, "output_tokens": 1}))}})
            .to_string(),
        ),
        (
            Some("content_block_start"),
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}})
            .to_string(),
        ),
        (Some("ping"), json!({"type": "ping"}).to_string()),
    ];
    for word in words {
        events.push((
            Some("content_block_delta"),
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": word}})
            .to_string(),
        ));
    }
    events.push((
        Some("content_block_stop"),
        json!({"type": "content_block_stop", "index": 0}).to_string(),
    ));
    events.push((
        Some("message_delta"),
        json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": reported(&completion, json!({"output_tokens": output_tokens}))})
        .to_string(),
    ));
    events.push((
        Some("message_stop"),
        json!({"type": "message_stop"}).to_string(),
    ));
    sse(events, completion.chunk_delay, completion.abort_after)
}

async fn completions(headers: HeaderMap, body: Bytes) -> Response {
    let completion = match Completion::read(&headers, &body, "mock-gpt", openai_error).await {
        Ok(completion) => completion,
        Err(response) => return response,
    };
    let usage = reported(
        &completion,
        json!({
            "prompt_tokens": completion.input_tokens,
            "completion_tokens": completion.output_tokens(),
            "total_tokens": completion.input_tokens + completion.output_tokens(),
        }),
    );
    let (id, created, model) = ("cmpl-mock", 1_700_000_000, &completion.model);
    if !completion.stream {
        return Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": completion.words.concat(), "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let mut events: Vec<(Option<&'static str>, String)> = completion
        .words
        .iter()
        .map(|word| {
            let chunk = json!({"id": id, "object": "text_completion", "created": created,
                "model": model, "choices": [{"index": 0, "text": word, "finish_reason": null}]});
            (None, chunk.to_string())
        })
        .collect();
    if completion.include_usage && !completion.no_usage {
        let chunk = json!({"id": id, "object": "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage});
        events.push((None, chunk.to_string()));
    }
    events.push((None, "[DONE]".to_string()));
    sse(events, completion.chunk_delay, completion.abort_after)
}

/// The model list, in Anthropic's shape when the request carries `anthropic-version` (as the
/// Anthropic SDK's does), OpenAI's otherwise.
async fn models(headers: HeaderMap) -> Json<Value> {
    if headers.contains_key("anthropic-version") {
        let data: Vec<Value> = MODELS
            .iter()
            .map(|id| json!({"type": "model", "id": id, "display_name": id, "created_at": "2026-01-01T00:00:00Z"}))
            .collect();
        return Json(json!({
            "data": data,
            "has_more": false,
            "first_id": MODELS.first(),
            "last_id": MODELS.last(),
        }));
    }
    let data: Vec<Value> = MODELS
        .iter()
        .map(
            |id| json!({"id": id, "object": "model", "created": 1_767_225_600, "owned_by": "mock"}),
        )
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn unknown(status: StatusCode) -> Response {
    let body = json!({"error": {"message": format!("mock upstream: {status}"), "type": "invalid_request_error", "param": null, "code": null}});
    (status, Json(body)).into_response()
}

fn openai_error(status: StatusCode) -> Value {
    json!({"error": {"message": format!("mock upstream answered {status}"), "type": "server_error", "param": null, "code": null}})
}

/// The Responses API: JSON, or `response.created`, text deltas and a final event carrying the
/// whole response with its usage.
async fn responses(headers: HeaderMap, body: Bytes) -> Response {
    let completion = match Completion::read(&headers, &body, "mock-gpt", openai_error).await {
        Ok(completion) => completion,
        Err(response) => return response,
    };
    let final_event = headers
        .get("x-mock-final-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("completed");
    let status = match final_event {
        "incomplete" | "failed" => final_event,
        _ => "completed",
    };
    let text = completion.words.concat();
    let response = |status: &str, text: &str, usage: Value| {
        json!({
            "id": "resp_mock", "object": "response", "created_at": 1_700_000_000,
            "model": completion.model, "status": status,
            "output": [{"type": "message", "id": "msg_mock", "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
            "usage": usage,
        })
    };
    let usage = reported(
        &completion,
        json!({
            "input_tokens": completion.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion.output_tokens(),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": completion.input_tokens + completion.output_tokens(),
        }),
    );
    if !completion.stream {
        return Json(response(status, &text, usage)).into_response();
    }
    let mut events = vec![(
        Some("response.created"),
        json!({"type": "response.created", "sequence_number": 0,
            "response": response("in_progress", "", Value::Null)})
        .to_string(),
    )];
    for (i, word) in completion.words.iter().enumerate() {
        events.push((
            Some("response.output_text.delta"),
            json!({"type": "response.output_text.delta", "sequence_number": i + 1,
                "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": word})
            .to_string(),
        ));
    }
    let name = match status {
        "incomplete" => "response.incomplete",
        "failed" => "response.failed",
        _ => "response.completed",
    };
    events.push((
        Some(name),
        json!({"type": name, "sequence_number": completion.words.len() + 1,
            "response": response(status, &text, usage)})
        .to_string(),
    ));
    sse(events, completion.chunk_delay, completion.abort_after)
}

async fn embeddings(headers: HeaderMap, body: Bytes) -> Response {
    let completion = match Completion::read(&headers, &body, "mock-embed", openai_error).await {
        Ok(completion) => completion,
        Err(response) => return response,
    };
    Json(json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}],
        "model": completion.model,
        "usage": reported(&completion, json!({"prompt_tokens": completion.input_tokens,
            "total_tokens": completion.input_tokens})),
    }))
    .into_response()
}

/// An endpoint whose answer reports no usage at all.
async fn images() -> Response {
    Json(json!({"created": 1_700_000_000, "data": [{"url": "https://example.invalid/mock.png"}]}))
        .into_response()
}

async fn count_tokens_endpoint(headers: HeaderMap, body: Bytes) -> Response {
    match Completion::read(&headers, &body, "mock-claude", |s| {
        json!({"type": "error", "error": {"type": "api_error", "message": format!("mock upstream answered {s}")}})
    })
    .await
    {
        Ok(completion) => Json(json!({"input_tokens": completion.input_tokens})).into_response(),
        Err(response) => response,
    }
}

async fn echo(request: Request) -> Response {
    let faults = Faults::from(request.headers());
    if let Some(response) = faults
        .apply(|s| json!({"error": format!("mock upstream answered {s}")}))
        .await
    {
        return response;
    }
    // The connection's peer, so a test can see whether a client reused its connection.
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|info| info.0.to_string());
    let (parts, body) = request.into_parts();
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                Value::from(value.to_str().unwrap_or("<binary>")),
            )
        })
        .collect();
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(bytes) => bytes,
        Err(_) => return bad_request("body unreadable or over 16 MiB"),
    };
    let status = faults.status.unwrap_or(StatusCode::OK);
    let units = parts.headers.get("x-mock-units").cloned();
    let mut response = (
        status,
        Json(json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
            "body_bytes": body.len(),
            "peer": peer,
        })),
    )
        .into_response();
    if let Some(units) = units {
        response.headers_mut().insert("x-units", units);
    }
    response
}
