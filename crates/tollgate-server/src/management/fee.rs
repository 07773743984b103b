//! The fee on a metered management call made with an account's key.

use crate::billing::ledger::{HoldSpec, Ledger};
use crate::http::error::HttpError;
use crate::management::extract::Caller;
use crate::state::AppState;
use std::sync::Arc;
use tollgate_core::ledger::Resolve;
use tollgate_core::{HoldId, Nanos, RequestId};
use tollgate_store::HoldSource;

/// The fee on a metered management call made with an account's key: held before the call,
/// settled only if it succeeds (dropping it unsettled releases it). The admin pays nothing.
pub struct ManagementFee(Option<(Arc<Ledger>, HoldId, Nanos)>);

impl ManagementFee {
    pub async fn hold(
        state: &AppState,
        caller: &Caller,
        request_id: RequestId,
    ) -> Result<ManagementFee, HttpError> {
        let fee = state.config.management_fee;
        let Caller::Key(key) = caller else {
            return Ok(ManagementFee(None));
        };
        if fee == Nanos::ZERO {
            return Ok(ManagementFee(None));
        }
        let account_debt = state
            .store
            .wallet(key.account_id)
            .await?
            .map_or(Nanos::ZERO, |w| w.debt);
        let hold = state
            .ledger
            .open(HoldSpec {
                account: key.account_id,
                key: Some(key.id),
                key_cap: key.monthly_spend_cap,
                account_debt,
                amount: fee,
                ttl: state.config.request_hold_ttl,
                source: HoldSource::Request,
                request_id: Some(request_id),
                metadata: serde_json::json!({"fee": "management"}),
            })
            .await
            .map_err(|refused| {
                crate::billing::refusal::refused_error(refused, fee, &state.config.currency)
            })?;
        Ok(ManagementFee(Some((state.ledger.clone(), hold.id, fee))))
    }

    pub fn settle(mut self) {
        if let Some((ledger, id, fee)) = self.0.take() {
            ledger.resolve(id, Resolve::Settle(fee));
        }
    }
}

impl Drop for ManagementFee {
    fn drop(&mut self) {
        if let Some((ledger, id, _)) = self.0.take() {
            ledger.resolve(id, Resolve::Release);
        }
    }
}
