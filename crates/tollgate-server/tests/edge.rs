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
    let text = String::from_utf8_lossy(&answer).to_string();
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
