//! The API key format.
//!
//! `tg_live_` (or `tg_test_`) + 32 random base62 characters + a 6-character base62 CRC32 of
//! everything before it. The checksum lets a secret scanner recognise a key offline and lets
//! Tollgate reject a mistyped or made-up key before it touches the store. Keys are stored only as
//! SHA-256 ([`KeyHash`]); the plaintext exists once, in the response that creates the key.

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// How many characters of the random part are kept for display (`tg_live_AbC1…`).
const DISPLAY_RANDOM_CHARS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyEnv {
    Live,
    Test,
}

impl KeyEnv {
    fn prefix(self) -> &'static str {
        match self {
            KeyEnv::Live => "tg_live_",
            KeyEnv::Test => "tg_test_",
        }
    }
}

/// Master keys manage their account; usage keys only call the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    Master,
    Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Inactive,
    Revoked,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Master => "master",
            KeyKind::Usage => "usage",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "master" => Some(KeyKind::Master),
            "usage" => Some(KeyKind::Usage),
            _ => None,
        }
    }
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Inactive => "inactive",
            KeyStatus::Revoked => "revoked",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(KeyStatus::Active),
            "inactive" => Some(KeyStatus::Inactive),
            "revoked" => Some(KeyStatus::Revoked),
            _ => None,
        }
    }
}

/// A well-formed API key: prefix, charset, length and checksum all verified.
/// Deliberately not `Display`/`Serialize`: the plaintext leaves only through [`ApiKey::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}…)", self.display_prefix())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedKey {
    #[error("the key does not start with tg_live_ or tg_test_")]
    Prefix,
    #[error("the key has the wrong length or characters")]
    Shape,
    #[error("the key's checksum does not match (mistyped or truncated?)")]
    Checksum,
}

impl ApiKey {
    pub fn generate(env: KeyEnv) -> ApiKey {
        let mut key = String::with_capacity(8 + RANDOM_LEN + CHECKSUM_LEN);
        key.push_str(env.prefix());
        key.push_str(&random_base62(RANDOM_LEN));
        let checksum = base62_fixed(crc32fast::hash(key.as_bytes()));
        key.push_str(&checksum);
        ApiKey(key)
    }

    /// Checks the format and checksum. No lookup happens for a key that fails here.
    pub fn parse(text: &str) -> Result<ApiKey, MalformedKey> {
        let env = if text.starts_with(KeyEnv::Live.prefix()) {
            KeyEnv::Live
        } else if text.starts_with(KeyEnv::Test.prefix()) {
            KeyEnv::Test
        } else {
            return Err(MalformedKey::Prefix);
        };
        let body = &text[env.prefix().len()..];
        if body.len() != RANDOM_LEN + CHECKSUM_LEN
            || !body.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(MalformedKey::Shape);
        }
        let (signed, checksum) = text.split_at(text.len() - CHECKSUM_LEN);
        if base62_fixed(crc32fast::hash(signed.as_bytes())) != checksum {
            return Err(MalformedKey::Checksum);
        }
        Ok(ApiKey(text.to_string()))
    }

    pub fn env(&self) -> KeyEnv {
        if self.0.starts_with(KeyEnv::Test.prefix()) {
            KeyEnv::Test
        } else {
            KeyEnv::Live
        }
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The non-secret start of the key, kept for display: `tg_live_AbC1`.
    pub fn display_prefix(&self) -> &str {
        &self.0[..8 + DISPLAY_RANDOM_CHARS]
    }

    /// The plaintext. Call only to show the key once, to its creator.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// SHA-256 of a key's plaintext: what the store keeps and what lookups use.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Constant-time equality, so comparing secrets never leaks how much matched.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

/// A random base62 string of `len` characters (for tokens that are not API keys).
pub fn random_base62(len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| BASE62[rng.gen_range(0..BASE62.len())] as char)
        .collect()
}

/// SHA-256 of an arbitrary secret, compared in constant time (for the admin token).
pub fn secret_matches(presented: &str, expected: &str) -> bool {
    let a: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let b: [u8; 32] = Sha256::digest(expected.as_bytes()).into();
    a.ct_eq(&b).into()
}

/// Encodes a u32 as exactly six base62 digits (62⁶ > 2³²), most significant first.
fn base62_fixed(mut value: u32) -> String {
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    digits.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_keys_parse() {
        for env in [KeyEnv::Live, KeyEnv::Test] {
            let key = ApiKey::generate(env);
            assert_eq!(key.expose().len(), 8 + 32 + 6);
            assert_eq!(ApiKey::parse(key.expose()), Ok(key.clone()));
            assert_eq!(key.env(), env);
            assert!(key.expose().starts_with(key.display_prefix()));
        }
    }

    #[test]
    fn rejects_malformed_keys_by_reason() {
        let key = ApiKey::generate(KeyEnv::Live);
        let text = key.expose();
        assert_eq!(ApiKey::parse("sk-abc"), Err(MalformedKey::Prefix));
        assert_eq!(ApiKey::parse("tg_live_short"), Err(MalformedKey::Shape));
        assert_eq!(ApiKey::parse(&format!("{text}x")), Err(MalformedKey::Shape));
        let with_symbol = format!("{}!{}", &text[..20], &text[21..]);
        assert_eq!(ApiKey::parse(&with_symbol), Err(MalformedKey::Shape));
        // Flip one character of the random part: the checksum catches it.
        let flipped: String = text
            .char_indices()
            .map(|(i, c)| {
                if i == 10 {
                    if c == 'a' {
                        'b'
                    } else {
                        'a'
                    }
                } else {
                    c
                }
            })
            .collect();
        assert_eq!(ApiKey::parse(&flipped), Err(MalformedKey::Checksum));
    }

    #[test]
    fn checksum_encoding_is_fixed_width() {
        assert_eq!(base62_fixed(0), "000000");
        assert_eq!(base62_fixed(61), "00000z");
        assert_eq!(base62_fixed(u32::MAX), "4gfFC3");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = ApiKey::generate(KeyEnv::Live);
        let shown = format!("{key:?} {:?}", key.hash());
        assert!(!shown.contains(&key.expose()[12..]));
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secret_matches("token", "token"));
        assert!(!secret_matches("token", "token2"));
        assert!(!secret_matches("", "token"));
    }

    proptest! {
        #[test]
        fn no_random_string_panics_the_parser(s in ".{0,64}") {
            let _ = ApiKey::parse(&s);
        }

        #[test]
        fn a_single_substitution_is_always_caught(pos in 8_usize..40, replacement in 0_usize..62) {
            let key = ApiKey::generate(KeyEnv::Live);
            let mut bytes = key.expose().as_bytes().to_vec();
            let new = BASE62[replacement];
            prop_assume!(bytes[pos] != new);
            bytes[pos] = new;
            let text = String::from_utf8(bytes).unwrap();
            prop_assert!(ApiKey::parse(&text).is_err());
        }
    }
}
