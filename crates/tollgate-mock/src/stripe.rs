//! A fake Stripe on 127.0.0.1: the API calls Tollgate makes (Checkout sessions, off-session
//! PaymentIntents, the event list), a hosted payment page, and signed webhook deliveries using
//! Stripe's real scheme (`Stripe-Signature: t=..,v1=HMAC-SHA256("t.body")`). Refunds and
//! disputes, which happen at Stripe, are made through [`FakeStripe`]'s methods (or
//! `POST /test/...`). Nothing here reaches the internet.
//!
//! Its own signer is written apart from Tollgate's verifier on purpose: the two meet only in
//! the scheme, so a mistake in one is caught by the other.

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;

/// How the fake answers and where it delivers.
#[derive(Debug, Clone)]
pub struct FakeStripeConfig {
    /// The secret API key callers must present.
    pub secret_key: String,
    /// Deliveries are signed with this.
    pub webhook_secret: String,
    /// Where events are delivered (`None`: only the event list has them).
    pub webhook_url: Option<String>,
}

#[derive(Default)]
struct Fake {
    counter: u64,
    /// Checkout sessions by id, as Stripe would show them.
    sessions: HashMap<String, Value>,
    /// Session ids by idempotency key.
    idempotent: HashMap<String, String>,
    /// PaymentIntents by id.
    intents: HashMap<String, Value>,
    /// Subscriptions by id, as Stripe would show them.
    subscriptions: HashMap<String, Value>,
    /// Every event, oldest first.
    events: Vec<Value>,
    webhook_url: Option<String>,
    /// Deliveries are made while this is on.
    delivering: bool,
    /// Every API answer waits this long (a slow Stripe).
    delay: Duration,
    /// API calls answer 500 (a Stripe outage) while this is on.
    down: bool,
    /// The card the hosted page pays with (and saves for later off-session charges).
    card: Option<String>,
}

struct Shared {
    config: FakeStripeConfig,
    addr: SocketAddr,
    fake: Mutex<Fake>,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Shared {
    fn fake(&self) -> MutexGuard<'_, Fake> {
        self.fake.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake Stripe; stops when dropped.
pub struct FakeStripe {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeStripe {
    pub async fn start(config: FakeStripeConfig) -> std::io::Result<FakeStripe> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config: config.clone(),
            addr,
            fake: Mutex::new(Fake {
                delivering: true,
                webhook_url: config.webhook_url.clone(),
                ..Fake::default()
            }),
            http: Client::builder(TokioExecutor::new()).build_http(),
        });
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake Stripe stopped");
            }
        });
        Ok(FakeStripe { addr, shared, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets where events are delivered (for a server started after the fake).
    pub fn deliver_to(&self, url: &str) {
        self.shared.fake().webhook_url = Some(url.to_string());
    }

    /// Whether deliveries are made (off: a missed delivery, for reconciliation).
    pub fn set_delivering(&self, on: bool) {
        self.shared.fake().delivering = on;
    }

    /// Every API answer waits `delay` first.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.fake().delay = delay;
    }

    /// API calls answer 500 while `down`.
    pub fn set_down(&self, down: bool) {
        self.shared.fake().down = down;
    }

    /// The card the hosted page pays with from now on (default `pm_card_visa`);
    /// `pm_card_authentication_required` or `pm_card_declined` make later off-session charges
    /// of it fail.
    pub fn set_card(&self, payment_method: &str) {
        self.shared.fake().card = Some(payment_method.to_string());
    }

    /// The Checkout session created under an idempotency key, if any.
    pub fn session_by_idempotency_key(&self, key: &str) -> Option<Value> {
        let fake = self.shared.fake();
        let id = fake.idempotent.get(key)?;
        fake.sessions.get(id).cloned()
    }

    /// How many PaymentIntents were created off-session (automatic top-ups), attempts that
    /// failed included; a retry with the same idempotency key is not a new one.
    pub fn off_session_charges(&self) -> usize {
        self.shared
            .fake()
            .intents
            .values()
            .filter(|i| i["off_session"] == true)
            .count()
    }

    /// Every event so far, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.shared.fake().events.clone()
    }

    /// The header Stripe would send with `body` at Unix time `t`, signed with `secret`.
    pub fn sign(body: &[u8], secret: &str, t: i64) -> String {
        format!("t={t},v1={}", signature(body, secret, t))
    }

    /// Pays a session as the customer would at the hosted page: delivers
    /// `checkout.session.completed` and `payment_intent.succeeded`. Returns the intent's id.
    pub async fn pay(&self, session: &str) -> Option<String> {
        pay(&self.shared, session, "paid").await
    }

    /// Pays a session by a method that settles later: `checkout.session.completed` with
    /// `payment_status: unpaid`; [`FakeStripe::settle`] completes it.
    pub async fn pay_later(&self, session: &str) -> Option<String> {
        pay(&self.shared, session, "unpaid").await
    }

    /// The delayed payment settled: `checkout.session.async_payment_succeeded`.
    pub async fn settle(&self, session: &str) {
        let object = {
            let mut fake = self.shared.fake();
            let Some(s) = fake.sessions.get_mut(session) else {
                return;
            };
            s["payment_status"] = json!("paid");
            s.clone()
        };
        emit(
            &self.shared,
            "checkout.session.async_payment_succeeded",
            object,
        )
        .await;
    }

    /// The session ran out unpaid: `checkout.session.expired`.
    pub async fn expire(&self, session: &str) {
        let object = {
            let mut fake = self.shared.fake();
            let Some(s) = fake.sessions.get_mut(session) else {
                return;
            };
            s["status"] = json!("expired");
            s.clone()
        };
        emit(&self.shared, "checkout.session.expired", object).await;
    }

    /// Refunds `amount` minor units of a payment: `refund.created` (succeeded) and
    /// `charge.refunded`. Returns the refund's id.
    pub async fn refund(&self, intent: &str, amount: i64) -> String {
        refund(&self.shared, intent, amount).await
    }

    /// Opens a dispute of `amount` minor units: `charge.dispute.created`. Returns its id.
    pub async fn dispute(&self, intent: &str, amount: i64) -> String {
        let (id, object) = {
            let mut fake = self.shared.fake();
            let id = next_id(&mut fake, "dp");
            let currency = fake
                .intents
                .get(intent)
                .and_then(|i| i["currency"].as_str().map(str::to_string))
                .unwrap_or_else(|| "usd".into());
            let object = json!({
                "id": id, "object": "dispute", "amount": amount, "currency": currency,
                "payment_intent": intent, "status": "needs_response",
            });
            (id, object)
        };
        emit(&self.shared, "charge.dispute.created", object).await;
        id
    }

    /// Closes a dispute as `won` or `lost`: `charge.dispute.closed`.
    pub async fn close_dispute(&self, dispute: &str, intent: &str, amount: i64, status: &str) {
        let object = json!({
            "id": dispute, "object": "dispute", "amount": amount, "currency": "usd",
            "payment_intent": intent, "status": status,
        });
        emit(&self.shared, "charge.dispute.closed", object).await;
    }

    /// Starts a subscription to `price` for `customer` (its `metadata.account_id` names the
    /// Tollgate account), in `status` (`active`, `trialing`, `incomplete`):
    /// `customer.subscription.created`. Returns its id.
    pub async fn subscribe(
        &self,
        customer: &str,
        account: &str,
        price: &str,
        status: &str,
    ) -> String {
        let (id, object) = {
            let mut fake = self.shared.fake();
            let id = next_id(&mut fake, "sub");
            let object = json!({
                "id": id, "object": "subscription", "customer": customer, "status": status,
                "start_date": now(), "metadata": {"account_id": account},
                "items": {"object": "list", "data": [{"object": "subscription_item", "price": {"id": price, "object": "price"}}]},
            });
            fake.subscriptions.insert(id.clone(), object.clone());
            (id, object)
        };
        emit(&self.shared, "customer.subscription.created", object).await;
        id
    }

    /// Changes a subscription's status, or its price (an upgrade):
    /// `customer.subscription.updated` (`canceled`: `customer.subscription.deleted`).
    pub async fn update_subscription(&self, id: &str, status: &str, price: Option<&str>) {
        let Some(object) = self.change_subscription(id, status, price) else {
            return;
        };
        let kind = if status == "canceled" {
            "customer.subscription.deleted"
        } else {
            "customer.subscription.updated"
        };
        emit(&self.shared, kind, object).await;
    }

    /// The subscription's renewal invoice: paid (`invoice.paid`, the subscription `active`) or
    /// failed (`invoice.payment_failed`, the subscription `past_due`), each followed by
    /// `customer.subscription.updated`. Returns the invoice's id.
    pub async fn invoice(&self, subscription: &str, paid: bool) -> String {
        let status = if paid { "active" } else { "past_due" };
        let Some(object) = self.change_subscription(subscription, status, None) else {
            return String::new();
        };
        let (id, invoice) = {
            let mut fake = self.shared.fake();
            let id = next_id(&mut fake, "in");
            let invoice = json!({
                "id": id, "object": "invoice", "customer": object["customer"],
                "subscription": subscription, "status": if paid { "paid" } else { "open" },
            });
            (id, invoice)
        };
        let kind = if paid {
            "invoice.paid"
        } else {
            "invoice.payment_failed"
        };
        emit(&self.shared, kind, invoice).await;
        emit(&self.shared, "customer.subscription.updated", object).await;
        id
    }

    fn change_subscription(&self, id: &str, status: &str, price: Option<&str>) -> Option<Value> {
        let mut fake = self.shared.fake();
        let object = fake.subscriptions.get_mut(id)?;
        object["status"] = json!(status);
        if let Some(price) = price {
            object["items"]["data"][0]["price"]["id"] = json!(price);
        }
        Some(object.clone())
    }

    /// Delivers an event again, as Stripe retries do.
    pub async fn redeliver(&self, event_id: &str) -> Option<u16> {
        let event = self
            .shared
            .fake()
            .events
            .iter()
            .find(|e| e["id"] == event_id)
            .cloned()?;
        deliver(&self.shared, &event).await
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/checkout/sessions", post(create_session))
        .route("/v1/payment_intents", post(create_intent))
        .route("/v1/events", get(list_events))
        .route("/v1/subscriptions/{id}", get(get_subscription))
        .route("/pay/{session}", get(hosted_page).post(hosted_pay))
        .route("/dashboard", get(dashboard))
        .route("/dashboard/refund/{intent}", post(dashboard_refund))
        .with_state(shared)
}

fn next_id(fake: &mut Fake, prefix: &str) -> String {
    fake.counter += 1;
    format!("{prefix}_fake{:08}", fake.counter)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn stripe_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body = json!({"error": {"type": kind, "code": code, "message": message}});
    (status, Json(body)).into_response()
}

/// The checks every API call passes first: the fake's outage and delay, and the secret key.
async fn admit(shared: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let (delay, down) = {
        let fake = shared.fake();
        (fake.delay, fake.down)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if down {
        return Err(stripe_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "outage",
            "The fake Stripe is down.",
        ));
    }
    let expected = format!("Bearer {}", shared.config.secret_key);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Err(stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "api_key_invalid",
            "Invalid API Key provided.",
        ));
    }
    Ok(())
}

async fn create_session(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = admit(&shared, &headers).await {
        return refused;
    }
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut fake = shared.fake();
    if let Some(existing) = key.as_ref().and_then(|k| fake.idempotent.get(k)) {
        if let Some(session) = fake.sessions.get(existing) {
            return Json(session.clone()).into_response();
        }
    }
    let amount: i64 = field("line_items[0][price_data][unit_amount]")
        .parse()
        .unwrap_or(0);
    if amount <= 0 || field("mode") != "payment" {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "parameter_invalid",
            "A payment session needs mode=payment and a positive unit_amount.",
        );
    }
    let id = next_id(&mut fake, "cs");
    let topup = field("metadata[topup_id]");
    let session = json!({
        "id": id,
        "object": "checkout.session",
        "mode": "payment",
        "status": "open",
        "payment_status": "unpaid",
        "payment_intent": null,
        "amount_total": amount,
        "currency": field("line_items[0][price_data][currency]"),
        "client_reference_id": field("client_reference_id"),
        "metadata": {"topup_id": topup},
        "success_url": field("success_url"),
        "cancel_url": field("cancel_url"),
        "expires_at": field("expires_at").parse::<i64>().unwrap_or(0),
        "url": format!("http://{}/pay/{id}", shared.addr),
    });
    fake.sessions.insert(id.clone(), session.clone());
    if let Some(key) = key {
        fake.idempotent.insert(key, id);
    }
    Json(session).into_response()
}

/// An off-session charge of a saved card. `pm_card_authentication_required` needs the
/// customer (402 `authentication_required`), `pm_card_declined` is declined; any other succeeds.
async fn create_intent(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = admit(&shared, &headers).await {
        return refused;
    }
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (intent, created) = {
        let mut fake = shared.fake();
        if let Some(existing) = key.as_ref().and_then(|k| fake.idempotent.get(k)) {
            if let Some(intent) = fake.intents.get(existing) {
                return Json(intent.clone()).into_response();
            }
        }
        let id = next_id(&mut fake, "pi");
        let method = field("payment_method");
        let (status, error) = match method.as_str() {
            "pm_card_authentication_required" => (
                "requires_action",
                Some((
                    "authentication_required",
                    "This payment needs the customer to authenticate.",
                )),
            ),
            "pm_card_declined" => (
                "requires_payment_method",
                Some(("card_declined", "Your card was declined.")),
            ),
            _ => ("succeeded", None),
        };
        let amount: i64 = field("amount").parse().unwrap_or(0);
        let intent = json!({
            "id": id,
            "object": "payment_intent",
            "amount": amount,
            "amount_received": if error.is_none() { amount } else { 0 },
            "currency": field("currency"),
            "customer": field("customer"),
            "status": status,
            "metadata": {"topup_id": field("metadata[topup_id]")},
            "last_payment_error": error.map(|(code, message)| json!({"code": code, "message": message})),
            "payment_method": method,
            "off_session": true,
        });
        fake.intents.insert(id.clone(), intent.clone());
        if let Some(key) = key {
            fake.idempotent.insert(key, id);
        }
        (intent, error)
    };
    match created {
        None => {
            emit(&shared, "payment_intent.succeeded", intent.clone()).await;
            Json(intent).into_response()
        }
        Some((code, message)) => {
            emit(&shared, "payment_intent.payment_failed", intent.clone()).await;
            let body = json!({"error": {
                "type": "card_error", "code": code, "message": message, "payment_intent": intent,
            }});
            (StatusCode::PAYMENT_REQUIRED, Json(body)).into_response()
        }
    }
}

/// A subscription as it stands now.
async fn get_subscription(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if let Err(refused) = admit(&shared, &headers).await {
        return refused;
    }
    match shared.fake().subscriptions.get(&id) {
        Some(object) => Json(object.clone()).into_response(),
        None => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "resource_missing",
            "No such subscription.",
        ),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(rename = "created[gte]")]
    created_gte: Option<i64>,
    starting_after: Option<String>,
    limit: Option<usize>,
}

/// Events newest first, as Stripe lists them; `starting_after` pages towards older ones.
async fn list_events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Response {
    if let Err(refused) = admit(&shared, &headers).await {
        return refused;
    }
    let fake = shared.fake();
    let since = query.created_gte.unwrap_or(0);
    let mut newest_first: Vec<&Value> = fake
        .events
        .iter()
        .rev()
        .filter(|e| e["created"].as_i64().unwrap_or(0) >= since)
        .collect();
    if let Some(after) = &query.starting_after {
        if let Some(at) = newest_first.iter().position(|e| e["id"] == after.as_str()) {
            newest_first.drain(..=at);
        }
    }
    let limit = query.limit.unwrap_or(10).clamp(1, 100);
    let has_more = newest_first.len() > limit;
    newest_first.truncate(limit);
    Json(json!({"object": "list", "data": newest_first, "has_more": has_more})).into_response()
}

async fn hosted_page(State(shared): State<Arc<Shared>>, Path(session): Path<String>) -> Response {
    let fake = shared.fake();
    let Some(s) = fake.sessions.get(&session) else {
        return (StatusCode::NOT_FOUND, "No such checkout session.").into_response();
    };
    let amount = s["amount_total"].as_i64().unwrap_or(0);
    let currency = s["currency"].as_str().unwrap_or("").to_ascii_uppercase();
    let cancel = s["cancel_url"].as_str().unwrap_or("/");
    Html(format!(
        "<!doctype html><html><head><title>Fake Stripe Checkout</title></head><body>\
         <h1>Fake Stripe Checkout</h1><p>Pay <strong id=\"amount\">{}.{:02} {currency}</strong> for credits.</p>\
         <form method=\"post\" action=\"/pay/{session}\"><button id=\"pay\" type=\"submit\">Pay</button></form>\
         <p><a id=\"cancel\" href=\"{cancel}\">Cancel</a></p></body></html>",
        amount / 100,
        amount % 100
    ))
    .into_response()
}

async fn hosted_pay(State(shared): State<Arc<Shared>>, Path(session): Path<String>) -> Response {
    if pay(&shared, &session, "paid").await.is_none() {
        return (StatusCode::NOT_FOUND, "No such checkout session.").into_response();
    }
    let success = shared
        .fake()
        .sessions
        .get(&session)
        .and_then(|s| s["success_url"].as_str().map(str::to_string))
        .unwrap_or_else(|| "/".into());
    Redirect::to(&success).into_response()
}

/// A page listing the payments made, each with a refund form: what an operator does in
/// Stripe's dashboard.
async fn dashboard(State(shared): State<Arc<Shared>>) -> Response {
    let fake = shared.fake();
    let mut rows = String::new();
    let mut intents: Vec<&Value> = fake
        .intents
        .values()
        .filter(|i| i["status"] == "succeeded")
        .collect();
    intents.sort_by_key(|i| i["id"].as_str().unwrap_or("").to_string());
    for intent in intents {
        let id = intent["id"].as_str().unwrap_or("");
        let amount = intent["amount_received"].as_i64().unwrap_or(0);
        rows.push_str(&format!(
            "<tr><td><code>{id}</code></td><td>{}.{:02} {}</td><td>\
             <form method=\"post\" action=\"/dashboard/refund/{id}\">\
             <input name=\"amount\" value=\"{}.{:02}\" size=\"8\"> \
             <button type=\"submit\">Refund</button></form></td></tr>",
            amount / 100,
            amount % 100,
            intent["currency"]
                .as_str()
                .unwrap_or("")
                .to_ascii_uppercase(),
            amount / 100,
            amount % 100,
        ));
    }
    Html(format!(
        "<!doctype html><html><head><title>Fake Stripe dashboard</title></head><body>\
         <h1>Fake Stripe dashboard</h1><p>Payments received. A refund is sent to the gateway \
         as Stripe would send it.</p><table><thead><tr><th>Payment</th><th>Amount</th>\
         <th>Refund</th></tr></thead><tbody>{rows}</tbody></table></body></html>"
    ))
    .into_response()
}

#[derive(Deserialize)]
struct RefundForm {
    amount: String,
}

async fn dashboard_refund(
    State(shared): State<Arc<Shared>>,
    Path(intent): Path<String>,
    Form(form): Form<RefundForm>,
) -> Response {
    let cents = form.amount.trim().split_once('.').map_or_else(
        || form.amount.trim().parse::<i64>().ok().map(|u| u * 100),
        |(units, cents)| {
            let units = units.parse::<i64>().ok()?;
            let cents = format!("{cents:0<2}");
            (cents.len() == 2).then_some(())?;
            Some(units * 100 + cents.parse::<i64>().ok()?)
        },
    );
    let known = shared.fake().intents.contains_key(&intent);
    match cents.filter(|c| *c > 0) {
        Some(cents) if known => {
            refund(&shared, &intent, cents).await;
            Redirect::to("/dashboard").into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            "Give a positive amount, such as 10 or 2.50.",
        )
            .into_response(),
    }
}

/// Completes a session: an intent is made for it, and `checkout.session.completed` (and, when
/// paid, `payment_intent.succeeded`) are emitted. `None` for an unknown or completed session.
async fn pay(shared: &Shared, session: &str, payment_status: &str) -> Option<String> {
    let (completed, intent) = {
        let mut fake = shared.fake();
        let open = fake.sessions.get(session)?["status"] == "open";
        if !open {
            return None;
        }
        let intent_id = next_id(&mut fake, "pi");
        let customer = next_id(&mut fake, "cus");
        let card = fake.card.clone().unwrap_or_else(|| "pm_card_visa".into());
        let s = fake.sessions.get_mut(session)?;
        s["status"] = json!("complete");
        s["payment_status"] = json!(payment_status);
        s["payment_intent"] = json!(intent_id);
        let completed = s.clone();
        let amount = completed["amount_total"].as_i64().unwrap_or(0);
        let intent = json!({
            "id": intent_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_received": if payment_status == "paid" { amount } else { 0 },
            "currency": completed["currency"],
            "status": if payment_status == "paid" { "succeeded" } else { "processing" },
            "metadata": completed["metadata"],
            "last_payment_error": null,
            "customer": customer,
            "payment_method": card,
        });
        fake.intents.insert(intent_id.clone(), intent.clone());
        (completed, intent)
    };
    let id = intent["id"].as_str().map(str::to_string);
    emit(shared, "checkout.session.completed", completed).await;
    if payment_status == "paid" {
        emit(shared, "payment_intent.succeeded", intent).await;
    }
    id
}

async fn refund(shared: &Shared, intent: &str, amount: i64) -> String {
    let (id, object, charge) = {
        let mut fake = shared.fake();
        let id = next_id(&mut fake, "re");
        let currency = fake
            .intents
            .get(intent)
            .and_then(|i| i["currency"].as_str().map(str::to_string))
            .unwrap_or_else(|| "usd".into());
        let object = json!({
            "id": id, "object": "refund", "amount": amount, "currency": currency,
            "payment_intent": intent, "status": "succeeded",
        });
        let charge = json!({
            "id": format!("ch_{intent}"), "object": "charge", "payment_intent": intent,
            "currency": currency, "refunds": {"object": "list", "data": [object.clone()]},
        });
        (id, object, charge)
    };
    emit(shared, "refund.created", object).await;
    emit(shared, "charge.refunded", charge).await;
    id
}

/// Records an event about `object` and delivers it (if deliveries are on).
async fn emit(shared: &Shared, kind: &str, object: Value) {
    let event = {
        let mut fake = shared.fake();
        let id = next_id(&mut fake, "evt");
        let event = json!({
            "id": id,
            "object": "event",
            "api_version": "2025-01-27.acacia",
            "created": now(),
            "type": kind,
            "livemode": false,
            "data": {"object": object},
        });
        fake.events.push(event.clone());
        event
    };
    deliver(shared, &event).await;
}

/// Posts an event to the webhook URL, signed now; the status it was answered with.
async fn deliver(shared: &Shared, event: &Value) -> Option<u16> {
    let url = {
        let fake = shared.fake();
        if !fake.delivering {
            return None;
        }
        fake.webhook_url.clone()?
    };
    let body = serde_json::to_vec(event).ok()?;
    let header = FakeStripe::sign(&body, &shared.config.webhook_secret, now());
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .header("stripe-signature", header)
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let response = shared.http.request(request).await.ok()?;
    Some(response.status().as_u16())
}

fn signature(body: &[u8], secret: &str, t: i64) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
