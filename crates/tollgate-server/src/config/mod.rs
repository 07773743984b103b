//! Configuration, in two steps.
//!
//! 1. **Raw** ([`raw`]): the TOML file is split into its sections and each route, and each piece
//!    is read into a serde type with `deny_unknown_fields`. Environment overrides are applied
//!    first.
//! 2. **Validated** (here): [`Config::from_raw`] checks every value and turns it into runtime
//!    types.
//!
//! Both steps collect [`problems`] instead of stopping at the first, so an operator sees every
//! mistake at once, each with its path (`routes[1].upstream: ...`). A leaf room: it reads no
//! environment and opens nothing, and imports only `http`'s header rules.

pub mod export;
pub mod plans;
pub mod problems;
pub mod raw;

pub use export::{CustomerIds, ExportSettings, Meter, SinkKind, SinkSettings};
pub use problems::{ConfigErrors, ConfigProblem};
pub use raw::{
    default_rate_limits, HoldRuleName, OtherEndpoints, RawAdmin, RawBilling, RawConfig, RawConsole,
    RawExport, RawIdempotency, RawKeys, RawLoadShedding, RawModel, RawPayments, RawPolicy,
    RawRedis, RawRoute, RawServer, RawSink, RawStore, RawStripe, RawWebhooks, RouteAuth, RouteKind,
    Secret, StreamPolicy, ENV_OVERRIDES,
};

use http::header::HeaderName;
use http::Uri;
use ipnet::IpNet;
use problems::{positive_duration, Problems};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::load::LimitSettings;
use tollgate_core::metering::LlmApi;
use tollgate_core::pricing::TokenPrices;
use tollgate_core::ratelimit::{FailureMode, Overrides, Policy, Scope};
use tollgate_core::{KeyEnv, Nanos};
use tollgate_wire::ErrorProfile;

/// Paths Tollgate serves itself; no route prefix may overlap them.
pub const RESERVED_PREFIXES: &[&str] = &["/api", "/console", "/healthz", "/readyz", "/metrics"];

/// hyper reads a request head into a buffer of at least 8 KiB.
const MIN_HEADER_BYTES: u64 = 8 * 1024;
const MAX_HEADER_BYTES: u64 = 1024 * 1024;

/// An IPv4/IPv6 network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`); a bare address is
/// the network of that one address. Host bits must be zero, so a typo like `10.0.0.1/8` is
/// caught rather than silently widened. Shared by the config and the key API.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "'{text}' is not a CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32"
                ))
            }
        },
    };
    if net.network() != net.addr() {
        return Err(format!(
            "'{text}' has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

// ---------------------------------------------------------------------------------------------
// Step 2: validated runtime types.

/// How long a console session lasts, and the time zone its pages report in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleSettings {
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    pub time_zone: chrono_tz::Tz,
}

/// Webhooks to accounts' endpoints (`[webhooks]`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub max_endpoints_per_account: u32,
    /// Where endpoints may point: https (or http too) and public addresses, plus these ranges.
    pub guard: tollgate_core::egress::Guard,
    pub attempt_timeout: Duration,
    pub rotation_overlap: Duration,
    pub concurrency: usize,
    pub poll_interval: Duration,
    pub retention: Duration,
}

/// Card top-ups through Stripe (`[payments.stripe]`).
#[derive(Debug, Clone)]
pub struct StripeSettings {
    pub secret_key: Secret,
    pub webhook_secrets: Vec<Secret>,
    /// Stripe's API, with no trailing slash; tests point it at a fake.
    pub api_base: String,
    /// Lower-case ISO 4217, the wallet's currency.
    pub currency: String,
    pub min_topup: Nanos,
    pub max_topup: Nanos,
    pub success_url: String,
    pub cancel_url: String,
    pub session_expiry: Duration,
    pub signature_tolerance: Duration,
    pub webhook_max_bytes: usize,
    pub timeout: Duration,
    /// `None`: missed deliveries are only found by `tollgate payments reconcile`.
    pub reconcile_interval: Option<Duration>,
    pub auto_topup_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where the management API lives, e.g. `/api/v1` (no trailing slash).
    pub api_prefix: String,
    pub request_id_header: HeaderName,
    pub max_body_bytes: u64,
    pub key_cache_capacity: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub connections: ConnectionLimits,
    pub store: StoreConfig,
    pub admin_token: Option<Secret>,
    pub currency: String,
    pub starter_credits: Nanos,
    pub management_fee: Nanos,
    pub request_hold_ttl: Duration,
    pub sweep_interval: Duration,
    pub usage_retention: Duration,
    pub usage_log: bool,
    pub key_env: KeyEnv,
    pub max_keys_per_account: u32,
    /// `None` when load shedding is off.
    pub load_shedding: Option<LoadShedding>,
    pub idempotency_retention: Duration,
    /// The shared limiter's Redis; `None`: each node limits in memory.
    pub redis_url: Option<Secret>,
    pub idempotency_max_response_bytes: u64,
    pub console: ConsoleSettings,
    /// `None`: no card payments (only the operator grants credit).
    pub stripe: Option<StripeSettings>,
    pub webhooks: WebhookSettings,
    pub export: ExportSettings,
    /// Policies for every request with a caller (scopes other than `ip`).
    pub rate_limits: Vec<Arc<Policy>>,
    /// `ip` policies: requests that end without an authenticated caller.
    pub anonymous_limits: Vec<Arc<Policy>>,
    pub routes: Vec<RouteConfig>,
    pub plans: plans::Plans,
    /// What was validated, for `check-config` to print.
    pub raw: RawConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    Sqlite {
        path: PathBuf,
    },
    /// The URL may carry a password, so it is kept as a secret.
    Postgres {
        url: Secret,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoadShedding {
    pub limit: LimitSettings,
    pub cpu_threshold: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Normalised: starts with `/`, no trailing `/`.
    pub prefix: String,
    /// Normalised: no trailing `/`.
    pub upstream: Uri,
    pub group: String,
    pub auth: RouteAuth,
    pub error_profile: ErrorProfile,
    pub pricing: Pricing,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Marked sensitive, so `Debug` never shows them.
    pub upstream_headers: Vec<(HeaderName, http::HeaderValue)>,
    pub rate_limits: Vec<Arc<Policy>>,
    /// The methods forwarded, as configured (upper case).
    pub methods: Vec<http::Method>,
}

/// How many connections, and how long a client may take to send a request (see `edge/serve.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    /// How long a request body may go without a byte arriving (see `http::body::Stalling`).
    pub body_read_timeout: Duration,
    /// At least 1; `server.max_connections = 0` is resolved at start from the open-file limit.
    pub max_connections: usize,
    pub http2_max_concurrent_streams: u32,
    /// 8 KiB to 1 MiB.
    pub max_header_bytes: usize,
}

/// How a route charges. The cost of a call is `flat` plus its metered part (units or tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    pub flat: Nanos,
    pub per_unit: Option<PerUnit>,
    /// `Some` on LLM routes: the API shape and each model's prices.
    pub llm: Option<(LlmApi, BTreeMap<String, TokenPrices>)>,
    pub hold: HoldRule,
    /// LLM routes: the output tokens assumed when a request sets no `max_tokens` (for the hold
    /// and for token rate limits).
    pub default_max_tokens: u64,
    pub stream_policy: StreamPolicy,
    /// LLM routes: `Some(price)` charges a POST to an endpoint with no usage reader that price;
    /// `None` refuses it.
    pub other_endpoints: Option<Nanos>,
    pub drain_timeout: Duration,
    pub drain_max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PerUnit {
    pub price: Nanos,
    pub from: UnitsFrom,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UnitsFrom {
    JsonPointer(String),
    Header(HeaderName),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HoldRule {
    /// Reserve the flat price.
    Flat,
    /// Reserve the flat price plus the input (body bytes ÷ 4, rounded up) and `max_tokens` of
    /// output at the model's prices (`default_max_tokens` when the request sets none).
    MaxTokens,
    /// Reserve this fixed amount; a cost above it is charged as it.
    MaxHold(Nanos),
}

impl Pricing {
    /// Whether the cost is known before the body is read (no usage to read from it).
    pub fn is_metered(&self) -> bool {
        self.per_unit.is_some() || self.llm.is_some()
    }
}

impl Config {
    /// The first policy, global or on a route, that refuses calls while the shared limiter is
    /// unreachable: with one, a node without its limiter is not ready.
    pub fn policy_failing_closed(&self) -> Option<&Policy> {
        self.rate_limits
            .iter()
            .chain(self.routes.iter().flat_map(|r| &r.rate_limits))
            .map(|p| &**p)
            .find(|p| p.on_limiter_failure == FailureMode::Closed)
    }

    /// Reads TOML text plus environment overrides and validates it all.
    pub fn load<I, K, V>(toml_text: &str, env: I) -> Result<Config, ConfigErrors>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut problems = Problems::default();
        match RawConfig::read(toml_text, env, &mut problems) {
            Some(raw) => Config::validate(raw, problems),
            None => Err(problems.into_errors()),
        }
    }

    /// Validates a config built in code (the demo builds its own).
    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigErrors> {
        Config::validate(raw, Problems::default())
    }

    fn validate(raw: RawConfig, mut p: Problems) -> Result<Config, ConfigErrors> {
        let s = &raw.server;

        let listen = s
            .listen
            .parse::<SocketAddr>()
            .map_err(|_| {
                p.push(
                    "server.listen",
                    "must be an address and port, e.g. 127.0.0.1:8080",
                )
            })
            .ok();
        let api_prefix = s.api_prefix.trim_end_matches('/').to_string();
        if !(api_prefix == "/api" || api_prefix.starts_with("/api/")) || !is_path(&api_prefix) {
            p.push(
                "server.api_prefix",
                "must be a path under /api, e.g. /api/v1",
            );
        }
        let request_id_header = HeaderName::from_bytes(s.request_id_header.as_bytes())
            .map_err(|_| p.push("server.request_id_header", "must be a valid header name"))
            .ok();
        if s.max_body_bytes == 0 {
            p.push("server.max_body_bytes", "must be at least 1");
        }
        if s.key_cache_capacity == 0 {
            p.push("server.key_cache_capacity", "must be at least 1");
        }
        let mut timeout = |field: &str, text: &str, example: &str| {
            positive_duration(text).unwrap_or_else(|| {
                p.push(
                    &format!("server.{field}"),
                    format!("must be a positive duration, e.g. \"{example}\""),
                );
                Duration::ZERO
            })
        };
        let header_read_timeout = timeout("header_read_timeout", &s.header_read_timeout, "10s");
        let body_read_timeout = timeout("body_read_timeout", &s.body_read_timeout, "60s");
        if s.http2_max_concurrent_streams == 0 {
            p.push("server.http2_max_concurrent_streams", "must be at least 1");
        }
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&s.max_header_bytes) {
            p.push(
                "server.max_header_bytes",
                format!("must be from {MIN_HEADER_BYTES} (8 KiB) to {MAX_HEADER_BYTES} (1 MiB)"),
            );
        }
        let connections = ConnectionLimits {
            header_read_timeout,
            body_read_timeout,
            max_connections: match s.max_connections {
                0 => crate::config::default_max_connections(),
                n => usize::try_from(n).unwrap_or(usize::MAX),
            },
            http2_max_concurrent_streams: s.http2_max_concurrent_streams,
            max_header_bytes: usize::try_from(s.max_header_bytes).unwrap_or(usize::MAX),
        };
        let trusted_proxies: Vec<IpNet> = s
            .trusted_proxies
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                parse_cidr(text)
                    .map_err(|m| p.push(&format!("server.trusted_proxies[{i}]"), m))
                    .ok()
            })
            .collect();

        let store = parse_store_url(&raw.store.url)
            .map_err(|m| p.push("store.url", m))
            .ok();

        let admin_token = raw.admin.token.as_ref().and_then(|Secret(token)| {
            if token.len() < 16 {
                p.push("admin.token", "must be at least 16 characters");
                None
            } else if token.starts_with("tg_") {
                p.push(
                    "admin.token",
                    "must not start with tg_ (that prefix is for API keys)",
                );
                None
            } else {
                Some(Secret(token.clone()))
            }
        });

        let currency = raw.billing.currency.clone();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            p.push(
                "billing.currency",
                "must be a three-letter code in capitals, e.g. USD",
            );
        }
        let starter_credits = Nanos::parse_credits(&raw.billing.starter_credits)
            .map_err(|e| p.push("billing.starter_credits", e.to_string()))
            .unwrap_or_default();
        let management_fee = Nanos::parse_credits(&raw.billing.management_fee)
            .map_err(|e| p.push("billing.management_fee", e.to_string()))
            .unwrap_or_default();
        let billing_duration = |p: &mut Problems, field: &str, text: &str| {
            positive_duration(text).unwrap_or_else(|| {
                p.push(
                    &format!("billing.{field}"),
                    "must be a positive duration, e.g. \"15m\" or \"1s\"",
                );
                Duration::from_secs(1)
            })
        };
        let request_hold_ttl =
            billing_duration(&mut p, "request_hold_ttl", &raw.billing.request_hold_ttl);
        let sweep_interval =
            billing_duration(&mut p, "sweep_interval", &raw.billing.sweep_interval);
        let usage_retention =
            billing_duration(&mut p, "usage_retention", &raw.billing.usage_retention);

        let load_shedding = validate_load_shedding(&raw.load_shedding, &mut p);
        let idempotency_retention =
            positive_duration(&raw.idempotency.retention).unwrap_or_else(|| {
                p.push(
                    "idempotency.retention",
                    "must be a positive duration, e.g. \"24h\"",
                );
                Duration::from_secs(1)
            });

        let mut console_duration = |field: &str, text: &str| {
            positive_duration(text).unwrap_or_else(|| {
                p.push(
                    &format!("console.{field}"),
                    "must be a positive duration, e.g. \"30m\"",
                );
                Duration::from_secs(1)
            })
        };
        let console = ConsoleSettings {
            idle_timeout: console_duration("idle_timeout", &raw.console.idle_timeout),
            absolute_timeout: console_duration("absolute_timeout", &raw.console.absolute_timeout),
            time_zone: raw.console.time_zone.parse().unwrap_or_else(|_| {
                p.push(
                    "console.time_zone",
                    "must be an IANA time zone, e.g. \"UTC\" or \"Europe/Berlin\"",
                );
                chrono_tz::Tz::UTC
            }),
        };

        let webhooks = validate_webhooks(&raw.webhooks, &mut p);
        let export = export::validate_export(&raw.export, &mut p);

        let stripe = raw
            .payments
            .stripe
            .as_ref()
            .and_then(|raw_stripe| validate_stripe(raw_stripe, &currency, &mut p));

        let redis_url = raw.redis.url.as_ref().and_then(|url| {
            if url.starts_with("redis://") || url.starts_with("rediss://") {
                Some(Secret(url.clone()))
            } else {
                p.push(
                    "redis.url",
                    "must be a redis:// URL, e.g. redis://127.0.0.1:6379",
                );
                None
            }
        });

        let all_limits = validate_policies(
            raw.rate_limits.as_deref().unwrap_or(&default_rate_limits()),
            "rate_limits",
            &mut p,
        );
        let (anonymous_limits, rate_limits): (Vec<_>, Vec<_>) = all_limits
            .into_iter()
            .partition(|policy| policy.scope == Scope::Ip);

        let mut routes: Vec<RouteConfig> = Vec::new();
        let mut prefixes_seen: Vec<(String, usize)> = Vec::new();
        for raw_route in &raw.routes {
            let at = format!("routes[{}]", raw_route.position);
            if let Some(route) = validate_route(raw_route, &at, &mut p) {
                if let Some((_, first)) =
                    prefixes_seen.iter().find(|(seen, _)| *seen == route.prefix)
                {
                    p.push(
                        &format!("{at}.prefix"),
                        format!(
                            "'{}' is already the prefix of routes[{first}]",
                            route.prefix
                        ),
                    );
                }
                prefixes_seen.push((route.prefix.clone(), raw_route.position));
                for policy in &route.rate_limits {
                    if rate_limits.iter().any(|global| global.name == policy.name) {
                        p.push(
                            &format!("{at}.rate_limits"),
                            format!("'{}' is already the name of a global policy", policy.name),
                        );
                    }
                }
                routes.push(route);
            }
        }

        let groups: Vec<&str> = routes.iter().map(|r| r.group.as_str()).collect();
        let plans = plans::validate_plans(
            &raw.plans,
            &raw.packs,
            raw.billing.default_plan.as_deref(),
            &groups,
            &mut p,
        );
        for (i, plan) in raw.plans.iter().enumerate() {
            let configured = rate_limits
                .iter()
                .chain(&anonymous_limits)
                .chain(routes.iter().flat_map(|r| r.rate_limits.iter()));
            for (field, message) in check_overrides(configured, &plan.rate_limits, true) {
                p.push(&format!("plans[{i}].{field}"), message);
            }
        }

        match (listen, request_id_header, store) {
            (Some(listen), Some(request_id_header), Some(store)) if p.is_empty() => Ok(Config {
                listen,
                api_prefix,
                request_id_header,
                max_body_bytes: s.max_body_bytes,
                key_cache_capacity: usize::try_from(s.key_cache_capacity).unwrap_or(usize::MAX),
                trusted_proxies,
                connections,
                store,
                admin_token,
                currency,
                starter_credits,
                management_fee,
                request_hold_ttl,
                sweep_interval,
                usage_retention,
                usage_log: raw.billing.usage_log,
                key_env: raw.keys.env,
                max_keys_per_account: raw.keys.max_per_account,
                load_shedding,
                idempotency_retention,
                redis_url,
                idempotency_max_response_bytes: raw.idempotency.max_response_bytes,
                console,
                stripe,
                webhooks,
                export,
                rate_limits,
                anonymous_limits,
                routes,
                plans,
                raw,
            }),
            _ => Err(p.into_errors()),
        }
    }

    /// Route groups that scopes may name.
    pub fn route_groups(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.group.as_str())
    }
}

fn validate_webhooks(raw: &raw::RawWebhooks, p: &mut Problems) -> WebhookSettings {
    let mut duration = |field: &str, text: &str, example: &str| {
        positive_duration(text).unwrap_or_else(|| {
            p.push(
                &format!("webhooks.{field}"),
                format!("must be a positive duration, e.g. \"{example}\""),
            );
            Duration::from_secs(1)
        })
    };
    let attempt_timeout = duration("attempt_timeout", &raw.attempt_timeout, "10s");
    let rotation_overlap = duration("rotation_overlap", &raw.rotation_overlap, "24h");
    let poll_interval = duration("poll_interval", &raw.poll_interval, "1s");
    let retention = duration("retention", &raw.retention, "30d");
    let allowed = raw
        .allow_private
        .iter()
        .filter_map(|cidr| match cidr.parse::<IpNet>() {
            Ok(net) => Some(net),
            Err(_) => {
                p.push(
                    "webhooks.allow_private",
                    format!("'{cidr}' is not an address range (CIDR), e.g. \"10.1.0.0/16\""),
                );
                None
            }
        })
        .collect();
    if raw.concurrency == 0 {
        p.push("webhooks.concurrency", "must be at least 1");
    }
    WebhookSettings {
        max_endpoints_per_account: raw.max_endpoints_per_account,
        guard: tollgate_core::egress::Guard {
            allow_http: raw.allow_http,
            allowed,
        },
        attempt_timeout,
        rotation_overlap,
        concurrency: usize::try_from(raw.concurrency.max(1)).unwrap_or(1),
        poll_interval,
        retention,
    }
}

/// Checks rate-limit overrides for a key (`for_account` false), an account or a plan: each must
/// name one of the `configured` policies the target may override, with a limit and window of at
/// least one.
pub fn check_overrides<'a>(
    configured: impl Iterator<Item = &'a Arc<Policy>>,
    overrides: &Overrides,
    for_account: bool,
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
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

fn validate_route(raw: &RawRoute, at: &str, p: &mut Problems) -> Option<RouteConfig> {
    let before = p.len();
    let prefix = raw.prefix.trim_end_matches('/').to_string();
    if !raw.prefix.starts_with('/') || !is_path(&raw.prefix) {
        p.push(
            &format!("{at}.prefix"),
            "must be a path starting with /, e.g. /v1",
        );
    } else if prefix.is_empty() {
        p.push(
            &format!("{at}.prefix"),
            "'/' would capture the management API, console, docs, health and metrics paths",
        );
    } else if let Some(reserved) = RESERVED_PREFIXES.iter().find(|r| overlaps(&prefix, r)) {
        p.push(
            &format!("{at}.prefix"),
            format!(
                "'{}' overlaps '{reserved}', which Tollgate serves itself",
                raw.prefix
            ),
        );
    }
    let upstream = match raw.upstream.parse::<Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http") | Some("https"))
                && uri.host().is_some()
                && uri.query().is_none() =>
        {
            let trimmed = raw.upstream.trim_end_matches('/');
            trimmed.parse::<Uri>().ok()
        }
        _ => None,
    };
    if upstream.is_none() {
        p.push(
            &format!("{at}.upstream"),
            "must be an http:// or https:// URL with a host and no query, e.g. https://api.example.com/v1",
        );
    }
    if raw.group.is_empty()
        || raw.group == "*"
        || !raw
            .group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        p.push(
            &format!("{at}.group"),
            "must be a name of letters, digits, '-' and '_'",
        );
    }
    let pricing = validate_pricing(raw, at, p);
    let mut duration = |field: &str, text: &str| match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Some(d),
        _ => {
            p.push(
                &format!("{at}.{field}"),
                "must be a positive duration, e.g. \"5s\" or \"500ms\"",
            );
            None
        }
    };
    let connect_timeout = duration("connect_timeout", &raw.connect_timeout);
    let timeout = duration("timeout", &raw.timeout);
    let mut upstream_headers = Vec::new();
    for (name, value) in &raw.upstream_headers {
        let field = format!("{at}.upstream_headers.{name}");
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(header)
                if crate::http::headers::is_hop_by_hop(&header) || header == http::header::HOST =>
            {
                p.push(&field, "is managed by the proxy and cannot be set");
            }
            Ok(header) => match http::HeaderValue::from_str(&value.0) {
                Ok(mut header_value) => {
                    header_value.set_sensitive(true);
                    upstream_headers.push((header, header_value));
                }
                Err(_) => p.push(&field, "value is not a valid header value"),
            },
            Err(_) => p.push(&field, "is not a valid header name"),
        }
    }
    let rate_limits = validate_policies(&raw.rate_limits, &format!("{at}.rate_limits"), p);
    for policy in &rate_limits {
        if policy.scope == Scope::Ip {
            p.push(
                &format!("{at}.rate_limits"),
                format!("'{}': ip policies are global only", policy.name),
            );
        }
    }
    let mut methods = Vec::new();
    for name in &raw.methods {
        match http::Method::from_bytes(name.as_bytes()) {
            Ok(method) if method == http::Method::CONNECT || method == http::Method::TRACE => p.push(
                &format!("{at}.methods"),
                format!("'{name}' cannot be forwarded: CONNECT opens a tunnel and TRACE echoes credentials"),
            ),
            Ok(method) if name.bytes().all(|b| !b.is_ascii_lowercase()) => {
                if !methods.contains(&method) {
                    methods.push(method);
                }
            }
            _ => p.push(
                &format!("{at}.methods"),
                format!("'{name}' is not an HTTP method in upper case, e.g. \"GET\""),
            ),
        }
    }
    if raw.methods.is_empty() {
        p.push(&format!("{at}.methods"), "must name at least one method");
    }
    if raw.auth == RouteAuth::None {
        let priced = pricing.as_ref().is_some_and(|pricing| {
            pricing.flat > Nanos::ZERO || pricing.per_unit.is_some() || pricing.llm.is_some()
        });
        if priced {
            p.push(
                &format!("{at}.auth"),
                "a route with auth = \"none\" has no account to charge: it cannot have a price, a unit price or models",
            );
        }
        if !rate_limits.is_empty() {
            p.push(
                &format!("{at}.auth"),
                "a route with auth = \"none\" has no key or account to limit: use a global ip policy instead of route rate_limits",
            );
        }
    }
    if p.len() > before {
        return None;
    }
    Some(RouteConfig {
        prefix,
        upstream: upstream?,
        group: raw.group.clone(),
        auth: raw.auth,
        error_profile: raw.error_profile,
        pricing: pricing?,
        connect_timeout: connect_timeout?,
        timeout: timeout?,
        upstream_headers,
        rate_limits,
        methods,
    })
}

/// Checks each policy: a name of letters, digits, `-`, `_` and `.`, unique in the list; a limit
/// of at least 1; a window of at least a millisecond.
fn validate_policies(raw: &[RawPolicy], at: &str, p: &mut Problems) -> Vec<Arc<Policy>> {
    let mut policies: Vec<Arc<Policy>> = Vec::new();
    for (i, policy) in raw.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let before = p.len();
        if policy.name.is_empty()
            || !policy
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            p.push(
                &format!("{here}.name"),
                "must be a name of letters, digits, '-', '_' and '.'",
            );
        } else if policies.iter().any(|seen| seen.name == policy.name) {
            p.push(
                &format!("{here}.name"),
                format!("'{}' is already used", policy.name),
            );
        }
        if policy.limit == 0 {
            p.push(&format!("{here}.limit"), "must be at least 1");
        }
        if policy.scope == Scope::Ip && policy.on_limiter_failure == FailureMode::Closed {
            p.push(
                &format!("{here}.on_limiter_failure"),
                "ip policies are counted after the response, so they always fail open",
            );
        }
        let window = humantime::parse_duration(&policy.window)
            .ok()
            .filter(|w| *w >= Duration::from_millis(1));
        if window.is_none() {
            p.push(
                &format!("{here}.window"),
                "must be a duration of at least 1ms, e.g. \"1m\" or \"1s\"",
            );
        }
        if let (Some(window), true) = (window, p.len() == before) {
            policies.push(Arc::new(Policy {
                name: policy.name.clone(),
                scope: policy.scope,
                unit: policy.unit,
                limit: policy.limit,
                window,
                burst: policy.burst,
                on_limiter_failure: policy.on_limiter_failure,
            }));
        }
    }
    policies
}

fn validate_load_shedding(raw: &RawLoadShedding, p: &mut Problems) -> Option<LoadShedding> {
    let at = |field: &str| format!("load_shedding.{field}");
    if raw.min_limit == 0 {
        p.push(&at("min_limit"), "must be at least 1");
    }
    if raw.max_limit < raw.min_limit {
        p.push(&at("max_limit"), "must be at least min_limit");
    }
    if !(raw.min_limit..=raw.max_limit).contains(&raw.initial_limit) {
        p.push(
            &at("initial_limit"),
            "must lie between min_limit and max_limit",
        );
    }
    if !(raw.tolerance.is_finite() && raw.tolerance >= 1.0) {
        p.push(&at("tolerance"), "must be a number of at least 1, e.g. 2.0");
    }
    if let Some(threshold) = raw.cpu_threshold {
        if !(threshold > 0.0 && threshold <= 1.0) {
            p.push(
                &at("cpu_threshold"),
                "must be a fraction of the machine's CPU above 0 and at most 1, e.g. 0.9",
            );
        }
    }
    raw.enabled.then_some(LoadShedding {
        limit: LimitSettings {
            initial: raw.initial_limit,
            min: raw.min_limit,
            max: raw.max_limit,
            tolerance: raw.tolerance,
        },
        cpu_threshold: raw.cpu_threshold,
    })
}

fn validate_pricing(raw: &RawRoute, at: &str, p: &mut Problems) -> Option<Pricing> {
    let before = p.len();
    let amount = |p: &mut Problems, field: &str, text: &str| {
        Nanos::parse_credits(text)
            .map_err(|e| p.push(&format!("{at}.{field}"), e.to_string()))
            .ok()
    };
    let flat = amount(p, "price", &raw.price);
    let max_hold = raw
        .max_hold
        .as_deref()
        .and_then(|text| amount(p, "max_hold", text));
    let per_unit = match (&raw.unit_price, &raw.units_from) {
        (None, None) => None,
        (Some(price), Some(from)) => {
            let price = amount(p, "unit_price", price);
            let from = if from.starts_with('/') {
                Some(UnitsFrom::JsonPointer(from.clone()))
            } else if let Some(name) = from.strip_prefix("header:") {
                HeaderName::from_bytes(name.trim().as_bytes())
                    .map(UnitsFrom::Header)
                    .map_err(|_| p.push(&format!("{at}.units_from"), "is not a valid header name"))
                    .ok()
            } else {
                p.push(
                    &format!("{at}.units_from"),
                    "must be a JSON pointer such as \"/usage/units\" or \"header:<name>\"",
                );
                None
            };
            price.zip(from).map(|(price, from)| PerUnit { price, from })
        }
        _ => {
            p.push(
                &format!("{at}.unit_price"),
                "unit_price and units_from go together",
            );
            None
        }
    };
    let api = match raw.kind {
        RouteKind::Http => None,
        RouteKind::Openai => Some(LlmApi::OpenAi),
        RouteKind::Anthropic => Some(LlmApi::Anthropic),
    };
    let mut models = BTreeMap::new();
    for (name, model) in &raw.models {
        let field = format!("models.{name}");
        let input = amount(p, &format!("{field}.input"), &model.input);
        let output = amount(p, &format!("{field}.output"), &model.output);
        let cached = match &model.cached_input {
            Some(text) => amount(p, &format!("{field}.cached_input"), text),
            None => input,
        };
        if let (Some(input), Some(output), Some(cached_input)) = (input, output, cached) {
            models.insert(
                name.clone(),
                TokenPrices {
                    input,
                    output,
                    cached_input,
                },
            );
        }
    }
    match api {
        None if !raw.models.is_empty() => p.push(
            &format!("{at}.models"),
            "only LLM routes (kind = \"openai\" or \"anthropic\") have model prices",
        ),
        Some(_) if raw.models.is_empty() => p.push(
            &format!("{at}.models"),
            "an LLM route needs at least one model, e.g. [routes.models.\"gpt-4o-mini\"]",
        ),
        _ => {}
    }
    let rule = raw.hold.unwrap_or(if api.is_some() {
        HoldRuleName::MaxTokens
    } else if raw.max_hold.is_some() || per_unit.is_some() {
        HoldRuleName::MaxHold
    } else {
        HoldRuleName::Flat
    });
    let hold = match rule {
        HoldRuleName::Flat if per_unit.is_some() || api.is_some() => {
            p.push(
                &format!("{at}.hold"),
                "a metered route cannot hold only its flat price; use max_hold (or max_tokens on LLM routes)",
            );
            None
        }
        HoldRuleName::Flat => Some(HoldRule::Flat),
        HoldRuleName::MaxTokens if api.is_none() => {
            p.push(&format!("{at}.hold"), "max_tokens needs an LLM route");
            None
        }
        HoldRuleName::MaxTokens if per_unit.is_some() => {
            p.push(
                &format!("{at}.hold"),
                "a route priced per unit needs hold = \"max_hold\"",
            );
            None
        }
        HoldRuleName::MaxTokens => Some(HoldRule::MaxTokens),
        HoldRuleName::MaxHold => match max_hold {
            Some(max) => Some(HoldRule::MaxHold(max)),
            None => {
                if raw.max_hold.is_none() {
                    p.push(
                        &format!("{at}.max_hold"),
                        "is required by hold = \"max_hold\"",
                    );
                }
                None
            }
        },
    };
    let other_endpoints = match (raw.other_endpoints, api) {
        (OtherEndpoints::Refuse, _) => None,
        (_, None) => {
            p.push(
                &format!("{at}.other_endpoints"),
                "is for LLM routes (kind = \"openai\" or \"anthropic\")",
            );
            None
        }
        (OtherEndpoints::Flat, Some(_)) => match flat {
            Some(price) if price > Nanos::ZERO => Some(price),
            Some(_) => {
                p.push(
                    &format!("{at}.other_endpoints"),
                    "\"flat\" needs a price above zero; calls would be free",
                );
                None
            }
            None => None,
        },
        (OtherEndpoints::MaxHold, Some(_)) => match max_hold {
            Some(max) if max > Nanos::ZERO => Some(max),
            _ => {
                p.push(
                    &format!("{at}.other_endpoints"),
                    "\"max_hold\" needs a max_hold above zero; calls would be free",
                );
                None
            }
        },
    };
    let drain_timeout = positive_duration(&raw.drain_timeout);
    if drain_timeout.is_none() {
        p.push(
            &format!("{at}.drain_timeout"),
            "must be a positive duration, e.g. \"30s\"",
        );
    }
    if p.len() > before {
        return None;
    }
    Some(Pricing {
        flat: flat?,
        per_unit,
        llm: api.map(|api| (api, models)),
        hold: hold?,
        default_max_tokens: raw.default_max_tokens,
        stream_policy: raw.stream_policy,
        other_endpoints,
        drain_timeout: drain_timeout?,
        drain_max_bytes: raw.drain_max_bytes,
    })
}

/// Whether two normalised path prefixes can match the same request path.
fn overlaps(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| x == y || x.starts_with(&format!("{y}/"));
    under(a, b) || under(b, a)
}

fn is_path(text: &str) -> bool {
    text.starts_with('/')
        && !text.contains("//")
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b))
}

fn parse_store_url(url: &str) -> Result<StoreConfig, String> {
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if path.is_empty() {
            return Err(
                "sqlite URL needs a file path, e.g. sqlite://tollgate-data/tollgate.db".into(),
            );
        }
        return Ok(StoreConfig::Sqlite {
            path: PathBuf::from(path),
        });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(StoreConfig::Postgres {
            url: Secret(url.to_string()),
        });
    }
    Err(
        "must be a sqlite:// or postgres:// URL, e.g. sqlite://tollgate-data/tollgate.db or \
         postgres://tollgate@db.internal/tollgate"
            .into(),
    )
}

/// The largest default: enough for any single node, whatever its open-file limit.
const MAX_DEFAULT_CONNECTIONS: u64 = 32_768;

/// Half of the open-file limit the process can raise itself to (its hard limit; see
/// `edge::serve::raise_open_file_limit`), leaving the other half for upstream and database
/// connections and files: 512 where the limit is 1024, or 512 if the limit cannot be read.
pub fn default_max_connections() -> usize {
    let hard = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024);
    usize::try_from((hard / 2).clamp(1, MAX_DEFAULT_CONNECTIONS)).unwrap_or(512)
}

/// `[payments.stripe]` checked: every problem pushed, `None` if there was one.
fn validate_stripe(
    raw: &RawStripe,
    wallet_currency: &str,
    p: &mut Problems,
) -> Option<StripeSettings> {
    let before = p.len();
    let at = |field: &str| format!("payments.stripe.{field}");
    let secret_key = raw.secret_key.clone().filter(|k| !k.0.is_empty());
    if secret_key.is_none() {
        p.push(
            &at("secret_key"),
            "is required (or TOLLGATE_STRIPE_SECRET_KEY): Stripe's secret API key",
        );
    }
    if raw.webhook_secrets.is_empty() || raw.webhook_secrets.iter().any(|s| s.0.is_empty()) {
        p.push(
            &at("webhook_secrets"),
            "must list every webhook signing secret in use (whsec_...), none empty (or TOLLGATE_STRIPE_WEBHOOK_SECRETS, comma-separated)",
        );
    }
    let api_base = raw.api_base.trim_end_matches('/').to_string();
    let is_url = |u: &str| u.starts_with("https://") || u.starts_with("http://");
    if !is_url(&api_base) || api_base.parse::<Uri>().is_err() {
        p.push(
            &at("api_base"),
            "must be an http(s) URL, e.g. https://api.stripe.com",
        );
    }
    let currency = raw
        .currency
        .clone()
        .unwrap_or_else(|| wallet_currency.to_string())
        .to_ascii_lowercase();
    if !currency.eq_ignore_ascii_case(wallet_currency) {
        p.push(
            &at("currency"),
            format!(
                "must be the wallet's currency ({wallet_currency}): one credit is one unit of it"
            ),
        );
    }
    let mut amount = |field: &str, text: &str| match Nanos::parse_credits(text) {
        Ok(n)
            if n > Nanos::ZERO
                && tollgate_core::payment::credits_to_minor(n, &currency).is_some() =>
        {
            Some(n)
        }
        _ => {
            p.push(
                &at(field),
                format!("must be a positive amount in whole minor units of {currency}, e.g. \"5\""),
            );
            None
        }
    };
    let min_topup = amount("min_topup", &raw.min_topup);
    let max_topup = amount("max_topup", &raw.max_topup);
    if let (Some(min), Some(max)) = (min_topup, max_topup) {
        if min > max {
            p.push(&at("max_topup"), "must be at least min_topup");
        }
    }
    for (field, url) in [
        ("success_url", &raw.success_url),
        ("cancel_url", &raw.cancel_url),
    ] {
        if !is_url(url) {
            p.push(
                &at(field),
                "is required: an http(s) URL Checkout sends the customer back to ({TOPUP_ID} is replaced by the top-up's id)",
            );
        }
    }
    let mut duration =
        |field: &str, text: &str, range: std::ops::RangeInclusive<Duration>, hint: &str| {
            match humantime::parse_duration(text) {
                Ok(d) if range.contains(&d) => Some(d),
                _ => {
                    p.push(&at(field), hint.to_string());
                    None
                }
            }
        };
    let session_expiry = duration(
        "session_expiry",
        &raw.session_expiry,
        Duration::from_secs(30 * 60)..=Duration::from_secs(24 * 3600),
        "must be a duration from 30m to 24h (Stripe's bounds)",
    );
    let signature_tolerance = duration(
        "signature_tolerance",
        &raw.signature_tolerance,
        Duration::from_secs(1)..=Duration::from_secs(3600),
        "must be a duration from 1s to 1h, e.g. \"300s\"",
    );
    let timeout = duration(
        "timeout",
        &raw.timeout,
        Duration::from_millis(100)..=Duration::from_secs(60),
        "must be a duration from 100ms to 60s",
    );
    let reconcile_interval = duration(
        "reconcile_interval",
        &raw.reconcile_interval,
        Duration::ZERO..=Duration::from_secs(7 * 24 * 3600),
        "must be a duration up to 7 days, or \"0s\" for never",
    );
    let auto_topup_interval = duration(
        "auto_topup_interval",
        &raw.auto_topup_interval,
        Duration::from_millis(100)..=Duration::from_secs(3600),
        "must be a duration from 100ms to 1h",
    );
    if raw.webhook_max_bytes < 1024 {
        p.push(&at("webhook_max_bytes"), "must be at least 1024");
    }
    if p.len() > before {
        return None;
    }
    Some(StripeSettings {
        secret_key: secret_key?,
        webhook_secrets: raw.webhook_secrets.clone(),
        api_base,
        currency,
        min_topup: min_topup?,
        max_topup: max_topup?,
        success_url: raw.success_url.clone(),
        cancel_url: raw.cancel_url.clone(),
        session_expiry: session_expiry?,
        signature_tolerance: signature_tolerance?,
        webhook_max_bytes: usize::try_from(raw.webhook_max_bytes).unwrap_or(usize::MAX),
        timeout: timeout?,
        reconcile_interval: reconcile_interval.filter(|d| !d.is_zero()),
        auto_topup_interval: auto_topup_interval?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    const NO_ENV: [(&str, &str); 0] = [];

    fn problems(toml: &str) -> String {
        match Config::load(toml, NO_ENV) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_public_route_cannot_be_priced_or_carry_key_policies() {
        let text = problems(
            r#"
            [[routes]]
            prefix = "/public"
            upstream = "http://127.0.0.1:9/echo"
            group = "public"
            auth = "none"
            price = "0.001"
            rate_limits = [{ name = "r", scope = "key", limit = 1, window = "1s" }]
            "#,
        );
        assert!(
            text.contains("routes[0].auth: a route with auth = \"none\" has no account to charge"),
            "{text}"
        );
        assert!(
            text.contains("use a global ip policy instead of route rate_limits"),
            "{text}"
        );
        let free = problems(
            r#"
            [[routes]]
            prefix = "/public"
            upstream = "http://127.0.0.1:9/echo"
            group = "public"
            auth = "none"
            "#,
        );
        assert_eq!(free, "ok");
    }

    #[test]
    fn a_route_forwards_only_the_methods_it_names_and_never_connect_or_trace() {
        let route = |methods: &str| {
            format!(
                "[[routes]]\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:9\"\ngroup = \"r\"\n{methods}"
            )
        };
        let config = Config::load(&route(""), NO_ENV).unwrap();
        let names: Vec<&str> = config.routes[0]
            .methods
            .iter()
            .map(|m| m.as_str())
            .collect();
        assert_eq!(
            names,
            ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        );
        let config = Config::load(&route("methods = [\"GET\", \"PROPFIND\"]"), NO_ENV).unwrap();
        assert_eq!(config.routes[0].methods.len(), 2);
        let text = problems(&route("methods = [\"TRACE\", \"get\", \"CONNECT\"]"));
        assert!(
            text.contains("routes[0].methods: 'TRACE' cannot be forwarded"),
            "{text}"
        );
        assert!(
            text.contains("routes[0].methods: 'CONNECT' cannot be forwarded"),
            "{text}"
        );
        assert!(
            text.contains("'get' is not an HTTP method in upper case"),
            "{text}"
        );
        let text = problems(&route("methods = []"));
        assert!(
            text.contains("routes[0].methods: must name at least one method"),
            "{text}"
        );
    }

    #[test]
    fn empty_file_is_a_valid_config_with_defaults() {
        let config = Config::load("", NO_ENV).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.api_prefix, "/api/v1");
        assert_eq!(config.currency, "USD");
        assert_eq!(
            config.store,
            StoreConfig::Sqlite {
                path: "tollgate-data/tollgate.db".into()
            }
        );
        assert!(config.routes.is_empty());
    }

    #[test]
    fn a_full_route_is_normalised() {
        let config = Config::load(
            r#"
            [[routes]]
            prefix = "/echo/"
            upstream = "http://127.0.0.1:9000/echo/"
            group = "echo"
            error_profile = "problem"
            price = "0.001"
            connect_timeout = "250ms"
            timeout = "3s"
            upstream_headers = { authorization = "Bearer sk-upstream" }
            "#,
            NO_ENV,
        )
        .unwrap();
        let route = &config.routes[0];
        assert_eq!(route.prefix, "/echo");
        assert_eq!(route.upstream.to_string(), "http://127.0.0.1:9000/echo");
        assert_eq!(route.error_profile, ErrorProfile::Problem);
        assert_eq!(route.pricing.flat, Nanos(1_000_000));
        assert_eq!(route.connect_timeout, Duration::from_millis(250));
        assert_eq!(route.timeout, Duration::from_secs(3));
        assert_eq!(route.upstream_headers[0].1, "Bearer sk-upstream");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        expect![[r#"
            8 problems in the config:
              - server.lisen: unknown field `lisen`, expected one of `listen`, `api_prefix`, `request_id_header`, `max_body_bytes`, `key_cache_capacity`, `trusted_proxies`, `header_read_timeout`, `body_read_timeout`, `max_connections`, `http2_max_concurrent_streams`, `max_header_bytes`
              - routes[0].upstream: invalid type: integer `5`, expected a string
              - routes[2].group: is required
              - surprise: unknown section (expected server, store, redis, admin, billing, keys, load_shedding, idempotency, console, payments, webhooks, export, rate_limits, routes, plans or packs)
              - billing.currency: must be a three-letter code in capitals, e.g. USD
              - routes[1].prefix: '/api/v2' overlaps '/api', which Tollgate serves itself
              - routes[1].price: '-1' is negative; amounts here must be zero or more
              - routes[1].timeout: must be a positive duration, e.g. "5s" or "500ms"
        "#]]
        .assert_eq(&problems(
            r#"
            surprise = 1
            [server]
            lisen = "x"
            [billing]
            currency = "usd"
            [[routes]]
            prefix = "/a"
            upstream = 5
            group = "a"
            [[routes]]
            prefix = "/api/v2"
            upstream = "http://h"
            group = "g"
            price = "-1"
            timeout = "0s"
            [[routes]]
            prefix = "/c"
            upstream = "http://h"
            "#,
        ));
    }

    /// A field that does not read hides no other problem of its section, route or policy.
    #[test]
    fn every_problem_of_one_section_or_item_is_reported_too() {
        expect![[r#"
            9 problems in the config:
              - server.max_body_bytes: invalid type: string "big", expected u64
              - rate_limits[0].window: invalid type: integer `5`, expected a string
              - routes[0].group: is required
              - server.listen: must be an address and port, e.g. 127.0.0.1:8080
              - billing.currency: must be a three-letter code in capitals, e.g. USD
              - rate_limits[0].limit: must be at least 1
              - routes[0].prefix: must be a path starting with /, e.g. /v1
              - routes[0].upstream: must be an http:// or https:// URL with a host and no query, e.g. https://api.example.com/v1
              - routes[0].price: 'abc' is not a decimal amount (expected digits with an optional '.', e.g. "0.25")
        "#]]
        .assert_eq(&problems(
            r#"
            [server]
            listen = "nope"
            max_body_bytes = "big"
            [billing]
            currency = ""
            [[rate_limits]]
            name = "x"
            scope = "key"
            limit = 0
            window = 5
            [[routes]]
            prefix = "api"
            upstream = "ftp://x"
            price = "abc"
            "#,
        ));
    }

    #[test]
    fn export_sinks_are_checked_whole_and_defaulted_by_kind() {
        expect![[r#"
            14 problems in the config:
              - export.poll_interval: must be a positive duration, e.g. "1s"
              - export.sinks[0].name: must be 1 to 64 letters, digits, '-' or '_'
              - export.sinks[0].kind: 'kafka' is not a sink kind (expected stripe, openmeter, lago or webhook)
              - export.sinks[0].url: must be an http(s) URL
              - export.sinks[0].secret: is required: the sink's API key (or, for a webhook sink, its whsec_ secret)
              - export.sinks[0].meters.cost: must be the meter's name in the sink: 1 to 100 characters
              - export.sinks[0].meters.money: is not a meter (expected requests, cost, input_tokens, cached_input_tokens or output_tokens)
              - export.sinks[0].customer: 'someone' is not a customer mapping (expected account or mapped)
              - export.sinks[0].max_age: must be a positive duration, e.g. "35d"
              - export.sinks[0].batch_size: must be 1 to 10000
              - export.sinks[0].totals_url: is for webhook sinks only: the other sinks are asked through their own API
              - export.sinks[1].batch_size: must be 1 to 100
              - export.sinks[2].name: 'lago' names two sinks
              - export.sinks[2].secret: must be a whsec_ secret (base64 after the prefix)
        "#]]
        .assert_eq(&problems(
            r#"
            [export]
            poll_interval = "0s"
            [[export.sinks]]
            name = "bad name"
            kind = "kafka"
            url = "ftp://x"
            meters = { money = "m", cost = "" }
            customer = "someone"
            max_age = "soon"
            batch_size = 0
            totals_url = "http://x/totals"
            [[export.sinks]]
            name = "lago"
            kind = "lago"
            url = "https://api.getlago.com"
            secret = "key"
            meters = { cost = "api_cost" }
            batch_size = 500
            [[export.sinks]]
            name = "lago"
            kind = "webhook"
            url = "https://billing.example.com/usage"
            secret = "not-whsec"
            meters = { requests = "calls" }
            "#,
        ));
        let config = Config::load(
            "[[export.sinks]]\nname = \"stripe\"\nkind = \"stripe\"\n\
             url = \"https://api.stripe.com/\"\nsecret = \"sk_live_x\"\n\
             meters = { output_tokens = \"out\", cost = \"spend\" }\n",
            NO_ENV,
        )
        .unwrap();
        let stripe = config.export.sink("stripe").unwrap();
        assert_eq!(stripe.url, "https://api.stripe.com");
        assert_eq!(stripe.customer, CustomerIds::Mapped);
        assert_eq!(stripe.max_age, Some(Duration::from_secs(35 * 86_400)));
        assert_eq!(
            stripe.meters,
            vec![
                (Meter::Cost, "spend".into()),
                (Meter::OutputTokens, "out".into())
            ]
        );
        assert!(!config.raw.to_redacted_toml().contains("sk_live_x"));
    }

    #[test]
    fn console_timeouts_are_positive_durations() {
        expect![[r#"
            2 problems in the config:
              - console.idle_timeout: must be a positive duration, e.g. "30m"
              - console.absolute_timeout: must be a positive duration, e.g. "30m"
        "#]]
        .assert_eq(&problems(
            r#"
            [console]
            idle_timeout = "0s"
            absolute_timeout = "soon"
            "#,
        ));
        let config = Config::load("[console]\nidle_timeout = \"5m\"\n", NO_ENV).unwrap();
        assert_eq!(config.console.idle_timeout, Duration::from_secs(300));
        assert_eq!(
            config.console.absolute_timeout,
            Duration::from_secs(12 * 3600)
        );
    }

    #[test]
    fn load_shedding_bounds_are_checked() {
        expect![[r#"
            4 problems in the config:
              - load_shedding.max_limit: must be at least min_limit
              - load_shedding.initial_limit: must lie between min_limit and max_limit
              - load_shedding.tolerance: must be a number of at least 1, e.g. 2.0
              - load_shedding.cpu_threshold: must be a fraction of the machine's CPU above 0 and at most 1, e.g. 0.9
        "#]]
        .assert_eq(&problems(
            r#"
            [load_shedding]
            initial_limit = 5
            min_limit = 10
            max_limit = 8
            tolerance = 0.5
            cpu_threshold = 90
            "#,
        ));
        let off = Config::load("[load_shedding]\nenabled = false", NO_ENV).unwrap();
        assert_eq!(off.load_shedding, None);
        let on = Config::load("[load_shedding]\ncpu_threshold = 0.9", NO_ENV).unwrap();
        assert_eq!(on.load_shedding.unwrap().cpu_threshold, Some(0.9));
    }

    #[test]
    fn reserved_and_overlapping_prefixes_are_rejected() {
        for prefix in [
            "/",
            "/api",
            "/api/v1/x",
            "/console/",
            "/healthz",
            "/readyz/x",
            "/metrics",
        ] {
            let text = format!(
                "[[routes]]\nprefix = \"{prefix}\"\nupstream = \"http://h\"\ngroup = \"g\"\n"
            );
            let out = problems(&text);
            assert!(out.contains("routes[0].prefix"), "{prefix}: {out}");
        }
        // Sharing a first letter is not an overlap.
        let ok = "[[routes]]\nprefix = \"/apix\"\nupstream = \"http://h\"\ngroup = \"g\"\n";
        assert_eq!(problems(ok), "ok");
    }

    #[test]
    fn duplicate_prefixes_are_rejected() {
        let text = "[[routes]]\nprefix = \"/a\"\nupstream = \"http://h\"\ngroup = \"g\"\n\
                    [[routes]]\nprefix = \"/a/\"\nupstream = \"http://h\"\ngroup = \"g\"\n";
        assert!(
            problems(text).contains("routes[1].prefix: '/a' is already the prefix of routes[0]")
        );
    }

    #[test]
    fn bad_upstreams_and_headers_are_named() {
        let text = "[[routes]]\nprefix = \"/a\"\nupstream = \"ftp://h\"\ngroup = \"g\"\n\
                    upstream_headers = { connection = \"x\", \"bad name\" = \"y\" }\n";
        let out = problems(text);
        assert!(out.contains("routes[0].upstream:"), "{out}");
        assert!(
            out.contains("routes[0].upstream_headers.connection: is managed by the proxy"),
            "{out}"
        );
        assert!(
            out.contains("routes[0].upstream_headers.bad name: is not a valid header name"),
            "{out}"
        );
    }

    #[test]
    fn toml_syntax_errors_say_where() {
        let out = problems("[server\nlisten = 1");
        assert!(out.starts_with("1 problem in the config:"), "{out}");
        assert!(out.contains("line 1"), "{out}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = Config::load(
            "[server]\nlisten = \"127.0.0.1:1\"\n",
            [
                ("TOLLGATE_LISTEN", "127.0.0.1:2"),
                ("TOLLGATE_ADMIN_TOKEN", "an-admin-token-long-enough"),
                ("TOLLGATE_DATABASE_URL", "sqlite:///tmp/x.db"),
                ("TOLLGATE_UNRELATED", "ignored"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:2");
        assert_eq!(
            config.admin_token,
            Some(Secret("an-admin-token-long-enough".into()))
        );
        assert_eq!(
            config.store,
            StoreConfig::Sqlite {
                path: "/tmp/x.db".into()
            }
        );
    }

    #[test]
    fn stripe_takes_its_secrets_from_the_environment_and_checks_every_field() {
        let config = Config::load(
            "[payments.stripe]\nsuccess_url = \"https://a.example/ok?t={TOPUP_ID}\"\n\
             cancel_url = \"https://a.example/no\"\nmin_topup = \"1.50\"\n",
            [
                ("TOLLGATE_STRIPE_SECRET_KEY", "sk_test_123"),
                ("TOLLGATE_STRIPE_WEBHOOK_SECRETS", "whsec_old, whsec_new"),
            ],
        )
        .unwrap();
        let stripe = config.stripe.unwrap();
        assert_eq!(stripe.secret_key, Secret("sk_test_123".into()));
        assert_eq!(
            stripe.webhook_secrets,
            [Secret("whsec_old".into()), Secret("whsec_new".into())]
        );
        assert_eq!(
            (stripe.currency.as_str(), stripe.min_topup),
            ("usd", Nanos(1_500_000_000))
        );
        assert_eq!(stripe.reconcile_interval, Some(Duration::from_secs(600)));
        assert!(!config.raw.to_redacted_toml().contains("sk_test_123"));
        assert!(!config.raw.to_redacted_toml().contains("whsec_new"));

        let problems = Config::load(
            "[payments.stripe]\nwebhook_secrets = [\"\"]\napi_base = \"ftp://x\"\n\
             currency = \"eur\"\nmin_topup = \"0.001\"\nmax_topup = \"0\"\n\
             success_url = \"nowhere\"\nsession_expiry = \"10m\"\ntimeout = \"5m\"\n\
             signature_tolerance = \"2h\"\nreconcile_interval = \"soon\"\nwebhook_max_bytes = 10\n\
             auto_topup_interval = \"0s\"\n",
            std::iter::empty::<(&str, &str)>(),
        )
        .unwrap_err()
        .to_string();
        for field in [
            "secret_key",
            "webhook_secrets",
            "api_base",
            "currency",
            "min_topup",
            "max_topup",
            "success_url",
            "cancel_url",
            "session_expiry",
            "timeout",
            "signature_tolerance",
            "reconcile_interval",
            "auto_topup_interval",
            "webhook_max_bytes",
        ] {
            assert!(
                problems.contains(&format!("payments.stripe.{field}:")),
                "{field} not reported in:\n{problems}"
            );
        }
        assert!(Config::load("", std::iter::empty::<(&str, &str)>())
            .unwrap()
            .stripe
            .is_none());
    }

    #[test]
    fn secrets_never_print() {
        let config = Config::load(
            "[admin]\ntoken = \"super-secret-admin-token\"\n\
             [[routes]]\nprefix = \"/a\"\nupstream = \"http://h\"\ngroup = \"g\"\n\
             upstream_headers = { authorization = \"Bearer sk-upstream-secret\" }\n",
            NO_ENV,
        )
        .unwrap();
        let printed = format!("{}{config:?}", config.raw.to_redacted_toml());
        assert!(!printed.contains("super-secret-admin-token"));
        assert!(!printed.contains("sk-upstream-secret"));
        assert!(
            printed.contains("authorization = \"<redacted>\""),
            "{printed}"
        );
    }

    #[test]
    fn the_documented_example_config_is_valid() {
        let config = Config::load(
            include_str!("../../../../docs/tollgate.example.toml"),
            NO_ENV,
        )
        .unwrap();
        assert_eq!(config.routes.len(), 4);
        assert_eq!(config.starter_credits, Nanos(1_000_000_000));
        let openai = &config.routes[0].pricing;
        let (api, models) = openai.llm.as_ref().unwrap();
        assert_eq!(*api, LlmApi::OpenAi);
        assert_eq!(models["gpt-4o-mini"].output, Nanos(600_000_000));
        let render = &config.routes[3].pricing;
        assert_eq!(render.hold, HoldRule::MaxHold(Nanos(50_000_000)));
        assert_eq!(
            render.per_unit.as_ref().unwrap().from,
            UnitsFrom::JsonPointer("/pages".into())
        );
    }

    #[test]
    fn pricing_rules_are_checked() {
        let route = "[[routes]]\nprefix = \"/a\"\nupstream = \"http://h\"\ngroup = \"g\"\n";
        let out = problems(&format!("{route}kind = \"openai\"\n"));
        assert!(
            out.contains("routes[0].models: an LLM route needs at least one model"),
            "{out}"
        );
        let out = problems(&format!("{route}unit_price = \"0.1\"\n"));
        assert!(
            out.contains("routes[0].unit_price: unit_price and units_from go together"),
            "{out}"
        );
        let out = problems(&format!(
            "{route}unit_price = \"0.1\"\nunits_from = \"units\"\n"
        ));
        assert!(
            out.contains("routes[0].units_from: must be a JSON pointer"),
            "{out}"
        );
        let out = problems(&format!(
            "{route}unit_price = \"0.1\"\nunits_from = \"/units\"\nhold = \"flat\"\n"
        ));
        assert!(
            out.contains("routes[0].hold: a metered route cannot hold only its flat price"),
            "{out}"
        );
        let out = problems(&format!(
            "{route}hold = \"max_hold\"\n[routes.models.m]\ninput = \"x\"\noutput = \"1\"\n"
        ));
        assert!(out.contains("routes[0].max_hold: is required"), "{out}");
        assert!(
            out.contains("routes[0].models.m.input: 'x' is not a decimal amount"),
            "{out}"
        );
        assert!(out.contains("routes[0].models: only LLM routes"), "{out}");
        let out = problems("[billing]\nrequest_hold_ttl = \"soon\"\nmanagement_fee = \"-1\"\n");
        assert!(
            out.contains("billing.request_hold_ttl: must be a positive duration"),
            "{out}"
        );
        assert!(
            out.contains("billing.management_fee: '-1' is negative"),
            "{out}"
        );
    }

    #[test]
    fn connection_timeouts_must_be_positive() {
        let out =
            problems("[server]\nheader_read_timeout = \"0s\"\nbody_read_timeout = \"soon\"\n");
        assert!(
            out.contains("server.header_read_timeout: must be a positive duration, e.g. \"10s\""),
            "{out}"
        );
        assert!(
            out.contains("server.body_read_timeout: must be a positive duration, e.g. \"60s\""),
            "{out}"
        );
    }

    #[test]
    fn weak_admin_tokens_and_other_stores_are_refused() {
        let out = problems("[admin]\ntoken = \"short\"\n[store]\nurl = \"mysql://x\"\n");
        assert!(
            out.contains("admin.token: must be at least 16 characters"),
            "{out}"
        );
        assert!(
            out.contains("store.url: must be a sqlite:// or postgres:// URL"),
            "{out}"
        );
    }

    #[test]
    fn a_postgres_url_selects_postgres_and_is_never_shown() {
        let url = "postgres://tollgate:hunter2@127.0.0.1:5432/tollgate";
        let store = parse_store_url(url).unwrap();
        assert_eq!(
            store,
            StoreConfig::Postgres {
                url: Secret(url.into())
            }
        );
        assert!(!format!("{store:?}").contains("hunter2"));
        let raw = RawStore { url: url.into() };
        assert!(!format!("{raw:?}").contains("hunter2"));
        let shown = toml::to_string(&raw).unwrap();
        assert_eq!(
            shown.trim(),
            "url = \"postgres://tollgate:<redacted>@127.0.0.1:5432/tollgate\""
        );
        assert_eq!(
            raw::without_password("sqlite://data/t.db"),
            "sqlite://data/t.db"
        );
        assert_eq!(
            raw::without_password("postgres://u@h/db"),
            "postgres://u@h/db"
        );
    }
}
