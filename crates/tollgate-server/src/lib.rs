//! Tollgate's server: config, the data-plane proxy, the management API and health endpoints,
//! composed over the store and the pure core. The `tollgate` binary is a thin CLI over this.
//!
//! Rooms, lowest first; a room imports only from rooms listed before it, and no two files import
//! each other, even through a third (`tests/tidy.rs` enforces both):
//! `http`, `telemetry`, `config`, `access`, `upstream`, `billing`, `payments`, `state`, `edge`, `dataplane`,
//! `management`, `console`, `ops`, `app`. ARCHITECTURE.md's codemap says what lives in each.

pub mod access;
pub mod app;
pub mod billing;
pub mod config;
pub mod console;
pub mod dataplane;
pub mod edge;
pub mod http;
pub mod management;
pub mod notify;
pub mod ops;
pub mod payments;
pub mod state;
pub mod telemetry;
pub mod upstream;

pub use app::Application;
pub use config::Config;
