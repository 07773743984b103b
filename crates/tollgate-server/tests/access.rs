//! Access control end to end: scopes (route groups and models), IP allowlists behind trusted
//! proxies, expiry, status, spend caps and their changes through `PATCH /keys/{id}`, rolling
//! with a grace period, the per-account key limit, and tenant isolation across every management
//! endpoint that takes an id.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{expect_error, spawn_app, spawn_app_with, TestApp, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};
use tollgate_core::{AccountId, HoldId, KeyId, RequestId};
use tollgate_server::config::RawModel;

const CHAT: &str = "/v1/chat/completions";

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
}

fn now(app: &TestApp) -> chrono::DateTime<chrono::Utc> {
    use tollgate_core::Clock;
    app.clock.now()
}

async fn chat_as(app: &TestApp, key: &str, model: &str) -> reqwest::Response {
    app.post(CHAT)
        .bearer_auth(key)
        .json(&chat(model))
        .send()
        .await
        .unwrap()
}

/// The test app with a second model on the OpenAI route.
async fn spawn_with_two_models() -> TestApp {
    spawn_app_with(|raw, _| {
        raw.routes[0].models.insert(
            "mock-gpt-large".into(),
            RawModel {
                input: "10".into(),
                output: "30".into(),
                cached_input: None,
            },
        );
    })
    .await
}

#[tokio::test]
async fn a_model_scope_allows_that_model_only() {
    let app = spawn_with_two_models().await;
    let account = app.create_account("acme").await;
    let (small_only, _) = app
        .create_usage_key(&account.master_key, json!({"scopes": ["openai:mock-gpt"]}))
        .await;
    assert_eq!(chat_as(&app, &small_only, "mock-gpt").await.status(), 200);
    let body = expect_error(
        chat_as(&app, &small_only, "mock-gpt-large").await,
        403,
        "model_not_allowed",
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("mock-gpt-large"), "{message}");
    // A model scope reaches its group only: the echo group stays out of reach.
    let body = expect_error(
        app.get_as("/echo/x", &small_only).await,
        403,
        "insufficient_scope",
    )
    .await;
    assert!(body["error"]["message"].as_str().unwrap().contains("echo"));
    // The whole group allows every model in it.
    let (group, _) = app
        .create_usage_key(&account.master_key, json!({"scopes": ["openai"]}))
        .await;
    assert_eq!(chat_as(&app, &group, "mock-gpt-large").await.status(), 200);
}

#[tokio::test]
async fn a_refused_model_is_charged_nothing_and_names_the_allowed_models() {
    let app = spawn_with_two_models().await;
    let account = app.create_account("acme").await;
    let (key, _) = app
        .create_usage_key(&account.master_key, json!({"scopes": ["openai:mock-gpt"]}))
        .await;
    let balance = || app.get_json("/api/v1/billing/balance", &account.master_key);
    let before = balance().await;
    let body = expect_error(
        chat_as(&app, &key, "mock-gpt-large").await,
        403,
        "model_not_allowed",
    )
    .await;
    // The OpenAI profile has no details object; its message names what the key may use.
    assert_eq!(body["error"]["code"], "model_not_allowed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.ends_with("it may use: mock-gpt."), "{message}");
    assert_eq!(balance().await, before);
    let logged = app.get_json("/api/v1/requests", &account.master_key).await;
    assert_eq!(logged["data"][0]["error_code"], "model_not_allowed");
    assert_eq!(logged["data"][0]["cost"]["nanos"], 0);
}

#[tokio::test]
async fn scopes_are_validated_against_the_routes() {
    let app = spawn_with_two_models().await;
    let account = app.create_account("acme").await;
    let response = app
        .post("/api/v1/keys")
        .bearer_auth(&account.master_key)
        .json(
            &json!({"name": "k", "scopes": ["nope", "openai:gpt-9", "echo:x", "openai:mock-gpt"]}),
        )
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 400, "validation_error").await;
    let problems = body["error"]["field_errors"]["scopes"].as_array().unwrap();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0]
        .as_str()
        .unwrap()
        .contains("'nope' is not a route group"));
    assert!(problems[1]
        .as_str()
        .unwrap()
        .contains("mock-gpt, mock-gpt-large"));
    assert!(problems[2].as_str().unwrap().contains("models: none"));
}

#[tokio::test]
async fn an_allowlist_refuses_other_addresses_and_ignores_forwarded_for_from_untrusted_peers() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (key, _) = app
        .create_usage_key(&account.master_key, json!({"allowed_ips": ["10.0.0.0/8"]}))
        .await;
    let body = expect_error(app.get_as("/echo/x", &key).await, 403, "ip_not_allowed").await;
    assert_eq!(body["error"]["details"]["client_ip"], "127.0.0.1");
    // No proxy is trusted here, so the header is the client's own claim and is ignored.
    let spoofed = app
        .get("/echo/x")
        .bearer_auth(&key)
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .unwrap();
    expect_error(spoofed, 403, "ip_not_allowed").await;
    // The loopback client is allowed once the allowlist says so.
    let (local, _) = app
        .create_usage_key(
            &account.master_key,
            json!({"allowed_ips": ["10.0.0.0/8", "127.0.0.1"]}),
        )
        .await;
    assert_eq!(app.get_as("/echo/x", &local).await.status(), 200);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_client() {
    let app =
        spawn_app_with(|raw, _| raw.server.trusted_proxies = vec!["127.0.0.1/32".into()]).await;
    let account = app.create_account("acme").await;
    let (key, _) = app
        .create_usage_key(&account.master_key, json!({"allowed_ips": ["10.0.0.0/8"]}))
        .await;
    let via = |xff: Option<&'static str>| {
        let mut request = app.get("/echo/x").bearer_auth(&key);
        if let Some(xff) = xff {
            request = request.header("x-forwarded-for", xff);
        }
        request.send()
    };
    assert_eq!(via(Some("10.1.2.3")).await.unwrap().status(), 200);
    // The proxy appends the real client last; whatever the client wrote before it is not believed.
    let body = expect_error(
        via(Some("10.1.2.3, 203.0.113.9")).await.unwrap(),
        403,
        "ip_not_allowed",
    )
    .await;
    assert_eq!(body["error"]["details"]["client_ip"], "203.0.113.9");
    // Without the header the proxy itself is the client.
    expect_error(via(None).await.unwrap(), 403, "ip_not_allowed").await;
}

#[tokio::test]
async fn a_master_keys_allowlist_guards_the_management_api_too() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let response = app
        .admin_post(
            "/api/v1/keys",
            json!({"name": "office", "kind": "master", "account_id": account.id,
                   "allowed_ips": ["192.0.2.0/24"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let office: Value = response.json().await.unwrap();
    let secret = office["secret"].as_str().unwrap();
    assert_eq!(office["allowed_ips"], json!(["192.0.2.0/24"]));
    expect_error(
        app.get_as("/api/v1/keys", secret).await,
        403,
        "ip_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn patch_changes_only_what_it_names_and_null_clears() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let (_, id) = app
        .create_usage_key(
            master,
            json!({"name": "ci", "scopes": ["echo"], "allowed_ips": ["10.0.0.0/8"],
                   "monthly_spend_cap": "5"}),
        )
        .await;
    let renamed: Value = app
        .patch_key(master, id, json!({"name": "ci-runner"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(renamed["name"], "ci-runner");
    assert_eq!(renamed["scopes"], json!(["echo"]));
    assert_eq!(renamed["allowed_ips"], json!(["10.0.0.0/8"]));
    assert_eq!(renamed["monthly_spend_cap"]["credits"], "5");
    let cleared: Value = app
        .patch_key(
            master,
            id,
            json!({"allowed_ips": null, "monthly_spend_cap": null, "expires_at": null}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cleared["allowed_ips"], json!([]));
    assert_eq!(cleared["monthly_spend_cap"], Value::Null);
    assert_eq!(cleared["name"], "ci-runner");
    // What GET shows is what PATCH answered.
    let shown = app.get_json(&format!("/api/v1/keys/{id}"), master).await;
    assert_eq!(shown, cleared);
}

#[tokio::test]
async fn patch_rejects_bad_values_field_by_field() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let (_, id) = app.create_usage_key(master, json!({})).await;
    let body = expect_error(
        app.patch_key(
            master,
            id,
            json!({"name": null, "scopes": null, "status": "revoked",
                   "allowed_ips": ["10.0.0.1/8", "nonsense"], "expires_at": "2001-01-01T00:00:00Z",
                   "monthly_spend_cap": "-1"}),
        )
        .await,
        400,
        "validation_error",
    )
    .await;
    let fields = body["error"]["field_errors"].as_object().unwrap();
    let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "allowed_ips",
            "expires_at",
            "monthly_spend_cap",
            "name",
            "scopes",
            "status"
        ]
    );
    assert!(fields["allowed_ips"][0]
        .as_str()
        .unwrap()
        .contains("did you mean 10.0.0.0/8"));
    expect_error(
        app.patch_key(master, id, json!({"colour": "red"})).await,
        400,
        "validation_error",
    )
    .await;
    // Nothing changed.
    let key = app.get_json(&format!("/api/v1/keys/{id}"), master).await;
    assert_eq!(
        (key["name"].as_str(), key["status"].as_str()),
        (Some("k"), Some("active"))
    );
}

#[tokio::test]
async fn scope_and_allowlist_changes_apply_to_the_next_request() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let (key, id) = app.create_usage_key(master, json!({})).await;
    assert_eq!(app.get_as("/echo/x", &key).await.status(), 200);
    app.patch_key(master, id, json!({"scopes": ["openai"]}))
        .await;
    expect_error(app.get_as("/echo/x", &key).await, 403, "insufficient_scope").await;
    app.patch_key(
        master,
        id,
        json!({"scopes": ["*"], "allowed_ips": ["10.0.0.0/8"]}),
    )
    .await;
    expect_error(app.get_as("/echo/x", &key).await, 403, "ip_not_allowed").await;
    app.patch_key(master, id, json!({"allowed_ips": null}))
        .await;
    assert_eq!(app.get_as("/echo/x", &key).await.status(), 200);
}

#[tokio::test]
async fn expiry_and_spend_cap_changes_apply_to_the_next_request() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let soon = now(&app) + chrono::Duration::seconds(10);
    let (key, id) = app
        .create_usage_key(master, json!({"expires_at": soon}))
        .await;
    assert_eq!(app.get_as("/echo/x", &key).await.status(), 200);
    app.clock.advance(chrono::Duration::seconds(11));
    expect_error(app.get_as("/echo/x", &key).await, 401, "key_expired").await;
    assert_eq!(
        app.patch_key(master, id, json!({"expires_at": null}))
            .await
            .status(),
        200
    );
    assert_eq!(app.get_as("/echo/x", &key).await.status(), 200);
    // A cap of zero refuses the next paid call; clearing it lets calls through again.
    app.patch_key(master, id, json!({"monthly_spend_cap": "0"}))
        .await;
    expect_error(app.get_as("/echo/x", &key).await, 402, "key_quota_exceeded").await;
    app.patch_key(master, id, json!({"monthly_spend_cap": null}))
        .await;
    assert_eq!(app.get_as("/echo/x", &key).await.status(), 200);
}

/// As errors.md advises a `key_expired` caller: a roll keeps the expiry (a new secret is not a
/// new lease of life), a later `expires_at` brings the key back.
#[tokio::test]
async fn an_expired_key_stays_expired_when_rolled_and_works_again_with_a_later_expiry() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let soon = now(&app) + chrono::Duration::seconds(10);
    let (_, id) = app
        .create_usage_key(master, json!({"expires_at": soon}))
        .await;
    app.clock.advance(chrono::Duration::seconds(11));
    let rolled = app
        .post(&format!("/api/v1/keys/{id}/roll"))
        .bearer_auth(master)
        .send()
        .await
        .unwrap();
    assert_eq!(rolled.status(), 200);
    let rolled: Value = rolled.json().await.unwrap();
    // The key shows what a call with it would meet.
    assert_eq!(rolled["status"], "expired");
    let shown = app.get_json(&format!("/api/v1/keys/{id}"), master).await;
    assert_eq!(shown["status"], "expired");
    let secret = rolled["secret"].as_str().unwrap().to_string();
    expect_error(app.get_as("/echo/x", &secret).await, 401, "key_expired").await;
    let later = now(&app) + chrono::Duration::days(30);
    let patched = app
        .patch_key(master, id, json!({"expires_at": later}))
        .await;
    assert_eq!(patched.status(), 200);
    let patched: Value = patched.json().await.unwrap();
    assert_eq!(patched["status"], "active");
    assert_eq!(app.get_as("/echo/x", &secret).await.status(), 200);
}

#[tokio::test]
async fn a_rolled_key_works_under_both_secrets_for_the_grace_period_then_only_the_new() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let (old, id) = app
        .create_usage_key(master, json!({"monthly_spend_cap": "3"}))
        .await;
    assert_eq!(app.get_as("/echo/x", &old).await.status(), 200);
    let rolled = app
        .post(&format!("/api/v1/keys/{id}/roll"))
        .bearer_auth(master)
        .json(&json!({"grace_period_seconds": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(rolled.status(), 200);
    let rolled: Value = rolled.json().await.unwrap();
    let new = rolled["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    // Same key: same id, same policy; only the secret and its display prefix changed.
    assert_eq!(rolled["id"], id.to_string());
    assert_eq!(rolled["monthly_spend_cap"]["credits"], "3");
    assert_eq!(rolled["prefix"].as_str().unwrap(), &new[..12]);
    let deadline: chrono::DateTime<chrono::Utc> = rolled["previous_secret_expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(deadline, now(&app) + chrono::Duration::seconds(60));

    app.clock.advance(chrono::Duration::seconds(59));
    assert_eq!(app.get_as("/echo/x", &old).await.status(), 200);
    assert_eq!(app.get_as("/echo/x", &new).await.status(), 200);
    app.clock.advance(chrono::Duration::seconds(1));
    let body = expect_error(app.get_as("/echo/x", &old).await, 401, "key_revoked").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("rolled"));
    assert_eq!(app.get_as("/echo/x", &new).await.status(), 200);
    // Both secrets' calls count against the one key's spend; the refusal is filed under it too.
    let usage = app
        .get_json(&format!("/api/v1/requests?key_id={id}"), master)
        .await;
    let statuses: Vec<u64> = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 401, 200, 200, 200]);
}

#[tokio::test]
async fn a_roll_without_grace_retires_the_old_secret_at_once_and_revoking_ends_both() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let (old, id) = app.create_usage_key(master, json!({})).await;
    assert_eq!(app.get_as("/echo/x", &old).await.status(), 200);
    let roll = |body: Option<Value>| {
        let mut request = app
            .post(&format!("/api/v1/keys/{id}/roll"))
            .bearer_auth(master);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    // A body of whitespace alone is not JSON, and not "no body": refused, nothing rolled.
    let blank = app
        .post(&format!("/api/v1/keys/{id}/roll"))
        .bearer_auth(master)
        .body("\r")
        .send()
        .await
        .unwrap();
    expect_error(blank, 400, "bad_request").await;
    assert_eq!(app.get_as("/echo/x", &old).await.status(), 200);
    let first: Value = roll(None).await.unwrap().json().await.unwrap();
    expect_error(app.get_as("/echo/x", &old).await, 401, "key_revoked").await;
    let current = first["secret"].as_str().unwrap().to_string();
    assert_eq!(app.get_as("/echo/x", &current).await.status(), 200);

    expect_error(
        roll(Some(json!({"grace_period_seconds": 604_801})))
            .await
            .unwrap(),
        400,
        "validation_error",
    )
    .await;
    let second: Value = roll(Some(json!({"grace_period_seconds": 3600})))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let newest = second["secret"].as_str().unwrap();
    assert_eq!(app.get_as("/echo/x", &current).await.status(), 200);
    // Revoking the key ends every secret it has, the one in its grace period included.
    let revoked = app
        .post(&format!("/api/v1/keys/{id}/revoke"))
        .bearer_auth(master)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    for secret in [current.as_str(), newest] {
        expect_error(app.get_as("/echo/x", secret).await, 401, "key_revoked").await;
    }
    expect_error(roll(None).await.unwrap(), 409, "conflict").await;
    expect_error(
        app.patch_key(master, id, json!({"name": "x"})).await,
        409,
        "conflict",
    )
    .await;
}

#[tokio::test]
async fn the_key_limit_counts_unrevoked_keys_and_the_admin_can_raise_it() {
    let app = spawn_app_with(|raw, _| raw.keys.max_per_account = 2).await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let (_, first) = app.create_usage_key(master, json!({})).await;
    let over = app
        .post("/api/v1/keys")
        .bearer_auth(master)
        .json(&json!({"name": "third"}))
        .send()
        .await
        .unwrap();
    let body = expect_error(over, 403, "key_limit_reached").await;
    assert_eq!(body["error"]["details"]["limit"], 2);

    let raised = app
        .patch(&format!("/api/v1/accounts/{}", account.id))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"max_keys": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(raised.status(), 200);
    let raised: Value = raised.json().await.unwrap();
    assert_eq!(
        (raised["max_keys"].as_u64(), raised["name"].as_str()),
        (Some(3), Some("acme"))
    );
    app.create_usage_key(master, json!({})).await;

    // Back to the configured default; revoking a key frees its place.
    app.patch(&format!("/api/v1/accounts/{}", account.id))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"max_keys": null}))
        .send()
        .await
        .unwrap();
    app.post(&format!("/api/v1/keys/{first}/revoke"))
        .bearer_auth(master)
        .send()
        .await
        .unwrap();
    let account_view = app
        .get_json(&format!("/api/v1/accounts/{}", account.id), master)
        .await;
    assert_eq!(account_view["max_keys"], 2);
    let over = app
        .post("/api/v1/keys")
        .bearer_auth(master)
        .json(&json!({"name": "fourth"}))
        .send()
        .await
        .unwrap();
    expect_error(over, 403, "key_limit_reached").await;

    // Only the admin changes an account.
    let by_master = app
        .patch(&format!("/api/v1/accounts/{}", account.id))
        .bearer_auth(master)
        .json(&json!({"max_keys": 100}))
        .send()
        .await
        .unwrap();
    expect_error(by_master, 403, "forbidden").await;
}

#[tokio::test]
async fn usage_keys_cannot_touch_keys() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (usage, id) = app.create_usage_key(&account.master_key, json!({})).await;
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/keys/{id}"), None),
        (
            Method::PATCH,
            format!("/api/v1/keys/{id}"),
            Some(json!({"name": "x"})),
        ),
        (Method::POST, format!("/api/v1/keys/{id}/roll"), None),
        (Method::POST, format!("/api/v1/keys/{id}/revoke"), None),
    ] {
        let mut request = app
            .http
            .request(method.clone(), format!("{}{path}", app.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.bearer_auth(&usage).send().await.unwrap();
        expect_error(response, 403, "forbidden").await;
    }
    assert_eq!(app.get_as("/echo/x", &usage).await.status(), 200);
}

/// Every management endpoint that names a resource, called with account A's keys: B's resource
/// must answer exactly as a resource that does not exist (status, headers, body byte for byte,
/// request IDs aside), and must be left as it was.
#[tokio::test]
async fn tenant_isolation_matrix() {
    let app = spawn_app().await;
    let a = app.create_account("a").await;
    let b = app.create_account("b").await;
    let (a_usage, _) = app.create_usage_key(&a.master_key, json!({})).await;
    let (b_usage_secret, b_key) = app.create_usage_key(&b.master_key, json!({})).await;
    let b_hold: Value = app
        .post("/api/v1/holds")
        .bearer_auth(&b.master_key)
        .json(&json!({"amount": "1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b_hold = b_hold["id"].as_str().unwrap().to_string();
    let b_call = app.get_as("/echo/x", &b_usage_secret).await;
    let b_request = b_call.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();

    let (account, key, hold, request) = (
        b.id.to_string(),
        b_key.to_string(),
        b_hold.clone(),
        b_request.clone(),
    );
    let missing = (
        AccountId::new().to_string(),
        KeyId::new().to_string(),
        HoldId::new().to_string(),
        RequestId::new().to_string(),
    );
    type Endpoint = (Method, &'static str, Option<Value>);
    let endpoints: Vec<Endpoint> = vec![
        (Method::GET, "/accounts/{account}", None),
        (
            Method::PATCH,
            "/accounts/{account}",
            Some(json!({"name": "x"})),
        ),
        (
            Method::POST,
            "/accounts/{account}/credits",
            Some(json!({"amount": "1", "reason": "x"})),
        ),
        (Method::POST, "/accounts/{account}/suspend", None),
        (Method::POST, "/accounts/{account}/reactivate", None),
        (Method::GET, "/billing/balance?account_id={account}", None),
        (Method::GET, "/ledger?account_id={account}", None),
        (Method::GET, "/requests?account_id={account}", None),
        (Method::GET, "/usage?account_id={account}", None),
        (Method::GET, "/keys?account_id={account}", None),
        (
            Method::POST,
            "/keys",
            Some(json!({"name": "x", "account_id": "{account}"})),
        ),
        (
            Method::POST,
            "/holds",
            Some(json!({"amount": "1", "account_id": "{account}"})),
        ),
        (Method::GET, "/keys/{key}", None),
        (Method::PATCH, "/keys/{key}", Some(json!({"name": "x"}))),
        (Method::POST, "/keys/{key}/roll", None),
        (Method::POST, "/keys/{key}/revoke", None),
        (Method::GET, "/holds/{hold}", None),
        (
            Method::POST,
            "/holds/{hold}/settle",
            Some(json!({"amount": "1"})),
        ),
        (Method::POST, "/holds/{hold}/release", None),
        (Method::GET, "/requests/{request}", None),
    ];
    let fill = |text: &str, ids: &(String, String, String, String)| {
        text.replace("{account}", &ids.0)
            .replace("{key}", &ids.1)
            .replace("{hold}", &ids.2)
            .replace("{request}", &ids.3)
    };
    let theirs_ids = (account, key, hold, request);
    let mut refused = 0;
    for caller in [&a.master_key, &a_usage] {
        for (method, path, body) in &endpoints {
            let mut answers = Vec::new();
            for ids in [&theirs_ids, &missing] {
                let url = format!("{}/api/v1{}", app.url, fill(path, ids));
                let mut request = app.http.request(method.clone(), url).bearer_auth(caller);
                if let Some(body) = body {
                    request = request
                        .header("content-type", "application/json")
                        .body(fill(&body.to_string(), ids));
                }
                answers.push(normalised(request.send().await.unwrap(), ids).await);
            }
            assert_eq!(
                answers[0], answers[1],
                "{method} {path}: B's resource answered differently from a missing one"
            );
            let status = answers[0].0;
            assert!(
                matches!(status, 400 | 403 | 404) || (status == 200 && answers[0].2.contains("[]")),
                "{method} {path} answered {status}: {}",
                answers[0].2
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 2 * endpoints.len());

    // B's things are as they were: its key works, its hold is pending.
    assert_eq!(app.get_as("/echo/x", &b_usage_secret).await.status(), 200);
    let hold = app
        .get_json(&format!("/api/v1/holds/{b_hold}"), &b.master_key)
        .await;
    assert_eq!(hold["status"], "pending");
    let key = app
        .get_json(&format!("/api/v1/keys/{b_key}"), &b.master_key)
        .await;
    assert_eq!(key["name"], "k");
}

/// Status, the headers (but the request ID, date and rate-limit counters), and the body with the
/// request's own ids blanked out.
async fn normalised(
    response: reqwest::Response,
    ids: &(String, String, String, String),
) -> (u16, Vec<(String, String)>, String) {
    let status = response.status().as_u16();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        // The caller's own rate-limit counters move with every call; they say nothing of B.
        .filter(|(name, _)| {
            let name = name.as_str();
            !matches!(name, "x-request-id" | "date") && !name.contains("ratelimit")
        })
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_string()))
        .collect();
    headers.sort();
    let mut body = response.text().await.unwrap().replace(&request_id, "req_…");
    for id in [&ids.0, &ids.1, &ids.2, &ids.3] {
        body = body.replace(id.as_str(), "<id>");
    }
    (status, headers, body)
}

#[tokio::test]
async fn a_suspended_account_cannot_use_its_keys_until_reactivated() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let other = app.create_account("other").await;
    let (usage, _) = app.create_usage_key(&account.master_key, json!({})).await;
    // Cached before the suspension: the change must reach the cache.
    assert_eq!(app.get_as("/echo/x", &usage).await.status(), 200);

    // Only the operator suspends.
    let by_customer = app
        .post(&format!("/api/v1/accounts/{}/suspend", account.id))
        .bearer_auth(&account.master_key)
        .send()
        .await
        .unwrap();
    expect_error(by_customer, 403, "forbidden").await;
    let suspended = app
        .post(&format!("/api/v1/accounts/{}/suspend", account.id))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(suspended.status(), 200);
    assert_eq!(
        suspended.json::<Value>().await.unwrap()["status"],
        "suspended"
    );

    for key in [&usage, &account.master_key] {
        let refused = expect_error(app.get_as("/echo/x", key).await, 403, "forbidden").await;
        assert!(refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("suspended"));
        expect_error(app.get_as("/api/v1/keys", key).await, 403, "forbidden").await;
    }
    // Other accounts are untouched; the operator still sees the account.
    assert_eq!(app.get_as("/echo/x", &other.master_key).await.status(), 200);
    let seen = app
        .get_json(&format!("/api/v1/accounts/{}", account.id), ADMIN_TOKEN)
        .await;
    assert_eq!(seen["status"], "suspended");

    let reactivated = app
        .post(&format!("/api/v1/accounts/{}/reactivate", account.id))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reactivated.status(), 200);
    assert_eq!(app.get_as("/echo/x", &usage).await.status(), 200);
    let unknown = app
        .post(&format!("/api/v1/accounts/{}/suspend", AccountId::new()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    expect_error(unknown, 404, "not_found").await;
}

#[tokio::test]
async fn the_operator_lists_accounts_by_page_and_status_and_a_master_key_sees_its_own() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        ids.push(app.create_account(name).await);
    }
    let suspended = app
        .post(&format!("/api/v1/accounts/{}/suspend", ids[1].id))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(suspended.status(), 200);

    let first = app.get_json("/api/v1/accounts?limit=2", ADMIN_TOKEN).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app
        .get_json(
            &format!("/api/v1/accounts?limit=2&cursor={cursor}"),
            ADMIN_TOKEN,
        )
        .await;
    assert!(second["next_cursor"].is_null());
    let mut listed: Vec<String> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["data"].as_array().unwrap())
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    let mut expected: Vec<String> = ids.iter().map(|a| a.id.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected, "id order");
    listed.dedup();
    assert_eq!(listed.len(), 3);

    let only = app
        .get_json("/api/v1/accounts?status=suspended", ADMIN_TOKEN)
        .await;
    assert_eq!(only["data"].as_array().unwrap().len(), 1);
    assert_eq!(only["data"][0]["id"], ids[1].id.to_string());
    let own = app.get_json("/api/v1/accounts", &ids[0].master_key).await;
    assert_eq!(own["data"].as_array().unwrap().len(), 1);
    assert_eq!(own["data"][0]["id"], ids[0].id.to_string());

    let bad = app
        .get_as("/api/v1/accounts?status=closed&cursor=nope", ADMIN_TOKEN)
        .await;
    let body = expect_error(bad, 400, "validation_error").await;
    let fields = body["error"]["field_errors"].as_object().unwrap();
    assert!(fields.contains_key("status") && fields.contains_key("cursor"));
}

#[tokio::test]
async fn keys_are_listed_by_page_oldest_first() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let other = app.create_account("other").await;
    for _ in 0..3 {
        app.create_usage_key(&account.master_key, json!({})).await;
    }
    let first = app
        .get_json("/api/v1/keys?limit=3", &account.master_key)
        .await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app
        .get_json(
            &format!("/api/v1/keys?limit=3&cursor={cursor}"),
            &account.master_key,
        )
        .await;
    assert!(second["next_cursor"].is_null());
    let ids: Vec<&str> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["data"].as_array().unwrap())
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!((ids.len(), &ids), (4, &sorted));
    // A master key naming another account finds nothing; the admin sees every account's.
    let theirs = app
        .get_json(
            &format!("/api/v1/keys?account_id={}", other.id),
            &account.master_key,
        )
        .await;
    assert_eq!(theirs["data"], json!([]));
    let all = app.get_json("/api/v1/keys?limit=500", ADMIN_TOKEN).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 5);
    let bad = app
        .get_as("/api/v1/keys?cursor=nope&account_id=x", ADMIN_TOKEN)
        .await;
    let body = expect_error(bad, 400, "validation_error").await;
    let fields = body["error"]["field_errors"].as_object().unwrap();
    assert!(fields.contains_key("cursor") && fields.contains_key("account_id"));
}
