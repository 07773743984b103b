//! The data plane: the proxy handler that matches a route, authenticates, limits, holds, forwards
//! and meters, and `GET …/models` answered from a route's price table. The money it moves is
//! decided by `billing`; the management API never calls in here.

pub mod models;
pub mod proxy;
