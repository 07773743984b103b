//! What every console response carries, and the refusal of a state change from another site.
//!
//! The pages load nothing but the console's own files: no inline script or style, no frame. A form
//! posted from another origin is refused before it reaches a handler (403 `forbidden`); the
//! session cookie is `SameSite=Strict` as well, so a cross-site request carries no session.

use crate::http::error::HttpError;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tollgate_core::ErrorCode;

/// Only the console's own scripts, stylesheets, requests and forms, none of them inline; nothing
/// may frame it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

pub async fn layer(request: Request, next: Next) -> Response {
    let changes_state = !matches!(*request.method(), Method::GET | Method::HEAD);
    let mut response = if changes_state && from_another_site(request.headers()) {
        HttpError::new(
            ErrorCode::Forbidden,
            "The console accepts changes only from its own pages.",
        )
        .into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    // A page that sends a form elsewhere (the wallet, to the payment page) sets its own policy,
    // this one with that origin added.
    if !headers.contains_key("content-security-policy") {
        headers.insert(
            "content-security-policy",
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
    }
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A browser names the site a request comes from in `Sec-Fetch-Site`; one that does not is
/// judged by `Origin` against `Host`. A request with neither (not a browser's form) passes: it
/// carries no ambient session, as the cookie is `SameSite=Strict`.
fn from_another_site(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            origin_host != host
        }
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_change_from_another_site_is_told_apart_from_one_from_the_console() {
        assert!(!from_another_site(&headers(&[(
            "sec-fetch-site",
            "same-origin"
        )])));
        assert!(!from_another_site(&headers(&[("sec-fetch-site", "none")])));
        assert!(from_another_site(&headers(&[(
            "sec-fetch-site",
            "cross-site"
        )])));
        assert!(from_another_site(&headers(&[(
            "sec-fetch-site",
            "same-site"
        )])));
        assert!(!from_another_site(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(from_another_site(&headers(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(from_another_site(&headers(&[("origin", "null")])));
        assert!(!from_another_site(&headers(&[])));
    }
}
