//! Step 1 of reading the config: exactly what the file says. The TOML is split into its
//! sections and each route, and each piece is read into a serde type with `deny_unknown_fields`,
//! leniently, so every problem is collected. Nothing here is checked beyond its type; that is
//! `Config::from_raw`'s work, which this never calls.

use crate::config::plans::{RawPackOffer, RawPlan};
use crate::config::problems::Problems;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use tollgate_core::ratelimit::{FailureMode, Scope, Unit};
use tollgate_core::KeyEnv;
use tollgate_wire::ErrorProfile;

/// Environment variables that override config values. Only these are read; they are the
/// documented list in `docs/config.md`.
pub const ENV_OVERRIDES: &[(&str, &str, &str)] = &[
    ("TOLLGATE_LISTEN", "server", "listen"),
    ("TOLLGATE_DATABASE_URL", "store", "url"),
    ("TOLLGATE_ADMIN_TOKEN", "admin", "token"),
    ("TOLLGATE_REDIS_URL", "redis", "url"),
    (
        "TOLLGATE_STRIPE_SECRET_KEY",
        "payments.stripe",
        "secret_key",
    ),
    // Comma-separated: every secret a webhook signature may be made with (rotation).
    (
        "TOLLGATE_STRIPE_WEBHOOK_SECRETS",
        "payments.stripe",
        "webhook_secrets",
    ),
];

const REDACTED: &str = "<redacted>";

/// The table at a dotted path (`payments.stripe`: a table inside a table), made if missing;
/// `None` if something on the way is not a table.
fn table_at<'t>(table: &'t mut toml::Table, path: &str) -> Option<&'t mut toml::Table> {
    let mut place = table;
    for part in path.split('.') {
        place = match place
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(inner) => inner,
            _ => return None,
        };
    }
    Some(place)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RawConfig {
    pub server: RawServer,
    pub store: RawStore,
    pub admin: RawAdmin,
    pub billing: RawBilling,
    pub keys: RawKeys,
    pub load_shedding: RawLoadShedding,
    pub idempotency: RawIdempotency,
    pub console: RawConsole,
    pub redis: RawRedis,
    pub payments: RawPayments,
    pub webhooks: RawWebhooks,
    pub export: RawExport,
    /// Policies for every route (and the management API); `None` means the defaults.
    pub rate_limits: Option<Vec<RawPolicy>>,
    pub routes: Vec<RawRoute>,
    pub plans: Vec<RawPlan>,
    /// Credit packs customers may buy (`[[packs]]`).
    pub packs: Vec<RawPackOffer>,
}

/// A rate-limit policy as written in config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub name: String,
    pub scope: Scope,
    #[serde(default = "requests")]
    pub unit: Unit,
    pub limit: u64,
    pub window: String,
    #[serde(default)]
    pub burst: u64,
    /// `open` (admit, and count it) or `closed` (503) when the shared limiter is unreachable.
    #[serde(default)]
    pub on_limiter_failure: FailureMode,
}

fn requests() -> Unit {
    Unit::Requests
}

/// The policies used when the config has no `[[rate_limits]]`: failed or anonymous calls per
/// client address (a brake on key guessing), and a generous ceiling per key.
pub fn default_rate_limits() -> Vec<RawPolicy> {
    vec![
        RawPolicy {
            name: "anonymous-per-ip".into(),
            scope: Scope::Ip,
            unit: Unit::Requests,
            limit: 600,
            window: "1m".into(),
            burst: 100,
            on_limiter_failure: FailureMode::Open,
        },
        RawPolicy {
            name: "per-key".into(),
            scope: Scope::Key,
            unit: Unit::Requests,
            limit: 6000,
            window: "1m".into(),
            burst: 1000,
            on_limiter_failure: FailureMode::Open,
        },
    ]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub api_prefix: String,
    pub request_id_header: String,
    pub max_body_bytes: u64,
    pub key_cache_capacity: u64,
    /// Proxies (CIDRs) whose `X-Forwarded-For` is believed when working out the client address.
    pub trusted_proxies: Vec<String>,
    /// How long a client has to send a request's head, from the connection's start or the end
    /// of the previous response (so also how long an idle keep-alive connection stays open).
    pub header_read_timeout: String,
    /// How long a request body may go without a byte arriving before it is refused.
    pub body_read_timeout: String,
    /// Connections open at once; `0` is half the process's open-file limit.
    pub max_connections: u64,
    /// Requests one HTTP/2 connection may have in flight at once.
    pub http2_max_concurrent_streams: u32,
    /// The largest request head (request line and headers) accepted; larger gets 431.
    pub max_header_bytes: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            api_prefix: "/api/v1".into(),
            request_id_header: "x-request-id".into(),
            max_body_bytes: 10 * 1024 * 1024,
            key_cache_capacity: 100_000,
            trusted_proxies: Vec::new(),
            header_read_timeout: "10s".into(),
            body_read_timeout: "60s".into(),
            max_connections: 0,
            http2_max_concurrent_streams: 100,
            max_header_bytes: 64 * 1024,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// A PostgreSQL URL may carry a password: shown (`Debug`, `check-config`) without it.
    #[serde(serialize_with = "serialize_without_password")]
    pub url: String,
}

impl fmt::Debug for RawStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawStore")
            .field("url", &without_password(&self.url))
            .finish()
    }
}

/// `scheme://user:password@host/...` with the password replaced.
pub(crate) fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:{REDACTED}{}", &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn serialize_without_password<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&without_password(url))
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            url: "sqlite://tollgate-data/tollgate.db".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBilling {
    pub currency: String,
    pub starter_credits: String,
    /// Charged for each metered management call (creating a key or a hold) made with an
    /// account's key, settled only when the call succeeds.
    pub management_fee: String,
    /// How long a data-plane request's hold lives before the sweeper releases it.
    pub request_hold_ttl: String,
    /// How often the sweeper looks for expired holds.
    pub sweep_interval: String,
    /// How long usage rows are kept.
    pub usage_retention: String,
    /// Whether each data-plane request leaves a usage row (charges are in the ledger either way).
    pub usage_log: bool,
    /// The plan (from `[[plans]]`) of accounts with no subscription of their own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_plan: Option<String>,
}

impl Default for RawBilling {
    fn default() -> Self {
        RawBilling {
            currency: "USD".into(),
            starter_credits: "0".into(),
            management_fee: "0".into(),
            request_hold_ttl: "15m".into(),
            sweep_interval: "1s".into(),
            usage_retention: "90days".into(),
            usage_log: true,
            default_plan: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKeys {
    /// `live` keys start `tg_live_`, `test` keys `tg_test_`.
    pub env: KeyEnv,
    /// Unrevoked keys an account may have, its master keys included; overridable per account.
    pub max_per_account: u32,
}

impl Default for RawKeys {
    fn default() -> Self {
        RawKeys {
            env: KeyEnv::Live,
            max_per_account: 100,
        }
    }
}

/// The shared Redis: when set, rate limits are decided there, so they hold across every node.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    /// `redis://[user:password@]host[:port][/db]`; unset means each node limits on its own.
    #[serde(serialize_with = "serialize_optional_without_password")]
    pub url: Option<String>,
}

impl fmt::Debug for RawRedis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawRedis")
            .field("url", &self.url.as_deref().map(without_password))
            .finish()
    }
}

fn serialize_optional_without_password<S: serde::Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_some(&without_password(url)),
        None => s.serialize_none(),
    }
}

/// `Idempotency-Key` handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdempotency {
    /// How long a key's outcome is kept for replay.
    pub retention: String,
    /// The largest response body kept for replay; a larger one is refused on replay.
    pub max_response_bytes: u64,
}

/// The web console at `/console/`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsole {
    /// A session unused this long ends.
    pub idle_timeout: String,
    /// A session ends this long after sign-in, however busy.
    pub absolute_timeout: String,
    /// The IANA time zone the usage charts and the requests page's times are in.
    pub time_zone: String,
}

/// Webhooks to accounts' endpoints (`[webhooks]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWebhooks {
    /// How many endpoints an account may have.
    pub max_endpoints_per_account: u32,
    /// Accept `http://` endpoint URLs (for receivers on the operator's own network); https only
    /// otherwise.
    pub allow_http: bool,
    /// Address ranges (CIDR) endpoints may be in although they are inside the network: an
    /// on-premises receiver. Empty by default: every inside address is refused.
    pub allow_private: Vec<String>,
    /// How long one delivery attempt may take, connection included.
    pub attempt_timeout: String,
    /// How long a rotated secret keeps signing beside the new one.
    pub rotation_overlap: String,
    /// How many deliveries are in flight at once, over all endpoints.
    pub concurrency: u32,
    /// How often the sender looks for due deliveries.
    pub poll_interval: String,
    /// How long an event and its deliveries are kept once every delivery is over.
    pub retention: String,
}

impl Default for RawWebhooks {
    fn default() -> Self {
        RawWebhooks {
            max_endpoints_per_account: 10,
            allow_http: false,
            allow_private: Vec::new(),
            attempt_timeout: "10s".into(),
            rotation_overlap: "24h".into(),
            concurrency: 16,
            poll_interval: "1s".into(),
            retention: "30d".into(),
        }
    }
}

/// Usage export to billing systems (`[export]`); nothing is exported without a sink.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawExport {
    /// How often an idle exporter looks for new usage.
    pub poll_interval: String,
    /// How long the export log keeps a record every sink has passed.
    pub retention: String,
    pub sinks: Vec<RawSink>,
}

impl Default for RawExport {
    fn default() -> Self {
        RawExport {
            poll_interval: "1s".into(),
            retention: "90d".into(),
            sinks: Vec::new(),
        }
    }
}

/// One billing system usage is sent to (`[[export.sinks]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    /// How the operator names it: in cursors, metrics, the API and `tollgate export`.
    pub name: String,
    /// `stripe` (meter events), `openmeter` (CloudEvents), `lago` (batch events) or `webhook`
    /// (signed CloudEvents batches).
    pub kind: String,
    /// The API's base URL (for `webhook`, where batches are POSTed).
    pub url: String,
    /// Stripe's secret key, OpenMeter's or Lago's API key, or the webhook's `whsec_` secret.
    pub secret: Option<Secret>,
    /// Tollgate's meters sent, each with its name in the sink: Stripe's event name, OpenMeter's
    /// meter slug, Lago's billable metric code, or the webhook's data field.
    #[serde(default)]
    pub meters: std::collections::BTreeMap<String, String>,
    /// `account` (the account id is the customer) or `mapped` (the customer id set per account
    /// through the API). Default: `mapped` for Stripe, `account` otherwise.
    pub customer: Option<String>,
    /// Records older than this are not sent (dead letters). Default: 35 days for Stripe, which
    /// refuses older meter events; no limit otherwise.
    pub max_age: Option<String>,
    /// Records per request to the sink.
    #[serde(default = "default_sink_batch")]
    pub batch_size: u32,
    #[serde(default = "default_sink_timeout")]
    pub timeout: String,
    /// The CloudEvents `source` and `type` (OpenMeter and webhook sinks).
    #[serde(default = "default_event_source")]
    pub source: String,
    #[serde(default = "default_event_type")]
    pub event_type: String,
    /// Webhook sinks only: where `tollgate export verify` reads the receiver's totals.
    pub totals_url: Option<String>,
}

fn default_sink_batch() -> u32 {
    100
}

fn default_sink_timeout() -> String {
    "10s".into()
}

fn default_event_source() -> String {
    "tollgate".into()
}

fn default_event_type() -> String {
    "tollgate.usage".into()
}

/// Card payments; none unless `[payments.stripe]` is configured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPayments {
    pub stripe: Option<RawStripe>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStripe {
    pub secret_key: Option<Secret>,
    /// Every webhook signing secret in use (more than one while rotating).
    pub webhook_secrets: Vec<Secret>,
    pub api_base: String,
    /// The card currency: the wallet's (`billing.currency`) unless set, and it must match.
    pub currency: Option<String>,
    pub min_topup: String,
    pub max_topup: String,
    /// Where Checkout sends the customer after paying, and after giving up. `{TOPUP_ID}` is
    /// replaced by the top-up's id.
    pub success_url: String,
    pub cancel_url: String,
    /// How long a Checkout session stays open (Stripe allows 30 minutes to 24 hours).
    pub session_expiry: String,
    /// How old a webhook signature's timestamp may be.
    pub signature_tolerance: String,
    /// The most a webhook body may be.
    pub webhook_max_bytes: u64,
    /// How long a call to Stripe may take before the top-up is answered 503.
    pub timeout: String,
    /// How often Stripe's event list is read for deliveries that never arrived; "0s": never.
    pub reconcile_interval: String,
    /// How often each node looks for accounts whose automatic top-up is due.
    pub auto_topup_interval: String,
}

impl Default for RawStripe {
    fn default() -> Self {
        RawStripe {
            secret_key: None,
            webhook_secrets: Vec::new(),
            api_base: "https://api.stripe.com".into(),
            currency: None,
            min_topup: "5".into(),
            max_topup: "10000".into(),
            success_url: String::new(),
            cancel_url: String::new(),
            session_expiry: "1h".into(),
            signature_tolerance: "300s".into(),
            webhook_max_bytes: 256 * 1024,
            timeout: "10s".into(),
            reconcile_interval: "10m".into(),
            auto_topup_interval: "5s".into(),
        }
    }
}

impl Default for RawConsole {
    fn default() -> Self {
        RawConsole {
            idle_timeout: "30m".into(),
            absolute_timeout: "12h".into(),
            time_zone: "UTC".into(),
        }
    }
}

impl Default for RawIdempotency {
    fn default() -> Self {
        RawIdempotency {
            retention: "24h".into(),
            max_response_bytes: 1024 * 1024,
        }
    }
}

/// The adaptive concurrency limit (see `tollgate_core::load`) and the optional CPU brake.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLoadShedding {
    pub enabled: bool,
    pub initial_limit: u32,
    pub min_limit: u32,
    pub max_limit: u32,
    pub tolerance: f64,
    /// Machine-wide CPU use (0 to 1) above which the limit backs off; off when absent.
    pub cpu_threshold: Option<f64>,
}

impl Default for RawLoadShedding {
    fn default() -> Self {
        RawLoadShedding {
            enabled: true,
            initial_limit: 500,
            min_limit: 50,
            max_limit: 5000,
            tolerance: 2.0,
            cpu_threshold: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub prefix: String,
    pub upstream: String,
    pub group: String,
    /// `key` (every call needs an API key) or `none` (a public, unpriced route).
    #[serde(default)]
    pub auth: RouteAuth,
    #[serde(default)]
    pub error_profile: ErrorProfile,
    /// `http` (any API), or `openai` / `anthropic` for LLM routes priced per model.
    #[serde(default)]
    pub kind: RouteKind,
    /// Flat price per request, a decimal string of credits.
    #[serde(default = "zero")]
    pub price: String,
    /// Price per unit read from the response (`units_from`).
    #[serde(default)]
    pub unit_price: Option<String>,
    /// Where the units are: a JSON pointer into the response body (`/usage/units`) or
    /// `header:<name>`.
    #[serde(default)]
    pub units_from: Option<String>,
    /// LLM routes: per-model prices per million tokens.
    #[serde(default)]
    pub models: BTreeMap<String, RawModel>,
    /// How much to reserve before forwarding: `flat`, `max_tokens` or `max_hold`.
    #[serde(default)]
    pub hold: Option<HoldRuleName>,
    #[serde(default)]
    pub max_hold: Option<String>,
    /// LLM routes: the output tokens assumed for the hold when a request sets no `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// What to charge when a successful response reports no usage.
    #[serde(default)]
    pub stream_policy: StreamPolicy,
    /// LLM routes: what a POST to an endpoint Tollgate cannot meter gets: `refuse` (403), or
    /// charged `flat` (the route's price) or `max_hold`.
    #[serde(default)]
    pub other_endpoints: OtherEndpoints,
    /// After the client leaves mid-response, how long to keep reading for the usage.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: String,
    /// ... and how many bytes at most.
    #[serde(default = "default_drain_max_bytes")]
    pub drain_max_bytes: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    /// How long the upstream may take to send its response headers.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Headers added to every upstream request (e.g. the upstream's own API key). Those that
    /// carry credentials are shown redacted.
    #[serde(default, serialize_with = "serialize_upstream_headers")]
    pub upstream_headers: BTreeMap<String, Secret>,
    /// Policies for this route only, on top of the global ones.
    #[serde(default)]
    pub rate_limits: Vec<RawPolicy>,
    /// The methods the route forwards; any other is answered 405 before any work.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Index in the file's `routes` array, so messages name the route the operator wrote.
    #[serde(skip)]
    pub position: usize,
}

/// A route with every optional field at its default (the required ones empty).
impl Default for RawRoute {
    fn default() -> RawRoute {
        RawRoute {
            prefix: String::new(),
            upstream: String::new(),
            group: String::new(),
            auth: RouteAuth::default(),
            error_profile: ErrorProfile::default(),
            kind: RouteKind::default(),
            price: zero(),
            unit_price: None,
            units_from: None,
            models: BTreeMap::new(),
            hold: None,
            max_hold: None,
            default_max_tokens: default_max_tokens(),
            stream_policy: StreamPolicy::default(),
            other_endpoints: OtherEndpoints::default(),
            drain_timeout: default_drain_timeout(),
            drain_max_bytes: default_drain_max_bytes(),
            connect_timeout: default_connect_timeout(),
            timeout: default_timeout(),
            upstream_headers: BTreeMap::new(),
            rate_limits: Vec::new(),
            methods: default_methods(),
            position: 0,
        }
    }
}

/// What an HTTP API serves. Not `TRACE` (it echoes the request, credentials included, back
/// through any cache between) nor `CONNECT` (a tunnel, not an API call).
/// Shows an upstream header's value unless its name says it carries a credential
/// (`anthropic-version` is shown; `authorization`, `x-api-key`, a `*-token` are not).
fn serialize_upstream_headers<S: serde::Serializer>(
    headers: &BTreeMap<String, Secret>,
    s: S,
) -> Result<S::Ok, S::Error> {
    const CREDENTIALS: [&str; 8] = [
        "auth",
        "key",
        "token",
        "secret",
        "cookie",
        "password",
        "signature",
        "credential",
    ];
    let shown: BTreeMap<&str, &str> = headers
        .iter()
        .map(|(name, value)| {
            let lower = name.to_ascii_lowercase();
            let secret = CREDENTIALS.iter().any(|word| lower.contains(word));
            (
                name.as_str(),
                if secret { REDACTED } else { value.0.as_str() },
            )
        })
        .collect();
    serde::Serialize::serialize(&shown, s)
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        .map(String::from)
        .to_vec()
}

fn zero() -> String {
    "0".into()
}
fn default_max_tokens() -> u64 {
    4096
}
fn default_drain_timeout() -> String {
    "30s".into()
}
fn default_drain_max_bytes() -> u64 {
    1024 * 1024
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAuth {
    /// An API key whose scopes include the route's group; the call is limited and billed.
    #[default]
    Key,
    /// Anyone: no key is read, nothing is billed or logged; only `ip` policies apply.
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    #[default]
    Http,
    Openai,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldRuleName {
    Flat,
    MaxTokens,
    MaxHold,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamPolicy {
    /// Charge nothing: an explicit opt-in, since a response without usage is then free.
    Release,
    /// Charge the usage estimated from what passed: input as reported (or, if it was not, from
    /// the request body), output from the text that passed.
    #[default]
    Estimate,
}

/// On an LLM route, what a POST to an endpoint Tollgate has no usage reader for gets. Never
/// silently free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherEndpoints {
    /// 403 `forbidden`, naming the endpoint, before anything is forwarded.
    #[default]
    Refuse,
    /// Forwarded and charged the route's flat `price` (which must be above zero).
    Flat,
    /// Forwarded and charged the route's `max_hold`.
    MaxHold,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub input: String,
    pub output: String,
    /// Defaults to the input price.
    #[serde(default)]
    pub cached_input: Option<String>,
}
fn default_connect_timeout() -> String {
    "5s".into()
}
fn default_timeout() -> String {
    "60s".into()
}

impl RawConfig {
    /// Reads TOML text, then applies the environment overrides in `env`. The environment is
    /// passed in, never read here, so tests stay independent of the process. Reads as much as it
    /// can: a section or route that does not parse is left out and its problem recorded.
    pub(crate) fn read<I, K, V>(
        toml_text: &str,
        env: I,
        problems: &mut Problems,
    ) -> Option<RawConfig>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut table: toml::Table = match toml_text.parse() {
            Ok(table) => table,
            Err(e) => {
                problems.push("", e.to_string().trim_end());
                return None;
            }
        };
        for (name, value) in env {
            let Some((_, section, key)) =
                ENV_OVERRIDES.iter().find(|(n, _, _)| *n == name.as_ref())
            else {
                continue;
            };
            let value: String = value.into();
            let value = if *key == "webhook_secrets" {
                toml::Value::Array(
                    value
                        .split(',')
                        .map(|s| toml::Value::String(s.trim().to_string()))
                        .collect(),
                )
            } else {
                toml::Value::String(value)
            };
            match table_at(&mut table, section) {
                Some(place) => {
                    place.insert(key.to_string(), value);
                }
                None => problems.push(section, "must be a table"),
            }
        }
        let raw = RawConfig {
            server: section(&mut table, "server", problems),
            store: section(&mut table, "store", problems),
            admin: section(&mut table, "admin", problems),
            billing: section(&mut table, "billing", problems),
            keys: section(&mut table, "keys", problems),
            load_shedding: section(&mut table, "load_shedding", problems),
            idempotency: section(&mut table, "idempotency", problems),
            console: section(&mut table, "console", problems),
            redis: section(&mut table, "redis", problems),
            payments: section(&mut table, "payments", problems),
            webhooks: section(&mut table, "webhooks", problems),
            export: section(&mut table, "export", problems),
            rate_limits: table.remove("rate_limits").map(|value| {
                items(value, "rate_limits", problems)
                    .into_iter()
                    .map(|(_, policy)| policy)
                    .collect()
            }),
            routes: routes(&mut table, problems),
            plans: table
                .remove("plans")
                .map(|value| {
                    items(value, "plans", problems)
                        .into_iter()
                        .map(|(_, plan)| plan)
                        .collect()
                })
                .unwrap_or_default(),
            packs: table
                .remove("packs")
                .map(|value| {
                    items(value, "packs", problems)
                        .into_iter()
                        .map(|(_, pack)| pack)
                        .collect()
                })
                .unwrap_or_default(),
        };
        for unknown in table.keys() {
            problems.push(
                unknown,
                "unknown section (expected server, store, redis, admin, billing, keys, load_shedding, idempotency, console, payments, webhooks, export, rate_limits, routes, plans or packs)",
            );
        }
        Some(raw)
    }

    /// The effective config as TOML, defaults included (the rate limits too), secrets replaced
    /// by `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        let mut effective = self.clone();
        effective
            .rate_limits
            .get_or_insert_with(default_rate_limits);
        toml::to_string_pretty(&effective)
            .unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn section<T: DeserializeOwned + Default>(
    table: &mut toml::Table,
    key: &str,
    problems: &mut Problems,
) -> T {
    match table.remove(key) {
        None => T::default(),
        Some(value) => deserialize_at(value, key, problems).unwrap_or_default(),
    }
}

fn routes(table: &mut toml::Table, problems: &mut Problems) -> Vec<RawRoute> {
    let routes = table
        .remove("routes")
        .map(|value| items(value, "routes", problems));
    routes
        .unwrap_or_default()
        .into_iter()
        .map(|(i, mut route): (usize, RawRoute)| {
            route.position = i;
            route
        })
        .collect()
}

/// An array of tables, read item by item so one bad item hides no problem of another. Each item
/// that reads comes with its index in the file.
fn items<T: DeserializeOwned>(
    value: toml::Value,
    at: &str,
    problems: &mut Problems,
) -> Vec<(usize, T)> {
    let toml::Value::Array(items) = value else {
        problems.push(at, format!("must be an array of tables ([[{at}]])"));
        return Vec::new();
    };
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| Some((i, deserialize_at(item, &format!("{at}[{i}]"), problems)?)))
        .collect()
}

/// Reads `value` as a `T`, reporting every field that does not read rather than the first: a
/// field of the wrong type or an unknown one is reported and left out (so its default applies),
/// and a missing one is reported and stood in for by an empty string, so the rest of the item is
/// still read and checked. `None` if the item cannot be read at all.
fn deserialize_at<T: DeserializeOwned>(
    mut value: toml::Value,
    at: &str,
    problems: &mut Problems,
) -> Option<T> {
    let mut stood_in = std::collections::BTreeSet::new();
    // Each pass fixes one field; a table has far fewer fields than this.
    for _ in 0..64 {
        let error = match serde_path_to_error::deserialize(value.clone()) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let mut segments: Vec<String> = error
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect();
        // toml's messages end with "in `field`" lines that repeat the path; keep the first line.
        let message = error.into_inner().to_string();
        let message = message
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let named = |prefix: &str| {
            message
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('`').next())
                .map(str::to_string)
        };
        let (unknown, missing) = (named("unknown field `"), named("missing field `"));
        // A missing field's path is its table's; an unknown field's may be either.
        if let Some(field) = unknown.as_ref().or(missing.as_ref()) {
            if segments.last() != Some(field) {
                segments.push(field.clone());
            }
        }
        let path = segments.iter().fold(at.to_string(), |path, segment| {
            if segment.parse::<usize>().is_ok() {
                format!("{path}[{segment}]")
            } else {
                format!("{path}.{segment}")
            }
        });
        if missing.is_some() {
            if !stood_in.insert(path.clone()) {
                // The stand-in did not fit either: this item cannot be read.
                return None;
            }
            // Unless it is missing because its wrong value was just left out.
            problems.unread(&path, "is required".to_string());
        } else {
            problems.unread(&path, message);
        }
        let (last, parents) = segments.split_last()?;
        let parent = parents
            .iter()
            .try_fold(&mut value, |node, segment| match node {
                toml::Value::Table(table) => table.get_mut(segment),
                toml::Value::Array(array) => array.get_mut(segment.parse::<usize>().ok()?),
                _ => None,
            })?;
        match (parent, missing.is_some()) {
            (toml::Value::Table(table), true) => {
                table.insert(last.clone(), toml::Value::String(String::new()));
            }
            (toml::Value::Table(table), false) => {
                table.remove(last);
            }
            (toml::Value::Array(array), _) => match last.parse::<usize>() {
                Ok(index) if index < array.len() => {
                    array.remove(index);
                }
                _ => return None,
            },
            _ => return None,
        }
    }
    None
}

/// A secret value: read from config like a string, never shown by `Debug` or `Serialize`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}
