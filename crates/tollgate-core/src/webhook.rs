//! Signing webhook deliveries by the Standard Webhooks scheme (standardwebhooks.com): each
//! delivery carries `webhook-id` (the event's, the same on every retry), `webhook-timestamp`
//! (Unix seconds of this attempt) and `webhook-signature`: `v1,` and the base64 HMAC-SHA256,
//! keyed by the secret's bytes (the base64 after `whsec_`), of `{id}.{timestamp}.{body}`. After
//! a rotation the header lists one signature per secret, space-separated, so a receiver that
//! knows either accepts it. `tollgate-client`'s `webhook` module verifies the same scheme.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const PREFIX: &str = "whsec_";

/// A signing secret: the key bytes, shown to its owner once as `whsec_<base64>`.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(…)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a webhook secret is `whsec_` and the base64 of 24 to 64 bytes")]
pub struct BadSecret;

impl WebhookSecret {
    /// A new secret of 32 random bytes.
    pub fn generate() -> WebhookSecret {
        let mut key = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        WebhookSecret(key)
    }

    /// Reads `whsec_<base64>`, as stored or as a receiver configures it.
    pub fn parse(text: &str) -> Result<WebhookSecret, BadSecret> {
        let encoded = text.strip_prefix(PREFIX).ok_or(BadSecret)?;
        let key = STANDARD.decode(encoded).map_err(|_| BadSecret)?;
        if !(24..=64).contains(&key.len()) {
            return Err(BadSecret);
        }
        Ok(WebhookSecret(key))
    }

    /// `whsec_<base64>`: how the secret is shown and stored.
    pub fn expose(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// `v1,<base64>` for one delivery attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC pads a key shorter than SHA-256's 64-byte block with zeros, so the padded block
        // is the same key, and it takes the constructor that cannot fail (keys are at most 64).
        let mut block = [0u8; 64];
        let len = self.0.len().min(64);
        block[..len].copy_from_slice(&self.0[..len]);
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&block.into());
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` value: one signature per secret in use (the new one first, then
/// those still in their overlap after a rotation), space-separated.
pub fn signature_header(
    secrets: &[&WebhookSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The Standard Webhooks reference libraries' published vector.
    #[test]
    fn the_specs_published_vector_is_reproduced() {
        let secret = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let signature = secret.sign(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
        // And the specification's own.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_rotation_lists_both_signatures_and_a_secret_round_trips() {
        let new = WebhookSecret::generate();
        let old = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let header = signature_header(&[&new, &old], "msg_1", 1_700_000_000, b"{}");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(
            parts,
            [
                new.sign("msg_1", 1_700_000_000, b"{}"),
                old.sign("msg_1", 1_700_000_000, b"{}")
            ]
        );
        assert_ne!(parts[0], parts[1]);
        assert_eq!(WebhookSecret::parse(&new.expose()).unwrap(), new);
        assert!(!format!("{new:?}").contains(&new.expose()[6..]));
        // The id, the timestamp and every byte of the body are signed.
        let base = old.sign("msg_1", 1, b"{}");
        assert_ne!(old.sign("msg_2", 1, b"{}"), base);
        assert_ne!(old.sign("msg_1", 2, b"{}"), base);
        assert_ne!(old.sign("msg_1", 1, b"{ }"), base);
    }

    #[test]
    fn a_secret_not_whsec_and_base64_of_a_sane_length_is_refused() {
        for text in [
            "",
            "C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "whsec_",
            "whsec_not base64!",
            "whsec_AAAA",
        ] {
            assert_eq!(WebhookSecret::parse(text), Err(BadSecret), "{text}");
        }
    }
}
