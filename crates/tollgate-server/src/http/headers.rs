//! Header rules every room shares: Tollgate's own header names, the request-ID extensions, the
//! credential a request presents, the client's address, hop-by-hop headers and path escapes.
//! Nothing here holds state or knows a route.

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

pub const TOLLGATE_ERROR: HeaderName = HeaderName::from_static("x-tollgate-error");
/// Something the caller should know about a call that passed (a subscription past due, an
/// allowance exceeded under `soft` overage).
pub const TOLLGATE_WARNING: HeaderName = HeaderName::from_static("x-tollgate-warning");
pub const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// Anthropic's SDKs read the request ID from this header.
pub const ANTHROPIC_REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// A client-sent request ID, kept for the logs (and later the usage log) but never trusted.
#[derive(Debug, Clone)]
pub struct ClientRequestId(pub String);

/// The request ID already formatted as a header value, so it is formatted once per request.
#[derive(Debug, Clone)]
pub struct RequestIdHeader(pub HeaderValue);

/// What in a request path could let it reach outside its route's prefix once an upstream (or a
/// proxy between) decodes and normalises it: a `.` or `..` segment, raw or percent-encoded, an
/// encoded slash or backslash, or an encoded NUL. `None` for a path that is safe to forward as it is.
pub(crate) fn path_escape(path: &str) -> Option<&'static str> {
    // Runs on every proxied request: bytes compared in place, nothing allocated.
    let bytes = path.as_bytes();
    let encoded = |i: usize, code: &[u8; 2]| {
        bytes.get(i) == Some(&b'%')
            && bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.eq_ignore_ascii_case(code))
    };
    for i in 0..bytes.len() {
        if encoded(i, b"2f") || encoded(i, b"5c") {
            return Some("an encoded slash ('%2F' or '%5C')");
        }
        if encoded(i, b"00") {
            return Some("an encoded NUL ('%00')");
        }
    }
    // A segment of one or two dots, each raw or `%2e`.
    let dot_segment = path.split('/').any(|segment| {
        let mut rest = segment.as_bytes();
        let mut dots = 0;
        while !rest.is_empty() {
            if rest[0] == b'.' {
                rest = &rest[1..];
            } else if rest.len() >= 3 && rest[0] == b'%' && rest[1..3].eq_ignore_ascii_case(b"2e") {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    });
    dot_segment.then_some("a dot-segment ('.' or '..', or '%2E%2E')")
}

/// Headers meaningful for one connection only (RFC 9110 §7.6.1); never forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The credential a request presents: `Authorization: Bearer <secret>` or `X-Api-Key: <secret>`.
pub fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let bearer = header(http::header::AUTHORIZATION.as_str()).and_then(|value| {
        let (scheme, secret) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| secret.trim())
    });
    bearer
        .or_else(|| header("x-api-key"))
        .filter(|secret| !secret.is_empty())
}

/// The client's address: the socket peer, or what `X-Forwarded-For` says when the peer is a
/// configured trusted proxy. `None` only when the connection's address is unknown.
pub fn client_ip(
    trusted_proxies: &[IpNet],
    headers: &HeaderMap,
    extensions: &http::Extensions,
) -> Option<IpAddr> {
    let ConnectInfo(peer) = extensions.get::<ConnectInfo<SocketAddr>>()?;
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    Some(tollgate_core::access::client_ip(
        peer.ip(),
        forwarded,
        trusted_proxies,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_bearer_or_x_api_key() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, http::HeaderValue::from_static(value));
            }
            map
        };
        assert_eq!(
            presented_secret(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            presented_secret(&headers(&[("authorization", "bearer  abc ")])),
            Some("abc")
        );
        assert_eq!(
            presented_secret(&headers(&[("x-api-key", "abc")])),
            Some("abc")
        );
        assert_eq!(
            presented_secret(&headers(&[
                ("authorization", "Basic xyz"),
                ("x-api-key", "abc")
            ])),
            Some("abc")
        );
        assert_eq!(
            presented_secret(&headers(&[("authorization", "Basic xyz")])),
            None
        );
        assert_eq!(presented_secret(&headers(&[("x-api-key", " ")])), None);
        assert_eq!(presented_secret(&headers(&[])), None);
    }
}
