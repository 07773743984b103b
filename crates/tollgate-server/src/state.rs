//! What every handler shares: config, store, key cache, ledger, rate limiter, routes, load
//! shedder and the clock.

use crate::auth::KeyCache;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::proxy::RouteTable;
use crate::shed::Shedder;
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
}
