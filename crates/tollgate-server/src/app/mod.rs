//! The top of the crate: the application (bind, open the store, build the services and the app
//! state, stack the layers in order) and `tollgate demo`. Only the binary and tests import it.

pub mod demo;

use crate::access::keys::KeyCache;
use crate::access::limits::LocalLimiter;
use crate::access::redis_limiter::RedisLimiter;
use crate::access::shed::Shedder;
use crate::billing::ledger::Ledger;
use crate::config::{Config, StoreConfig};
use crate::http::error::HttpError;
use crate::management::{extract, openapi};
use crate::notify::egress::SystemResolver;
use crate::notify::export::Exporter;
use crate::notify::sender::Sender;
use crate::notify::Notifier;
use crate::ops::health;
use crate::payments::service::Payments;
use crate::state::{AppState, Shared};
use crate::telemetry::Metrics;
use crate::upstream::RouteTable;
use crate::{dataplane, edge, management, ops};
use axum::middleware;
use axum::response::IntoResponse;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tollgate_core::{Clock, ErrorCode, SystemClock};
use tollgate_store::deadline::Deadline;
use tollgate_store::postgres::PostgresStore;
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::{Store, StoreChange};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    /// Key and account changes other nodes make, when the store is shared.
    changes: Option<mpsc::Receiver<StoreChange>>,
}

impl Application {
    /// Opens the configured store (applying migrations) and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let store = open_store(&config.store).await?;
        Application::build_with(config, store, Arc::new(SystemClock)).await
    }

    /// Builds over a given store and clock (tests pass their own).
    pub async fn build_with(
        config: Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Application> {
        crate::edge::serve::raise_open_file_limit();
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        // Events the store writes itself (a balance or a key's spend crossing a threshold)
        // carry the deployment's currency.
        store
            .set_currency(&config.currency)
            .await
            .map_err(|e| anyhow::anyhow!("cannot record the currency in the store: {e}"))?;
        let ledger = Ledger::start(store.clone(), clock.clone());
        let expired = ledger
            .recover()
            .await
            .map_err(|e| anyhow::anyhow!("cannot recover pending holds: {e}"))?;
        if expired > 0 {
            tracing::warn!(
                expired,
                "released holds left by requests of a previous process (charged nothing)"
            );
        }
        let keys = Arc::new(KeyCache::new(config.key_cache_capacity));
        let mut registry = prometheus_client::registry::Registry::with_prefix("tollgate");
        keys.register_metrics(&mut registry);
        ledger.register_metrics(&mut registry);
        let exporter = Exporter::new(store.clone(), clock.clone(), config.export.clone());
        exporter
            .start()
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the usage export: {e}"))?;
        exporter.register_metrics(&mut registry);
        let metrics = Arc::new(Metrics::new(registry));
        let payments = config.stripe.clone().map(|settings| {
            Arc::new(Payments::new(
                settings,
                config.plans.clone(),
                store.clone(),
                ledger.clone(),
                keys.clone(),
                clock.clone(),
            ))
        });
        let notifier = Arc::new(Notifier::new(
            store.clone(),
            clock.clone(),
            &config.currency,
            config.webhooks.clone(),
            Arc::new(SystemResolver),
        ));
        let state = AppState::new(Shared {
            payments,
            notifier,
            exporter,
            keys,
            metrics,
            ledger,
            limiter: match &config.redis_url {
                Some(url) => Arc::new(
                    RedisLimiter::new(&url.0).map_err(|e| anyhow::anyhow!("redis.url: {e}"))?,
                ),
                None => Arc::new(LocalLimiter::new(clock.clone())),
            },
            routes: Arc::new(RouteTable::new(&config.routes)),
            shedder: config
                .load_shedding
                .as_ref()
                .map(|shedding| Arc::new(Shedder::new(shedding.limit))),
            config: Arc::new(config),
            store,
            clock,
        });
        let router = router(state.clone())?;
        let changes = state.store.changes().await?;
        Ok(Application {
            listener,
            router,
            state,
            changes,
        })
    }

    /// The bound address (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests and commits every
    /// ledger write still queued.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // A shared store (one with a change feed) may hold other nodes' holds.
        let shared = self.changes.is_some();
        let sweeper = tokio::spawn(sweep(self.state.clone(), shared));
        let probe = tokio::spawn(probe_store(self.state.clone()));
        let follower = self
            .changes
            .map(|changes| tokio::spawn(follow_changes(changes, self.state.clone())));
        let reconciler = self.state.payments.clone().and_then(|payments| {
            let every = payments.settings().reconcile_interval?;
            Some(tokio::spawn(reconcile_payments(payments, every)))
        });
        let auto_topper = self
            .state
            .payments
            .clone()
            .map(|payments| tokio::spawn(auto_top_up(payments)));
        let sender = tokio::spawn(
            Sender::new(
                self.state.store.clone(),
                self.state.clock.clone(),
                self.state.config.webhooks.clone(),
                self.state.notifier.resolver(),
            )
            .run(),
        );
        let exporter = tokio::spawn(self.state.exporter.clone().run());
        let cpu_watch = match (&self.state.shedder, &self.state.config.load_shedding) {
            (Some(shedder), Some(config)) => config.cpu_threshold.map(|threshold| {
                tokio::spawn(crate::access::shed::watch_cpu(shedder.clone(), threshold))
            }),
            _ => None,
        };
        let served = crate::edge::serve::serve(
            self.listener,
            self.router,
            self.state.config.connections,
            self.state.config.request_id_header.clone(),
            shutdown,
        )
        .await;
        sweeper.abort();
        probe.abort();
        sender.abort();
        exporter.abort();
        if let Some(follower) = follower {
            follower.abort();
        }
        if let Some(cpu_watch) = cpu_watch {
            cpu_watch.abort();
        }
        if let Some(reconciler) = reconciler {
            reconciler.abort();
        }
        if let Some(auto_topper) = auto_topper {
            auto_topper.abort();
        }
        // Every lease goes back to its wallet, for the other nodes to use at once.
        self.state.ledger.return_idle_leases(Duration::ZERO);
        self.state.ledger.flush().await?;
        Ok(served?)
    }
}

/// Every `every`, reads the payment provider's events of the last hour and `every` and handles
/// those no delivery brought: a missed webhook is credited within one interval, once.
async fn reconcile_payments(payments: Arc<Payments>, every: Duration) {
    let window = chrono::Duration::from_std(every + Duration::from_secs(3600))
        .unwrap_or(chrono::Duration::hours(2));
    loop {
        tokio::time::sleep(every).await;
        let since = chrono::Utc::now() - window;
        match payments.reconcile(since).await {
            Ok(found) if found.handled > 0 => {
                tracing::warn!(
                    handled = found.handled,
                    "reconciliation handled payment events no delivery brought"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "payment reconciliation failed; trying again next interval")
            }
        }
    }
}

/// Starts the automatic top-ups that are due, every `auto_topup_interval`.
async fn auto_top_up(payments: Arc<Payments>) {
    let every = payments.settings().auto_topup_interval;
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = payments.auto_top_up().await {
            tracing::warn!(error = %e, "automatic top-ups could not be checked; trying again next interval");
        }
    }
}

/// Drops what the key cache holds of whatever another node changed, so a revoked key or a
/// suspended account is refused everywhere from the announcement on; gives back the credit
/// another node recalls.
async fn follow_changes(mut changes: mpsc::Receiver<StoreChange>, state: AppState) {
    while let Some(change) = changes.recv().await {
        match change {
            StoreChange::Key(key) => state.keys.invalidate(key),
            StoreChange::Account(account) => state.keys.invalidate_account(account),
            StoreChange::Recall { account, by } => state.ledger.recall(account, by),
            StoreChange::Resync => state.keys.clear(),
        }
    }
}

/// How often the store is asked whether it answers. With the ping's own deadline
/// ([`tollgate_store::deadline::PING_DEADLINE`]) and two failures in a row to call it down, a
/// store that goes silent is noticed within a second, and new holds are refused from then on.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// Asks the store whether it answers, on a task of its own so nothing else the sweeper waits
/// for can delay it.
async fn probe_store(state: AppState) {
    let mut ticks = tokio::time::interval(PROBE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        state.ledger.check_store().await;
    }
}

/// Every tick: releases holds past their TTL (on a shared
/// store, stopped nodes' too), and hourly deletes usage rows and idempotency keys past their
/// retention.
async fn sweep(state: AppState, shared: bool) {
    // Another node's hold is expired this long after its TTL, so its owner, if alive, goes first.
    let orphan_grace = (state.config.sweep_interval * 2).max(Duration::from_secs(1));
    // A node that has not renewed its leases for this long has stopped: its leases are freed.
    let lease_expiry = (state.config.sweep_interval * 10).max(Duration::from_secs(10));
    const PURGE_EVERY: Duration = Duration::from_secs(3600);
    let mut ticks = tokio::time::interval(state.config.sweep_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_purge: Option<tokio::time::Instant> = None;
    loop {
        ticks.tick().await;
        let expired = state.ledger.expire_due();
        if expired > 0 {
            tracing::info!(expired, "released holds past their TTL");
        }
        if !state.config.plans.is_empty() {
            // Included units held by calls that never ended (a crash) return at their TTL.
            match state.store.expire_units(state.clock.now()).await {
                Ok(0) => {}
                Ok(expired) => {
                    tracing::info!(expired, "returned included units held past their TTL")
                }
                Err(e) => tracing::warn!(error = %e, "cannot return expired included units"),
            }
        }
        if shared {
            state
                .ledger
                .return_idle_leases(crate::billing::ledger::LEASE_IDLE);
            match state.ledger.renew_leases(lease_expiry).await {
                Ok(0) => {}
                Ok(reclaimed) => tracing::info!(reclaimed, "freed stopped nodes' credit leases"),
                Err(e) => tracing::warn!(error = %e, "cannot reclaim stopped nodes' leases"),
            }
            match state.ledger.expire_orphans(orphan_grace).await {
                Ok(0) => {}
                Ok(expired) => {
                    tracing::info!(expired, "released stopped nodes' holds past their TTL")
                }
                Err(e) => tracing::warn!(error = %e, "cannot look for stopped nodes' holds"),
            }
        }
        if last_purge.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
            last_purge = Some(tokio::time::Instant::now());
            let retention = chrono::Duration::from_std(state.config.usage_retention)
                .unwrap_or(chrono::Duration::MAX);
            if let Some(cutoff) = state.clock.now().checked_sub_signed(retention) {
                match state.store.purge_requests_before(cutoff).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "deleted usage rows past retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge old usage rows"),
                }
            }
            let kept = chrono::Duration::from_std(state.config.webhooks.retention)
                .unwrap_or(chrono::Duration::MAX);
            if let Some(cutoff) = state.clock.now().checked_sub_signed(kept) {
                match state.store.purge_events(cutoff).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "forgot webhook events past retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge old webhook events"),
                }
            }
            let kept = chrono::Duration::from_std(state.config.export.retention)
                .unwrap_or(chrono::Duration::MAX);
            if let Some(cutoff) = state.clock.now().checked_sub_signed(kept) {
                let sinks: Vec<String> = state
                    .config
                    .export
                    .sinks
                    .iter()
                    .map(|sink| sink.name.clone())
                    .collect();
                match state.store.purge_exports(cutoff, &sinks).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "forgot exported usage past retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge the export log"),
                }
            }
            match state.store.purge_idempotency(state.clock.now()).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "forgot expired idempotency keys"),
                Err(e) => tracing::warn!(error = %e, "cannot purge idempotency keys"),
            }
            // A timed-out session is refused when used; this forgets those never used again.
            let now = state.clock.now();
            let before = |timeout: Duration| {
                chrono::Duration::from_std(timeout)
                    .ok()
                    .and_then(|timeout| now.checked_sub_signed(timeout))
                    .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
            };
            let console = state.config.console;
            match state
                .store
                .purge_sessions(
                    before(console.idle_timeout),
                    before(console.absolute_timeout),
                )
                .await
            {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "forgot timed-out console sessions"),
                Err(e) => tracing::warn!(error = %e, "cannot purge console sessions"),
            }
        }
    }
}

pub async fn open_store(config: &StoreConfig) -> anyhow::Result<Arc<dyn Store>> {
    match config {
        StoreConfig::Sqlite { path } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
            }
            let store = SqliteStore::open(path)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
            Ok(Arc::new(store))
        }
        StoreConfig::Postgres { url } => {
            let store = PostgresStore::open(&url.0)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the PostgreSQL store: {e}"))?;
            // A database reached over the network can hang: no call waits on it for long.
            Ok(Arc::new(Deadline::new(store)))
        }
    }
}

/// The whole service. Layers run top to bottom on the way in (the last `.layer` is outermost).
fn router(state: AppState) -> anyhow::Result<Router> {
    let config = &state.config;
    // Every route is registered with its OpenAPI description (`routes!`); the document is the
    // union of what the routers declare, completed for this config and serialised once.
    let (api, api_doc) = management::router().split_for_parts();
    // Only a request that matches a route is claimed for idempotency: a wrong path or method
    // gets its 404 or 405, whatever Idempotency-Key it carries.
    let api = api
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            edge::idempotency::layer,
        ))
        .fallback(extract::not_found)
        .method_not_allowed_fallback(extract::method_not_allowed);
    let (operations, operations_doc) = OpenApiRouter::new()
        .routes(routes!(health::root))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(ops::metrics::handler))
        .routes(routes!(management::payments::stripe_webhook))
        .routes(routes!(management::payments::stripe_webhook_slash))
        .split_for_parts();
    let docs = openapi::routes();
    let doc = openapi::skeleton()
        .merge_from(operations_doc)
        .nest(&config.api_prefix, api_doc)
        .merge_from(docs.get_openapi().clone());
    let published = openapi::Published::new(&openapi::finish(doc, config))?;
    let (docs, _) = docs.with_state::<AppState>(published).split_for_parts();
    Ok(Router::new()
        .merge(operations)
        .nest(&config.api_prefix, api)
        .merge(docs)
        .merge(crate::console::router())
        // Everything that is not Tollgate's own path is proxied (or 404s if no route matches).
        .fallback(dataplane::proxy::proxy)
        // One of Tollgate's own paths with a method it does not serve: 405 in the envelope.
        .method_not_allowed_fallback(extract::method_not_allowed)
        // A panic becomes a 500 envelope, inside rescue so it is rendered like any error.
        .layer(CatchPanicLayer::custom(|_| {
            HttpError::new(
                ErrorCode::InternalError,
                "Tollgate failed unexpectedly. Nothing was charged.",
            )
            .into_response()
        }))
        // Request IDs, metrics, tracing, shedding, rate limits, rescue, idempotency: in order.
        .layer(middleware::from_fn_with_state(state.clone(), edge::edge))
        .with_state(state))
}
