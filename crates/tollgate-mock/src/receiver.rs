//! A webhook receiver on loopback, for the demo's tour and the tests: every `POST` to any path
//! is kept (path, the Standard Webhooks headers, body) and answered as scripted for its path
//! (204 unless told otherwise; a status, a `Retry-After`, a delay). `GET /received` lists what
//! arrived, as JSON.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// One delivery as it arrived.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    pub path: String,
    pub webhook_id: Option<String>,
    pub webhook_timestamp: Option<String>,
    pub webhook_signature: Option<String>,
    pub body: String,
}

/// How the receiver answers a path.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub delay: Duration,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            status: 204,
            retry_after: None,
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct Inbox {
    received: Mutex<Vec<Received>>,
    answers: Mutex<HashMap<String, Answer>>,
}

/// A running receiver; it stops when dropped.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    inbox: Arc<Inbox>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    /// Serves on `addr` (port 0 picks a free port).
    pub async fn start(addr: SocketAddr) -> std::io::Result<WebhookReceiver> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inbox = Arc::new(Inbox::default());
        let router = Router::new()
            .route("/received", get(list))
            .route("/{*path}", post(receive))
            .with_state(inbox.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "webhook receiver stopped");
            }
        });
        Ok(WebhookReceiver { addr, inbox, task })
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How to answer `path` from now on.
    pub fn answer(&self, path: &str, answer: Answer) {
        self.inbox
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_string(), answer);
    }

    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.inbox
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What arrived at `path`, waiting up to `within` for at least `count` deliveries there.
    pub async fn wait_for(&self, path: &str, count: usize, within: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let at_path: Vec<Received> = self
                .received()
                .into_iter()
                .filter(|r| r.path == path)
                .collect();
            if at_path.len() >= count || tokio::time::Instant::now() >= deadline {
                return at_path;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(inbox): State<Arc<Inbox>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/{path}");
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let answer = inbox
        .answers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&path)
        .copied()
        .unwrap_or_default();
    inbox
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Received {
            path,
            webhook_id: header("webhook-id"),
            webhook_timestamp: header("webhook-timestamp"),
            webhook_signature: header("webhook-signature"),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    // Kept before the wait: a sender that gives up waiting still delivered it.
    tokio::time::sleep(answer.delay).await;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::NO_CONTENT);
    match answer.retry_after {
        Some(seconds) => (status, [("retry-after", seconds.to_string())]).into_response(),
        None => status.into_response(),
    }
}

async fn list(State(inbox): State<Arc<Inbox>>) -> Json<Vec<Received>> {
    Json(
        inbox
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    )
}
