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

#[derive(Clone)]
pub struct AppState {
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
