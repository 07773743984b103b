//! Card payments: customers buy credit through Stripe Checkout, and Stripe's events land it in
//! the ledger exactly once (refunds and disputes take it back). `signature.rs` checks a webhook
//! delivery, `stripe.rs` makes Tollgate's few calls to Stripe and reads its events minimally,
//! `service.rs` is the service: top-ups, the events' effects, reconciliation.
//!
//! A service room: it takes the store, the ledger, the key cache and a clock, never the app
//! state; its endpoints are in `management/payments.rs`. docs/billing.md has the rules.

pub mod service;
pub mod signature;
pub mod stripe;
