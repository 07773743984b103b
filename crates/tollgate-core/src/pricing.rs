//! Prices to costs. Every cost is computed exactly in integers and rounded **up** to a whole
//! nano-unit once, at the end: the house's rounding, the same everywhere.

use crate::metering::TokenUsage;
use crate::money::MoneyError;
use crate::Nanos;

/// One model's prices, each per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenPrices {
    pub input: Nanos,
    pub output: Nanos,
    /// For input tokens read from the provider's prompt cache.
    pub cached_input: Nanos,
}

const TOKENS_PER_PRICE: u128 = 1_000_000;

impl TokenPrices {
    pub fn cost(&self, usage: &TokenUsage) -> Nanos {
        let per_million = u128::from(usage.input) * non_negative(self.input)
            + u128::from(usage.cached_input) * non_negative(self.cached_input)
            + u128::from(usage.output) * non_negative(self.output);
        saturate(per_million.div_ceil(TOKENS_PER_PRICE))
    }
}

/// The cost of `units` (a non-negative decimal, as text: "3", "1.25", or as a JSON number may
/// write it, "1e-7") at `unit_price` each: the exact product, rounded up once.
pub fn per_unit_cost(units: &str, unit_price: Nanos) -> Result<Nanos, MoneyError> {
    let (mantissa, exponent) = parse_units(units)?;
    let price = non_negative(unit_price);
    if mantissa == 0 || price == 0 {
        return Ok(Nanos::ZERO);
    }
    // units × price = mantissa × 10^exponent × price; the mantissa has at most 19 digits and
    // the price fits an i64, so their product fits a u128.
    let product = mantissa * price;
    Ok(match u32::try_from(exponent) {
        Ok(up) => saturate(
            10u128
                .checked_pow(up)
                .and_then(|scale| product.checked_mul(scale))
                .unwrap_or(u128::MAX),
        ),
        Err(_) => {
            let down = exponent.unsigned_abs();
            match 10u128.checked_pow(down) {
                Some(scale) => saturate(product.div_ceil(scale)),
                // Smaller than any price can make a whole nano-unit: one, rounded up.
                None => Nanos(1),
            }
        }
    })
}

/// A non-negative decimal as (digits, power of ten): "1.25" is (125, -2), "1e-7" is (1, -7).
fn parse_units(text: &str) -> Result<(u128, i32), MoneyError> {
    let not_decimal = || MoneyError::NotDecimal(text.to_string());
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(MoneyError::Negative(text.to_string()));
    }
    let (number, exponent) = match trimmed.split_once(['e', 'E']) {
        Some((n, e)) => (n, e.parse::<i32>().map_err(|_| not_decimal())?),
        None => (trimmed, 0),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return Err(not_decimal());
    }
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    // Trailing zeros only scale; dropping them keeps exact counts like "1000" small.
    let significant = digits.trim_end_matches('0');
    let zeros = digits.len() - significant.len();
    if significant.len() > 19 {
        return Err(MoneyError::Overflow(text.to_string()));
    }
    let mantissa: u128 = if significant.is_empty() {
        0
    } else {
        significant.parse().map_err(|_| not_decimal())?
    };
    let exponent = i64::from(exponent) + zeros as i64 - fraction.len() as i64;
    let exponent = i32::try_from(exponent).map_err(|_| MoneyError::Overflow(text.to_string()))?;
    Ok((mantissa, exponent))
}

/// `a + b`, or the largest amount if that overflows: a cost so large no wallet covers it.
pub fn add(a: Nanos, b: Nanos) -> Nanos {
    Nanos(a.0.saturating_add(b.0))
}

/// `amount` less `percent` of it, rounded up (a discount never makes a price free by rounding).
pub fn discounted(amount: Nanos, percent: u8) -> Nanos {
    let kept = u128::from(100 - percent.min(100));
    saturate((non_negative(amount) * kept).div_ceil(100))
}

fn non_negative(n: Nanos) -> u128 {
    u128::try_from(n.0).unwrap_or(0)
}

fn saturate(n: u128) -> Nanos {
    Nanos(i64::try_from(n).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credits(text: &str) -> Nanos {
        Nanos::parse_credits(text).unwrap()
    }

    #[test]
    fn a_discount_takes_its_percent_off_rounded_up() {
        assert_eq!(discounted(Nanos(1_000), 20), Nanos(800));
        assert_eq!(discounted(Nanos(1), 20), Nanos(1), "rounded up, never free");
        assert_eq!(discounted(Nanos(999), 33), Nanos(670), "669.33 up");
        assert_eq!(discounted(Nanos(1_000), 0), Nanos(1_000));
        assert_eq!(discounted(Nanos(1_000), 100), Nanos(0));
        assert_eq!(
            discounted(Nanos(i64::MAX), 1),
            Nanos(9_131_138_316_486_228_049)
        );
    }

    #[test]
    fn token_costs_round_up_once() {
        let prices = TokenPrices {
            input: credits("0.15"),
            output: credits("0.6"),
            cached_input: credits("0.075"),
        };
        let usage = TokenUsage {
            input: 1000,
            cached_input: 0,
            output: 500,
        };
        // 1000 × 0.15/1e6 + 500 × 0.6/1e6 = 0.00015 + 0.0003
        assert_eq!(prices.cost(&usage), credits("0.00045"));
        // 1 token at 0.15 per million is 0.00000015 = 150 nano exactly; 1 cached token at
        // 0.075 per million is 75 nano.
        let one = TokenUsage {
            input: 1,
            cached_input: 1,
            output: 0,
        };
        assert_eq!(prices.cost(&one), Nanos(225));
        // A third of a nano-unit rounds up to one.
        let tiny = TokenPrices {
            input: Nanos(333_333),
            ..TokenPrices::default()
        };
        assert_eq!(
            tiny.cost(&TokenUsage {
                input: 1,
                ..TokenUsage::default()
            }),
            Nanos(1)
        );
        assert_eq!(prices.cost(&TokenUsage::default()), Nanos::ZERO);
    }

    #[test]
    fn unit_costs_are_exact_for_decimal_counts() {
        assert_eq!(per_unit_cost("3", credits("0.01")), Ok(credits("0.03")));
        assert_eq!(per_unit_cost("1.5", credits("0.01")), Ok(credits("0.015")));
        assert_eq!(per_unit_cost("0.000000001", Nanos(1)), Ok(Nanos(1)));
        assert!(per_unit_cost("-1", credits("1")).is_err());
        assert!(per_unit_cost("many", credits("1")).is_err());
        assert_eq!(
            per_unit_cost("9000000000", credits("9000000000")),
            Ok(Nanos(i64::MAX))
        );
    }

    #[test]
    fn unit_costs_round_up_once_and_read_json_exponents() {
        // 0.0000000015 units at 1 credit: 1.5 nanos, rounded up to 2.
        assert_eq!(per_unit_cost("0.0000000015", credits("1")), Ok(Nanos(2)));
        // 1.0000000001 units at 3 credits: 3 000 000 000.3 nanos, rounded up once to
        // 3 000 000 001. Rounding the count up to billionths first made it 3 000 000 003.
        assert_eq!(
            per_unit_cost("1.0000000001", credits("3")),
            Ok(Nanos(3_000_000_001))
        );
        assert_eq!(per_unit_cost("1e-7", credits("1")), Ok(Nanos(100)));
        assert_eq!(per_unit_cost("2.5E3", credits("0.001")), Ok(credits("2.5")));
        assert_eq!(per_unit_cost("1e-40", credits("1")), Ok(Nanos(1)));
        assert_eq!(per_unit_cost("0e5", credits("1")), Ok(Nanos::ZERO));
        assert_eq!(per_unit_cost("1e30", credits("1")), Ok(Nanos(i64::MAX)));
        assert!(per_unit_cost("1e", credits("1")).is_err());
        assert!(per_unit_cost(".", credits("1")).is_err());
    }
}
