//! The error catalogue: every error Tollgate originates, in one table.
//!
//! Status, type, retryability, who is at fault and the advice in `docs/errors.md` all come from
//! [`ErrorCode::info`]. Codes are stable across versions: clients match on them.

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Who caused a failure. It decides whether a retry can help and is shown in the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// The request itself is wrong; the same request will fail again.
    Caller,
    /// The caller's state (balance, limits) stops it now; it may succeed later.
    Quota,
    /// The upstream API failed or was unreachable.
    Upstream,
    /// Tollgate or one of its dependencies failed.
    Tollgate,
}

/// One row of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub status: u16,
    /// The envelope's `type`, shared with the OpenAI and Anthropic error vocabularies.
    pub kind: &'static str,
    pub fault: Fault,
    /// Whether the same request may succeed if retried (drives `x-should-retry`).
    pub retryable: bool,
    pub meaning: &'static str,
    pub action: &'static str,
}

macro_rules! catalogue {
    ($( $variant:ident = $code:literal, $status:literal, $kind:literal, $fault:ident, $retryable:literal,
        $meaning:literal, $action:literal; )*) => {
        /// Every error code Tollgate can answer with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $( $variant, )* }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            pub const fn info(self) -> ErrorInfo {
                match self {
                    $( ErrorCode::$variant => ErrorInfo {
                        code: ErrorCode::$variant,
                        status: $status,
                        kind: $kind,
                        fault: Fault::$fault,
                        retryable: $retryable,
                        meaning: $meaning,
                        action: $action,
                    }, )*
                }
            }

            pub const fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $code, )* }
            }
        }
    };
}

catalogue! {
    BadRequest = "bad_request", 400, "invalid_request_error", Caller, false,
        "The request could not be read: malformed JSON, a bad header or query string.",
        "Fix the request; the message names what is wrong.";
    ValidationError = "validation_error", 400, "invalid_request_error", Caller, false,
        "The request was readable but some fields are missing or invalid.",
        "Fix the fields listed in `field_errors`.";
    SsrfBlocked = "ssrf_blocked", 400, "invalid_request_error", Caller, false,
        "The URL points inside the network (loopback, private, link-local and the like), or its host resolves there, or its scheme is not allowed.",
        "Use a public `https://` URL; `details.reason` says what was refused. An operator can allow private ranges for receivers on its own network.";
    InvalidApiKey = "invalid_api_key", 401, "authentication_error", Caller, false,
        "No API key was sent, or it is malformed or unknown.",
        "Send a valid key as `Authorization: Bearer <key>` or `X-Api-Key: <key>`.";
    KeyRevoked = "key_revoked", 401, "authentication_error", Caller, false,
        "The API key has been revoked.",
        "Use another key, or create a new one with a master key.";
    KeyExpired = "key_expired", 401, "authentication_error", Caller, false,
        "The API key is past its expiry time.",
        "Use another key, or give this one a later `expires_at` with a master key (`PATCH /keys/{id}`); rolling a key keeps its expiry.";
    KeyInactive = "key_inactive", 401, "authentication_error", Caller, false,
        "The API key is deactivated.",
        "Reactivate it with a master key, or use another key.";
    InsufficientBalance = "insufficient_balance", 402, "billing_error", Quota, false,
        "The wallet cannot cover the worst-case cost of this request.",
        "Top up the wallet; `details` give the required amount and the balance.";
    AccountInDebt = "account_in_debt", 402, "billing_error", Quota, false,
        "A refund or a dispute took back credit the account had already spent; it owes the rest.",
        "Top up: new credit pays the debt (`details.debt`) first, then paid calls resume.";
    KeyQuotaExceeded = "key_quota_exceeded", 402, "billing_error", Quota, false,
        "The key has reached its monthly spend cap.",
        "Raise the key's cap, wait for the next calendar month (UTC), or use another key.";
    AllowanceExhausted = "allowance_exhausted", 402, "billing_error", Quota, false,
        "The plan's included units for this meter are used up (or held by calls in progress) and its overage rule is `block`.",
        "Wait for `details.resets_at`, buy a credit pack, or move to a plan with more; `details` give the meter, window, limit, used and held.";
    SubscriptionLapsed = "subscription_lapsed", 402, "billing_error", Quota, false,
        "The account's subscription is unpaid or canceled, or past due beyond its grace period.",
        "Pay the open invoice or renew the subscription; `details` give its status and since when.";
    InsufficientScope = "insufficient_scope", 403, "permission_error", Caller, false,
        "The key is valid but its scopes do not include this route group.",
        "Use a key whose scopes include `details.required_scope`.";
    ModelNotAllowed = "model_not_allowed", 403, "permission_error", Caller, false,
        "The key's scopes do not include the requested model.",
        "Use an allowed model or a key scoped to this one.";
    IpNotAllowed = "ip_not_allowed", 403, "permission_error", Caller, false,
        "The key's IP allowlist does not include the caller's address.",
        "Call from an allowed address or widen the key's allowlist.";
    KeyLimitReached = "key_limit_reached", 403, "permission_error", Quota, false,
        "The account already holds the maximum number of keys.",
        "Revoke unused keys or ask the operator to raise the limit.";
    EndpointLimitReached = "endpoint_limit_reached", 403, "permission_error", Quota, false,
        "The account already has the maximum number of webhook endpoints.",
        "Delete an endpoint it no longer needs, or ask the operator to raise the limit.";
    Forbidden = "forbidden", 403, "permission_error", Caller, false,
        "The caller may not perform this operation.",
        "Use a master key or the admin token, as the operation requires.";
    NotFound = "not_found", 404, "not_found_error", Caller, false,
        "No such route or resource (or it belongs to another account).",
        "Check the path and id.";
    MethodNotAllowed = "method_not_allowed", 405, "invalid_request_error", Caller, false,
        "The path exists but does not serve this method.",
        "Use one of the methods in the `Allow` header.";
    ModelNotFound = "model_not_found", 404, "not_found_error", Caller, false,
        "The route does not serve the requested model.",
        "Use one of the models listed in `details.available_models`.";
    Conflict = "conflict", 409, "conflict_error", Caller, false,
        "The request conflicts with the resource's current state.",
        "Read the resource again and retry with a request that fits its state.";
    AlreadyRevoked = "already_revoked", 409, "conflict_error", Caller, false,
        "The key was already revoked.",
        "Nothing to do: the key stays revoked.";
    IdempotencyInProgress = "idempotency_in_progress", 409, "conflict_error", Quota, true,
        "A request with this Idempotency-Key is still being processed.",
        "Retry after `Retry-After` seconds to receive its stored outcome.";
    PayloadTooLarge = "payload_too_large", 413, "request_too_large", Caller, false,
        "The request body is larger than the configured limit.",
        "Send a smaller body; `details.limit_bytes` gives the limit.";
    UriTooLong = "uri_too_long", 414, "request_too_large", Caller, false,
        "The request's URI is longer than Tollgate reads.",
        "Send a shorter URI; move long parameters into the body.";
    HeadersTooLarge = "headers_too_large", 431, "request_too_large", Caller, false,
        "The request's head (request line and headers) is larger than the configured limit, or has more than 100 headers.",
        "Send fewer or smaller headers (large cookies are the usual cause); `details.limit_bytes` gives the limit.";
    UnprocessableEntity = "unprocessable_entity", 422, "invalid_request_error", Caller, false,
        "The request is well-formed but cannot be carried out as asked.",
        "Change the request as the message says.";
    IdempotencyKeyMismatch = "idempotency_key_mismatch", 422, "invalid_request_error", Caller, false,
        "This Idempotency-Key was used for a different request (method, path or body).",
        "Use a fresh Idempotency-Key for a different request.";
    RateLimited = "rate_limited", 429, "rate_limit_error", Quota, true,
        "A rate-limit policy was exceeded.",
        "Retry after `Retry-After` seconds; `details.policy` names the policy.";
    Overloaded = "overloaded", 429, "overloaded_error", Tollgate, true,
        "The node is saturated and shed this request before doing any work.",
        "Retry after `Retry-After` seconds, with backoff.";
    InternalError = "internal_error", 500, "api_error", Tollgate, true,
        "Tollgate failed unexpectedly. Nothing was charged.",
        "Retry with backoff; report the request ID if it persists.";
    UpstreamError = "upstream_error", 502, "api_error", Upstream, true,
        "The upstream API was unreachable or broke the connection. Nothing was charged.",
        "Retry with backoff.";
    ServiceUnavailable = "service_unavailable", 503, "api_error", Tollgate, true,
        "A dependency Tollgate needs (`details.dependency`) is down. Nothing was charged.",
        "Retry after `Retry-After` seconds.";
    UpstreamTimeout = "upstream_timeout", 504, "api_error", Upstream, true,
        "The upstream API did not answer in time. Nothing was charged.",
        "Retry with backoff, or raise the route's timeout.";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// An error Tollgate originates, before it is rendered in a route's error profile.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Map<String, Value>,
    /// Field → messages; only on `validation_error`.
    pub field_errors: BTreeMap<String, Vec<String>>,
    /// Seconds, sent as `Retry-After`.
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            details: Map::new(),
            field_errors: BTreeMap::new(),
            retry_after_s: None,
        }
    }

    pub fn with_detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self.details
            .insert("retry_after_s".to_string(), seconds.into());
        self
    }

    /// A `validation_error` listing every invalid field, in `field_errors` and in the message
    /// (so profiles without `field_errors`, OpenAI's and Anthropic's, still say what is wrong).
    pub fn validation(field_errors: BTreeMap<String, Vec<String>>) -> Self {
        let count = field_errors.len();
        let problems: Vec<String> = field_errors
            .iter()
            .map(|(field, messages)| format!("{field}: {}", messages.join(", ")))
            .collect();
        let mut err = ApiError::new(
            ErrorCode::ValidationError,
            format!(
                "{count} invalid field{}: {}.",
                if count == 1 { "" } else { "s" },
                problems.join("; ")
            ),
        );
        err.field_errors = field_errors;
        err
    }

    pub fn status(&self) -> u16 {
        self.code.info().status
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The catalogue as Markdown: `docs/errors.md` is this text, checked by a test.
pub fn catalogue_markdown() -> String {
    let mut out = String::from(
        "# Error catalogue\n\n\
         <!-- Generated from crates/tollgate-core/src/error.rs; a test keeps this file in step. \
         Regenerate with `UPDATE_EXPECT=1 cargo test -p tollgate-wire`. -->\n\n\
         Every error Tollgate itself originates carries the header `X-Tollgate-Error: <code>` and the \
         error envelope in the route's profile (see [Profiles](#profiles) below). Errors passed \
         through from the upstream keep the upstream's own status and body.\n\n\
         `code` is stable across versions: match on it, not on `message`. \
         **Retryable** says whether the same request may succeed later; where it is `no`, the \
         response carries `x-should-retry: false`. 429 and 503 carry `Retry-After`. \
         **Charged** is always `no`: a request that fails with any of these is never charged.\n\n\
         | status | code | type | fault | retryable | charged | meaning | what to do |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for code in ErrorCode::ALL {
        let i = code.info();
        let fault = match i.fault {
            Fault::Caller => "caller",
            Fault::Quota => "quota",
            Fault::Upstream => "upstream",
            Fault::Tollgate => "tollgate",
        };
        out.push_str(&format!(
            "| {} | `{}` | `{}` | {} | {} | no | {} | {} |\n",
            i.status,
            i.code,
            i.kind,
            fault,
            if i.retryable { "yes" } else { "no" },
            i.meaning,
            i.action
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_and_snake_case() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert!(code
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert_eq!(code.info().code, *code);
        }
    }

    #[test]
    fn status_classes_match_retryability() {
        for code in ErrorCode::ALL {
            let i = code.info();
            if i.status >= 500 || i.status == 429 {
                assert!(i.retryable, "{code} is {} but not retryable", i.status);
            }
            if matches!(i.fault, Fault::Caller) {
                assert!(
                    !i.retryable,
                    "{code} is the caller's fault but marked retryable"
                );
            }
        }
    }

    #[test]
    fn validation_lists_fields() {
        let mut fields = BTreeMap::new();
        fields.insert("name".to_string(), vec!["must not be empty".to_string()]);
        fields.insert(
            "scopes[1]".to_string(),
            vec!["must be a string".to_string(), "is unknown".to_string()],
        );
        let err = ApiError::validation(fields);
        assert_eq!(err.code, ErrorCode::ValidationError);
        assert_eq!(
            err.message,
            "2 invalid fields: name: must not be empty; scopes[1]: must be a string, is unknown."
        );
    }
}
