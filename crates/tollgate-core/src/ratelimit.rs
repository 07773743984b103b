//! Rate-limit policies and GCRA, the generic cell rate algorithm: smooth, burstable, one number
//! of state per policy and subject (its theoretical arrival time, TAT).
//!
//! A policy admits `limit` units per `window` at a steady pace (one every `T = window / limit`),
//! plus `burst` units ahead of that pace. Admitting `n` units moves the TAT `n × T` forward from
//! `max(TAT, now)`; a request is admitted only if the new TAT is at most `(burst + 1) × T` ahead of
//! now. So a fresh subject may send `burst + 1` units at once, and no half-open interval of one
//! window ever admits more than `limit + burst`.
//!
//! Time is kept exactly, in integers: every instant is multiplied by `limit`, so `T` becomes
//! `window` (in nanoseconds) and no division ever rounds.

use crate::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Whose usage a policy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Per client address, for requests that end without an authenticated caller.
    #[serde(rename = "ip")]
    Ip,
    #[serde(rename = "key")]
    Key,
    #[serde(rename = "account")]
    Account,
    /// Everyone on the route together: protects the upstream.
    #[serde(rename = "route")]
    Route,
    #[serde(rename = "key+route")]
    KeyRoute,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ip => "ip",
            Scope::Key => "key",
            Scope::Account => "account",
            Scope::Route => "route",
            Scope::KeyRoute => "key+route",
        }
    }
}

/// What a policy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Requests,
    /// LLM tokens (input + output): the estimate is reserved first, corrected to the actual after.
    Tokens,
    /// Cost in nano-units: the hold is reserved first, corrected to the charge after.
    Cost,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
            Unit::Cost => "cost",
        }
    }
}

/// One rate-limit policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Named in headers and errors; unique among the policies that apply to a request.
    pub name: String,
    pub scope: Scope,
    pub unit: Unit,
    /// Units per window, at least 1.
    pub limit: u64,
    /// At least one millisecond.
    pub window: Duration,
    /// Units admitted ahead of the steady pace.
    pub burst: u64,
    /// What a request meets when the limiter cannot be reached.
    pub on_limiter_failure: FailureMode,
}

/// When a shared limiter cannot be reached: admit the request (`open`, and count it) or refuse it
/// with 503 `service_unavailable` (`closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    #[default]
    Open,
    Closed,
}

/// The state of a policy for one subject after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Whether this policy admitted the request.
    pub admitted: bool,
    /// Units that could be admitted at once now (after this request, if admitted).
    pub remaining: u64,
    /// Until the subject is back to full capacity.
    pub reset_after: Duration,
    /// Until this request would be admitted; zero when it was.
    pub retry_after: Duration,
}

/// GCRA state: the theoretical arrival time, in nanoseconds × limit. `None` is a fresh subject.
pub type Tat = u128;

impl Policy {
    fn window_ns(&self) -> u128 {
        self.window.as_nanos().max(1)
    }

    fn scaled(&self, now: Duration) -> u128 {
        now.as_nanos() * u128::from(self.limit.max(1))
    }

    /// How far ahead of now the TAT may run: `(burst + 1) × T`, scaled.
    fn capacity(&self) -> u128 {
        (u128::from(self.burst) + 1) * self.window_ns()
    }

    fn unscale(&self, scaled: u128) -> Duration {
        let nanos = scaled.div_ceil(u128::from(self.limit.max(1)));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Decides a request of `cost` units at `now` (time since any fixed epoch). Returns the
    /// standing and, if admitted, the TAT to store.
    pub fn decide(&self, tat: Option<Tat>, now: Duration, cost: u64) -> (Standing, Option<Tat>) {
        let now_s = self.scaled(now);
        let base = tat.map_or(now_s, |tat| tat.max(now_s));
        let new_tat = base + u128::from(cost) * self.window_ns();
        let allowed_until = now_s + self.capacity();
        if new_tat <= allowed_until {
            (self.standing(new_tat, now_s, true, 0), Some(new_tat))
        } else {
            (
                self.standing(base, now_s, false, new_tat - allowed_until),
                None,
            )
        }
    }

    /// The standing of a subject without consuming anything: `admitted` says whether one more
    /// unit would be, `retry_after` how long until it would.
    pub fn peek(&self, tat: Option<Tat>, now: Duration) -> Standing {
        let now_s = self.scaled(now);
        let base = tat.map_or(now_s, |tat| tat.max(now_s));
        let wait = (base + self.window_ns()).saturating_sub(now_s + self.capacity());
        self.standing(base, now_s, wait == 0, wait)
    }

    fn standing(&self, tat: u128, now_s: u128, admitted: bool, wait: u128) -> Standing {
        let ahead = tat - now_s;
        Standing {
            admitted,
            remaining: u64::try_from(self.capacity().saturating_sub(ahead) / self.window_ns())
                .unwrap_or(u64::MAX),
            reset_after: self.unscale(ahead),
            retry_after: self.unscale(wait),
        }
    }

    /// The TAT after correcting a reservation by `delta` units (negative: return units). The TAT
    /// never moves back past `now`, so returned units cannot build up credit beyond a fresh start.
    pub fn adjust(&self, tat: Tat, now: Duration, delta: i64) -> Tat {
        let step = u128::from(delta.unsigned_abs()) * self.window_ns();
        if delta >= 0 {
            tat + step
        } else {
            tat.saturating_sub(step).max(self.scaled(now))
        }
    }

    /// The most units admitted at once, by a fresh subject: `burst + 1`. `Standing::remaining`
    /// counts down from it, so the rate-limit headers give it as the limit.
    pub fn at_once(&self) -> u64 {
        self.burst.saturating_add(1)
    }

    /// The 429 for a request of `cost` units this policy refused, which it would admit after
    /// `retry_after` (if it ever could): `Retry-After` in whole seconds, rounded up.
    pub fn refusal(&self, cost: u64, retry_after: Duration) -> ApiError {
        let retry = retry_after.as_nanos().div_ceil(1_000_000_000).max(1);
        let retry = u64::try_from(retry).unwrap_or(u64::MAX);
        let message = if self.can_ever_admit(cost) {
            format!(
                "Rate limit '{}' exceeded ({} {} per {}). Retry after {retry} s.",
                self.name,
                self.limit,
                self.unit.as_str(),
                humantime::format_duration(self.window)
            )
        } else {
            format!(
                "This request needs {cost} {} at once, more than the rate limit '{}' ever allows ({}).",
                self.unit.as_str(),
                self.name,
                self.at_once()
            )
        };
        ApiError::new(ErrorCode::RateLimited, message)
            .with_detail("policy", self.name.clone())
            .with_detail("scope", self.scope.as_str())
            .with_detail("unit", self.unit.as_str())
            .with_detail("limit", self.limit)
            .with_detail("window_seconds", self.window.as_secs_f64())
            .with_retry_after(retry)
    }

    /// Whether a single request of `cost` units could ever be admitted.
    pub fn can_ever_admit(&self, cost: u64) -> bool {
        u128::from(cost) <= u128::from(self.burst) + 1
    }

    /// This policy with an account's or key's own numbers; what the override leaves out stays.
    pub fn overridden(&self, with: &LimitOverride) -> Policy {
        Policy {
            limit: with.limit,
            window: with.window_seconds.map_or(self.window, Duration::from_secs),
            burst: with.burst.unwrap_or(self.burst),
            ..self.clone()
        }
    }
}

/// An account's or key's own numbers for a configured policy, set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LimitOverride {
    pub limit: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

/// Overrides by policy name.
pub type Overrides = BTreeMap<String, LimitOverride>;

impl Scope {
    /// Whether a key's own override may replace a policy of this scope (the key's own usage).
    pub fn keyed(self) -> bool {
        matches!(self, Scope::Key | Scope::KeyRoute)
    }

    /// Whether an account's override may replace a policy of this scope: its own, and the
    /// per-key policies of its keys (where a key has no override of its own).
    pub fn accounted(self) -> bool {
        self.keyed() || self == Scope::Account
    }
}

/// Of several standings, the one closest to refusing, which a client should pace itself by: a
/// refusal first, then the fewest units left relative to what the policy admits at once
/// (`remaining / (burst + 1)`), the first such on a tie.
pub fn most_restrictive<'a>(
    standings: impl IntoIterator<Item = (&'a Policy, Standing)>,
) -> Option<(&'a Policy, Standing)> {
    standings.into_iter().reduce(|best, next| {
        let size = |p: &Policy| u128::from(p.at_once());
        // a/b < c/d  ⇔  a·d < c·b, in integers; only sizes near 2⁶⁴ can overflow that, and
        // those are compared as ratios.
        let (a, b) = (u128::from(next.1.remaining), size(next.0));
        let (c, d) = (u128::from(best.1.remaining), size(best.0));
        let next_tighter = match (a.checked_mul(d), c.checked_mul(b)) {
            (Some(ad), Some(cb)) => ad < cb,
            _ => (a as f64 / b as f64) < (c as f64 / d as f64),
        };
        let refused_first = !next.1.admitted && best.1.admitted;
        if refused_first || (next.1.admitted == best.1.admitted && next_tighter) {
            next
        } else {
            best
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Found by the `rate_limit_headers` fuzz target: the cross-multiplication overflowed u128.
    #[test]
    fn the_most_restrictive_of_policies_near_the_largest_sizes_is_chosen_without_overflow() {
        let huge = Policy {
            limit: u64::MAX,
            burst: u64::MAX,
            ..policy(1, 1000, 0)
        };
        let standing = |remaining| Standing {
            admitted: true,
            remaining,
            reset_after: Duration::ZERO,
            retry_after: Duration::ZERO,
        };
        let (_, chosen) =
            most_restrictive([(&huge, standing(u64::MAX)), (&huge, standing(u64::MAX / 2))])
                .unwrap();
        assert_eq!(chosen.remaining, u64::MAX / 2);
        let small = policy(10, 1000, 0);
        let (tightest, _) =
            most_restrictive([(&huge, standing(u64::MAX)), (&small, standing(0))]).unwrap();
        assert_eq!(tightest.limit, 10);
    }

    fn policy(limit: u64, window_ms: u64, burst: u64) -> Policy {
        Policy {
            name: "p".into(),
            scope: Scope::Key,
            unit: Unit::Requests,
            limit,
            window: Duration::from_millis(window_ms),
            burst,
            on_limiter_failure: Default::default(),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Sends one request at each time, returning which were admitted.
    fn run(p: &Policy, times: &[Duration]) -> Vec<bool> {
        let mut tat = None;
        times
            .iter()
            .map(|&t| {
                let (standing, new) = p.decide(tat, t, 1);
                if new.is_some() {
                    tat = new;
                }
                standing.admitted
            })
            .collect()
    }

    #[test]
    fn a_fresh_subject_gets_its_burst_plus_one_then_the_steady_pace() {
        // 60 a minute: one a second; burst 2 lets three through at once.
        let p = policy(60, 60_000, 2);
        let at_once = run(&p, &[secs(100); 4]);
        assert_eq!(at_once, [true, true, true, false]);
        let mut tat = None;
        for _ in 0..3 {
            tat = p.decide(tat, secs(100), 1).1;
        }
        let (refused, _) = p.decide(tat, secs(100), 1);
        assert_eq!(refused.retry_after, secs(1));
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset_after, secs(3));
        // One second later exactly one more fits; a nanosecond earlier, none.
        let just_before = secs(101) - Duration::from_nanos(1);
        assert!(!p.decide(tat, just_before, 1).0.admitted);
        let (next, _) = p.decide(tat, secs(101), 1);
        assert!(next.admitted);
        assert_eq!(next.remaining, 0);
        // Idle long enough, the subject is back to full capacity.
        let full = p.peek(tat, secs(200));
        assert_eq!((full.remaining, full.reset_after), (3, Duration::ZERO));
        // Peeking at an exhausted subject says so, and when it will have room, without consuming.
        let mut spent = None;
        for _ in 0..3 {
            spent = p.decide(spent, secs(300), 1).1;
        }
        let peeked = p.peek(spent, secs(300));
        assert!(!peeked.admitted);
        assert_eq!((peeked.remaining, peeked.retry_after), (0, secs(1)));
        assert_eq!(p.peek(spent, secs(300)), peeked);
    }

    #[test]
    fn without_burst_requests_are_paced_exactly() {
        // 3 a second: one every 333.33… ms after the last admitted, computed without rounding.
        let p = policy(3, 1_000, 0);
        let t = |ms: u64| Duration::from_millis(ms);
        let admitted = run(
            &p,
            &[t(0), t(333), t(334), t(667), t(668), t(1_001), t(1_002)],
        );
        assert_eq!(admitted, [true, false, true, false, true, false, true]);
    }

    #[test]
    fn a_refused_request_consumes_nothing() {
        let p = policy(1, 1_000, 0);
        let (_, tat) = p.decide(None, secs(0), 1);
        let (refused, unchanged) = p.decide(tat, secs(0), 1);
        assert!(!refused.admitted && unchanged.is_none());
        assert!(p.decide(tat, secs(1), 1).0.admitted);
    }

    #[test]
    fn costs_larger_than_one_and_corrections() {
        // 1000 tokens a minute, burst 999: up to 1000 at once.
        let p = Policy {
            unit: Unit::Tokens,
            ..policy(1_000, 60_000, 999)
        };
        assert!(p.can_ever_admit(1_000) && !p.can_ever_admit(1_001));
        let (first, tat) = p.decide(None, secs(0), 800);
        assert_eq!(first.remaining, 200);
        assert!(!p.decide(tat, secs(0), 300).0.admitted);
        // The call used 100 tokens, not 800: 700 come back.
        let corrected = p.adjust(tat.unwrap(), secs(0), -700);
        assert_eq!(p.peek(Some(corrected), secs(0)).remaining, 900);
        // Returning more than was taken cannot bank credit.
        let over = p.adjust(corrected, secs(0), -5_000);
        assert_eq!(p.peek(Some(over), secs(0)).remaining, 1_000);
        // Using more than reserved pushes the subject back.
        let used_more = p.adjust(corrected, secs(0), 500);
        assert_eq!(p.peek(Some(used_more), secs(0)).remaining, 400);
    }

    #[test]
    fn the_most_restrictive_is_the_relatively_emptiest_and_a_refusal_first() {
        let small = policy(10, 1_000, 9);
        let big = policy(1_000, 1_000, 999);
        let standing = |remaining, admitted| Standing {
            admitted,
            remaining,
            reset_after: Duration::ZERO,
            retry_after: Duration::ZERO,
        };
        let pick = most_restrictive([(&small, standing(5, true)), (&big, standing(100, true))]);
        assert!(std::ptr::eq(pick.unwrap().0, &big));
        let pick = most_restrictive([(&small, standing(0, false)), (&big, standing(1, true))]);
        assert!(std::ptr::eq(pick.unwrap().0, &small));
    }

    proptest! {
        /// Over any half-open window, a policy admits at most limit + burst, whatever the
        /// arrival pattern; and a steady client at the policy's pace is never refused.
        #[test]
        fn no_window_admits_more_than_limit_plus_burst(
            limit in 1u64..50,
            window_ms in 1u64..5_000,
            burst in 0u64..20,
            gaps in proptest::collection::vec(0u64..400, 1..300),
        ) {
            let p = policy(limit, window_ms, burst);
            let mut t = Duration::from_secs(1_000);
            let mut times = Vec::new();
            for gap in gaps {
                t += Duration::from_millis(gap) / 4;
                times.push(t);
            }
            let admitted: Vec<Duration> = times
                .iter()
                .zip(run(&p, &times))
                .filter_map(|(t, ok)| ok.then_some(*t))
                .collect();
            let window = p.window;
            for (i, start) in admitted.iter().enumerate() {
                let inside = admitted[i..].iter().take_while(|t| **t < *start + window).count();
                prop_assert!(inside as u64 <= limit + burst, "{inside} in one window");
            }
            // A client sending exactly at the pace is always admitted.
            // Each one a whole period (rounded up to a nanosecond) after the one before.
            let period = u64::try_from(p.window.as_nanos().div_ceil(u128::from(limit))).unwrap();
            let on_pace: Vec<Duration> = (0..20u64)
                .map(|i| Duration::from_secs(1_000) + Duration::from_nanos(period * i))
                .collect();
            prop_assert!(run(&p, &on_pace).iter().all(|ok| *ok));
        }
    }
}
