//! Console sessions: a random id in one cookie, its SHA-256 in the store (so every node knows it
//! and a copy of the store signs no one in). A session ends at sign-out, after the configured
//! idle and absolute timeouts, and at its next request once the key it was made with is revoked,
//! inactive or expired, or its account suspended.

use crate::http::error::HttpError;
use crate::management::extract::Caller;
use crate::state::AppState;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use tollgate_core::access::is_trusted_proxy;
use tollgate_core::{AccountId, KeyStatus};
use tollgate_store::{KeyRecord, SessionRecord, StoreError};

/// The cookie's name where the browser holds it to the strictest rules (`__Host-`: `Secure`, no
/// `Domain`, `Path=/`).
const HOST_COOKIE: &str = "__Host-tollgate_session";
/// The name over plain HTTP to a host that is not this machine, where `Secure` cannot be set.
const PLAIN_COOKIE: &str = "tollgate_session";
/// A session's `last_seen_at` is written at most this often.
const TOUCH_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Who a session signed in.
#[derive(Debug, Clone)]
pub enum Who {
    Operator,
    /// An account holder, by one of the account's master keys.
    Holder {
        key: Arc<KeyRecord>,
    },
}

impl Who {
    /// The management API's caller this session acts as, so a page's change is the API's.
    pub fn caller(&self) -> Caller {
        match self {
            Who::Operator => Caller::Admin,
            Who::Holder { key } => Caller::Key(key.clone()),
        }
    }

    pub fn account(&self) -> Option<AccountId> {
        match self {
            Who::Operator => None,
            Who::Holder { key } => Some(key.account_id),
        }
    }
}

/// A live session.
#[derive(Debug, Clone)]
pub struct Session {
    pub id_hash: [u8; 32],
    pub who: Who,
}

impl Session {
    pub fn caller(&self) -> Caller {
        self.who.caller()
    }
}

/// A new session's secret (for the cookie) and its record (for the store).
pub fn new_session(key: Option<&KeyRecord>, now: DateTime<Utc>) -> (String, SessionRecord) {
    let secret: [u8; 32] = rand::random();
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let record = SessionRecord {
        id_hash: hash(&secret),
        key: key.map(|k| k.id),
        created_at: now,
        last_seen_at: now,
    };
    (secret, record)
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether the browser will keep a `Secure` cookie from this request: the request came over
/// HTTPS (a trusted proxy says so), or to this machine, which browsers treat as secure.
fn secure(state: &AppState, headers: &HeaderMap, extensions: &http::Extensions) -> bool {
    let from_trusted_proxy =
        extensions
            .get::<ConnectInfo<SocketAddr>>()
            .is_some_and(|ConnectInfo(peer)| {
                is_trusted_proxy(peer.ip(), &state.config.trusted_proxies)
            });
    let behind_tls = from_trusted_proxy
        && headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    behind_tls || matches!(host_name(host), "localhost" | "127.0.0.1" | "[::1]")
}

/// A `Host` header's name, without its port: `[::1]:8080` and `[::1]` are both `[::1]`.
fn host_name(host: &str) -> &str {
    match host.find(']') {
        Some(end) => &host[..=end],
        None => host.split_once(':').map_or(host, |(name, _)| name),
    }
}

/// The `Set-Cookie` value that gives the browser `secret`, or (`None`) clears the cookie.
pub fn cookie(
    state: &AppState,
    headers: &HeaderMap,
    extensions: &http::Extensions,
    secret: Option<&str>,
) -> HeaderValue {
    let (name, secure) = if secure(state, headers, extensions) {
        (HOST_COOKIE, "; Secure")
    } else {
        (PLAIN_COOKIE, "")
    };
    let value = match secret {
        Some(secret) => format!("{name}={secret}; Path=/; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The session secret the request's cookie carries, under either name.
fn presented(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == HOST_COOKIE || *name == PLAIN_COOKIE)
        .map(|(_, value)| value)
        .filter(|value| value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The request's live session, if it has one. A session past a timeout, or whose key may no
/// longer be used, is ended here.
pub async fn current(state: &AppState, headers: &HeaderMap) -> Result<Option<Session>, StoreError> {
    let Some(secret) = presented(headers) else {
        return Ok(None);
    };
    let id_hash = hash(secret);
    let Some(record) = state.store.session(&id_hash).await? else {
        return Ok(None);
    };
    let now = state.clock.now();
    let settings = state.config.console;
    let idle = now - record.last_seen_at;
    let age = now - record.created_at;
    let timed_out = idle.to_std().is_ok_and(|d| d >= settings.idle_timeout)
        || age.to_std().is_ok_and(|d| d >= settings.absolute_timeout);
    let who = match record.key {
        None => Some(Who::Operator),
        Some(id) => usable_key(state, id, now)
            .await?
            .map(|key| Who::Holder { key }),
    };
    let Some(who) = who.filter(|_| !timed_out) else {
        state.store.end_session(&id_hash).await?;
        return Ok(None);
    };
    if now - record.last_seen_at >= TOUCH_EVERY {
        state.store.touch_session(&id_hash, now).await?;
    }
    Ok(Some(Session { id_hash, who }))
}

/// The master key a session was made with, if it may still be used: not revoked, inactive or
/// expired, and its account not suspended.
async fn usable_key(
    state: &AppState,
    id: tollgate_core::KeyId,
    now: DateTime<Utc>,
) -> Result<Option<Arc<KeyRecord>>, StoreError> {
    let Some(key) = state.store.key_by_id(id).await? else {
        return Ok(None);
    };
    let expired = key.expires_at.is_some_and(|at| at <= now);
    if key.status != KeyStatus::Active || expired {
        return Ok(None);
    }
    let account = state.store.account(key.account_id).await?;
    if account.is_none_or(|a| a.status != "active") {
        return Ok(None);
    }
    Ok(Some(Arc::new(key)))
}

/// The signed-in account holder's session, or the answer for anyone else: the overview (which
/// is the sign-in page without a session) for no session and for the operator, whose pages
/// these are not.
pub async fn holder(state: &AppState, headers: &HeaderMap) -> Result<Session, Response> {
    match current(state, headers).await {
        Ok(Some(session)) if matches!(session.who, Who::Holder { .. }) => Ok(session),
        Ok(_) => Err(Redirect::to("/console/").into_response()),
        Err(e) => Err(HttpError::from(e).into_response()),
    }
}

/// The signed-in account holder's account, or the answer for anyone else, as [`holder`].
pub async fn holder_account(state: &AppState, headers: &HeaderMap) -> Result<AccountId, Response> {
    let session = holder(state, headers).await?;
    session
        .who
        .account()
        .ok_or_else(|| HttpError::not_found("account").into_response())
}

/// The operator's session, or the answer for anyone else: the overview for no session, and for
/// an account holder a 404, as for a page that does not exist.
pub async fn operator(state: &AppState, headers: &HeaderMap) -> Result<Session, Response> {
    match current(state, headers).await {
        Ok(Some(session)) if matches!(session.who, Who::Operator) => Ok(session),
        Ok(Some(_)) => Err(HttpError::not_found("page").into_response()),
        Ok(None) => Err(Redirect::to("/console/").into_response()),
        Err(e) => Err(HttpError::from(e).into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_named_without_its_port() {
        for (host, name) in [
            ("127.0.0.1:8080", "127.0.0.1"),
            ("localhost", "localhost"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("api.example.com:443", "api.example.com"),
        ] {
            assert_eq!(host_name(host), name, "{host}");
        }
    }
}
