//! The rules of card top-ups: how a top-up's status may move, and how credits convert to the
//! amount a card is charged. One credit is one unit of the payment currency.

use crate::money::NANOS_PER_CREDIT;
use crate::Nanos;

/// Where a top-up is. `Paid`, `Expired` and `Failed` are final; refunds and disputes of a paid
/// top-up are money movements of their own, not statuses it moves back through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopUpStatus {
    /// Written before the payment provider is asked; the customer has not paid yet.
    Pending,
    /// The customer paid by a method that settles later (a bank debit); credited when it does.
    Processing,
    Paid,
    /// The checkout ended unpaid.
    Expired,
    /// The payment was refused, or the provider could not be reached to start it.
    Failed,
}

impl TopUpStatus {
    const ALL: [TopUpStatus; 5] = [
        TopUpStatus::Pending,
        TopUpStatus::Processing,
        TopUpStatus::Paid,
        TopUpStatus::Expired,
        TopUpStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TopUpStatus::Pending => "pending",
            TopUpStatus::Processing => "processing",
            TopUpStatus::Paid => "paid",
            TopUpStatus::Expired => "expired",
            TopUpStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<TopUpStatus> {
        TopUpStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The statuses a top-up may be in to move to `self`. Money received wins over anything
    /// but itself (a success reported after a failure or an expiry still paid), and nothing
    /// leaves `Paid`, so whatever order the provider's events arrive in, a top-up ends in the
    /// same status.
    pub fn comes_from(self) -> &'static [TopUpStatus] {
        use TopUpStatus::*;
        match self {
            Pending => &[],
            Processing => &[Pending],
            Paid => &[Pending, Processing, Expired, Failed],
            Expired | Failed => &[Pending, Processing],
        }
    }
}

/// How many minor units (cents) make one unit of `currency` (ISO 4217, any case), as card
/// processors count them: most currencies have two decimals, a few none, a few three.
pub fn minor_units_per_unit(currency: &str) -> i64 {
    const ZERO_DECIMAL: [&str; 16] = [
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
        "xaf", "xof", "xpf",
    ];
    const THREE_DECIMAL: [&str; 5] = ["bhd", "jod", "kwd", "omr", "tnd"];
    let currency = currency.to_ascii_lowercase();
    if ZERO_DECIMAL.contains(&currency.as_str()) {
        1
    } else if THREE_DECIMAL.contains(&currency.as_str()) {
        1000
    } else {
        100
    }
}

/// The card amount, in minor units, that buys `credits`; `None` if the credits are not a whole
/// number of minor units (a card cannot be charged a fraction of a cent).
pub fn credits_to_minor(credits: Nanos, currency: &str) -> Option<i64> {
    let per_minor = NANOS_PER_CREDIT / minor_units_per_unit(currency);
    (credits.0 >= 0 && credits.0 % per_minor == 0).then(|| credits.0 / per_minor)
}

/// The credits `minor` units of `currency` buy (or a refund of them takes back).
pub fn minor_to_credits(minor: i64, currency: &str) -> Option<Nanos> {
    let per_minor = NANOS_PER_CREDIT / minor_units_per_unit(currency);
    minor.checked_mul(per_minor).filter(|n| *n >= 0).map(Nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_convert_to_whole_minor_units_of_each_currency() {
        let credits = |text| Nanos::parse_amount(text).unwrap();
        assert_eq!(credits_to_minor(credits("25"), "usd"), Some(2500));
        assert_eq!(credits_to_minor(credits("25.01"), "EUR"), Some(2501));
        assert_eq!(credits_to_minor(credits("25.001"), "usd"), None);
        assert_eq!(credits_to_minor(credits("25"), "jpy"), Some(25));
        assert_eq!(credits_to_minor(credits("25.5"), "jpy"), None);
        assert_eq!(credits_to_minor(credits("1.234"), "kwd"), Some(1234));
        assert_eq!(minor_to_credits(2501, "usd"), Some(credits("25.01")));
        assert_eq!(minor_to_credits(-1, "usd"), None);
        assert_eq!(minor_to_credits(i64::MAX, "usd"), None);
    }

    #[test]
    fn a_status_never_leaves_paid_and_a_final_one_only_for_paid() {
        use TopUpStatus::*;
        for from in TopUpStatus::ALL {
            for to in TopUpStatus::ALL {
                let allowed = to.comes_from().contains(&from);
                let expected = match (from, to) {
                    (Paid, _) => false,
                    (Expired | Failed, to) => to == Paid,
                    (Pending, to) => to != Pending,
                    (Processing, to) => !matches!(to, Pending | Processing),
                };
                assert_eq!(allowed, expected, "{from:?} -> {to:?}");
            }
            assert_eq!(TopUpStatus::parse(from.as_str()), Some(from));
        }
    }
}
