//! Webhooks end to end, against a receiver on loopback: endpoints as a resource, the SSRF guard
//! on their URLs, signed deliveries that fire once per crossing, retries on the test's clock,
//! `Retry-After`, 410, redirects, a slow receiver beside a quick one, redelivery, and an event
//! committed before a crash delivered after the restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{expect_error, spawn_app_with, TestAccount, TestApp, ADMIN_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tollgate_client::webhook::WebhookVerifier;
use tollgate_mock::receiver::{Answer, Received, WebhookReceiver};
use tollgate_server::config::RawConfig;

/// How long a test waits for a delivery the sender should make at once.
const SOON: Duration = Duration::from_secs(10);

/// Endpoints may be plain http on loopback here (the receiver's); the sender looks every 20 ms.
fn on_loopback(raw: &mut RawConfig) {
    raw.webhooks.allow_http = true;
    raw.webhooks.allow_private = vec!["127.0.0.0/8".into()];
    raw.webhooks.poll_interval = "20ms".into();
    raw.webhooks.attempt_timeout = "2s".into();
}

async fn receiver() -> WebhookReceiver {
    WebhookReceiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A server whose endpoints may be on loopback (with `customize` on top), a receiver, and an
/// account named acme.
async fn listening_app(
    customize: impl FnOnce(&mut RawConfig) + Send + 'static,
) -> (TestApp, WebhookReceiver, TestAccount) {
    let app = spawn_app_with(|raw, _| {
        on_loopback(raw);
        customize(raw);
    })
    .await;
    let inbox = receiver().await;
    let acme = app.create_account("acme").await;
    (app, inbox, acme)
}

/// Creates an endpoint; returns its JSON (with the secret).
async fn create_endpoint(app: &TestApp, key: &str, url: &str, events: Value) -> Value {
    let response = app
        .post("/api/v1/webhook-endpoints")
        .bearer_auth(key)
        .json(&json!({ "url": url, "events": events, "description": "ops" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    response.json().await.unwrap()
}

async fn set_low_balance(app: &TestApp, key: &str, account: &str, low: &str) {
    let response = app
        .http
        .put(format!(
            "{}/api/v1/accounts/{account}/balance-alert",
            app.url
        ))
        .bearer_auth(key)
        .json(&json!({ "low_balance": low }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

fn body(received: &Received) -> Value {
    serde_json::from_str(&received.body).unwrap()
}

/// Checks a delivery's signature with the client crate's verifier (an implementation of its
/// own), at the delivery's timestamp.
fn verify(received: &Received, secret: &str) -> Result<(), tollgate_client::webhook::WebhookError> {
    let verifier = WebhookVerifier::new(secret).unwrap();
    let timestamp = received.webhook_timestamp.as_deref().unwrap();
    let sent = std::time::UNIX_EPOCH + Duration::from_secs(timestamp.parse().unwrap());
    verifier.verify_at(
        received.webhook_id.as_deref().unwrap(),
        timestamp,
        received.webhook_signature.as_deref().unwrap(),
        received.body.as_bytes(),
        sent,
    )
}

fn assert_signed(received: &Received, secret: &str) {
    verify(received, secret).unwrap();
}

async fn echo(app: &TestApp, key: &str) -> reqwest::Response {
    app.get("/echo/hi").bearer_auth(key).send().await.unwrap()
}

async fn deliveries(app: &TestApp, key: &str, endpoint: &str) -> Vec<Value> {
    let page = app
        .get_json(
            &format!("/api/v1/webhook-endpoints/{endpoint}/deliveries"),
            key,
        )
        .await;
    page["data"].as_array().unwrap().clone()
}

/// Waits until the endpoint's newest delivery has made `attempts` attempts.
async fn attempts_made(app: &TestApp, key: &str, endpoint: &str, attempts: u64) -> Value {
    for _ in 0..2000 {
        let log = deliveries(app, key, endpoint).await;
        if let Some(newest) = log.first() {
            if newest["attempts"].as_u64() == Some(attempts) {
                return newest.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no delivery to {endpoint} made {attempts} attempts");
}

#[tokio::test]
async fn endpoints_are_their_owners_with_a_secret_shown_once_a_limit_and_an_audit_trail() {
    let (app, inbox, acme) = listening_app(|raw| {
        raw.webhooks.max_endpoints_per_account = 2;
    })
    .await;
    let other = app.create_account("other").await;
    let key = &acme.master_key;
    let created = create_endpoint(&app, key, &inbox.url("/a"), json!(["balance.low"])).await;
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("we_"));
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(created["events"], json!(["balance.low"]));
    assert_eq!(created["account_id"], acme.id.to_string());
    let path = format!("/api/v1/webhook-endpoints/{id}");
    let read = app.get_json(&path, key).await;
    assert!(read.get("secret").is_none(), "the secret is shown once");
    assert_eq!(read["url"], inbox.url("/a"));

    // Another account, or a usage key, sees nothing of it.
    expect_error(app.get_as(&path, &other.master_key).await, 404, "not_found").await;
    let (usage, _) = app.create_usage_key(key, json!({})).await;
    expect_error(app.get_as(&path, &usage).await, 403, "forbidden").await;
    let listed = app
        .get_json("/api/v1/webhook-endpoints", &other.master_key)
        .await;
    assert_eq!(listed["data"], json!([]));

    // Edit, rotate, and the limit.
    let patched: Value = app
        .patch(&path)
        .bearer_auth(key)
        .json(&json!({ "events": ["*"], "enabled": false }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["events"], json!(["*"]));
    assert_eq!(patched["enabled"], false);
    let bad = app
        .patch(&path)
        .bearer_auth(key)
        .json(&json!({ "events": ["balance.lo"] }))
        .send()
        .await
        .unwrap();
    let error = expect_error(bad, 400, "validation_error").await;
    assert!(error["error"]["field_errors"]["events"][0]
        .as_str()
        .unwrap()
        .contains("balance.lo"));
    let rotated: Value = app
        .post(&format!("{path}/rotate-secret"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(rotated["secret"], created["secret"]);
    assert!(rotated["previous_secret_expires_at"].is_string());
    create_endpoint(&app, key, &inbox.url("/b"), json!(["*"])).await;
    let third = app
        .post("/api/v1/webhook-endpoints")
        .bearer_auth(key)
        .json(&json!({ "url": inbox.url("/c") }))
        .send()
        .await
        .unwrap();
    let error = expect_error(third, 403, "endpoint_limit_reached").await;
    assert_eq!(error["error"]["details"]["limit"], 2);

    // The admin manages any account's, naming it.
    let listed = app
        .get_json(
            &format!("/api/v1/webhook-endpoints?account_id={}", acme.id),
            ADMIN_TOKEN,
        )
        .await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);
    let deleted = app
        .http
        .delete(format!("{}{path}", app.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    expect_error(app.get_as(&path, key).await, 404, "not_found").await;

    let audit = app.get_json("/api/v1/audit?limit=100", ADMIN_TOKEN).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| a.starts_with("webhook_endpoint."))
        .collect();
    for action in ["create", "update", "rotate_secret", "delete"] {
        assert!(
            actions.contains(&format!("webhook_endpoint.{action}").as_str()),
            "{actions:?}"
        );
    }
}

/// A listener that counts the connections it accepts: none may reach it.
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn urls_inside_the_network_are_refused_in_every_spelling() {
    // The deployment default: https only, no private range allowed.
    let app = spawn_app_with(|_, _| {}).await;
    let acme = app.create_account("acme").await;
    let (port, accepted) = counting_listener().await;
    let refused = [
        format!("https://127.0.0.1:{port}/"),
        format!("https://2130706433:{port}/"),
        format!("https://0x7f.1:{port}/"),
        format!("https://0177.0.0.1:{port}/"),
        format!("https://127.1:{port}/"),
        format!("https://[::1]:{port}/"),
        format!("https://[::ffff:127.0.0.1]:{port}/"),
        format!("https://localhost:{port}/"),
        "https://10.1.2.3/".to_string(),
        "https://172.16.0.1/".to_string(),
        "https://192.168.1.1/".to_string(),
        "https://169.254.169.254/latest/meta-data/".to_string(),
        "https://100.64.0.1/".to_string(),
        "https://224.0.0.1/".to_string(),
        "https://192.0.2.10/".to_string(),
        "https://0.0.0.0/".to_string(),
        "https://[fd00::1]/".to_string(),
        "https://[fe80::1]/".to_string(),
        "https://[64:ff9b::a00:1]/".to_string(),
        "https://[2002:a00:1::]/".to_string(),
        "http://93.184.215.14/".to_string(),
    ];
    for url in &refused {
        let response = app
            .post("/api/v1/webhook-endpoints")
            .bearer_auth(&acme.master_key)
            .json(&json!({ "url": url }))
            .send()
            .await
            .unwrap();
        let error = expect_error(response, 400, "ssrf_blocked").await;
        assert!(
            error["error"]["details"]["reason"].is_string(),
            "{url}: {error}"
        );
    }
    for (url, why) in [
        ("not a url", "is not a URL"),
        ("https://user:pw@93.184.215.14/", "user name or password"),
    ] {
        let response = app
            .post("/api/v1/webhook-endpoints")
            .bearer_auth(&acme.master_key)
            .json(&json!({ "url": url }))
            .send()
            .await
            .unwrap();
        let error = expect_error(response, 400, "validation_error").await;
        assert!(
            error["error"]["field_errors"]["url"][0]
                .as_str()
                .unwrap()
                .contains(why),
            "{error}"
        );
    }
    // An edit is checked as a creation is.
    let public = create_endpoint(
        &app,
        &acme.master_key,
        "https://93.184.215.14/in",
        json!(["*"]),
    )
    .await;
    let edit = app
        .patch(&format!(
            "/api/v1/webhook-endpoints/{}",
            public["id"].as_str().unwrap()
        ))
        .bearer_auth(&acme.master_key)
        .json(&json!({ "url": format!("https://127.0.0.1:{port}/") }))
        .send()
        .await
        .unwrap();
    expect_error(edit, 400, "ssrf_blocked").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing connected");
}

#[tokio::test]
async fn a_low_balance_fires_once_signed_with_its_request_and_recovery_rearms_it() {
    let (app, inbox, acme) = listening_app(|_| {}).await;
    let key = &acme.master_key;
    let endpoint = create_endpoint(
        &app,
        key,
        &inbox.url("/hooks"),
        json!(["balance.low", "balance.recovered"]),
    )
    .await;
    let secret = endpoint["secret"].as_str().unwrap();
    // 5 credits to start; each echo call costs 0.001. Low under 4.9985: the second call.
    set_low_balance(&app, key, &acme.id.to_string(), "4.9985").await;
    assert_eq!(echo(&app, key).await.status(), 200);
    let second = echo(&app, key).await;
    assert_eq!(second.status(), 200);
    let second_id = common::request_id(&second);
    for _ in 0..5 {
        assert_eq!(echo(&app, key).await.status(), 200);
    }
    let low = inbox.wait_for("/hooks", 1, SOON).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let low_again = inbox.received();
    assert_eq!(low_again.len(), 1, "once per episode: {low_again:?}");
    let event = body(&low[0]);
    assert_eq!(event["type"], "balance.low");
    assert_eq!(event["data"]["account_id"], acme.id.to_string());
    assert_eq!(event["data"]["balance"]["nanos"], 4_998_000_000i64);
    assert_eq!(event["data"]["balance"]["credits"], "4.998");
    assert_eq!(event["data"]["low_balance"]["credits"], "4.9985");
    assert_eq!(event["data"]["request_id"], second_id);
    assert!(low[0].webhook_id.as_deref().unwrap().starts_with("msg_"));
    assert_signed(&low[0], secret);

    // A grant back over the amount recovers it, which re-arms it.
    let grant = app
        .admin_post(
            &format!("/api/v1/accounts/{}/credits", acme.id),
            json!({ "amount": "1", "reason": "support" }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(grant.status(), 200);
    let both = inbox.wait_for("/hooks", 2, SOON).await;
    let recovered = body(&both[1]);
    assert_eq!(recovered["type"], "balance.recovered");
    assert_eq!(recovered["data"]["balance"]["credits"], "5.993");
    assert_signed(&both[1], secret);
    set_low_balance(&app, key, &acme.id.to_string(), "5.9925").await;
    assert_eq!(echo(&app, key).await.status(), 200);
    let three = inbox.wait_for("/hooks", 3, SOON).await;
    assert_eq!(body(&three[2])["type"], "balance.low");
    let ids: std::collections::BTreeSet<_> = three
        .iter()
        .map(|r| r.webhook_id.clone().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "each event its own id");
}

#[tokio::test]
async fn the_first_refusal_for_want_of_credit_sends_balance_depleted_once() {
    let (app, inbox, acme) = listening_app(|raw| {
        raw.billing.starter_credits = "0.002".into();
    })
    .await;
    let key = &acme.master_key;
    create_endpoint(&app, key, &inbox.url("/hooks"), json!(["balance.depleted"])).await;
    assert_eq!(echo(&app, key).await.status(), 200);
    assert_eq!(echo(&app, key).await.status(), 200);
    let refused = echo(&app, key).await;
    let refused_id = common::request_id(&refused);
    expect_error(refused, 402, "insufficient_balance").await;
    for _ in 0..10 {
        expect_error(echo(&app, key).await, 402, "insufficient_balance").await;
    }
    let depleted = inbox.wait_for("/hooks", 1, SOON).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(inbox.received().len(), 1, "once per episode");
    let event = body(&depleted[0]);
    assert_eq!(event["type"], "balance.depleted");
    assert_eq!(event["data"]["balance"]["nanos"], 0);
    assert_eq!(event["data"]["required"]["credits"], "0.001");
    assert_eq!(event["data"]["request_id"], refused_id);
}

#[tokio::test]
async fn a_revoked_key_is_announced_by_its_prefix_never_its_secret() {
    let (app, inbox, acme) = listening_app(|_| {}).await;
    let key = &acme.master_key;
    create_endpoint(&app, key, &inbox.url("/hooks"), json!(["key.revoked"])).await;
    let (secret, id) = app.create_usage_key(key, json!({ "name": "ci" })).await;
    let revoked = app
        .post(&format!("/api/v1/keys/{id}/revoke"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let revoke_request = common::request_id(&revoked);
    let received = inbox.wait_for("/hooks", 1, SOON).await;
    let event = body(&received[0]);
    assert_eq!(event["type"], "key.revoked");
    assert_eq!(event["data"]["key_id"], id.to_string());
    assert_eq!(event["data"]["name"], "ci");
    assert_eq!(event["data"]["request_id"], revoke_request);
    assert!(secret.starts_with(event["data"]["key_prefix"].as_str().unwrap()));
    assert!(!received[0].body.contains(&secret));
}

#[tokio::test]
async fn failures_retry_on_the_clock_honour_retry_after_and_410_disables_the_endpoint() {
    let (app, inbox, acme) = listening_app(|_| {}).await;
    let key = &acme.master_key;
    let endpoint = create_endpoint(&app, key, &inbox.url("/flaky"), json!(["*"])).await;
    let id = endpoint["id"].as_str().unwrap();
    inbox.answer(
        "/flaky",
        Answer {
            status: 500,
            ..Answer::default()
        },
    );
    let ping = app
        .post(&format!("/api/v1/webhook-endpoints/{id}/test"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), 202);
    let event_id = ping.json::<Value>().await.unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    let first = attempts_made(&app, key, id, 1).await;
    assert_eq!(first["status"], "pending");
    assert_eq!(first["last_status"], 500);
    assert_eq!(first["event_type"], "webhook.ping");
    // The retry is due about 5 s later on the server's clock (jittered by a fifth), not
    // before: the clock has not moved, so nothing more is sent.
    let due: chrono::DateTime<chrono::Utc> =
        first["next_attempt_at"].as_str().unwrap().parse().unwrap();
    let now = tollgate_core::Clock::now(&*app.clock);
    assert!(
        (4_000..=6_000).contains(&(due - now).num_milliseconds()),
        "{due} {now}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(inbox.received().len(), 1);

    // The second attempt meets a 503 with Retry-After: 600, which outlasts the 5-minute step.
    inbox.answer(
        "/flaky",
        Answer {
            status: 503,
            retry_after: Some(3_600),
            ..Answer::default()
        },
    );
    app.clock.advance(chrono::Duration::seconds(7));
    let second = attempts_made(&app, key, id, 2).await;
    let due: chrono::DateTime<chrono::Utc> =
        second["next_attempt_at"].as_str().unwrap().parse().unwrap();
    let now = tollgate_core::Clock::now(&*app.clock);
    assert!(
        (due - now).num_seconds() >= 3_599,
        "Retry-After honoured: {due} {now}"
    );

    // A redirect is not followed: it is a failed attempt.
    inbox.answer(
        "/flaky",
        Answer {
            status: 302,
            ..Answer::default()
        },
    );
    app.clock.advance(chrono::Duration::seconds(3_601));
    let third = attempts_made(&app, key, id, 3).await;
    assert!(third["last_error"].as_str().unwrap().contains("redirect"));

    // 410 Gone: the delivery fails and the endpoint is disabled.
    inbox.answer(
        "/flaky",
        Answer {
            status: 410,
            ..Answer::default()
        },
    );
    app.clock.advance(chrono::Duration::hours(1));
    let gone = attempts_made(&app, key, id, 4).await;
    assert_eq!(gone["status"], "failed");
    let endpoint = app
        .get_json(&format!("/api/v1/webhook-endpoints/{id}"), key)
        .await;
    assert_eq!(endpoint["enabled"], false);
    assert!(endpoint["disabled_reason"]
        .as_str()
        .unwrap()
        .contains("410"));
    let ids: std::collections::BTreeSet<_> = inbox
        .received()
        .iter()
        .map(|r| r.webhook_id.clone().unwrap())
        .collect();
    assert_eq!(
        ids.into_iter().collect::<Vec<_>>(),
        vec![event_id.clone()],
        "one id on every attempt"
    );

    // Enabled again and redelivered by hand: it arrives.
    inbox.answer("/flaky", Answer::default());
    let enabled = app
        .patch(&format!("/api/v1/webhook-endpoints/{id}"))
        .bearer_auth(key)
        .json(&json!({ "enabled": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(enabled.status(), 200);
    let again = app
        .post(&format!(
            "/api/v1/webhook-endpoints/{id}/deliveries/{event_id}/redeliver"
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 202);
    let delivered = attempts_made(&app, key, id, 5).await;
    assert_eq!(delivered["status"], "delivered");
    assert_eq!(delivered["last_status"], 204);
    let unknown = app
        .post(&format!(
            "/api/v1/webhook-endpoints/{id}/deliveries/msg_01JDQ1ZK8Q0000000000000000/redeliver"
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    expect_error(unknown, 404, "not_found").await;
}

#[tokio::test]
async fn a_slow_receiver_holds_up_only_itself() {
    let (app, inbox, acme) = listening_app(|raw| {
        raw.webhooks.attempt_timeout = "30s".into();
    })
    .await;
    let key = &acme.master_key;
    inbox.answer(
        "/slow",
        Answer {
            delay: Duration::from_secs(25),
            ..Answer::default()
        },
    );
    let slow = create_endpoint(&app, key, &inbox.url("/slow"), json!(["*"])).await;
    let fast = create_endpoint(&app, key, &inbox.url("/fast"), json!(["*"])).await;
    for endpoint in [&slow, &slow, &fast] {
        let ping = app
            .post(&format!(
                "/api/v1/webhook-endpoints/{}/test",
                endpoint["id"].as_str().unwrap()
            ))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(ping.status(), 202);
    }
    let fast_received = inbox.wait_for("/fast", 1, SOON).await;
    assert_eq!(fast_received.len(), 1, "the quick receiver got its ping");
    let slow_received = inbox.wait_for("/slow", 1, SOON).await;
    assert_eq!(
        slow_received.len(),
        1,
        "the slow one has one attempt in flight, its second ping waits"
    );
}

#[tokio::test]
async fn an_event_stored_before_a_crash_is_delivered_after_the_restart_under_its_id() {
    // The first life never sends: its sender looks once at start, then in an hour.
    let (app, inbox, acme) = listening_app(|raw| {
        raw.webhooks.poll_interval = "1h".into();
    })
    .await;
    let key = acme.master_key.clone();
    let endpoint = create_endpoint(&app, &key, &inbox.url("/hooks"), json!(["balance.low"])).await;
    set_low_balance(&app, &key, &acme.id.to_string(), "4.9995").await;
    assert_eq!(echo(&app, &key).await.status(), 200);
    app.state.ledger.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(inbox.received().is_empty());
    // The process ends without shutting down; the next one sends what the store kept.
    // The next process looks every 20 ms: a delivery the first one claimed as it stopped is
    // due again when that claim's lease ends (seconds), and is sent then.
    let app = app
        .restart_with(|raw| raw.webhooks.poll_interval = "20ms".into())
        .await;
    let received = inbox.wait_for("/hooks", 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(inbox.received().len(), 1, "delivered once");
    assert_eq!(body(&received[0])["type"], "balance.low");
    let log = deliveries(&app, &key, endpoint["id"].as_str().unwrap()).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["status"], "delivered");
    assert_eq!(
        log[0]["event_id"].as_str(),
        received[0].webhook_id.as_deref()
    );
}

#[tokio::test]
async fn a_key_expiring_within_a_week_is_announced_once_per_expiry() {
    let (app, inbox, acme) = listening_app(|_| {}).await;
    let key = &acme.master_key;
    create_endpoint(&app, key, &inbox.url("/hooks"), json!(["key.expiring"])).await;
    let now = tollgate_core::Clock::now(&*app.clock);
    let soon = now + chrono::Duration::days(3);
    let later = now + chrono::Duration::days(30);
    let (_, soon_id) = app
        .create_usage_key(key, json!({ "name": "soon", "expires_at": soon }))
        .await;
    app.create_usage_key(key, json!({ "name": "later", "expires_at": later }))
        .await;
    // Keys are looked at once a minute on the server's clock.
    app.clock.advance(chrono::Duration::seconds(61));
    let first = inbox.wait_for("/hooks", 1, SOON).await;
    let event = body(&first[0]);
    assert_eq!(event["type"], "key.expiring");
    assert_eq!(event["data"]["key_id"], soon_id.to_string());
    assert_eq!(
        event["data"]["expires_at"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap(),
        soon
    );
    app.clock.advance(chrono::Duration::seconds(61));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(inbox.received().len(), 1, "once per expiry");
    // Twenty-four days on, the other key is within its week.
    app.clock.advance(chrono::Duration::days(24));
    let both = inbox.wait_for("/hooks", 2, SOON).await;
    assert_eq!(body(&both[1])["data"]["name"], "later");
}

#[tokio::test]
async fn a_capped_key_is_announced_at_80_and_100_percent_of_its_cap_once_each() {
    let (app, inbox, acme) = listening_app(|_| {}).await;
    let key = &acme.master_key;
    create_endpoint(
        &app,
        key,
        &inbox.url("/hooks"),
        json!(["key.spend_threshold"]),
    )
    .await;
    // Five echo calls of 0.001 fill the cap.
    let (usage, usage_id) = app
        .create_usage_key(key, json!({ "name": "ci", "monthly_spend_cap": "0.005" }))
        .await;
    let mut requests = Vec::new();
    for _ in 0..5 {
        let call = echo(&app, &usage).await;
        assert_eq!(call.status(), 200);
        requests.push(common::request_id(&call));
    }
    expect_error(echo(&app, &usage).await, 402, "key_quota_exceeded").await;
    let both = inbox.wait_for("/hooks", 2, SOON).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(inbox.received().len(), 2, "once each");
    let (eighty, hundred) = (body(&both[0]), body(&both[1]));
    assert_eq!(eighty["type"], "key.spend_threshold");
    assert_eq!(eighty["data"]["percent"], 80);
    assert_eq!(eighty["data"]["key_id"], usage_id.to_string());
    assert_eq!(eighty["data"]["monthly_spend_cap"]["credits"], "0.005");
    assert!(requests.contains(&eighty["data"]["request_id"].as_str().unwrap().to_string()));
    assert_eq!(hundred["data"]["percent"], 100);
    assert_eq!(hundred["data"]["spent"]["credits"], "0.005");
    assert_eq!(hundred["data"]["request_id"], requests[4]);
}

#[tokio::test]
async fn an_allowance_announces_its_period_80_and_100_percent_and_a_manual_reset() {
    use tollgate_server::config::plans::{RawAllowance, RawPlan, RawUnits};
    let (app, inbox, acme) = listening_app(|raw| {
        raw.plans = vec![RawPlan {
            name: "free".into(),
            allowances: vec![RawAllowance {
                name: "calls".into(),
                meter: "requests".into(),
                routes: Some("echo".into()),
                units: RawUnits::Count(5),
                overage: "block".into(),
                rollover: None,
                windows: Vec::new(),
            }],
            ..RawPlan::default()
        }];
        raw.billing.default_plan = Some("free".into());
    })
    .await;
    let key = &acme.master_key;
    create_endpoint(
        &app,
        key,
        &inbox.url("/hooks"),
        json!(["allowance.threshold", "allowance.reset"]),
    )
    .await;
    let mut requests = Vec::new();
    for _ in 0..5 {
        let call = echo(&app, key).await;
        assert_eq!(call.status(), 200);
        requests.push(common::request_id(&call));
    }
    expect_error(echo(&app, key).await, 402, "allowance_exhausted").await;
    let three = inbox.wait_for("/hooks", 3, SOON).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(inbox.received().len(), 3, "{:?}", inbox.received());
    let (reset, eighty, hundred) = (body(&three[0]), body(&three[1]), body(&three[2]));
    assert_eq!(reset["type"], "allowance.reset");
    assert_eq!(reset["data"]["how"], "period");
    assert_eq!(reset["data"]["allowance"], "calls");
    assert_eq!(reset["data"]["granted"], 5);
    assert_eq!(eighty["type"], "allowance.threshold");
    assert_eq!(eighty["data"]["percent"], 80);
    assert_eq!(eighty["data"]["used"], 4);
    assert_eq!(hundred["data"]["percent"], 100);
    assert_eq!(hundred["data"]["used"], 5);
    // Each names the call whose settlement reached it (calls settle as their bodies end, so
    // not always in the order they were made).
    let crossed_by = |event: &Value| event["data"]["request_id"].as_str().unwrap().to_string();
    assert!(requests.contains(&crossed_by(&eighty)), "{eighty}");
    assert!(requests.contains(&crossed_by(&hundred)), "{hundred}");
    assert_ne!(crossed_by(&eighty), crossed_by(&hundred));

    // The operator resets the period: announced, and the thresholds fire again.
    let reset = app
        .admin_post(
            &format!("/api/v1/accounts/{}/allowances/calls/reset", acme.id),
            json!({ "reference": "support-1" }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200, "{}", reset.text().await.unwrap());
    for _ in 0..4 {
        assert_eq!(echo(&app, key).await.status(), 200);
    }
    let five = inbox.wait_for("/hooks", 5, SOON).await;
    assert_eq!(body(&five[3])["data"]["how"], "manual");
    assert_eq!(body(&five[4])["data"]["percent"], 80);
}

#[tokio::test]
async fn after_a_rotation_deliveries_carry_both_signatures_until_the_overlap_ends() {
    let (app, inbox, acme) = listening_app(|raw| raw.webhooks.rotation_overlap = "1h".into()).await;
    let key = &acme.master_key;
    let created = create_endpoint(&app, key, &inbox.url("/hooks"), json!(["*"])).await;
    let id = created["id"].as_str().unwrap();
    let old = created["secret"].as_str().unwrap().to_string();
    let rotated: Value = app
        .post(&format!("/api/v1/webhook-endpoints/{id}/rotate-secret"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new = rotated["secret"].as_str().unwrap().to_string();
    let ping = || async {
        let sent = app
            .post(&format!("/api/v1/webhook-endpoints/{id}/test"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 202);
    };
    ping().await;
    let during = inbox.wait_for("/hooks", 1, SOON).await;
    let signatures = during[0].webhook_signature.clone().unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
    assert_signed(&during[0], &new);
    assert_signed(&during[0], &old);
    // An hour on, the old secret no longer signs.
    app.clock.advance(chrono::Duration::minutes(61));
    ping().await;
    let after = inbox.wait_for("/hooks", 2, SOON).await;
    assert_eq!(
        after[1]
            .webhook_signature
            .as_deref()
            .unwrap()
            .split(' ')
            .count(),
        1
    );
    assert_signed(&after[1], &new);
    assert!(
        matches!(
            verify(&after[1], &old),
            Err(tollgate_client::webhook::WebhookError::NoMatch)
        ),
        "the old secret's signature is gone"
    );
}
