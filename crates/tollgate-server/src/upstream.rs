//! The upstreams: the route table (longest prefix on whole segments) and each route's pooled
//! keep-alive client. It knows no key, limit or hold; the data plane decides what to send.

use crate::config::RouteConfig;
use axum::body::Body;
use http_body_util::Limited;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Limited<Body>>;

/// Idle upstream connections are kept this long for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Route {
    pub config: RouteConfig,
    pub client: UpstreamClient,
}

/// Routes by prefix, longest first, each with its own pooled keep-alive client.
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> RouteTable {
        let mut routes: Vec<Route> = configs
            .iter()
            .map(|config| Route {
                client: upstream_client(config),
                config: config.clone(),
            })
            .collect();
        routes.sort_by_key(|route| std::cmp::Reverse(route.config.prefix.len()));
        RouteTable { routes }
    }

    /// The route serving `path`: the longest prefix that ends at a segment boundary.
    pub fn resolve(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|route| {
            path.strip_prefix(route.config.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

fn upstream_client(route: &RouteConfig) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(route.connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https)
}
