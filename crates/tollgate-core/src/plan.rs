//! Plans: what an account's subscription includes each period (allowances of units per meter,
//! on a route group), what a call over them meets, and whether the subscription still lets
//! calls through. Pure: the server reads plans from config and keeps subscriptions in the store.

use crate::allowance::Overage;
use crate::money::Nanos;
use crate::period::{Length, Period, Schedule};
use crate::ratelimit::Overrides;
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use std::collections::BTreeMap;

/// What an allowance counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    /// One unit per call.
    Requests,
    /// Input and output tokens, as the upstream reports them.
    Tokens,
    /// The call's cost in nano-units, at the route's prices.
    Cost,
}

impl Meter {
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Requests => "requests",
            Meter::Tokens => "tokens",
            Meter::Cost => "cost",
        }
    }

    pub fn parse(text: &str) -> Option<Meter> {
        [Meter::Requests, Meter::Tokens, Meter::Cost]
            .into_iter()
            .find(|m| m.as_str() == text)
    }
}

impl Overage {
    pub fn as_str(self) -> &'static str {
        match self {
            Overage::Block => "block",
            Overage::Wallet => "wallet",
            Overage::Soft => "soft",
        }
    }

    pub fn parse(text: &str) -> Option<Overage> {
        [Overage::Block, Overage::Wallet, Overage::Soft]
            .into_iter()
            .find(|o| o.as_str() == text)
    }
}

/// Units of one meter included each period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    /// Unique within the plan; usage is kept by it, so a plan change keeps the usage of an
    /// allowance of the same name.
    pub name: String,
    pub meter: Meter,
    /// The route group whose calls it meters; `None`: every route.
    pub routes: Option<String>,
    pub units: u64,
    pub overage: Overage,
    /// Unused units a period passes to the next, at most this many (0: none).
    pub rollover: u64,
    /// Shorter windows inside the period, each with its own limit: a call draws on the period's
    /// units only as far as every window has room, and each window resets on its own schedule.
    pub windows: Vec<Window>,
}

/// A limit on an allowance's units inside each shorter window (a day of a monthly plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub length: Length,
    pub units: u64,
}

/// `day`, `week` or `month`.
pub fn length_name(length: Length) -> &'static str {
    match length {
        Length::Day => "day",
        Length::Week => "week",
        Length::Month => "month",
    }
}

impl Allowance {
    pub fn covers(&self, group: &str) -> bool {
        self.routes.as_deref().is_none_or(|g| g == group)
    }

    /// The store's name for this allowance's bucket in `period`: one per allowance and period
    /// start, so a period's units are granted once, whoever asks first.
    pub fn bucket(&self, period: &Period) -> String {
        format!("{}@{}", self.name, period.start.timestamp())
    }

    /// A window's bucket in the window-period holding it: `<allowance>/<length>@<start>`.
    pub fn window_bucket(&self, window: &Window, period: &Period) -> String {
        format!(
            "{}/{}@{}",
            self.name,
            length_name(window.length),
            period.start.timestamp()
        )
    }
}

/// A credit pack customers may buy: units of one meter, good for a while after purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOffer {
    pub name: String,
    pub meter: Meter,
    /// The route group its units serve; `None`: every route.
    pub routes: Option<String>,
    pub units: u64,
    pub price: Nanos,
    pub valid_for: Duration,
}

/// Where a plan's periods start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// Calendar periods in the plan's time zone (months from the 1st).
    Calendar,
    /// Periods from the subscription's start (a month-end start clamps).
    Subscription,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub length: Length,
    pub anchor: Anchor,
    pub zone: Tz,
    /// How long a `past_due` subscription keeps working.
    pub grace: Duration,
    /// Paid from the wallet for each period a subscription uses (zero: free).
    pub price: Nanos,
    /// Tried in order: the first that covers a call's route group meters it.
    pub allowances: Vec<Allowance>,
    /// Percent off the prices of a route group's calls.
    pub discounts: BTreeMap<String, u8>,
    /// The plan's own numbers for configured rate-limit policies (an account's or key's own
    /// override still wins).
    pub rate_limits: Overrides,
}

impl Plan {
    pub fn schedule(&self, subscription_start: DateTime<Utc>) -> Schedule {
        self.schedule_of(self.length, subscription_start)
    }

    /// Periods of `length` on the plan's anchor and zone: its own, or a window's.
    pub fn schedule_of(&self, length: Length, subscription_start: DateTime<Utc>) -> Schedule {
        match self.anchor {
            Anchor::Calendar => Schedule::calendar(length, self.zone),
            Anchor::Subscription => Schedule::anchored(subscription_start, length, self.zone),
        }
    }

    pub fn allowance_for(&self, group: &str) -> Option<&Allowance> {
        self.allowances.iter().find(|a| a.covers(group))
    }

    /// Percent off the route group's prices (0: none).
    pub fn discount_for(&self, group: &str) -> u8 {
        self.discounts.get(group).copied().unwrap_or(0)
    }
}

/// Where an account's subscription stands, as the operator (or the payment provider) set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscriptionStatus {
    Active,
    Trialing,
    /// A payment failed: calls pass for the plan's grace period, with a warning.
    PastDue,
    /// Unpaid after its retries: calls are refused.
    Unpaid,
    Canceled,
}

impl SubscriptionStatus {
    pub const ALL: [SubscriptionStatus; 5] = [
        SubscriptionStatus::Active,
        SubscriptionStatus::Trialing,
        SubscriptionStatus::PastDue,
        SubscriptionStatus::Unpaid,
        SubscriptionStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Unpaid => "unpaid",
            SubscriptionStatus::Canceled => "canceled",
        }
    }

    pub fn parse(text: &str) -> Option<SubscriptionStatus> {
        SubscriptionStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// An account's plan and the state of its subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub plan: String,
    pub status: SubscriptionStatus,
    /// When the status last changed.
    pub since: DateTime<Utc>,
    /// When the subscription started: the anchor of `subscription`-anchored periods.
    pub started_at: DateTime<Utc>,
}

/// Whether a subscription lets calls through at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Good,
    /// Past due within its grace period: calls pass, with a warning.
    Grace {
        until: DateTime<Utc>,
    },
    /// Calls are refused.
    Lapsed,
}

impl Subscription {
    pub fn standing(&self, grace: Duration, at: DateTime<Utc>) -> Standing {
        match self.status {
            SubscriptionStatus::Active | SubscriptionStatus::Trialing => Standing::Good,
            SubscriptionStatus::PastDue => {
                let until = self
                    .since
                    .checked_add_signed(grace)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                if at < until {
                    Standing::Grace { until }
                } else {
                    Standing::Lapsed
                }
            }
            SubscriptionStatus::Unpaid | SubscriptionStatus::Canceled => Standing::Lapsed,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn past_due_passes_until_its_grace_ends_and_the_rest_follow_their_status() {
        let mut subscription = Subscription {
            plan: "pro".into(),
            status: SubscriptionStatus::PastDue,
            since: at("2026-03-01T00:00:00Z"),
            started_at: at("2026-01-31T00:00:00Z"),
        };
        let grace = Duration::days(3);
        assert_eq!(
            subscription.standing(grace, at("2026-03-03T23:59:59Z")),
            Standing::Grace {
                until: at("2026-03-04T00:00:00Z")
            }
        );
        assert_eq!(
            subscription.standing(grace, at("2026-03-04T00:00:00Z")),
            Standing::Lapsed
        );
        for (status, standing) in [
            (SubscriptionStatus::Active, Standing::Good),
            (SubscriptionStatus::Trialing, Standing::Good),
            (SubscriptionStatus::Unpaid, Standing::Lapsed),
            (SubscriptionStatus::Canceled, Standing::Lapsed),
        ] {
            subscription.status = status;
            assert_eq!(
                subscription.standing(grace, at("2026-03-02T00:00:00Z")),
                standing
            );
            assert_eq!(SubscriptionStatus::parse(status.as_str()), Some(status));
        }
    }

    #[test]
    fn an_anchored_plan_keeps_one_bucket_per_period_and_the_first_covering_allowance_meters() {
        let plan = Plan {
            name: "pilot".into(),
            length: Length::Month,
            anchor: Anchor::Subscription,
            zone: Tz::UTC,
            grace: Duration::days(7),
            price: Nanos::ZERO,
            discounts: BTreeMap::new(),
            rate_limits: Overrides::new(),
            allowances: vec![
                Allowance {
                    name: "inspections".into(),
                    meter: Meter::Requests,
                    routes: Some("inspect".into()),
                    units: 5,
                    overage: Overage::Block,
                    rollover: 0,
                    windows: Vec::new(),
                },
                Allowance {
                    name: "tokens".into(),
                    meter: Meter::Tokens,
                    routes: None,
                    units: 1_000,
                    overage: Overage::Wallet,
                    rollover: 0,
                    windows: Vec::new(),
                },
            ],
        };
        assert_eq!(plan.allowance_for("inspect").unwrap().name, "inspections");
        assert_eq!(plan.allowance_for("llm").unwrap().name, "tokens");
        let schedule = plan.schedule(at("2026-01-31T09:00:00Z"));
        let february = schedule.period_at(at("2026-03-01T00:00:00Z"));
        assert_eq!(february.start, at("2026-02-28T09:00:00Z"));
        let allowance = &plan.allowances[0];
        assert_eq!(
            allowance.bucket(&february),
            allowance.bucket(&schedule.period_at(at("2026-03-31T08:59:59Z")))
        );
        assert_ne!(
            allowance.bucket(&february),
            allowance.bucket(&schedule.period_at(at("2026-03-31T09:00:00Z")))
        );
    }
}
