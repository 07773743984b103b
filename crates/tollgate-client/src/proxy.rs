//! Calls to the APIs behind Tollgate (an LLM route, a REST route), through the same retry loop:
//! a whole answer, or a stream that is retried only before its first byte and whose request ID
//! and rate-limit state are known before its first event.

use crate::client::{AnswerBody, Call, Client, Meta, Response};
use crate::error::{Error, ErrorKind};
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use http::{HeaderName, HeaderValue, Method};
use serde::Serialize;

/// A data-plane call being built; [`Client::proxy`] starts one.
pub struct ProxyRequest {
    client: Client,
    call: Result<Call, Error>,
}

impl Client {
    /// A call to `path` on the gateway (`/v1/chat/completions`), outside the management API.
    /// Like every call, a POST or PATCH carries an `Idempotency-Key` on all its attempts.
    pub fn proxy(&self, method: Method, path: &str) -> ProxyRequest {
        ProxyRequest {
            client: self.clone(),
            call: Ok(Call::new(method, path)),
        }
    }
}

impl ProxyRequest {
    pub fn json(self, body: &impl Serialize) -> ProxyRequest {
        ProxyRequest {
            call: self.call.and_then(|call| call.json(body)),
            client: self.client,
        }
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> ProxyRequest {
        if let Ok(call) = &mut self.call {
            call.body = Some(body.into());
        }
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> ProxyRequest {
        self.call = self.call.and_then(|mut call| {
            let name = HeaderName::try_from(name);
            let value = HeaderValue::try_from(value);
            match (name, value) {
                (Ok(name), Ok(value)) => {
                    call.headers.insert(name, value);
                    Ok(call)
                }
                _ => Err(Error::local(
                    ErrorKind::Builder,
                    "a header name or value is not valid",
                    None,
                )),
            }
        });
        self
    }

    /// Your own key for this call (it wins over the one the client would mint).
    pub fn idempotency_key(self, key: &str) -> ProxyRequest {
        self.header("idempotency-key", key)
    }

    /// Sends the call and reads the whole answer.
    pub async fn send(self) -> Result<Response<Bytes>, Error> {
        self.client.send_whole(self.call?).await
    }

    /// Sends the call and returns as soon as the answer's head arrives: attempts that fail
    /// before it are retried, nothing after.
    pub async fn stream(self) -> Result<Streaming, Error> {
        let answer = self.client.send(self.call?, false).await?;
        let body = match answer.body {
            AnswerBody::Live(response) => {
                response.bytes_stream().map_err(Error::from_reqwest).boxed()
            }
            AnswerBody::Whole(body) => futures_util::stream::once(async { Ok(body) }).boxed(),
        };
        Ok(Streaming {
            meta: answer.meta,
            body,
        })
    }
}

/// A successful answer still arriving. [`Streaming::meta`] (request ID, rate limits) is known
/// before the first byte.
pub struct Streaming {
    pub meta: Meta,
    body: BoxStream<'static, Result<Bytes, Error>>,
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; `message` for an event without one, as browsers have it.
    pub event: String,
    pub data: String,
    pub id: String,
}

impl Streaming {
    /// The body's chunks as they come.
    pub fn bytes(self) -> BoxStream<'static, Result<Bytes, Error>> {
        self.body
    }

    /// The body read as server-sent events (`text/event-stream`).
    pub fn events(self) -> BoxStream<'static, Result<Event, Error>> {
        self.body
            .eventsource()
            .map(|event| match event {
                Ok(event) => Ok(Event {
                    event: event.event,
                    data: event.data,
                    id: event.id,
                }),
                Err(eventsource_stream::EventStreamError::Transport(e)) => Err(e),
                Err(e) => Err(Error::local(
                    ErrorKind::Decode,
                    format!("the event stream does not parse: {e}"),
                    None,
                )),
            })
            .boxed()
    }
}
