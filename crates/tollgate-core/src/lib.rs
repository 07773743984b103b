//! Tollgate's pure domain: exact money, typed ids, the API key format, the error catalogue and the
//! clock. Nothing here does I/O, speaks HTTP or SQL; everything is deterministic given a [`Clock`].

pub mod access;
pub mod allowance;
pub mod audit;
pub mod clock;
pub mod egress;
pub mod error;
pub mod ids;
pub mod key;
pub mod ledger;
pub mod load;
pub mod metering;
pub mod money;
pub mod notify;
pub mod payment;
pub mod period;
pub mod plan;
pub mod pricing;
pub mod ratelimit;
pub mod webhook;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{ApiError, ErrorCode, Fault};
pub use ids::{AccountId, EndpointId, EventId, HoldId, KeyId, NodeId, RequestId, TopUpId};
pub use key::{ApiKey, KeyEnv, KeyHash, KeyKind, KeyStatus};
pub use money::Nanos;
