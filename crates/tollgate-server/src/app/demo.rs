//! `tollgate demo`: the whole product on one machine with nothing installed.
//!
//! Starts the mock upstream on its own loopback port, routes `/v1` (OpenAI), `/anthropic`
//! (Anthropic), `/echo` and `/inspect` (sold by plan: every account is on the `free` plan, a few
//! inspections a month) to it, starts a fake Stripe (on loopback too, signing its webhooks
//! to this gateway) so credits can be bought and refunded in the console, opens SQLite in the
//! data dir, and on first start creates an account with starter credits, a master key and an
//! admin token. They are kept in
//! `<data dir>/demo.json` (mode 0600) so a restart reuses them. Only the demo keeps a key's
//! plaintext anywhere: a demo must be able to print its key again.

use crate::app::Application;
use crate::config::plans::{RawAllowance, RawPackOffer, RawPlan, RawUnits};
use crate::config::{
    Config, RawAdmin, RawBilling, RawConfig, RawModel, RawRoute, RawServer, RawStore, RawStripe,
    RawWebhooks, RouteKind, Secret,
};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tollgate_core::key::random_base62;
use tollgate_core::{AccountId, ApiKey, KeyKind, KeyStatus};
use tollgate_mock::receiver::WebhookReceiver;
use tollgate_mock::stripe::{FakeStripe, FakeStripeConfig};
use tollgate_mock::MockUpstream;
use tollgate_store::{KeyRecord, NewKey};
use tollgate_wire::ErrorProfile;

pub const STARTER_CREDITS: &str = "10";
/// What one echo call costs in the demo.
pub const ECHO_PRICE: &str = "0.001";
/// What an inspection costs past a plan's included ones (the `pro` plan's overage).
pub const INSPECTION_PRICE: &str = "0.05";
/// Inspections the `free` plan, every demo account's, includes each month.
pub const FREE_INSPECTIONS: i64 = 5;
const STATE_FILE: &str = "demo.json";

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// A TOML file layered over the demo's config: each field it sets replaces the demo's, a
    /// list (`[[rate_limits]]`, `[[routes]]`) as a whole.
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DemoState {
    account_id: AccountId,
    master_key: String,
    admin_token: String,
}

/// The fake Stripe's secret API key; its webhook secret is made fresh at each start.
const DEMO_STRIPE_KEY: &str = "sk_test_tollgate_demo";

/// A demo started by [`Demo::spawn`]; it stops when this is dropped.
pub struct RunningDemo {
    /// The gateway: `http://127.0.0.1:<port>`.
    pub url: String,
    /// The fake Stripe on loopback.
    pub stripe_url: String,
    /// The webhook receiver on loopback (what it got is at `/received`).
    pub webhooks_url: String,
    pub admin_token: String,
    /// The demo account's master key.
    pub master_key: String,
    pub account_id: AccountId,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub struct Demo {
    app: Application,
    mock: MockUpstream,
    stripe: FakeStripe,
    /// Where the tour's webhook endpoint points.
    receiver: WebhookReceiver,
    state: DemoState,
    data_dir: PathBuf,
    reused: bool,
}

impl Demo {
    pub async fn start(options: DemoOptions) -> anyhow::Result<Demo> {
        std::fs::create_dir_all(&options.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", options.data_dir.display()))?;
        let mock = MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        // Before the gateway's port is chosen, so this bind cannot take it in between.
        let receiver = WebhookReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        // The payment page sends the customer back to the console, so the gateway's address
        // is settled before the config is written (port 0 is resolved here).
        let listen = std::net::TcpListener::bind(options.listen)
            .and_then(|l| l.local_addr())
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.listen))?;
        let webhook_secret = format!("whsec_demo_{}", random_base62(24));
        let stripe = FakeStripe::start(FakeStripeConfig {
            secret_key: DEMO_STRIPE_KEY.into(),
            webhook_secret: webhook_secret.clone(),
            webhook_url: Some(format!("http://{listen}/webhooks/stripe")),
        })
        .await?;
        let options = DemoOptions {
            listen,
            data_dir: options.data_dir,
            config: options.config,
        };
        let saved = read_state(&options.data_dir)?;
        let admin_token = saved
            .as_ref()
            .map(|s| s.admin_token.clone())
            .unwrap_or_else(|| format!("tga_{}", random_base62(32)));
        let mut raw = demo_config(&options, &mock, &admin_token);
        raw.payments.stripe = Some(RawStripe {
            secret_key: Some(Secret(DEMO_STRIPE_KEY.into())),
            webhook_secrets: vec![Secret(webhook_secret)],
            api_base: stripe.url(),
            success_url: format!("http://{listen}/console/wallet?topup={{TOPUP_ID}}"),
            cancel_url: format!("http://{listen}/console/wallet"),
            ..RawStripe::default()
        });
        let config = match &options.config {
            None => Config::from_raw(raw),
            Some(path) => layered(raw, path, &admin_token)?,
        }
        .map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
        let starter_credits = config.starter_credits;
        let app = Application::build(config).await?;
        let store = app.state().store.clone();

        // Reuse the saved account if its master key still works; otherwise make a new one.
        let mut reusable = None;
        if let Some(saved) = saved {
            if let Ok(key) = ApiKey::parse(&saved.master_key) {
                let found = store.key_by_hash(&key.hash()).await?;
                if found.is_some_and(|f| {
                    f.secret_expires_at.is_none()
                        && f.key.status == KeyStatus::Active
                        && f.key.account_id == saved.account_id
                }) {
                    reusable = Some(saved);
                }
            }
        }
        let reused = reusable.is_some();
        let state = match reusable {
            Some(state) => state,
            None => {
                let account_id = AccountId::new();
                let master = NewKey::new(account_id, KeyKind::Master, "demo master key");
                let now = app.state().clock.now();
                let (secret, record) = KeyRecord::issue(app.state().config.key_env, master, now);
                store
                    .create_account(account_id, "Demo account", starter_credits, record, now)
                    .await?;
                let state = DemoState {
                    account_id,
                    master_key: secret.expose().to_string(),
                    admin_token,
                };
                write_state(&options.data_dir, &state)?;
                state
            }
        };
        Ok(Demo {
            app,
            mock,
            stripe,
            receiver,
            state,
            data_dir: options.data_dir,
            reused,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.app.local_addr()
    }

    /// The welcome text: where things are, curl calls that work as printed, and the
    /// `NAME=value` lines scripts read (the admin token last).
    pub fn welcome(&self) -> String {
        let url = format!("http://{}", self.local_addr());
        let key = &self.state.master_key;
        let admin = &self.state.admin_token;
        let api = &self.app.state().config.api_prefix;
        let account = if self.reused {
            "reused from the last run"
        } else {
            "new"
        };
        format!(
            r#"Tollgate demo is running.

  Gateway        {url}
  Mock upstream  {mock} (OpenAI API at {url}/v1, Anthropic API at {url}/anthropic, echo API at {url}/echo and {url}/inspect)
  Plans          free: {FREE_INSPECTIONS} calls to {url}/inspect a month included, then 402 allowance_exhausted; pro: 1000, then {INSPECTION_PRICE} USD each
  Fake Stripe    {stripe}/dashboard (card payments: add credits on the console's Wallet page, refund them here)
  Webhooks       {hooks}/received (a receiver for your webhook endpoints: everything POSTed to {hooks}/... shows there)
  Console        {url}/console/ (sign in with the demo key below)
  API reference  {url}/api/docs (Swagger UI; the OpenAPI document is {url}/api/openapi.json)
  Data           {data} (SQLite: tollgate.db; demo secrets: {STATE_FILE})
  Account        {account_id} ({account}; {STARTER_CREDITS} USD starter credits on creation)

Try it (copy and paste):

  # An echo call through the gateway
  curl -s {url}/echo/hello -H "Authorization: Bearer {key}"

  # An OpenAI-compatible chat completion (any OpenAI client works with base URL {url}/v1)
  curl -s {url}/v1/chat/completions -H "Authorization: Bearer {key}" -H "Content-Type: application/json" -d '{{"model":"mock-gpt","messages":[{{"role":"user","content":"Hello!"}}]}}'

  # The same, streamed as server-sent events, one chunk every 200 ms
  curl -sN {url}/v1/chat/completions -H "Authorization: Bearer {key}" -H "x-mock-chunk-delay-ms: 200" -H "Content-Type: application/json" -d '{{"model":"mock-gpt","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"Hello!"}}]}}'

  # An Anthropic-compatible message
  curl -s {url}/anthropic/v1/messages -H "x-api-key: {key}" -H "Content-Type: application/json" -d '{{"model":"mock-claude","max_tokens":64,"messages":[{{"role":"user","content":"Hello!"}}]}}'

  # The free plan: {FREE_INSPECTIONS} inspections a month, shown in the RateLimit header; the 6th is 402 allowance_exhausted
  curl -s -i {url}/inspect/doc -H "Authorization: Bearer {key}"
  curl -s {url}{api}/billing/allowances -H "Authorization: Bearer {key}"

  # The wallet: each echo call costs {ECHO_PRICE} USD; LLM calls are priced per token
  curl -s {url}{api}/billing/balance -H "Authorization: Bearer {key}"

  # Buy 25 credits by card: answers a checkout_url (the fake Stripe's page; pay there)
  curl -s {url}{api}/topups -H "Authorization: Bearer {key}" -H "Content-Type: application/json" -d '{{"amount":"25"}}'

  # Be told when the balance runs low: an endpoint at the demo's receiver, an alert above the balance, so the next paid call is under it
  curl -s {url}{api}/webhook-endpoints -H "Authorization: Bearer {key}" -H "Content-Type: application/json" -d '{{"url":"{hooks}/tollgate","events":["balance.low","balance.recovered"]}}'
  curl -s -X PUT {url}{api}/accounts/{account_id}/balance-alert -H "Authorization: Bearer {key}" -H "Content-Type: application/json" -d '{{"low_balance":"1000"}}'
  curl -s {url}/echo/hello -H "Authorization: Bearer {key}"
  curl -s {hooks}/received

  # Who am I? (verify a key)
  curl -s {url}{api}/key -H "Authorization: Bearer {key}"

  # A call without a key: 401 invalid_api_key in the error envelope
  curl -si {url}/echo/hello

  # Create a usage key limited to the echo route group
  curl -s {url}{api}/keys -H "Authorization: Bearer {key}" -H "Content-Type: application/json" -d '{{"name":"echo only","scopes":["echo"]}}'

For scripts:
TOLLGATE_URL={url}
TOLLGATE_DEMO_KEY={key}
TOLLGATE_DEMO_STRIPE={stripe}
TOLLGATE_DEMO_WEBHOOKS={hooks}
TOLLGATE_DEMO_ACCOUNT={account_id}
TOLLGATE_ADMIN_TOKEN={admin}
"#,
            mock = self.mock.url(),
            stripe = self.stripe.url(),
            hooks = format!("http://{}", self.receiver.addr),
            data = self.data_dir.display(),
            account_id = self.state.account_id,
        )
    }

    /// Starts a demo on a free loopback port over `data_dir` and runs it on the current tokio
    /// runtime until the handle is dropped: the whole product in-process, for the client's
    /// examples and tests.
    pub async fn spawn(data_dir: &Path) -> anyhow::Result<RunningDemo> {
        let demo = Demo::start(DemoOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_path_buf(),
            config: None,
        })
        .await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = RunningDemo {
            url: format!("http://{}", demo.local_addr()),
            stripe_url: demo.stripe.url(),
            webhooks_url: format!("http://{}", demo.receiver.addr),
            admin_token: demo.state.admin_token.clone(),
            master_key: demo.state.master_key.clone(),
            account_id: demo.state.account_id,
            _stop: stop,
        };
        tokio::spawn(demo.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Ok(running)
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Demo {
            app,
            mock,
            stripe,
            receiver,
            ..
        } = self;
        let result = app.run_until_stopped(shutdown).await;
        drop(mock);
        drop(stripe);
        drop(receiver);
        result
    }
}

fn demo_config(options: &DemoOptions, mock: &MockUpstream, admin_token: &str) -> RawConfig {
    let route = |prefix: &str, upstream_path: &str, group: &str, profile: ErrorProfile| RawRoute {
        prefix: prefix.into(),
        upstream: format!("{}{upstream_path}", mock.url()),
        group: group.into(),
        error_profile: profile,
        connect_timeout: "2s".into(),
        ..RawRoute::default()
    };
    // LLM prices per million tokens, in the range of small hosted models.
    let model = |input: &str, output: &str| RawModel {
        input: input.into(),
        output: output.into(),
        cached_input: None,
    };
    let mut routes = vec![
        RawRoute {
            kind: RouteKind::Openai,
            models: [("mock-gpt".to_string(), model("0.5", "1.5"))].into(),
            ..route("/v1", "/v1", "openai", ErrorProfile::Openai)
        },
        RawRoute {
            kind: RouteKind::Anthropic,
            models: [("mock-claude".to_string(), model("0.8", "4"))].into(),
            ..route("/anthropic", "", "anthropic", ErrorProfile::Anthropic)
        },
        RawRoute {
            price: ECHO_PRICE.into(),
            ..route("/echo", "/echo", "echo", ErrorProfile::Native)
        },
        // A paid API sold by plan: the free plan includes a few inspections a month.
        RawRoute {
            price: INSPECTION_PRICE.into(),
            ..route("/inspect", "/echo", "inspect", ErrorProfile::Native)
        },
    ];
    let inspections = |plan: &str, units: i64, overage: &str| RawPlan {
        name: plan.into(),
        allowances: vec![RawAllowance {
            name: "inspections".into(),
            meter: "requests".into(),
            routes: Some("inspect".into()),
            units: RawUnits::Count(units),
            overage: overage.into(),
            rollover: None,
            windows: Vec::new(),
        }],
        ..RawPlan::default()
    };
    for (i, route) in routes.iter_mut().enumerate() {
        route.position = i;
    }
    RawConfig {
        server: RawServer {
            listen: options.listen.to_string(),
            ..RawServer::default()
        },
        store: RawStore {
            url: format!(
                "sqlite://{}",
                options.data_dir.join("tollgate.db").display()
            ),
        },
        admin: RawAdmin {
            token: Some(crate::config::Secret(admin_token.to_string())),
        },
        billing: RawBilling {
            starter_credits: STARTER_CREDITS.into(),
            default_plan: Some("free".into()),
            ..RawBilling::default()
        },
        keys: Default::default(),
        load_shedding: Default::default(),
        idempotency: Default::default(),
        console: Default::default(),
        redis: Default::default(),
        payments: Default::default(),
        export: Default::default(),
        // The tour's webhook receiver is the mock upstream, on this machine: the demo lets
        // endpoints be plain http on loopback, which a deployment refuses by default.
        webhooks: RawWebhooks {
            allow_http: true,
            allow_private: vec!["127.0.0.0/8".into()],
            ..RawWebhooks::default()
        },
        rate_limits: None,
        routes,
        plans: vec![
            inspections("free", FREE_INSPECTIONS, "block"),
            inspections("pro", 1_000, "wallet"),
        ],
        // Past the free tier, a customer buys more inspections from its wallet (or by card).
        packs: vec![RawPackOffer {
            name: "inspections-10".into(),
            meter: "requests".into(),
            routes: Some("inspect".into()),
            units: RawUnits::Count(10),
            price: "0.40".into(),
            valid_for: "90d".into(),
        }],
    }
}

/// The demo's config with the file at `path` laid over it, table by table.
fn layered(
    raw: RawConfig,
    path: &Path,
    admin_token: &str,
) -> anyhow::Result<Result<Config, crate::config::ConfigErrors>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let over: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // Secrets serialise redacted: the demo's own go back in, where the file sets none.
    let stripe = raw.payments.stripe.as_ref();
    let own_secret = |field: &str| {
        let set_by_file = over
            .get("payments")
            .and_then(|p| p.get("stripe"))
            .is_some_and(|s| s.get(field).is_some());
        (!set_by_file).then_some(())
    };
    let mut env = vec![("TOLLGATE_ADMIN_TOKEN", admin_token.to_string())];
    if let Some(stripe) = stripe {
        if let (Some(key), Some(())) = (&stripe.secret_key, own_secret("secret_key")) {
            env.push(("TOLLGATE_STRIPE_SECRET_KEY", key.0.clone()));
        }
        if own_secret("webhook_secrets").is_some() {
            let secrets: Vec<&str> = stripe
                .webhook_secrets
                .iter()
                .map(|s| s.0.as_str())
                .collect();
            env.push(("TOLLGATE_STRIPE_WEBHOOK_SECRETS", secrets.join(",")));
        }
    }
    let mut base = toml::Table::try_from(&raw)?;
    merge(&mut base, over);
    let text = toml::to_string(&base)?;
    Ok(Config::load(&text, env))
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (name, value) in over {
        match (base.get_mut(&name), value) {
            (Some(toml::Value::Table(base)), toml::Value::Table(over)) => merge(base, over),
            (_, value) => {
                base.insert(name, value);
            }
        }
    }
}

fn read_state(dir: &Path) -> anyhow::Result<Option<DemoState>> {
    let path = dir.join(STATE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(serde_json::from_str(&text).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

fn write_state(dir: &Path, state: &DemoState) -> anyhow::Result<()> {
    use std::io::Write;
    let path = dir.join(STATE_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    file.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
    Ok(())
}
