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
//! - A request hyper cannot read (bad syntax, a head over `server.max_header_bytes`) gets
//!   Tollgate's envelope and a request ID, not hyper's bare status line: see [`Refusals`].
//!
//! Hand-written around hyper-util's connection builder, the one axum uses, because axum exposes
//! none of these settings.

use crate::config::ConnectionLimits;
use crate::http::render::http1_refusal;
use axum::extract::ConnectInfo;
use axum::http::HeaderName;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    request_id_header: HeaderName,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        // Above the configured limit, so that `edge::bounded_head` answers with the envelope;
        // only a list past this ceiling gets h2's own bare 431.
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 4).unwrap_or(u32::MAX))
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
        let request_id_header = request_id_header.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(protocol) = protocol(&stream, header_read_timeout).await else {
                return;
            };
            let io = Refusals {
                io: stream,
                http1: protocol == Protocol::Http1,
                max_header_bytes: limits.max_header_bytes,
                request_id_header,
                replacement: None,
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let _ = watcher.watch(connection.into_owned()).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Waits until the connection has sent enough to tell HTTP/1 from the HTTP/2 preface, within
/// `deadline`; `None` if it does not (or closes first).
async fn protocol(stream: &TcpStream, deadline: Duration) -> Option<Protocol> {
    let wait = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) if n == buf.len() && buf == H2_PREFACE => return Some(Protocol::Http2),
                Ok(n) if n == buf.len() || !H2_PREFACE.starts_with(&buf[..n]) => {
                    return Some(Protocol::Http1)
                }
                // Part of the preface: wait for the rest.
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(deadline, wait).await.ok().flatten()
}

/// The socket as hyper sees it. hyper answers an HTTP/1 request it cannot read (bad syntax, a
/// head over `max_buf_size`, more than 100 headers) itself, with a bare status line and no
/// body, and has no hook to change that answer. This wrapper recognises it: a write that is
/// exactly a 400, 414 or 431 head without a request ID, which every head of Tollgate's own
/// carries. It sends [`edge::http1_refusal`] in its place; hyper closes the connection next.
struct Refusals {
    io: TcpStream,
    http1: bool,
    max_header_bytes: usize,
    request_id_header: HeaderName,
    /// The envelope sent instead of hyper's refusal, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl Refusals {
    /// Whether `buf` is swallowed: hyper's refusal (replaced), or anything after it.
    fn replaces(&mut self, buf: &[u8]) -> bool {
        if self.replacement.is_some() {
            return true;
        }
        if !self.http1 {
            return false;
        }
        let replacement = bare_refusal(buf, &self.request_id_header).and_then(|status| {
            http1_refusal(status, self.max_header_bytes, &self.request_id_header)
        });
        let replaces = replacement.is_some();
        self.replacement = replacement.map(|bytes| (bytes, 0));
        replaces
    }

    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some((bytes, sent)) = &mut self.replacement {
            while *sent < bytes.len() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *sent += n;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The status of `buf` if it is a whole bare 400, 414 or 431 head with no `request_id_header`.
fn bare_refusal(buf: &[u8], request_id_header: &HeaderName) -> Option<u16> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    if buf.len() > 512 || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let status: u16 = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    let name = request_id_header.as_str().as_bytes();
    let has_id = buf.split(|&b| b == b'\n').any(|line| {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()] == b':'
    });
    (matches!(status, 400 | 414 | 431) && !has_id).then_some(status)
}

impl AsyncRead for Refusals {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Refusals {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replaces(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // hyper's refusal is a head alone: one slice with bytes in it.
        let mut written = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (written.next(), written.next()) {
            if this.replaces(only) {
                return Poll::Ready(Ok(only.len()));
            }
        } else if this.replacement.is_some() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Raises the process's soft open-file limit to its hard limit, as servers do at start.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
