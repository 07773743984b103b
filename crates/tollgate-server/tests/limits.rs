//! Rate limits end to end: headers on every response, exact GCRA admission under concurrent
//! load on a paused clock, all-or-nothing across policies, token reservations corrected to the
//! actual usage, the anonymous per-address brake, and nothing charged for a refused call.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{expect_error, spawn_app_real_time, spawn_app_with, TestApp, ADMIN_TOKEN};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate_core::ratelimit::{Scope, Unit};
use tollgate_server::config::RawPolicy;

fn policy(name: &str, scope: Scope, unit: Unit, limit: u64, window: &str, burst: u64) -> RawPolicy {
    RawPolicy {
        name: name.into(),
        scope,
        unit,
        limit,
        window: window.into(),
        burst,
        on_limiter_failure: Default::default(),
    }
}

async fn app_with(policies: Vec<RawPolicy>) -> TestApp {
    spawn_app_with(|raw, _| raw.rate_limits = Some(policies)).await
}

/// The `RateLimit` header as policy → (remaining, seconds to full).
fn ratelimit(response: &reqwest::Response) -> BTreeMap<String, (u64, u64)> {
    let value = response.headers()["ratelimit"].to_str().unwrap();
    value
        .split(", ")
        .map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap().trim_matches('"').to_string();
            let field = |key: &str| {
                parts
                    .clone()
                    .find_map(|p| p.strip_prefix(key))
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            let (r, t) = (field("r="), field("t="));
            (name, (r, t))
        })
        .collect()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers()[name].to_str().unwrap().to_string()
}

#[tokio::test]
async fn every_response_carries_the_limit_headers_401_and_404_included() {
    let app = app_with(vec![
        policy("anon", Scope::Ip, Unit::Requests, 100, "1m", 9),
        policy("per-key", Scope::Key, Unit::Requests, 60, "1m", 4),
    ])
    .await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let unix_now = chrono::Utc::now().timestamp() as u64;

    let ok = app.get_as("/echo/x", key).await;
    assert_eq!(ok.status(), 200);
    // The limit is what per-key admits at once (burst 4 + 1); remaining counts down from it.
    assert_eq!(header(&ok, "x-ratelimit-limit"), "5");
    assert_eq!(header(&ok, "x-ratelimit-remaining"), "4");
    let reset: u64 = header(&ok, "x-ratelimit-reset").parse().unwrap();
    assert!(reset >= unix_now && reset <= unix_now + 5, "{reset}");
    assert_eq!(header(&ok, "ratelimit-policy"), "\"per-key\";q=60;w=60");
    assert_eq!(ratelimit(&ok)["per-key"], (4, 1));

    // A management call counts against the same key policy.
    let listed = app.get_as("/api/v1/keys", key).await;
    assert_eq!(ratelimit(&listed)["per-key"].0, 3);
    // An error after authentication shows the caller's standing without consuming.
    let forbidden = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .json(&json!({"model": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 404);
    assert_eq!(ratelimit(&forbidden)["per-key"].0, 3);

    // No key, a bad key, an unknown path: the anonymous policy.
    for response in [
        app.get("/echo/x").send().await.unwrap(),
        app.get_as("/echo/x", "tg_live_nonsense").await,
        app.get("/nowhere").send().await.unwrap(),
    ] {
        assert!(matches!(response.status().as_u16(), 401 | 404));
        assert_eq!(header(&response, "x-ratelimit-limit"), "10");
        assert!(ratelimit(&response).contains_key("anon"));
    }
    // Health checks are never limited nor counted, nor are the console's static files: a
    // page loads several, and twenty of them leave the address's standing as it was.
    let health = app.get("/healthz").send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.headers().get("x-ratelimit-limit").is_none());
    let before = ratelimit(&app.get("/nowhere").send().await.unwrap())["anon"].0;
    for _ in 0..20 {
        let asset = app.get("/console/assets/console.css").send().await.unwrap();
        assert_eq!(asset.status(), 200);
        assert!(asset.headers().get("x-ratelimit-limit").is_none());
    }
    let after = ratelimit(&app.get("/nowhere").send().await.unwrap())["anon"].0;
    assert_eq!(after + 1, before, "only the second /nowhere counted");
    // The operator is not rate-limited.
    let admin = app.get_as("/api/v1/keys", ADMIN_TOKEN).await;
    assert_eq!(admin.status(), 200);
    assert!(admin.headers().get("x-ratelimit-limit").is_none());
}

#[tokio::test]
async fn ten_concurrent_clients_get_exactly_what_the_gcra_allows_then_a_retry_after_that_works() {
    // 60 a minute with burst 9: ten at once, then one a second.
    let app = app_with(vec![policy(
        "key-rpm",
        Scope::Key,
        Unit::Requests,
        60,
        "1m",
        9,
    )])
    .await;
    let account = app.create_account("acme").await;
    let (key, _) = app.create_usage_key(&account.master_key, json!({})).await;
    let mut admitted = 0;
    let mut retry_after = Vec::new();
    // Three rounds on a paused clock, 2.5 s apart: 10, then 2, then 3 (the half second carries).
    for round in 0..3 {
        if round > 0 {
            app.clock.advance(chrono::Duration::milliseconds(2_500));
        }
        let calls = (0..10).map(|_| {
            let request = app.get("/echo/x").bearer_auth(&key);
            async move {
                let mut statuses = Vec::new();
                for _ in 0..5 {
                    let response = request.try_clone().unwrap().send().await.unwrap();
                    let retry = response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    statuses.push((response.status().as_u16(), retry));
                }
                statuses
            }
        });
        for statuses in futures_util::future::join_all(calls).await {
            for (status, retry) in statuses {
                match status {
                    200 => admitted += 1,
                    429 => retry_after.push(retry.unwrap()),
                    other => panic!("unexpected {other}"),
                }
            }
        }
    }
    assert_eq!(admitted, 10 + 2 + 3);
    assert_eq!(retry_after.len(), 150 - 15);
    assert!(retry_after.iter().all(|r| r == "1"), "{retry_after:?}");
    // Honouring Retry-After succeeds.
    let refused = app.get_as("/echo/x", &key).await;
    let body = expect_error(refused, 429, "rate_limited").await;
    assert_eq!(body["error"]["details"]["policy"], "key-rpm");
    app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(app.get_as("/echo/x", &key).await.status(), 200);
}

#[tokio::test]
async fn a_key_policy_refusal_leaves_the_account_policy_untouched_and_charges_nothing() {
    let app = app_with(vec![
        policy("key-tight", Scope::Key, Unit::Requests, 1, "1m", 0),
        policy(
            "account-roomy",
            Scope::Account,
            Unit::Requests,
            100,
            "1m",
            9,
        ),
    ])
    .await;
    let account = app.create_account("acme").await;
    let (key, _) = app.create_usage_key(&account.master_key, json!({})).await;
    let balance_path = format!("/api/v1/billing/balance?account_id={}", account.id);
    let first = app.get_as("/echo/x", &key).await;
    assert_eq!(first.status(), 200);
    let balance = app.get_json(&balance_path, ADMIN_TOKEN).await;
    // Creating the key and this call: two of the account's ten.
    let left = ratelimit(&first)["account-roomy"].0;
    assert_eq!(left, 8);
    for _ in 0..3 {
        let refused = app.get_as("/echo/x", &key).await;
        assert_eq!(ratelimit(&refused)["account-roomy"].0, left);
        assert_eq!(ratelimit(&refused)["key-tight"].0, 0);
        expect_error(refused, 429, "rate_limited").await;
    }
    // Nothing was charged for the refusals, and each is in the usage log as such.
    let after = app.get_json(&balance_path, ADMIN_TOKEN).await;
    assert_eq!(after["available"], balance["available"]);
    let log = app
        .get_json(
            &format!("/api/v1/requests?account_id={}&status=429", account.id),
            ADMIN_TOKEN,
        )
        .await;
    let rows = log["data"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r["error_code"] == "rate_limited" && r["cost"]["nanos"] == 0));
}

#[tokio::test]
async fn token_policies_reserve_the_estimate_and_get_the_unused_part_back() {
    let app = spawn_app_with(|raw, _| {
        raw.rate_limits = Some(Vec::new());
        raw.routes[0].rate_limits = vec![policy("tpm", Scope::Key, Unit::Tokens, 1_000, "1h", 999)];
    })
    .await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let chat = |max_tokens: u64| {
        app.post("/v1/chat/completions")
            .bearer_auth(key)
            .json(&json!({
                "model": "mock-gpt",
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "hi"}],
            }))
    };
    // The first call reserves about 600 tokens but uses a handful.
    let first = chat(600).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let reserved = ratelimit(&first)["tpm"].0;
    assert!(reserved < 400, "{reserved}");
    first.bytes().await.unwrap();
    // Once corrected, a second call of the same size fits; without the correction it could not.
    let mut remaining = 0;
    for _ in 0..100 {
        let peek = app.get_as("/v1/models", key).await;
        remaining = ratelimit(&peek)["tpm"].0;
        if remaining > 900 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(remaining > 900, "{remaining}");
    assert_eq!(chat(600).send().await.unwrap().status(), 200);
    // A call that could never fit is refused, saying so.
    let body = expect_error(chat(5_000).send().await.unwrap(), 429, "rate_limited").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("more than the rate limit 'tpm' ever allows"),
        "{message}"
    );
}

#[tokio::test]
async fn an_address_over_its_anonymous_limit_is_refused_before_any_work_unless_it_shows_a_key() {
    let app = app_with(vec![policy("anon", Scope::Ip, Unit::Requests, 3, "1m", 2)]).await;
    let account = app.create_account("acme").await;
    for _ in 0..3 {
        expect_error(
            app.get("/echo/x").send().await.unwrap(),
            401,
            "invalid_api_key",
        )
        .await;
    }
    let lookups = app.store.lookups();
    for refused in [
        app.get("/echo/x").send().await.unwrap(),
        app.get_as("/echo/x", "tg_live_malformed").await,
    ] {
        let body = expect_error(refused, 429, "rate_limited").await;
        assert_eq!(body["error"]["details"]["policy"], "anon");
    }
    assert_eq!(
        app.store.lookups(),
        lookups,
        "a refused address costs no lookup"
    );
    // A valid key is judged by its own policies (here, none), not by its address's count.
    assert_eq!(
        app.get_as("/echo/x", &account.master_key).await.status(),
        200
    );
    app.clock.advance(chrono::Duration::seconds(20));
    expect_error(
        app.get("/echo/x").send().await.unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
}

#[tokio::test]
async fn route_policies_share_the_route_among_all_keys() {
    let app = spawn_app_with(|raw, _| {
        raw.rate_limits = Some(Vec::new());
        raw.routes[2].rate_limits = vec![policy(
            "echo-upstream",
            Scope::Route,
            Unit::Requests,
            2,
            "1h",
            1,
        )];
    })
    .await;
    let a = app.create_account("a").await;
    let b = app.create_account("b").await;
    assert_eq!(app.get_as("/echo/x", &a.master_key).await.status(), 200);
    assert_eq!(app.get_as("/echo/x", &b.master_key).await.status(), 200);
    expect_error(
        app.get_as("/echo/x", &a.master_key).await,
        429,
        "rate_limited",
    )
    .await;
    // Other routes are not affected.
    let other = app.get_as("/problem/x", &b.master_key).await;
    assert_eq!(other.status(), 200);
}

#[tokio::test]
async fn the_operator_overrides_limits_per_key_and_per_account_and_the_next_request_obeys() {
    let app = app_with(vec![
        policy("per-key", Scope::Key, Unit::Requests, 60, "1m", 9),
        policy("per-account", Scope::Account, Unit::Requests, 600, "1m", 99),
    ])
    .await;
    let account = app.create_account("acme").await;
    let (tight, tight_id) = app.create_usage_key(&account.master_key, json!({})).await;
    let (other, _) = app.create_usage_key(&account.master_key, json!({})).await;
    // Cache both keys before the changes: the changes must reach the cache.
    for key in [&tight, &other] {
        assert_eq!(app.get_as("/echo/x", key).await.status(), 200);
    }

    // A key's own numbers: one request a minute, no burst.
    let patched = app
        .patch_key(
            ADMIN_TOKEN,
            tight_id,
            json!({"rate_limits": {"per-key": {"limit": 1, "burst": 0}}}),
        )
        .await;
    assert_eq!(patched.status(), 200);
    let body: serde_json::Value = patched.json().await.unwrap();
    assert_eq!(
        body["rate_limits"],
        json!({"per-key": {"limit": 1, "burst": 0}})
    );
    let first = app.get_as("/echo/x", &tight).await;
    assert_eq!(first.status(), 200);
    assert!(header(&first, "ratelimit-policy").contains("\"per-key\";q=1;w=60"));
    let refused = expect_error(app.get_as("/echo/x", &tight).await, 429, "rate_limited").await;
    assert_eq!(refused["error"]["details"]["policy"], "per-key");
    assert_eq!(refused["error"]["details"]["limit"], 1);
    // The account's other key keeps the configured numbers.
    let sibling = app.get_as("/echo/x", &other).await;
    assert_eq!(ratelimit(&sibling)["per-key"].0, 8);

    // An account's numbers: its own policy, and the per-key policy of every key that has none.
    let response = app
        .patch(&format!("/api/v1/accounts/{}", account.id))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"rate_limits": {
            "per-account": {"limit": 6000, "burst": 999},
            "per-key": {"limit": 120, "window_seconds": 120, "burst": 2}
        }}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["rate_limits"]["per-account"]["limit"], 6000);
    let sibling = app.get_as("/echo/x", &other).await;
    let policies = header(&sibling, "ratelimit-policy");
    assert!(policies.contains("\"per-key\";q=120;w=120"), "{policies}");
    assert!(
        policies.contains("\"per-account\";q=6000;w=60"),
        "{policies}"
    );
    // Changed numbers start afresh: burst 2 allows three at once.
    assert_eq!(ratelimit(&sibling)["per-key"].0, 2);
    // The key's own override still wins over the account's.
    expect_error(app.get_as("/echo/x", &tight).await, 429, "rate_limited").await;

    // `null` clears: the tight key is back on the account's numbers.
    let cleared = app
        .patch_key(ADMIN_TOKEN, tight_id, json!({"rate_limits": null}))
        .await;
    assert_eq!(cleared.status(), 200);
    let response = app.get_as("/echo/x", &tight).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "ratelimit-policy").contains("\"per-key\";q=120;w=120"));
}

#[tokio::test]
async fn overrides_are_checked_and_only_the_operator_may_set_them() {
    let app = spawn_app_with(|raw, _| {
        raw.rate_limits = Some(vec![
            policy("anon", Scope::Ip, Unit::Requests, 100, "1m", 0),
            policy("per-key", Scope::Key, Unit::Requests, 60, "1m", 10),
            policy("per-account", Scope::Account, Unit::Requests, 600, "1m", 10),
        ]);
        raw.routes[2].rate_limits = vec![policy(
            "echo-all",
            Scope::Route,
            Unit::Requests,
            10,
            "1s",
            0,
        )];
    })
    .await;
    let account = app.create_account("acme").await;
    let (_, key_id) = app.create_usage_key(&account.master_key, json!({})).await;

    // A master key may change its keys, but not their rate limits.
    let by_customer = app
        .patch_key(
            &account.master_key,
            key_id,
            json!({"rate_limits": {"per-key": {"limit": 100000}}}),
        )
        .await;
    let body = expect_error(by_customer, 403, "forbidden").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("operator"));

    let bad_key = app
        .patch_key(
            ADMIN_TOKEN,
            key_id,
            json!({"rate_limits": {
                "nope": {"limit": 1},
                "per-account": {"limit": 1},
                "anon": {"limit": 1},
                "echo-all": {"limit": 1},
                "per-key": {"limit": 0, "window_seconds": 0}
            }}),
        )
        .await;
    let body = expect_error(bad_key, 400, "validation_error").await;
    let fields = &body["error"]["field_errors"];
    assert_eq!(
        fields["rate_limits.nope"][0],
        "is not a configured rate-limit policy"
    );
    for (name, scope) in [
        ("per-account", "account"),
        ("anon", "ip"),
        ("echo-all", "route"),
    ] {
        assert_eq!(
            fields[format!("rate_limits.{name}")][0],
            format!("has scope '{scope}'; only key or key+route policies can be overridden here")
        );
    }
    assert_eq!(
        fields["rate_limits.per-key"],
        json!([
            "limit must be at least 1",
            "window_seconds must be at least 1"
        ])
    );

    // An account may override its own and its keys' policies, not a route's or an address's.
    let bad_account = app
        .patch(&format!("/api/v1/accounts/{}", account.id))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"rate_limits": {"echo-all": {"limit": 1}, "per-account": {"limit": 1}}}))
        .send()
        .await
        .unwrap();
    let body = expect_error(bad_account, 400, "validation_error").await;
    let fields = body["error"]["field_errors"].as_object().unwrap();
    assert_eq!(fields.keys().collect::<Vec<_>>(), ["rate_limits.echo-all"]);

    // A malformed override is a validation error, not a 500.
    let malformed = app
        .patch_key(
            ADMIN_TOKEN,
            key_id,
            json!({"rate_limits": {"per-key": {"limit": "many", "extra": 1}}}),
        )
        .await;
    expect_error(malformed, 400, "validation_error").await;
    // Nothing changed.
    let key = app
        .get_json(&format!("/api/v1/keys/{key_id}"), ADMIN_TOKEN)
        .await;
    assert_eq!(key["rate_limits"], json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_real_clock_thirty_clients_at_three_times_the_limit_get_what_gcra_allows() {
    // 50 a second with burst 10, offered 150 a second by 30 paced clients for two seconds.
    const LIMIT: u64 = 50;
    const BURST: u64 = 10;
    let app = spawn_app_real_time(|raw, _| {
        raw.rate_limits = Some(vec![policy(
            "per-key",
            Scope::Key,
            Unit::Requests,
            LIMIT,
            "1s",
            BURST,
        )]);
    })
    .await;
    let account = app.create_account("acme").await;
    let (key, _) = app.create_usage_key(&account.master_key, json!({})).await;
    let app = std::sync::Arc::new(app);
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..30)
        .map(|client| {
            let (app, key) = (app.clone(), key.clone());
            tokio::spawn(async move {
                // Spread the clients over the first 200 ms, then one call each every 200 ms.
                tokio::time::sleep(Duration::from_millis(client * 7)).await;
                let mut ticks = tokio::time::interval(Duration::from_millis(200));
                let (mut admitted, mut refused) = (0u64, 0u64);
                for _ in 0..10 {
                    ticks.tick().await;
                    match app.get_as("/echo/x", &key).await.status().as_u16() {
                        200 => admitted += 1,
                        429 => refused += 1,
                        other => panic!("unexpected status {other}"),
                    }
                }
                (admitted, refused)
            })
        })
        .collect();
    let (mut admitted, mut refused) = (0, 0);
    for client in clients {
        let (a, r) = client.await.unwrap();
        admitted += a;
        refused += r;
    }
    let elapsed = started.elapsed();
    // GCRA's bound over any interval of length t: burst + 1 + limit × t / window.
    let most = BURST + 1 + (LIMIT as f64 * elapsed.as_secs_f64()).ceil() as u64;
    println!("admitted {admitted}, refused {refused}, in {elapsed:?}, bound {most}");
    assert_eq!(admitted + refused, 300);
    assert!(admitted <= most, "admitted {admitted} > bound {most}");
    // Offered three times the pace, the limiter leaves little of its allowance unused.
    assert!(
        admitted * 10 >= most * 8,
        "admitted only {admitted} of {most}"
    );
}

/// An app whose shared limiter's Redis refuses every connection (nothing listens on port 1).
async fn app_with_dead_redis(policies: Vec<RawPolicy>) -> TestApp {
    spawn_app_with(|raw, _| {
        raw.rate_limits = Some(policies);
        raw.redis.url = Some("redis://127.0.0.1:1".into());
    })
    .await
}

async fn limiter_failures(app: &TestApp, outcome: &str) -> u64 {
    let scrape = app
        .get_as("/metrics", ADMIN_TOKEN)
        .await
        .text()
        .await
        .unwrap();
    let line = format!("tollgate_rate_limiter_failures_total{{outcome=\"{outcome}\"}} ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn with_redis_down_a_fail_open_policy_admits_and_counts_it() {
    let app = app_with_dead_redis(vec![policy(
        "per-key",
        Scope::Key,
        Unit::Requests,
        1,
        "1h",
        0,
    )])
    .await;
    let account = app.create_account("acme").await;
    // The policy allows one call an hour; undecided, all three pass.
    for _ in 0..3 {
        let response = app.get_as("/echo/x", &account.master_key).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("x-ratelimit-limit").is_none());
    }
    assert_eq!(limiter_failures(&app, "admitted").await, 3);
    assert_eq!(limiter_failures(&app, "refused").await, 0);
}

#[tokio::test]
async fn with_redis_down_a_fail_closed_policy_refuses_with_503_and_charges_nothing() {
    let mut closed = policy("per-key", Scope::Key, Unit::Requests, 100, "1m", 9);
    closed.on_limiter_failure = tollgate_core::ratelimit::FailureMode::Closed;
    let open = policy("per-account", Scope::Account, Unit::Requests, 100, "1m", 9);
    let app = app_with_dead_redis(vec![open, closed]).await;
    let account = app.create_account("acme").await;
    // The operator is exempt from rate limits, so it can read the wallet meanwhile.
    let wallet = format!("/api/v1/billing/balance?account_id={}", account.id);
    let before = app.get_json(&wallet, ADMIN_TOKEN).await;
    let refused = app.get_as("/echo/x", &account.master_key).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body = expect_error(refused, 503, "service_unavailable").await;
    assert_eq!(body["error"]["details"]["dependency"], "rate_limiter");
    assert_eq!(body["error"]["details"]["policy"], "per-key");
    let after = app.get_json(&wallet, ADMIN_TOKEN).await;
    assert_eq!(before["available"], after["available"]);
    assert_eq!(after["held"]["nanos"], 0);
    assert!(limiter_failures(&app, "refused").await >= 1);
}

#[tokio::test]
async fn with_redis_down_a_node_whose_policies_fail_open_is_ready_but_degraded() {
    let open = policy("per-key", Scope::Key, Unit::Requests, 100, "1m", 9);
    let app = app_with_dead_redis(vec![open]).await;
    let ready = app.get("/readyz").send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["checks"]["store"]["status"], "ok");
    assert_eq!(body["checks"]["rate_limiter"]["status"], "unavailable");
    assert_eq!(body["checks"]["rate_limiter"]["backend"], "redis");
    assert!(body["checks"]["rate_limiter"]["error"]
        .as_str()
        .unwrap()
        .contains("Redis"));
}

#[tokio::test]
async fn with_redis_down_a_node_with_a_fail_closed_policy_is_not_ready_and_names_it() {
    let open = policy("per-account", Scope::Account, Unit::Requests, 100, "1m", 9);
    let mut closed = policy("strict", Scope::Key, Unit::Requests, 100, "1m", 9);
    closed.on_limiter_failure = tollgate_core::ratelimit::FailureMode::Closed;
    let app = app_with_dead_redis(vec![open, closed]).await;
    let ready = app.get("/readyz").send().await.unwrap();
    assert_eq!(ready.headers()["retry-after"], "5");
    let body = expect_error(ready, 503, "service_unavailable").await;
    assert_eq!(body["error"]["details"]["dependency"], "rate_limiter");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("'strict'"), "{message}");
}

#[tokio::test]
async fn the_in_process_limiter_is_always_ready() {
    let app = spawn_app_with(|_, _| {}).await;
    let body: serde_json::Value = app
        .get("/readyz")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["rate_limiter"]["status"], "ok");
    assert_eq!(body["checks"]["rate_limiter"]["backend"], "local");
}

#[test]
fn an_ip_policy_cannot_fail_closed() {
    let mut raw = tollgate_server::config::RawConfig::default();
    let mut anon = policy("anon", Scope::Ip, Unit::Requests, 10, "1m", 0);
    anon.on_limiter_failure = tollgate_core::ratelimit::FailureMode::Closed;
    raw.rate_limits = Some(vec![anon]);
    let problems = tollgate_server::config::Config::from_raw(raw)
        .unwrap_err()
        .to_string();
    assert!(
        problems.contains("rate_limits[0].on_limiter_failure: ip policies"),
        "{problems}"
    );
}
