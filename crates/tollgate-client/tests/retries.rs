//! The retry table, against a scripted HTTP server on loopback: each reply is written as given,
//! each request recorded, and the client's waits recorded by a clock that does not wait.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures_util::StreamExt;
use http::Method;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tollgate_client::retry::{Clock, Jitter};
use tollgate_client::{Client, ErrorKind};

/// 2026-12-06T00:00:00Z.
const NOW: u64 = 1_796_515_200;

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Declares this many bytes more than it sends, then closes: an answer cut off.
    cut: usize,
    /// Never answers (the connection stays open a while).
    stall: bool,
}

fn reply(status: u16) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: b"{}".to_vec(),
        cut: 0,
        stall: false,
    }
}

impl Reply {
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// One of Tollgate's own errors, in the native envelope.
    fn tollgate(self, code: &str) -> Reply {
        let body = format!(
            r#"{{"error":{{"type":"api_error","code":"{code}","message":"scripted","request_id":"req_s","details":{{}}}}}}"#
        );
        Reply {
            body: body.into_bytes(),
            ..self.header("x-tollgate-error", code)
        }
    }

    fn body(mut self, body: &str) -> Reply {
        self.body = body.as_bytes().to_vec();
        self
    }
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

struct Scripted {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    /// Answers each connection's one request with the next reply, then closes it.
    async fn start(replies: Vec<Reply>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            for reply in replies {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = socket.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the client closed before its request head");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                let mut seen = Seen {
                    head: String::from_utf8_lossy(&buf[..head_end]).to_string(),
                    body: buf[head_end..].to_vec(),
                };
                let length: usize = seen
                    .header("content-length")
                    .map_or(0, |l| l.parse().unwrap());
                while seen.body.len() < length {
                    let n = socket.read(&mut chunk).await.unwrap();
                    seen.body.extend_from_slice(&chunk[..n]);
                }
                record.lock().unwrap().push(seen);
                if reply.stall {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        drop(socket);
                    });
                    continue;
                }
                let mut out = format!(
                    "HTTP/1.1 {} Scripted\r\nconnection: close\r\ncontent-length: {}\r\nx-request-id: req_{}\r\n",
                    reply.status,
                    reply.body.len() + reply.cut,
                    record.lock().unwrap().len(),
                );
                for (name, value) in &reply.headers {
                    out.push_str(&format!("{name}: {value}\r\n"));
                }
                out.push_str("\r\n");
                let mut bytes = out.into_bytes();
                bytes.extend_from_slice(&reply.body);
                let _ = socket.write_all(&bytes).await;
                let _ = socket.shutdown().await;
            }
        });
        Scripted { url, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Records each wait and returns at once; the time is [`NOW`].
#[derive(Default)]
struct RecordingClock {
    waits: Mutex<Vec<Duration>>,
}

impl Clock for RecordingClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.waits.lock().unwrap().push(duration);
        Box::pin(async {})
    }
}

struct Half;

impl Jitter for Half {
    fn draw(&self) -> f64 {
        0.5
    }
}

fn client(url: &str, clock: &Arc<RecordingClock>) -> Client {
    Client::builder(url)
        .credential("tg_test_key")
        .clock(clock.clone())
        .jitter(Arc::new(Half))
        .build()
        .unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test]
async fn the_server_says_how_long_else_backoff_and_every_attempt_carries_one_key_and_body() {
    let server = Scripted::start(vec![
        reply(503)
            .tollgate("service_unavailable")
            .header("retry-after", "1"),
        reply(429)
            .tollgate("rate_limited")
            .header("retry-after-ms", "250"),
        reply(500).tollgate("internal_error"),
        reply(200).body(r#"{"ok":true}"#),
    ])
    .await;
    let clock = Arc::new(RecordingClock::default());
    let client = Client::builder(&server.url)
        .credential("tg_test_key")
        .clock(clock.clone())
        .jitter(Arc::new(Half))
        .max_retries(3)
        .build()
        .unwrap();
    let answer = client
        .call_json(Method::POST, "/things", Some(&serde_json::json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(answer.value, serde_json::json!({"ok": true}));
    assert_eq!(answer.meta.attempts, 4);
    // Retry 2 has no server wait: a draw of 0.5 from min(8 s, 0.5 s × 2²).
    assert_eq!(*clock.waits.lock().unwrap(), [ms(1000), ms(250), ms(1000)]);
    let seen = server.seen();
    assert_eq!(seen.len(), 4);
    let key = seen[0].header("idempotency-key").expect("a minted key");
    assert!(key.starts_with("tgc_") && key.len() == 36, "{key}");
    for attempt in &seen {
        assert_eq!(
            attempt.header("idempotency-key").as_deref(),
            Some(key.as_str())
        );
        assert_eq!(attempt.body, br#"{"n":1}"#);
        assert_eq!(
            attempt.header("authorization").as_deref(),
            Some("Bearer tg_test_key")
        );
    }
}

#[tokio::test]
async fn an_http_date_is_a_wait_from_now() {
    let server = Scripted::start(vec![
        reply(503)
            .tollgate("service_unavailable")
            // NOW + 5 s.
            .header("retry-after", "Sun, 06 Dec 2026 00:00:05 GMT"),
        reply(200),
    ])
    .await;
    let clock = Arc::new(RecordingClock::default());
    client(&server.url, &clock)
        .call_json(Method::GET, "/things", None)
        .await
        .unwrap();
    assert_eq!(*clock.waits.lock().unwrap(), [ms(5000)]);
}

#[tokio::test]
async fn the_retry_table() {
    // (reply, attempts made, waits)
    let cases: Vec<(Reply, usize, Vec<Duration>)> = vec![
        (reply(400).tollgate("bad_request"), 1, vec![]),
        (reply(404).tollgate("not_found"), 1, vec![]),
        (reply(409).tollgate("conflict"), 1, vec![]),
        (reply(422).tollgate("idempotency_key_mismatch"), 1, vec![]),
        (reply(402).tollgate("insufficient_balance"), 1, vec![]),
        (
            reply(409)
                .tollgate("idempotency_in_progress")
                .header("retry-after", "1"),
            2,
            vec![ms(1000)],
        ),
        (reply(408), 2, vec![ms(250)]),
        (reply(502), 2, vec![ms(250)]),
        (reply(504).tollgate("upstream_timeout"), 2, vec![ms(250)]),
        // The server's word wins over the status.
        (reply(503).header("x-should-retry", "false"), 1, vec![]),
        (
            reply(400).header("x-should-retry", "true"),
            2,
            vec![ms(250)],
        ),
        // An upstream's own 404 (no X-Tollgate-Error) is not retried either.
        (reply(404).body("no such page"), 1, vec![]),
    ];
    for (first, attempts, waits) in cases {
        let label = format!("{} {:?}", first.status, first.headers);
        let server = Scripted::start(vec![first, reply(200)]).await;
        let clock = Arc::new(RecordingClock::default());
        let outcome = client(&server.url, &clock)
            .call_json(Method::POST, "/things", None)
            .await;
        assert_eq!(server.seen().len(), attempts, "{label}");
        assert_eq!(*clock.waits.lock().unwrap(), waits, "{label}");
        assert_eq!(outcome.is_ok(), attempts == 2, "{label}");
    }
}

#[tokio::test]
async fn a_wait_over_the_cap_comes_back_at_once_with_retry_after() {
    let server = Scripted::start(vec![
        reply(429)
            .tollgate("rate_limited")
            .header("retry-after", "120"),
        reply(200),
    ])
    .await;
    let clock = Arc::new(RecordingClock::default());
    let err = client(&server.url, &clock)
        .call_json(Method::GET, "/things", None)
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::RateLimited { .. }));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
    assert!(err.is_retryable());
    assert_eq!(server.seen().len(), 1);
    assert!(clock.waits.lock().unwrap().is_empty());
    assert!(err.to_string().ends_with("(request req_1)"), "{err}");
}

#[tokio::test]
async fn retries_zero_opts_out_and_connect_errors_are_retried() {
    let server = Scripted::start(vec![reply(503), reply(200)]).await;
    let clock = Arc::new(RecordingClock::default());
    let once = Client::builder(&server.url)
        .clock(clock.clone())
        .max_retries(0)
        .build()
        .unwrap();
    assert!(once.call_json(Method::GET, "/x", None).await.is_err());
    assert_eq!(server.seen().len(), 1);

    // Nothing listens on a port just freed.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let err = client(&format!("http://127.0.0.1:{port}"), &clock)
        .call_json(Method::POST, "/x", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Connect);
    assert_eq!(*clock.waits.lock().unwrap(), [ms(250), ms(500)]);
}

#[tokio::test]
async fn the_callers_idempotency_key_wins() {
    let server = Scripted::start(vec![reply(500), reply(200)]).await;
    let clock = Arc::new(RecordingClock::default());
    client(&server.url, &clock)
        .proxy(Method::POST, "/v1/things")
        .idempotency_key("mine-1")
        .body("payload")
        .send()
        .await
        .unwrap();
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    for attempt in seen {
        assert_eq!(attempt.header("idempotency-key").as_deref(), Some("mine-1"));
        assert_eq!(attempt.body, b"payload");
    }
}

#[tokio::test]
async fn gets_carry_no_key_and_a_failing_server_exhausts_the_budget() {
    let server = Scripted::start((0..20).map(|_| reply(503)).collect()).await;
    let clock = Arc::new(RecordingClock::default());
    let client = client(&server.url, &clock);
    for _ in 0..5 {
        assert!(client.call_json(Method::GET, "/x", None).await.is_err());
    }
    // Tokens 10 → 7 over the first call's three attempts, 5 after the second's two; from
    // then on no retry.
    assert_eq!(server.seen().len(), 3 + 2 + 1 + 1 + 1);
    assert!(server
        .seen()
        .iter()
        .all(|s| s.header("idempotency-key").is_none()));
}

#[tokio::test]
async fn a_stream_is_retried_before_its_head_and_never_after() {
    let mut cut = reply(200)
        .header("content-type", "text/event-stream")
        .body("data: one\n\n");
    cut.cut = 100;
    let server = Scripted::start(vec![reply(503), cut, reply(200)]).await;
    let clock = Arc::new(RecordingClock::default());
    let stream = client(&server.url, &clock)
        .proxy(Method::POST, "/v1/chat/completions")
        .json(&serde_json::json!({"stream": true}))
        .stream()
        .await
        .unwrap();
    // Known before the first event.
    assert_eq!(stream.meta.request_id.as_deref(), Some("req_2"));
    assert_eq!(stream.meta.attempts, 2);
    let events: Vec<_> = stream.events().collect().await;
    assert_eq!(events[0].as_ref().unwrap().data, "one");
    let err = events.last().unwrap().as_ref().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Transport, "{err}");
    assert_eq!(server.seen().len(), 2, "no attempt after the first byte");
}

#[tokio::test]
async fn pacing_waits_for_a_used_up_limit_to_reset() {
    let exhausted = || {
        reply(200)
            .header("ratelimit-policy", "\"per-key\";q=10;w=60")
            .header("ratelimit", "\"per-key\";r=0;t=3")
    };
    let server = Scripted::start(vec![exhausted(), reply(200), exhausted(), reply(200)]).await;
    let clock = Arc::new(RecordingClock::default());
    let paced = Client::builder(&server.url)
        .clock(clock.clone())
        .pacing(true)
        .build()
        .unwrap();
    let first = paced.call_json(Method::GET, "/x", None).await.unwrap();
    let limit = first.meta.rate_limit.clone().unwrap();
    assert_eq!(limit.policies[0].remaining, Some(0));
    paced.call_json(Method::GET, "/x", None).await.unwrap();
    assert_eq!(*clock.waits.lock().unwrap(), [ms(3000)]);

    let unpaced = client(&server.url, &clock);
    clock.waits.lock().unwrap().clear();
    unpaced.call_json(Method::GET, "/x", None).await.unwrap();
    unpaced.call_json(Method::GET, "/x", None).await.unwrap();
    assert!(clock.waits.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_call_that_times_out_is_retried_when_it_is_safe_to_repeat() {
    let mut stalled = reply(200);
    stalled.stall = true;
    let server = Scripted::start(vec![stalled, reply(200).body(r#"{"ok":1}"#)]).await;
    let clock = Arc::new(RecordingClock::default());
    let client = Client::builder(&server.url)
        .clock(clock.clone())
        .jitter(Arc::new(Half))
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let answer = client
        .call_json(Method::POST, "/things", None)
        .await
        .unwrap();
    assert_eq!(answer.meta.attempts, 2);
    assert_eq!(*clock.waits.lock().unwrap(), [ms(250)]);
    let seen = server.seen();
    assert_eq!(
        seen[0].header("idempotency-key"),
        seen[1].header("idempotency-key")
    );
}
