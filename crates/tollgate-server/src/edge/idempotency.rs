//! `Idempotency-Key` on POST and PATCH, for proxied routes and the management API alike: a retry
//! of a completed request gets the stored answer (`Idempotent-Replayed: true`) and is charged
//! nothing; a retry while the first is running gets 409 `idempotency_in_progress`; the same key
//! for another request gets 422 `idempotency_key_mismatch`.
//!
//! - **Scope:** keys belong to the caller's account (the admin token has a scope of its own), so
//!   two accounts never see each other's keys. The caller is identified here, from the key cache,
//!   before the handler runs; a request whose credential fails passes through untouched and fails
//!   in the handler as it would without the header.
//! - **Fingerprint:** SHA-256 over the method, the path with its query, and the body's SHA-256.
//!   The body is read whole first (it is bounded by `server.max_body_bytes` anyway).
//! - **What is kept:** only final outcomes. An error Tollgate originates (nothing was forwarded,
//!   or the upstream failed and nothing was charged), a 408, a 429 and any 5xx free the key so a
//!   retry runs afresh. Anything else is kept with its status, headers and body, streams included,
//!   up to `idempotency.max_response_bytes`; a body over that, or one that never reached its end
//!   (the client left, the upstream broke), is recorded as done but cannot be replayed: a retry
//!   gets 409 `conflict` naming the original request, rather than a truncated copy or a second
//!   charge. A response showing a secret (a created or rolled key) is kept the same way, without
//!   its body: no plaintext secret is ever stored.
//! - **Ordering:** the record is completed before the client sees the end of the body (the
//!   response is sent chunked, and the last chunk waits for the store), so a retry that follows
//!   the response always finds it.
//! - **Crashes:** a claim is a lease of `billing.request_hold_ttl`: a request still running after
//!   that has had its hold released (it can no longer be charged), so a retry may take over.
//! - **Replays and rate limits:** a replay, a 409 and a 422 consume no rate limit (they cost the
//!   upstream nothing); their headers show where the caller stands. On a proxied route each gets
//!   a usage row of its own, charged nothing, a replay's naming its original in `replay_of`.

use crate::access::keys::Identity;
use crate::access::limits;
use crate::access::limits::{Estimate, LimitSlot, Standings};
use crate::http::error::validation;
use crate::http::error::HttpError;
use crate::http::headers::is_hop_by_hop;
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tollgate_core::{ApiError, ErrorCode, RequestId};
use tollgate_store::{IdempotencyBegin, IdempotencyClaim, KeyRecord, Store, StoredResponse};
use tollgate_wire::ErrorProfile;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// On a replay: the request ID of the request whose answer it is.
pub const ORIGINAL_REQUEST_ID: HeaderName = HeaderName::from_static("original-request-id");
const MAX_KEY_CHARS: usize = 255;

/// Sits inside rescue (its errors are rendered like any other) and outside the handlers.
/// The layer around the proxy: a request the proxy will refuse before any work (a path that
/// escapes its route, a method the route does not serve, no route at all) gets that answer, not
/// an idempotency verdict. The management API's routes carry [`layer`] themselves, so only a
/// request that matches one of them is claimed. The edge calls it only for a request that
/// [`claims_a_key`].
pub async fn proxied(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let forwarded = !path.starts_with(&state.config.api_prefix)
        && crate::http::headers::path_escape(path).is_none()
        && state
            .routes
            .resolve(path)
            .is_some_and(|route| route.config.methods.contains(request.method()));
    if !forwarded {
        return next.run(request).await;
    }
    layer(State(state), request, next).await
}

/// Whether the request is one idempotency applies to: a POST or PATCH with an Idempotency-Key.
pub fn claims_a_key(request: &Request) -> bool {
    matches!(*request.method(), Method::POST | Method::PATCH)
        && request.headers().contains_key(&IDEMPOTENCY_KEY)
}

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !claims_a_key(&request) {
        return next.run(request).await;
    }
    let Some(value) = request.headers().get(&IDEMPOTENCY_KEY) else {
        return next.run(request).await;
    };
    let profile = profile_of(&state, request.uri().path());
    let key = match parse_key(value) {
        Ok(key) => key,
        Err(error) => return with_profile(error, profile),
    };
    let identity = match state
        .identify(request.headers(), request.extensions())
        .await
    {
        Ok(identity) => identity,
        // The handler refuses the credential just as it would without the header.
        Err(_) => return next.run(request).await,
    };
    let (parts, body) = request.into_parts();
    let limit = state.config.max_body_bytes;
    let body = match axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX)).await
    {
        Ok(body) => body,
        Err(e) => return with_profile(crate::http::body::read_error(&e, limit), profile),
    };
    let owner = parts
        .extensions
        .get::<RequestId>()
        .copied()
        .unwrap_or_default();
    let now = state.clock.now();
    let chrono = |d| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let claim = IdempotencyClaim {
        scope: match &identity {
            Identity::Admin => "admin".to_string(),
            Identity::Key(key) => key.record.account_id.to_string(),
        },
        key,
        fingerprint: fingerprint(&parts.method, &parts.uri, &body),
        owner,
        now,
        lease_until: now + chrono(state.config.request_hold_ttl),
        expires_at: now + chrono(state.config.idempotency_retention),
    };
    let begun = match state.store.begin_idempotent(&claim).await {
        Ok(begun) => begun,
        Err(e) => return with_profile(HttpError::from(e), profile),
    };
    if !matches!(begun, IdempotencyBegin::Started)
        && !may_call(&state, &identity, parts.uri.path(), &body)
    {
        // The key is the account's, but this caller may not make this call: no replay (another
        // key's answer) and no 409. The handler refuses it as it would without the header.
        return next.run(Request::from_parts(parts, Body::from(body))).await;
    }
    if !matches!(begun, IdempotencyBegin::Started) {
        // Not run: show where the caller stands without consuming anything.
        if let Some(slot) = parts.extensions.get::<LimitSlot>() {
            slot.set(standing(&state, &identity, parts.uri.path()));
        }
    }
    let (response, original) = match begun {
        IdempotencyBegin::Started => {
            let mut request = Request::from_parts(parts, Body::from(body));
            // A hold this request opens must end by the time its claim does: a retry may take
            // over then, and must not find the first run still able to charge.
            request
                .extensions_mut()
                .insert(HoldDeadline(claim.lease_until));
            let claim = Claim {
                store: state.store.clone(),
                scope: claim.scope,
                key: claim.key,
                owner,
            };
            let limits = Keep {
                max_bytes: usize::try_from(state.config.idempotency_max_response_bytes)
                    .unwrap_or(usize::MAX),
                drain_for: state.config.request_hold_ttl,
            };
            return run(claim, limits, request, next).await;
        }
        IdempotencyBegin::InFlight { owner, .. } => (
            with_profile(
                ApiError::new(
                    ErrorCode::IdempotencyInProgress,
                    format!(
                        "A request with this Idempotency-Key ({owner}) is still being processed. \
                     Retry after 1 s to receive its outcome."
                    ),
                )
                .with_detail("original_request_id", owner.to_string())
                .with_retry_after(1)
                .into(),
                profile,
            ),
            Some(owner),
        ),
        IdempotencyBegin::Mismatch => (
            with_profile(
                HttpError::new(
                    ErrorCode::IdempotencyKeyMismatch,
                    "This Idempotency-Key was already used for a different request (method, \
                     path or body). Use a fresh key for a different request.",
                ),
                profile,
            ),
            None,
        ),
        IdempotencyBegin::Completed { owner, response } => {
            (replay(owner, response, profile), Some(owner))
        }
    };
    if let Identity::Key(key) = &identity {
        file_unrun(&state, &key.record, &parts, &response, original);
    }
    response
}

/// Files a usage row for a data-plane request answered here without running (a replay, a 409 or
/// a 422), so its request ID can be looked up like any other: charged nothing, and pointing to
/// the original request where there is one.
fn file_unrun(
    state: &AppState,
    key: &KeyRecord,
    parts: &http::request::Parts,
    response: &Response,
    original: Option<RequestId>,
) {
    let path = parts.uri.path();
    if !state.config.usage_log || path.starts_with(&state.config.api_prefix) {
        return;
    }
    let Some(route) = state.routes.resolve(path) else {
        return;
    };
    let now = state.clock.now();
    let mut row = crate::billing::meter::usage_row(parts, key, &route.config.prefix, now);
    row.status = response.status().as_u16();
    if let Some(error) = response.extensions().get::<ApiError>() {
        row.error_code = Some(error.code.as_str().to_string());
        row.error_message = Some(error.message.clone());
    }
    row.replay_of = original;
    state.ledger.finish_request(None, |_| Some(row));
}

/// The latest a hold opened for an idempotent request may expire: when its claim's lease ends.
#[derive(Debug, Clone, Copy)]
pub struct HoldDeadline(pub chrono::DateTime<chrono::Utc>);

/// Whether the handler would let this caller make this call at all, checked before another
/// key's stored answer is replayed to it: a usage key may call the billing API's holds but
/// manage nothing, and on a proxied route needs the route's group (and, on an LLM route, the
/// body's model) in its scopes.
fn may_call(state: &AppState, identity: &Identity, path: &str, body: &[u8]) -> bool {
    let Identity::Key(key) = identity else {
        return true;
    };
    let key = &key.record;
    if path.starts_with(&state.config.api_prefix) {
        let holds = format!("{}/holds", state.config.api_prefix);
        return key.kind == tollgate_core::KeyKind::Master || path.starts_with(&holds);
    }
    let Some(route) = state.routes.resolve(path) else {
        return true;
    };
    let group = &route.config.group;
    if !tollgate_core::access::grants_group(&key.scopes, group) {
        return false;
    }
    if route.config.pricing.llm.is_none() {
        return true;
    }
    let model = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|b| b.get("model").and_then(|m| m.as_str()).map(str::to_string));
    model.is_none_or(|model| tollgate_core::access::grants_model(&key.scopes, group, &model))
}

/// The key as sent: 1 to 255 printable ASCII characters.
fn parse_key(value: &HeaderValue) -> Result<String, HttpError> {
    let bytes = value.as_bytes();
    let problem = if bytes.is_empty() {
        "must not be empty".to_string()
    } else if bytes.len() > MAX_KEY_CHARS {
        format!("must be at most {MAX_KEY_CHARS} characters")
    } else if !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        "must be printable ASCII".to_string()
    } else {
        return Ok(String::from_utf8_lossy(bytes).into_owned());
    };
    Err(validation("Idempotency-Key", problem))
}

fn fingerprint(method: &Method, uri: &http::Uri, body: &[u8]) -> [u8; 32] {
    let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let mut hash = Sha256::new();
    hash.update(method.as_str());
    hash.update(b" ");
    hash.update(target);
    hash.update(b"\n");
    hash.update(Sha256::digest(body));
    hash.finalize().into()
}

fn profile_of(state: &AppState, path: &str) -> Option<ErrorProfile> {
    if path.starts_with(&state.config.api_prefix) {
        return None;
    }
    state.routes.resolve(path).map(|r| r.config.error_profile)
}

fn with_profile(error: HttpError, profile: Option<ErrorProfile>) -> Response {
    let mut response = error.into_response();
    if let Some(profile) = profile {
        response.extensions_mut().insert(profile);
    }
    response
}

/// Where a caller stands, for a request answered here without running.
fn standing(state: &AppState, identity: &Identity, path: &str) -> Standings {
    match identity {
        Identity::Admin => Standings::Exempt,
        Identity::Key(key) => {
            let route = profile_of(state, path)
                .and_then(|_| state.routes.resolve(path))
                .map(|r| &r.config);
            Standings::Identified(limits::demands_for(
                &state.config,
                route,
                key,
                Estimate::default(),
            ))
        }
    }
}

fn replay(owner: RequestId, stored: StoredResponse, profile: Option<ErrorProfile>) -> Response {
    let Some(body) = stored.body else {
        return with_profile(
            ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "The request {owner} with this Idempotency-Key was completed, but its \
                     response was not kept, so it cannot be replayed: it showed a secret (which \
                     Tollgate never stores; roll the key for a new one), was larger than the \
                     replay limit, or never reached its end. Look the request up with \
                     GET /api/v1/requests/{owner}; send a new Idempotency-Key to run it again."
                ),
            )
            .with_detail("original_request_id", owner.to_string())
            .into(),
            profile,
        );
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.append(name, value);
        }
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    if let Ok(value) = HeaderValue::from_str(&owner.to_string()) {
        headers.insert(ORIGINAL_REQUEST_ID, value);
    }
    if let Some(profile) = profile {
        response.extensions_mut().insert(profile);
    }
    response
}

/// A started claim: the owner must complete or release it.
#[derive(Clone)]
struct Claim {
    store: Arc<dyn Store>,
    scope: String,
    key: String,
    owner: RequestId,
}

impl Claim {
    async fn complete(self, response: StoredResponse) {
        let Claim {
            store,
            scope,
            key,
            owner,
        } = self;
        if let Err(e) = store
            .complete_idempotent(&scope, &key, owner, &response)
            .await
        {
            // The claim stays in flight until its lease ends: a retry meanwhile gets 409.
            tracing::warn!(error = %e, "cannot record an idempotent outcome");
        }
    }

    async fn release(self) {
        if let Err(e) = self
            .store
            .release_idempotent(&self.scope, &self.key, self.owner)
            .await
        {
            tracing::warn!(error = %e, "cannot free an idempotency key");
        }
    }
}

/// Frees the key if the handler is cancelled before it answers (the client left): nothing was
/// charged then, since the proxy releases its hold when dropped.
struct ReleaseOnDrop(Option<Claim>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let (Some(claim), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(claim.release());
        }
    }
}

/// How much of a response is kept, and how long one is read after its client left.
#[derive(Debug, Clone, Copy)]
struct Keep {
    max_bytes: usize,
    drain_for: std::time::Duration,
}

async fn run(claim: Claim, keep: Keep, request: Request, next: Next) -> Response {
    let mut cancelled = ReleaseOnDrop(Some(claim.clone()));
    let response = next.run(request).await;
    cancelled.0 = None;
    if !is_final(&response) {
        claim.release().await;
        return response;
    }
    let headers = response
        .headers()
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name) && *name != http::header::CONTENT_LENGTH)
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    let (mut parts, body) = response.into_parts();
    // Chunked, so the client sees the end only once the outcome is recorded.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    // A shown secret is never stored: such an outcome is kept without its body.
    let kept = parts.extensions.get::<CarriesSecret>().is_none();
    let recording = RecordingBody {
        inner: body,
        kept: kept.then(Vec::new),
        keep,
        status: parts.status.as_u16(),
        headers,
        claim: Some(claim),
        finishing: None,
    };
    Response::from_parts(parts, Body::new(recording))
}

/// Final: not an error Tollgate originated, and not one a retry could fix.
fn is_final(response: &Response) -> bool {
    let status = response.status();
    response.extensions().get::<ApiError>().is_none()
        && !status.is_server_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
}

type Finishing = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Passes the body through while keeping a copy (up to `max_bytes`); when the body ends it
/// records the outcome, and only then reports the end.
struct RecordingBody {
    inner: Body,
    /// `None` once the body outgrew `keep.max_bytes` (or was never to be kept).
    kept: Option<Vec<u8>>,
    keep: Keep,
    status: u16,
    headers: Vec<(String, String)>,
    claim: Option<Claim>,
    finishing: Option<Finishing>,
}

impl RecordingBody {
    fn stored(&mut self, body: Option<Vec<u8>>) -> StoredResponse {
        StoredResponse {
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            body,
        }
    }
}

impl http_body::Body for RecordingBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        loop {
            if let Some(finishing) = self.finishing.as_mut() {
                return match finishing.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.finishing = None;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    let max = self.keep.max_bytes;
                    if let (Some(kept), Some(data)) = (self.kept.as_mut(), frame.data_ref()) {
                        if kept.len() + data.len() <= max {
                            kept.extend_from_slice(data);
                        } else {
                            self.kept = None;
                        }
                    }
                }
                Poll::Ready(None) => {
                    let Some(claim) = self.claim.take() else {
                        return polled;
                    };
                    let body = self.kept.take();
                    let stored = self.stored(body);
                    self.finishing = Some(Box::pin(claim.complete(stored)));
                    continue;
                }
                Poll::Ready(Some(Err(_))) => {
                    if let Some(claim) = self.claim.take() {
                        let stored = self.stored(None);
                        tokio::spawn(claim.complete(stored));
                    }
                }
                Poll::Pending => {}
            }
            return polled;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.claim.is_none() && self.finishing.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Reads a body to its end, appending to `kept` while it stays within `max_bytes`; the whole
/// body, or `None` if it was too large or broke.
async fn read_rest(mut body: Body, mut kept: Option<Vec<u8>>, max_bytes: usize) -> Option<Vec<u8>> {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return None;
        };
        if let (Some(buffer), Some(data)) = (kept.as_mut(), frame.data_ref()) {
            if buffer.len() + data.len() <= max_bytes {
                buffer.extend_from_slice(data);
            } else {
                // Dropping the body lets the proxy finish metering it on its own.
                return None;
            }
        }
    }
    kept
}

impl Drop for RecordingBody {
    fn drop(&mut self) {
        // The client left while the outcome was being recorded: finish recording it.
        if let Some(finishing) = self.finishing.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(finishing);
            }
        }
        // The client left before the end (a client-side timeout, typically, before its
        // retry). The request runs on: the rest of the response is read, for at most the hold
        // TTL, so the retry can get it; one over the size limit or cut short is recorded as
        // done but not replayable.
        let Some(claim) = self.claim.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let rest = std::mem::replace(&mut self.inner, Body::empty());
        let (kept, keep) = (self.kept.take(), self.keep);
        let mut stored = self.stored(None);
        runtime.spawn(async move {
            let read = tokio::time::timeout(keep.drain_for, read_rest(rest, kept, keep.max_bytes));
            stored.body = read.await.ok().flatten();
            claim.complete(stored).await;
        });
    }
}

/// Marks a response that shows a secret: the idempotency layer never keeps such a body, since
/// Tollgate stores no plaintext secret anywhere.
#[derive(Debug, Clone, Copy)]
pub struct CarriesSecret;
