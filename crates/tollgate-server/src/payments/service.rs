//! The payments service: starting a top-up, what each Stripe event does, and reconciling with
//! Stripe's event list.
//!
//! Exactly once, in any order. Every money movement a payment makes is a ledger transfer filed
//! under `payment:<top-up>:<what>` (`credit`, `refund:<re_…>`, `dispute:<dp_…>:open|won|lost`),
//! which the store accepts once per account (a unique index), so two deliveries of one event,
//! on one node or two, move money once. An event is recorded (by Stripe's id) before it is
//! handled and marked handled after: a redelivery of a handled event does nothing, and one
//! whose handling was cut short runs again, which is safe because every step is keyed. A
//! refund or dispute that arrives before its payment waits and runs once the payment is
//! credited, so any order of the same events ends in the same ledger.

use crate::access::keys::KeyCache;
use crate::billing::allowances::buy_pack;
use crate::billing::ledger::{GrantRefused, Granted, Ledger, Movement};
use crate::config::plans::Plans;
use crate::config::StripeSettings;
use crate::payments::signature::{self, SignatureError};
use crate::payments::stripe::{
    Charge, CheckoutSession, Dispute, Event, IntentRequest, PaymentIntent, Refund, SessionRequest,
    StripeClient, StripeError,
};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::sync::Arc;
use tollgate_core::ledger::month_start;
use tollgate_core::ledger::{LedgerAccount, TransferKind};
use tollgate_core::notify::{self, Event as NotifyEvent, EventType};
use tollgate_core::payment::{credits_to_minor, minor_to_credits, TopUpStatus};
use tollgate_core::plan::{Subscription, SubscriptionStatus};
use tollgate_core::{AccountId, Clock, Nanos, TopUpId};
use tollgate_store::{AutoTopUp, Crossing, PaymentEvent, Store, StoreError, TopUp, TopUpOrigin};

/// Why a top-up could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TopUpRefused {
    /// The amount is outside the configured bounds or not a whole number of cents.
    #[error("{0}")]
    Amount(String),
    /// Stripe did not create the checkout; the top-up is recorded as failed.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a webhook delivery was refused, with no effect.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryRefused {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("the body is not a Stripe event: {0}")]
    Malformed(String),
}

/// Why an event could not be handled now (the store or the ledger did not answer): Stripe is
/// answered 503 and delivers it again.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stripe did not answer a call Tollgate made (reconciliation, an automatic top-up).
    #[error("the payment provider did not answer: {0}")]
    Provider(String),
    #[error("the ledger did not confirm the movement in time")]
    Unconfirmed,
    #[error("the movement would pass the balance limit")]
    OverLimit,
}

impl From<GrantRefused> for HandleError {
    fn from(refused: GrantRefused) -> Self {
        match refused {
            GrantRefused::Store(e) => HandleError::Store(e),
            GrantRefused::Unconfirmed => HandleError::Unconfirmed,
            GrantRefused::OverLimit => HandleError::OverLimit,
        }
    }
}

/// What an event did, as recorded with it and answered to Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handled before: nothing done.
    Duplicate,
    Credited,
    /// Paid, but by a method that settles later.
    Processing,
    Expired,
    Failed,
    Refunded,
    DisputeOpened,
    DisputeWon,
    DisputeLost,
    /// About a payment not credited yet: kept, and handled once it is.
    Waiting,
    /// Its amount or currency disagreed with the top-up: nothing credited, flagged for review.
    Flagged,
    /// A subscription event: the account's subscription set as Stripe has it now.
    Subscribed,
    /// Nothing to do: a type Tollgate does not act on, or no top-up of ours.
    Ignored,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Duplicate => "duplicate",
            Outcome::Credited => "credited",
            Outcome::Processing => "processing",
            Outcome::Expired => "expired",
            Outcome::Failed => "failed",
            Outcome::Refunded => "refunded",
            Outcome::DisputeOpened => "dispute_opened",
            Outcome::DisputeWon => "dispute_won",
            Outcome::DisputeLost => "dispute_lost",
            Outcome::Waiting => "waiting",
            Outcome::Flagged => "flagged",
            Outcome::Subscribed => "subscribed",
            Outcome::Ignored => "ignored",
        }
    }
}

/// What a reconciliation found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    pub events: u64,
    /// Events not handled before (missed deliveries), now handled.
    pub handled: u64,
}

pub struct Payments {
    settings: StripeSettings,
    /// Which plan each Stripe Price sells.
    plans: Plans,
    stripe: StripeClient,
    store: Arc<dyn Store>,
    ledger: Arc<Ledger>,
    keys: Arc<KeyCache>,
    clock: Arc<dyn Clock>,
    /// Events are handled one at a time on a node, so a payment's waiting events are replayed
    /// in order; across nodes the store's keyed movements and conditional updates decide.
    turn: tokio::sync::Mutex<()>,
}

impl Payments {
    pub fn new(
        settings: StripeSettings,
        plans: Plans,
        store: Arc<dyn Store>,
        ledger: Arc<Ledger>,
        keys: Arc<KeyCache>,
        clock: Arc<dyn Clock>,
    ) -> Payments {
        let stripe =
            StripeClient::new(&settings.api_base, &settings.secret_key.0, settings.timeout);
        Payments {
            settings,
            plans,
            stripe,
            store,
            ledger,
            keys,
            clock,
            turn: tokio::sync::Mutex::new(()),
        }
    }

    pub fn settings(&self) -> &StripeSettings {
        &self.settings
    }

    /// The origins a customer is sent to, to pay: Stripe Checkout's, and the API's own when it
    /// is not Stripe's (a fake, which hosts its page there).
    pub fn checkout_origins(&self) -> Vec<String> {
        let mut origins = vec!["https://checkout.stripe.com".to_string()];
        let base = &self.settings.api_base;
        if base != "https://api.stripe.com" {
            let origin = base.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
            origins.push(origin);
        }
        origins
    }

    /// Starts a card top-up of `amount` credits: the top-up is written `pending` first, then
    /// Stripe is asked for a Checkout session (keyed by the top-up's id, so a retried create
    /// makes no second one). If Stripe does not answer, the top-up ends `failed` and nothing
    /// else changed.
    pub async fn start_topup(
        &self,
        account: AccountId,
        amount: Nanos,
        pack: Option<&str>,
    ) -> Result<TopUp, TopUpRefused> {
        let s = &self.settings;
        // A pack's price is the operator's: only free amounts keep to the bounds.
        if pack.is_none() && (amount < s.min_topup || amount > s.max_topup) {
            return Err(TopUpRefused::Amount(format!(
                "must be from {} to {}",
                s.min_topup, s.max_topup
            )));
        }
        let Some(amount_minor) = credits_to_minor(amount, &s.currency) else {
            return Err(TopUpRefused::Amount(format!(
                "must be a whole number of {} minor units (cents)",
                s.currency
            )));
        };
        let now = self.clock.now();
        let mut topup = TopUp {
            id: TopUpId::new(),
            account_id: account,
            amount,
            amount_minor,
            currency: s.currency.clone(),
            status: TopUpStatus::Pending,
            origin: TopUpOrigin::Checkout,
            checkout_session: None,
            checkout_url: None,
            payment_intent: None,
            dispute: None,
            review: None,
            failure: None,
            auto_key: None,
            pack: pack.map(str::to_string),
            created_at: now,
            updated_at: now,
        };
        self.store.create_topup(&topup).await?;
        let id = topup.id.to_string();
        let expires_at = now
            + chrono::Duration::from_std(s.session_expiry).unwrap_or(chrono::Duration::hours(1));
        let created = self
            .stripe
            .create_checkout_session(&SessionRequest {
                topup: &id,
                amount_minor,
                currency: &s.currency,
                product: &pack.map_or("Credits".to_string(), |p| format!("Credit pack {p}")),
                success_url: &s.success_url.replace("{TOPUP_ID}", &id),
                cancel_url: &s.cancel_url.replace("{TOPUP_ID}", &id),
                expires_at: expires_at.timestamp(),
            })
            .await;
        match created {
            Ok(session) => {
                let at = self.clock.now();
                self.store
                    .set_checkout(topup.id, &session.id, &session.url, at)
                    .await?;
                topup.checkout_session = Some(session.id);
                topup.checkout_url = Some(session.url);
                topup.updated_at = at;
                Ok(topup)
            }
            Err(e) => {
                tracing::warn!(topup = %topup.id, error = %e, "the checkout was not created");
                let failure = match &e {
                    StripeError::Refused { .. } => "the payment provider refused the checkout",
                    _ => "the payment provider did not answer",
                };
                self.store
                    .move_topup(
                        topup.id,
                        TopUpStatus::Failed,
                        None,
                        Some(failure),
                        self.clock.now(),
                    )
                    .await?;
                Err(TopUpRefused::Unavailable(e.to_string()))
            }
        }
    }

    /// A webhook delivery: checked, recorded and handled. Nothing changes unless the signature
    /// is good.
    pub async fn receive(
        &self,
        signature_header: Option<&str>,
        body: &[u8],
    ) -> Result<Result<Outcome, HandleError>, DeliveryRefused> {
        let secrets: Vec<&str> = self
            .settings
            .webhook_secrets
            .iter()
            .map(|s| s.0.as_str())
            .collect();
        signature::verify(
            signature_header,
            body,
            &secrets,
            self.clock.now().timestamp(),
            self.settings.signature_tolerance,
        )?;
        let event: Event =
            serde_json::from_slice(body).map_err(|e| DeliveryRefused::Malformed(e.to_string()))?;
        let payload = String::from_utf8_lossy(body).into_owned();
        Ok(self.handle(event, payload).await)
    }

    /// Handles an event (from a delivery or the event list): recorded first, marked handled
    /// after, unless it waits for its payment.
    pub async fn handle(&self, event: Event, payload: String) -> Result<Outcome, HandleError> {
        let _turn = self.turn.lock().await;
        let topup = self.topup_of(&event).await?;
        let handled_before = self
            .store
            .record_event(&PaymentEvent {
                id: event.id.clone(),
                kind: event.kind.clone(),
                topup: topup.as_ref().map(|t| t.id),
                payment_intent: intent_of(&event),
                payload,
                received_at: self.clock.now(),
            })
            .await?;
        if handled_before {
            return Ok(Outcome::Duplicate);
        }
        let topup_id = topup.as_ref().map(|t| t.id);
        let outcome = self.apply(&event, topup).await?;
        // What waited for this payment (a refund or dispute delivered first) runs now, in the
        // order it arrived; this event is marked handled already.
        if let (Outcome::Credited, Some(id)) = (outcome, topup_id) {
            let intent = self.store.topup(id).await?.and_then(|t| t.payment_intent);
            for waiting in self.store.waiting_events(id, intent.as_deref()).await? {
                if let Ok(waiting) = serde_json::from_str::<Event>(&waiting.payload) {
                    let current = self.store.topup(id).await?;
                    self.apply(&waiting, current).await?;
                }
            }
        }
        Ok(outcome)
    }

    /// Reads Stripe's event list from `since` and handles every event not handled yet: a
    /// delivery that never arrived is credited then, once.
    pub async fn reconcile(&self, since: DateTime<Utc>) -> Result<Reconciled, HandleError> {
        let mut found = Reconciled::default();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .stripe
                .events(since.timestamp(), after.as_deref())
                .await
                .map_err(|e| HandleError::Provider(e.to_string()))?;
            for raw in &page.data {
                found.events += 1;
                let Ok(event) = serde_json::from_value::<Event>(raw.clone()) else {
                    continue;
                };
                after = Some(event.id.clone());
                let outcome = self.handle(event, raw.to_string()).await?;
                if outcome != Outcome::Duplicate {
                    found.handled += 1;
                }
            }
            if !page.has_more || page.data.is_empty() {
                return Ok(found);
            }
        }
    }

    /// The top-up an event is about: named in its metadata or client reference, else found by
    /// the Stripe ids it carries.
    async fn topup_of(&self, event: &Event) -> Result<Option<TopUp>, StoreError> {
        let object = &event.data.object;
        let named = object
            .pointer("/metadata/topup_id")
            .or_else(|| object.get("client_reference_id"))
            .and_then(|v| v.as_str())
            .and_then(|id| id.parse::<TopUpId>().ok());
        if let Some(id) = named {
            return self.store.topup(id).await;
        }
        for field in ["payment_intent", "id"] {
            let id = match object.get(field) {
                Some(serde_json::Value::String(id)) => Some(id.as_str()),
                Some(serde_json::Value::Object(o)) => o.get("id").and_then(|v| v.as_str()),
                _ => None,
            };
            if let Some(id) = id {
                if let Some(topup) = self.store.topup_by_provider_id(id).await? {
                    return Ok(Some(topup));
                }
            }
        }
        Ok(None)
    }

    async fn apply(&self, event: &Event, topup: Option<TopUp>) -> Result<Outcome, HandleError> {
        if let Some(subscription) = subscription_of(event) {
            let outcome = self.subscription_changed(&subscription).await?;
            self.finish(&event.id, outcome).await?;
            return Ok(outcome);
        }
        let Some(topup) = topup else {
            // A refund or dispute of a payment no top-up knows yet (its payment event has not
            // arrived) waits for it; anything else is not ours.
            let about_a_payment =
                event.kind.starts_with("charge.") || event.kind.starts_with("refund.");
            if about_a_payment && intent_of(event).is_some() {
                return Ok(Outcome::Waiting);
            }
            self.finish(&event.id, Outcome::Ignored).await?;
            return Ok(Outcome::Ignored);
        };
        let object = event.data.object.clone();
        let read = |what: &str| {
            tracing::warn!(event = %event.id, "a {what} event could not be read");
            Outcome::Ignored
        };
        let outcome = match event.kind.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                match serde_json::from_value::<CheckoutSession>(object) {
                    Ok(session) if session.payment_status == "paid" => {
                        let paid = Paid {
                            intent: session.payment_intent.as_deref(),
                            amount_minor: session.amount_total,
                            currency: session.currency.as_deref(),
                        };
                        self.pay(&topup, paid).await?
                    }
                    Ok(_) => {
                        self.move_to(&topup, TopUpStatus::Processing, None, None)
                            .await?;
                        Outcome::Processing
                    }
                    Err(_) => read("checkout session"),
                }
            }
            "checkout.session.async_payment_failed" => {
                let note = "the payment did not go through";
                self.move_to(&topup, TopUpStatus::Failed, None, Some(note))
                    .await?;
                Outcome::Failed
            }
            "checkout.session.expired" => {
                let note = "the checkout expired unpaid";
                self.move_to(&topup, TopUpStatus::Expired, None, Some(note))
                    .await?;
                Outcome::Expired
            }
            "payment_intent.succeeded" => match serde_json::from_value::<PaymentIntent>(object) {
                Ok(intent) => {
                    // A checkout saves its card for automatic top-ups.
                    if let (Some(customer), Some(method)) =
                        (&intent.customer, &intent.payment_method)
                    {
                        self.store
                            .save_card(topup.account_id, customer, method, self.clock.now())
                            .await?;
                    }
                    let paid = Paid {
                        intent: Some(&intent.id),
                        amount_minor: Some(intent.amount_received),
                        currency: Some(&intent.currency),
                    };
                    self.pay(&topup, paid).await?
                }
                Err(_) => read("payment intent"),
            },
            // In a checkout the customer may try another card; only an automatic top-up, which
            // nobody is there to retry, fails with its intent.
            "payment_intent.payment_failed" if topup.origin == TopUpOrigin::Auto => {
                let note = serde_json::from_value::<PaymentIntent>(object)
                    .ok()
                    .and_then(|i| i.last_payment_error)
                    .and_then(|e| e.message.or(e.code))
                    .unwrap_or_else(|| "the card was declined".into());
                self.move_to(&topup, TopUpStatus::Failed, None, Some(&note))
                    .await?;
                Outcome::Failed
            }
            "refund.created" | "refund.updated" | "charge.refund.updated" => {
                match serde_json::from_value::<Refund>(object) {
                    Ok(refund) => self.refund(&topup, &[refund]).await?,
                    Err(_) => read("refund"),
                }
            }
            "charge.refunded" => match serde_json::from_value::<Charge>(object) {
                Ok(charge) => {
                    let refunds = charge.refunds.map(|r| r.data).unwrap_or_default();
                    self.refund(&topup, &refunds).await?
                }
                Err(_) => read("charge"),
            },
            "charge.dispute.created" | "charge.dispute.closed" => {
                match serde_json::from_value::<Dispute>(object) {
                    Ok(dispute) => self.dispute(&topup, &dispute).await?,
                    Err(_) => read("dispute"),
                }
            }
            _ => Outcome::Ignored,
        };
        if outcome != Outcome::Waiting {
            self.finish(&event.id, outcome).await?;
        }
        Ok(outcome)
    }

    /// Sets the account's subscription as Stripe has it now: read back from Stripe, never from
    /// the event, so late or reordered deliveries all end in Stripe's current state.
    async fn subscription_changed(&self, id: &str) -> Result<Outcome, HandleError> {
        let stripe = self
            .stripe
            .subscription(id)
            .await
            .map_err(|e| HandleError::Provider(e.to_string()))?;
        let ignored = |why: &str| {
            tracing::warn!(subscription = %stripe.id, "a Stripe subscription was not applied: {why}");
            Ok(Outcome::Ignored)
        };
        let Some(account) = stripe
            .metadata
            .get("account_id")
            .and_then(|id| id.parse::<AccountId>().ok())
        else {
            return ignored("its metadata names no account_id");
        };
        if self.store.account(account).await?.is_none() {
            return ignored("its account_id is no account here");
        }
        let Some(plan) = stripe
            .items
            .data
            .iter()
            .find_map(|item| item.price.as_deref().and_then(|p| self.plans.sold_as(p)))
        else {
            return ignored("none of its prices is a plan's stripe_prices");
        };
        let Some(status) = subscription_status(&stripe.status) else {
            // `incomplete`: its first payment has not gone through; nothing changes until then.
            return Ok(Outcome::Ignored);
        };
        let now = self.clock.now();
        let before = self.store.subscription(account).await?;
        let subscription = Subscription {
            plan: plan.name.clone(),
            status,
            since: match &before {
                Some(b) if b.status == status => b.since,
                _ => now,
            },
            started_at: DateTime::<Utc>::from_timestamp(stripe.start_date, 0)
                .filter(|at| *at <= now)
                .unwrap_or(now),
        };
        if before.as_ref() != Some(&subscription) {
            self.store.set_subscription(account, &subscription).await?;
            self.keys.invalidate_account(account);
            self.announce_past_due(account, &subscription, &stripe.id, now)
                .await?;
        }
        Ok(Outcome::Subscribed)
    }

    /// `subscription.past_due` once per episode, on every node together (a crossing); the
    /// subscription paid again re-arms it.
    async fn announce_past_due(
        &self,
        account: AccountId,
        subscription: &Subscription,
        stripe_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let subject = account.to_string();
        if subscription.status != SubscriptionStatus::PastDue {
            self.store
                .clear_crossing(&subject, EventType::SubscriptionPastDue)
                .await?;
            return Ok(());
        }
        let data = json!({ "plan": subscription.plan, "subscription_id": stripe_id });
        let event = NotifyEvent::new(account, EventType::SubscriptionPastDue, now, data);
        let crossing = Crossing {
            subject,
            kind: EventType::SubscriptionPastDue,
            period: String::new(),
            currency: self.settings.currency.to_ascii_uppercase(),
        };
        self.store.cross(&crossing, &event).await?;
        Ok(())
    }

    async fn finish(&self, event: &str, outcome: Outcome) -> Result<(), StoreError> {
        self.store
            .finish_event(event, outcome.as_str(), self.clock.now())
            .await
    }

    async fn move_to(
        &self,
        topup: &TopUp,
        status: TopUpStatus,
        intent: Option<&str>,
        note: Option<&str>,
    ) -> Result<bool, StoreError> {
        let moved = self
            .store
            .move_topup(topup.id, status, intent, note, self.clock.now())
            .await?;
        if moved && status == TopUpStatus::Failed {
            let reason = json!({ "reason": note });
            let event = self.topup_event(topup, EventType::TopUpFailed, topup.amount, reason);
            self.store.emit(&event).await?;
        }
        Ok(moved)
    }

    /// An event about a top-up: its id, the amount it concerns, and `extra` fields.
    fn topup_event(
        &self,
        topup: &TopUp,
        kind: EventType,
        amount: Nanos,
        extra: serde_json::Value,
    ) -> NotifyEvent {
        let mut data = json!({
            "topup_id": topup.id.to_string(),
            "amount": notify::amount(amount, &self.settings.currency.to_ascii_uppercase()),
        });
        if let (Some(fields), serde_json::Value::Object(more)) = (data.as_object_mut(), extra) {
            fields.extend(more);
        }
        NotifyEvent::new(topup.account_id, kind, self.clock.now(), data)
    }

    /// Credits a paid top-up once, if what was paid is exactly what it asked for.
    async fn pay(&self, topup: &TopUp, paid: Paid<'_>) -> Result<Outcome, HandleError> {
        let mismatch = if paid.currency.map(str::to_ascii_lowercase).as_deref()
            != Some(topup.currency.as_str())
        {
            Some(format!(
                "paid in {}, the top-up asked for {}",
                paid.currency.unwrap_or("no currency"),
                topup.currency
            ))
        } else if paid.amount_minor != Some(topup.amount_minor) {
            Some(format!(
                "paid {} minor units, the top-up asked for {}",
                paid.amount_minor
                    .map_or("no amount".into(), |a| a.to_string()),
                topup.amount_minor
            ))
        } else {
            match (&topup.payment_intent, paid.intent) {
                (Some(known), Some(intent)) if known != intent => Some(format!(
                    "paid by payment intent {intent}, the top-up was paid by {known}"
                )),
                _ => None,
            }
        };
        if let Some(reason) = mismatch {
            tracing::warn!(topup = %topup.id, %reason, "a payment disagrees with its top-up; nothing credited");
            self.store
                .flag_topup(topup.id, &reason, self.clock.now())
                .await?;
            return Ok(Outcome::Flagged);
        }
        let memo = format!("card top-up {}", topup.id);
        let extra = json!({ "pack": topup.pack });
        let granted = self
            .ledger
            .apply_announced(
                topup.account_id,
                topup.amount,
                Movement::Credit {
                    from: LedgerAccount::External,
                },
                &memo,
                &reference(topup, "credit"),
                self.topup_event(topup, EventType::TopUpSucceeded, topup.amount, extra),
            )
            .await?;
        self.move_to(topup, TopUpStatus::Paid, paid.intent, None)
            .await?;
        if granted == Granted::Applied {
            tracing::info!(topup = %topup.id, account = %topup.account_id, amount = %topup.amount, "card top-up credited");
            self.keys.invalidate_account(topup.account_id);
        }
        if let Some(pack) = &topup.pack {
            self.buy_pack(topup, pack).await?;
        }
        Ok(Outcome::Credited)
    }

    /// Buys the pack a credited top-up was for, with its credit: once, keyed by the top-up, so
    /// a redelivery of its payment (or a crash between credit and purchase) buys it once. If it
    /// cannot be bought (the offer is gone, or the credit paid a debt first), the credit stays
    /// in the wallet and the top-up says why.
    async fn buy_pack(&self, topup: &TopUp, pack: &str) -> Result<(), HandleError> {
        let not_bought = |why: String| {
            tracing::warn!(topup = %topup.id, %why, "a paid top-up did not buy its pack");
            format!("the '{pack}' pack was not bought ({why}); its price stays in the wallet")
        };
        let reason = match self.plans.pack(pack) {
            None => not_bought("it is no longer on offer".into()),
            Some(offer) => {
                let id = format!("topup.{}", topup.id);
                let at = self.clock.now();
                match buy_pack(
                    &self.ledger,
                    &*self.store,
                    offer,
                    topup.account_id,
                    &id,
                    at,
                    &self.settings.currency,
                )
                .await
                {
                    Ok(_) => return Ok(()),
                    // Not now (the store, or credit on its way back from other nodes): the
                    // event is answered 503 and delivered again.
                    Err(e) if e.error.status() >= 500 => {
                        return Err(HandleError::Store(StoreError::Unavailable(e.error.message)))
                    }
                    Err(e) => not_bought(e.error.message),
                }
            }
        };
        self.store
            .flag_topup(topup.id, &reason, self.clock.now())
            .await?;
        Ok(())
    }

    /// Takes back each refunded share once (per refund id). A refund of a payment not credited
    /// yet waits for it.
    async fn refund(&self, topup: &TopUp, refunds: &[Refund]) -> Result<Outcome, HandleError> {
        if !self.credited(topup).await? {
            return Ok(Outcome::Waiting);
        }
        let mut outcome = Outcome::Ignored;
        for refund in refunds {
            if refund.status.as_deref() != Some("succeeded") {
                continue;
            }
            if refund.payment_intent.is_some() && refund.payment_intent != topup.payment_intent {
                continue;
            }
            let filed_under = reference(topup, &format!("refund:{}", refund.id));
            if self.store.filed(topup.account_id, &filed_under).await? {
                outcome = Outcome::Refunded;
                continue;
            }
            let share = minor_to_credits(refund.amount, &topup.currency)
                .filter(|_| refund.currency.eq_ignore_ascii_case(&topup.currency));
            let refunded = self
                .store
                .filed_total(
                    topup.account_id,
                    &format!("{}:", reference(topup, "refund")),
                )
                .await?;
            let left = Nanos(topup.amount.0 - refunded.0);
            let Some(share) = share.filter(|s| *s <= left) else {
                let reason = format!(
                    "refund {} of {} {} is more than the {left} credits not yet refunded",
                    refund.id, refund.amount, refund.currency
                );
                self.store
                    .flag_topup(topup.id, &reason, self.clock.now())
                    .await?;
                outcome = Outcome::Flagged;
                continue;
            };
            let extra = json!({ "refund_id": refund.id });
            self.ledger
                .apply_announced(
                    topup.account_id,
                    share,
                    Movement::Take {
                        to: LedgerAccount::External,
                        kind: TransferKind::Refund,
                    },
                    &format!("refund {} of card top-up {}", refund.id, topup.id),
                    &filed_under,
                    self.topup_event(topup, EventType::TopUpRefunded, share, extra),
                )
                .await?;
            self.keys.invalidate_account(topup.account_id);
            outcome = Outcome::Refunded;
        }
        Ok(outcome)
    }

    /// A dispute sets its amount aside (what the wallet no longer has becomes debt); closed,
    /// the amount comes back (won) or is gone (lost). A closing that arrives first opens it too.
    async fn dispute(&self, topup: &TopUp, dispute: &Dispute) -> Result<Outcome, HandleError> {
        if !self.credited(topup).await? {
            return Ok(Outcome::Waiting);
        }
        let Some(amount) = minor_to_credits(dispute.amount, &topup.currency)
            .filter(|a| *a <= topup.amount)
            .filter(|_| dispute.currency.eq_ignore_ascii_case(&topup.currency))
        else {
            let reason = format!(
                "dispute {} of {} {} does not fit the top-up",
                dispute.id, dispute.amount, dispute.currency
            );
            self.store
                .flag_topup(topup.id, &reason, self.clock.now())
                .await?;
            return Ok(Outcome::Flagged);
        };
        let account = topup.account_id;
        let disputed = LedgerAccount::Disputed(account);
        let step = |what: &str| reference(topup, &format!("dispute:{}:{what}", dispute.id));
        let memo = format!("dispute {} of card top-up {}", dispute.id, topup.id);
        let closed_as = match dispute.status.as_str() {
            "won" | "warning_closed" => Some("won"),
            "lost" => Some("lost"),
            _ => None,
        };
        let already_closed = self.store.filed(account, &step("won")).await?
            || self.store.filed(account, &step("lost")).await?;
        if already_closed {
            return Ok(Outcome::Duplicate);
        }
        let take = Movement::Take {
            to: disputed,
            kind: TransferKind::Dispute,
        };
        let opened = self.topup_event(
            topup,
            EventType::DisputeOpened,
            amount,
            json!({ "dispute_id": dispute.id }),
        );
        self.ledger
            .apply_announced(account, amount, take, &memo, &step("open"), opened)
            .await?;
        let at = self.clock.now();
        let outcome = match closed_as {
            None => {
                self.store.set_dispute(topup.id, "open", at).await?;
                Outcome::DisputeOpened
            }
            Some("won") => {
                let back = Movement::Credit { from: disputed };
                self.ledger
                    .apply(account, amount, back, &memo, &step("won"), true)
                    .await?;
                self.store.set_dispute(topup.id, "won", at).await?;
                Outcome::DisputeWon
            }
            Some(_) => {
                let gone = Movement::Close { from: disputed };
                self.ledger
                    .apply(account, amount, gone, &memo, &step("lost"), true)
                    .await?;
                self.store.set_dispute(topup.id, "lost", at).await?;
                Outcome::DisputeLost
            }
        };
        self.keys.invalidate_account(account);
        Ok(outcome)
    }

    /// Starts the automatic top-ups that are due: every account with the rule on, a saved card,
    /// and a balance below its threshold, unless it already had `max_per_month` this month or
    /// one is still in progress. Each is keyed by the account and which of the month's it is,
    /// so nodes that see the same crossing start one top-up, and Stripe makes one charge.
    pub async fn auto_top_up(&self) -> Result<(), HandleError> {
        for rule in self.store.auto_topups_due().await? {
            if let Err(e) = self.auto_top_up_one(&rule).await {
                tracing::warn!(account = %rule.account_id, error = %e, "an automatic top-up did not start; trying again next round");
            }
        }
        Ok(())
    }

    async fn auto_top_up_one(&self, rule: &AutoTopUp) -> Result<(), HandleError> {
        let (Some(customer), Some(method)) = (&rule.customer, &rule.payment_method) else {
            return Ok(());
        };
        let account = rule.account_id;
        let now = self.clock.now();
        // Counted before the latest is read. A top-up another node starts after this count takes
        // the key this one would (`auto:…:{started + 1}`), so the two collide instead of both
        // charging; one started before it is counted, and seen in progress by the read below.
        let started = self
            .store
            .auto_topups_since(account, month_start(now))
            .await?;
        // One in progress is retried (Stripe was not reached) or waited for, never doubled.
        let latest = self
            .store
            .topups(account, None, 1)
            .await?
            .into_iter()
            .next();
        let topup = match latest {
            Some(t)
                if t.origin == TopUpOrigin::Auto
                    && matches!(t.status, TopUpStatus::Pending | TopUpStatus::Processing) =>
            {
                if t.payment_intent.is_some() {
                    return Ok(());
                }
                t
            }
            _ => {
                // The round's list of accounts below their thresholds was read before this:
                // another node's top-up may have finished since (its credit is stored before its
                // status says so), and must not be followed by a second.
                let wallet = self.store.wallet(account).await?;
                if wallet.is_none_or(|w| w.available >= rule.threshold) {
                    return Ok(());
                }
                if started >= rule.max_per_month {
                    return Ok(());
                }
                let Some(amount_minor) = credits_to_minor(rule.amount, &self.settings.currency)
                else {
                    return Ok(());
                };
                let topup = TopUp {
                    id: TopUpId::new(),
                    account_id: account,
                    amount: rule.amount,
                    amount_minor,
                    currency: self.settings.currency.clone(),
                    status: TopUpStatus::Pending,
                    origin: TopUpOrigin::Auto,
                    checkout_session: None,
                    checkout_url: None,
                    payment_intent: None,
                    dispute: None,
                    review: None,
                    failure: None,
                    auto_key: Some(format!(
                        "auto:{account}:{}:{}",
                        now.format("%Y-%m"),
                        started + 1
                    )),
                    pack: None,
                    created_at: now,
                    updated_at: now,
                };
                if !self.store.create_topup(&topup).await? {
                    // Another node started this one.
                    return Ok(());
                }
                topup
            }
        };
        let id = topup.id.to_string();
        let key = topup.auto_key.clone().unwrap_or_else(|| id.clone());
        let charged = self
            .stripe
            .create_payment_intent(&IntentRequest {
                topup: &id,
                idempotency_key: &key,
                amount_minor: topup.amount_minor,
                currency: &topup.currency,
                customer,
                payment_method: method,
            })
            .await;
        match charged {
            Ok(intent) if intent.status == "succeeded" => {
                let paid = Paid {
                    intent: Some(&intent.id),
                    amount_minor: Some(intent.amount_received),
                    currency: Some(&intent.currency),
                };
                let _turn = self.turn.lock().await;
                self.pay(&topup, paid).await?;
                tracing::info!(account = %account, amount = %topup.amount, "automatic top-up credited");
            }
            Ok(intent) => {
                self.move_to(&topup, TopUpStatus::Processing, Some(&intent.id), None)
                    .await?;
            }
            Err(StripeError::Refused { code, message, .. }) => {
                let reason = if code.as_deref() == Some("authentication_required") {
                    "the card needs the customer to confirm this payment: pay once by card, then turn automatic top-up on again".to_string()
                } else {
                    format!("the card was refused ({message}); turn automatic top-up on again with another card")
                };
                self.move_to(&topup, TopUpStatus::Failed, None, Some(&message))
                    .await?;
                self.store
                    .disable_auto_topup(account, Some(&reason), self.clock.now())
                    .await?;
                tracing::warn!(account = %account, %reason, "automatic top-up turned off");
            }
            // Not reached: this top-up is retried with the same key next round.
            Err(e) => return Err(HandleError::Provider(e.to_string())),
        }
        Ok(())
    }

    async fn credited(&self, topup: &TopUp) -> Result<bool, StoreError> {
        self.store
            .filed(topup.account_id, &reference(topup, "credit"))
            .await
    }

    /// What the top-up's refunds have taken back in all.
    pub async fn refunded(&self, topup: &TopUp) -> Result<Nanos, StoreError> {
        self.store
            .filed_total(
                topup.account_id,
                &format!("{}:", reference(topup, "refund")),
            )
            .await
    }
}

/// The payment intent an event is about: the object's `payment_intent`, or the object itself.
/// The Stripe subscription a subscription or invoice event is about.
fn subscription_of(event: &Event) -> Option<String> {
    let object = &event.data.object;
    let id = |value: Option<&serde_json::Value>| match value {
        Some(serde_json::Value::String(id)) => Some(id.clone()),
        Some(serde_json::Value::Object(o)) => o.get("id").and_then(|v| v.as_str()).map(Into::into),
        _ => None,
    };
    if event.kind.starts_with("customer.subscription.") {
        return id(object.get("id"));
    }
    if event.kind.starts_with("invoice.") {
        // Newer API versions name it under the invoice's parent.
        return id(object.get("subscription"))
            .or_else(|| id(object.pointer("/parent/subscription_details/subscription")));
    }
    None
}

/// Stripe's subscription status as Tollgate's; `None` for `incomplete` (not paid yet).
fn subscription_status(stripe: &str) -> Option<SubscriptionStatus> {
    Some(match stripe {
        "active" => SubscriptionStatus::Active,
        "trialing" => SubscriptionStatus::Trialing,
        "past_due" => SubscriptionStatus::PastDue,
        // A trial that ended without a card is paused: no calls until it is paid.
        "unpaid" | "paused" => SubscriptionStatus::Unpaid,
        "canceled" | "incomplete_expired" => SubscriptionStatus::Canceled,
        _ => return None,
    })
}

fn intent_of(event: &Event) -> Option<String> {
    let object = &event.data.object;
    match object.get("payment_intent") {
        Some(serde_json::Value::String(id)) => Some(id.clone()),
        Some(serde_json::Value::Object(o)) => {
            o.get("id").and_then(|v| v.as_str()).map(str::to_string)
        }
        _ if object.get("object").and_then(|v| v.as_str()) == Some("payment_intent") => object
            .get("id")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// What a payment event says was paid.
struct Paid<'a> {
    intent: Option<&'a str>,
    amount_minor: Option<i64>,
    currency: Option<&'a str>,
}

/// The reference a top-up's movement is filed under.
fn reference(topup: &TopUp, what: &str) -> String {
    format!("payment:{}:{what}", topup.id)
}
