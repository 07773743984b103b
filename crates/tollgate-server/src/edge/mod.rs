//! The layers every request passes through, proxied or not, and the accept loop beneath them:
//! request IDs, metrics, shedding, rate limits, rescue (errors into envelopes), idempotency, the
//! head-size bound. `app::router` stacks them in order and says why each sits where it does.
//! Layers take the app state; they call services and never answer a route's business.

pub mod head;
pub mod idempotency;
pub mod limits;
pub mod metrics;
pub mod request_id;
pub mod rescue;
pub mod serve;
pub mod shed;
