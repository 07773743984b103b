//! Operator commands against a running server, through its management API: the same calls a
//! script would make, with errors shown as the server explained them (code, message, request ID).

use clap::Args;
use serde::de::DeserializeOwned;
use std::process::ExitCode;
use tollgate_wire::api::AuditVerification;

/// Where the server is and how to authenticate as its operator.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The server's base URL.
    #[arg(long, env = "TOLLGATE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The admin token.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long)]
    json: bool,
}

impl Remote {
    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<(T, String)> {
        let url = format!("{}/api/v1{path}", self.url.trim_end_matches('/'));
        let response = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&self.admin_token)
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
        let body = response.text().await?;
        if !status.is_success() {
            let envelope: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let error = &envelope["error"];
            anyhow::bail!(
                "{} {}: {} (request {request_id})",
                status.as_u16(),
                error["code"].as_str().unwrap_or("error"),
                error["message"].as_str().unwrap_or(body.trim()),
            );
        }
        let parsed = serde_json::from_str(&body)
            .map_err(|e| anyhow::anyhow!("unexpected answer from {url}: {e}"))?;
        Ok((parsed, body))
    }
}

/// `tollgate audit verify`: exit 0 when every link holds, 1 naming the first broken entry.
pub async fn audit_verify(remote: &Remote) -> anyhow::Result<ExitCode> {
    let (result, raw): (AuditVerification, String) = remote.get("/audit/verify").await?;
    if remote.json {
        println!("{raw}");
    } else if result.valid {
        println!(
            "audit log intact: {} entries, head {}",
            result.entries,
            result.head_hash.as_deref().unwrap_or("(empty)")
        );
    } else {
        println!(
            "audit log BROKEN at entry {}: {}",
            result.broken_at.unwrap_or_default(),
            result.reason.as_deref().unwrap_or("unknown"),
        );
    }
    Ok(if result.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
