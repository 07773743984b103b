//! Money is an integer count of nano-units (10⁻⁹ of one credit). Never floating point.
//!
//! Decimal strings from config and the API are parsed exactly; a value with more than nine
//! decimals is rounded **up** to the next nano-unit (in the house's favour), the one rounding
//! rule used everywhere.

use serde::{Deserialize, Serialize};
use std::fmt;

pub const NANOS_PER_CREDIT: i64 = 1_000_000_000;

/// The most one amount, or one wallet's balance, may be: a billion credits. Far below what an
/// i64 holds, so no sum of a few of them overflows anywhere (in memory or in either store).
pub const MAX_AMOUNT: Nanos = Nanos(1_000_000_000 * NANOS_PER_CREDIT);

/// The exact form of an amount the API takes (the OpenAPI `pattern` of every amount field):
/// 1 to 9 digits, then optionally `.` and 1 to 9 decimals, so below [`MAX_AMOUNT`] and exact to
/// the nano-unit. [`Nanos::parse_amount`] accepts exactly these strings.
pub const AMOUNT_PATTERN: &str = r"^[0-9]{1,9}(\.[0-9]{1,9})?$";

/// An amount in nano-units. Signed, because ledger movements are; balances are never negative.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanos(pub i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("'{0}' is not a decimal amount (expected digits with an optional '.', e.g. \"0.25\")")]
    NotDecimal(String),
    #[error("'{0}' is too large")]
    Overflow(String),
    #[error("'{0}' is negative; amounts here must be zero or more")]
    Negative(String),
    #[error(
        "'{0}' is not an amount: 1 to 9 digits, optionally '.' and 1 to 9 decimals (e.g. \"0.25\")"
    )]
    NotAmount(String),
}

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);

    /// Parses an amount as the API takes it, in exactly the form [`AMOUNT_PATTERN`] describes:
    /// no sign, no spaces, no rounding, below [`MAX_AMOUNT`].
    pub fn parse_amount(text: &str) -> Result<Nanos, MoneyError> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, "0"));
        let digits = |s: &str| (1..=9).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(fraction) {
            return Err(MoneyError::NotAmount(text.to_string()));
        }
        Nanos::parse_credits(text)
    }

    /// Parses a non-negative decimal amount of credits ("1", "0.25", "0.0000000015"),
    /// rounding up to a whole nano-unit.
    pub fn parse_credits(text: &str) -> Result<Nanos, MoneyError> {
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(MoneyError::Negative(text.to_string()));
        }
        let (whole, fraction) = match trimmed.split_once('.') {
            Some((w, f)) => (w, f),
            None => (trimmed, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction)
        {
            return Err(MoneyError::NotDecimal(text.to_string()));
        }
        let overflow = || MoneyError::Overflow(text.to_string());
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| overflow())?
        };
        let (kept, dropped) = fraction.split_at(fraction.len().min(9));
        let mut frac: i64 = if kept.is_empty() {
            0
        } else {
            kept.parse().map_err(|_| overflow())?
        };
        frac *= 10_i64.pow(9 - kept.len() as u32);
        if dropped.bytes().any(|b| b != b'0') {
            frac += 1; // round up: never under-charge by truncation
        }
        whole
            .checked_mul(NANOS_PER_CREDIT)
            .and_then(|n| n.checked_add(frac))
            .map(Nanos)
            .ok_or_else(overflow)
    }

    pub fn checked_add(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_add(other.0).map(Nanos)
    }

    pub fn checked_sub(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_sub(other.0).map(Nanos)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

/// Renders as an exact decimal of credits with trailing zeros trimmed: `1.5`, `0.000000001`, `-2`.
impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / NANOS_PER_CREDIT as u64;
        let frac = abs % NANOS_PER_CREDIT as u64;
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_api_takes_amounts_in_exactly_the_documented_form() {
        let pattern = regex::Regex::new(AMOUNT_PATTERN).unwrap();
        for text in [
            "0",
            "1",
            "0.25",
            "2.50",
            "123456789",
            "999999999.999999999",
            "0.000000001",
            "007",
        ] {
            assert!(pattern.is_match(text), "{text}");
            assert_eq!(
                Nanos::parse_amount(text),
                Nanos::parse_credits(text),
                "{text}"
            );
        }
        for text in [
            "",
            ".",
            ".5",
            "5.",
            " 5",
            "5 ",
            "-1",
            "+1",
            "1e3",
            "1,5",
            "1000000000",
            "0.0000000001",
            "1.2.3",
            "١",
        ] {
            assert!(!pattern.is_match(text), "{text}");
            assert!(Nanos::parse_amount(text).is_err(), "{text}");
        }
        assert_eq!(
            Nanos::parse_amount("999999999.999999999"),
            Ok(Nanos(MAX_AMOUNT.0 - 1))
        );
    }

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Nanos::parse_credits("1"), Ok(Nanos(1_000_000_000)));
        assert_eq!(Nanos::parse_credits("0.25"), Ok(Nanos(250_000_000)));
        assert_eq!(Nanos::parse_credits(".5"), Ok(Nanos(500_000_000)));
        assert_eq!(Nanos::parse_credits("2."), Ok(Nanos(2_000_000_000)));
        assert_eq!(Nanos::parse_credits("0.000000001"), Ok(Nanos(1)));
        assert_eq!(Nanos::parse_credits("0.0000000010000"), Ok(Nanos(1)));
    }

    #[test]
    fn rounds_up_beyond_nine_decimals() {
        assert_eq!(Nanos::parse_credits("0.0000000001"), Ok(Nanos(1)));
        assert_eq!(
            Nanos::parse_credits("1.0000000019"),
            Ok(Nanos(1_000_000_002))
        );
    }

    #[test]
    fn rejects_what_is_not_an_amount() {
        for bad in ["", ".", "abc", "1e3", "1.2.3", "+1", " 1 2", "0x10", "1,5"] {
            assert!(
                matches!(Nanos::parse_credits(bad), Err(MoneyError::NotDecimal(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Nanos::parse_credits("-1"),
            Err(MoneyError::Negative(_))
        ));
        assert!(matches!(
            Nanos::parse_credits("99999999999999999999"),
            Err(MoneyError::Overflow(_))
        ));
    }

    #[test]
    fn displays_trimmed_decimals() {
        assert_eq!(Nanos(1_500_000_000).to_string(), "1.5");
        assert_eq!(Nanos(1).to_string(), "0.000000001");
        assert_eq!(Nanos(-2_000_000_000).to_string(), "-2");
        assert_eq!(Nanos(0).to_string(), "0");
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(n in 0_i64..i64::MAX) {
            prop_assert_eq!(Nanos::parse_credits(&Nanos(n).to_string()), Ok(Nanos(n)));
        }
    }
}
