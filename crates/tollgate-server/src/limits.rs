//! Rate limiting: the [`Limiter`] trait, the in-process [`LocalLimiter`], which policies apply to
//! a request, and the headers that tell a client where it stands.
//!
//! Every policy that applies to a request is decided in one [`Limiter::acquire`] call, which
//! consumes all of them or none (a request one policy refuses costs the others nothing). Token and
//! cost policies reserve an estimate first; [`Limiter::adjust`] corrects them to the actual usage.
//! The GCRA arithmetic is `tollgate_core::ratelimit`; a backend only stores TATs atomically.

use crate::auth::client_ip;
use crate::auth::CachedKey;
use crate::config::{Config, RouteConfig};
use crate::error::HttpError;
use crate::state::AppState;
use async_trait::async_trait;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate_core::ratelimit::Overrides;
use tollgate_core::ratelimit::{most_restrictive, FailureMode, Policy, Standing, Tat};
use tollgate_core::ratelimit::{Scope, Unit};
use tollgate_core::RequestId;
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
/// policy takes the key's own override, else its account's, else the configured numbers.
pub fn demands_for(
    config: &Config,
    route: Option<&RouteConfig>,
    cached: &CachedKey,
    estimate: Estimate,
) -> Vec<Demand> {
    let key = &*cached.record;
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
            let policy = match own.or_else(accounts) {
                Some(numbers) => Arc::new(policy.overridden(numbers)),
                None => policy.clone(),
            };
            let cost = estimate.units(policy.unit);
            Some(Demand::new(policy, &subject, cost))
        })
        .collect()
}

/// Checks rate-limit overrides for a key (`for_account` false) or an account: each must name a
/// configured policy the target may override, with a limit and window of at least one.
pub fn check_overrides(
    config: &Config,
    overrides: &Overrides,
    for_account: bool,
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let configured = config
        .rate_limits
        .iter()
        .chain(&config.anonymous_limits)
        .chain(config.routes.iter().flat_map(|r| r.rate_limits.iter()));
    let configured: Vec<&Arc<Policy>> = configured.collect();
    for (name, numbers) in overrides {
        let field = format!("rate_limits.{name}");
        let mut add = |message: String| problems.push((field.clone(), message));
        let Some(policy) = configured.iter().find(|p| &p.name == name) else {
            add("is not a configured rate-limit policy".into());
            continue;
        };
        let allowed = if for_account {
            policy.scope.accounted()
        } else {
            policy.scope.keyed()
        };
        if !allowed {
            let scopes = if for_account {
                "key, key+route or account"
            } else {
                "key or key+route"
            };
            add(format!(
                "has scope '{}'; only {scopes} policies can be overridden here",
                policy.scope.as_str()
            ));
        }
        if numbers.limit == 0 {
            add("limit must be at least 1".into());
        }
        if numbers.window_seconds == Some(0) {
            add("window_seconds must be at least 1".into());
        }
    }
    problems
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

/// A request's slot for its [`Standings`], put in its extensions by [`layer`].
#[derive(Debug, Clone, Default)]
pub struct LimitSlot(Arc<Mutex<Option<Standings>>>);

impl LimitSlot {
    pub fn set(&self, standings: Standings) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(standings);
    }

    fn take(&self) -> Option<Standings> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Decides `demands` for an identified caller, records the outcome in the request's slot, and
/// answers 429 `rate_limited` when a policy refuses.
pub async fn admit(
    state: &AppState,
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
    let now = since_epoch(state.clock.now());
    let verdict = match state.limiter.acquire(demands).await {
        Ok(verdict) => verdict,
        Err(e) => return limiter_failed(state, demands, &e),
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
        Err(refused(state, demands, &verdict).into())
    }
}

/// Decides the demands the slot holds as [`Standings::Identified`], with the token and cost
/// estimates filled in, so they are built once per request. Returns them for the corrections.
pub async fn admit_identified(
    state: &AppState,
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
    admit(state, Some(slot), &demands).await?;
    Ok(demands)
}

/// The limiter could not decide: refused with 503 if any policy fails closed, else admitted
/// unlimited. Either way counted, so an operator sees how much traffic went undecided.
fn limiter_failed(
    state: &AppState,
    demands: &[Demand],
    e: &LimiterUnavailable,
) -> Result<(), HttpError> {
    let closed = demands
        .iter()
        .find(|d| d.policy.on_limiter_failure == FailureMode::Closed);
    state.metrics.limiter_failure(closed.is_none());
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

/// Paths that are never rate-limited nor counted: a load balancer's health and readiness checks
/// and the metrics scrape must keep working whatever one client behind the same address does.
const UNLIMITED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// What credential a request presents, as far as memory can tell before any lookup.
enum Presented {
    /// None, or one that cannot be valid: the request is anonymous.
    Anonymous,
    /// The admin token (compared in constant time): never limited.
    Admin,
    /// A well-formed API key: judged by its own policies once it is looked up.
    Key,
}

fn presented(state: &AppState, request: &Request) -> Presented {
    let Some(secret) = crate::auth::presented_secret(request.headers()) else {
        return Presented::Anonymous;
    };
    if let Some(admin) = &state.config.admin_token {
        if !secret.starts_with("tg_") && tollgate_core::key::secret_matches(secret, &admin.0) {
            return Presented::Admin;
        }
    }
    // A public route reads no key: whatever is sent, the caller is anonymous there.
    let public = state
        .routes
        .resolve(request.uri().path())
        .is_some_and(|route| route.config.auth == crate::config::RouteAuth::None);
    if !public && tollgate_core::ApiKey::parse(secret).is_ok() {
        Presented::Key
    } else {
        Presented::Anonymous
    }
}

/// Sits outside the error renderer: gives each request a [`LimitSlot`], and on the way out adds
/// the rate-limit headers. A request that ends without an identified caller (no or a bad key, an
/// unknown path) counts against its address's `ip` policies. An address over them is refused
/// before any work, except for what it cannot be blamed for: health, readiness and metrics, the
/// admin token, and a well-formed key, which is looked up and judged by its own policies (if it
/// turns out not to be a valid key, the answer is the address's 429 all the same).
pub async fn layer(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    if UNLIMITED_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let slot = LimitSlot::default();
    request.extensions_mut().insert(slot.clone());
    let anonymous: Vec<Demand> = match client_ip(&state, request.headers(), request.extensions()) {
        Some(ip) if !state.config.anonymous_limits.is_empty() => {
            let subject = format!("ip:{ip}");
            state
                .config
                .anonymous_limits
                .iter()
                .map(|policy| Demand::new(policy.clone(), &subject, 1))
                .collect()
        }
        _ => Vec::new(),
    };
    let now = since_epoch(state.clock.now());
    // The answer for an address over its anonymous limit, if it is.
    let mut over_limit: Option<Response> = None;
    if !anonymous.is_empty() {
        if let Ok(standings) = state.limiter.peek(&anonymous).await {
            if standings.iter().any(|s| !s.admitted) {
                let verdict = Verdict {
                    admitted: false,
                    standings,
                };
                let error = refused(&state, &anonymous, &verdict);
                let id = request.extensions().get::<RequestId>().copied();
                let profile = state
                    .routes
                    .resolve(request.uri().path())
                    .map(|route| route.config.error_profile)
                    .unwrap_or_default();
                let mut response = crate::edge::error_response(
                    &error,
                    profile,
                    id.unwrap_or_default(),
                    request.headers(),
                );
                LimitHeaders::new(&anonymous, &verdict.standings, now)
                    .apply(response.headers_mut());
                match presented(&state, &request) {
                    Presented::Anonymous => return response,
                    Presented::Admin => {}
                    Presented::Key => over_limit = Some(response),
                }
            }
        }
    }
    let mut response = next.run(request).await;
    let headers = match slot.take() {
        Some(Standings::Decided(headers)) => Some(headers),
        Some(Standings::Exempt) => None,
        Some(Standings::Identified(demands)) if demands.is_empty() => None,
        Some(Standings::Identified(demands)) => state
            .limiter
            .peek(&demands)
            .await
            .ok()
            .map(|standings| LimitHeaders::new(&demands, &standings, now)),
        // The key presented was not a valid one: the address's refusal stands.
        None if over_limit.is_some() => return over_limit.unwrap_or(response),
        None if anonymous.is_empty() => None,
        None => state
            .limiter
            .acquire(&anonymous)
            .await
            .ok()
            .map(|verdict| LimitHeaders::new(&anonymous, &verdict.standings, now)),
    };
    if let Some(headers) = headers {
        headers.apply(response.headers_mut());
    }
    response
}

/// [`refusal`], counted in the metrics under the policy it names.
fn refused(state: &AppState, demands: &[Demand], verdict: &Verdict) -> ApiError {
    let error = refusal(demands, verdict);
    if let Some(policy) = error.details.get("policy").and_then(|p| p.as_str()) {
        state.metrics.rate_limited(policy);
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
