//! Usage export end to end, against the fake sinks on loopback: only charged calls leave, with
//! exact values and ids derived from the request ID; a re-send is dropped by the sink; an outage
//! leaves the cursor; accounts without a customer id wait and are sent once mapped; records the
//! sink refuses or that are too old become dead letters the operator lists and retries; and
//! `verify` finds every difference.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{request_id, spawn_app_with, TestAccount, TestApp, ADMIN_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate_core::Clock;
use tollgate_mock::sinks::{Api, FakeSinks};
use tollgate_server::config::{RawConfig, RawSink, Secret};
use tollgate_server::notify::export::verify;
use tollgate_server::notify::sinks::SinkClient;
use tollgate_store::ExportStore;

const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn sink(name: &str, kind: &str, url: String, meters: &[(&str, &str)]) -> RawSink {
    RawSink {
        name: name.into(),
        kind: kind.into(),
        url,
        secret: Some(Secret(if kind == "webhook" {
            WEBHOOK_SECRET.into()
        } else {
            "sk_test_export".into()
        })),
        meters: meters
            .iter()
            .map(|(m, n)| (m.to_string(), n.to_string()))
            .collect(),
        customer: None,
        max_age: None,
        batch_size: 100,
        timeout: "5s".into(),
        source: "tollgate".into(),
        event_type: "tollgate.usage".into(),
        totals_url: None,
    }
}

/// Every kind of sink, all at the fakes. The exporter's own loop waits an hour between idle
/// rounds, so the tests drive rounds themselves.
fn four_sinks(raw: &mut RawConfig, fakes: &FakeSinks) {
    raw.export.poll_interval = "1h".into();
    let url = fakes.url();
    let mut webhook = sink(
        "receiver",
        "webhook",
        format!("{url}/cloudevents"),
        &[("cost", "cost"), ("output_tokens", "tokens_out")],
    );
    webhook.totals_url = Some(format!("{url}/cloudevents/totals"));
    raw.export.sinks = vec![
        sink(
            "stripe",
            "stripe",
            url.clone(),
            &[("cost", "api_cost"), ("requests", "api_calls")],
        ),
        sink(
            "openmeter",
            "openmeter",
            url.clone(),
            &[("cost", "cost"), ("cached_input_tokens", "cached")],
        ),
        sink(
            "lago",
            "lago",
            url,
            &[("cost", "api_cost"), ("input_tokens", "tokens_in")],
        ),
        webhook,
    ];
}

async fn fakes() -> FakeSinks {
    let fakes = FakeSinks::start(WEBHOOK_SECRET, true).await.unwrap();
    fakes.openmeter_meter("cost", "cost");
    fakes.openmeter_meter("cached", "cached_input_tokens");
    fakes
}

fn chat() -> Value {
    json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
}

/// A paid call; its request ID.
async fn paid_call(app: &TestApp, key: &str) -> String {
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    response.bytes().await.unwrap();
    id
}

/// A call the upstream fails: charged nothing, so never exported.
async fn failed_call(app: &TestApp, key: &str) {
    let response = app
        .post("/v1/chat/completions")
        .bearer_auth(key)
        .header("x-mock-status", "500")
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    response.bytes().await.unwrap();
}

async fn round(app: &TestApp, name: &str) -> tollgate_server::notify::export::Round {
    let exporter = &app.state.exporter;
    exporter
        .round(exporter.sink(name).unwrap())
        .await
        .unwrap_or_else(|e| panic!("round for {name}: {e}"))
}

/// What the usage log says a request cost, as an exact decimal string.
async fn cost_of(app: &TestApp, account: &TestAccount, id: &str) -> String {
    let usage = common::usage_of(app, &account.master_key, id).await;
    usage["cost"]["credits"].as_str().unwrap().to_string()
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    let response = app.get_as(path, ADMIN_TOKEN).await;
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.json().await.unwrap()
}

async fn map_customer(app: &TestApp, account: &TestAccount, sink: &str, customer: &str) {
    let response = app
        .http
        .put(format!(
            "{}/api/v1/accounts/{}/export-customers/{sink}",
            app.url, account.id
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "customer": customer }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn only_charged_usage_reaches_each_sink_once_with_exact_values_and_request_ids() {
    let fakes = fakes().await;
    let app = spawn_app_with(|raw, _| four_sinks(raw, &fakes)).await;
    let acme = app.create_account("acme").await;
    let first = paid_call(&app, &acme.master_key).await;
    failed_call(&app, &acme.master_key).await;
    let second = paid_call(&app, &acme.master_key).await;
    // Refused before any upstream call (no such model): charged nothing.
    let refused = app
        .post("/v1/chat/completions")
        .bearer_auth(&acme.master_key)
        .json(&json!({"model": "nope", "messages": []}))
        .send()
        .await
        .unwrap();
    assert!(refused.status().is_client_error());
    app.state.ledger.flush().await.unwrap();
    map_customer(&app, &acme, "stripe", "cus_acme").await;

    for name in ["stripe", "openmeter", "lago", "receiver"] {
        let done = round(&app, name).await;
        assert_eq!(
            (done.read, done.delivered, done.parked),
            (2, 2, 0),
            "{name}"
        );
    }
    let account = acme.id.to_string();
    let cost = (
        cost_of(&app, &acme, &first).await,
        cost_of(&app, &acme, &second).await,
    );
    assert_ne!(cost.0, "0");

    // Stripe: one meter event per record and meter, identified by request ID and meter.
    let stripe = fakes.held(Api::Stripe);
    assert_eq!(stripe.len(), 4);
    let event = &stripe[&format!("{first}-cost")];
    assert_eq!(
        (event.customer.as_str(), event.meter.as_str()),
        ("cus_acme", "api_cost")
    );
    assert_eq!(event.value, cost.0);
    assert_eq!(stripe[&format!("{second}-requests")].value, "1");
    // Lago: the same, by transaction id; the account id is the subscription.
    let lago = fakes.held(Api::Lago);
    assert_eq!(lago.len(), 4);
    assert_eq!(lago[&format!("{second}-cost")].value, cost.1);
    assert_eq!(lago[&format!("{second}-cost")].customer, account);
    // CloudEvents: one event per record, id = request ID, each meter a field; zero is "0".
    let openmeter = fakes.held(Api::OpenMeter);
    assert_eq!(openmeter[&format!("{first}/cost")].value, cost.0);
    assert_eq!(
        openmeter[&format!("{first}/cached_input_tokens")].value,
        "0"
    );
    assert_eq!(openmeter[&format!("{first}/cost")].customer, account);
    let received = fakes.held(Api::CloudEvents);
    assert_eq!(received.len(), 4);
    assert!(
        received[&format!("{second}/tokens_out")]
            .value
            .parse::<u64>()
            .unwrap()
            > 0
    );

    // Nothing more to send; the sinks' totals are Tollgate's.
    for name in ["stripe", "openmeter", "lago", "receiver"] {
        assert_eq!(round(&app, name).await.read, 0);
        let sink = SinkClient::new(app.state.exporter.sink(name).unwrap().settings().clone());
        let now = app.clock.now();
        let report = verify(
            &*app.store,
            &sink,
            now - chrono::TimeDelta::days(1),
            now + chrono::TimeDelta::days(1),
        )
        .await
        .unwrap();
        assert!(
            report.differences.is_empty(),
            "{name}: {:?}",
            report.differences
        );
        assert!(report.compared >= 2, "{name}");
    }
}

#[tokio::test]
async fn a_resend_after_a_lost_acknowledgement_is_dropped_by_every_sink() {
    let fakes = fakes().await;
    let app = spawn_app_with(|raw, _| four_sinks(raw, &fakes)).await;
    let acme = app.create_account("acme").await;
    map_customer(&app, &acme, "stripe", "cus_acme").await;
    for _ in 0..3 {
        paid_call(&app, &acme.master_key).await;
    }
    app.state.ledger.flush().await.unwrap();
    for name in ["stripe", "openmeter", "lago", "receiver"] {
        round(&app, name).await;
    }
    let before: Vec<String> = [
        (Api::Stripe, "cus_acme", "api_cost"),
        (Api::Lago, acme.id.to_string().as_str(), "api_cost"),
        (Api::OpenMeter, acme.id.to_string().as_str(), "cost"),
        (Api::CloudEvents, acme.id.to_string().as_str(), "cost"),
    ]
    .iter()
    .map(|(api, customer, meter)| fakes.total(*api, customer, meter))
    .collect();
    // The sinks took the batch but the acknowledgement was lost: every cursor is back at 0.
    app.tamper("UPDATE export_cursors SET seq = 0").await;
    for name in ["stripe", "openmeter", "lago", "receiver"] {
        let again = round(&app, name).await;
        assert_eq!(
            (again.read, again.delivered),
            (3, 3),
            "{name}: a duplicate is delivered"
        );
    }
    let after: Vec<String> = [
        (Api::Stripe, "cus_acme", "api_cost"),
        (Api::Lago, acme.id.to_string().as_str(), "api_cost"),
        (Api::OpenMeter, acme.id.to_string().as_str(), "cost"),
        (Api::CloudEvents, acme.id.to_string().as_str(), "cost"),
    ]
    .iter()
    .map(|(api, customer, meter)| fakes.total(*api, customer, meter))
    .collect();
    assert_eq!(before, after, "nothing counted twice");
    let (_, duplicates) = fakes.counts();
    assert!(
        duplicates >= 12,
        "Stripe's and Lago's repeats were refused as existing"
    );
}

#[tokio::test]
async fn an_outage_leaves_the_cursor_and_the_next_round_sends_the_same_records() {
    let fakes = fakes().await;
    let app = spawn_app_with(|raw, _| four_sinks(raw, &fakes)).await;
    let acme = app.create_account("acme").await;
    map_customer(&app, &acme, "stripe", "cus_acme").await;
    paid_call(&app, &acme.master_key).await;
    paid_call(&app, &acme.master_key).await;
    app.state.ledger.flush().await.unwrap();
    for name in ["openmeter", "lago", "receiver", "stripe"] {
        fakes.fail_next(1);
        let exporter = &app.state.exporter;
        let failed = exporter.round(exporter.sink(name).unwrap()).await;
        assert!(
            failed.is_err(),
            "{name}: a sink that answered 5xx is no acknowledgement"
        );
        assert_eq!(app.store.export_cursor(name).await.unwrap(), 0, "{name}");
    }
    for name in ["openmeter", "lago", "receiver", "stripe"] {
        assert_eq!(round(&app, name).await.delivered, 2, "{name}");
        assert!(app.store.export_cursor(name).await.unwrap() > 0);
    }
    assert_eq!(fakes.held(Api::Lago).len(), 4);
    let metrics = app
        .get("/metrics")
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_export_records_total{sink=\"lago\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_export_lag_records{sink=\"lago\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_account_without_a_customer_id_waits_reported_and_is_sent_once_mapped() {
    let fakes = fakes().await;
    let app = spawn_app_with(|raw, _| four_sinks(raw, &fakes)).await;
    let acme = app.create_account("acme").await;
    let globex = app.create_account("globex").await;
    map_customer(&app, &globex, "stripe", "cus_globex").await;
    let waiting = paid_call(&app, &acme.master_key).await;
    paid_call(&app, &globex.master_key).await;
    app.state.ledger.flush().await.unwrap();
    let first = round(&app, "stripe").await;
    assert_eq!((first.read, first.delivered, first.parked), (2, 1, 1));

    let sinks = admin_get(&app, "/api/v1/export/sinks").await;
    let stripe = sinks["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "stripe")
        .unwrap()
        .clone();
    assert_eq!(
        (stripe["unmapped"].as_u64(), stripe["pending"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(stripe["customer"], "mapped");
    let parked = admin_get(&app, "/api/v1/export/sinks/stripe/parked?reason=unmapped").await;
    assert_eq!(parked["data"][0]["request_id"], waiting.as_str());
    assert_eq!(parked["data"][0]["account_id"], acme.id.to_string());

    // Still no customer: the idle round leaves it waiting.
    assert_eq!(round(&app, "stripe").await.unparked, 0);
    map_customer(&app, &acme, "stripe", "cus_acme").await;
    assert_eq!(round(&app, "stripe").await.unparked, 1);
    assert_eq!(
        fakes.held(Api::Stripe)[&format!("{waiting}-cost")].customer,
        "cus_acme"
    );
    let parked = admin_get(&app, "/api/v1/export/sinks/stripe/parked").await;
    assert_eq!(parked["data"], json!([]));

    // A customer id is the operator's to set: a key cannot, and an unknown sink is 404.
    let by_key = app
        .http
        .put(format!(
            "{}/api/v1/accounts/{}/export-customers/stripe",
            app.url, acme.id
        ))
        .bearer_auth(&acme.master_key)
        .json(&json!({ "customer": "cus_evil" }))
        .send()
        .await
        .unwrap();
    assert_eq!(by_key.status(), StatusCode::FORBIDDEN);
    let unknown = app
        .get_as(
            &format!("/api/v1/accounts/{}/export-customers/nope", acme.id),
            ADMIN_TOKEN,
        )
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let blank = app
        .http
        .put(format!(
            "{}/api/v1/accounts/{}/export-customers/stripe",
            app.url, acme.id
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "customer": "  " }))
        .send()
        .await
        .unwrap();
    assert_eq!(blank.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn refused_and_too_old_records_are_dead_letters_the_operator_lists_and_retries() {
    let fakes = fakes().await;
    let app = spawn_app_with(|raw, _| {
        four_sinks(raw, &fakes);
        for sink in &mut raw.export.sinks {
            sink.customer = Some("account".into());
        }
        // Tollgate lets these through, so Stripe's own refusal of old events is met.
        raw.export.sinks[0].max_age = Some("400d".into());
        let mut strict = raw.export.sinks[1].clone();
        strict.name = "strict".into();
        strict.max_age = Some("30d".into());
        raw.export.sinks.push(strict);
    })
    .await;
    let acme = app.create_account("acme").await;
    let globex = app.create_account("globex").await;
    // A call 40 days ago: older than Stripe takes, and than the strict sink's max_age.
    let now = app.clock.now();
    app.clock.set(now - chrono::TimeDelta::days(40));
    let old = paid_call(&app, &acme.master_key).await;
    app.state.ledger.flush().await.unwrap();
    app.clock.set(now);
    fakes.refuse_customer(&globex.id.to_string());
    let refused = paid_call(&app, &globex.master_key).await;
    let fine = paid_call(&app, &acme.master_key).await;
    app.state.ledger.flush().await.unwrap();

    let stripe = round(&app, "stripe").await;
    assert_eq!((stripe.delivered, stripe.parked), (1, 2));
    let strict = round(&app, "strict").await;
    assert_eq!((strict.delivered, strict.parked), (1, 2));
    let lago = round(&app, "lago").await;
    assert_eq!(
        (lago.delivered, lago.parked),
        (2, 1),
        "Lago takes old events"
    );
    let receiver = round(&app, "receiver").await;
    assert_eq!(
        (receiver.delivered, receiver.parked),
        (2, 1),
        "the refused batch was split"
    );
    assert!(fakes
        .held(Api::CloudEvents)
        .contains_key(&format!("{fine}/cost")));

    let dead = admin_get(&app, "/api/v1/export/sinks/stripe/parked").await;
    let reasons: BTreeMap<String, String> = dead["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["request_id"].as_str().unwrap().to_string(),
                p["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(reasons[&old], "too_old");
    assert_eq!(reasons[&refused], "rejected");
    let detail = dead["data"][0]["detail"].as_str().unwrap();
    assert!(!detail.is_empty());
    let strict_dead = admin_get(&app, "/api/v1/export/sinks/strict/parked?reason=too_old").await;
    assert_eq!(strict_dead["data"][0]["request_id"], old.as_str());
    assert!(strict_dead["data"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("older than"));

    // A retry of a dead letter the sink still refuses keeps it; one it takes now clears it.
    let seq = |request: &str| {
        dead["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["request_id"] == request)
            .unwrap()["seq"]
            .as_i64()
            .unwrap()
    };
    let retry = |seq: i64| {
        app.http
            .post(format!(
                "{}/api/v1/export/sinks/stripe/parked/{seq}/retry",
                app.url
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    let again: Value = retry(seq(&old)).await.unwrap().json().await.unwrap();
    assert_eq!(again["delivered"], false);
    let stripe_sink = admin_get(&app, "/api/v1/export/sinks").await;
    assert_eq!(stripe_sink["data"][0]["dead_letters"], 2);
    assert_eq!(
        retry(999_999).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let by_key = app
        .http
        .post(format!(
            "{}/api/v1/export/sinks/stripe/parked/{}/retry",
            app.url,
            seq(&refused)
        ))
        .bearer_auth(&globex.master_key)
        .send()
        .await
        .unwrap();
    assert_eq!(by_key.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn verify_reports_every_difference_and_an_unmapped_account() {
    let fakes = fakes().await;
    let app = spawn_app_with(|raw, _| four_sinks(raw, &fakes)).await;
    let acme = app.create_account("acme").await;
    let globex = app.create_account("globex").await;
    map_customer(&app, &acme, "stripe", "cus_acme").await;
    paid_call(&app, &acme.master_key).await;
    paid_call(&app, &globex.master_key).await;
    app.state.ledger.flush().await.unwrap();
    let now = app.clock.now();
    let (from, to) = (
        now - chrono::TimeDelta::days(1),
        now + chrono::TimeDelta::days(1),
    );
    let check = |name: &'static str| {
        let sink = SinkClient::new(app.state.exporter.sink(name).unwrap().settings().clone());
        let store = app.store.clone();
        async move { verify(&*store, &sink, from, to).await.unwrap() }
    };
    // Before anything is sent, each of the sink's totals is missing.
    let before = check("lago").await;
    assert_eq!(before.differences.len(), 4, "{:?}", before.differences);
    assert_eq!(before.pending, 2);
    round(&app, "lago").await;
    assert!(check("lago").await.differences.is_empty());
    // Stripe has no customer for globex: its usage is a difference naming the account.
    round(&app, "stripe").await;
    let stripe = check("stripe").await;
    assert_eq!(stripe.differences.len(), 2, "{:?}", stripe.differences);
    assert!(stripe
        .differences
        .iter()
        .all(|d| d.customer.is_none() && d.account == Some(globex.id) && d.sink == 0));
    // A record the sink never got (a row added behind the exporter's back) is found.
    round(&app, "receiver").await;
    assert!(check("receiver").await.differences.is_empty());
    app.tamper(&format!(
        "INSERT INTO usage_exports (request_id, account_id, key_id, route, model, billing_status, \
         cost_nanos, input_tokens, cached_input_tokens, output_tokens, at) \
         VALUES ('req_01JEXTRA00000000000000000', '{}', '{}', '/v1', NULL, 'settled', 5, 0, 0, 0, {})",
        acme.id,
        acme.master_key_id,
        now.timestamp_millis()
    ))
    .await;
    let receiver = check("receiver").await;
    assert_eq!(receiver.differences.len(), 1, "{:?}", receiver.differences);
    assert_eq!(receiver.differences[0].meter.as_str(), "cost");
    assert_eq!(
        receiver.differences[0].tollgate - receiver.differences[0].sink,
        5
    );
}

#[tokio::test]
async fn the_exporter_runs_by_itself_and_catches_up_after_an_outage() {
    let fakes = fakes().await;
    let app = spawn_app_with(|raw, _| {
        four_sinks(raw, &fakes);
        raw.export.poll_interval = "20ms".into();
        raw.export.sinks.retain(|s| s.name == "lago");
    })
    .await;
    let acme = app.create_account("acme").await;
    fakes.fail_next(2);
    for _ in 0..5 {
        paid_call(&app, &acme.master_key).await;
    }
    app.state.ledger.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fakes.held(Api::Lago).len() < 10 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fakes.held(Api::Lago).len(), 10, "5 records × 2 meters");
    // The sink has answered; the cursor moves right after.
    let mut standing = app.store.export_standing("lago").await.unwrap();
    while standing.pending > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        standing = app.store.export_standing("lago").await.unwrap();
    }
    assert_eq!(
        (standing.pending, standing.dead, standing.unmapped),
        (0, 0, 0)
    );
    let metrics = app
        .get("/metrics")
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_export_failures_total{sink=\"lago\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_export_lag_seconds{sink=\"lago\"} 0"),
        "{metrics}"
    );
}

/// The operator's console page lists each sink's parked records with the sink's answer, and
/// *Send again* delivers one the sink now takes; an account holder cannot see the page.
#[tokio::test]
async fn the_operator_sees_dead_letters_in_the_console_and_sends_one_again() {
    let fakes = fakes().await;
    let app = spawn_app_with(|raw, _| four_sinks(raw, &fakes)).await;
    let acme = app.create_account("acme").await;
    fakes.refuse_customer(&acme.id.to_string());
    let refused = paid_call(&app, &acme.master_key).await;
    app.state.ledger.flush().await.unwrap();
    assert_eq!(round(&app, "lago").await.parked, 1);

    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let sign_in = |credential: String| {
        browser
            .post(format!("{}/console/sign-in", app.url))
            .header("sec-fetch-site", "same-origin")
            .form(&[("credential", credential)])
            .send()
    };
    let cookie = |response: reqwest::Response| {
        response.headers()[reqwest::header::SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    };
    let operator = cookie(sign_in(ADMIN_TOKEN.to_string()).await.unwrap());
    let page = |cookie: String| {
        browser
            .get(format!("{}/console/sinks", app.url))
            .header(reqwest::header::COOKIE, cookie)
            .send()
    };
    let body = page(operator.clone()).await.unwrap().text().await.unwrap();
    let lago = body.split("data-sink=\"lago\"").nth(1).unwrap();
    let lago = lago.split("</section>").next().unwrap();
    assert!(lago.contains("data-dead=\"1\""), "{lago}");
    assert!(lago.contains(&refused), "{lago}");
    assert!(lago.contains("data-reason=\"rejected\""), "{lago}");
    let seq = lago
        .split("data-seq=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();

    fakes.accept_everyone();
    let sent = browser
        .post(format!("{}/console/sinks/lago/{seq}/retry", app.url))
        .header(reqwest::header::COOKIE, operator.clone())
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        sent.headers()["location"],
        "/console/sinks?retried=delivered"
    );
    assert!(fakes
        .held(Api::Lago)
        .contains_key(&format!("{refused}-cost")));
    let body = page(operator).await.unwrap().text().await.unwrap();
    let lago = body.split("data-sink=\"lago\"").nth(1).unwrap();
    assert!(lago.contains("data-dead=\"0\""), "{lago}");
    let audit = app.get_json("/api/v1/audit", ADMIN_TOKEN).await;
    assert!(audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|entry| entry["action"] == "export.retry"));

    let holder = cookie(sign_in(acme.master_key.clone()).await.unwrap());
    assert_eq!(page(holder).await.unwrap().status(), StatusCode::NOT_FOUND);
}

/// A sink added to a running deployment is sent what is charged from then on, never the
/// history already in the log (which another system may have billed).
#[tokio::test]
async fn a_sink_added_later_starts_with_the_calls_charged_after_it() {
    let fakes = fakes().await;
    let app = spawn_app_with(|_, _| {}).await;
    let acme = app.create_account("acme").await;
    let before = paid_call(&app, &acme.master_key).await;
    let url = fakes.url();
    let app = app
        .restart_with(move |raw| {
            raw.export.poll_interval = "20ms".into();
            raw.export.sinks = vec![sink("lago", "lago", url, &[("cost", "api_cost")])];
        })
        .await;
    // No sink had started when the first call was charged, so no export log was kept for it.
    assert!(app.store.export_records(0, 10).await.unwrap().is_empty());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let after = paid_call(&app, &acme.master_key).await;
    app.state.ledger.flush().await.unwrap();
    while fakes.held(Api::Lago).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held: Vec<String> = fakes.held(Api::Lago).into_keys().collect();
    assert_eq!(held, vec![format!("{after}-cost")], "not {before}");
}
