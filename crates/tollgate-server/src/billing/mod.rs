//! Money on the data plane: the ledger service (holds decided in memory, a group-committing
//! writer), a call's plan (its subscription's standing, its included units), the meter that carries a call's hold and usage row to its end, and the answers for a
//! hold refused. Services only: nothing here knows axum's routing or the app state.

pub mod allowances;
pub mod ledger;
pub mod meter;
pub mod refusal;
