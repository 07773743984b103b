//! Body wrappers that carry no policy of their own, and the answer to a request body that could
//! not be read.

use crate::http::error::{payload_too_large, HttpError};
use axum::body::Body;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tollgate_core::ErrorCode;

/// A response body that runs `on_end` once, when the body ends, fails, or is dropped unfinished
/// (the client left): what must last exactly as long as the response does.
pub struct OnEnd<F: FnOnce()> {
    inner: Body,
    on_end: Option<F>,
}

impl<F: FnOnce()> OnEnd<F> {
    pub fn new(inner: Body, on_end: F) -> OnEnd<F> {
        OnEnd {
            inner,
            on_end: Some(on_end),
        }
    }

    fn end(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end();
        }
    }
}

impl<F: FnOnce() + Unpin> http_body::Body for OnEnd<F> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce()> Drop for OnEnd<F> {
    fn drop(&mut self) {
        self.end();
    }
}

/// A request body that may go at most `idle` without a frame arriving, as nginx's
/// `client_body_timeout` bounds the wait between two reads: a client that declares a body and
/// stops sending it would otherwise hold its connection, and whatever its request holds, for as
/// long as it keeps the socket open. Past it the body fails with [`BodyStalled`], which each
/// reader turns into its answer ([`read_error`]). A timer is set only when the body is still
/// waiting on a second poll in a row: hyper hands a body that came with its head over on the
/// poll after the first, so most requests never make one (a timer each cost 3% of a proxied
/// request's CPU).
pub struct Stalling {
    inner: Body,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    moved: bool,
    /// The last poll found nothing, and asked to be polled again.
    waited: bool,
}

impl Stalling {
    pub fn new(inner: Body, idle: Duration) -> Stalling {
        Stalling {
            inner,
            idle,
            timer: None,
            moved: false,
            waited: false,
        }
    }
}

impl http_body::Body for Stalling {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {}
            polled => {
                this.moved = true;
                this.waited = false;
                return polled;
            }
        }
        if !std::mem::replace(&mut this.waited, true) {
            // Polled again soon, and only a body still waiting then needs a timer.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let deadline = tokio::time::Instant::now() + this.idle;
        let timer = match &mut this.timer {
            Some(timer) => {
                if std::mem::take(&mut this.moved) {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyStalled(this.idle))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Nothing of a request body arrived for this long ([`Stalling`]).
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no part of the request body arrived for {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyStalled {}

/// The answer to a request body that could not be read whole: 413 over `limit`, 400 when it
/// stopped arriving ([`BodyStalled`]) or broke off.
pub fn read_error(error: &(dyn std::error::Error + 'static), limit: u64) -> HttpError {
    if let Some(stalled) = cause::<BodyStalled>(error) {
        return HttpError::new(
            ErrorCode::BadRequest,
            format!(
                "The request body stopped arriving: nothing came for {} ms. Nothing was charged.",
                stalled.0.as_millis()
            ),
        );
    }
    if cause::<http_body_util::LengthLimitError>(error).is_some() {
        return payload_too_large(limit);
    }
    HttpError::new(
        ErrorCode::BadRequest,
        "The request body could not be read. Nothing was charged.",
    )
}

/// The first error of type `E` in `error`'s chain of sources.
pub fn cause<'e, E: std::error::Error + 'static>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e E> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        source = e.source();
    }
    None
}
