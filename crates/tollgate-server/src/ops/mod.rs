//! What an operator's tools call: `/`, liveness, readiness and the `/metrics` scrape. Read-only:
//! nothing here changes state or moves money.

pub mod health;
pub mod metrics;
