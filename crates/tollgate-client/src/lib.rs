#![doc = include_str!("../README.md")]

mod client;
mod error;
mod proxy;
pub mod rate_limit;
mod resources;
pub mod retry;
pub mod webhook;

pub use client::{Client, ClientBuilder, Meta, Response};
pub use error::{Error, ErrorKind};
/// The HTTP types the client speaks in (`Method`, `HeaderMap`).
pub use http;
pub use proxy::{Event, ProxyRequest, Streaming};
pub use rate_limit::RateLimit;
pub use resources::{
    Accounts, Audit, Billing, HoldGuard, Holds, Keys, Payments, RequestFilter, Requests, UsageQuery,
};
pub use retry::RetryPolicy;
/// Ids and amounts.
pub use tollgate_core::{AccountId, HoldId, KeyId, Nanos, RequestId, TopUpId};
/// The request and answer bodies, shared with the server.
pub use tollgate_wire::api;
