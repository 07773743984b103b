//! `/metrics`: what a scrape shows after known traffic: responses by route, status and code,
//! latency histograms, rate-limit refusals, key-cache outcomes, the ledger writer, the gauges.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{expect_error, spawn_app_with, ADMIN_TOKEN};
use tollgate_core::ratelimit::{Scope, Unit};
use tollgate_server::config::RawPolicy;

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_scrape_shows_the_traffic_it_followed() {
    let app = spawn_app_with(|raw, _| {
        raw.rate_limits = Some(vec![RawPolicy {
            name: "tight".into(),
            scope: Scope::Key,
            unit: Unit::Requests,
            limit: 60,
            window: "1m".into(),
            burst: 2,
            on_limiter_failure: Default::default(),
        }]);
    })
    .await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    for _ in 0..3 {
        assert_eq!(app.get_as("/echo/x", key).await.status(), 200);
    }
    expect_error(app.get_as("/echo/x", key).await, 429, "rate_limited").await;
    expect_error(
        app.get_as("/echo/x", "tg_live_nope").await,
        401,
        "invalid_api_key",
    )
    .await;
    expect_error(app.get("/nowhere").send().await.unwrap(), 404, "not_found").await;
    // The ledger has committed the charges before the scrape.
    app.get_json(
        &format!("/api/v1/billing/balance?account_id={}", account.id),
        ADMIN_TOKEN,
    )
    .await;

    expect_error(
        app.get("/metrics").send().await.unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
    let scrape = app.get_as("/metrics", ADMIN_TOKEN).await;
    assert_eq!(scrape.status(), 200);
    assert!(scrape.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = scrape.text().await.unwrap();
    let requests = |route: &str, status: u16, code: &str| {
        sample(
            &text,
            &format!(
                "tollgate_requests_total{{route=\"{route}\",status=\"{status}\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(requests("/echo", 200, ""), 3.0);
    assert_eq!(requests("/echo", 429, "rate_limited"), 1.0);
    assert_eq!(requests("/echo", 401, "invalid_api_key"), 1.0);
    assert_eq!(requests("unrouted", 404, "not_found"), 1.0);
    assert_eq!(requests("management", 201, ""), 1.0);
    assert_eq!(
        sample(&text, "tollgate_rate_limited_total{policy=\"tight\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "tollgate_upstream_duration_seconds_count{route=\"/echo\"}"
        ),
        3.0
    );
    assert!(
        sample(
            &text,
            "tollgate_request_duration_seconds_count{route=\"/echo\"}"
        ) >= 5.0
    );
    // The first call read the key from the store; the next three found it in memory.
    assert_eq!(sample(&text, "tollgate_key_cache_misses_total"), 1.0);
    assert!(sample(&text, "tollgate_key_cache_hits_total") >= 3.0);
    assert!(sample(&text, "tollgate_ledger_batch_size_count") >= 1.0);
    assert!(sample(&text, "tollgate_ledger_write_lag_seconds_count") >= 1.0);
    assert_eq!(sample(&text, "tollgate_holds_open"), 0.0);
    assert_eq!(sample(&text, "tollgate_shed_total"), 0.0);
    assert_eq!(sample(&text, "tollgate_concurrency_limit"), 500.0);
    assert!(text.ends_with("# EOF\n"));
}

/// The phases a `Server-Timing` header names, each with a duration in milliseconds.
fn phases(response: &reqwest::Response) -> Vec<String> {
    let value = response.headers()["server-timing"].to_str().unwrap();
    value
        .split(", ")
        .map(|item| {
            let (phase, duration) = item.split_once(";dur=").unwrap();
            assert!(duration.parse::<f64>().unwrap() >= 0.0, "{value}");
            phase.to_string()
        })
        .collect()
}

#[tokio::test]
async fn proxied_responses_time_their_phases_in_server_timing() {
    let app = spawn_app_with(|raw, _| raw.billing.starter_credits = "0.0015".into()).await;
    let account = app.create_account("acme").await;
    let key = &account.master_key;
    let paid = app.get_as("/echo/x", key).await;
    assert_eq!(paid.status(), 200);
    assert_eq!(phases(&paid), ["auth", "limits", "hold", "upstream"]);
    // The wallet cannot cover a second call: refused at the hold, never forwarded.
    let broke = app.get_as("/echo/x", key).await;
    assert_eq!(broke.status(), 402);
    assert_eq!(phases(&broke), ["auth", "limits", "hold"]);
    let unknown = app.get_as("/echo/x", "tg_live_nope").await;
    assert_eq!(phases(&unknown), ["auth"]);
}
