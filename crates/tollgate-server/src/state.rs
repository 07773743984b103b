//! What every handler shares: config, store, key cache, ledger, rate limiter, routes, load
//! shedder and the clock; and the few calls that hand a service what it needs from them, so the
//! services below never see the state. Handlers and layers (the rooms above) take it.

use crate::access::keys::KeyCache;
use crate::access::keys::{self, Identity};
use crate::access::limits::Limiter;
use crate::access::limits::{self as rate_limits, Demand, Estimate, LimitSlot};
use crate::access::shed::Shedder;
use crate::billing::ledger::Ledger;
use crate::config::Config;
use crate::http::error::HttpError;
use crate::http::headers::{self, presented_secret};
use crate::notify::export::Exporter;
use crate::notify::Notifier;
use crate::payments::service::Payments;
use crate::telemetry::Metrics;
use crate::upstream::RouteTable;
use axum::http::{Extensions, HeaderMap};
use std::net::IpAddr;
use std::sync::Arc;
use tollgate_core::Clock;
use tollgate_store::Store;

/// Cloned for every request by each layer and extractor that takes it, so it is one `Arc`: a
/// clone is one atomic increment, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub keys: Arc<KeyCache>,
    pub ledger: Arc<Ledger>,
    pub limiter: Arc<dyn Limiter>,
    pub routes: Arc<RouteTable>,
    /// `None` when load shedding is off.
    pub shedder: Option<Arc<Shedder>>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// `None` when card payments are not configured.
    pub payments: Option<Arc<Payments>>,
    pub notifier: Arc<Notifier>,
    pub exporter: Arc<Exporter>,
}

impl Shared {
    /// The client's address: the socket peer, or `X-Forwarded-For` behind a trusted proxy.
    pub fn client_ip(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        headers::client_ip(&self.config.trusted_proxies, headers, extensions)
    }

    /// Who presented the request's credential: the admin token or a usable API key.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> Result<Identity, HttpError> {
        keys::identify(
            self.config
                .admin_token
                .as_ref()
                .map(|token| token.0.as_str()),
            &self.keys,
            &*self.store,
            self.clock.now(),
            presented_secret(headers),
            self.client_ip(headers, extensions),
        )
        .await
    }

    /// Decides `demands` for an identified caller ([`rate_limits::admit`]).
    pub async fn admit(
        &self,
        slot: Option<&LimitSlot>,
        demands: &[Demand],
    ) -> Result<(), HttpError> {
        rate_limits::admit(&*self.limiter, &self.metrics, &*self.clock, slot, demands).await
    }

    /// Decides the demands a slot holds, with the estimates filled in
    /// ([`rate_limits::admit_identified`]).
    pub async fn admit_identified(
        &self,
        slot: &LimitSlot,
        estimate: Estimate,
    ) -> Result<Vec<Demand>, HttpError> {
        rate_limits::admit_identified(&*self.limiter, &self.metrics, &*self.clock, slot, estimate)
            .await
    }
}
