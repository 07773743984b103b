//! Accepting connections: how many, and how long a client may take before it has sent a request.
//!
//! `axum::serve` accepts every connection and waits on each as long as the client likes, so a
//! client that opens sockets and sends nothing (or a header a byte a minute) could hold every
//! file descriptor the process has, and paid calls would time out behind them. This loop bounds
//! both:
//!
//! - At most [`ConnectionLimits::max_connections`] are open at once: beyond it nothing is
//!   accepted (new connections wait in the kernel's backlog) until one closes, so the process
//!   never runs out of descriptors for its upstream and database connections.
//! - A client must finish each request's head within [`ConnectionLimits::header_read_timeout`],
//!   counted from the connection's start or from the end of the previous response: the same clock
//!   bounds a slow header and an idle keep-alive connection (hyper's HTTP/1 rule). Until the
//!   protocol is known (HTTP/1 or the HTTP/2 preface) the same deadline applies, which hyper
//!   itself does not enforce.
//! - HTTP/2 connections get a stream limit and keep-alive pings that close a dead peer's.
//!
//! Hand-written around hyper-util's connection builder, the one axum uses, because axum exposes
//! none of these settings.

use crate::config::ConnectionLimits;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// What a client sends first on an HTTP/2 connection without TLS.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long in-flight requests may run on after shutdown begins.
const DRAIN: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `shutdown` resolves, then lets open connections finish
/// (for at most [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: wait, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = TowerToHyperService::new(tower::service_fn(
            move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(request.map(axum::body::Body::new))
            },
        ));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            if !protocol_known(&stream, header_read_timeout).await {
                return;
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(connection.into_owned()).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    Ok(())
}

/// Waits until the connection has sent enough to tell HTTP/1 from the HTTP/2 preface, within
/// `deadline`; `false` if it does not (or closes first).
async fn protocol_known(stream: &TcpStream, deadline: Duration) -> bool {
    let wait = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n == buf.len() || !H2_PREFACE.starts_with(&buf[..n]) => return true,
                // Part of the preface: wait for the rest.
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(deadline, wait).await.unwrap_or(false)
}

/// The largest default: enough for any single node, whatever its open-file limit.
const MAX_DEFAULT_CONNECTIONS: u64 = 32_768;

/// Half of the open-file limit the process can raise itself to (its hard limit; see
/// [`raise_open_file_limit`]), leaving the other half for upstream and database connections
/// and files: 512 where the limit is 1024, or 512 if the limit cannot be read.
pub fn default_max_connections() -> usize {
    let hard = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024);
    usize::try_from((hard / 2).clamp(1, MAX_DEFAULT_CONNECTIONS)).unwrap_or(512)
}

/// Raises the process's soft open-file limit to its hard limit, as servers do at start.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
