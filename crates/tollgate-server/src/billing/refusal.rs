//! A hold refused, as the caller's answer: 402 for a hold the wallet or the key's cap cannot
//! cover, 503 for credit the node cannot reach now. The data plane and the billing API share it.

use crate::billing::ledger::HoldRefused;
use crate::http::error::{HttpError, DEPENDENCY_RETRY_AFTER_S};
use tollgate_core::{ApiError, ErrorCode, Nanos};
use tollgate_wire::api::Money;

/// The 402 (or 503) for a hold of `required` that could not be opened.
pub fn refused_error(refused: HoldRefused, required: Nanos, currency: &str) -> HttpError {
    let money = |n: Nanos| serde_json::to_value(Money::new(n, currency)).unwrap_or_default();
    match refused {
        HoldRefused::InsufficientBalance {
            required,
            available,
        } => HttpError::new(
            ErrorCode::InsufficientBalance,
            format!(
                "This request needs {required} {currency} but the balance is {available} {currency}. Top up the wallet and retry."
            ),
        )
        .with_detail("required", money(required))
        .with_detail("balance", money(available)),
        HoldRefused::KeyCapReached { cap, spent, held } => {
            let left = Nanos(cap.0.saturating_sub(spent.0).saturating_sub(held.0).max(0));
            HttpError::new(
                ErrorCode::KeyQuotaExceeded,
                format!(
                    "This request needs a hold of {required} {currency}, but this key's monthly spend cap of {cap} {currency} leaves {left} {currency} ({spent} spent, {held} held by calls in progress). Raise the key's monthly_spend_cap{}.",
                    if held > Nanos::ZERO { ", or wait for the calls in progress to finish" } else { "" }
                ),
            )
            .with_detail("required", money(required))
            .with_detail("remaining", money(left))
            .with_detail("cap", money(cap))
            .with_detail("spent", money(spent))
            .with_detail("held", money(held))
        }
        HoldRefused::InDebt { debt } => HttpError::new(
            ErrorCode::AccountInDebt,
            format!(
                "A refund or a dispute took back {debt} {currency} of credit this account had already spent. Top up: new credit pays that first, then paid calls resume."
            ),
        )
        .with_detail("debt", money(debt)),
        HoldRefused::CreditElsewhere { required, balance } => ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!(
                "This request needs {required} {currency}; the balance is {balance} {currency}, but another Tollgate node holds that credit and has not given it back (it may have stopped; its share is freed within seconds). Nothing was charged; retry shortly."
            ),
        )
        .with_detail("dependency", "cluster")
        .with_detail("required", money(required))
        .with_detail("balance", money(balance))
        .with_retry_after(DEPENDENCY_RETRY_AFTER_S)
        .into(),
        HoldRefused::Unconfirmed => ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The store did not confirm this hold, so it was released: nothing is reserved or charged. Retry shortly.",
        )
        .with_detail("dependency", "store")
        .with_retry_after(DEPENDENCY_RETRY_AFTER_S)
        .into(),
        HoldRefused::Store(e) => e.into(),
    }
}
