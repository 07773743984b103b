//! Prices to costs. Every cost is computed exactly in integers and rounded **up** to a whole
//! nano-unit once, at the end: the house's rounding, the same everywhere.

use crate::metering::TokenUsage;
use crate::money::{MoneyError, NANOS_PER_CREDIT};
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

/// The cost of `units` (a non-negative decimal, as text: "3", "1.25") at `unit_price` each.
pub fn per_unit_cost(units: &str, unit_price: Nanos) -> Result<Nanos, MoneyError> {
    // Parsed like an amount, the count is exact in billionths of a unit.
    let billionths = Nanos::parse_credits(units)?;
    let product = non_negative(billionths) * non_negative(unit_price);
    Ok(saturate(product.div_ceil(NANOS_PER_CREDIT as u128)))
}

/// `a + b`, or the largest amount if that overflows: a cost so large no wallet covers it.
pub fn add(a: Nanos, b: Nanos) -> Nanos {
    Nanos(a.0.saturating_add(b.0))
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
}
