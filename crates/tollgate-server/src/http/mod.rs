//! HTTP leaves every room may use: the error type handlers return, its rendering, header rules
//! and body wrappers. Nothing here holds state, knows a route or a config, or imports another room.

pub mod body;
pub mod error;
pub mod headers;
pub mod render;
