//! The hostile edge: what a client (or a bad network) can send that an HTTP library would tidy
//! up, sent raw over a socket: paths that climb out of their route, methods a route never
//! serves, and the answers Tollgate gives them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{available, spawn_app, TestApp};
use serde_json::Value;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An answer read off the socket: status, headers (lower-case names), body.
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends `head` (request line and headers, without the blank line) as it is, with
/// `Connection: close`, and reads the whole answer.
async fn raw(addr: SocketAddr, head: &str) -> RawAnswer {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    socket.read_to_end(&mut answer).await.unwrap();
    parse_answer(&answer)
}

fn parse_answer(answer: &[u8]) -> RawAnswer {
    let text = String::from_utf8_lossy(answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    // Chunked bodies carry size lines; the JSON object is what lies between the outer braces.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(start), Some(end)) if end >= start => body[start..=end].to_string(),
        _ => body.to_string(),
    };
    RawAnswer {
        status,
        headers,
        body,
    }
}

async fn raw_with_key(app: &TestApp, line: &str, key: &str) -> RawAnswer {
    raw(app.addr, &format!("{line}\r\nAuthorization: Bearer {key}")).await
}

#[tokio::test]
async fn a_path_that_climbs_out_of_its_route_is_refused_before_any_work() {
    let app = spawn_app().await;
    let account = app.create_account("climber").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    for path in [
        "/echo/../internal/users",
        "/echo/./x",
        "/echo/..",
        "/echo/%2e%2e/internal",
        "/echo/%2E%2e/internal",
        "/echo/.%2e/internal",
        "/echo/a%2f..%2finternal",
        "/echo/a%2Fb",
        "/echo/a%5c..%5cinternal",
        "/echo/a%00b",
    ] {
        let answer = raw_with_key(&app, &format!("GET {path} HTTP/1.1"), key).await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.body);
        let body = answer.json();
        assert_eq!(body["error"]["code"], "bad_request", "{path}: {body}");
        assert!(body["error"]["request_id"].is_string(), "{body}");
    }
    // Dots inside a segment, and an encoded percent, are ordinary paths.
    for path in ["/echo/v1.2/x", "/echo/..a/b", "/echo/a%252e%252e"] {
        let answer = raw_with_key(&app, &format!("GET {path} HTTP/1.1"), key).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    }
    // Only the three ordinary calls were charged (0.001 each).
    assert_eq!(available(&app, key).await, before - 3_000_000);
}

#[tokio::test]
async fn a_method_a_route_does_not_serve_is_405_with_allow_and_charged_nothing() {
    let app = common::spawn_app_with(|raw, mock| {
        let mut get_only = common::mock_route(
            mock,
            "/readonly",
            "/echo",
            "echo",
            tollgate_wire::ErrorProfile::Native,
        );
        get_only.methods = vec!["GET".into()];
        raw.routes.push(get_only);
    })
    .await;
    let account = app.create_account("methods").await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    for (line, allow) in [
        (
            "TRACE /echo/t HTTP/1.1",
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
        ),
        ("POST /readonly/t HTTP/1.1\r\nContent-Length: 0", "GET"),
        ("DELETE /readonly/t HTTP/1.1", "GET"),
    ] {
        let answer = raw_with_key(&app, line, key).await;
        assert_eq!(answer.status, 405, "{line}: {}", answer.body);
        assert_eq!(answer.header("allow"), Some(allow), "{line}");
        let body = answer.json();
        assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
        assert_eq!(
            body["error"]["details"]["allowed"]
                .as_array()
                .unwrap()
                .len(),
            allow.split(", ").count()
        );
    }
    assert_eq!(
        raw_with_key(&app, "GET /readonly/t HTTP/1.1", key)
            .await
            .status,
        200
    );
    assert_eq!(available(&app, key).await, before - 1_000_000);
}

#[tokio::test]
async fn the_management_api_answers_405_with_allow_whatever_idempotency_key_is_sent() {
    let app = spawn_app().await;
    let account = app.create_account("api-methods").await;
    let key = &account.master_key;
    let answer = raw_with_key(&app, "DELETE /api/v1/keys HTTP/1.1", key).await;
    assert_eq!(answer.status, 405, "{}", answer.body);
    let allow = answer.header("allow").unwrap().to_string();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let body = answer.json();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");

    // An Idempotency-Key already used for a key creation, sent with a method the path does not
    // serve: the 405, not an idempotency verdict on a request that cannot run.
    let created = app
        .post("/api/v1/keys")
        .bearer_auth(key)
        .header("idempotency-key", "reused-key-1")
        .json(&serde_json::json!({"name": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let wrong = app
        .post(&format!("/api/v1/keys/{id}"))
        .bearer_auth(key)
        .header("idempotency-key", "reused-key-1")
        .json(&serde_json::json!({"name": "second"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    let allow = wrong.headers()["allow"].to_str().unwrap().to_string();
    assert!(allow.contains("PATCH"), "{allow}");
}

/// One address over its anonymous limit (say, a load balancer's, without `trusted_proxies`) is
/// not locked out of what it cannot be blamed for: health, readiness and metrics are never
/// limited, the admin token is not, and a valid key is judged by its own policies. Anonymous
/// calls, malformed keys and well-formed keys that are not valid still get the address's 429.
#[tokio::test]
async fn an_address_over_its_anonymous_limit_keeps_health_admin_and_valid_keys() {
    let app = common::spawn_app_with(|raw, _| {
        raw.rate_limits = Some(vec![tollgate_server::config::RawPolicy {
            name: "anonymous-per-ip".into(),
            scope: tollgate_core::ratelimit::Scope::Ip,
            unit: tollgate_core::ratelimit::Unit::Requests,
            limit: 5,
            window: "1h".into(),
            burst: 0,
            on_limiter_failure: Default::default(),
        }]);
    })
    .await;
    let account = app.create_account("behind-a-balancer").await;
    let key = &account.master_key;
    // Anonymous calls until the address is over its limit.
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(app.get("/echo/x").send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert!(statuses.contains(&401), "{statuses:?}");

    for path in ["/healthz", "/readyz"] {
        assert_eq!(app.get(path).send().await.unwrap().status(), 200, "{path}");
    }
    let metrics = app.get_as("/metrics", common::ADMIN_TOKEN).await;
    assert_eq!(metrics.status(), 200);
    let accounts = app.get_as("/api/v1/accounts", common::ADMIN_TOKEN).await;
    assert_eq!(accounts.status(), 200);
    let before = available(&app, key).await;
    let paid = app.get_as("/echo/x", key).await;
    assert_eq!(paid.status(), 200);
    assert_eq!(available(&app, key).await, before - 1_000_000);

    // What the address cannot prove is still refused, with the address's policy named.
    let unknown = tollgate_core::ApiKey::generate(tollgate_core::KeyEnv::Live)
        .expose()
        .to_string();
    for credential in [None, Some("tg_live_malformed"), Some(unknown.as_str())] {
        let mut request = app.get("/echo/x");
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status(), 429, "{credential:?}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(
            body["error"]["details"]["policy"], "anonymous-per-ip",
            "{body}"
        );
    }
}

/// Connects, sends `bytes` and nothing more; how long the server keeps the connection open
/// (`None`: still open after `limit`).
async fn closed_after(
    addr: SocketAddr,
    bytes: &[u8],
    limit: std::time::Duration,
) -> Option<std::time::Duration> {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(bytes).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(limit, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    ended.ok().map(|()| started.elapsed())
}

fn with_server(
    customize: impl FnOnce(&mut tollgate_server::config::RawServer) + Send + 'static,
) -> impl FnOnce(&mut tollgate_server::config::RawConfig, &tollgate_mock::MockUpstream) {
    move |raw, _| customize(&mut raw.server)
}

#[tokio::test]
async fn slow_silent_and_idle_clients_are_disconnected_after_the_header_read_timeout() {
    let app = common::spawn_app_with(with_server(|server| {
        server.header_read_timeout = "1s".into();
    }))
    .await;
    let bound = std::time::Duration::from_secs(3);
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("half a request line", b"GET /healthz HT"),
        (
            "a head never ended",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n",
        ),
        ("part of the HTTP/2 preface", b"PRI * HTTP/2.0\r\n"),
    ] {
        let closed = closed_after(app.addr, bytes, std::time::Duration::from_secs(10)).await;
        assert!(closed.is_some_and(|t| t < bound), "{what}: {closed:?}");
    }
    // A keep-alive connection left idle after its answer is closed by the same clock.
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains('}') {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let idle_since = std::time::Instant::now();
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert!(idle_since.elapsed() < bound, "{:?}", idle_since.elapsed());
}

#[tokio::test]
async fn beyond_max_connections_nothing_is_accepted_until_one_closes() {
    let app = common::spawn_app_with(with_server(|server| {
        server.max_connections = 3;
        server.header_read_timeout = "30s".into();
    }))
    .await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // The fourth waits in the backlog: its request is not answered...
    let mut fourth = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let waiting =
        tokio::time::timeout(std::time::Duration::from_millis(500), fourth.read(&mut buf)).await;
    assert!(waiting.is_err(), "answered beyond the limit: {waiting:?}");
    // ... until one of the three closes.
    drop(idle.pop());
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        fourth.read_to_end(&mut answer),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn http2_connections_announce_their_stream_limit() {
    let app = common::spawn_app_with(with_server(|server| {
        server.http2_max_concurrent_streams = 7;
    }))
    .await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // The preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    socket.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 4, "the server's first frame is its SETTINGS");
    let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; length];
    socket.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS is 0x3.
    assert!(settings.contains(&(3, 7)), "{settings:?}");
}

/// Sends `bytes` as they are and reads the whole answer.
async fn raw_bytes(addr: SocketAddr, bytes: &[u8]) -> RawAnswer {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        socket.read_to_end(&mut answer),
    )
    .await
    .unwrap()
    .unwrap();
    parse_answer(&answer)
}

fn assert_enveloped(answer: &RawAnswer, status: u16, code: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.body);
    assert_eq!(answer.header("x-tollgate-error"), Some(code), "{what}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    let id = answer.header("x-request-id").unwrap_or_default();
    assert!(id.starts_with("req_"), "{what}: request ID {id:?}");
    let body = answer.json();
    assert_eq!(body["error"]["code"], code, "{what}: {}", answer.body);
    assert_eq!(body["error"]["request_id"], id, "{what}: {}", answer.body);
}

#[tokio::test]
async fn requests_the_http_layer_cannot_read_get_the_envelope_and_a_request_id() {
    let app = common::spawn_app_with(with_server(|server| {
        server.max_header_bytes = 8 * 1024;
    }))
    .await;
    let big = "a".repeat(10 * 1024);
    let many: String = (0..101).map(|i| format!("X-Many-{i}: 1\r\n")).collect();
    for (what, request, status, code) in [
        (
            "a method with a character no method has",
            "G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            "a header name with a space",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            "a version that is not HTTP/1.x",
            "GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            "a cookie over the limit",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: {big}\r\n\r\n"),
            431,
            "headers_too_large",
        ),
        (
            "more than 100 headers",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
            431,
            "headers_too_large",
        ),
    ] {
        let answer = raw_bytes(app.addr, request.as_bytes()).await;
        assert_enveloped(&answer, status, code, what);
        assert_eq!(answer.header("connection"), Some("close"), "{what}");
        if status == 431 {
            assert_eq!(answer.json()["error"]["details"]["limit_bytes"], 8192);
        }
    }
    // A head within the limit is served, on a connection that stays usable.
    let within = "a".repeat(6 * 1024);
    let answer = raw(
        app.addr,
        &format!("GET /healthz HTTP/1.1\r\nCookie: {within}"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[tokio::test]
async fn an_oversized_http2_header_gets_the_envelope_on_its_stream_not_a_reset() {
    let app = common::spawn_app_with(with_server(|server| {
        server.max_header_bytes = 8 * 1024;
    }))
    .await;
    let socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(socket),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = |cookie: String| {
        hyper::Request::get(format!("http://{}/healthz", app.addr))
            .header("cookie", cookie)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let refused = sender
        .send_request(request("a".repeat(12 * 1024)))
        .await
        .unwrap();
    assert_eq!(refused.status(), 431);
    let id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(refused.headers()["x-tollgate-error"], "headers_too_large");
    let body = http_body_util::BodyExt::collect(refused.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "headers_too_large");
    assert_eq!(body["error"]["request_id"], id.as_str());
    assert_eq!(body["error"]["details"]["limit_bytes"], 8192);
    // The connection lives on: the next request on it is served.
    let served = sender
        .send_request(request("a".repeat(1024)))
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
}

/// Messages follow `Accept-Language` where a translation exists, in every profile; codes never
/// change, and `Content-Language` says which language was used.
#[tokio::test]
async fn an_error_message_is_in_the_callers_language_and_says_which() {
    use tollgate_core::ErrorCode;
    use tollgate_wire::Language;
    let app = spawn_app().await;
    let cases = [
        ("de-DE,de;q=0.9,en;q=0.5", "/echo/x", Language::German),
        (
            "zh-CN,zh;q=0.9",
            "/v1/chat/completions",
            Language::SimplifiedChinese,
        ),
        (
            "fr-FR, de;q=0.3",
            "/anthropic/v1/messages",
            Language::German,
        ),
        ("fr-FR", "/echo/x", Language::English),
        ("zh-TW", "/echo/x", Language::English),
    ];
    for (accept, path, language) in cases {
        let response = app
            .post(path)
            .header("accept-language", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["x-tollgate-error"], "invalid_api_key");
        assert_eq!(
            response.headers()["content-language"],
            language.tag(),
            "{accept}"
        );
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        match language.message(ErrorCode::InvalidApiKey) {
            Some(translated) => assert_eq!(message, translated, "{accept}"),
            None => assert!(message.starts_with("No API key was provided"), "{message}"),
        }
    }
    // Without the header: English, and the response says so.
    let response = app.get("/echo/x").send().await.unwrap();
    assert_eq!(response.headers()["content-language"], "en");
}

/// Sends a POST whose head declares a body of `declared` bytes, then the body's first pieces,
/// `pause` apart, and nothing more; returns the answer and how long it took to come.
async fn body_in_pieces(
    addr: SocketAddr,
    path: &str,
    key: &str,
    declared: usize,
    pieces: &[&str],
    pause: std::time::Duration,
) -> (RawAnswer, std::time::Duration) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        socket.write_all(piece.as_bytes()).await.unwrap();
    }
    // The socket stays open: only the node's deadline can end a body that stopped.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut buf))
            .await
            .expect("the node answers within 10 s")
            .unwrap();
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..read]);
    }
    (parse_answer(&answer), started.elapsed())
}

async fn app_with_a_body_deadline_of_300ms() -> (TestApp, common::TestAccount) {
    let app = common::spawn_app_with(with_server(|server| {
        server.body_read_timeout = "300ms".into();
    }))
    .await;
    let account = app.create_account("acme").await;
    (app, account)
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_400_on_every_path_and_costs_nothing() {
    let (app, account) = app_with_a_body_deadline_of_300ms().await;
    let key = &account.master_key;
    let before = available(&app, key).await;
    // A metered LLM call (read whole for its price), a plain call on a priced route (streamed
    // to the upstream) and a management call: each declares 200 bytes and sends a few.
    for path in ["/v1/chat/completions", "/echo/upload", "/api/v1/keys"] {
        let (answer, took) = body_in_pieces(
            app.addr,
            path,
            key,
            200,
            &["{\"model\":"],
            std::time::Duration::ZERO,
        )
        .await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.body);
        let body = answer.json();
        assert_eq!(body["error"]["code"], "bad_request", "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("The request body stopped arriving: nothing came for 300 ms."),
            "{path}: {body}"
        );
        assert!(answer.header("x-request-id").is_some(), "{path}");
        assert!(
            took >= std::time::Duration::from_millis(250),
            "{path}: {took:?}"
        );
    }
    assert_eq!(available(&app, key).await, before);
    common::assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_slow_body_that_keeps_arriving_is_read_whole() {
    let (app, account) = app_with_a_body_deadline_of_300ms().await;
    let body = "{\"slowly\": \"but surely, a piece at a time\"}";
    let pieces: Vec<&str> = [&body[..10], &body[10..20], &body[20..30], &body[30..]].to_vec();
    // Four pieces 150 ms apart: 450 ms in all, longer than the deadline, but never idle for it.
    let (answer, took) = body_in_pieces(
        app.addr,
        "/echo/upload",
        &account.master_key,
        body.len(),
        &pieces,
        std::time::Duration::from_millis(150),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["body"], body);
    assert!(took >= std::time::Duration::from_millis(400), "{took:?}");
}
