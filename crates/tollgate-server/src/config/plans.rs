//! Plans as written in config (`[[plans]]`, `billing.default_plan`) and their checks. Every
//! problem of every plan is reported at once, with its path.

use crate::config::problems::Problems;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tollgate_core::allowance::Overage;
use tollgate_core::period::Length;
use tollgate_core::plan::{
    length_name, Allowance, Anchor, Meter, PackOffer, Plan, Subscription, Window,
};
use tollgate_core::ratelimit::Overrides;
use tollgate_core::Nanos;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub name: String,
    /// `day`, `week` or `month`.
    #[serde(default = "month")]
    pub period: String,
    /// `calendar` (periods from midnight, Monday, the 1st in `time_zone`) or `subscription`
    /// (from the subscription's start).
    #[serde(default = "calendar")]
    pub anchor: String,
    /// An IANA time zone, e.g. `Europe/Berlin`.
    #[serde(default = "utc")]
    pub time_zone: String,
    /// How long a `past_due` subscription keeps calling (with a warning).
    #[serde(default = "week")]
    pub grace: String,
    /// Paid from the wallet for each period an account on the plan calls in (`"20.00"`); free
    /// when left out. Not for the default plan, which accounts are on without choosing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<String>,
    #[serde(default)]
    pub allowances: Vec<RawAllowance>,
    /// Percent off the prices of a route group's calls: `{ llm = 20 }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub discounts: BTreeMap<String, i64>,
    /// The plan's own numbers for configured rate-limit policies of scope key, key+route or
    /// account: `{ per-key = { limit = 600, window_seconds = 60 } }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rate_limits: Overrides,
    /// The Stripe Price ids (`price_...`) this plan is sold as: a Stripe subscription to one of
    /// them puts its account on this plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripe_prices: Vec<String>,
}

/// A credit pack customers may buy (`[[packs]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPackOffer {
    /// 1 to 64 of `A-Z a-z 0-9 - _ .`: what a purchase names.
    pub name: String,
    /// `requests`, `tokens` or `cost`.
    pub meter: String,
    /// The route group its units serve; every route when left out.
    #[serde(default)]
    pub routes: Option<String>,
    /// A count (requests, tokens), or for `cost` an amount of credits.
    pub units: RawUnits,
    /// What it costs, in credits (`"9.00"`).
    pub price: String,
    /// How long its units last after the purchase (`"90d"`).
    pub valid_for: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllowance {
    pub name: String,
    /// `requests`, `tokens` or `cost`.
    pub meter: String,
    /// The route group it meters; every route when left out.
    #[serde(default)]
    pub routes: Option<String>,
    /// A count (requests, tokens), or for `cost` an amount of credits (`"5.00"`).
    pub units: RawUnits,
    /// `block`, `wallet` or `soft`.
    #[serde(default = "block")]
    pub overage: String,
    /// Unused units a period passes to the next, at most this many (0: none). Same kind of
    /// number as `units`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollover: Option<RawUnits>,
    /// Shorter windows inside the period, each with a limit of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<RawWindow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    /// `day` or `week`: shorter than the plan's period.
    pub every: String,
    /// At most this many of the allowance's units in each window.
    pub units: RawUnits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawUnits {
    Count(i64),
    Text(String),
}

/// A plan with every field at its config default, for code that builds one.
impl Default for RawPlan {
    fn default() -> Self {
        RawPlan {
            name: String::new(),
            period: month(),
            anchor: calendar(),
            time_zone: utc(),
            grace: week(),
            price: None,
            allowances: Vec::new(),
            discounts: BTreeMap::new(),
            rate_limits: Overrides::new(),
            stripe_prices: Vec::new(),
        }
    }
}

fn month() -> String {
    "month".into()
}
fn calendar() -> String {
    "calendar".into()
}
fn utc() -> String {
    "UTC".into()
}
fn week() -> String {
    "7d".into()
}
fn block() -> String {
    "block".into()
}

/// The plans an operator configured, by name.
#[derive(Debug, Clone, Default)]
pub struct Plans {
    by_name: BTreeMap<String, Arc<Plan>>,
    /// The plan of accounts with no subscription of their own.
    default: Option<Arc<Plan>>,
    /// Plan names by the Stripe Price they are sold as.
    by_stripe_price: BTreeMap<String, String>,
    /// The credit packs customers may buy, by name.
    packs: BTreeMap<String, Arc<PackOffer>>,
}

impl Plans {
    pub fn get(&self, name: &str) -> Option<&Arc<Plan>> {
        self.by_name.get(name)
    }

    pub fn default_plan(&self) -> Option<&Arc<Plan>> {
        self.default.as_ref()
    }

    /// The plan an account with `subscription` is on: the subscribed plan, else the default
    /// (a subscription to a plan the config no longer has follows the default).
    pub fn of(&self, subscription: Option<&Subscription>) -> Option<&Arc<Plan>> {
        subscription
            .and_then(|s| self.get(&s.plan))
            .or(self.default.as_ref())
    }

    pub fn pack(&self, name: &str) -> Option<&Arc<PackOffer>> {
        self.packs.get(name)
    }

    /// The credit packs on offer, by name.
    pub fn packs(&self) -> impl Iterator<Item = &Arc<PackOffer>> {
        self.packs.values()
    }

    /// The plan sold as a Stripe Price.
    pub fn sold_as(&self, stripe_price: &str) -> Option<&Arc<Plan>> {
        self.by_stripe_price
            .get(stripe_price)
            .and_then(|name| self.get(name))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

pub(crate) fn validate_plans(
    raw: &[RawPlan],
    raw_packs: &[RawPackOffer],
    default_plan: Option<&str>,
    groups: &[&str],
    p: &mut Problems,
) -> Plans {
    let mut by_name: BTreeMap<String, Arc<Plan>> = BTreeMap::new();
    let mut by_stripe_price: BTreeMap<String, String> = BTreeMap::new();
    for (i, plan) in raw.iter().enumerate() {
        let at = format!("plans[{i}]");
        // Stripe charges a plan it sells: a wallet fee as well would charge twice.
        if !plan.stripe_prices.is_empty() && plan.price.is_some() {
            p.push(
                &format!("{at}.price"),
                "a plan sold through Stripe (stripe_prices) is paid there: leave price out",
            );
        }
        for (j, price) in plan.stripe_prices.iter().enumerate() {
            let path = format!("{at}.stripe_prices[{j}]");
            if price.trim().is_empty() {
                p.push(&path, "must be a Stripe Price id (price_...)");
            } else if let Some(other) = by_stripe_price.get(price) {
                p.push(
                    &path,
                    format!("'{price}' is sold as the '{other}' plan already"),
                );
            } else {
                by_stripe_price.insert(price.clone(), plan.name.clone());
            }
        }
        if plan.name.trim().is_empty() {
            p.push(&format!("{at}.name"), "is required");
        } else if raw[..i].iter().any(|other| other.name == plan.name) {
            p.push(
                &format!("{at}.name"),
                format!("'{}' names another plan already", plan.name),
            );
        }
        if let Some(plan) = validate_plan(plan, &at, groups, p) {
            by_name.entry(plan.name.clone()).or_insert(Arc::new(plan));
        }
    }
    let default = default_plan.and_then(|name| {
        let found = by_name.get(name).cloned();
        match &found {
            None => p.push(
                "billing.default_plan",
                format!("'{name}' is not a plan in [[plans]]"),
            ),
            // Accounts on the default plan have no subscription to anchor periods on.
            Some(plan) if plan.anchor == Anchor::Subscription => p.push(
                "billing.default_plan",
                format!("'{name}' is anchored to a subscription; the default plan needs calendar periods"),
            ),
            // Accounts are on it without choosing it: it cannot charge them.
            Some(plan) if plan.price > Nanos::ZERO => p.push(
                "billing.default_plan",
                format!("'{name}' has a price; the default plan must be free"),
            ),
            Some(_) => {}
        }
        found
    });
    Plans {
        by_name,
        default,
        by_stripe_price,
        packs: validate_packs(raw_packs, groups, p),
    }
}

fn validate_packs(
    raw: &[RawPackOffer],
    groups: &[&str],
    p: &mut Problems,
) -> BTreeMap<String, Arc<PackOffer>> {
    let mut packs = BTreeMap::new();
    for (i, pack) in raw.iter().enumerate() {
        let at = format!("packs[{i}]");
        if !name_ok(&pack.name) {
            p.push(
                &format!("{at}.name"),
                "must be 1 to 64 of A-Z a-z 0-9 - _ .",
            );
        } else if raw[..i].iter().any(|other| other.name == pack.name) {
            p.push(
                &format!("{at}.name"),
                format!("'{}' names another pack already", pack.name),
            );
        }
        let meter = Meter::parse(&pack.meter).or_else(|| {
            p.push(
                &format!("{at}.meter"),
                format!("'{}' is not a meter (requests, tokens or cost)", pack.meter),
            );
            None
        });
        if let Some(group) = &pack.routes {
            if !groups.contains(&group.as_str()) {
                p.push(
                    &format!("{at}.routes"),
                    format!("'{group}' is not the group of any route"),
                );
            }
        }
        let units = count(meter, &pack.units, &format!("{at}.units"), p);
        let price = match Nanos::parse_credits(&pack.price) {
            Ok(price) if price > Nanos::ZERO => Some(price),
            Ok(_) => {
                p.push(&format!("{at}.price"), "must be more than zero");
                None
            }
            Err(e) => {
                p.push(&format!("{at}.price"), e.to_string());
                None
            }
        };
        let valid_for = humantime::parse_duration(&pack.valid_for)
            .ok()
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .filter(|d| *d > chrono::Duration::zero())
            .or_else(|| {
                p.push(&format!("{at}.valid_for"), "must be a duration, e.g. 90d");
                None
            });
        if let (Some(meter), Some(units), Some(price), Some(valid_for)) =
            (meter, units, price, valid_for)
        {
            packs
                .entry(pack.name.clone())
                .or_insert(Arc::new(PackOffer {
                    name: pack.name.clone(),
                    meter,
                    routes: pack.routes.clone(),
                    units,
                    price,
                    valid_for,
                }));
        }
    }
    packs
}

/// Whether a name may name an allowance or a pack: it names buckets, quota items in headers and
/// path segments.
fn name_ok(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn length_of(text: &str) -> Option<Length> {
    match text {
        "day" => Some(Length::Day),
        "week" => Some(Length::Week),
        "month" => Some(Length::Month),
        _ => None,
    }
}

/// Orders lengths by how long their periods last.
fn rank(length: Length) -> u8 {
    match length {
        Length::Day => 0,
        Length::Week => 1,
        Length::Month => 2,
    }
}

fn validate_plan(raw: &RawPlan, at: &str, groups: &[&str], p: &mut Problems) -> Option<Plan> {
    let length = length_of(&raw.period).or_else(|| {
        p.push(
            &format!("{at}.period"),
            format!("'{}' is not a period (day, week or month)", raw.period),
        );
        None
    });
    let anchor = match raw.anchor.as_str() {
        "calendar" => Some(Anchor::Calendar),
        "subscription" => Some(Anchor::Subscription),
        other => {
            p.push(
                &format!("{at}.anchor"),
                format!("'{other}' is not an anchor (calendar or subscription)"),
            );
            None
        }
    };
    let zone = raw
        .time_zone
        .parse::<chrono_tz::Tz>()
        .map_err(|_| {
            p.push(
                &format!("{at}.time_zone"),
                format!(
                    "'{}' is not an IANA time zone (e.g. UTC, Europe/Berlin)",
                    raw.time_zone
                ),
            )
        })
        .ok();
    let grace = humantime::parse_duration(&raw.grace)
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .or_else(|| {
            p.push(&format!("{at}.grace"), "must be a duration, e.g. 7d or 0s");
            None
        });
    let price = match &raw.price {
        None => Some(Nanos::ZERO),
        Some(text) => Nanos::parse_credits(text)
            .map_err(|e| p.push(&format!("{at}.price"), e.to_string()))
            .ok(),
    };
    let mut discounts = BTreeMap::new();
    for (group, percent) in &raw.discounts {
        let path = format!("{at}.discounts.{group}");
        if !groups.contains(&group.as_str()) {
            p.push(&path, format!("'{group}' is not the group of any route"));
        }
        match u8::try_from(*percent) {
            Ok(percent @ 1..=100) => {
                discounts.insert(group.clone(), percent);
            }
            _ => p.push(&path, "must be a whole percent from 1 to 100"),
        }
    }
    let mut allowances = Vec::new();
    for (j, allowance) in raw.allowances.iter().enumerate() {
        let at = format!("{at}.allowances[{j}]");
        if !name_ok(&allowance.name) {
            // It names buckets, quota items in headers and a path segment.
            p.push(
                &format!("{at}.name"),
                "must be 1 to 64 of A-Z a-z 0-9 - _ .",
            );
        } else if raw.allowances[..j]
            .iter()
            .any(|other| other.name == allowance.name)
        {
            p.push(
                &format!("{at}.name"),
                format!("'{}' names another allowance of this plan", allowance.name),
            );
        }
        if let Some(allowance) = validate_allowance(allowance, &at, length, groups, p) {
            allowances.push(allowance);
        }
    }
    Some(Plan {
        name: raw.name.clone(),
        length: length?,
        anchor: anchor?,
        zone: zone?,
        grace: grace?,
        price: price?,
        allowances,
        discounts,
        rate_limits: raw.rate_limits.clone(),
    })
}

fn validate_allowance(
    raw: &RawAllowance,
    at: &str,
    period: Option<Length>,
    groups: &[&str],
    p: &mut Problems,
) -> Option<Allowance> {
    let meter = Meter::parse(&raw.meter).or_else(|| {
        p.push(
            &format!("{at}.meter"),
            format!("'{}' is not a meter (requests, tokens or cost)", raw.meter),
        );
        None
    });
    let overage = Overage::parse(&raw.overage).or_else(|| {
        p.push(
            &format!("{at}.overage"),
            format!(
                "'{}' is not an overage rule (block, wallet or soft)",
                raw.overage
            ),
        );
        None
    });
    if let Some(group) = &raw.routes {
        if !groups.contains(&group.as_str()) {
            p.push(
                &format!("{at}.routes"),
                format!("'{group}' is not the group of any route"),
            );
        }
    }
    let units = count(meter, &raw.units, &format!("{at}.units"), p);
    let rollover = match &raw.rollover {
        None => Some(0),
        Some(rollover) => {
            let path = format!("{at}.rollover");
            let rollover = count(meter, rollover, &path, p);
            if let (Some(rollover), Some(units)) = (rollover, units) {
                if rollover > units {
                    p.push(
                        &path,
                        format!("must be at most the allowance's {units} units"),
                    );
                }
            }
            rollover
        }
    };
    let mut windows = Vec::new();
    for (k, window) in raw.windows.iter().enumerate() {
        let at = format!("{at}.windows[{k}]");
        let length = match (length_of(&window.every), period) {
            (Some(length), Some(period)) if rank(length) >= rank(period) => {
                p.push(
                    &format!("{at}.every"),
                    format!(
                        "a {} window must be shorter than its {} period",
                        window.every,
                        length_name(period)
                    ),
                );
                None
            }
            (None, _) => {
                p.push(
                    &format!("{at}.every"),
                    format!("'{}' is not a window (day or week)", window.every),
                );
                None
            }
            (length, _) => length,
        };
        if raw.windows[..k]
            .iter()
            .any(|other| other.every == window.every)
        {
            p.push(
                &format!("{at}.every"),
                format!("a {} window is there already", window.every),
            );
        }
        let limit = count(meter, &window.units, &format!("{at}.units"), p);
        if let (Some(limit), Some(units)) = (limit, units) {
            if limit > units {
                p.push(
                    &format!("{at}.units"),
                    format!("must be at most the allowance's {units} units"),
                );
            }
        }
        if let (Some(length), Some(units)) = (length, limit) {
            windows.push(Window { length, units });
        }
    }
    Some(Allowance {
        name: raw.name.clone(),
        meter: meter?,
        routes: raw.routes.clone(),
        units: units?,
        overage: overage?,
        rollover: rollover?,
        windows,
    })
}

/// A number of units: a whole count, or for `cost` an amount of credits; more than zero.
fn count(meter: Option<Meter>, raw: &RawUnits, path: &str, p: &mut Problems) -> Option<u64> {
    let units = match (meter, raw) {
        (Some(Meter::Cost), RawUnits::Text(text)) => Nanos::parse_credits(text)
            .map(|n| u64::try_from(n.0).unwrap_or(0))
            .map_err(|e| e.to_string()),
        (Some(Meter::Cost), RawUnits::Count(n)) => Nanos::parse_credits(&n.to_string())
            .map(|n| u64::try_from(n.0).unwrap_or(0))
            .map_err(|e| e.to_string()),
        (_, RawUnits::Count(n)) => u64::try_from(*n).map_err(|_| "must be positive".to_string()),
        (_, RawUnits::Text(_)) => {
            Err("must be a whole number (only a cost allowance is an amount)".into())
        }
    };
    match units {
        Ok(0) => {
            p.push(path, "must be more than zero");
            None
        }
        Ok(units) => Some(units),
        Err(e) => {
            p.push(path, e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::config::Config;
    use tollgate_core::Nanos;

    fn problems(toml: &str) -> String {
        Config::load(toml, Vec::<(String, String)>::new())
            .unwrap_err()
            .to_string()
    }

    const ROUTE: &str =
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://127.0.0.1:9\"\ngroup = \"llm\"\n";

    #[test]
    fn every_plan_problem_is_reported_at_once() {
        let text = format!(
            r#"{ROUTE}
[billing]
default_plan = "gold"

[[plans]]
name = "free"
period = "fortnight"
anchor = "signup"
time_zone = "Mars/Olympus"
grace = "soon"
stripe_prices = ["price_x"]

[[plans.allowances]]
name = "calls"
meter = "calls"
units = 0
overage = "beg"
routes = "nope"

[[plans.allowances]]
name = "calls"
meter = "tokens"
units = "12.5"

[[plans.allowances]]
name = "spend"
meter = "cost"
units = "-1"

[[plans]]
name = "weekly"
period = "week"
price = "ten"
discounts = {{ nope = 20, llm = 101 }}
rate_limits = {{ nope = {{ limit = 1 }}, anonymous-per-ip = {{ limit = 5 }}, per-key = {{ limit = 0 }} }}
stripe_prices = ["price_x", " "]

[[plans.allowances]]
name = "calls"
meter = "requests"
units = 100
rollover = 150

[[plans.allowances.windows]]
every = "week"
units = 10

[[plans.allowances.windows]]
every = "day"
units = 200

[[plans.allowances.windows]]
every = "hour"
units = 1

[[plans]]
name = "free"

[[plans]]
name = "free2"
period = "soon"
[[plans.allowances]]
name = "calls \"now\""
meter = "requests"
units = 10
[[plans.allowances.windows]]
every = "day"
units = 1
"#
        );
        assert_reports(
            &problems(&text),
            &[
                "plans[0].period: 'fortnight' is not a period (day, week or month)",
                "plans[0].anchor: 'signup' is not an anchor (calendar or subscription)",
                "plans[0].time_zone: 'Mars/Olympus' is not an IANA time zone",
                "plans[0].grace: must be a duration",
                "plans[0].allowances[0].meter: 'calls' is not a meter (requests, tokens or cost)",
                "plans[0].allowances[0].overage: 'beg' is not an overage rule (block, wallet or soft)",
                "plans[0].allowances[0].routes: 'nope' is not the group of any route",
                "plans[0].allowances[1].name: 'calls' names another allowance of this plan",
                "plans[0].allowances[1].units: must be a whole number",
                "plans[0].allowances[2].units:",
                "plans[2].name: 'free' names another plan already",
                "plans[1].price: 'ten' is not a decimal amount",
                "plans[1].price: a plan sold through Stripe (stripe_prices) is paid there: leave price out",
                "plans[1].stripe_prices[0]: 'price_x' is sold as the 'free' plan already",
                "plans[1].stripe_prices[1]: must be a Stripe Price id (price_...)",
                "plans[1].discounts.nope: 'nope' is not the group of any route",
                "plans[1].discounts.llm: must be a whole percent from 1 to 100",
                "plans[1].rate_limits.nope: is not a configured rate-limit policy",
                "plans[1].rate_limits.anonymous-per-ip: has scope 'ip'; only key, key+route or account policies can be overridden here",
                "plans[1].rate_limits.per-key: limit must be at least 1",
                "plans[1].allowances[0].rollover: must be at most the allowance's 100 units",
                "plans[1].allowances[0].windows[0].every: a week window must be shorter than its week period",
                "plans[1].allowances[0].windows[1].units: must be at most the allowance's 100 units",
                "plans[1].allowances[0].windows[2].every: 'hour' is not a window (day or week)",
                "plans[3].period: 'soon' is not a period (day, week or month)",
                "plans[3].allowances[0].name: must be 1 to 64 of A-Z a-z 0-9 - _ .",
                "billing.default_plan: 'gold' is not a plan in [[plans]]",
            ],
        );
    }

    fn assert_reports(report: &str, expected: &[&str]) {
        for line in expected {
            assert!(report.contains(line), "missing {line:?} in:\n{report}");
        }
    }

    #[test]
    fn the_default_plan_counts_calendar_periods() {
        let text = format!(
            "{ROUTE}\n[billing]\ndefault_plan = \"pro\"\n\n[[plans]]\nname = \"pro\"\nanchor = \"subscription\"\n"
        );
        assert_reports(
            &problems(&text),
            &["billing.default_plan: 'pro' is anchored to a subscription; the default plan needs calendar periods"],
        );
    }

    #[test]
    fn every_pack_problem_is_reported_at_once() {
        let text = format!(
            r#"{ROUTE}
[[packs]]
name = "ten calls"
meter = "calls"
routes = "nope"
units = 0
price = "free"
valid_for = "forever"

[[packs]]
name = "tokens"
meter = "tokens"
units = 1000
price = "0"
valid_for = "30d"

[[packs]]
name = "tokens"
meter = "cost"
units = "2.50"
price = "1.00"
valid_for = "90d"
"#
        );
        assert_reports(
            &problems(&text),
            &[
                "packs[0].name: must be 1 to 64 of A-Z a-z 0-9 - _ .",
                "packs[0].meter: 'calls' is not a meter (requests, tokens or cost)",
                "packs[0].routes: 'nope' is not the group of any route",
                "packs[0].units: must be more than zero",
                "packs[0].price: 'free' is not a decimal amount",
                "packs[0].valid_for: must be a duration, e.g. 90d",
                "packs[1].price: must be more than zero",
                "packs[2].name: 'tokens' names another pack already",
            ],
        );
        let valid = format!(
            "{ROUTE}\n[[packs]]\nname = \"spend\"\nmeter = \"cost\"\nroutes = \"llm\"\nunits = \"2.50\"\nprice = \"2\"\nvalid_for = \"90d\"\n"
        );
        let config = Config::load(&valid, Vec::<(String, String)>::new()).unwrap();
        let pack = config.plans.pack("spend").unwrap();
        assert_eq!((pack.units, pack.price.0), (2_500_000_000, 2_000_000_000));
        assert_eq!(pack.valid_for, chrono::Duration::days(90));
    }

    #[test]
    fn the_default_plan_is_free() {
        let text = format!(
            "{ROUTE}\n[billing]\ndefault_plan = \"pro\"\n\n[[plans]]\nname = \"pro\"\nprice = \"9.99\"\n"
        );
        assert_reports(
            &problems(&text),
            &["billing.default_plan: 'pro' has a price; the default plan must be free"],
        );
    }

    #[test]
    fn a_valid_plan_reads_with_its_defaults() {
        let text = format!(
            r#"{ROUTE}
[billing]
default_plan = "free"

[[plans]]
name = "free"

[[plans.allowances]]
name = "requests"
meter = "requests"
units = 5

[[plans.allowances]]
name = "spend"
meter = "cost"
routes = "llm"
units = "2.50"
overage = "wallet"

[[plans]]
name = "pro"
price = "9.99"
discounts = {{ llm = 20 }}
rate_limits = {{ per-key = {{ limit = 10, window_seconds = 1 }} }}
"#
        );
        let config = Config::load(&text, Vec::<(String, String)>::new()).unwrap();
        let pro = config.plans.get("pro").unwrap();
        assert_eq!(pro.price.0, 9_990_000_000);
        assert_eq!(
            (pro.discount_for("llm"), pro.discount_for("other")),
            (20, 0)
        );
        assert_eq!(pro.rate_limits["per-key"].limit, 10);
        let plan = config.plans.default_plan().unwrap();
        assert_eq!(plan.name, "free");
        assert_eq!(plan.grace, chrono::Duration::days(7));
        assert_eq!(plan.price, Nanos::ZERO);
        assert_eq!(plan.allowances[0].units, 5);
        assert_eq!(plan.allowances[1].units, 2_500_000_000);
        assert_eq!(plan.allowance_for("llm").unwrap().name, "requests");
    }
}
