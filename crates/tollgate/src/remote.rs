//! Operator commands against a running server, through its management API: the same calls a
//! script would make, with errors shown as the server explained them (code, message, request ID).
//! Human tables by default, the server's JSON with `--json`.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use std::process::ExitCode;

/// Where the server is and how to authenticate as its operator.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The server's base URL.
    #[arg(long, env = "TOLLGATE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The admin token.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Print the server's JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

impl Remote {
    /// Calls the management API; the JSON answer, or an error carrying the server's explanation.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.url.trim_end_matches('/'));
        let mut request = reqwest::Client::new()
            .request(method, &url)
            .bearer_auth(&self.admin_token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        let text = response.text().await?;
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        if !status.is_success() {
            let error = &answer["error"];
            anyhow::bail!(
                "{} {}: {} (request {request_id})",
                status.as_u16(),
                error["code"].as_str().unwrap_or("error"),
                error["message"].as_str().unwrap_or(text.trim()),
            );
        }
        Ok(answer)
    }

    /// Every row of a paged listing (`path` carries its query string), following the cursors.
    async fn all_pages(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_path = match &cursor {
                Some(cursor) => format!("{path}&cursor={cursor}"),
                None => path.to_string(),
            };
            let page = self.call(Method::GET, &page_path, None).await?;
            rows.extend(page["data"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return Ok(rows),
            }
        }
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
    /// List accounts.
    List {
        /// Only `active` or `suspended` accounts.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one account.
    Show {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key for an account (its secret is shown once).
    Create {
        #[arg(long)]
        account: String,
        #[arg(long)]
        name: String,
        /// A scope (`*`, a route group, or `group:model`); repeat for several. Default `*`.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// `usage` (default) or `master`.
        #[arg(long, default_value = "usage")]
        kind: String,
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
    /// Revoke a key now.
    Revoke {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
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
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every link of the hash chain; exits 1 naming the first broken entry.
    Verify {
        #[command(flatten)]
        remote: Remote,
    },
}

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
            let mut body = json!({ "name": name });
            if let Some(credits) = starter_credits {
                body["starter_credits"] = json!(credits);
            }
            let answer = remote.call(Method::POST, "/accounts", Some(body)).await?;
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
            let filter = status.map(|s| format!("&status={s}"));
            let rows = remote
                .all_pages(&format!(
                    "/accounts?limit=500{}",
                    filter.unwrap_or_default()
                ))
                .await?;
            remote.show(&json!({ "data": rows }), &rows, ACCOUNT_COLUMNS);
        }
        AccountsCommand::Show { id, remote } => {
            let answer = remote
                .call(Method::GET, &format!("/accounts/{id}"), None)
                .await?;
            remote.show(&answer, std::slice::from_ref(&answer), ACCOUNT_COLUMNS);
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
            remote,
        } => {
            let mut body = json!({ "account_id": account, "name": name, "kind": kind });
            if !scopes.is_empty() {
                body["scopes"] = json!(scopes);
            }
            let answer = remote.call(Method::POST, "/keys", Some(body)).await?;
            show_secret(&remote, &answer, &answer);
        }
        KeysCommand::List { account, remote } => {
            let filter = account.map(|a| format!("&account_id={a}"));
            let rows = remote
                .all_pages(&format!("/keys?limit=500{}", filter.unwrap_or_default()))
                .await?;
            remote.show(&json!({ "data": rows }), &rows, KEY_COLUMNS);
        }
        KeysCommand::Revoke { id, remote } => {
            let answer = remote
                .call(Method::POST, &format!("/keys/{id}/revoke"), None)
                .await?;
            remote.show(&answer, std::slice::from_ref(&answer), KEY_COLUMNS);
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
        remote,
    } = command;
    let body = json!({ "amount": amount, "reason": reason });
    let answer = remote
        .call(
            Method::POST,
            &format!("/accounts/{account}/credits"),
            Some(body),
        )
        .await?;
    remote.show(
        &answer,
        std::slice::from_ref(&answer),
        &[
            ("ACCOUNT", "/account_id"),
            ("AVAILABLE", "/available/credits"),
            ("HELD", "/held/credits"),
            ("CURRENCY", "/available/currency"),
        ],
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn requests(command: RequestsCommand) -> anyhow::Result<ExitCode> {
    let RequestsCommand::Show { request_id, remote } = command;
    let answer = remote
        .call(Method::GET, &format!("/requests/{request_id}"), None)
        .await?;
    remote.show(
        &answer,
        std::slice::from_ref(&answer),
        &[
            ("REQUEST", "/request_id"),
            ("KEY", "/key_id"),
            ("ROUTE", "/route"),
            ("MODEL", "/model"),
            ("STATUS", "/status"),
            ("COST", "/cost/credits"),
            ("BILLING", "/billing_status"),
            ("LATENCY MS", "/latency_ms"),
            ("AT", "/created_at"),
        ],
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { remote } = command;
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
