//! Black-box tests of the management API and the health endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{expect_error, redact_request_id, spawn_app, ADMIN_TOKEN};
use expect_test::expect;
use serde_json::{json, Value};
use tollgate_store::LedgerStore;

#[tokio::test]
async fn the_admin_creates_an_account_whose_master_key_works_at_once() {
    let app = spawn_app().await;
    let response = app
        .admin_post(
            "/api/v1/accounts",
            json!({"name": "Acme", "starter_credits": "2.5"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["account"]["name"], "Acme");
    assert_eq!(body["account"]["status"], "active");
    assert_eq!(
        body["account"]["balance"],
        json!({"nanos": 2_500_000_000_i64, "credits": "2.5", "currency": "USD"})
    );
    let key = &body["master_key"];
    assert_eq!(key["kind"], "master");
    let secret = key["secret"].as_str().unwrap();
    assert!(secret.starts_with(key["prefix"].as_str().unwrap()));

    let me = app.get_json("/api/v1/key", secret).await;
    assert_eq!(me["id"], key["id"]);
    assert_eq!(me["account_id"], body["account"]["id"]);
    assert!(me.get("secret").is_none(), "the secret is shown once only");

    // The starter credits are in the ledger, not just the cached balance.
    let id = body["account"]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.store.ledger_balance(id).await.unwrap().0, 2_500_000_000);
}

#[tokio::test]
async fn accounts_get_the_configured_starter_credits_by_default() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let body = app
        .get_json(
            &format!("/api/v1/accounts/{}", account.id),
            &account.master_key,
        )
        .await;
    assert_eq!(body["balance"]["credits"], "5");
}

#[tokio::test]
async fn only_the_admin_creates_accounts() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let by_master = app
        .post("/api/v1/accounts")
        .bearer_auth(&account.master_key)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    expect_error(by_master, 403, "forbidden").await;
    // Authorisation comes before the body is read: a bad body does not hide the 403.
    let by_master_bad_body = app
        .post("/api/v1/accounts")
        .bearer_auth(&account.master_key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(by_master_bad_body, 403, "forbidden").await;
    let anonymous = app
        .post("/api/v1/accounts")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    expect_error(anonymous, 401, "invalid_api_key").await;
    let wrong_token = app
        .post("/api/v1/accounts")
        .bearer_auth("not-the-admin-token-at-all")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    expect_error(wrong_token, 401, "invalid_api_key").await;
}

#[tokio::test]
async fn malformed_json_is_400_bad_request_and_a_wrong_shape_is_400_validation_error() {
    let app = spawn_app().await;
    let malformed = app
        .post("/api/v1/accounts")
        .bearer_auth(ADMIN_TOKEN)
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    expect_error(malformed, 400, "bad_request").await;

    let wrong = app
        .admin_post(
            "/api/v1/accounts",
            json!({"name": 42, "starter_credits": "1"}),
        )
        .send()
        .await
        .unwrap();
    let body = expect_error(wrong, 400, "validation_error").await;
    expect![[r#"{"error":{"code":"validation_error","details":{},"field_errors":{"name":["invalid type: integer `42`, expected a string"]},"message":"1 invalid field: name: invalid type: integer `42`, expected a string.","request_id":"req_…","type":"invalid_request_error"}}"#]]
        .assert_eq(&redact_request_id(body).to_string());

    let several = app
        .admin_post(
            "/api/v1/accounts",
            json!({"name": "  ", "starter_credits": "lots"}),
        )
        .send()
        .await
        .unwrap();
    let body = expect_error(several, 400, "validation_error").await;
    expect![[r#"{"name":["must not be empty"],"starter_credits":["'lots' is not an amount: 1 to 9 digits, optionally '.' and 1 to 9 decimals (e.g. \"0.25\")"]}"#]]
        .assert_eq(&body["error"]["field_errors"].to_string());
}

#[tokio::test]
async fn key_creation_validates_every_field_at_once() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let response = app
        .post("/api/v1/keys")
        .bearer_auth(&account.master_key)
        .json(
            &json!({"name": "", "scopes": ["echo", "nope"], "expires_at": "2001-01-01T00:00:00Z"}),
        )
        .send()
        .await
        .unwrap();
    let body = expect_error(response, 400, "validation_error").await;
    expect![[r#"{"expires_at":["must be in the future"],"name":["must not be empty"],"scopes":["'nope' is not a route group (known: openai, anthropic, echo, problem; or \"*\")"]}"#]]
        .assert_eq(&body["error"]["field_errors"].to_string());
}

#[tokio::test]
async fn usage_keys_cannot_manage_but_can_verify_themselves() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (usage, usage_id) = app
        .create_usage_key(
            &account.master_key,
            json!({"name": "worker", "scopes": ["echo"]}),
        )
        .await;

    let create = app
        .post("/api/v1/keys")
        .bearer_auth(&usage)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    expect_error(create, 403, "forbidden").await;
    let list = app.get_as("/api/v1/keys", &usage).await;
    expect_error(list, 403, "forbidden").await;
    let revoke = app
        .post(&format!("/api/v1/keys/{usage_id}/revoke"))
        .bearer_auth(&usage)
        .send()
        .await
        .unwrap();
    expect_error(revoke, 403, "forbidden").await;

    let me = app.get_json("/api/v1/key", &usage).await;
    assert_eq!(me["id"], usage_id.to_string());
    assert_eq!(me["kind"], "usage");
    assert_eq!(me["scopes"], json!(["echo"]));
    assert_eq!(me["name"], "worker");
}

#[tokio::test]
async fn only_the_admin_creates_master_keys_and_must_name_the_account() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let by_master = app
        .post("/api/v1/keys")
        .bearer_auth(&account.master_key)
        .json(&json!({"name": "second master", "kind": "master"}))
        .send()
        .await
        .unwrap();
    expect_error(by_master, 403, "forbidden").await;

    let no_account = app
        .admin_post("/api/v1/keys", json!({"name": "k"}))
        .send()
        .await
        .unwrap();
    let body = expect_error(no_account, 400, "validation_error").await;
    assert!(body["error"]["field_errors"]["account_id"].is_array());

    let by_admin = app
        .admin_post(
            "/api/v1/keys",
            json!({"name": "second master", "kind": "master", "account_id": account.id}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(by_admin.status(), 201);
    let body: Value = by_admin.json().await.unwrap();
    assert_eq!(body["kind"], "master");
    assert_eq!(body["account_id"], account.id.to_string());
}

#[tokio::test]
async fn listing_keys_shows_the_callers_account_or_for_the_admin_any() {
    let app = spawn_app().await;
    let a = app.create_account("a").await;
    let b = app.create_account("b").await;
    let (_, a_usage) = app.create_usage_key(&a.master_key, json!({})).await;

    let ids = |body: Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect()
    };
    let own = app.get_json("/api/v1/keys", &a.master_key).await;
    assert_eq!(
        ids(own),
        vec![a.master_key_id.to_string(), a_usage.to_string()]
    );

    let admin_b = app
        .get_json(&format!("/api/v1/keys?account_id={}", b.id), ADMIN_TOKEN)
        .await;
    assert_eq!(ids(admin_b), vec![b.master_key_id.to_string()]);

    let admin_all = app.get_json("/api/v1/keys", ADMIN_TOKEN).await;
    assert_eq!(ids(admin_all).len(), 3);

    let bad = app
        .get_as("/api/v1/keys?account_id=nope", ADMIN_TOKEN)
        .await;
    expect_error(bad, 400, "validation_error").await;
    let unknown_param = app.get_as("/api/v1/keys?colour=red", ADMIN_TOKEN).await;
    expect_error(unknown_param, 400, "bad_request").await;
}

#[tokio::test]
async fn revoking_twice_is_409_already_revoked() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let (_, id) = app.create_usage_key(&account.master_key, json!({})).await;
    let path = format!("/api/v1/keys/{id}/revoke");
    let first = app
        .post(&path)
        .bearer_auth(&account.master_key)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "revoked");
    let second = app
        .post(&path)
        .bearer_auth(&account.master_key)
        .send()
        .await
        .unwrap();
    let body = expect_error(second, 409, "already_revoked").await;
    assert_eq!(body["error"]["details"]["revoked_at"], first["revoked_at"]);
}

#[tokio::test]
async fn unknown_management_paths_are_404_and_wrong_methods_405_in_the_envelope() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let unknown = app.get_as("/api/v1/nothing", &account.master_key).await;
    expect_error(unknown, 404, "not_found").await;
    let wrong_method = app
        .http
        .delete(format!("{}/api/v1/key", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.headers()["allow"], "GET,HEAD");
    let body = expect_error(wrong_method, 405, "method_not_allowed").await;
    assert_eq!(
        body["error"]["message"],
        "DELETE is not served by /api/v1/key; the Allow header lists the methods it serves."
    );
    let bad_id = app
        .get_as("/api/v1/accounts/acct_lowercase", &account.master_key)
        .await;
    expect_error(bad_id, 404, "not_found").await;
}

#[tokio::test]
async fn the_admin_token_is_not_an_api_key() {
    let app = spawn_app().await;
    let me = app.get_as("/api/v1/key", ADMIN_TOKEN).await;
    expect_error(me, 403, "forbidden").await;
    // Nor does it open the data plane.
    let proxied = app.get_as("/echo/x", ADMIN_TOKEN).await;
    expect_error(proxied, 401, "invalid_api_key").await;
}

#[tokio::test]
async fn health_and_readiness_answer_with_request_ids() {
    let app = spawn_app().await;
    let health = app.get("/healthz").send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let ready = app.get("/readyz").send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["store"]["status"], "ok");
}

/// The bare address points a newcomer to the docs, and every link it gives works.
#[tokio::test]
async fn the_root_points_to_the_docs() {
    let app = spawn_app().await;
    let root = app.get("/").send().await.unwrap();
    assert_eq!(root.status(), 200);
    let body: Value = root.json().await.unwrap();
    assert_eq!(body["service"], "tollgate");
    for link in ["docs", "openapi", "console", "health", "ready"] {
        let path = body[link].as_str().unwrap();
        let response = app.get(path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{link}: {path}");
    }
    assert_eq!(body["api"], "/api/v1");
}

/// `expires_at` keeps its milliseconds through create, read and change; finer digits are cut
/// to the millisecond the store keeps, the same in every answer.
#[tokio::test]
async fn a_keys_expiry_keeps_its_milliseconds() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    let master = &account.master_key;
    let (_, id) = app
        .create_usage_key(master, json!({"expires_at": "2099-01-01T10:00:00.123Z"}))
        .await;
    let shown = app.get_json(&format!("/api/v1/keys/{id}"), master).await;
    assert_eq!(shown["expires_at"], "2099-01-01T10:00:00.123Z");
    let patched = app
        .patch_key(
            master,
            id,
            json!({"expires_at": "2099-01-01T10:00:00.987654Z"}),
        )
        .await;
    let patched: Value = patched.json().await.unwrap();
    assert_eq!(patched["expires_at"], "2099-01-01T10:00:00.987Z");
    let shown = app.get_json(&format!("/api/v1/keys/{id}"), master).await;
    assert_eq!(shown["expires_at"], "2099-01-01T10:00:00.987Z");
}

#[tokio::test]
async fn readiness_is_503_naming_the_store_when_it_is_down() {
    let app = spawn_app().await;
    let account = app.create_account("acme").await;
    app.store.close().await;
    let ready = app.get("/readyz").send().await.unwrap();
    assert_eq!(ready.headers()["retry-after"], "5");
    let body = expect_error(ready, 503, "service_unavailable").await;
    assert_eq!(body["error"]["details"]["dependency"], "store");

    // Management calls that need the store fail the same way, never with a 500.
    let get = app
        .get_as(&format!("/api/v1/accounts/{}", account.id), ADMIN_TOKEN)
        .await;
    expect_error(get, 503, "service_unavailable").await;
}
