//! What every management handler reads from a request: the caller, a bounded JSON body, an id,
//! a page of a list; and the checks of the fields they write.

use crate::access::keys::Identity;
use crate::access::limits::{self, Estimate, LimitSlot, Standings};
use crate::http::body::read_error;
use crate::http::error::validation;
use crate::http::error::{FieldErrors, HttpError};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, OriginalUri, Path, Query, Request};
use axum::http::request::Parts;
use chrono::{DurationRound, TimeDelta};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::Arc;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::{AccountId, ApiError, ErrorCode, KeyKind, Nanos};
use tollgate_store::KeyRecord;

/// Who is calling the management API.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The operator, with the admin token.
    Admin,
    Key(Arc<KeyRecord>),
}

impl Caller {
    /// Passes for the admin and master keys; usage keys may not manage anything (403 `forbidden`).
    pub fn require_master_or_admin(&self) -> Result<(), HttpError> {
        match self {
            Caller::Key(key) if key.kind == KeyKind::Usage => Err(HttpError::new(
                ErrorCode::Forbidden,
                "Usage keys cannot manage anything. Use a master key or the admin token.",
            )),
            _ => Ok(()),
        }
    }

    pub fn require_admin(&self) -> Result<(), HttpError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Key(_) => Err(HttpError::new(
                ErrorCode::Forbidden,
                "This operation needs the admin token.",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, HttpError> {
        let slot = parts.extensions.get::<LimitSlot>();
        match state.identify(&parts.headers, &parts.extensions).await? {
            Identity::Admin => {
                if let Some(slot) = slot {
                    slot.set(Standings::Exempt);
                }
                Ok(Caller::Admin)
            }
            Identity::Key(key) => {
                let demands = limits::demands_for(&state.config, None, &key, Estimate::default());
                state.admit(slot, &demands).await?;
                Ok(Caller::Key(key.record))
            }
        }
    }
}

/// The largest management request body read.
const MAX_BODY_BYTES: usize = 1024 * 1024;

const MAX_NAME_CHARS: usize = 200;

const MAX_ALLOWED_IPS: usize = 100;

/// Unknown paths and methods under the API prefix. (A nested router sees the path without the
/// prefix; `OriginalUri` gives the path the client sent.)
pub async fn not_found(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> HttpError {
    HttpError::new(
        ErrorCode::NotFound,
        format!("No route for {method} {}.", uri.path()),
    )
}

/// A path the API serves, with a method it does not: 405, and the router adds `Allow`.
pub async fn method_not_allowed(
    method: axum::http::Method,
    OriginalUri(uri): OriginalUri,
) -> HttpError {
    HttpError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{method} is not served by {}; the Allow header lists the methods it serves.",
            uri.path()
        ),
    )
}

pub(crate) fn caller_owns(caller: &Caller, account: AccountId) -> bool {
    match caller {
        Caller::Admin => true,
        Caller::Key(key) => key.account_id == account,
    }
}

pub(crate) fn parse_id<T>(
    path: Result<Path<String>, PathRejection>,
    parse: fn(&str) -> Option<T>,
    what: &str,
) -> Result<T, HttpError> {
    path.ok()
        .and_then(|Path(text)| parse(&text))
        .ok_or_else(|| HttpError::not_found(what))
}

/// The management API's own field checks, beside the generic ones in `http::error`.
impl FieldErrors {
    /// A trimmed, non-empty name of bounded length.
    pub(crate) fn name(&mut self, field: &str, value: &str) -> String {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            self.add(field, "must not be empty");
        } else if trimmed.chars().count() > MAX_NAME_CHARS {
            self.add(
                field,
                format!("must be at most {MAX_NAME_CHARS} characters"),
            );
        } else if trimmed.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
        trimmed.to_string()
    }

    /// Rate-limit overrides for a key or (`for_account`) an account, each checked against the
    /// configured policies.
    pub(crate) fn rate_limits(
        &mut self,
        state: &AppState,
        set: Overrides,
        for_account: bool,
    ) -> Overrides {
        for (field, message) in limits::check_overrides(&state.config, &set, for_account) {
            self.add(&field, message);
        }
        set
    }

    /// CIDRs for a key's allowlist, each checked.
    pub(crate) fn allowed_ips(&mut self, list: &[String]) -> Vec<IpNet> {
        if list.len() > MAX_ALLOWED_IPS {
            self.add("allowed_ips", format!("at most {MAX_ALLOWED_IPS} entries"));
        }
        list.iter()
            .filter_map(|text| {
                crate::config::parse_cidr(text)
                    .map_err(|m| self.add("allowed_ips", m))
                    .ok()
            })
            .collect()
    }

    /// A key's expiry: in the future, kept to milliseconds (what stores keep), so the key reads
    /// back exactly as written.
    pub(crate) fn expiry(
        &mut self,
        state: &AppState,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let at = at.map(|t| t.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(t));
        if at.is_some_and(|at| at <= state.clock.now()) {
            self.add("expires_at", "must be in the future");
        }
        at
    }

    pub(crate) fn spend_cap(&mut self, text: Option<&str>) -> Option<Nanos> {
        text.and_then(|text| {
            Nanos::parse_amount(text)
                .map_err(|e| self.add("monthly_spend_cap", e.to_string()))
                .ok()
        })
    }
}

/// A request body of at most 1 MiB (else 413 `payload_too_large`), parsed as JSON by
/// [`JsonBody::parse`] once the handler has authorised the caller, so that a caller who may not
/// call an endpoint learns that first. The content type is not checked: `curl -d` works as typed.
pub struct JsonBody(Bytes);

impl JsonBody {
    /// No body at all. (Whitespace alone is not JSON: it is refused like any malformed body.)
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// JSON `null`.
    pub fn is_null(&self) -> bool {
        self.0.trim_ascii() == b"null"
    }

    /// Malformed JSON → 400 `bad_request`; the wrong shape → 400 `validation_error` naming the
    /// field.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        parse_json(&self.0)
    }
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = HttpError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, HttpError> {
        let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|e| read_error(&e, MAX_BODY_BYTES as u64))?;
        Ok(JsonBody(bytes))
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, HttpError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::new(
            ErrorCode::BadRequest,
            "The request body is empty; send a JSON object.",
        ));
    }
    // serde would also read a struct from a JSON array; the API takes objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(ApiError::validation(BTreeMap::from([(
            "body".to_string(),
            vec!["must be a JSON object".to_string()],
        )]))
        .into());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let error = match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(value) => match deserializer.end() {
            Ok(()) => return Ok(value),
            Err(e) => {
                return Err(HttpError::new(
                    ErrorCode::BadRequest,
                    format!("Malformed JSON: {e}."),
                ))
            }
        },
        Err(e) => e,
    };
    let path = error.path().to_string();
    let inner = error.into_inner();
    if !inner.is_data() {
        return Err(HttpError::new(
            ErrorCode::BadRequest,
            format!("Malformed JSON: {inner}."),
        ));
    }
    let message = inner.to_string();
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or_default()
        .to_string();
    // serde reports a missing field at its parent; name the field itself.
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    let field = match (path.as_str(), missing) {
        (".", Some(name)) => name.to_string(),
        (".", None) => "body".to_string(),
        (path, Some(name)) => format!("{path}.{name}"),
        (path, None) => path.to_string(),
    };
    Err(ApiError::validation(BTreeMap::from([(field, vec![message])])).into())
}

const DEFAULT_PAGE: u32 = 50;

pub(crate) const MAX_PAGE: u32 = 500;

/// The query string's values, or a `validation_error` naming the parameter and what it takes
/// (not the parser's own words, such as "premature end of input").
pub(crate) fn parse_query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, HttpError> {
    query.map(|Query(q)| q).map_err(|e| {
        let text = e.body_text();
        let problem = text
            .strip_prefix("Failed to deserialize query string: ")
            .unwrap_or(&text);
        let typed = problem
            .split_once(": ")
            .and_then(|(field, _)| Some((field, expected_in_query(field)?)));
        match typed {
            Some((field, expected)) => validation(field, expected),
            None => HttpError::new(
                ErrorCode::BadRequest,
                format!("Bad query string: {problem}."),
            ),
        }
    })
}

/// What each typed query parameter of the API takes.
fn expected_in_query(field: &str) -> Option<&'static str> {
    Some(match field {
        "from" | "to" => "must be an RFC 3339 instant, e.g. 2026-12-01T00:00:00Z",
        "status" => "must be an HTTP status code, 100 to 599",
        "limit" => "must be a whole number, 1 to 500",
        _ => return None,
    })
}

pub(crate) fn page_limit(limit: Option<u32>) -> Result<u32, HttpError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(validation(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        )),
    }
}

/// A page from `limit + 1` rows read: the first `limit`, and the cursor of the last one if more
/// rows follow.
pub(crate) fn page<T>(
    mut rows: Vec<T>,
    limit: u32,
    cursor: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    if rows.len() <= limit as usize {
        return (rows, None);
    }
    rows.truncate(limit as usize);
    let next = rows.last().map(cursor);
    (rows, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use tollgate_wire::api::CreateKeyRequest;

    fn outcome(json: &str) -> String {
        match parse_json::<CreateKeyRequest>(&Bytes::copy_from_slice(json.as_bytes())) {
            Ok(_) => "ok".into(),
            Err(e) => format!(
                "{} {} {:?}",
                e.error.code, e.error.message, e.error.field_errors
            ),
        }
    }

    #[test]
    fn json_errors_are_classified() {
        expect![[r#"
            ok
            bad_request The request body is empty; send a JSON object. {}
            bad_request Malformed JSON: EOF while parsing an object at line 1 column 1. {}
            bad_request Malformed JSON: trailing characters at line 1 column 14. {}
            validation_error 1 invalid field: name: missing field `name`. {"name": ["missing field `name`"]}
            validation_error 1 invalid field: nmae: unknown field `nmae`, expected one of `name`, `account_id`, `kind`, `scopes`, `allowed_ips`, `expires_at`, `monthly_spend_cap`. {"nmae": ["unknown field `nmae`, expected one of `name`, `account_id`, `kind`, `scopes`, `allowed_ips`, `expires_at`, `monthly_spend_cap`"]}
            validation_error 1 invalid field: name: invalid type: integer `5`, expected a string. {"name": ["invalid type: integer `5`, expected a string"]}
            validation_error 1 invalid field: scopes[1]: invalid type: integer `1`, expected a string. {"scopes[1]": ["invalid type: integer `1`, expected a string"]}
            validation_error 1 invalid field: kind: unknown variant `root`, expected `master` or `usage`. {"kind": ["unknown variant `root`, expected `master` or `usage`"]}
            validation_error 1 invalid field: body: must be a JSON object. {"body": ["must be a JSON object"]}
        "#]]
        .assert_eq(
            &[
                r#"{"name":"ok"}"#,
                "  ",
                "{",
                r#"{"name":"a"} {}"#,
                "{}",
                r#"{"nmae":"a"}"#,
                r#"{"name":5}"#,
                r#"{"name":"a","scopes":["x",1]}"#,
                r#"{"name":"a","kind":"root"}"#,
                "[]",
            ]
            .iter()
            .map(|j| outcome(j) + "\n")
            .collect::<String>(),
        );
    }
}
