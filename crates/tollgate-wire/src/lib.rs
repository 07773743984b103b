//! Tollgate's wire types: the error envelope rendered in each error profile, and the bodies of
//! the management API. The server and any client share these, so the two cannot drift apart.

pub mod api;
pub mod envelope;
pub mod i18n;

pub use envelope::{render_error, ErrorProfile, RenderedError};
pub use i18n::Language;
