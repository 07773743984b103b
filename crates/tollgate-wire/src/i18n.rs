//! Error messages in the caller's language. `Accept-Language` picks one of the shipped languages
//! (RFC 9110 §12.5.4: the highest `q` first, `q=0` never); English is the default and the
//! fallback. English answers carry the message written where the error arose, with its
//! specifics; a translated answer carries that language's message for the error code, from
//! `messages/<tag>.toml` (one file per language), and the specifics stay in `details`. Codes
//! are never translated.
//!
//! The header is read here, in a few lines, because its weights must be read exactly: as RFC
//! 9110 writes them (at most three decimals, so as integer thousandths), a malformed one dropping
//! its entry. Read as floats, a client's `q=NaN` would leave the ranking without a total order.
//! The tags are matched here too: there are three, and Chinese needs its script read from the
//! region (`zh-CN` and `zh-SG` write Simplified, `zh-TW`, `zh-HK` and `zh-MO` Traditional), which
//! a short table says plainly.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use tollgate_core::{ApiError, ErrorCode};

/// A language Tollgate answers errors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Language {
    #[default]
    English,
    German,
    SimplifiedChinese,
}

impl Language {
    pub const ALL: [Language; 3] = [
        Language::English,
        Language::German,
        Language::SimplifiedChinese,
    ];

    /// The BCP 47 tag, as `Content-Language` gives it.
    pub fn tag(self) -> &'static str {
        match self {
            Language::English => "en",
            Language::German => "de",
            Language::SimplifiedChinese => "zh-Hans",
        }
    }

    /// The caller's preferred shipped language, from its `Accept-Language` header.
    pub fn negotiate(accept_language: Option<&str>) -> Language {
        let Some(header) = accept_language else {
            return Language::English;
        };
        let mut ranked: Vec<(&str, u16)> = header.split(',').filter_map(preference).collect();
        // Stable: among equal weights, the header's order stands.
        ranked.sort_by_key(|(_, weight)| std::cmp::Reverse(*weight));
        ranked
            .into_iter()
            .filter(|(_, weight)| *weight > 0)
            .find_map(|(tag, _)| Language::of_tag(tag))
            .unwrap_or_default()
    }

    /// The shipped language a tag asks for, if any (`*` is any, so English).
    fn of_tag(tag: &str) -> Option<Language> {
        let tag = tag.to_ascii_lowercase();
        let mut subtags = tag.split(['-', '_']);
        match subtags.next()? {
            "en" | "*" => Some(Language::English),
            "de" => Some(Language::German),
            "zh" => {
                let rest: Vec<&str> = subtags.collect();
                let traditional = ["hant", "tw", "hk", "mo"];
                let simplified = rest.contains(&"hans")
                    || !rest.iter().any(|subtag| traditional.contains(subtag));
                simplified.then_some(Language::SimplifiedChinese)
            }
            _ => None,
        }
    }

    /// This language's message for `code`; `None` for English, whose messages are written where
    /// each error arises.
    pub fn message(self, code: ErrorCode) -> Option<&'static str> {
        let catalogue: &BTreeMap<String, String> = match self {
            Language::English => return None,
            Language::German => &GERMAN,
            Language::SimplifiedChinese => &SIMPLIFIED_CHINESE,
        };
        catalogue.get(code.as_str()).map(String::as_str)
    }

    /// `error` as this language's caller reads it: the message translated where a translation
    /// exists, everything else as it was.
    pub fn translate(self, error: &ApiError) -> Cow<'_, ApiError> {
        match self.message(error.code) {
            None => Cow::Borrowed(error),
            Some(message) => {
                let mut translated = error.clone();
                translated.message = message.to_string();
                Cow::Owned(translated)
            }
        }
    }
}

/// One `Accept-Language` entry: its tag and weight in thousandths (1000 when it has none);
/// `None` for an empty tag or a weight RFC 9110 does not allow.
fn preference(entry: &str) -> Option<(&str, u16)> {
    let mut parts = entry.split(';').map(str::trim);
    let tag = parts.next().filter(|tag| !tag.is_empty())?;
    let mut weight = 1000;
    for parameter in parts {
        let Some(value) = parameter
            .strip_prefix("q=")
            .or_else(|| parameter.strip_prefix("Q="))
        else {
            continue;
        };
        let (whole, decimals) = value.split_once('.').unwrap_or((value, ""));
        if decimals.len() > 3 || !decimals.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // "5" is 500 thousandths, "05" 50, "005" 5.
        let thousandths = decimals
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(3)
            .fold(0u16, |n, digit| n * 10 + u16::from(digit - b'0'));
        weight = match whole {
            "0" => thousandths,
            "1" if thousandths == 0 => 1000,
            _ => return None,
        };
    }
    Some((tag, weight))
}

static GERMAN: LazyLock<BTreeMap<String, String>> =
    LazyLock::new(|| catalogue(include_str!("../messages/de.toml")));
static SIMPLIFIED_CHINESE: LazyLock<BTreeMap<String, String>> =
    LazyLock::new(|| catalogue(include_str!("../messages/zh-Hans.toml")));

/// A messages file; one that does not parse is empty (every message then falls back to English),
/// which the tests below never let ship.
fn catalogue(text: &str) -> BTreeMap<String, String> {
    toml::from_str(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_message_in_every_shipped_language_and_nothing_else_does() {
        let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        for (language, text) in [
            (Language::German, include_str!("../messages/de.toml")),
            (
                Language::SimplifiedChinese,
                include_str!("../messages/zh-Hans.toml"),
            ),
        ] {
            let file: BTreeMap<String, String> =
                toml::from_str(text).expect("the messages file parses");
            for code in &codes {
                let message = file.get(*code);
                assert!(
                    message.is_some_and(|m| !m.trim().is_empty()),
                    "messages/{}.toml has no message for {code}",
                    language.tag()
                );
            }
            for key in file.keys() {
                assert!(
                    codes.contains(&key.as_str()),
                    "messages/{}.toml has '{key}', which is no error code",
                    language.tag()
                );
            }
            for code in ErrorCode::ALL {
                assert_eq!(
                    language.message(*code),
                    file.get(code.as_str()).map(String::as_str)
                );
            }
        }
    }

    #[test]
    fn accept_language_picks_the_best_shipped_language_by_quality() {
        let picked = |header| Language::negotiate(Some(header)).tag();
        assert_eq!(Language::negotiate(None), Language::English);
        assert_eq!(picked("de-DE,de;q=0.9,en;q=0.8"), "de");
        assert_eq!(picked("en;q=0.1, de;q=0.9"), "de");
        assert_eq!(picked("fr-FR, zh-CN;q=0.8, en;q=0.5"), "zh-Hans");
        assert_eq!(picked("zh-Hans-SG"), "zh-Hans");
        assert_eq!(picked("zh"), "zh-Hans");
        // Traditional Chinese is not shipped: the next choice, or English.
        assert_eq!(picked("zh-TW, de;q=0.5"), "de");
        assert_eq!(picked("zh-Hant"), "en");
        assert_eq!(picked("fr, ja"), "en");
        assert_eq!(picked("de;q=0, en;q=0.2"), "en");
        assert_eq!(picked("*"), "en");
        assert_eq!(picked(""), "en");
        assert_eq!(picked(";;;q=,,de"), "de");
        // Malformed weights drop their entry, whatever a float parser would make of them.
        assert_eq!(picked("de;q=NaN, zh;q=inf, fr, en;q=0.5"), "en");
        assert_eq!(picked("de;q=1.5, zh-CN;q=0.0001, en;q=0.001"), "en");
        assert_eq!(picked("de;q=0.500, zh-CN;q=0.5"), "de");
        assert_eq!(picked("de;q=1.000;level=1"), "de");
    }

    #[test]
    fn a_translation_changes_the_message_and_nothing_else() {
        let error = ApiError::new(ErrorCode::RateLimited, "Rate limit 'per-key' exceeded.")
            .with_detail("policy", "per-key")
            .with_retry_after(3);
        // English is the message as written: nothing is copied.
        assert!(matches!(Language::English.translate(&error), Cow::Borrowed(e) if *e == error));
        let german = Language::German.translate(&error);
        assert!(
            german.message.starts_with("Ein Ratenlimit"),
            "{}",
            german.message
        );
        assert_eq!(german.code, error.code);
        assert_eq!(german.details, error.details);
        assert_eq!(german.retry_after_s, Some(3));
    }
}
