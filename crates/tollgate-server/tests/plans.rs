//! Plans end to end: a free tier running out and a pack extending it, overage rules, periods on
//! the clock, upgrades, subscriptions past due and lapsed, a manual reset, and the `RateLimit`
//! fields agreeing with `GET /billing/allowances` after every call.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{available, expect_error, spawn_app_with, TestApp, ADMIN_TOKEN};
use serde_json::{json, Value};
use tollgate_core::AccountId;
use tollgate_server::config::plans::{RawAllowance, RawPackOffer, RawPlan, RawUnits};

fn plan(name: &str, allowances: Vec<RawAllowance>) -> RawPlan {
    RawPlan {
        name: name.into(),
        grace: "3d".into(),
        allowances,
        ..RawPlan::default()
    }
}

fn allowance(meter: &str, routes: Option<&str>, units: i64, overage: &str) -> RawAllowance {
    RawAllowance {
        name: meter.into(),
        meter: meter.into(),
        routes: routes.map(Into::into),
        units: RawUnits::Count(units),
        overage: overage.into(),
        rollover: None,
        windows: Vec::new(),
    }
}

/// Echo calls (0.001 each) metered by a `free` plan of 3 requests (the default) and a `pro`
/// plan of 10, both `block`.
async fn app_with_plans(overage: &str) -> TestApp {
    let overage = overage.to_string();
    spawn_app_with(move |raw, _| {
        raw.plans = vec![
            plan(
                "free",
                vec![allowance("requests", Some("echo"), 3, &overage)],
            ),
            plan(
                "pro",
                vec![allowance("requests", Some("echo"), 10, &overage)],
            ),
        ];
        raw.billing.default_plan = Some("free".into());
    })
    .await
}

async fn echo(app: &TestApp, key: &str) -> reqwest::Response {
    app.get("/echo/hi").bearer_auth(key).send().await.unwrap()
}

async fn allowances(app: &TestApp, key: &str) -> Value {
    app.get_json("/api/v1/billing/allowances", key).await
}

/// The `RateLimit` field's item for the allowance: (remaining, seconds to reset).
fn quota_standing(response: &reqwest::Response, name: &str) -> Option<(u64, u64)> {
    let field = response.headers().get("ratelimit")?.to_str().ok()?;
    let item = field
        .split(", ")
        .find(|item| item.starts_with(&format!("\"{name}\";")))?;
    let param = |key: &str| {
        item.split(';')
            .find_map(|p| p.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
    };
    Some((param("r")?, param("t")?))
}

/// What the API says the next call may draw from the `requests` meter: packs and allowance.
async fn remaining_by_api(app: &TestApp, key: &str) -> u64 {
    let body = allowances(app, key).await;
    body["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["meter"] == "requests")
        .map(|b| b["remaining"].as_u64().unwrap())
        .sum()
}

/// Units settle in the background after the answer; waits until nothing is held.
async fn settled(app: &TestApp, key: &str) -> Value {
    for _ in 0..1000 {
        let body = allowances(app, key).await;
        if body["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["held"] == 0)
        {
            return body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("units still held: {}", allowances(app, key).await);
}

async fn grant_pack(app: &TestApp, account: &str, id: &str, units: u64) -> reqwest::Response {
    let expires_at = app.clock_now() + chrono::Duration::days(30);
    app.admin_post(
        &format!("/api/v1/accounts/{account}/packs"),
        json!({"id": id, "meter": "requests", "units": units, "routes": "echo", "expires_at": expires_at}),
    )
    .send()
    .await
    .unwrap()
}

trait Now {
    fn clock_now(&self) -> chrono::DateTime<chrono::Utc>;
}

impl Now for TestApp {
    fn clock_now(&self) -> chrono::DateTime<chrono::Utc> {
        use tollgate_core::Clock;
        self.clock.now()
    }
}

#[tokio::test]
async fn a_free_tier_runs_out_a_pack_extends_it_and_the_headers_agree_with_the_api() {
    let app = app_with_plans("block").await;
    let account = app.create_account("free").await;
    let key = &account.master_key;
    let balance = available(&app, key).await;

    for expected_left in [2, 1, 0] {
        let response = echo(&app, key).await;
        assert_eq!(response.status(), 200);
        let policy = response.headers()["ratelimit-policy"].to_str().unwrap();
        assert!(
            policy.contains("\"requests\";q=3;w=") && policy.contains("qu=\"request\""),
            "{policy}"
        );
        let (left, reset) = quota_standing(&response, "requests").unwrap();
        assert_eq!(left, expected_left);
        assert!(reset > 0 && reset <= 31 * 86_400);
        settled(&app, key).await;
        assert_eq!(remaining_by_api(&app, key).await, left);
    }
    // Included calls cost the wallet nothing.
    assert_eq!(available(&app, key).await, balance);

    let refused = echo(&app, key).await;
    assert_eq!(quota_standing(&refused, "requests").map(|s| s.0), Some(0));
    let body = expect_error(refused, 402, "allowance_exhausted").await;
    let details = &body["error"]["details"];
    assert_eq!(details["meter"], "requests");
    assert_eq!(details["window"], "month");
    assert_eq!(
        (
            details["limit"].as_u64(),
            details["used"].as_u64(),
            details["held"].as_u64()
        ),
        (Some(3), Some(3), Some(0))
    );
    let resets_at = details["resets_at"].as_str().unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(resets_at) && message.contains("credit pack"),
        "{message}"
    );
    assert_eq!(
        available(&app, key).await,
        balance,
        "a refusal costs nothing"
    );

    // A pack extends it, and is drawn first; granting the same pack again grants nothing.
    let id = account.id.to_string();
    assert_eq!(grant_pack(&app, &id, "boost", 2).await.status(), 201);
    assert_eq!(grant_pack(&app, &id, "boost", 2).await.status(), 200);
    for expected_left in [1, 0] {
        let response = echo(&app, key).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            quota_standing(&response, "requests").unwrap().0,
            expected_left
        );
        settled(&app, key).await;
        assert_eq!(remaining_by_api(&app, key).await, expected_left);
    }
    expect_error(echo(&app, key).await, 402, "allowance_exhausted").await;
    let body = settled(&app, key).await;
    assert_eq!(body["plan"], "free");
    let buckets = body["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 2);
    assert_eq!(
        (
            buckets[0]["source"].as_str(),
            buckets[0]["name"].as_str(),
            buckets[0]["used"].as_u64()
        ),
        (Some("pack"), Some("boost"), Some(2))
    );
    assert_eq!(
        (
            buckets[1]["source"].as_str(),
            buckets[1]["used"].as_u64(),
            buckets[1]["remaining"].as_u64()
        ),
        (Some("allowance"), Some(3), Some(0))
    );
    assert_eq!(buckets[1]["resets_at"].as_str(), Some(resets_at));
    assert_eq!(available(&app, key).await, balance);
}

#[tokio::test]
async fn a_failed_call_uses_no_units_and_a_new_period_starts_fresh() {
    let app = app_with_plans("block").await;
    let account = app.create_account("free").await;
    let key = &account.master_key;
    for _ in 0..3 {
        let failed = app
            .get("/echo/hi")
            .bearer_auth(key)
            .header("x-mock-status", "503")
            .send()
            .await
            .unwrap();
        assert_eq!(failed.status(), 503);
    }
    assert_eq!(remaining_by_api_settled(&app, key).await, 3);
    for _ in 0..3 {
        assert_eq!(echo(&app, key).await.status(), 200);
    }
    expect_error(echo(&app, key).await, 402, "allowance_exhausted").await;
    // The next calendar month is a new period: its units are granted by its first call.
    app.clock.set(period_end(&app, key).await);
    let response = echo(&app, key).await;
    assert_eq!(response.status(), 200);
    assert_eq!(quota_standing(&response, "requests").unwrap().0, 2);
}

async fn remaining_by_api_settled(app: &TestApp, key: &str) -> u64 {
    settled(app, key).await;
    remaining_by_api(app, key).await
}

#[tokio::test]
async fn wallet_overage_charges_the_route_price_past_the_allowance_and_soft_warns() {
    let app = app_with_plans("wallet").await;
    let account = app.create_account("paying").await;
    let key = &account.master_key;
    let balance = available(&app, key).await;
    for _ in 0..3 {
        assert_eq!(echo(&app, key).await.status(), 200);
    }
    assert_eq!(available(&app, key).await, balance, "included");
    for _ in 0..2 {
        assert_eq!(echo(&app, key).await.status(), 200);
    }
    // Past the allowance each call pays the route's price: 0.001.
    assert_eq!(available(&app, key).await, balance - 2 * 1_000_000);
    common::assert_books_balance(&app, account.id).await;

    let app = app_with_plans("soft").await;
    let account = app.create_account("soft").await;
    let key = &account.master_key;
    let balance = available(&app, key).await;
    for _ in 0..3 {
        let response = echo(&app, key).await;
        assert!(response.headers().get("x-tollgate-warning").is_none());
    }
    let over = echo(&app, key).await;
    assert_eq!(over.status(), 200);
    let warning = over.headers()["x-tollgate-warning"].to_str().unwrap();
    assert!(
        warning.contains("allowance 'requests' used up"),
        "{warning}"
    );
    assert_eq!(
        available(&app, key).await,
        balance,
        "soft overage is not charged"
    );
}

#[tokio::test]
async fn an_upgrade_applies_at_once_keeping_the_periods_usage_and_is_audited() {
    let app = app_with_plans("block").await;
    let account = app.create_account("grows").await;
    let key = &account.master_key;
    for _ in 0..3 {
        assert_eq!(echo(&app, key).await.status(), 200);
    }
    expect_error(echo(&app, key).await, 402, "allowance_exhausted").await;
    let path = format!("/api/v1/accounts/{}/subscription", account.id);
    let response = app
        .http
        .put(format!("{}{path}", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"plan": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = echo(&app, key).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        quota_standing(&response, "requests").unwrap().0,
        6,
        "10 - 3 used - 1"
    );
    // An unknown plan or status is refused, field by field; only the admin may set one.
    let bad = app
        .http
        .put(format!("{}{path}", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"plan": "gold", "status": "sleepy"}))
        .send()
        .await
        .unwrap();
    let body = expect_error(bad, 400, "validation_error").await;
    assert!(body["error"]["field_errors"]["plan"].is_array());
    assert!(body["error"]["field_errors"]["status"].is_array());
    let future = app
        .http
        .put(format!("{}{path}", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"plan": "pro", "started_at": "2999-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    let body = expect_error(future, 400, "validation_error").await;
    assert!(body["error"]["field_errors"]["started_at"].is_array());
    let theirs = app
        .http
        .put(format!("{}{path}", app.url))
        .bearer_auth(key)
        .json(&json!({"plan": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), 403);
    let audit = audit_of(&app, "subscription.set").await;
    assert_eq!(audit.len(), 1);
    assert!(audit[0].to_string().contains("pro"), "{audit:?}");
}

#[tokio::test]
async fn a_subscription_past_due_passes_with_a_warning_until_its_grace_ends() {
    let app = app_with_plans("block").await;
    let account = app.create_account("late").await;
    let key = &account.master_key;
    let set = |status: &'static str| {
        app.http
            .put(format!(
                "{}/api/v1/accounts/{}/subscription",
                app.url, account.id
            ))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"plan": "pro", "status": status}))
            .send()
    };
    assert_eq!(set("past_due").await.unwrap().status(), 200);
    let response = echo(&app, key).await;
    assert_eq!(response.status(), 200);
    let warning = response.headers()["x-tollgate-warning"].to_str().unwrap();
    assert!(warning.starts_with("subscription past_due"), "{warning}");
    // Three days of grace.
    app.clock.advance(chrono::Duration::days(3));
    let body = expect_error(echo(&app, key).await, 402, "subscription_lapsed").await;
    assert_eq!(body["error"]["details"]["status"], "past_due");
    assert!(body["error"]["details"]["since"].is_string());
    // The same refusal in every profile, and in German.
    let problem = app
        .get("/problem/hi")
        .bearer_auth(key)
        .header("accept-language", "de")
        .send()
        .await
        .unwrap();
    assert_eq!(problem.headers()["x-tollgate-error"], "subscription_lapsed");
    assert_eq!(problem.headers()["content-language"], "de");
    assert_eq!(problem.status(), 402);
    assert_eq!(set("active").await.unwrap().status(), 200);
    assert_eq!(echo(&app, key).await.status(), 200);
    assert_eq!(set("canceled").await.unwrap().status(), 200);
    expect_error(echo(&app, key).await, 402, "subscription_lapsed").await;
}

#[tokio::test]
async fn a_manual_reset_is_idempotent_audited_and_keeps_the_period() {
    let app = app_with_plans("block").await;
    let account = app.create_account("reset").await;
    let key = &account.master_key;
    for _ in 0..3 {
        assert_eq!(echo(&app, key).await.status(), 200);
    }
    let before = settled(&app, key).await;
    let path = format!("/api/v1/accounts/{}/allowances/requests/reset", account.id);
    let reset = app
        .admin_post(&path, json!({"reference": "ticket-42"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(reset.headers()["x-tollgate-reset"], "applied");
    let bucket: Value = reset.json().await.unwrap();
    assert_eq!(
        (bucket["used"].as_u64(), bucket["remaining"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(bucket["resets_at"], before["buckets"][0]["resets_at"]);
    assert_eq!(echo(&app, key).await.status(), 200);
    // The call's unit is settled as its body ends, after the client has its answer.
    settled(&app, key).await;
    let again = app
        .admin_post(&path, json!({"reference": "ticket-42"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.headers()["x-tollgate-reset"], "already_applied");
    let bucket: Value = again.json().await.unwrap();
    assert_eq!(
        bucket["used"].as_u64(),
        Some(1),
        "the second reset changed nothing"
    );
    let unknown = app
        .admin_post(
            &format!("/api/v1/accounts/{}/allowances/tokens/reset", account.id),
            json!({"reference": "x"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(audit_of(&app, "allowance.reset").await.len(), 1);
}

#[tokio::test]
async fn a_token_allowance_draws_the_worst_case_and_settles_on_the_usage() {
    let app = spawn_app_with(|raw, _| {
        raw.plans = vec![plan(
            "llm",
            vec![allowance("tokens", Some("openai"), 1_000, "block")],
        )];
        raw.billing.default_plan = Some("llm".into());
    })
    .await;
    let account = app.create_account("tokens").await;
    let key = &account.master_key;
    let balance = available(&app, key).await;
    let body = json!({"model": "mock-gpt", "max_tokens": 20, "messages": [{"role": "user", "content": "Hello there"}]});
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let used = answer["usage"]["total_tokens"].as_u64().unwrap();
    let after = settled(&app, key).await;
    assert_eq!(after["buckets"][0]["used"].as_u64(), Some(used));
    assert_eq!(
        available(&app, key).await,
        balance,
        "tokens within the allowance are included"
    );
    // A call whose worst case is more than what is left is refused under `block`.
    let greedy = json!({"model": "mock-gpt", "max_tokens": 5_000, "messages": [{"role": "user", "content": "Hi"}]});
    let refused = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .json(&greedy)
        .send()
        .await
        .unwrap();
    // The OpenAI profile carries no details: the message says it.
    let body = expect_error(refused, 402, "allowance_exhausted").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("1000 tokens"), "{message}");
}

async fn audit_of(app: &TestApp, action: &str) -> Vec<Value> {
    let log = app.get_json("/api/v1/audit?limit=500", ADMIN_TOKEN).await;
    log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["action"] == action)
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_daily_window_resets_on_its_own_and_a_new_month_takes_over_unused_units() {
    use tollgate_server::config::plans::RawWindow;
    let app = spawn_app_with(|raw, _| {
        let mut calls = allowance("requests", Some("echo"), 10, "block");
        calls.rollover = Some(RawUnits::Count(4));
        calls.windows = vec![RawWindow {
            every: "day".into(),
            units: RawUnits::Count(3),
        }];
        raw.plans = vec![plan("daily", vec![calls])];
        raw.billing.default_plan = Some("daily".into());
    })
    .await;
    // The 1st of a month, 10:00 UTC.
    use chrono::{Datelike, TimeZone};
    let now = app.clock_now();
    let first = chrono::Utc
        .with_ymd_and_hms(now.year() + 1, 1, 1, 10, 0, 0)
        .unwrap();
    app.clock.set(first);
    let account = app.create_account("daily").await;
    let key = &account.master_key;
    for _ in 0..3 {
        let response = echo(&app, key).await;
        assert_eq!(response.status(), 200);
        let policy = response.headers()["ratelimit-policy"].to_str().unwrap();
        assert!(
            policy.contains("\"requests/day\";q=3;w=86400;qu=\"request\""),
            "{policy}"
        );
    }
    let refused = echo(&app, key).await;
    assert_eq!(
        quota_standing(&refused, "requests/day").map(|s| s.0),
        Some(0)
    );
    assert_eq!(
        quota_standing(&refused, "requests").map(|s| s.0),
        Some(7),
        "the month has 7 left"
    );
    let body = expect_error(refused, 402, "allowance_exhausted").await;
    let details = &body["error"]["details"];
    assert_eq!(details["window"], "day");
    assert_eq!(details["limit"], 3);
    assert_eq!(
        details["resets_at"],
        "2027-01-02T00:00:00Z".replace("2027", &first.year().to_string())
    );

    // A reset of the day's window, once per reference; the month keeps counting.
    let path = format!("/api/v1/accounts/{}/allowances/requests/reset", account.id);
    let reset = app
        .admin_post(&path, json!({"reference": "day-1", "window": "day"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    let bucket: Value = reset.json().await.unwrap();
    assert_eq!(
        (bucket["name"].as_str(), bucket["used"].as_u64()),
        (Some("requests/day"), Some(0))
    );
    assert_eq!(echo(&app, key).await.status(), 200);
    // The next day resets on its own.
    app.clock.advance(chrono::Duration::days(1));
    for _ in 0..2 {
        assert_eq!(echo(&app, key).await.status(), 200);
    }
    let month = settled(&app, key).await;
    let used_of = |body: &Value, name: &str| {
        body["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .map(|b| (b["granted"].as_u64().unwrap(), b["used"].as_u64().unwrap()))
            .unwrap()
    };
    assert_eq!(used_of(&month, "requests"), (10, 6));
    assert_eq!(used_of(&month, "requests/day"), (3, 2));

    // February takes over at most 4 of January's 4 unused units.
    app.clock.set(
        chrono::Utc
            .with_ymd_and_hms(first.year(), 2, 1, 0, 0, 0)
            .unwrap(),
    );
    assert_eq!(echo(&app, key).await.status(), 200);
    let february = settled(&app, key).await;
    assert_eq!(used_of(&february, "requests"), (14, 1));
}

/// What a customer holding only its own keys can try on plans: read another account's
/// allowances, grant itself a pack, reset its allowance, change its plan. Each is refused and
/// changes nothing.
#[tokio::test]
async fn a_customer_cannot_read_anothers_allowances_nor_grant_reset_or_change_its_own() {
    let app = app_with_plans("block").await;
    let mallory = app.create_account("mallory").await;
    let victim = app.create_account("victim").await;
    let key = &mallory.master_key;
    let theirs = app
        .get_as(
            &format!("/api/v1/billing/allowances?account_id={}", victim.id),
            key,
        )
        .await;
    expect_error(theirs, 404, "not_found").await;
    let expires_at = app.clock_now() + chrono::Duration::days(1);
    let attempts = [
        (
            format!("/api/v1/accounts/{}/packs", mallory.id),
            json!({"meter": "requests", "units": 1000, "expires_at": expires_at}),
        ),
        (
            format!("/api/v1/accounts/{}/allowances/requests/reset", mallory.id),
            json!({"reference": "mine"}),
        ),
    ];
    for (path, body) in attempts {
        let response = app
            .post(&path)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(response, 403, "forbidden").await;
    }
    let upgrade = app
        .http
        .put(format!(
            "{}/api/v1/accounts/{}/subscription",
            app.url, mallory.id
        ))
        .bearer_auth(key)
        .json(&json!({"plan": "pro"}))
        .send()
        .await
        .unwrap();
    expect_error(upgrade, 403, "forbidden").await;
    let mine = allowances(&app, key).await;
    assert_eq!(mine["plan"], "free");
    assert_eq!(
        mine["buckets"].as_array().unwrap().len(),
        1,
        "no pack: {mine}"
    );
}

async fn subscribe(app: &TestApp, account: AccountId, body: Value) {
    let response = app
        .http
        .put(format!(
            "{}/api/v1/accounts/{account}/subscription",
            app.url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

/// The account's `fee` transfers: (amount in nanos, reference).
async fn fees(app: &TestApp, key: &str) -> Vec<(i64, String)> {
    let ledger = app.get_json("/api/v1/ledger?limit=100", key).await;
    ledger["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "fee")
        .map(|t| {
            (
                t["amount"]["nanos"].as_i64().unwrap(),
                t["reference"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Plans `pro` (2 credits a month) and `max` (3), 50 echo calls each; `free` is the default.
async fn app_with_prices() -> TestApp {
    spawn_app_with(|raw, _| {
        let priced = |name: &str, price: &str| RawPlan {
            price: Some(price.into()),
            ..plan(name, vec![allowance("requests", Some("echo"), 50, "block")])
        };
        raw.plans = vec![
            plan(
                "free",
                vec![allowance("requests", Some("echo"), 3, "block")],
            ),
            priced("pro", "2"),
            priced("max", "3"),
            priced("gold", "10"),
        ];
        raw.billing.default_plan = Some("free".into());
    })
    .await
}

#[tokio::test]
async fn a_priced_plan_pays_its_fee_once_per_period_at_its_first_call_and_an_upgrade_the_difference(
) {
    let app = app_with_prices().await;
    let account = app.create_account("subscriber").await;
    let key = account.master_key.clone();
    // A trial pays nothing.
    subscribe(
        &app,
        account.id,
        json!({"plan": "pro", "status": "trialing"}),
    )
    .await;
    assert_eq!(echo(&app, &key).await.status(), 200);
    assert_eq!(available(&app, &key).await, 5_000_000_000);
    // Active: the period's first calls, side by side, pay the fee once.
    subscribe(&app, account.id, json!({"plan": "pro", "status": "active"})).await;
    let calls = (0..20).map(|_| echo(&app, &key));
    for response in futures_util::future::join_all(calls).await {
        assert_eq!(response.status(), 200);
    }
    assert_eq!(available(&app, &key).await, 3_000_000_000, "5 - 2, once");
    let paid = fees(&app, &key).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert_eq!(paid[0].0, 2_000_000_000);
    assert!(paid[0].1.starts_with("plan:") && paid[0].1.ends_with(":pro"));

    // A restarted node knows nothing of it but the store: still paid.
    let app = app.restart().await;
    assert_eq!(echo(&app, &key).await.status(), 200);
    assert_eq!(available(&app, &key).await, 3_000_000_000);

    // An upgrade pays the difference at once; a downgrade gets nothing back.
    subscribe(&app, account.id, json!({"plan": "max"})).await;
    assert_eq!(echo(&app, &key).await.status(), 200);
    assert_eq!(available(&app, &key).await, 2_000_000_000, "3 - 2 paid");
    subscribe(&app, account.id, json!({"plan": "pro"})).await;
    assert_eq!(echo(&app, &key).await.status(), 200);
    assert_eq!(available(&app, &key).await, 2_000_000_000);

    // The next month pays again, at its first call.
    app.clock.set(period_end(&app, &key).await);
    assert_eq!(echo(&app, &key).await.status(), 200);
    assert_eq!(available(&app, &key).await, 0);
    assert_eq!(fees(&app, &key).await.len(), 3);
    common::assert_books_balance(&app, account.id).await;
}

#[tokio::test]
async fn a_wallet_short_of_the_fee_refuses_the_call_and_grants_nothing_until_it_is_topped_up() {
    let app = app_with_prices().await;
    let account = app.create_account("short").await;
    let key = account.master_key.clone();
    subscribe(&app, account.id, json!({"plan": "gold"})).await;
    let refused = echo(&app, &key).await;
    let body = expect_error(refused, 402, "insufficient_balance").await;
    let details = &body["error"]["details"];
    assert_eq!(details["plan"], "gold");
    assert_eq!(details["required"]["credits"], "10");
    assert_eq!(details["balance"]["credits"], "5");
    assert!(details["period_start"].is_string(), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("'gold' plan's fee"), "{message}");
    // Nothing was taken, and no unit of the unpaid period was granted or used.
    assert_eq!(available(&app, &key).await, 5_000_000_000);
    assert!(fees(&app, &key).await.is_empty());
    let buckets = allowances(&app, &key).await;
    assert!(
        buckets["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["used"] == 0 && b["held"] == 0),
        "{buckets}"
    );
    let response = app
        .admin_post(
            &format!("/api/v1/accounts/{}/credits", account.id),
            json!({"amount": "6", "reason": "top-up"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(echo(&app, &key).await.status(), 200);
    assert_eq!(available(&app, &key).await, 1_000_000_000);
    common::assert_books_balance(&app, account.id).await;
}

/// `pro` takes 25 % off echo calls and allows 2 calls at once per key (the configured `per-key`
/// allows 1000).
#[tokio::test]
async fn a_plans_discount_lowers_hold_and_charge_and_its_rate_limit_replaces_the_configured_one() {
    let app = spawn_app_with(|raw, _| {
        raw.plans = vec![RawPlan {
            discounts: [("echo".to_string(), 25)].into(),
            rate_limits: [(
                "per-key".to_string(),
                tollgate_core::ratelimit::LimitOverride {
                    limit: 2,
                    window_seconds: Some(3600),
                    burst: Some(1),
                },
            )]
            .into(),
            ..plan("pro", Vec::new())
        }];
    })
    .await;
    let account = app.create_account("discounted").await;
    // Calls with a usage key; reads by the admin, which no key's limit counts.
    let (key, key_id) = app.create_usage_key(&account.master_key, json!({})).await;

    // Before the plan: the route's price, and the configured limit.
    let response = echo(&app, &key).await;
    assert_eq!(response.status(), 200);
    let policy = response.headers()["ratelimit-policy"].to_str().unwrap();
    assert!(policy.contains("\"per-key\";q=6000"), "{policy}");
    assert_eq!(
        balance_by_admin(&app, account.id).await,
        5_000_000_000 - 1_000_000
    );

    subscribe(&app, account.id, json!({"plan": "pro"})).await;
    let response = echo(&app, &key).await;
    assert_eq!(response.status(), 200);
    let policy = response.headers()["ratelimit-policy"].to_str().unwrap();
    assert!(policy.contains("\"per-key\";q=2;w=3600"), "{policy}");
    let request_id = common::request_id(&response);
    response.text().await.unwrap();
    assert_eq!(
        balance_by_admin(&app, account.id).await,
        5_000_000_000 - 1_000_000 - 750_000,
        "0.001 less 25 %"
    );
    let row = common::usage_of(&app, ADMIN_TOKEN, &request_id).await;
    assert_eq!(row["cost"]["nanos"], 750_000, "{row}");
    assert_eq!(row["hold"]["nanos"], 750_000, "{row}");
    assert_eq!(
        row["uncovered"]["nanos"], 0,
        "the discounted cost fits its hold: {row}"
    );
    // The plan's burst: one more call now, then 429 until the window moves.
    assert_eq!(echo(&app, &key).await.status(), 200);
    expect_error(echo(&app, &key).await, 429, "rate_limited").await;
    // The key's own numbers still win over its plan's.
    let patched = app
        .patch_key(
            ADMIN_TOKEN,
            key_id,
            json!({"rate_limits": {"per-key": {"limit": 100, "burst": 100}}}),
        )
        .await;
    assert_eq!(patched.status(), 200);
    let response = echo(&app, &key).await;
    assert_eq!(response.status(), 200);
    response.text().await.unwrap();
    common::assert_books_balance(&app, account.id).await;
}

async fn balance_by_admin(app: &TestApp, account: AccountId) -> i64 {
    let path = format!("/api/v1/billing/balance?account_id={account}");
    app.get_json(&path, ADMIN_TOKEN).await["available"]["nanos"]
        .as_i64()
        .unwrap()
}

/// When the first bucket's period ends: the next period's first instant.
async fn period_end(app: &TestApp, key: &str) -> chrono::DateTime<chrono::Utc> {
    let body = allowances(app, key).await;
    body["buckets"][0]["resets_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// `free` gives 3 echo calls a month; `calls-10` sells 10 more for 0.5, `calls-1000` 1000 for 100.
async fn app_with_packs() -> TestApp {
    spawn_app_with(|raw, _| {
        raw.plans = vec![plan(
            "free",
            vec![allowance("requests", Some("echo"), 3, "block")],
        )];
        raw.billing.default_plan = Some("free".into());
        let pack = |name: &str, units: i64, price: &str| RawPackOffer {
            name: name.into(),
            meter: "requests".into(),
            routes: Some("echo".into()),
            units: RawUnits::Count(units),
            price: price.into(),
            valid_for: "30d".into(),
        };
        raw.packs = vec![pack("calls-10", 10, "0.5"), pack("calls-1000", 1000, "100")];
    })
    .await
}

async fn buy(app: &TestApp, key: &str, pack: &str, body: Value) -> reqwest::Response {
    app.post(&format!("/api/v1/billing/packs/{pack}/buy"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_customer_buys_a_pack_from_its_wallet_once_per_id_and_calls_on_it() {
    let app = app_with_packs().await;
    let account = app.create_account("buyer").await;
    let key = account.master_key.clone();
    let offers = app.get_json("/api/v1/billing/packs", &key).await;
    assert_eq!(offers[0]["name"], "calls-10");
    assert_eq!(offers[0]["price"]["credits"], "0.5");
    assert_eq!(offers[0]["valid_for_seconds"], 30 * 86_400);
    for _ in 0..3 {
        assert_eq!(echo(&app, &key).await.status(), 200);
    }
    expect_error(echo(&app, &key).await, 402, "allowance_exhausted").await;

    // Ten tries at once with one id: one purchase, one charge.
    let tries = (0..10).map(|_| buy(&app, &key, "calls-10", json!({"id": "order-1"})));
    let answers = futures_util::future::join_all(tries).await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 200, 200, 201]);
    let pack: Value = buy(&app, &key, "calls-10", json!({"id": "order-1"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(pack["name"], "buy.order-1");
    assert_eq!(pack["granted"], 10);
    assert_eq!(available(&app, &key).await, 4_500_000_000, "5 - 0.5, once");
    assert_eq!(audit_of(&app, "pack.bought").await.len(), 1);
    let response = echo(&app, &key).await;
    assert_eq!(response.status(), 200);
    assert_eq!(quota_standing(&response, "requests").unwrap().0, 9);

    // What a customer cannot do: buy more than its wallet holds, with a usage key, for
    // another account, an unknown pack, or an id that is not one.
    let body = expect_error(
        buy(&app, &key, "calls-1000", json!({"id": "big"})).await,
        402,
        "insufficient_balance",
    )
    .await;
    assert_eq!(body["error"]["details"]["pack"], "calls-1000");
    assert_eq!(body["error"]["details"]["balance"]["credits"], "4.5");
    let (usage_key, _) = app.create_usage_key(&key, json!({})).await;
    expect_error(
        buy(&app, &usage_key, "calls-10", json!({"id": "u"})).await,
        403,
        "forbidden",
    )
    .await;
    let other = app.create_account("other").await;
    let for_other = json!({"id": "gift", "account_id": other.id.to_string()});
    expect_error(
        buy(&app, &key, "calls-10", for_other).await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        buy(&app, &key, "calls-none", json!({"id": "x"})).await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        buy(&app, &key, "calls-10", json!({"id": "no spaces"})).await,
        400,
        "validation_error",
    )
    .await;
    assert_eq!(available(&app, &key).await, 4_500_000_000);
    common::assert_books_balance(&app, account.id).await;
}
