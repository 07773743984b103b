//! Commands against a running server, through its management API: the same calls a script
//! would make, as the operator (admin token) or as a customer (a master key), with errors shown
//! as the server explained them (code, message, request ID). Human tables by default, the
//! server's JSON with `--json`. Every management endpoint has its command. The calls go through
//! `tollgate-client`, so they are retried as safely as any client's (one `Idempotency-Key` per
//! command).

use clap::{Args, Subcommand};
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use std::process::ExitCode;
use tollgate_client::http::Method;

/// Where the server is and whose credential to call it with.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The server's base URL.
    #[arg(long, env = "TOLLGATE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The admin token: act as the operator.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// An API key (a master key manages its own account): act as that customer. Used in place of
    /// the admin token when both are given.
    #[arg(long, env = "TOLLGATE_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Print the server's JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

impl Remote {
    fn credential(&self) -> anyhow::Result<&str> {
        self.key
            .as_deref()
            .or(self.admin_token.as_deref())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no credential: give --key (or TOLLGATE_KEY) with a master key, or \
                     --admin-token (or TOLLGATE_ADMIN_TOKEN)"
                )
            })
    }

    fn client(&self) -> anyhow::Result<tollgate_client::Client> {
        Ok(tollgate_client::Client::builder(&self.url)
            .credential(self.credential()?)
            .page_size(500)
            .build()?)
    }

    /// Calls the management API; the JSON answer, or an error carrying the server's explanation
    /// (its `Display` ends with the request ID).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let answer = self
            .client()?
            .call_json(method, path, body.as_ref())
            .await
            .map_err(|e| match e.status() {
                Some(_) => anyhow::anyhow!("{e}"),
                None => anyhow::anyhow!("cannot reach {}: {e}", self.url),
            })?;
        Ok(answer.into_inner())
    }

    /// Every row of a paged listing (`path` carries its filters), following the cursors.
    async fn all_pages(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self.client()?.list_json(path).try_collect().await?)
    }

    /// Makes a call whose answer is one object, and prints it.
    async fn call_and_show(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        columns: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let answer = self.call(method, path, body).await?;
        self.show(&answer, std::slice::from_ref(&answer), columns);
        Ok(())
    }

    /// Prints `answer` as JSON, or as a table of `columns` (JSON pointers) over its rows.
    fn show(&self, answer: &Value, rows: &[Value], columns: &[(&str, &str)]) {
        if self.json {
            println!("{answer}");
        } else {
            print!("{}", table(rows, columns));
        }
    }
}

/// Aligned columns under a header; a cell is the value at a JSON pointer, `-` if absent.
fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let cell = |row: &Value, pointer: &str| match row.pointer(pointer) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|(_, p)| cell(row, p)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (header, _))| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        let padded: Vec<String> = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(columns.iter().map(|(h, _)| *h).collect());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

const ACCOUNT_COLUMNS: &[(&str, &str)] = &[
    ("ID", "/id"),
    ("NAME", "/name"),
    ("STATUS", "/status"),
    ("BALANCE", "/balance/credits"),
    ("CURRENCY", "/balance/currency"),
    ("MAX KEYS", "/max_keys"),
    ("CREATED", "/created_at"),
];

const KEY_COLUMNS: &[(&str, &str)] = &[
    ("ID", "/id"),
    ("ACCOUNT", "/account_id"),
    ("NAME", "/name"),
    ("KIND", "/kind"),
    ("STATUS", "/status"),
    ("PREFIX", "/prefix"),
    ("SCOPES", "/scopes"),
    ("EXPIRES", "/expires_at"),
];

/// A query string (`?a=1&b=x`) of the parameters that are set, percent-encoded; `?` alone if
/// none.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let set = pairs
        .iter()
        .filter_map(|(name, value)| Some((*name, value.as_deref()?)));
    let encoded = serde_urlencoded::to_string(set.collect::<Vec<_>>()).unwrap_or_default();
    format!("?{encoded}")
}

/// A request body of the fields the command line gave: absent options are left out (the server
/// keeps what it has), a `--no-...` flag sends `null` (the server clears the field).
#[derive(Default)]
struct Fields(serde_json::Map<String, Value>);

impl Fields {
    fn set(mut self, name: &str, value: Option<impl Into<Value>>) -> Self {
        if let Some(value) = value {
            self.0.insert(name.to_string(), value.into());
        }
        self
    }

    /// A list, sent only if it has items.
    fn list(self, name: &str, items: Vec<String>) -> Self {
        let items = (!items.is_empty()).then_some(items);
        self.set(name, items)
    }

    fn clear_if(self, name: &str, clear: bool) -> Self {
        self.set(name, clear.then_some(Value::Null))
    }

    /// A JSON value given as text (`--metadata '{"job": 1}'`).
    fn json(self, name: &str, text: Option<String>) -> anyhow::Result<Self> {
        let value = text
            .map(|text| {
                serde_json::from_str::<Value>(&text)
                    .map_err(|e| anyhow::anyhow!("--{} is not JSON: {e}", name.replace('_', "-")))
            })
            .transpose()?;
        Ok(self.set(name, value))
    }

    fn body(self) -> Option<Value> {
        Some(Value::Object(self.0))
    }
}

/// A command on one object, named by its id.
#[derive(Debug, Args)]
pub struct ById {
    id: String,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account, its wallet and its first master key (whose secret is shown once).
    Create {
        #[arg(long)]
        name: String,
        /// Credits to start with (default: the server's `billing.starter_credits`).
        #[arg(long)]
        starter_credits: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List accounts (a master key: its own).
    List {
        /// Only `active` or `suspended` accounts.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one account.
    Show(ById),
    /// Change an account's name, key limit or rate-limit overrides.
    Edit {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Its own key limit, in place of the server's `keys.max_per_account`.
        #[arg(long, conflicts_with = "default_max_keys")]
        max_keys: Option<u32>,
        /// Back to the server's key limit.
        #[arg(long)]
        default_max_keys: bool,
        /// Rate-limit overrides by policy name, as JSON (`{"per-key": {"limit": 100}}`; `null`
        /// clears them).
        #[arg(long)]
        rate_limits: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Suspend an account: its keys stop working from their next request.
    Suspend(ById),
    /// Lift a suspension.
    Reactivate(ById),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key (its secret is shown once).
    Create {
        /// The account (the admin must name it; a master key creates keys for its own).
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        name: String,
        /// A scope (`*`, a route group, or `group:model`); repeat for several. Default `*`.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// `usage` (default) or `master` (admin only).
        #[arg(long, default_value = "usage")]
        kind: String,
        /// A CIDR it may be used from; repeat for several. Default: anywhere.
        #[arg(long = "allowed-ip")]
        allowed_ips: Vec<String>,
        /// When it stops working (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
        /// Credits it may spend per calendar month (UTC).
        #[arg(long)]
        monthly_spend_cap: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List keys, of one account or all.
    List {
        #[arg(long)]
        account: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one key (`me`: the key calling).
    Show(ById),
    /// Change a key's policy, effective from its next request; what is not given is unchanged.
    Edit {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Its scopes, replacing them all; repeat for several.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Its allowlist, replacing it; repeat for several.
        #[arg(long = "allowed-ip", conflicts_with = "anywhere")]
        allowed_ips: Vec<String>,
        /// Clear the allowlist: usable from anywhere.
        #[arg(long)]
        anywhere: bool,
        /// A new expiry (RFC 3339).
        #[arg(long, conflicts_with = "no_expiry")]
        expires_at: Option<String>,
        /// Never expires.
        #[arg(long)]
        no_expiry: bool,
        /// `active` or `inactive`.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, conflicts_with = "no_spend_cap")]
        monthly_spend_cap: Option<String>,
        /// No monthly spend cap.
        #[arg(long)]
        no_spend_cap: bool,
        /// Rate-limit overrides by policy name, as JSON (admin only; `null` clears them).
        #[arg(long)]
        rate_limits: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke a key now.
    Revoke(ById),
    /// Give a key a new secret; the old one works for `--grace-seconds` more.
    Roll {
        id: String,
        #[arg(long, default_value_t = 0)]
        grace_seconds: u64,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Grant credits to an account.
    Grant {
        account: String,
        /// A decimal amount, e.g. 25 or 2.5.
        amount: String,
        #[arg(long)]
        reason: String,
        /// Applies the grant at most once per account (an invoice number, say).
        #[arg(long)]
        reference: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum PaymentsCommand {
    /// Read Stripe's event list from `--since` and handle every event not handled yet: a
    /// payment whose webhook never arrived is credited, once.
    Reconcile {
        /// An RFC 3339 time, e.g. 2026-12-01T00:00:00Z (Stripe keeps 30 days of events).
        #[arg(long)]
        since: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum RequestsCommand {
    /// Show one request from the usage log, by the X-Request-Id its response carried.
    Show {
        request_id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List requests, newest first.
    List {
        /// Admin: one account's (every account's if omitted).
        #[arg(long)]
        account: Option<String>,
        /// One key's requests.
        #[arg(long)]
        key_id: Option<String>,
        /// A route's prefix, e.g. /v1.
        #[arg(long)]
        route: Option<String>,
        #[arg(long)]
        status: Option<u16>,
        /// From this instant (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Before this instant (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum HoldsCommand {
    /// Reserve credit for your own work (the billing API).
    Create {
        /// The most the work may cost, in credits.
        amount: String,
        /// Admin: the account to hold credit from.
        #[arg(long)]
        account: Option<String>,
        /// Seconds until an unresolved hold is released (default 3600).
        #[arg(long)]
        ttl_seconds: Option<u64>,
        /// A JSON object kept with the hold.
        #[arg(long)]
        metadata: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a hold.
    Show(ById),
    /// Charge what the work cost, at most the amount held.
    Settle {
        id: String,
        amount: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Charge nothing.
    Release(ById),
}

/// One account's money and usage: the balance, the ledger, the usage totals.
#[derive(Debug, Args)]
pub struct AccountQuery {
    /// The account (required of the admin; a master key's own otherwise).
    #[arg(long)]
    account: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// `day` (default, UTC), `key`, `route` or `model`.
    #[arg(long)]
    group_by: Option<String>,
    /// From this instant (RFC 3339).
    #[arg(long)]
    from: Option<String>,
    /// Before this instant (RFC 3339).
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    account: AccountQuery,
}

#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// How many transfers, newest first.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[command(flatten)]
    account: AccountQuery,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List the audit log, oldest first.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Check every link of the hash chain; exits 1 naming the first broken entry.
    Verify {
        #[command(flatten)]
        remote: Remote,
    },
}

const REQUEST_COLUMNS: &[(&str, &str)] = &[
    ("REQUEST", "/request_id"),
    ("KEY", "/key_id"),
    ("ROUTE", "/route"),
    ("MODEL", "/model"),
    ("STATUS", "/status"),
    ("ERROR", "/error_code"),
    ("COST", "/cost/credits"),
    ("BILLING", "/billing_status"),
    ("REPLAY OF", "/replay_of"),
    ("AT", "/created_at"),
];

const HOLD_COLUMNS: &[(&str, &str)] = &[
    ("ID", "/id"),
    ("ACCOUNT", "/account_id"),
    ("AMOUNT", "/amount/credits"),
    ("CHARGED", "/charged/credits"),
    ("STATUS", "/status"),
    ("EXPIRES", "/expires_at"),
];

const BALANCE_COLUMNS: &[(&str, &str)] = &[
    ("ACCOUNT", "/account_id"),
    ("AVAILABLE", "/available/credits"),
    ("HELD", "/held/credits"),
    ("DEBT", "/debt/credits"),
    ("CURRENCY", "/available/currency"),
];

const RECONCILE_COLUMNS: &[(&str, &str)] = &[("EVENTS", "/events"), ("HANDLED", "/handled")];

/// Prints a created or rolled key, its secret on a line of its own.
fn show_secret(remote: &Remote, answer: &Value, key: &Value) {
    remote.show(answer, std::slice::from_ref(key), KEY_COLUMNS);
    if !remote.json {
        println!(
            "\nsecret (shown once, store it now): {}",
            answer["secret"].as_str().unwrap_or("-")
        );
    }
}

pub async fn accounts(command: AccountsCommand) -> anyhow::Result<ExitCode> {
    match command {
        AccountsCommand::Create {
            name,
            starter_credits,
            remote,
        } => {
            let body = Fields::default()
                .set("name", Some(name))
                .set("starter_credits", starter_credits)
                .body();
            let answer = remote.call(Method::POST, "/accounts", body).await?;
            remote.show(
                &answer,
                std::slice::from_ref(&answer["account"]),
                ACCOUNT_COLUMNS,
            );
            if !remote.json {
                println!(
                    "\nmaster key {} (shown once, store it now): {}",
                    answer["master_key"]["id"].as_str().unwrap_or("-"),
                    answer["master_key"]["secret"].as_str().unwrap_or("-")
                );
            }
        }
        AccountsCommand::List { status, remote } => {
            let path = format!("/accounts{}", query(&[("status", status)]));
            let rows = remote.all_pages(&path).await?;
            remote.show(&json!({ "data": rows }), &rows, ACCOUNT_COLUMNS);
        }
        AccountsCommand::Show(ById { id, remote }) => {
            let path = format!("/accounts/{id}");
            remote
                .call_and_show(Method::GET, &path, None, ACCOUNT_COLUMNS)
                .await?;
        }
        AccountsCommand::Edit {
            id,
            name,
            max_keys,
            default_max_keys,
            rate_limits,
            remote,
        } => {
            let body = Fields::default()
                .set("name", name)
                .set("max_keys", max_keys)
                .clear_if("max_keys", default_max_keys)
                .json("rate_limits", rate_limits)?
                .body();
            let path = format!("/accounts/{id}");
            remote
                .call_and_show(Method::PATCH, &path, body, ACCOUNT_COLUMNS)
                .await?;
        }
        AccountsCommand::Suspend(ById { id, remote }) => {
            let path = format!("/accounts/{id}/suspend");
            remote
                .call_and_show(Method::POST, &path, None, ACCOUNT_COLUMNS)
                .await?;
        }
        AccountsCommand::Reactivate(ById { id, remote }) => {
            let path = format!("/accounts/{id}/reactivate");
            remote
                .call_and_show(Method::POST, &path, None, ACCOUNT_COLUMNS)
                .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Create {
            account,
            name,
            scopes,
            kind,
            allowed_ips,
            expires_at,
            monthly_spend_cap,
            remote,
        } => {
            let body = Fields::default()
                .set("name", Some(name))
                .set("kind", Some(kind))
                .set("account_id", account)
                .list("scopes", scopes)
                .list("allowed_ips", allowed_ips)
                .set("expires_at", expires_at)
                .set("monthly_spend_cap", monthly_spend_cap)
                .body();
            let answer = remote.call(Method::POST, "/keys", body).await?;
            show_secret(&remote, &answer, &answer);
        }
        KeysCommand::List { account, remote } => {
            let path = format!("/keys{}", query(&[("account_id", account)]));
            let rows = remote.all_pages(&path).await?;
            remote.show(&json!({ "data": rows }), &rows, KEY_COLUMNS);
        }
        KeysCommand::Show(ById { id, remote }) => {
            let path = if id == "me" {
                "/key".to_string()
            } else {
                format!("/keys/{id}")
            };
            remote
                .call_and_show(Method::GET, &path, None, KEY_COLUMNS)
                .await?;
        }
        KeysCommand::Edit {
            id,
            name,
            scopes,
            allowed_ips,
            anywhere,
            expires_at,
            no_expiry,
            status,
            monthly_spend_cap,
            no_spend_cap,
            rate_limits,
            remote,
        } => {
            let body = Fields::default()
                .set("name", name)
                .list("scopes", scopes)
                .list("allowed_ips", allowed_ips)
                .clear_if("allowed_ips", anywhere)
                .set("expires_at", expires_at)
                .clear_if("expires_at", no_expiry)
                .set("status", status)
                .set("monthly_spend_cap", monthly_spend_cap)
                .clear_if("monthly_spend_cap", no_spend_cap)
                .json("rate_limits", rate_limits)?
                .body();
            remote
                .call_and_show(Method::PATCH, &format!("/keys/{id}"), body, KEY_COLUMNS)
                .await?;
        }
        KeysCommand::Revoke(ById { id, remote }) => {
            let path = format!("/keys/{id}/revoke");
            remote
                .call_and_show(Method::POST, &path, None, KEY_COLUMNS)
                .await?;
        }
        KeysCommand::Roll {
            id,
            grace_seconds,
            remote,
        } => {
            let body = json!({ "grace_period_seconds": grace_seconds });
            let answer = remote
                .call(Method::POST, &format!("/keys/{id}/roll"), Some(body))
                .await?;
            show_secret(&remote, &answer, &answer);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn credits(command: CreditsCommand) -> anyhow::Result<ExitCode> {
    let CreditsCommand::Grant {
        account,
        amount,
        reason,
        reference,
        remote,
    } = command;
    let body = Fields::default()
        .set("amount", Some(amount))
        .set("reason", Some(reason))
        .set("reference", reference)
        .body();
    let path = format!("/accounts/{account}/credits");
    remote
        .call_and_show(Method::POST, &path, body, BALANCE_COLUMNS)
        .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn payments(command: PaymentsCommand) -> anyhow::Result<ExitCode> {
    let PaymentsCommand::Reconcile { since, remote } = command;
    let body = Fields::default().set("since", Some(since)).body();
    remote
        .call_and_show(Method::POST, "/payments/reconcile", body, RECONCILE_COLUMNS)
        .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn requests(command: RequestsCommand) -> anyhow::Result<ExitCode> {
    match command {
        RequestsCommand::Show { request_id, remote } => {
            let answer = remote
                .call(Method::GET, &format!("/requests/{request_id}"), None)
                .await?;
            remote.show(&answer, std::slice::from_ref(&answer), REQUEST_COLUMNS);
            if !remote.json {
                if let Some(message) = answer["error_message"].as_str() {
                    println!("\nerror: {message}");
                }
            }
        }
        RequestsCommand::List {
            account,
            key_id,
            route,
            status,
            from,
            to,
            limit,
            remote,
        } => {
            let path = format!(
                "/requests{}",
                query(&[
                    ("account_id", account),
                    ("key_id", key_id),
                    ("route", route),
                    ("status", status.map(|s| s.to_string())),
                    ("from", from),
                    ("to", to),
                    ("limit", Some(limit.to_string())),
                ])
            );
            let answer = remote.call(Method::GET, &path, None).await?;
            let rows = answer["data"].as_array().cloned().unwrap_or_default();
            remote.show(&answer, &rows, REQUEST_COLUMNS);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn holds(command: HoldsCommand) -> anyhow::Result<ExitCode> {
    let (remote, method, path, body) = match command {
        HoldsCommand::Create {
            amount,
            account,
            ttl_seconds,
            metadata,
            remote,
        } => {
            let body = Fields::default()
                .set("amount", Some(amount))
                .set("account_id", account)
                .set("ttl_seconds", ttl_seconds)
                .json("metadata", metadata)?
                .body();
            (remote, Method::POST, "/holds".to_string(), body)
        }
        HoldsCommand::Show(ById { id, remote }) => {
            (remote, Method::GET, format!("/holds/{id}"), None)
        }
        HoldsCommand::Settle { id, amount, remote } => {
            let body = Fields::default().set("amount", Some(amount)).body();
            (remote, Method::POST, format!("/holds/{id}/settle"), body)
        }
        HoldsCommand::Release(ById { id, remote }) => {
            (remote, Method::POST, format!("/holds/{id}/release"), None)
        }
    };
    remote
        .call_and_show(method, &path, body, HOLD_COLUMNS)
        .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn balance(args: AccountQuery) -> anyhow::Result<ExitCode> {
    let path = format!(
        "/billing/balance{}",
        query(&[("account_id", args.account.clone())])
    );
    args.remote
        .call_and_show(
            Method::GET,
            &path,
            None,
            &[
                ("AVAILABLE", "/available/credits"),
                ("HELD", "/held/credits"),
                ("SPENT THIS MONTH", "/spent_this_month/credits"),
                ("CURRENCY", "/available/currency"),
            ],
        )
        .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn usage(args: UsageArgs) -> anyhow::Result<ExitCode> {
    let UsageArgs {
        group_by,
        from,
        to,
        account,
    } = args;
    let path = format!(
        "/usage{}",
        query(&[
            ("account_id", account.account),
            ("group_by", group_by),
            ("from", from),
            ("to", to),
        ])
    );
    let remote = account.remote;
    let answer = remote.call(Method::GET, &path, None).await?;
    let rows = answer["data"].as_array().cloned().unwrap_or_default();
    remote.show(
        &answer,
        &rows,
        &[
            ("GROUP", "/group"),
            ("REQUESTS", "/requests"),
            ("ERRORS", "/errors"),
            ("INPUT TOKENS", "/input_tokens"),
            ("OUTPUT TOKENS", "/output_tokens"),
            ("COST", "/cost/credits"),
        ],
    );
    if !remote.json {
        println!(
            "\nbilling API: {} holds, {}; total charged: {} {}",
            answer["billing_api"]["holds"],
            answer["billing_api"]["cost"]["credits"]
                .as_str()
                .unwrap_or("0"),
            answer["cost"]["credits"].as_str().unwrap_or("0"),
            answer["cost"]["currency"].as_str().unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn ledger(args: LedgerArgs) -> anyhow::Result<ExitCode> {
    let path = format!(
        "/ledger{}",
        query(&[
            ("account_id", args.account.account),
            ("limit", Some(args.limit.to_string())),
        ])
    );
    let remote = args.account.remote;
    let answer = remote.call(Method::GET, &path, None).await?;
    let rows = answer["data"].as_array().cloned().unwrap_or_default();
    remote.show(
        &answer,
        &rows,
        &[
            ("SEQ", "/seq"),
            ("KIND", "/kind"),
            ("FROM", "/from"),
            ("TO", "/to"),
            ("AMOUNT", "/amount/credits"),
            ("MEMO", "/memo"),
            ("AT", "/created_at"),
        ],
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    let remote = match command {
        AuditCommand::List { remote } => {
            let rows = remote.all_pages("/audit").await?;
            remote.show(
                &json!({ "data": rows }),
                &rows,
                &[
                    ("SEQ", "/seq"),
                    ("AT", "/at"),
                    ("ACTOR", "/actor"),
                    ("ACTION", "/action"),
                    ("TARGET", "/target"),
                    ("REQUEST", "/request_id"),
                ],
            );
            return Ok(ExitCode::SUCCESS);
        }
        AuditCommand::Verify { remote } => remote,
    };
    let answer = remote.call(Method::GET, "/audit/verify", None).await?;
    let valid = answer["valid"].as_bool().unwrap_or(false);
    if remote.json {
        println!("{answer}");
    } else if valid {
        println!(
            "audit log intact: {} entries, head {}",
            answer["entries"],
            answer["head_hash"].as_str().unwrap_or("(empty)")
        );
    } else {
        println!(
            "audit log BROKEN at entry {}: {}",
            answer["broken_at"],
            answer["reason"].as_str().unwrap_or("unknown"),
        );
    }
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_carry_what_is_set_encoded() {
        assert_eq!(query(&[("a", None)]), "?");
        assert_eq!(
            query(&[
                ("from", Some("2026-12-01T00:00:00+01:00".into())),
                ("key_id", None),
                ("route", Some("/v1".into())),
            ]),
            "?from=2026-12-01T00%3A00%3A00%2B01%3A00&route=%2Fv1"
        );
    }

    #[test]
    fn tables_align_columns_and_show_missing_cells_as_a_dash() {
        let rows = [
            json!({"id": "acct_1", "name": "Acme", "scopes": ["echo", "openai"]}),
            json!({"id": "acct_22", "name": null}),
        ];
        let text = table(
            &rows,
            &[("ID", "/id"), ("NAME", "/name"), ("SCOPES", "/scopes")],
        );
        assert_eq!(
            text,
            "ID       NAME  SCOPES\nacct_1   Acme  echo,openai\nacct_22  -     -\n"
        );
    }
}
