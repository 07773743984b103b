//! Response body wrappers that carry no policy of their own.

use axum::body::Body;

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
