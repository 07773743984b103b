//! A ledger batch as rows to write, the same for every SQL backend: holds to insert (a hold
//! opened and resolved in the same batch is inserted once, already resolved),
//! holds resolved since an earlier batch, transfers, usage rows, and each account's net change
//! of its cached balances.

use crate::{HoldRecord, LedgerWrite, StoreError, UsageRow};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap, HashSet};
use tollgate_core::ledger::{month_of, Hold, Transfer};
use tollgate_core::{AccountId, HoldId, KeyId, Nanos};

/// One transfer to insert: what moves, the account it belongs to, memo, reference, when.
pub(crate) type TransferEntry<'w> = (&'w Transfer, AccountId, &'w str, String, DateTime<Utc>);

pub(crate) struct Batch<'w> {
    /// Each new hold with the state to insert it in.
    pub holds: Vec<(&'w HoldRecord, &'w Hold)>,
    /// Holds of earlier batches, now resolved.
    pub resolutions: Vec<&'w Hold>,
    pub transfers: Vec<TransferEntry<'w>>,
    pub usage: Vec<&'w UsageRow>,
    /// Events to write in the batch's transaction.
    pub events: Vec<&'w tollgate_core::notify::Event>,
    /// (available, held, debt) change per account, in account order: backends that lock wallet
    /// rows take them in this order, so two batches never deadlock.
    pub deltas: BTreeMap<AccountId, (i64, i64, i64)>,
    /// The part of each account's available change that moves a node's lease: what holds move,
    /// not the transfers made from outside (grants, refunds), which move the free balance.
    pub lease_deltas: BTreeMap<AccountId, i64>,
    /// Each key's change of its month's spend, in key order.
    pub key_spend: BTreeMap<KeyId, KeySpendDelta>,
}

/// How a batch moves a key's monthly spend: what it charged, what its holds reserve (opened
/// minus resolved), in the latest month it touches, and the lowest cap a hold it opens was
/// opened under.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeySpendDelta {
    pub month: i32,
    pub spent: i64,
    pub held: i64,
    pub cap: Option<Nanos>,
}

impl KeySpendDelta {
    fn at(&mut self, at: DateTime<Utc>) -> &mut Self {
        self.month = self.month.max(month_of(at));
        self
    }
}

impl<'w> Batch<'w> {
    pub fn plan(writes: &'w [LedgerWrite]) -> Batch<'w> {
        let resolved_here: HashMap<HoldId, &Hold> = writes
            .iter()
            .filter_map(|w| match w {
                LedgerWrite::ResolveHold { hold, .. } => Some((hold.id, hold)),
                _ => None,
            })
            .collect();
        let mut opened_here: HashSet<HoldId> = HashSet::new();
        // Transfers (by index) of detached resolutions: they move the free balance.
        let mut free: HashSet<usize> = HashSet::new();
        let mut batch = Batch {
            holds: Vec::new(),
            resolutions: Vec::new(),
            transfers: Vec::new(),
            usage: Vec::new(),
            events: Vec::new(),
            deltas: BTreeMap::new(),
            lease_deltas: BTreeMap::new(),
            key_spend: BTreeMap::new(),
        };
        for write in writes {
            match write {
                LedgerWrite::Transfer {
                    account,
                    transfer,
                    memo,
                    reference,
                    at,
                } => batch
                    .transfers
                    .push((transfer, *account, memo, reference.clone(), *at)),
                LedgerWrite::OpenHold {
                    record,
                    transfer,
                    key_cap,
                } => {
                    let hold = &record.hold;
                    if let Some(key) = hold.key {
                        let spend = batch.key_spend.entry(key).or_default().at(hold.created_at);
                        spend.held += hold.amount.0;
                        spend.cap = match (spend.cap, *key_cap) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    let state = resolved_here.get(&hold.id).copied().unwrap_or(hold);
                    opened_here.insert(hold.id);
                    batch.holds.push((record, state));
                    if let Some(transfer) = transfer {
                        let at = hold.created_at;
                        batch
                            .transfers
                            .push((transfer, hold.account, "", reference(hold), at));
                    }
                }
                LedgerWrite::ResolveHold {
                    hold,
                    transfers,
                    detached,
                } => {
                    if !opened_here.contains(&hold.id) {
                        batch.resolutions.push(hold);
                    }
                    let at = hold.resolved_at.unwrap_or(hold.created_at);
                    if let Some(key) = hold.key {
                        let spend = batch.key_spend.entry(key).or_default().at(at);
                        spend.held -= hold.amount.0;
                        spend.spent += hold.charged.0;
                    }
                    for transfer in transfers {
                        batch
                            .transfers
                            .push((transfer, hold.account, "", reference(hold), at));
                        if *detached {
                            free.insert(batch.transfers.len() - 1);
                        }
                    }
                }
                LedgerWrite::Usage(row) => batch.usage.push(row),
                LedgerWrite::Event(event) => batch.events.push(event),
            }
        }
        for (i, (transfer, ..)) in batch.transfers.iter().enumerate() {
            add_deltas(transfer, &mut batch.deltas);
            if transfer.kind.moves_lease() && !free.contains(&i) {
                for moved in transfer.balance_moves() {
                    *batch.lease_deltas.entry(moved.account).or_default() += moved.available;
                }
            }
        }
        batch
    }
}

/// What a hold's transfers are filed under: the data-plane request it pays for, or, for a
/// billing-API hold, the hold's own id (the one the API answers to).
fn reference(hold: &Hold) -> String {
    match hold.reference {
        Some(request) => request.to_string(),
        None => hold.id.to_string(),
    }
}

/// How a transfer moves an account's cached (available, held, debt) balances.
fn add_deltas(transfer: &Transfer, deltas: &mut BTreeMap<AccountId, (i64, i64, i64)>) {
    for moved in transfer.balance_moves() {
        let delta = deltas.entry(moved.account).or_default();
        delta.0 += moved.available;
        delta.1 += moved.held;
        delta.2 += moved.debt;
    }
}

/// Of `resolved` holds, only `changed` were pending: a hold resolved twice is corrupt data. The
/// writer then commits the batch's writes one by one, and a lone hold is named.
pub(crate) fn not_pending(resolved: &[&Hold], changed: u64) -> StoreError {
    StoreError::Corrupt(match resolved {
        [hold] => format!(
            "hold {} is not pending; it cannot be resolved again",
            hold.id
        ),
        _ => format!(
            "{} of {} holds to resolve were not pending; a hold cannot be resolved again",
            (resolved.len() as u64).saturating_sub(changed),
            resolved.len()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::ledger::{Book, HoldRequest, Resolve, Wallet};

    /// A hold of 100 opened and settled at 40 in a book, as the write its settlement makes.
    fn settled(account: AccountId, detached: bool) -> LedgerWrite {
        let mut book = Book::new();
        let available = Nanos(1_000);
        book.load_wallet(
            account,
            Wallet {
                available,
                held: Nanos::ZERO,
                debt: Nanos::ZERO,
            },
        );
        let at = Utc::now();
        let (hold, _) = book
            .open(HoldRequest {
                id: HoldId::new(),
                account,
                key: None,
                amount: Nanos(100),
                key_cap: None,
                at,
                expires_at: at + chrono::Duration::seconds(60),
                reference: None,
            })
            .unwrap();
        let resolution = book
            .resolve(hold.id, Resolve::Settle(Nanos(40)), at)
            .unwrap();
        LedgerWrite::ResolveHold {
            hold: resolution.hold,
            transfers: resolution.transfers,
            detached,
        }
    }

    #[test]
    fn a_detached_resolution_returns_its_rest_to_the_free_balance_not_a_lease() {
        let account = AccountId::new();
        let in_book = [settled(account, false)];
        let planned = Batch::plan(&in_book);
        assert_eq!(planned.deltas[&account], (60, -100, 0));
        assert_eq!(planned.lease_deltas.get(&account), Some(&60));
        let detached = [settled(account, true)];
        let planned = Batch::plan(&detached);
        assert_eq!(planned.deltas[&account], (60, -100, 0));
        assert_eq!(planned.lease_deltas.get(&account).copied().unwrap_or(0), 0);
    }
}
