//! Verifying a webhook signed by the Standard Webhooks scheme (standardwebhooks.com): the
//! signature is `v1,` and the base64 HMAC-SHA256, keyed by the secret's base64 after `whsec_`,
//! of `{webhook-id}.{webhook-timestamp}.{body}`. `webhook-signature` may list several,
//! space-separated (after a secret is rotated, one per secret); one that matches is enough.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a delivery was refused. Answer it with a 4xx; never act on its body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("the secret is not `whsec_` and base64")]
    BadSecret,
    #[error("the {0} header is missing or not text")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error(
        "the timestamp is more than the tolerance away from now (a replay, or a skewed clock)"
    )]
    OutsideTolerance,
    #[error("no v1 signature matches")]
    NoMatch,
}

/// Verifies deliveries signed with one secret.
#[derive(Clone)]
pub struct WebhookVerifier {
    key: Vec<u8>,
    tolerance: Duration,
}

impl std::fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookVerifier")
            .field("tolerance", &self.tolerance)
            .finish_non_exhaustive()
    }
}

impl WebhookVerifier {
    /// A verifier for `secret` (`whsec_<base64>`) that accepts timestamps within five minutes
    /// of now either way.
    pub fn new(secret: &str) -> Result<WebhookVerifier, WebhookError> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| WebhookError::BadSecret)?;
        if key.is_empty() {
            return Err(WebhookError::BadSecret);
        }
        Ok(WebhookVerifier {
            key,
            tolerance: Duration::from_secs(300),
        })
    }

    pub fn tolerance(mut self, tolerance: Duration) -> WebhookVerifier {
        self.tolerance = tolerance;
        self
    }

    /// Checks a delivery's `webhook-id`, `webhook-timestamp` and `webhook-signature` headers
    /// against its raw body (the bytes as received, before any parsing), now.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), WebhookError> {
        let header = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or(WebhookError::MissingHeader(name))
        };
        self.verify_at(
            header("webhook-id")?,
            header("webhook-timestamp")?,
            header("webhook-signature")?,
            body,
            SystemTime::now(),
        )
    }

    /// [`WebhookVerifier::verify`] with the header values given, at `now`.
    pub fn verify_at(
        &self,
        id: &str,
        timestamp: &str,
        signatures: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), WebhookError> {
        let seconds: u64 = timestamp
            .trim()
            .parse()
            .map_err(|_| WebhookError::BadTimestamp)?;
        let sent = UNIX_EPOCH + Duration::from_secs(seconds);
        let skew = now
            .duration_since(sent)
            .or_else(|_| sent.duration_since(now))
            .unwrap_or(Duration::MAX);
        if skew > self.tolerance {
            return Err(WebhookError::OutsideTolerance);
        }
        let mac = self.mac(id, timestamp.trim(), body)?;
        let matches = signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            // An empty signature is not compared: it can never be a MAC.
            .filter(|s| !s.is_empty())
            .filter_map(|s| STANDARD.decode(s).ok())
            .any(|signature| mac.clone().verify_slice(&signature).is_ok());
        if matches {
            Ok(())
        } else {
            Err(WebhookError::NoMatch)
        }
    }

    /// The `v1,<base64>` signature of a delivery (what a sender puts in `webhook-signature`).
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> Result<String, WebhookError> {
        let mac = self.mac(id, &timestamp.to_string(), body)?;
        Ok(format!(
            "v1,{}",
            STANDARD.encode(mac.finalize().into_bytes())
        ))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Result<Hmac<Sha256>, WebhookError> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).map_err(|_| WebhookError::BadSecret)?;
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        Ok(mac)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // The Standard Webhooks specification's published test vector.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: u64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// Tollgate's signer (in `tollgate-core`) and this verifier are written apart: each checks
    /// the other, across a rotation.
    #[test]
    fn what_tollgate_signs_this_verifies_with_either_secret_of_a_rotation() {
        use tollgate_core::webhook::{signature_header, WebhookSecret};
        let old = WebhookSecret::parse(SECRET).unwrap();
        let new = WebhookSecret::generate();
        let header = signature_header(&[&new, &old], "msg_1", TIMESTAMP as i64, b"{\"a\":1}");
        let ts = TIMESTAMP.to_string();
        for secret in [new.expose(), old.expose()] {
            let verifier = WebhookVerifier::new(&secret).unwrap();
            let verified = verifier.verify_at("msg_1", &ts, &header, b"{\"a\":1}", at(TIMESTAMP));
            assert_eq!(verified, Ok(()));
            let tampered = verifier.verify_at("msg_1", &ts, &header, b"{\"a\":2}", at(TIMESTAMP));
            assert_eq!(tampered, Err(WebhookError::NoMatch));
        }
    }

    #[test]
    fn the_specifications_test_vector_signs_and_verifies() {
        let verifier = WebhookVerifier::new(SECRET).unwrap();
        assert_eq!(verifier.sign(ID, TIMESTAMP, BODY).unwrap(), SIGNATURE);
        let ts = TIMESTAMP.to_string();
        assert_eq!(
            verifier.verify_at(ID, &ts, SIGNATURE, BODY, at(TIMESTAMP)),
            Ok(())
        );
        // One good signature among others (a rotation) is enough.
        let listed = format!("v1,bm9wZQ== {SIGNATURE} v2,abc");
        assert_eq!(
            verifier.verify_at(ID, &ts, &listed, BODY, at(TIMESTAMP + 60)),
            Ok(())
        );
    }

    #[test]
    fn anything_changed_is_refused() {
        let verifier = WebhookVerifier::new(SECRET).unwrap();
        let ts = TIMESTAMP.to_string();
        let now = at(TIMESTAMP);
        let refused = |id: &str, ts: &str, sig: &str, body: &[u8], now| {
            verifier.verify_at(id, ts, sig, body, now).unwrap_err()
        };
        assert_eq!(
            refused(ID, &ts, SIGNATURE, br#"{"test": 2432232315}"#, now),
            WebhookError::NoMatch
        );
        assert_eq!(
            refused("msg_other", &ts, SIGNATURE, BODY, now),
            WebhookError::NoMatch
        );
        assert_eq!(
            refused(ID, &ts, "v1,", BODY, now),
            WebhookError::NoMatch,
            "an empty v1, is refused"
        );
        assert_eq!(refused(ID, &ts, "", BODY, now), WebhookError::NoMatch);
        assert_eq!(
            refused(ID, &ts, &SIGNATURE.replace("v1,", "v2,"), BODY, now),
            WebhookError::NoMatch,
            "only v1 is a scheme this verifier knows"
        );
        assert_eq!(
            refused(ID, "soon", SIGNATURE, BODY, now),
            WebhookError::BadTimestamp
        );
        assert_eq!(
            refused(ID, &ts, SIGNATURE, BODY, at(TIMESTAMP + 301)),
            WebhookError::OutsideTolerance
        );
        assert_eq!(
            refused(ID, &ts, SIGNATURE, BODY, at(TIMESTAMP - 301)),
            WebhookError::OutsideTolerance
        );
        let other = WebhookVerifier::new("whsec_c2VjcmV0").unwrap();
        assert_eq!(
            other.verify_at(ID, &ts, SIGNATURE, BODY, now),
            Err(WebhookError::NoMatch)
        );
        assert_eq!(
            WebhookVerifier::new("whsec_!!").unwrap_err(),
            WebhookError::BadSecret
        );
        assert_eq!(
            WebhookVerifier::new("whsec_").unwrap_err(),
            WebhookError::BadSecret
        );
    }

    #[test]
    fn headers_are_read_by_their_standard_names() {
        let verifier = WebhookVerifier::new(SECRET)
            .unwrap()
            .tolerance(Duration::MAX);
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", ID.parse().unwrap());
        headers.insert("webhook-timestamp", TIMESTAMP.to_string().parse().unwrap());
        assert_eq!(
            verifier.verify(&headers, BODY),
            Err(WebhookError::MissingHeader("webhook-signature"))
        );
        headers.insert("webhook-signature", SIGNATURE.parse().unwrap());
        assert_eq!(verifier.verify(&headers, BODY), Ok(()));
    }
}
