//! Card top-ups end to end, against the fake Stripe on 127.0.0.1: a checkout credited exactly
//! once whatever events report it, only for what was asked, in any order; refunds and
//! disputes taken back exactly, spent credit turning into debt that stops paid calls until a
//! top-up pays it; signatures refused with no effect; Stripe down costs nothing; a missed
//! delivery found by reconciliation; subscription and invoice events setting an account's plan.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{assert_books_balance, expect_error, spawn_app_with, TestAccount, TestApp};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate_mock::stripe::{FakeStripe, FakeStripeConfig};
use tollgate_server::config::plans::{RawAllowance, RawPackOffer, RawPlan, RawUnits};
use tollgate_server::config::{RawConfig, RawStripe, Secret};

const SECRET_KEY: &str = "sk_test_fake_key";
const WEBHOOK_SECRET: &str = "whsec_fake_current";
const OLD_WEBHOOK_SECRET: &str = "whsec_fake_previous";

struct Shop {
    app: TestApp,
    stripe: FakeStripe,
}

async fn shop() -> Shop {
    shop_with(|_| {}).await
}

async fn shop_with(customize: impl FnOnce(&mut RawStripe)) -> Shop {
    shop_configured(customize, |_| {}).await
}

async fn shop_configured(
    customize: impl FnOnce(&mut RawStripe),
    configure: impl FnOnce(&mut RawConfig),
) -> Shop {
    let stripe = FakeStripe::start(FakeStripeConfig {
        secret_key: SECRET_KEY.into(),
        webhook_secret: WEBHOOK_SECRET.into(),
        webhook_url: None,
    })
    .await
    .unwrap();
    let mut settings = RawStripe {
        secret_key: Some(Secret(SECRET_KEY.into())),
        webhook_secrets: vec![
            Secret(OLD_WEBHOOK_SECRET.into()),
            Secret(WEBHOOK_SECRET.into()),
        ],
        api_base: stripe.url(),
        success_url: "http://127.0.0.1/console/wallet?topup={TOPUP_ID}".into(),
        cancel_url: "http://127.0.0.1/console/wallet".into(),
        timeout: "2s".into(),
        reconcile_interval: "0s".into(),
        ..RawStripe::default()
    };
    customize(&mut settings);
    let app = spawn_app_with(|raw, _| {
        raw.payments.stripe = Some(settings);
        configure(raw);
    })
    .await;
    stripe.deliver_to(&format!("{}/webhooks/stripe", app.url));
    Shop { app, stripe }
}

impl Shop {
    /// `POST /api/v1/topups` with `key` and `body`: the answer.
    async fn post_topup(&self, key: &str, body: Value) -> reqwest::Response {
        self.app
            .post("/api/v1/topups")
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Starts a top-up of `amount` for the account; the top-up as answered.
    async fn top_up(&self, account: &TestAccount, amount: &str) -> Value {
        let response = self
            .post_topup(&account.master_key, json!({"amount": amount}))
            .await;
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    async fn topup(&self, account: &TestAccount, id: &str) -> Value {
        self.app
            .get_json(&format!("/api/v1/topups/{id}"), &account.master_key)
            .await
    }

    async fn balance(&self, account: &TestAccount) -> Value {
        self.app
            .get_json("/api/v1/billing/balance", &account.master_key)
            .await
    }

    async fn available(&self, account: &TestAccount) -> String {
        self.balance(account).await["available"]["credits"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Posts `event` signed with `secret` now; the answer.
    async fn deliver(&self, event: &Value, secret: &str) -> reqwest::Response {
        let body = serde_json::to_vec(event).unwrap();
        let header = FakeStripe::sign(&body, secret, chrono::Utc::now().timestamp());
        self.app
            .post("/webhooks/stripe")
            .header("stripe-signature", header)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// The fake's events of a type, oldest first.
    fn events_of(&self, kind: &str) -> Vec<Value> {
        self.stripe
            .events()
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// The account's ledger entries filed under a top-up, oldest first: (kind, amount).
    async fn entries_of(&self, account: &TestAccount, topup: &str) -> Vec<(String, String)> {
        let ledger = self
            .app
            .get_json("/api/v1/ledger?limit=500", &account.master_key)
            .await;
        let mut entries: Vec<(String, String)> = ledger["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reference"].as_str().unwrap().contains(topup))
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_string(),
                    e["amount"]["credits"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        entries.reverse();
        entries
    }
}

fn session_of(topup: &Value) -> String {
    topup["checkout_session"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_checkout_top_up_is_credited_once_whatever_events_report_it() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    assert_eq!(shop.available(&account).await, "5");
    let topup = shop.top_up(&account, "25").await;
    assert_eq!(topup["status"], "pending");
    assert_eq!(topup["amount"]["credits"], "25");
    let id = topup["id"].as_str().unwrap();
    // Asked of Stripe under the top-up's id: as the idempotency key, the client reference and
    // in the metadata, so a retried create makes no second session.
    let session = shop.stripe.session_by_idempotency_key(id).unwrap();
    assert_eq!(session["id"], topup["checkout_session"]);
    assert_eq!(session["client_reference_id"], id);
    assert_eq!(session["metadata"]["topup_id"], id);
    assert_eq!(
        (session["mode"].as_str(), session["amount_total"].as_i64()),
        (Some("payment"), Some(2500))
    );
    // The customer's page is Stripe's, asking exactly the top-up's amount.
    let page = reqwest::get(topup["checkout_url"].as_str().unwrap())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("25.00 USD"), "{page}");

    let intent = shop.stripe.pay(&session_of(&topup)).await.unwrap();
    assert_eq!(shop.available(&account).await, "30");
    let paid = shop.topup(&account, id).await;
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["payment_intent"], intent.as_str());
    assert!(
        paid["checkout_url"].is_null(),
        "a paid top-up offers no checkout"
    );

    // Every event again, each twice; and the async-success event for the same payment.
    for event in shop.stripe.events() {
        for _ in 0..2 {
            let status = shop.stripe.redeliver(event["id"].as_str().unwrap()).await;
            assert_eq!(status, Some(200));
        }
    }
    let mut async_success = shop.events_of("checkout.session.completed")[0].clone();
    async_success["id"] = json!("evt_async_success_1");
    async_success["type"] = json!("checkout.session.async_payment_succeeded");
    let answer = shop.deliver(&async_success, WEBHOOK_SECRET).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(shop.available(&account).await, "30");
    assert_eq!(
        shop.entries_of(&account, id).await,
        [("grant".to_string(), "25".to_string())]
    );
    assert_books_balance(&shop.app, account.id).await;
}

#[tokio::test]
async fn a_payment_that_disagrees_with_its_top_up_credits_nothing_and_is_flagged() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let topup = shop.top_up(&account, "25").await;
    let id = topup["id"].as_str().unwrap();
    shop.stripe.set_delivering(false);
    shop.stripe.pay(&session_of(&topup)).await.unwrap();
    let completed = shop.events_of("checkout.session.completed")[0].clone();

    for (n, (field, value)) in [("amount_total", json!(100)), ("currency", json!("eur"))]
        .into_iter()
        .enumerate()
    {
        let mut forged = completed.clone();
        forged["id"] = json!(format!("evt_disagrees_{n}"));
        forged["data"]["object"][field] = value;
        let answer = shop.deliver(&forged, WEBHOOK_SECRET).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.json::<Value>().await.unwrap()["outcome"], "flagged");
    }
    assert_eq!(shop.available(&account).await, "5");
    let flagged = shop.topup(&account, id).await;
    assert_eq!(flagged["status"], "pending");
    assert!(
        flagged["review"].as_str().unwrap().contains("100"),
        "{flagged}"
    );
    // The true event still credits, once.
    assert_eq!(shop.deliver(&completed, WEBHOOK_SECRET).await.status(), 200);
    assert_eq!(shop.available(&account).await, "30");
}

#[tokio::test]
async fn an_unpaid_checkout_waits_for_its_payment_to_settle() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let topup = shop.top_up(&account, "10").await;
    let id = topup["id"].as_str().unwrap();
    shop.stripe.pay_later(&session_of(&topup)).await.unwrap();
    assert_eq!(shop.topup(&account, id).await["status"], "processing");
    assert_eq!(shop.available(&account).await, "5");
    shop.stripe.settle(&session_of(&topup)).await;
    assert_eq!(shop.topup(&account, id).await["status"], "paid");
    assert_eq!(shop.available(&account).await, "15");

    // An expired checkout credits nothing and ends expired.
    let other = shop.top_up(&account, "10").await;
    shop.stripe.expire(&session_of(&other)).await;
    let expired = shop.topup(&account, other["id"].as_str().unwrap()).await;
    assert_eq!(expired["status"], "expired");
    assert_eq!(shop.available(&account).await, "15");
}

#[tokio::test]
async fn a_webhook_is_refused_with_no_effect_unless_a_v1_matches_in_time() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let topup = shop.top_up(&account, "25").await;
    shop.stripe.set_delivering(false);
    shop.stripe.pay(&session_of(&topup)).await.unwrap();
    let event = shop.events_of("checkout.session.completed")[0].clone();
    let body = serde_json::to_vec(&event).unwrap();
    // The server's clock, not the wall's: under load they drift apart past the stale margin.
    let now = tollgate_core::Clock::now(&*shop.app.clock).timestamp();
    let good = FakeStripe::sign(&body, WEBHOOK_SECRET, now);
    let v1 = good.split("v1=").nth(1).unwrap().to_string();
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let refused: Vec<(&str, Option<String>, Vec<u8>)> = vec![
        ("no header", None, body.clone()),
        (
            "another secret",
            Some(FakeStripe::sign(&body, "whsec_someone_else", now)),
            body.clone(),
        ),
        (
            "stale",
            Some(FakeStripe::sign(&body, WEBHOOK_SECRET, now - 301)),
            body.clone(),
        ),
        (
            "future",
            Some(FakeStripe::sign(&body, WEBHOOK_SECRET, now + 301)),
            body.clone(),
        ),
        ("tampered body", Some(good.clone()), tampered),
        ("empty v1", Some(format!("t={now},v1=")), body.clone()),
        ("no t", Some(format!("v1={v1}")), body.clone()),
        (
            "not json",
            Some(FakeStripe::sign(b"{oops", WEBHOOK_SECRET, now)),
            b"{oops".to_vec(),
        ),
    ];
    for (case, header, body) in refused {
        let mut request = shop.app.post("/webhooks/stripe").body(body);
        if let Some(header) = header {
            request = request.header("stripe-signature", header);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400, "{case}");
        expect_error(response, 400, "bad_request").await;
        assert_eq!(shop.available(&account).await, "5", "{case}");
    }
    // Signed with the old secret during a rotation, with the good v1 after a bad one, on the
    // path with a trailing slash: accepted, never redirected.
    let rotated = FakeStripe::sign(&body, OLD_WEBHOOK_SECRET, now);
    let header = format!("{},v1={}", rotated, "00".repeat(32));
    let response = shop
        .app
        .post("/webhooks/stripe/")
        .header("stripe-signature", header)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(shop.available(&account).await, "30");

    // A type Tollgate does not act on is recorded and answered 200.
    let other = json!({"id": "evt_other_type", "type": "customer.created", "data": {"object": {"id": "cus_1", "object": "customer"}}});
    let answer = shop.deliver(&other, WEBHOOK_SECRET).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap()["outcome"], "ignored");

    let get = shop.app.get("/webhooks/stripe").send().await.unwrap();
    expect_error(get, 405, "method_not_allowed").await;
    let huge = vec![b' '; 300 * 1024];
    let response = shop
        .app
        .post("/webhooks/stripe")
        .header(
            "stripe-signature",
            FakeStripe::sign(&huge, WEBHOOK_SECRET, now),
        )
        .body(huge)
        .send()
        .await
        .unwrap();
    expect_error(response, 413, "payload_too_large").await;
}

#[tokio::test]
async fn stripe_down_slow_or_gone_is_503_and_the_top_up_failed_with_nothing_charged() {
    let shop = shop_with(|s| s.timeout = "300ms".into()).await;
    let account = shop.app.create_account("buyer").await;
    let attempt = || async {
        let response = shop
            .post_topup(&account.master_key, json!({"amount": "25"}))
            .await;
        assert!(response.headers().contains_key("retry-after"));
        let body = expect_error(response, 503, "service_unavailable").await;
        assert_eq!(body["error"]["details"]["dependency"], "payments");
    };
    shop.stripe.set_down(true);
    attempt().await;
    shop.stripe.set_down(false);
    shop.stripe.set_delay(Duration::from_secs(2));
    attempt().await;
    shop.stripe.set_delay(Duration::ZERO);
    let listed = shop
        .app
        .get_json("/api/v1/topups", &account.master_key)
        .await;
    let statuses: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["failed", "failed"]);
    assert_eq!(shop.available(&account).await, "5");

    // Nothing listening at all.
    let gone = shop_with(|s| s.api_base = "http://127.0.0.1:9".into()).await;
    let account = gone.app.create_account("buyer").await;
    let response = gone
        .post_topup(&account.master_key, json!({"amount": "25"}))
        .await;
    expect_error(response, 503, "service_unavailable").await;
}

#[tokio::test]
async fn top_up_amounts_owners_and_keys_are_checked() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let other = shop.app.create_account("other").await;
    for (amount, why) in [
        ("4.99", "below min_topup"),
        ("10001", "over max_topup"),
        ("10.001", "a fraction of a cent"),
        ("x", "not an amount"),
    ] {
        let response = shop
            .post_topup(&account.master_key, json!({"amount": amount}))
            .await;
        let refused = expect_error(response, 400, "validation_error").await;
        assert!(
            refused["error"]["field_errors"]["amount"].is_array(),
            "{why}: {refused}"
        );
    }
    let topup = shop.top_up(&account, "5").await;
    let path = format!("/api/v1/topups/{}", topup["id"].as_str().unwrap());
    let response = shop.app.get_as(&path, &other.master_key).await;
    expect_error(response, 404, "not_found").await;
    let (usage, _) = shop
        .app
        .create_usage_key(&account.master_key, json!({"name": "u"}))
        .await;
    let response = shop.post_topup(&usage, json!({"amount": "5"})).await;
    expect_error(response, 403, "forbidden").await;
    let listed = shop.app.get_json("/api/v1/topups", &other.master_key).await;
    assert_eq!(listed["data"], json!([]));
    // A customer cannot start a top-up for another account (it would be that account's credit,
    // paid with this customer's card: no use to an attacker, but not its business either).
    let response = shop
        .post_topup(
            &other.master_key,
            json!({"amount": "5", "account_id": account.id.to_string()}),
        )
        .await;
    expect_error(response, 404, "not_found").await;
}

/// Spends `amount` of the account's credit through the billing API (a hold settled in full).
async fn spend(app: &TestApp, account: &TestAccount, amount: &str) -> reqwest::Response {
    let hold = app
        .post("/api/v1/holds")
        .bearer_auth(&account.master_key)
        .json(&json!({"amount": amount}))
        .send()
        .await
        .unwrap();
    if hold.status() != 201 {
        return hold;
    }
    let hold: Value = hold.json().await.unwrap();
    app.post(&format!(
        "/api/v1/holds/{}/settle",
        hold["id"].as_str().unwrap()
    ))
    .bearer_auth(&account.master_key)
    .json(&json!({"amount": amount}))
    .send()
    .await
    .unwrap()
}

#[tokio::test]
async fn a_refund_takes_back_its_share_once_and_spent_credit_becomes_debt_a_top_up_pays() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let topup = shop.top_up(&account, "25").await;
    let id = topup["id"].as_str().unwrap().to_string();
    let intent = shop.stripe.pay(&session_of(&topup)).await.unwrap();
    assert_eq!(shop.available(&account).await, "30");

    let refund = shop.stripe.refund(&intent, 1000).await;
    assert_eq!(shop.available(&account).await, "20");
    for event in shop
        .events_of("refund.created")
        .into_iter()
        .chain(shop.events_of("charge.refunded"))
    {
        shop.stripe.redeliver(event["id"].as_str().unwrap()).await;
    }
    assert_eq!(shop.available(&account).await, "20");
    let partly = shop.topup(&account, &id).await;
    assert_eq!(partly["status"], "partially_refunded");
    assert_eq!(partly["refunded"]["credits"], "10");
    assert!(!refund.is_empty());

    // The customer spends nearly everything, then the rest of the payment is refunded.
    assert_eq!(spend(&shop.app, &account, "18").await.status(), 200);
    assert_eq!(shop.available(&account).await, "2");
    shop.stripe.refund(&intent, 1500).await;
    let balance = shop.balance(&account).await;
    assert_eq!(balance["available"]["credits"], "0");
    assert_eq!(balance["debt"]["credits"], "13");
    assert_eq!(shop.topup(&account, &id).await["status"], "refunded");

    // No paid call while the account owes, on the data plane or the billing API.
    let (key, _) = shop
        .app
        .create_usage_key(&account.master_key, json!({"name": "u"}))
        .await;
    let call = shop
        .app
        .post("/v1/chat/completions")
        .bearer_auth(&key)
        .json(&json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    expect_error(call, 402, "account_in_debt").await;
    let call = shop
        .app
        .post("/echo/x")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let refused = expect_error(call, 402, "account_in_debt").await;
    assert_eq!(
        refused["error"]["details"]["debt"]["credits"], "13",
        "{refused}"
    );
    let refused = spend(&shop.app, &account, "0.5").await;
    expect_error(refused, 402, "account_in_debt").await;
    // The console's overview says so.
    let cookie = console_cookie(&shop.app, &account.master_key).await;
    let overview = console_get(&shop.app, "/console/", &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(overview.contains("id=\"debt\""), "{overview}");
    assert!(overview.contains("13 USD"), "{overview}");

    // A new top-up pays the debt first; the rest is spendable.
    let second = shop.top_up(&account, "20").await;
    shop.stripe.pay(&session_of(&second)).await.unwrap();
    let balance = shop.balance(&account).await;
    assert_eq!(balance["available"]["credits"], "7");
    assert_eq!(balance["debt"]["credits"], "0");
    let call = shop
        .app
        .post("/v1/chat/completions")
        .bearer_auth(&key)
        .json(&json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
    assert_eq!(
        shop.entries_of(&account, &id).await,
        [
            ("grant".to_string(), "25".to_string()),
            ("refund".to_string(), "10".to_string()),
            ("refund".to_string(), "2".to_string()),
            ("debt".to_string(), "13".to_string()),
        ]
    );
    assert_books_balance(&shop.app, account.id).await;
}

#[tokio::test]
async fn a_dispute_sets_its_credit_aside_until_it_is_won_back_or_lost() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let won = shop.top_up(&account, "25").await;
    let intent = shop.stripe.pay(&session_of(&won)).await.unwrap();
    let dispute = shop.stripe.dispute(&intent, 2500).await;
    assert_eq!(shop.available(&account).await, "5");
    assert_eq!(
        shop.topup(&account, won["id"].as_str().unwrap()).await["status"],
        "disputed"
    );
    shop.stripe
        .close_dispute(&dispute, &intent, 2500, "won")
        .await;
    assert_eq!(shop.available(&account).await, "30");
    assert_eq!(
        shop.topup(&account, won["id"].as_str().unwrap()).await["dispute"],
        "won"
    );

    let lost = shop.top_up(&account, "10").await;
    let intent = shop.stripe.pay(&session_of(&lost)).await.unwrap();
    assert_eq!(spend(&shop.app, &account, "35").await.status(), 200);
    let dispute = shop.stripe.dispute(&intent, 1000).await;
    let balance = shop.balance(&account).await;
    assert_eq!(
        (
            balance["available"]["credits"].as_str(),
            balance["debt"]["credits"].as_str()
        ),
        (Some("0"), Some("5"))
    );
    shop.stripe
        .close_dispute(&dispute, &intent, 1000, "lost")
        .await;
    // Delivered again, late: nothing moves twice, and a closed dispute does not reopen.
    for event in shop.events_of("charge.dispute.created") {
        shop.stripe.redeliver(event["id"].as_str().unwrap()).await;
    }
    let balance = shop.balance(&account).await;
    assert_eq!(
        (
            balance["available"]["credits"].as_str(),
            balance["debt"]["credits"].as_str()
        ),
        (Some("0"), Some("5"))
    );
    assert_eq!(
        shop.topup(&account, lost["id"].as_str().unwrap()).await["dispute"],
        "lost"
    );
    assert_books_balance(&shop.app, account.id).await;
}

#[tokio::test]
async fn reconciliation_credits_a_missed_delivery_once() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let topup = shop.top_up(&account, "25").await;
    shop.stripe.set_delivering(false);
    shop.stripe.pay(&session_of(&topup)).await.unwrap();
    assert_eq!(shop.available(&account).await, "5");
    let since = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    for handled in [2, 0] {
        let found: Value = shop
            .app
            .admin_post("/api/v1/payments/reconcile", json!({"since": since}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(found["events"], 2, "{found}");
        assert_eq!(found["handled"], handled, "{found}");
        assert_eq!(shop.available(&account).await, "30");
    }
    let refused = shop
        .app
        .post("/api/v1/payments/reconcile")
        .bearer_auth(&account.master_key)
        .json(&json!({"since": since}))
        .send()
        .await
        .unwrap();
    expect_error(refused, 403, "forbidden").await;
}

/// A payment's whole life as Stripe might report it, for the top-up `topup` (25 credits):
/// paid, two refunds (5 and 3), a dispute of 7 opened and lost.
fn lifecycle(topup: &str, session: &str) -> Vec<Value> {
    let event = |id: &str, kind: &str, object: Value| json!({"id": id, "object": "event", "type": kind, "created": 1, "data": {"object": object}});
    let refund = |id: &str, amount: i64| json!({"id": id, "object": "refund", "amount": amount, "currency": "usd", "payment_intent": "pi_life", "status": "succeeded"});
    let dispute = |status: &str| json!({"id": "dp_life", "object": "dispute", "amount": 700, "currency": "usd", "payment_intent": "pi_life", "status": status});
    vec![
        event(
            "evt_l1",
            "checkout.session.completed",
            json!({"id": session, "object": "checkout.session", "payment_status": "paid", "payment_intent": "pi_life", "amount_total": 2500, "currency": "usd", "client_reference_id": topup, "metadata": {"topup_id": topup}}),
        ),
        event(
            "evt_l2",
            "payment_intent.succeeded",
            json!({"id": "pi_life", "object": "payment_intent", "amount_received": 2500, "currency": "usd", "metadata": {"topup_id": topup}}),
        ),
        event("evt_l3", "refund.created", refund("re_life1", 500)),
        event(
            "evt_l4",
            "charge.refunded",
            json!({"id": "ch_life", "payment_intent": "pi_life", "refunds": {"data": [refund("re_life1", 500), refund("re_life2", 300)]}}),
        ),
        event("evt_l5", "refund.created", refund("re_life2", 300)),
        event(
            "evt_l6",
            "charge.dispute.created",
            dispute("needs_response"),
        ),
        event("evt_l7", "charge.dispute.closed", dispute("lost")),
    ]
}

/// What a history leaves: wallet, debt, the top-up's status, refunded, dispute.
async fn ending(order: &[usize]) -> (String, String, String, String, String) {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let topup = shop.top_up(&account, "25").await;
    let id = topup["id"].as_str().unwrap();
    let events = lifecycle(id, &session_of(&topup));
    for &i in order {
        let answer = shop.deliver(&events[i], WEBHOOK_SECRET).await;
        assert_eq!(answer.status(), 200, "{}", events[i]);
    }
    let balance = shop.balance(&account).await;
    let topup = shop.topup(&account, id).await;
    assert_books_balance(&shop.app, account.id).await;
    let text = |v: &Value| v.as_str().unwrap_or("none").to_string();
    (
        text(&balance["available"]["credits"]),
        text(&balance["debt"]["credits"]),
        text(&topup["status"]),
        text(&topup["refunded"]["credits"]),
        text(&topup["dispute"]),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Any order, with any event delivered again: the same ending, and a final state never
    /// left for an earlier one.
    #[test]
    fn the_same_events_in_any_order_end_in_the_same_ledger(
        order in Just((0..7usize).collect::<Vec<_>>()).prop_shuffle(),
        again in proptest::collection::vec(0..7usize, 0..4),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        let mut history = order.clone();
        history.extend(again);
        let ended = runtime.block_on(ending(&history));
        // 5 starter + 25 paid - 5 - 3 refunded - 7 disputed and lost.
        let expected = ("15".to_string(), "0".to_string(), "disputed".to_string(), "8".to_string(), "lost".to_string());
        prop_assert_eq!(ended, expected);
    }
}

#[tokio::test]
async fn each_node_reconciles_by_itself_every_interval() {
    let shop = shop_with(|s| s.reconcile_interval = "1s".into()).await;
    let account = shop.app.create_account("buyer").await;
    let topup = shop.top_up(&account, "25").await;
    shop.stripe.set_delivering(false);
    shop.stripe.pay(&session_of(&topup)).await.unwrap();
    until_available(&shop, &account, "30").await;
    // Later rounds find nothing new to do.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(shop.available(&account).await, "30");
}

/// What `check` finds, once it finds something: asked every 50 ms, for at most 10 s.
async fn until<T, F: std::future::Future<Output = Option<T>>>(check: impl Fn() -> F) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_available(shop: &Shop, account: &TestAccount, expected: &str) {
    until(|| async { (shop.available(account).await == expected).then_some(()) }).await;
}

async fn set_auto(shop: &Shop, account: &TestAccount, body: Value) -> reqwest::Response {
    shop.app
        .http
        .put(format!("{}/api/v1/auto-topup", shop.app.url))
        .bearer_auth(&account.master_key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn auto_top_up_buys_with_the_saved_card_below_the_threshold_at_most_n_a_month() {
    let shop = shop_with(|s| s.auto_topup_interval = "100ms".into()).await;
    let account = shop.app.create_account("buyer").await;
    // Turned on before any card is saved: on, and waiting for one.
    let rule = json!({"threshold": "5", "amount": "20", "max_per_month": 2});
    let answer: Value = set_auto(&shop, &account, rule.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (answer["enabled"].as_bool(), answer["card_saved"].as_bool()),
        (Some(true), Some(false))
    );
    // Paying once by card saves it.
    let first = shop.top_up(&account, "10").await;
    shop.stripe.pay(&session_of(&first)).await.unwrap();
    let answer = shop
        .app
        .get_json("/api/v1/auto-topup", &account.master_key)
        .await;
    assert_eq!(answer["card_saved"], true);
    assert_eq!(shop.available(&account).await, "15");

    // Down to 3: one automatic top-up of 20, exactly.
    assert_eq!(spend(&shop.app, &account, "12").await.status(), 200);
    until_available(&shop, &account, "23").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(shop.available(&account).await, "23");
    assert_eq!(shop.stripe.off_session_charges(), 1);

    // Again below: the second and last of the month.
    assert_eq!(spend(&shop.app, &account, "20").await.status(), 200);
    until_available(&shop, &account, "23").await;
    assert_eq!(spend(&shop.app, &account, "20").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(shop.available(&account).await, "3", "a third in one month");
    assert_eq!(shop.stripe.off_session_charges(), 2);
    let listed = shop
        .app
        .get_json("/api/v1/topups", &account.master_key)
        .await;
    let origins: Vec<(&str, &str)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["origin"].as_str().unwrap(), t["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        origins,
        [("auto", "paid"), ("auto", "paid"), ("checkout", "paid")]
    );
    assert_books_balance(&shop.app, account.id).await;

    // Turned off, nothing more starts.
    let off: Value = shop
        .app
        .http
        .delete(format!("{}/api/v1/auto-topup", shop.app.url))
        .bearer_auth(&account.master_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(off["enabled"], false);
    let bad = set_auto(
        &shop,
        &account,
        json!({"threshold": "5", "amount": "1", "max_per_month": 0}),
    )
    .await;
    let refused = expect_error(bad, 400, "validation_error").await;
    assert!(
        refused["error"]["field_errors"]["amount"].is_array(),
        "{refused}"
    );
    assert!(
        refused["error"]["field_errors"]["max_per_month"].is_array(),
        "{refused}"
    );
}

#[tokio::test]
async fn a_card_that_needs_the_customer_turns_auto_top_up_off_and_says_why() {
    let shop = shop_with(|s| s.auto_topup_interval = "100ms".into()).await;
    let account = shop.app.create_account("buyer").await;
    shop.stripe.set_card("pm_card_authentication_required");
    let first = shop.top_up(&account, "10").await;
    shop.stripe.pay(&session_of(&first)).await.unwrap();
    let rule = json!({"threshold": "20", "amount": "20", "max_per_month": 5});
    assert_eq!(set_auto(&shop, &account, rule).await.status(), 200);
    let answer = until(|| async {
        let answer = shop
            .app
            .get_json("/api/v1/auto-topup", &account.master_key)
            .await;
        (answer["enabled"] == false).then_some(answer)
    })
    .await;
    assert!(
        answer["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("confirm"),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(shop.stripe.off_session_charges(), 1, "tried once, then off");
    assert_eq!(shop.available(&account).await, "15");
    let listed = shop
        .app
        .get_json("/api/v1/topups", &account.master_key)
        .await;
    assert_eq!(listed["data"][0]["origin"], "auto");
    assert_eq!(listed["data"][0]["status"], "failed");
    // The account is told, on its wallet page too.
    let cookie = console_cookie(&shop.app, &account.master_key).await;
    let wallet = console_get(&shop.app, "/console/wallet", &cookie).await;
    let page = wallet.text().await.unwrap();
    assert!(page.contains("id=\"auto-off\""), "{page}");
    assert!(page.contains("confirm this payment"), "{page}");
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in to the console; the `Cookie` header a browser would send back.
async fn console_cookie(app: &TestApp, credential: &str) -> String {
    let response = browser()
        .post(format!("{}/console/sign-in", app.url))
        .header("sec-fetch-site", "same-origin")
        .form(&[("credential", credential)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let set = response.headers()["set-cookie"].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

async fn console_get(app: &TestApp, path: &str, cookie: &str) -> reqwest::Response {
    browser()
        .get(format!("{}{path}", app.url))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_console_sends_the_customer_to_pay_and_says_what_came_of_it() {
    let shop = shop().await;
    let account = shop.app.create_account("buyer").await;
    let cookie = console_cookie(&shop.app, &account.master_key).await;
    let wallet = console_get(&shop.app, "/console/wallet", &cookie).await;
    // The wallet's form may be sent on to the payment page's origin, and nowhere else new.
    let policy = wallet.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        policy.contains(&format!(
            "form-action 'self' https://checkout.stripe.com {}",
            shop.stripe.url()
        )),
        "{policy}"
    );
    assert!(wallet.text().await.unwrap().contains("Add credits"));

    let sent = browser()
        .post(format!("{}/console/wallet/topup", shop.app.url))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .form(&[("amount", "25")])
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 303);
    let checkout = sent.headers()["location"].to_str().unwrap().to_string();
    assert!(
        checkout.starts_with(&format!("{}/pay/", shop.stripe.url())),
        "{checkout}"
    );
    let session = checkout.rsplit('/').next().unwrap();
    shop.stripe.pay(session).await.unwrap();
    let topup = shop
        .app
        .get_json("/api/v1/topups", &account.master_key)
        .await["data"][0]
        .clone();
    let back = format!("/console/wallet?topup={}", topup["id"].as_str().unwrap());

    // Back from another site, no cookie comes: the page reloads itself once, from this site.
    let cross_site = browser()
        .get(format!("{}{back}", shop.app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 200);
    let reload = cross_site.text().await.unwrap();
    assert!(reload.contains("http-equiv=\"refresh\""), "{reload}");
    assert!(
        reload.contains("&back=true") || reload.contains("&#38;back=true"),
        "{reload}"
    );
    let again = browser()
        .get(format!("{}{back}&back=true", shop.app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        303,
        "with no session the second time: the sign-in page"
    );

    let shown = console_get(&shop.app, &back, &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(shown.contains("Payment received: 25 USD"), "{shown}");
    assert!(shown.contains("data-nanos=\"30000000000\""), "{shown}");

    let refused = browser()
        .post(format!("{}/console/wallet/topup", shop.app.url))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .form(&[("amount", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused
        .text()
        .await
        .unwrap()
        .contains("must be from 5 to 10000"));

    // Automatic top-up, on and off, from the same page.
    let post = |path: &'static str, form: Vec<(&'static str, &'static str)>| {
        browser()
            .post(format!("{}{path}", shop.app.url))
            .header("cookie", &cookie)
            .header("sec-fetch-site", "same-origin")
            .form(&form)
            .send()
    };
    let on = post(
        "/console/wallet/auto-topup",
        vec![("threshold", "5"), ("amount", "20"), ("max_per_month", "2")],
    )
    .await
    .unwrap();
    assert_eq!(on.status(), 303);
    let page = console_get(&shop.app, "/console/wallet", &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"auto-on\""), "{page}");
    assert!(page.contains("buy 20 USD, at most 2 a month"), "{page}");
    let rule = shop
        .app
        .get_json("/api/v1/auto-topup", &account.master_key)
        .await;
    assert_eq!(
        (rule["enabled"].as_bool(), rule["card_saved"].as_bool()),
        (Some(true), Some(true))
    );
    let wrong = post(
        "/console/wallet/auto-topup",
        vec![("threshold", "5"), ("amount", "20"), ("max_per_month", "0")],
    )
    .await
    .unwrap();
    assert_eq!(wrong.status(), 400);
    assert!(wrong.text().await.unwrap().contains("max_per_month"));
    let off = post("/console/wallet/auto-topup/off", vec![])
        .await
        .unwrap();
    assert_eq!(off.status(), 303);
    let rule = shop
        .app
        .get_json("/api/v1/auto-topup", &account.master_key)
        .await;
    assert_eq!(rule["enabled"], false);
}

/// `free` (the default) and the plans sold through Stripe: `pro` as `price_pro`, `max` as
/// `price_max`; and a pack of 10 echo calls for 2.50.
async fn shop_with_plans() -> Shop {
    shop_configured(
        |stripe| stripe.auto_topup_interval = "100ms".into(),
        |raw| {
            receivers_on_loopback(raw);
            raw.packs = vec![RawPackOffer {
                name: "calls-10".into(),
                meter: "requests".into(),
                routes: Some("echo".into()),
                units: RawUnits::Count(10),
                price: "2.50".into(),
                valid_for: "30d".into(),
            }];
            let plan = |name: &str, units: i64, prices: &[&str]| RawPlan {
                name: name.into(),
                grace: "3d".into(),
                stripe_prices: prices.iter().map(|p| p.to_string()).collect(),
                allowances: vec![RawAllowance {
                    name: "calls".into(),
                    meter: "requests".into(),
                    routes: Some("echo".into()),
                    units: RawUnits::Count(units),
                    overage: "block".into(),
                    rollover: None,
                    windows: Vec::new(),
                }],
                ..RawPlan::default()
            };
            raw.plans = vec![
                plan("free", 3, &[]),
                plan("pro", 50, &["price_pro"]),
                plan("max", 500, &["price_max"]),
            ];
            raw.billing.default_plan = Some("free".into());
        },
    )
    .await
}

/// The account's plan and its subscription's status, as `GET /billing/allowances` shows them.
async fn plan_of(shop: &Shop, account: &TestAccount) -> (String, Value) {
    let body = shop
        .app
        .get_json("/api/v1/billing/allowances", &account.master_key)
        .await;
    (
        body["plan"].as_str().unwrap().to_string(),
        body["subscription"]["status"].clone(),
    )
}

/// The id of the newest event of `kind` the fake emitted.
fn newest_event(stripe: &FakeStripe, kind: &str) -> String {
    let events = stripe.events();
    let event = events.iter().rev().find(|e| e["type"] == kind).unwrap();
    event["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn stripe_subscription_and_invoice_events_set_the_accounts_plan_as_stripe_has_it_now() {
    let shop = shop_with_plans().await;
    let account = shop.app.create_account("subscriber").await;
    let id = account.id.to_string();
    // Not paid yet: nothing changes.
    let sub = shop
        .stripe
        .subscribe("cus_1", &id, "price_pro", "incomplete")
        .await;
    assert_eq!(plan_of(&shop, &account).await, ("free".into(), Value::Null));
    shop.stripe.update_subscription(&sub, "active", None).await;
    assert_eq!(
        plan_of(&shop, &account).await,
        ("pro".into(), json!("active"))
    );

    // A renewal that fails: past due, calls pass with a warning within the grace.
    shop.stripe.invoice(&sub, false).await;
    assert_eq!(
        plan_of(&shop, &account).await,
        ("pro".into(), json!("past_due"))
    );
    let call = echo(&shop, &account).await;
    assert_eq!(call.status(), 200);
    assert!(call.headers()["x-tollgate-warning"]
        .to_str()
        .unwrap()
        .contains("past_due"));

    // Paid, then upgraded, delivered late and newest first: Stripe's state now wins.
    shop.stripe.set_delivering(false);
    shop.stripe.invoice(&sub, true).await;
    let paid = newest_event(&shop.stripe, "invoice.paid");
    shop.stripe
        .update_subscription(&sub, "active", Some("price_max"))
        .await;
    let upgraded = newest_event(&shop.stripe, "customer.subscription.updated");
    shop.stripe.set_delivering(true);
    assert_eq!(shop.stripe.redeliver(&upgraded).await, Some(200));
    assert_eq!(
        plan_of(&shop, &account).await,
        ("max".into(), json!("active"))
    );
    assert_eq!(shop.stripe.redeliver(&paid).await, Some(200));
    assert_eq!(
        plan_of(&shop, &account).await,
        ("max".into(), json!("active"))
    );
    // A delivery handled before does nothing again.
    assert_eq!(shop.stripe.redeliver(&upgraded).await, Some(200));

    // Stripe down while an event arrives: 503, nothing changes, and its redelivery applies it.
    shop.stripe.set_delivering(false);
    shop.stripe
        .update_subscription(&sub, "canceled", None)
        .await;
    let canceled = newest_event(&shop.stripe, "customer.subscription.deleted");
    shop.stripe.set_delivering(true);
    shop.stripe.set_down(true);
    assert_eq!(shop.stripe.redeliver(&canceled).await, Some(503));
    assert_eq!(
        plan_of(&shop, &account).await,
        ("max".into(), json!("active"))
    );
    shop.stripe.set_down(false);
    assert_eq!(shop.stripe.redeliver(&canceled).await, Some(200));
    assert_eq!(
        plan_of(&shop, &account).await,
        ("max".into(), json!("canceled"))
    );
    let refused = echo(&shop, &account).await;
    expect_error(refused, 402, "subscription_lapsed").await;
}

#[tokio::test]
async fn a_stripe_subscription_for_no_account_here_or_no_plan_changes_nothing() {
    let shop = shop_with_plans().await;
    let account = shop.app.create_account("bystander").await;
    let id = account.id.to_string();
    // A price no plan is sold as, and an account id that is not one.
    shop.stripe
        .subscribe("cus_2", &id, "price_unknown", "active")
        .await;
    shop.stripe
        .subscribe(
            "cus_3",
            "acct_01JZZZZZZZZZZZZZZZZZZZZZZZ",
            "price_pro",
            "active",
        )
        .await;
    shop.stripe
        .subscribe("cus_4", "not an id", "price_pro", "active")
        .await;
    assert_eq!(plan_of(&shop, &account).await, ("free".into(), Value::Null));
}

async fn echo(shop: &Shop, account: &TestAccount) -> reqwest::Response {
    let call = shop.app.get("/echo/x").bearer_auth(&account.master_key);
    call.send().await.unwrap()
}

#[tokio::test]
async fn a_pack_bought_by_card_is_granted_once_when_its_payment_is_credited() {
    let shop = shop_with_plans().await;
    let account = shop.app.create_account("card-buyer").await;
    let topup = shop
        .post_topup(&account.master_key, json!({"pack": "calls-10"}))
        .await;
    assert_eq!(topup.status(), 201);
    let topup: Value = topup.json().await.unwrap();
    assert_eq!(topup["amount"]["credits"], "2.5");
    assert_eq!(topup["pack"], "calls-10");
    let id = topup["id"].as_str().unwrap().to_string();
    let session = shop.stripe.session_by_idempotency_key(&id).unwrap();
    assert_eq!(session["amount_total"], 250);

    shop.stripe.pay(&session_of(&topup)).await.unwrap();
    // Credited and spent on the pack at once: the wallet is as it was, the pack is there.
    assert_eq!(shop.available(&account).await, "5");
    let packs = || async {
        let body = shop
            .app
            .get_json("/api/v1/billing/allowances", &account.master_key)
            .await;
        body["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["source"] == "pack")
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["granted"].as_u64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(packs().await, [(format!("topup.{id}"), 10)]);
    // Every event again: nothing more is credited, paid or granted.
    for event in shop.stripe.events() {
        let status = shop.stripe.redeliver(event["id"].as_str().unwrap()).await;
        assert_eq!(status, Some(200));
    }
    assert_eq!(shop.available(&account).await, "5");
    assert_eq!(packs().await, [(format!("topup.{id}"), 10)]);
    assert_eq!(
        shop.entries_of(&account, &id).await,
        [
            ("grant".to_string(), "2.5".to_string()),
            ("fee".to_string(), "2.5".to_string())
        ],
        "credited once, spent on the pack once"
    );
    assert_books_balance(&shop.app, account.id).await;

    // From the console: "Buy by card" goes to the payment page for the pack's price.
    let cookie = console_cookie(&shop.app, &account.master_key).await;
    let wallet = console_get(&shop.app, "/console/wallet", &cookie).await;
    assert!(wallet.text().await.unwrap().contains("Buy by card"));
    let sent = browser()
        .post(format!("{}/console/wallet/packs", shop.app.url))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .form(&[("pack", "calls-10"), ("order", "o1"), ("pay", "card")])
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 303);
    let checkout = sent.headers()["location"].to_str().unwrap().to_string();
    let session = checkout.rsplit('/').next().unwrap().to_string();
    shop.stripe.pay(&session).await.unwrap();
    assert_eq!(packs().await.len(), 2);
    assert_eq!(shop.available(&account).await, "5");

    // A pack not on offer, or an amount beside a pack, starts nothing.
    for body in [
        json!({"pack": "calls-none"}),
        json!({"pack": "calls-10", "amount": "2.50"}),
        json!({}),
    ] {
        let refused = shop.post_topup(&account.master_key, body).await;
        expect_error(refused, 400, "validation_error").await;
    }
}

/// Webhook endpoints may be on this machine (the test's receiver), and the sender looks often.
fn receivers_on_loopback(raw: &mut RawConfig) {
    raw.webhooks.allow_http = true;
    raw.webhooks.allow_private = vec!["127.0.0.0/8".into()];
    raw.webhooks.poll_interval = "20ms".into();
}

/// A receiver and an endpoint of the account at it, for `events`.
async fn listening(
    shop: &Shop,
    account: &TestAccount,
    events: Value,
) -> tollgate_mock::receiver::WebhookReceiver {
    let inbox = tollgate_mock::receiver::WebhookReceiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let created = shop
        .app
        .post("/api/v1/webhook-endpoints")
        .bearer_auth(&account.master_key)
        .json(&json!({"url": inbox.url("/pay"), "events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    inbox
}

/// Each movement of a card payment is announced to the account's webhooks once, however often
/// Stripe reports it: credited, refunded, disputed.
#[tokio::test]
async fn a_top_up_its_refund_and_its_dispute_are_each_announced_once() {
    let shop = shop_configured(|_| {}, receivers_on_loopback).await;
    let account = shop.app.create_account("buyer").await;
    let inbox = listening(
        &shop,
        &account,
        json!(["topup.succeeded", "topup.refunded", "dispute.opened"]),
    )
    .await;
    let topup = shop.top_up(&account, "25").await;
    let intent = shop.stripe.pay(&session_of(&topup)).await.unwrap();
    for event in shop.events_of("checkout.session.completed") {
        shop.stripe.redeliver(event["id"].as_str().unwrap()).await;
    }
    shop.stripe.refund(&intent, 1000).await;
    for event in shop.events_of("refund.created") {
        shop.stripe.redeliver(event["id"].as_str().unwrap()).await;
    }
    shop.stripe.dispute(&intent, 500).await;
    let received = inbox.wait_for("/pay", 3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kinds: Vec<(String, String)> = inbox
        .received()
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_str(&r.body).unwrap();
            (
                body["type"].as_str().unwrap().to_string(),
                body["data"]["amount"]["credits"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("topup.succeeded".to_string(), "25".to_string()),
            ("topup.refunded".to_string(), "10".to_string()),
            ("dispute.opened".to_string(), "5".to_string()),
        ]
    );
    let first: Value = serde_json::from_str(&received[0].body).unwrap();
    assert_eq!(first["data"]["topup_id"], topup["id"]);
    assert_eq!(first["data"]["amount"]["currency"], "USD");
}

/// A failed renewal makes the subscription past due: announced once, however often Stripe says
/// so; and an automatic top-up whose card is refused is announced as failed, with the reason.
#[tokio::test]
async fn a_subscription_past_due_and_a_failed_automatic_top_up_are_announced() {
    let shop = shop_with_plans().await;
    let account = shop.app.create_account("subscriber").await;
    let inbox = listening(
        &shop,
        &account,
        json!(["subscription.past_due", "topup.failed"]),
    )
    .await;
    let sub = shop
        .stripe
        .subscribe("cus_1", &account.id.to_string(), "price_pro", "active")
        .await;
    shop.stripe.invoice(&sub, false).await;
    shop.stripe
        .redeliver(&newest_event(&shop.stripe, "invoice.payment_failed"))
        .await;
    let past_due = inbox.wait_for("/pay", 1, Duration::from_secs(10)).await;
    let event: Value = serde_json::from_str(&past_due[0].body).unwrap();
    assert_eq!(event["type"], "subscription.past_due");
    assert_eq!(event["data"]["plan"], "pro");
    assert_eq!(event["data"]["subscription_id"], sub.as_str());
    // Paid again, then a later renewal fails: a new episode, announced again.
    shop.stripe.invoice(&sub, true).await;
    shop.stripe.invoice(&sub, false).await;
    let again = inbox.wait_for("/pay", 2, Duration::from_secs(10)).await;
    let event: Value = serde_json::from_str(&again[1].body).unwrap();
    assert_eq!(event["type"], "subscription.past_due");

    shop.stripe.set_card("pm_card_authentication_required");
    let first = shop.top_up(&account, "10").await;
    shop.stripe.pay(&session_of(&first)).await.unwrap();
    let rule = json!({"threshold": "20", "amount": "20", "max_per_month": 5});
    assert_eq!(set_auto(&shop, &account, rule).await.status(), 200);
    // The next automatic top-up round finds the balance under the threshold by itself.
    let all = inbox.wait_for("/pay", 3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(inbox.received().len(), 3, "each once");
    let failed: Value = serde_json::from_str(&all[2].body).unwrap();
    assert_eq!(failed["type"], "topup.failed");
    assert_eq!(failed["data"]["amount"]["credits"], "20");
    assert!(failed["data"]["reason"].is_string(), "{failed}");
}
