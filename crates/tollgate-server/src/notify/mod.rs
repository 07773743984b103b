//! Notifications: what Tollgate sends out on its own (webhooks to customers' endpoints). Only its
//! groundwork is here so far: `egress.rs`, the one way out, which connects only to addresses
//! the guard admits.
//!
//! A service room: it takes the config's rules and its own resolver, never the app state.

pub mod egress;
