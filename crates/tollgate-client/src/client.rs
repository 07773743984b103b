//! The client, and the one loop every call goes through: an idempotency key minted once,
//! attempts, waits, the retry budget, and the answer read into a [`Response`] or an [`Error`].

use crate::error::{Error, ErrorKind};
use crate::rate_limit::RateLimit;
use crate::retry::{
    server_wait, Clock, Jitter, RandomJitter, RetryBudget, RetryPolicy, SystemClock, Wait,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A client of one Tollgate, calling with one credential. Cheap to clone: clones share the
/// connection pool, the retry budget and the pacing state.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    credential: Option<HeaderValue>,
    language: Option<HeaderValue>,
    retry: RetryPolicy,
    budget: RetryBudget,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Jitter>,
    timeout: Duration,
    pacing: bool,
    page_size: Option<u32>,
    /// In pacing mode: until when the last answer said nothing is left.
    paced_until: Mutex<Option<SystemTime>>,
}

/// Sets a [`Client`] up; [`Client::builder`] starts one.
pub struct ClientBuilder {
    base_url: String,
    credential: Option<String>,
    language: Option<String>,
    retry: RetryPolicy,
    budget: RetryBudget,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Jitter>,
    timeout: Duration,
    connect_timeout: Duration,
    pacing: bool,
    page_size: Option<u32>,
}

impl ClientBuilder {
    /// The admin token, or an API key (a master key manages its own account).
    pub fn credential(mut self, credential: impl Into<String>) -> Self {
        self.credential = Some(credential.into());
        self
    }

    /// Retries after the first attempt; 0 turns retrying off. Default 2.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.retry.max_retries = retries;
        self
    }

    /// The whole retry policy.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The budget retries draw on (default: 10 tokens, a tenth back per success).
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// How long one attempt may take to its answer's head (for a JSON answer, to its end).
    /// Default 60 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a connection may take to open. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// `Accept-Language` for error messages (`de`, `zh-Hans`, ...).
    pub fn language(mut self, language: impl Into<String>) -> Self {
        self.language = Some(language.into());
        self
    }

    /// Waits for a rate limit to reset before sending, instead of taking a 429, whenever the
    /// last answer said nothing is left (the wait is bounded by the policy's
    /// `max_retry_after`).
    pub fn pacing(mut self, on: bool) -> Self {
        self.pacing = on;
        self
    }

    /// How many items each page of a listing asks for (the server's default if unset).
    pub fn page_size(mut self, size: u32) -> Self {
        self.page_size = Some(size);
        self
    }

    /// The clock for waits and HTTP dates (tests replace it to run without waiting).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The randomness of backoff (tests replace it to assert exact delays).
    pub fn jitter(mut self, jitter: Arc<dyn Jitter>) -> Self {
        self.jitter = jitter;
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        let header = |value: String, what: &str| {
            HeaderValue::try_from(value).map_err(|_| {
                Error::local(
                    ErrorKind::Builder,
                    format!("the {what} is not a valid header value"),
                    None,
                )
            })
        };
        let base = self.base_url.trim_end_matches('/').to_string();
        reqwest::Url::parse(&base).map_err(|e| {
            Error::local(
                ErrorKind::Builder,
                format!("{base:?} is not a URL: {e}"),
                Some(Box::new(e)),
            )
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            // A redirect would resend a credential elsewhere; Tollgate never redirects.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(Error::from_reqwest)?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                credential: self
                    .credential
                    .map(|c| header(format!("Bearer {c}"), "credential"))
                    .transpose()?,
                language: self.language.map(|l| header(l, "language")).transpose()?,
                retry: self.retry,
                budget: self.budget,
                clock: self.clock,
                jitter: self.jitter,
                timeout: self.timeout,
                pacing: self.pacing,
                page_size: self.page_size,
                paced_until: Mutex::new(None),
            }),
        })
    }
}

/// What every answer tells besides its body.
#[derive(Debug, Clone)]
pub struct Meta {
    pub status: u16,
    /// `X-Request-Id`.
    pub request_id: Option<String>,
    /// `Idempotent-Replayed: true`: the answer is the stored one of an earlier attempt (or an
    /// earlier call with the same key), which ran, and was charged, once.
    pub replayed: bool,
    pub rate_limit: Option<RateLimit>,
    /// How many attempts the call took.
    pub attempts: u32,
    pub headers: HeaderMap,
}

impl Meta {
    fn read(status: u16, headers: HeaderMap, attempts: u32) -> Meta {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Meta {
            status,
            request_id: text("x-request-id").map(str::to_string),
            replayed: text("idempotent-replayed") == Some("true"),
            rate_limit: RateLimit::from_headers(&headers),
            attempts,
            headers,
        }
    }
}

/// A successful answer: the value (which it dereferences to) and its [`Meta`].
#[derive(Debug, Clone)]
pub struct Response<T> {
    pub value: T,
    pub meta: Meta,
}

impl<T> Response<T> {
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> Deref for Response<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

/// One call, as the retry loop sends it.
pub(crate) struct Call {
    pub method: Method,
    /// From the server's root (`/api/v1/keys?limit=10`).
    pub path: String,
    pub body: Option<Bytes>,
    pub headers: HeaderMap,
}

impl Call {
    pub fn new(method: Method, path: impl Into<String>) -> Call {
        Call {
            method,
            path: path.into(),
            body: None,
            headers: HeaderMap::new(),
        }
    }

    pub fn json(mut self, body: &impl Serialize) -> Result<Call, Error> {
        let bytes = serde_json::to_vec(body).map_err(|e| {
            Error::local(
                ErrorKind::Builder,
                format!("the body does not serialise: {e}"),
                Some(Box::new(e)),
            )
        })?;
        self.body = Some(Bytes::from(bytes));
        self.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(self)
    }
}

/// An answer whose head has arrived: its body either read whole or still to come.
pub(crate) struct Answer {
    pub meta: Meta,
    pub body: AnswerBody,
}

pub(crate) enum AnswerBody {
    Whole(Bytes),
    Live(reqwest::Response),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.debug_struct("Client")
            .field("base", &self.inner.base)
            .field("retry", &self.inner.retry)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the Tollgate at `base_url` (`http://127.0.0.1:8080`) calling with
    /// `credential` (the admin token or an API key), with the default retry policy.
    pub fn new(
        base_url: impl Into<String>,
        credential: impl Into<String>,
    ) -> Result<Client, Error> {
        Client::builder(base_url).credential(credential).build()
    }

    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            credential: None,
            language: None,
            retry: RetryPolicy::default(),
            budget: RetryBudget::default(),
            clock: Arc::new(SystemClock),
            jitter: Arc::new(RandomJitter),
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            pacing: false,
            page_size: None,
        }
    }

    /// Sends `call` until it succeeds, fails for good or runs out of retries. A POST or PATCH
    /// carries one `Idempotency-Key` (the caller's, or one minted here) on every attempt, with
    /// the same body, so a retry of a call that ran gets its stored answer and is never charged
    /// twice. With `whole`, an attempt lasts until its body is read (so a body cut off is
    /// retried too); without, until its head (a stream is never retried once it has begun).
    pub(crate) async fn send(&self, mut call: Call, whole: bool) -> Result<Answer, Error> {
        let inner = &self.inner;
        if matches!(call.method, Method::POST | Method::PATCH)
            && !call.headers.contains_key(IDEMPOTENCY_KEY)
        {
            let key = format!("tgc_{:032x}", rand::random::<u128>());
            if let Ok(value) = HeaderValue::try_from(key) {
                call.headers.insert(IDEMPOTENCY_KEY, value);
            }
        }
        // A call with a key, or one HTTP defines as idempotent, may be repeated after it was
        // (perhaps) received; any call may be repeated when it never connected.
        let repeatable = call.headers.contains_key(IDEMPOTENCY_KEY)
            || matches!(
                call.method,
                Method::GET | Method::HEAD | Method::PUT | Method::DELETE
            );
        let mut retries = 0;
        loop {
            self.pace().await;
            let outcome = self.attempt(&call, whole, retries + 1).await;
            let error = match outcome {
                Ok(answer) => {
                    inner.budget.succeeded();
                    return Ok(answer);
                }
                Err(error) => error,
            };
            let mendable =
                error.is_retryable() && (repeatable || matches!(error.kind(), ErrorKind::Connect));
            // Every mendable failure draws on the budget, the last attempt's too.
            if !mendable || !inner.budget.failed() || retries >= inner.retry.max_retries {
                return Err(error);
            }
            match inner
                .retry
                .wait(retries, error.retry_after(), inner.jitter.draw())
            {
                Wait::TooLong(_) => return Err(error),
                Wait::Retry(wait) => inner.clock.sleep(wait).await,
            }
            retries += 1;
        }
    }

    async fn attempt(&self, call: &Call, whole: bool, attempts: u32) -> Result<Answer, Error> {
        let inner = &self.inner;
        let url = format!("{}{}", inner.base, call.path);
        let mut request = inner
            .http
            .request(call.method.clone(), &url)
            .headers(call.headers.clone());
        if let Some(credential) = &inner.credential {
            request = request.header(http::header::AUTHORIZATION, credential.clone());
        }
        if let Some(language) = &inner.language {
            request = request.header(http::header::ACCEPT_LANGUAGE, language.clone());
        }
        if let Some(body) = &call.body {
            request = request.body(body.clone());
        }
        let timed_out = || {
            Error::local(
                ErrorKind::Timeout,
                format!("no answer from {url} within {:?}", inner.timeout),
                None,
            )
        };
        let deadline = tokio::time::Instant::now() + inner.timeout;
        let response = tokio::time::timeout_at(deadline, request.send())
            .await
            .map_err(|_| timed_out())?
            .map_err(Error::from_reqwest)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        self.remember(&headers);
        if response.status().is_success() && !whole {
            return Ok(Answer {
                meta: Meta::read(status, headers, attempts),
                body: AnswerBody::Live(response),
            });
        }
        let body = tokio::time::timeout_at(deadline, response.bytes())
            .await
            .map_err(|_| timed_out())?
            .map_err(Error::from_reqwest)?;
        if (200..300).contains(&status) {
            return Ok(Answer {
                meta: Meta::read(status, headers, attempts),
                body: AnswerBody::Whole(body),
            });
        }
        let wait = server_wait(&headers, inner.clock.now());
        Err(Error::from_answer(status, &headers, body, wait))
    }

    pub(crate) fn page_size(&self) -> Option<u32> {
        self.inner.page_size
    }

    fn remember(&self, headers: &HeaderMap) {
        if !self.inner.pacing {
            return;
        }
        let now = self.inner.clock.now();
        let wait = RateLimit::from_headers(headers).map_or(Duration::ZERO, |l| l.wait_at(now));
        *self.paced_until() = (!wait.is_zero()).then(|| now + wait);
    }

    fn paced_until(&self) -> std::sync::MutexGuard<'_, Option<SystemTime>> {
        self.inner
            .paced_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// In pacing mode, waits out a rate limit the last answer said was used up.
    async fn pace(&self) {
        let until = *self.paced_until();
        let Some(until) = until else { return };
        let wait = until
            .duration_since(self.inner.clock.now())
            .unwrap_or_default();
        if !wait.is_zero() {
            self.inner
                .clock
                .sleep(wait.min(self.inner.retry.max_retry_after))
                .await;
        }
    }

    /// A call whose answer is JSON of type `T`.
    /// A call whose whole answer is read within the retry loop.
    pub(crate) async fn send_whole(&self, call: Call) -> Result<Response<Bytes>, Error> {
        let answer = self.send(call, true).await?;
        let value = match answer.body {
            AnswerBody::Whole(body) => body,
            AnswerBody::Live(response) => response.bytes().await.map_err(Error::from_reqwest)?,
        };
        Ok(Response {
            value,
            meta: answer.meta,
        })
    }

    pub(crate) async fn json<T: DeserializeOwned>(&self, call: Call) -> Result<Response<T>, Error> {
        let Response { value: body, meta } = self.send_whole(call).await?;
        let value = serde_json::from_slice(&body).map_err(|e| {
            Error::local(
                ErrorKind::Decode,
                format!("the answer is not the JSON the API documents: {e}"),
                Some(Box::new(e)),
            )
        })?;
        Ok(Response { value, meta })
    }

    /// Any management call, its answer as JSON: for what has no typed method yet.
    /// `path` is under `/api/v1` (`/keys`, `/usage?group_by=day`).
    pub async fn call_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response<serde_json::Value>, Error> {
        let mut call = Call::new(method, format!("/api/v1{path}"));
        if let Some(body) = body {
            call = call.json(body)?;
        }
        self.json(call).await
    }
}
