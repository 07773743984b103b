//! Tollgate's server: config, the data-plane proxy, the management API and health endpoints,
//! composed over the store and the pure core. The `tollgate` binary is a thin CLI over this.

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod billing_api;
pub mod config;
pub mod demo;
pub mod edge;
pub mod error;
pub mod health;
pub mod idempotency;
pub mod ledger;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod models;
pub mod openapi;
pub mod proxy;
pub mod redis_limiter;
pub mod serve;
pub mod shed;
pub mod state;

pub use app::Application;
pub use config::Config;
