//! Notifications: what Tollgate sends out on its own, webhooks to accounts' endpoints.
//!
//! - [`Notifier`]: what the rest of the server calls to announce something (a key revoked, a
//!   paid call refused for want of credit) and to check an endpoint's URL. Events that belong
//!   to a ledger change are not made here: they ride in the change's batch (the store's
//!   balance watch, the payments' movements), so they are stored if and only if it is.
//! - `sender.rs`: the worker that delivers the store's outbox, signed, with retries.
//! - `egress.rs`: the one way out for accounts' endpoints, which connects only to addresses
//!   the guard admits.
//! - `export.rs`: the usage exporter, one loop per configured sink, and `sinks.rs`, each
//!   billing system's API (Stripe meter events, OpenMeter, Lago, signed CloudEvents batches).
//!   Sink URLs are the operator's own config, so they are reached directly.
//!
//! A service room: it takes the config's rules, the store and its own resolver, never the app
//! state.

pub mod egress;
pub mod export;
pub mod sender;
pub mod sinks;

use crate::config::WebhookSettings;
use chrono::{DateTime, TimeDelta, Utc};
use egress::Resolver;
use serde_json::json;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tollgate_core::egress::{Host, Refused};
use tollgate_core::notify::{amount, Event, EventType};
use tollgate_core::{AccountId, Clock, Nanos, RequestId};
use tollgate_store::{Crossing, KeyRecord, Store};

/// How long a node remembers that it recorded an account's depletion: a caller retrying a
/// refused call in a loop costs one store write this often, not one per refusal.
const DEPLETION_MEMORY: TimeDelta = TimeDelta::seconds(60);

/// Why an endpoint's URL is refused.
#[derive(Debug, thiserror::Error)]
pub enum UrlRefused {
    #[error("{0}")]
    Guard(#[from] Refused),
    #[error("its host '{host}' does not resolve: {reason}")]
    Unresolved { host: String, reason: String },
}

pub struct Notifier {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    currency: String,
    settings: WebhookSettings,
    resolver: Arc<dyn Resolver>,
    depleted: Mutex<HashMap<AccountId, DateTime<Utc>>>,
}

impl Notifier {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        currency: &str,
        settings: WebhookSettings,
        resolver: Arc<dyn Resolver>,
    ) -> Notifier {
        Notifier {
            store,
            clock,
            currency: currency.to_string(),
            settings,
            resolver,
            depleted: Mutex::default(),
        }
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }

    pub fn resolver(&self) -> Arc<dyn Resolver> {
        self.resolver.clone()
    }

    /// Checks an endpoint's URL as it is given: parsed as browsers do, its scheme, and every
    /// address it names or its host resolves to now. The sender checks the addresses again
    /// before every attempt. Returns the URL normalised.
    pub async fn check_url(&self, text: &str) -> Result<String, UrlRefused> {
        let target = self.settings.guard.check_url(text)?;
        if let Host::Name(host) = &target.host {
            let addresses: Vec<IpAddr> =
                self.resolver
                    .resolve(host)
                    .await
                    .map_err(|e| UrlRefused::Unresolved {
                        host: host.clone(),
                        reason: e.to_string(),
                    })?;
            if addresses.is_empty() {
                return Err(UrlRefused::Unresolved {
                    host: host.clone(),
                    reason: "no address".into(),
                });
            }
            self.settings.guard.admit_all(&addresses)?;
        }
        Ok(target.url)
    }

    /// Writes an event; a store that fails is logged, since what it announces has happened.
    pub async fn announce(&self, event: Event) {
        if let Err(e) = self.store.emit(&event).await {
            tracing::warn!(error = %e, kind = %event.kind, account = %event.account, "an event could not be written; it is not sent");
        }
    }

    /// `key.revoked`.
    pub async fn key_revoked(&self, key: &KeyRecord, request_id: RequestId) {
        let data = json!({
            "key_id": key.id.to_string(),
            "key_prefix": key.display_prefix,
            "name": key.name,
            "request_id": request_id.to_string(),
        });
        let event = Event::new(
            key.account_id,
            EventType::KeyRevoked,
            self.clock.now(),
            data,
        );
        self.announce(event).await;
    }

    /// A paid call was refused for want of credit: the episode's first refusal sends
    /// `balance.depleted` (once over every node: the store's crossing decides). Written in the
    /// background, so the refusal is not delayed.
    pub fn depleted(
        self: &Arc<Self>,
        account: AccountId,
        required: Nanos,
        balance: Nanos,
        request_id: Option<RequestId>,
    ) {
        let now = self.clock.now();
        {
            let mut recent = self
                .depleted
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if recent
                .get(&account)
                .is_some_and(|at| now - *at < DEPLETION_MEMORY)
            {
                return;
            }
            recent.retain(|_, at| now - *at < DEPLETION_MEMORY);
            recent.insert(account, now);
        }
        let notifier = self.clone();
        tokio::spawn(async move {
            let data = json!({
                "required": amount(required, &notifier.currency),
                "balance": amount(balance, &notifier.currency),
                "request_id": request_id.map(|r| r.to_string()),
            });
            let event = Event::new(account, EventType::BalanceDepleted, now, data);
            let crossing = Crossing {
                subject: account.to_string(),
                kind: EventType::BalanceDepleted,
                period: String::new(),
                currency: notifier.currency.clone(),
            };
            if let Err(e) = notifier.store.cross(&crossing, &event).await {
                tracing::warn!(error = %e, %account, "balance.depleted could not be written");
                notifier
                    .depleted
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .remove(&account);
            }
        });
    }
}
