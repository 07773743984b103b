//! The benchmark upstream: Tollgate's OpenAI-compatible mock (JSON and SSE), with an optional
//! fixed latency before every answer, the way a real provider takes time to think.

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves the mock on `listen` until the process is killed.
pub async fn serve(listen: SocketAddr, latency: Duration) -> anyhow::Result<()> {
    let mut app = tollgate_mock::router();
    if !latency.is_zero() {
        app = app.layer(middleware::from_fn(move |request: Request, next: Next| {
            delayed(request, next, latency)
        }));
    }
    let listener = TcpListener::bind(listen).await?;
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service).await?;
    Ok(())
}

async fn delayed(request: Request, next: Next, latency: Duration) -> Response {
    tokio::time::sleep(latency).await;
    next.run(request).await
}
