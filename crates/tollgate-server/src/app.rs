//! The application: build (bind, open the store, compose the layers), then serve until stopped.

use crate::auth::KeyCache;
use crate::config::{Config, StoreConfig};
use crate::error::HttpError;
use crate::proxy::RouteTable;
use crate::state::AppState;
use crate::{api, edge, health, proxy};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tollgate_core::{Clock, ErrorCode, RequestId, SystemClock};
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::Store;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
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
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let state = AppState {
            keys: Arc::new(KeyCache::new(config.key_cache_capacity)),
            routes: Arc::new(RouteTable::new(&config.routes)),
            config: Arc::new(config),
            store,
            clock,
        };
        let router = router(state.clone());
        Ok(Application {
            listener,
            router,
            state,
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

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let service = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, service)
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
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
    }
}

/// The whole service. Layers run top to bottom on the way in (the last `.layer` is outermost).
fn router(state: AppState) -> Router {
    let api_prefix = state.config.api_prefix.clone();
    let api = api::router()
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::not_found);
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .nest(&api_prefix, api)
        // Everything that is not Tollgate's own path is proxied (or 404s if no route matches).
        .fallback(proxy::proxy)
        // A panic becomes a 500 envelope, inside rescue so it is rendered like any error.
        .layer(CatchPanicLayer::custom(|_| {
            HttpError::new(
                ErrorCode::InternalError,
                "Tollgate failed unexpectedly. Nothing was charged.",
            )
            .into_response()
        }))
        // Rescue renders errors; it sits inside request_id so every body carries the ID.
        .layer(middleware::from_fn(edge::rescue))
        // The trace span opens after the ID exists, so every log line carries it. One INFO line
        // per response (status, latency); failures are logged once, by rescue.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(DefaultOnResponse::new().level(Level::INFO))
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        // Outermost: every response, whatever happened inside, gets the request ID.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            edge::request_id,
        ))
        .with_state(state)
}

fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = request
        .extensions()
        .get::<RequestId>()
        .copied()
        .unwrap_or_default();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        client_request_id = tracing::field::Empty,
        method = %request.method(),
        path = request.uri().path(),
    );
    if let Some(client_id) = request.extensions().get::<edge::ClientRequestId>() {
        span.record("client_request_id", client_id.0.as_str());
    }
    span
}
