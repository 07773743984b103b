//! Generated and mutated input to every management endpoint, as the admin and as a master key:
//! bodies (random JSON, valid bodies with fields dropped, retyped or stretched), query strings
//! and path ids. Whatever arrives, the answer is never a 5xx, and every refusal is the envelope.
//! Seeded, so a failure reproduces.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{spawn_app, TestApp, ADMIN_TOKEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Map, Value};

/// Every management endpoint with a valid body for it (`{account}`, `{key}`, `{hold}`,
/// `{request}` are filled with real ids, or mutated).
fn endpoints() -> Vec<(Method, &'static str, Value)> {
    vec![
        (
            Method::POST,
            "/accounts",
            json!({"name": "n", "starter_credits": "1", "max_keys": 3}),
        ),
        (Method::GET, "/accounts", Value::Null),
        (Method::GET, "/accounts/{account}", Value::Null),
        (
            Method::PATCH,
            "/accounts/{account}",
            json!({"name": "n", "max_keys": 4, "rate_limits": {"per-key": {"limit": 5}}}),
        ),
        (Method::POST, "/accounts/{account}/suspend", Value::Null),
        (Method::POST, "/accounts/{account}/reactivate", Value::Null),
        (
            Method::POST,
            "/accounts/{account}/credits",
            json!({"amount": "1.5", "reason": "r"}),
        ),
        (
            Method::POST,
            "/keys",
            json!({"name": "k", "account_id": "{account}", "scopes": ["echo"], "allowed_ips": ["10.0.0.0/8"], "expires_at": "2099-01-01T00:00:00Z", "monthly_spend_cap": "3"}),
        ),
        (Method::GET, "/keys", Value::Null),
        (Method::GET, "/keys/{key}", Value::Null),
        (
            Method::PATCH,
            "/keys/{key}",
            json!({"name": "k2", "status": "inactive", "allowed_ips": null, "rate_limits": {"per-key": {"limit": 9, "window_seconds": 60}}}),
        ),
        (
            Method::POST,
            "/keys/{key}/roll",
            json!({"grace_period_seconds": 60}),
        ),
        (Method::POST, "/keys/{key}/revoke", Value::Null),
        (Method::GET, "/key", Value::Null),
        (Method::GET, "/billing/balance", Value::Null),
        (Method::GET, "/ledger", Value::Null),
        (
            Method::POST,
            "/holds",
            json!({"amount": "0.5", "account_id": "{account}", "ttl_seconds": 60, "metadata": {"job": 1}}),
        ),
        (Method::GET, "/holds/{hold}", Value::Null),
        (
            Method::POST,
            "/holds/{hold}/settle",
            json!({"amount": "0.1"}),
        ),
        (Method::POST, "/holds/{hold}/release", Value::Null),
        (Method::GET, "/requests", Value::Null),
        (Method::GET, "/requests/{request}", Value::Null),
        (Method::GET, "/usage", Value::Null),
        (Method::GET, "/audit", Value::Null),
        (Method::GET, "/audit/verify", Value::Null),
    ]
}

fn random_scalar(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..10) {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => json!(rng.gen::<i64>()),
        3 => json!(rng.gen::<f64>() * 1e30),
        4 => json!(-1),
        5 => json!("x".repeat(rng.gen_range(0..3000))),
        6 => json!("1e400"),
        7 => json!("-0.000000000000000000001"),
        8 => json!("\u{0000}\u{202e}é\u{1F600}"),
        _ => json!(u64::MAX),
    }
}

fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    if depth == 0 || rng.gen_bool(0.4) {
        return random_scalar(rng);
    }
    if rng.gen_bool(0.5) {
        (0..rng.gen_range(0..5))
            .map(|_| random_json(rng, depth - 1))
            .collect()
    } else {
        let names = [
            "name",
            "amount",
            "scopes",
            "limit",
            "status",
            "account_id",
            "zz",
        ];
        let map: Map<String, Value> = (0..rng.gen_range(0..5))
            .map(|_| {
                let name = names[rng.gen_range(0..names.len())].to_string();
                (name, random_json(rng, depth - 1))
            })
            .collect();
        Value::Object(map)
    }
}

/// A valid body with one field dropped, retyped or replaced, or one field added.
fn mutate(rng: &mut StdRng, body: &Value) -> Value {
    let Value::Object(fields) = body else {
        return random_json(rng, 3);
    };
    let mut fields = fields.clone();
    let names: Vec<String> = fields.keys().cloned().collect();
    match (rng.gen_range(0..4), names.is_empty()) {
        (0, false) => {
            fields.remove(&names[rng.gen_range(0..names.len())]);
        }
        (1 | 2, false) => {
            let name = &names[rng.gen_range(0..names.len())];
            fields.insert(name.clone(), random_json(rng, 2));
        }
        _ => {
            fields.insert("unexpected".into(), random_json(rng, 2));
        }
    }
    Value::Object(fields)
}

fn mutate_id(rng: &mut StdRng, id: &str) -> String {
    match rng.gen_range(0..6) {
        0 => id.to_string(),
        1 => format!("{}{}", &id[..id.len() - 1], "Z"),
        2 => "x".repeat(rng.gen_range(0..600)),
        3 => "%00%ff%2F..".into(),
        4 => id.replace('_', ""),
        _ => format!("{id}{id}"),
    }
}

fn random_query(rng: &mut StdRng) -> String {
    let names = [
        "limit",
        "cursor",
        "account_id",
        "status",
        "from",
        "to",
        "key_id",
        "route",
        "group_by",
    ];
    let values = [
        "0",
        "-1",
        "501",
        "abc",
        "",
        "2099-13-45",
        "%zz",
        "acct_",
        "9999999999999999999999",
    ];
    (0..rng.gen_range(0..4))
        .map(|_| {
            format!(
                "{}={}",
                names[rng.gen_range(0..names.len())],
                values[rng.gen_range(0..values.len())]
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

async fn ids(app: &TestApp) -> [(String, String); 4] {
    let account = app.create_account("fuzz").await;
    let (_, key) = app.create_usage_key(&account.master_key, json!({})).await;
    let hold: Value = app
        .admin_post(
            "/api/v1/holds",
            json!({"amount": "0.5", "account_id": account.id.to_string()}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let echoed = app.get_as("/echo/x", &account.master_key).await;
    let request = echoed.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    [
        ("{account}".into(), account.id.to_string()),
        ("{key}".into(), key.to_string()),
        ("{hold}".into(), hold["id"].as_str().unwrap().to_string()),
        ("{request}".into(), request),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_generated_input_to_the_management_api_yields_a_5xx() {
    const CASES_PER_ENDPOINT: usize = 30;
    let app = spawn_app().await;
    let account = app.create_account("caller").await;
    let ids = ids(&app).await;
    let mut rng = StdRng::seed_from_u64(0x7011_6a7e);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for (method, template, valid) in endpoints() {
        for case in 0..CASES_PER_ENDPOINT {
            let mut path = template.to_string();
            for (slot, id) in &ids {
                let id = if case % 3 == 0 {
                    mutate_id(&mut rng, id)
                } else {
                    id.clone()
                };
                path = path.replace(slot, &id);
            }
            let query = random_query(&mut rng);
            let body = match case % 3 {
                0 => valid.clone(),
                1 => mutate(&mut rng, &valid),
                _ => random_json(&mut rng, 4),
            };
            let body = body.to_string().replace("{account}", &ids[0].1);
            let token = if case % 2 == 0 {
                ADMIN_TOKEN
            } else {
                account.master_key.as_str()
            };
            let url = format!("/api/v1{path}?{query}");
            let mut request = app
                .http
                .request(method.clone(), format!("{}{url}", app.url))
                .bearer_auth(token);
            if method != Method::GET {
                request = request.body(if case % 7 == 6 {
                    "{\"truncated\": [1, 2".to_string()
                } else {
                    body.clone()
                });
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            assert!(
                status < 500,
                "{method} {url} with {body} answered {status}: {text}"
            );
            let parsed: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{method} {url}: not JSON: {text}"));
            if status >= 400 {
                assert!(
                    parsed["error"]["code"].is_string() && parsed["error"]["message"].is_string(),
                    "{method} {url}: not the envelope: {text}"
                );
            }
            *statuses.entry(status).or_default() += 1;
        }
    }
    println!("statuses: {statuses:?}");
    assert_eq!(
        statuses.values().sum::<usize>(),
        endpoints().len() * CASES_PER_ENDPOINT
    );
    // The generator reaches both the handlers' work and their refusals.
    for expected in [200, 400, 404] {
        assert!(
            statuses.contains_key(&expected),
            "never {expected}: {statuses:?}"
        );
    }
}
