//! Rate limiting: the [`Limiter`] trait, the in-process [`LocalLimiter`], which policies apply to
//! a request, and the headers that tell a client where it stands.
//!
//! Every policy that applies to a request is decided in one [`Limiter::acquire`] call, which
//! consumes all of them or none (a request one policy refuses costs the others nothing). Token and
//! cost policies reserve an estimate first; [`Limiter::adjust`] corrects them to the actual usage.
//! The GCRA arithmetic is `tollgate_core::ratelimit`; a backend only stores TATs atomically.

use crate::access::keys::CachedKey;
use crate::config::{Config, RouteConfig};
use crate::http::error::HttpError;
use crate::telemetry::Metrics;
use async_trait::async_trait;
use http::{HeaderMap, HeaderValue};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::ratelimit::{most_restrictive, FailureMode, Policy, Standing, Tat};
use tollgate_core::ratelimit::{Scope, Unit};
use tollgate_core::{ApiError, Clock, ErrorCode};

/// Units asked of one policy for one subject (`key:<id>`, `acct:<id>`, `route:<prefix>`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub policy: Arc<Policy>,
    /// Where the subject's state lives, built once: the policy (with its limit and window, so a
    /// policy whose limit changes starts afresh rather than reading a TAT scaled for another
    /// limit) and the subject.
    state_key: String,
    pub cost: u64,
}

impl Demand {
    pub fn new(policy: Arc<Policy>, subject: &str, cost: u64) -> Demand {
        let state_key = format!(
            "{}|{}|{}|{subject}",
            policy.name,
            policy.limit,
            policy.window.as_nanos()
        );
        Demand {
            policy,
            state_key,
            cost,
        }
    }

    /// The key a backend stores this subject's state under.
    pub fn state_key(&self) -> &str {
        &self.state_key
    }
}

/// The answer to [`Limiter::acquire`]: each demand's standing, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    pub standings: Vec<Standing>,
}

#[derive(Debug, thiserror::Error)]
#[error("rate limiter unavailable: {0}")]
pub struct LimiterUnavailable(pub String);

#[async_trait]
pub trait Limiter: Send + Sync {
    /// Decides every demand; consumes them all if every one is admitted, else none. When
    /// refused, the standings of the policies that would have admitted show them as they are.
    async fn acquire(&self, demands: &[Demand]) -> Result<Verdict, LimiterUnavailable>;
    /// Corrects admitted demands by `delta` units each (negative: give units back).
    async fn adjust(&self, corrections: &[(Demand, i64)]) -> Result<(), LimiterUnavailable>;
    /// Each demand's standing, consuming nothing (`admitted`: one more unit would be).
    async fn peek(&self, demands: &[Demand]) -> Result<Vec<Standing>, LimiterUnavailable>;
    /// Whether the limiter can decide now (readiness); the in-process one always can.
    async fn ping(&self) -> Result<(), LimiterUnavailable> {
        Ok(())
    }
    /// Where decisions are made, as `/readyz` names it: `local` or `redis`.
    fn backend(&self) -> &'static str {
        "local"
    }
}

/// The in-process limiter: TATs in one map behind a mutex (a decision is a few arithmetic
/// operations per policy, so the lock is held for well under a microsecond). Subjects back at
/// full capacity are dropped when the map has doubled since the last sweep, so memory follows
/// the number of recently active subjects.
pub struct LocalLimiter {
    clock: Arc<dyn Clock>,
    state: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    tats: HashMap<String, (Tat, Arc<Policy>)>,
    sweep_at: usize,
}

const MIN_SWEEP_SIZE: usize = 1024;

impl LocalLimiter {
    pub fn new(clock: Arc<dyn Clock>) -> LocalLimiter {
        LocalLimiter {
            clock,
            state: Mutex::new(LocalState::default()),
        }
    }

    fn now(&self) -> Duration {
        since_epoch(self.clock.now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Time since the Unix epoch, as the GCRA takes it.
pub fn since_epoch(at: chrono::DateTime<chrono::Utc>) -> Duration {
    Duration::from_nanos(u64::try_from(at.timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0))
}

#[async_trait]
impl Limiter for LocalLimiter {
    async fn acquire(&self, demands: &[Demand]) -> Result<Verdict, LimiterUnavailable> {
        let now = self.now();
        let mut state = self.lock();
        let decisions: Vec<_> = demands
            .iter()
            .map(|demand| {
                let tat = state.tats.get(demand.state_key()).map(|(tat, _)| *tat);
                demand.policy.decide(tat, now, demand.cost)
            })
            .collect();
        let admitted = decisions.iter().all(|(standing, _)| standing.admitted);
        if admitted {
            for (demand, (_, tat)) in demands.iter().zip(&decisions) {
                let Some(tat) = *tat else { continue };
                // Known subjects update in place; only a new one allocates its key.
                match state.tats.get_mut(demand.state_key()) {
                    Some(entry) => entry.0 = tat,
                    None => {
                        state
                            .tats
                            .insert(demand.state_key.clone(), (tat, demand.policy.clone()));
                    }
                }
            }
            state.sweep(now);
        }
        // Refused, nothing was consumed: a policy that would have admitted shows where it stands.
        let standings = decisions
            .into_iter()
            .zip(demands)
            .map(|((standing, _), demand)| {
                if admitted || !standing.admitted {
                    standing
                } else {
                    Standing {
                        admitted: true,
                        ..state.peek(demand, now)
                    }
                }
            })
            .collect();
        Ok(Verdict {
            admitted,
            standings,
        })
    }

    async fn adjust(&self, corrections: &[(Demand, i64)]) -> Result<(), LimiterUnavailable> {
        let now = self.now();
        let mut state = self.lock();
        for (demand, delta) in corrections {
            if let Some((tat, policy)) = state.tats.get_mut(demand.state_key()) {
                *tat = policy.adjust(*tat, now, *delta);
            }
        }
        Ok(())
    }

    async fn peek(&self, demands: &[Demand]) -> Result<Vec<Standing>, LimiterUnavailable> {
        let now = self.now();
        let state = self.lock();
        Ok(demands.iter().map(|d| state.peek(d, now)).collect())
    }
}

impl LocalState {
    fn peek(&self, demand: &Demand, now: Duration) -> Standing {
        let tat = self.tats.get(demand.state_key()).map(|(tat, _)| *tat);
        demand.policy.peek(tat, now)
    }

    fn sweep(&mut self, now: Duration) {
        if self.tats.len() < self.sweep_at.max(MIN_SWEEP_SIZE) {
            return;
        }
        self.tats
            .retain(|_, (tat, policy)| policy.peek(Some(*tat), now).reset_after > Duration::ZERO);
        self.sweep_at = self.tats.len() * 2;
    }
}

/// What a request may cost before it is made, for token and cost policies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimate {
    pub tokens: u64,
    pub cost_nanos: u64,
}

impl Estimate {
    /// What a request asks of a policy counting `unit`.
    fn units(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Requests => 1,
            Unit::Tokens => self.tokens,
            Unit::Cost => self.cost_nanos,
        }
    }
}

/// The demands of every policy that applies to a call by `key` (on `route`, for the data plane).
/// Route and key+route policies need a route, so they do not apply to the management API. A
/// policy takes the key's own override, else its account's, else its plan's, else the configured
/// numbers.
pub fn demands_for(
    config: &Config,
    route: Option<&RouteConfig>,
    cached: &CachedKey,
    estimate: Estimate,
) -> Vec<Demand> {
    let key = &*cached.record;
    let plan = config.plans.of(cached.subscription.as_deref());
    let route_policies = route.map(|r| r.rate_limits.as_slice()).unwrap_or_default();
    config
        .rate_limits
        .iter()
        .chain(route_policies)
        .filter_map(|policy| {
            let subject = match (policy.scope, route) {
                (Scope::Key, _) => format!("key:{}", key.id),
                (Scope::Account, _) => format!("acct:{}", key.account_id),
                (Scope::Route, Some(route)) => format!("route:{}", route.prefix),
                (Scope::KeyRoute, Some(route)) => format!("key:{}|route:{}", key.id, route.prefix),
                (Scope::Route | Scope::KeyRoute, None) | (Scope::Ip, _) => return None,
            };
            let own = policy
                .scope
                .keyed()
                .then(|| key.rate_limits.get(&policy.name))
                .flatten();
            let accounts = || {
                policy
                    .scope
                    .accounted()
                    .then(|| cached.account_rate_limits.get(&policy.name))
                    .flatten()
            };
            let plans = || {
                policy
                    .scope
                    .accounted()
                    .then(|| plan.and_then(|p| p.rate_limits.get(&policy.name)))
                    .flatten()
            };
            let policy = match own.or_else(accounts).or_else(plans) {
                Some(numbers) => Arc::new(policy.overridden(numbers)),
                None => policy.clone(),
            };
            let cost = estimate.units(policy.unit);
            Some(Demand::new(policy, &subject, cost))
        })
        .collect()
}

/// Checks rate-limit overrides for a key (`for_account` false) or an account against the
/// configured policies.
pub fn check_overrides(
    config: &Config,
    overrides: &Overrides,
    for_account: bool,
) -> Vec<(String, String)> {
    let configured = config
        .rate_limits
        .iter()
        .chain(&config.anonymous_limits)
        .chain(config.routes.iter().flat_map(|r| r.rate_limits.iter()));
    crate::config::check_overrides(configured, overrides, for_account)
}

/// Where the request stands, as whoever identified the caller left it for [`layer`].
#[derive(Debug, Clone)]
pub enum Standings {
    /// The caller is known but nothing was consumed (the request failed first): show where the
    /// request-count policies stand.
    Identified(Vec<Demand>),
    /// Decided and, if admitted, consumed.
    Decided(LimitHeaders),
    /// The admin: not rate-limited.
    Exempt,
}

/// A request's slot for its [`Standings`], put in its extensions by [`layer`], with the quota
/// of its plan's allowance and any warning for the caller.
#[derive(Debug, Clone, Default)]
pub struct LimitSlot(Arc<Mutex<Slot>>);

#[derive(Debug, Default)]
struct Slot {
    standings: Option<Standings>,
    quotas: Vec<QuotaItem>,
    warnings: Vec<String>,
}

/// An included-units quota, as an IETF quota policy beside the rate-limit policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaItem {
    pub name: String,
    pub limit: u64,
    pub window_seconds: u64,
    /// The quota unit (`qu`): `request`, `token` or `nanocredit`.
    pub unit: &'static str,
    pub remaining: u64,
    pub reset_seconds: u64,
}

impl LimitSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, standings: Standings) {
        self.lock().standings = Some(standings);
    }

    pub(crate) fn take(&self) -> Option<Standings> {
        self.lock().standings.take()
    }

    /// The quotas of the call's allowance (and its windows), replacing any set before.
    pub fn set_quotas(&self, quotas: Vec<QuotaItem>) {
        self.lock().quotas = quotas;
    }

    /// A warning for the caller (`X-Tollgate-Warning`): the call passed, but something is wrong.
    pub fn warn(&self, warning: String) {
        self.lock().warnings.push(warning);
    }

    /// Adds the quotas to the `RateLimit-Policy` and `RateLimit` fields (after any rate-limit
    /// policies) and the warnings.
    pub(crate) fn apply_notes(&self, headers: &mut HeaderMap) {
        let slot = self.lock();
        for quota in &slot.quotas {
            let policy = format!(
                "\"{}\";q={};w={};qu=\"{}\"",
                quota.name, quota.limit, quota.window_seconds, quota.unit
            );
            let standing = format!(
                "\"{}\";r={};t={}",
                quota.name, quota.remaining, quota.reset_seconds
            );
            for (name, item) in [("ratelimit-policy", policy), ("ratelimit", standing)] {
                let value = match headers.get(name).and_then(|v| v.to_str().ok()) {
                    Some(list) if !list.is_empty() => format!("{list}, {item}"),
                    _ => item,
                };
                if let Ok(value) = HeaderValue::try_from(value) {
                    headers.insert(name, value);
                }
            }
        }
        for warning in &slot.warnings {
            if let Ok(value) = HeaderValue::try_from(warning.as_str()) {
                headers.append(crate::http::headers::TOLLGATE_WARNING, value);
            }
        }
    }
}

/// Decides `demands` for an identified caller, records the outcome in the request's slot, and
/// answers 429 `rate_limited` when a policy refuses.
pub async fn admit(
    limiter: &dyn Limiter,
    metrics: &Metrics,
    clock: &dyn Clock,
    slot: Option<&LimitSlot>,
    demands: &[Demand],
) -> Result<(), HttpError> {
    if demands.is_empty() {
        // Known, with no policy to count against: not an anonymous request either.
        if let Some(slot) = slot {
            slot.set(Standings::Identified(Vec::new()));
        }
        return Ok(());
    }
    let now = since_epoch(clock.now());
    let verdict = match limiter.acquire(demands).await {
        Ok(verdict) => verdict,
        Err(e) => return limiter_failed(metrics, demands, &e),
    };
    if let Some(slot) = slot {
        slot.set(Standings::Decided(LimitHeaders::new(
            demands,
            &verdict.standings,
            now,
        )));
    }
    if verdict.admitted {
        Ok(())
    } else {
        Err(refused(metrics, demands, &verdict).into())
    }
}

/// Decides the demands the slot holds as [`Standings::Identified`], with the token and cost
/// estimates filled in, so they are built once per request. Returns them for the corrections.
pub async fn admit_identified(
    limiter: &dyn Limiter,
    metrics: &Metrics,
    clock: &dyn Clock,
    slot: &LimitSlot,
    estimate: Estimate,
) -> Result<Vec<Demand>, HttpError> {
    let mut demands = match slot.take() {
        Some(Standings::Identified(demands)) => demands,
        _ => Vec::new(),
    };
    for demand in &mut demands {
        demand.cost = estimate.units(demand.policy.unit);
    }
    admit(limiter, metrics, clock, Some(slot), &demands).await?;
    Ok(demands)
}

/// The limiter could not decide: refused with 503 if any policy fails closed, else admitted
/// unlimited. Either way counted, so an operator sees how much traffic went undecided.
fn limiter_failed(
    metrics: &Metrics,
    demands: &[Demand],
    e: &LimiterUnavailable,
) -> Result<(), HttpError> {
    let closed = demands
        .iter()
        .find(|d| d.policy.on_limiter_failure == FailureMode::Closed);
    metrics.limiter_failure(closed.is_none());
    let Some(closed) = closed else {
        tracing::warn!(error = %e, "rate limiter unavailable: admitted (policies fail open)");
        return Ok(());
    };
    tracing::error!(error = %e, policy = %closed.policy.name, "rate limiter unavailable: refused");
    Err(HttpError::from(
        ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The rate limiter is unavailable. Nothing was charged; retry shortly.",
        )
        .with_detail("dependency", "rate_limiter")
        .with_detail("policy", closed.policy.name.as_str())
        .with_retry_after(1),
    ))
}

/// [`refusal`], counted in the metrics under the policy it names.
pub fn refused(metrics: &Metrics, demands: &[Demand], verdict: &Verdict) -> ApiError {
    let error = refusal(demands, verdict);
    if let Some(policy) = error.details.get("policy").and_then(|p| p.as_str()) {
        metrics.rate_limited(policy);
    }
    error
}

/// The 429 for a refused request: `Retry-After` from the policy that refused it (the longest
/// wait, if several did), `details.policy` naming it.
pub fn refusal(demands: &[Demand], verdict: &Verdict) -> ApiError {
    let refused = demands
        .iter()
        .zip(&verdict.standings)
        .filter(|(_, s)| !s.admitted)
        .max_by_key(|(_, s)| s.retry_after)
        .map(|(d, s)| (d, *s))
        .or_else(|| demands.first().zip(verdict.standings.first().copied()));
    let Some((demand, standing)) = refused else {
        return ApiError::new(ErrorCode::RateLimited, "Rate limit exceeded.").with_retry_after(1);
    };
    demand.policy.refusal(demand.cost, standing.retry_after)
}

/// Where a request stands with the policies that applied to it; rendered as headers on the way
/// out by [`LimitHeaders::apply`].
#[derive(Debug, Clone)]
pub struct LimitHeaders {
    pub policies: Vec<(Arc<Policy>, Standing)>,
    /// Unix time of the decision.
    pub now: Duration,
}

impl LimitHeaders {
    pub fn new(demands: &[Demand], standings: &[Standing], now: Duration) -> LimitHeaders {
        LimitHeaders {
            policies: demands
                .iter()
                .zip(standings)
                .map(|(d, s)| (d.policy.clone(), *s))
                .collect(),
            now,
        }
    }

    /// `X-RateLimit-*` for the policy closest to refusing; `RateLimit-Policy` and `RateLimit`
    /// (draft-ietf-httpapi-ratelimit-headers) listing each policy.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let Some((policy, standing)) =
            most_restrictive(self.policies.iter().map(|(p, s)| (&**p, *s)))
        else {
            return;
        };
        let reset_at = self.now.as_secs() + seconds_up(standing.reset_after);
        let mut set = |name: &'static str, value: String| {
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        };
        // Remaining counts down from what the policy admits at once, so that is the limit
        // these three describe (as redis-cell's GCRA gives it); `RateLimit-Policy` states the
        // configured rate.
        set("x-ratelimit-limit", policy.at_once().to_string());
        set("x-ratelimit-remaining", standing.remaining.to_string());
        set("x-ratelimit-reset", reset_at.to_string());
        let list = |item: &dyn Fn(&Policy, &Standing) -> String| {
            self.policies
                .iter()
                .map(|(p, s)| item(p, s))
                .collect::<Vec<_>>()
                .join(", ")
        };
        set(
            "ratelimit-policy",
            list(&|p, _| {
                format!(
                    "\"{}\";q={};w={}",
                    p.name,
                    p.limit,
                    seconds_up(p.window).max(1)
                )
            }),
        );
        set(
            "ratelimit",
            list(&|p, s| {
                format!(
                    "\"{}\";r={};t={}",
                    p.name,
                    s.remaining,
                    seconds_up(s.reset_after)
                )
            }),
        );
    }
}

fn seconds_up(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::ratelimit::{Scope, Unit};
    use tollgate_core::ManualClock;

    fn demand(name: &str, limit: u64, burst: u64) -> Demand {
        let policy = Policy {
            name: name.into(),
            scope: Scope::Key,
            unit: Unit::Requests,
            limit,
            window: Duration::from_secs(60),
            burst,
            on_limiter_failure: Default::default(),
        };
        Demand::new(Arc::new(policy), "key:k", 1)
    }

    #[tokio::test]
    async fn headers_show_the_most_restrictive_policy_and_list_them_all() {
        let clock = Arc::new(ManualClock::new(
            chrono::DateTime::from_timestamp(1_000, 0).unwrap(),
        ));
        let limiter = LocalLimiter::new(clock);
        let demands = [demand("per-key", 60, 9), demand("per-account", 600, 99)];
        let verdict = limiter.acquire(&demands).await.unwrap();
        let mut headers = HeaderMap::new();
        LimitHeaders::new(&demands, &verdict.standings, Duration::from_secs(1_000))
            .apply(&mut headers);
        let get = |name: &str| headers[name].to_str().unwrap().to_string();
        // per-key admits 10 at once and has 9 left; per-account 100 and 99.
        assert_eq!(get("x-ratelimit-limit"), "10");
        assert_eq!(get("x-ratelimit-remaining"), "9");
        assert_eq!(get("x-ratelimit-reset"), "1001");
        assert_eq!(
            get("ratelimit-policy"),
            "\"per-key\";q=60;w=60, \"per-account\";q=600;w=60"
        );
        assert_eq!(
            get("ratelimit"),
            "\"per-key\";r=9;t=1, \"per-account\";r=99;t=1"
        );
    }

    #[tokio::test]
    async fn the_refusal_names_the_policy_and_a_retry_after_that_works() {
        let clock = Arc::new(ManualClock::new(
            chrono::DateTime::from_timestamp(1_000, 0).unwrap(),
        ));
        let limiter = LocalLimiter::new(clock.clone());
        let demands = [demand("roomy", 600, 99), demand("tight", 2, 0)];
        assert!(limiter.acquire(&demands).await.unwrap().admitted);
        let verdict = limiter.acquire(&demands).await.unwrap();
        assert!(!verdict.admitted);
        let error = refusal(&demands, &verdict);
        assert_eq!(error.code, ErrorCode::RateLimited);
        assert_eq!(error.details["policy"], "tight");
        assert_eq!(error.retry_after_s, Some(30));
        clock.advance(chrono::Duration::seconds(30));
        assert!(limiter.acquire(&demands).await.unwrap().admitted);
    }
}
