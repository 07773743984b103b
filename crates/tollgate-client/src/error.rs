//! Every way a call can fail, with what the server said about it.
//!
//! Tollgate's own errors carry `X-Tollgate-Error: <code>`; each code of the catalogue
//! (`docs/errors.md`) has its [`ErrorKind`] variant with the details typed. A code this version
//! does not know yet is [`ErrorKind::Unknown`], and an error answered by the API behind Tollgate
//! (no `X-Tollgate-Error`) is [`ErrorKind::Upstream`], its body untouched.

use crate::rate_limit::RateLimit;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::HeaderMap;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use tollgate_core::ErrorCode;
use tollgate_wire::api::Money;

/// What went wrong. Match on it; `#[non_exhaustive]` because the catalogue grows.
///
/// Details the route's error profile does not carry (the `openai` and `anthropic` profiles send
/// none) are `None` or empty.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ErrorKind {
    BadRequest,
    ValidationError {
        /// Each invalid field and what is wrong with it.
        field_errors: BTreeMap<String, Vec<String>>,
    },
    /// A URL given for Tollgate to call points inside the network.
    SsrfBlocked {
        reason: Option<String>,
    },
    InvalidApiKey,
    KeyRevoked {
        revoked_at: Option<DateTime<Utc>>,
    },
    KeyExpired {
        expired_at: Option<DateTime<Utc>>,
    },
    KeyInactive,
    InsufficientBalance {
        required: Option<Money>,
        balance: Option<Money>,
    },
    AccountInDebt {
        debt: Option<Money>,
    },
    KeyQuotaExceeded {
        required: Option<Money>,
        remaining: Option<Money>,
        cap: Option<Money>,
        spent: Option<Money>,
        held: Option<Money>,
    },
    /// The plan's included units for a meter are used up (overage `block`).
    AllowanceExhausted {
        meter: Option<String>,
        window: Option<String>,
        limit: Option<u64>,
        used: Option<u64>,
        held: Option<u64>,
        resets_at: Option<DateTime<Utc>>,
    },
    /// The account's subscription no longer lets calls through.
    SubscriptionLapsed {
        status: Option<String>,
        since: Option<DateTime<Utc>>,
    },
    InsufficientScope {
        required_scope: Option<String>,
    },
    ModelNotAllowed {
        model: Option<String>,
        allowed_models: Vec<String>,
    },
    IpNotAllowed {
        client_ip: Option<String>,
    },
    KeyLimitReached {
        limit: Option<u64>,
    },
    EndpointLimitReached {
        limit: Option<u64>,
    },
    Forbidden,
    NotFound,
    MethodNotAllowed {
        allowed: Vec<String>,
    },
    ModelNotFound {
        model: Option<String>,
        available_models: Vec<String>,
    },
    /// Also what a retry of a call whose answer showed a secret gets: Tollgate never keeps a
    /// secret, so it cannot replay it (`original_request_id` is the call that ran).
    Conflict {
        original_request_id: Option<String>,
    },
    AlreadyRevoked {
        revoked_at: Option<DateTime<Utc>>,
    },
    IdempotencyInProgress {
        original_request_id: Option<String>,
    },
    PayloadTooLarge {
        limit_bytes: Option<u64>,
    },
    UriTooLong,
    HeadersTooLarge {
        limit_bytes: Option<u64>,
    },
    UnprocessableEntity,
    IdempotencyKeyMismatch,
    RateLimited {
        policy: Option<String>,
        /// `key`, `account`, `route`, `key+route`, `ip` or `global`.
        scope: Option<String>,
        /// `requests`, `tokens` or `cost`.
        unit: Option<String>,
        limit: Option<u64>,
        window: Option<Duration>,
        retry_after: Option<Duration>,
    },
    Overloaded {
        retry_after: Option<Duration>,
    },
    InternalError,
    UpstreamError,
    ServiceUnavailable {
        /// What is down: `store`, `limiter`, `cluster`, `payments`, ...
        dependency: Option<String>,
        retry_after: Option<Duration>,
    },
    UpstreamTimeout,
    /// A code this version of the client does not know; [`Error::details`] has its details.
    Unknown {
        code: String,
    },
    /// The API behind Tollgate answered with an error of its own, passed through as it was.
    Upstream {
        body: Bytes,
    },
    /// No connection could be made.
    Connect,
    /// No answer (or no whole answer) within the timeout.
    Timeout,
    /// The connection failed after it was made (reset, closed mid-answer).
    Transport,
    /// The answer was not what the API documents (a body that does not parse).
    Decode,
    /// The call could not be built (a bad base URL, a body that does not serialise).
    Builder,
}

macro_rules! codes {
    ($( $code:ident => $variant:ident $({ $($field:ident),* })? ; )*) => {
        impl ErrorKind {
            /// The variant for a catalogue `code`, its fields read from `parts`.
            fn from_wire(code: &str, parts: &Parts<'_>) -> ErrorKind {
                match code {
                    $( stringify!($code) => ErrorKind::$variant $({ $(
                        $field: Field::read(stringify!($field), parts),
                    )* })?, )*
                    other => ErrorKind::Unknown { code: other.to_string() },
                }
            }

            /// The catalogue code, for Tollgate's own errors.
            pub fn code(&self) -> Option<&str> {
                match self {
                    $( ErrorKind::$variant { .. } => Some(stringify!($code)), )*
                    ErrorKind::Unknown { code } => Some(code),
                    _ => None,
                }
            }
        }
    };
}

codes! {
    bad_request => BadRequest;
    validation_error => ValidationError { field_errors };
    ssrf_blocked => SsrfBlocked { reason };
    invalid_api_key => InvalidApiKey;
    key_revoked => KeyRevoked { revoked_at };
    key_expired => KeyExpired { expired_at };
    key_inactive => KeyInactive;
    insufficient_balance => InsufficientBalance { required, balance };
    account_in_debt => AccountInDebt { debt };
    key_quota_exceeded => KeyQuotaExceeded { required, remaining, cap, spent, held };
    allowance_exhausted => AllowanceExhausted { meter, window, limit, used, held, resets_at };
    subscription_lapsed => SubscriptionLapsed { status, since };
    insufficient_scope => InsufficientScope { required_scope };
    model_not_allowed => ModelNotAllowed { model, allowed_models };
    ip_not_allowed => IpNotAllowed { client_ip };
    key_limit_reached => KeyLimitReached { limit };
    endpoint_limit_reached => EndpointLimitReached { limit };
    forbidden => Forbidden;
    not_found => NotFound;
    method_not_allowed => MethodNotAllowed { allowed };
    model_not_found => ModelNotFound { model, available_models };
    conflict => Conflict { original_request_id };
    already_revoked => AlreadyRevoked { revoked_at };
    idempotency_in_progress => IdempotencyInProgress { original_request_id };
    payload_too_large => PayloadTooLarge { limit_bytes };
    uri_too_long => UriTooLong;
    headers_too_large => HeadersTooLarge { limit_bytes };
    unprocessable_entity => UnprocessableEntity;
    idempotency_key_mismatch => IdempotencyKeyMismatch;
    rate_limited => RateLimited { policy, scope, unit, limit, window, retry_after };
    overloaded => Overloaded { retry_after };
    internal_error => InternalError;
    upstream_error => UpstreamError;
    service_unavailable => ServiceUnavailable { dependency, retry_after };
    upstream_timeout => UpstreamTimeout;
}

/// What a variant's fields are read from: the envelope's `details` and `field_errors`, and the
/// wait the server asked for.
struct Parts<'a> {
    details: &'a Map<String, Value>,
    field_errors: &'a BTreeMap<String, Vec<String>>,
    retry_after: Option<Duration>,
}

/// How a variant's field is read: by its name from `details`, except `field_errors`, `window`
/// (`details.window_seconds`) and `retry_after` (the server's wait).
trait Field: Sized {
    fn read(name: &str, parts: &Parts<'_>) -> Self;
}

fn detail<T: DeserializeOwned>(name: &str, details: &Map<String, Value>) -> Option<T> {
    details
        .get(name)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// Plain details, read by their own name.
macro_rules! plain_field {
    ($($t:ty),*) => {$(
        impl Field for Option<$t> {
            fn read(name: &str, parts: &Parts<'_>) -> Self {
                detail(name, parts.details)
            }
        }
    )*};
}

plain_field!(String, u64, Money, DateTime<Utc>);

impl Field for Vec<String> {
    fn read(name: &str, parts: &Parts<'_>) -> Self {
        detail(name, parts.details).unwrap_or_default()
    }
}

impl Field for BTreeMap<String, Vec<String>> {
    fn read(_: &str, parts: &Parts<'_>) -> Self {
        parts.field_errors.clone()
    }
}

/// `window` and `retry_after`, the two durations.
impl Field for Option<Duration> {
    fn read(name: &str, parts: &Parts<'_>) -> Self {
        match name {
            "window" => detail::<f64>("window_seconds", parts.details)
                .and_then(|s| Duration::try_from_secs_f64(s).ok()),
            _ => parts.retry_after,
        }
    }
}

/// A failed call: what went wrong ([`Error::kind`]) and what the server said about it.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    status: Option<u16>,
    message: String,
    request_id: Option<String>,
    retryable: bool,
    retry_after: Option<Duration>,
    details: Map<String, Value>,
    rate_limit: Option<RateLimit>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// A failure of the call itself (connect, timeout, decode, build), with no answer.
    pub(crate) fn local(
        kind: ErrorKind,
        message: impl Into<String>,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        let retryable = matches!(
            kind,
            ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Transport
        );
        Error {
            inner: Box::new(Inner {
                kind,
                status: None,
                message: message.into(),
                request_id: None,
                retryable,
                retry_after: None,
                details: Map::new(),
                rate_limit: None,
                source,
            }),
        }
    }

    pub(crate) fn from_reqwest(e: reqwest::Error) -> Error {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_connect() {
            ErrorKind::Connect
        } else if e.is_builder() {
            ErrorKind::Builder
        } else {
            // reqwest calls a body cut off a decode error; no body is decoded by reqwest here
            // (JSON is read by this crate), so every other failure is the connection's.
            ErrorKind::Transport
        };
        let message = e.to_string();
        Error::local(kind, message, Some(Box::new(e)))
    }

    /// The error an answer of `status` with `headers` and `body` stands for.
    pub(crate) fn from_answer(
        status: u16,
        headers: &HeaderMap,
        body: Bytes,
        retry_after: Option<Duration>,
    ) -> Error {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let rate_limit = RateLimit::from_headers(headers);
        let should_retry = header("x-should-retry").and_then(|v| match v.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        });
        let Some(code) = header("x-tollgate-error") else {
            let message = String::from_utf8_lossy(&body).trim().to_string();
            return Error {
                inner: Box::new(Inner {
                    kind: ErrorKind::Upstream { body },
                    status: Some(status),
                    message,
                    request_id: header("x-request-id"),
                    retryable: should_retry.unwrap_or_else(|| retryable_status(status)),
                    retry_after,
                    details: Map::new(),
                    rate_limit,
                    source: None,
                }),
            };
        };
        let envelope = Envelope::read(&body);
        let retryable = should_retry.unwrap_or_else(|| {
            ErrorCode::ALL
                .iter()
                .find(|c| c.as_str() == code)
                .map_or_else(|| retryable_status(status), |c| c.info().retryable)
        });
        let retry_after = retry_after
            .or_else(|| detail::<u64>("retry_after_s", &envelope.details).map(Duration::from_secs));
        let mut kind = ErrorKind::from_wire(
            &code,
            &Parts {
                details: &envelope.details,
                field_errors: &envelope.field_errors,
                retry_after,
            },
        );
        if let ErrorKind::MethodNotAllowed { allowed } = &mut kind {
            // The management API's router adds `Allow` after its handler has answered, so only
            // the header names the methods there.
            if allowed.is_empty() {
                *allowed = header("allow")
                    .map(|list| list.split(',').map(|m| m.trim().to_string()).collect())
                    .unwrap_or_default();
            }
        }
        Error {
            inner: Box::new(Inner {
                kind,
                status: Some(status),
                message: envelope
                    .message
                    .unwrap_or_else(|| format!("the server answered {status} {code}")),
                request_id: header("x-request-id").or(envelope.request_id),
                retryable,
                retry_after,
                details: envelope.details,
                rate_limit,
                source: None,
            }),
        }
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.inner.kind
    }

    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        self.inner.status
    }

    /// The catalogue code, for Tollgate's own errors.
    pub fn code(&self) -> Option<&str> {
        self.inner.kind.code()
    }

    /// A sentence for humans (in the language asked for); match on [`Error::kind`], never this.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// The request's ID (`X-Request-Id`): quote it when asking the operator about a call.
    pub fn request_id(&self) -> Option<&str> {
        self.inner.request_id.as_deref()
    }

    /// Whether the same call may succeed if sent again: the server's `x-should-retry` if it
    /// said, else the catalogue's word for the code, else the status (408, 429, 5xx), and for
    /// a call with no answer, whether it failed in connecting, in time or in transport.
    pub fn is_retryable(&self) -> bool {
        self.inner.retryable
    }

    /// How long the server asked to wait before a retry (`retry-after-ms` or `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// The envelope's `details`, as sent (also for codes this client does not know).
    pub fn details(&self) -> &Map<String, Value> {
        &self.inner.details
    }

    /// The rate-limit headers the error came with.
    pub fn rate_limit(&self) -> Option<&RateLimit> {
        self.inner.rate_limit.as_ref()
    }
}

/// 408, 429 and every 5xx may succeed later.
pub(crate) fn retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.inner.status, self.code()) {
            (Some(status), Some(code)) => write!(f, "{status} {code}: {}", self.inner.message)?,
            (Some(status), None) => {
                write!(f, "{status} from the upstream: {}", self.inner.message)?
            }
            (None, _) => write!(f, "{:?}: {}", self.inner.kind, self.inner.message)?,
        }
        if let Some(id) = &self.inner.request_id {
            write!(f, " (request {id})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("status", &self.inner.status)
            .field("message", &self.inner.message)
            .field("request_id", &self.inner.request_id)
            .field("retryable", &self.inner.retryable)
            .field("retry_after", &self.inner.retry_after)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The parts of an error body Tollgate renders, read from any profile: `native`
/// (`{"error":{code,message,request_id,details,field_errors}}`), `problem` (RFC 9457:
/// `{detail,details,request_id,field_errors}`), `openai` (`{"error":{message}}`) and
/// `anthropic` (`{"error":{message},"request_id"}`). The code comes from `X-Tollgate-Error`,
/// which every profile sends.
#[derive(Default)]
struct Envelope {
    message: Option<String>,
    request_id: Option<String>,
    details: Map<String, Value>,
    field_errors: BTreeMap<String, Vec<String>>,
}

impl Envelope {
    fn read(body: &[u8]) -> Envelope {
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
            return Envelope::default();
        };
        let inner = match body.get("error") {
            Some(Value::Object(error)) => error,
            _ => &body,
        };
        let text = |object: &Map<String, Value>, name: &str| {
            object.get(name).and_then(Value::as_str).map(str::to_string)
        };
        Envelope {
            message: text(inner, "message").or_else(|| text(&body, "detail")),
            request_id: text(inner, "request_id").or_else(|| text(&body, "request_id")),
            details: match inner.get("details") {
                Some(Value::Object(details)) => details.clone(),
                _ => Map::new(),
            },
            field_errors: inner
                .get("field_errors")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tollgate_core::{ApiError, RequestId};
    use tollgate_wire::{render_error, ErrorProfile};

    fn answer(code: ErrorCode, profile: ErrorProfile, details: &[(&str, Value)]) -> Error {
        let mut err = ApiError::new(code, "what happened");
        for (name, value) in details {
            err = err.with_detail(name, value.clone());
        }
        let rendered = render_error(profile, &err, &RequestId::new());
        let mut headers = HeaderMap::new();
        headers.insert("x-tollgate-error", code.as_str().parse().unwrap());
        headers.insert("x-request-id", "req_1".parse().unwrap());
        Error::from_answer(
            code.info().status,
            &headers,
            Bytes::from(rendered.body.to_string()),
            None,
        )
    }

    /// Fails as soon as the catalogue gains a code without its variant here.
    #[test]
    fn every_catalogue_code_has_its_own_variant() {
        for code in ErrorCode::ALL {
            for profile in ErrorProfile::ALL {
                let err = answer(*code, profile, &[]);
                assert!(
                    !matches!(err.kind(), ErrorKind::Unknown { .. }),
                    "{code} has no variant in tollgate-client's ErrorKind"
                );
                assert_eq!(err.code(), Some(code.as_str()));
                assert_eq!(err.status(), Some(code.info().status));
                assert_eq!(err.is_retryable(), code.info().retryable, "{code}");
                assert_eq!(err.message(), "what happened", "{code} in {profile:?}");
            }
        }
    }

    #[test]
    fn details_are_typed_in_the_profiles_that_carry_them() {
        let money = |nanos: i64| {
            serde_json::to_value(Money::new(tollgate_core::Nanos(nanos), "USD")).unwrap()
        };
        for profile in [ErrorProfile::Native, ErrorProfile::Problem] {
            let err = answer(
                ErrorCode::InsufficientBalance,
                profile,
                &[("required", money(2_000)), ("balance", money(1_000))],
            );
            assert_eq!(
                err.kind(),
                &ErrorKind::InsufficientBalance {
                    required: Some(Money::new(tollgate_core::Nanos(2_000), "USD")),
                    balance: Some(Money::new(tollgate_core::Nanos(1_000), "USD")),
                }
            );
            let err = answer(
                ErrorCode::RateLimited,
                profile,
                &[
                    ("policy", "per-key".into()),
                    ("window_seconds", 60.0.into()),
                    ("retry_after_s", 7.into()),
                ],
            );
            match err.kind() {
                ErrorKind::RateLimited {
                    policy,
                    window,
                    retry_after,
                    ..
                } => {
                    assert_eq!(policy.as_deref(), Some("per-key"));
                    assert_eq!(*window, Some(Duration::from_secs(60)));
                    assert_eq!(*retry_after, Some(Duration::from_secs(7)));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        }
    }

    #[test]
    fn an_answer_without_the_tollgate_header_is_the_upstreams_own() {
        let body =
            Bytes::from_static(br#"{"error":{"code":"not_found","message":"no such thing"}}"#);
        let err = Error::from_answer(404, &HeaderMap::new(), body.clone(), None);
        assert_eq!(err.kind(), &ErrorKind::Upstream { body });
        assert_eq!(err.code(), None);
        assert!(!err.is_retryable());
        let err = Error::from_answer(503, &HeaderMap::new(), Bytes::new(), None);
        assert!(err.is_retryable());
    }

    #[test]
    fn x_should_retry_overrides_the_catalogue() {
        let mut headers = HeaderMap::new();
        headers.insert("x-tollgate-error", "internal_error".parse().unwrap());
        headers.insert("x-should-retry", "false".parse().unwrap());
        assert!(!Error::from_answer(500, &headers, Bytes::new(), None).is_retryable());
        headers.insert("x-tollgate-error", "conflict".parse().unwrap());
        headers.insert("x-should-retry", "true".parse().unwrap());
        assert!(Error::from_answer(409, &headers, Bytes::new(), None).is_retryable());
    }

    #[test]
    fn display_carries_the_request_id() {
        let err = answer(ErrorCode::NotFound, ErrorProfile::Native, &[]);
        assert_eq!(
            err.to_string(),
            "404 not_found: what happened (request req_1)"
        );
        let unknown = {
            let mut headers = HeaderMap::new();
            headers.insert("x-tollgate-error", "plan_exhausted".parse().unwrap());
            Error::from_answer(
                402,
                &headers,
                Bytes::from_static(br#"{"error":{"message":"m","details":{"meter":"calls"}}}"#),
                None,
            )
        };
        assert_eq!(
            unknown.kind(),
            &ErrorKind::Unknown {
                code: "plan_exhausted".into()
            }
        );
        assert_eq!(unknown.details()["meter"], "calls");
        assert!(!unknown.is_retryable());
    }
}
