//! The ledger's rules. Every movement of money is a [`Transfer`] between two ledger accounts
//! (external, an account's wallet, its holds, revenue), so the sum of all balances is zero by
//! construction. A [`Book`] is the in-memory state those rules act on: wallets that never go
//! below zero, holds that resolve exactly once, and each key's spend this month. The server keeps
//! one `Book` for admission and persists the transfers each operation returns.

use crate::money::MAX_AMOUNT;
use crate::{AccountId, HoldId, KeyId, Nanos, RequestId};
use chrono::{DateTime, Datelike, Utc};
use std::collections::HashMap;
use std::fmt;

/// A ledger account: where a transfer takes money from or puts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LedgerAccount {
    /// The outside world: grants and top-ups come from here.
    External,
    /// What the operator has earned: charges go here.
    Revenue,
    /// An account's spendable credit.
    Wallet(AccountId),
    /// An account's credit reserved by pending holds.
    Holds(AccountId),
    /// What the account owes: below zero when a refund or a dispute took back credit the wallet
    /// had already spent. New credit pays it first.
    Debt(AccountId),
    /// Credit a card dispute has taken out of the account's wallet until it closes.
    Disputed(AccountId),
}

impl fmt::Display for LedgerAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerAccount::External => f.write_str("external"),
            LedgerAccount::Revenue => f.write_str("revenue"),
            LedgerAccount::Wallet(id) => write!(f, "wallet:{id}"),
            LedgerAccount::Holds(id) => write!(f, "holds:{id}"),
            LedgerAccount::Debt(id) => write!(f, "debt:{id}"),
            LedgerAccount::Disputed(id) => write!(f, "disputed:{id}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferKind {
    /// External → wallet: credits granted or bought.
    Grant,
    /// Wallet → holds: credit reserved for a call.
    Hold,
    /// Holds → revenue: the actual cost of a settled hold.
    Charge,
    /// Holds → wallet: what a hold did not charge, returned.
    Release,
    /// Wallet → external: credit taken back because its payment was refunded.
    Refund,
    /// Wallet → disputed: credit set aside while its payment is disputed.
    Dispute,
    /// Disputed → external: a dispute the account won for the cardholder; the credit is gone.
    Chargeback,
    /// Debt → external or disputed: what a refund or dispute took that the wallet no longer had.
    Debt,
    /// Wallet → debt: new credit paying what the account owes.
    Repay,
    /// Wallet → revenue: a plan's fee for a period, paid only from credit the wallet has.
    Fee,
}

impl TransferKind {
    const ALL: [TransferKind; 10] = [
        TransferKind::Grant,
        TransferKind::Hold,
        TransferKind::Charge,
        TransferKind::Release,
        TransferKind::Refund,
        TransferKind::Dispute,
        TransferKind::Chargeback,
        TransferKind::Debt,
        TransferKind::Repay,
        TransferKind::Fee,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Grant => "grant",
            TransferKind::Hold => "hold",
            TransferKind::Charge => "charge",
            TransferKind::Release => "release",
            TransferKind::Refund => "refund",
            TransferKind::Dispute => "dispute",
            TransferKind::Chargeback => "chargeback",
            TransferKind::Debt => "debt",
            TransferKind::Repay => "repay",
            TransferKind::Fee => "fee",
        }
    }

    pub fn parse(text: &str) -> Option<TransferKind> {
        TransferKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether the transfer is a hold's (made by a node's book, from its lease on a shared
    /// store), rather than one made from outside, on the free balance.
    pub fn moves_lease(self) -> bool {
        matches!(
            self,
            TransferKind::Hold | TransferKind::Charge | TransferKind::Release
        )
    }
}

/// Moves `amount` (always positive) from `debit` to `credit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub debit: LedgerAccount,
    pub credit: LedgerAccount,
    pub amount: Nanos,
    pub kind: TransferKind,
}

impl Transfer {
    /// How the transfer moves the accounts' cached balances, for each side that is a wallet,
    /// holds or debt account.
    pub fn balance_moves(&self) -> impl Iterator<Item = BalanceMove> {
        [(self.debit, -self.amount.0), (self.credit, self.amount.0)]
            .into_iter()
            .filter_map(|(side, change)| {
                let (account, available, held, debt) = match side {
                    LedgerAccount::Wallet(account) => (account, change, 0, 0),
                    LedgerAccount::Holds(account) => (account, 0, change, 0),
                    // The debt account's balance is what is owed, negated.
                    LedgerAccount::Debt(account) => (account, 0, 0, -change),
                    LedgerAccount::External
                    | LedgerAccount::Revenue
                    | LedgerAccount::Disputed(_) => return None,
                };
                Some(BalanceMove {
                    account,
                    available,
                    held,
                    debt,
                })
            })
    }
}

/// A transfer's change to one account's cached balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceMove {
    pub account: AccountId,
    pub available: i64,
    pub held: i64,
    pub debt: i64,
}

/// An account's money as the ledger sees it: the balances of its wallet and holds accounts, and
/// what it owes (its debt account's balance, negated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wallet {
    pub available: Nanos,
    pub held: Nanos,
    pub debt: Nanos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldStatus {
    Pending,
    /// Charged its actual cost (at most the amount held); the rest went back to the wallet.
    Settled,
    /// Charged nothing.
    Released,
    /// Charged nothing: it outlived its TTL (abandoned, or left behind by a crash).
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Pending => "pending",
            HoldStatus::Settled => "settled",
            HoldStatus::Released => "released",
            HoldStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<HoldStatus> {
        [
            HoldStatus::Pending,
            HoldStatus::Settled,
            HoldStatus::Released,
            HoldStatus::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// How a request's money ended, as its usage row records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BillingStatus {
    /// Charged on the usage the upstream reported (or the flat price) for a complete response.
    Settled,
    /// The client left before the end; charged on the usage the upstream reported afterwards.
    Partial,
    /// No usage was reported; charged on Tollgate's estimate (the route's stream policy).
    Estimated,
    /// Charged nothing: refused, failed, or no usage under the `release` policy.
    Released,
    /// Charged nothing: the hold outlived its TTL before the request finished.
    Expired,
}

impl BillingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingStatus::Settled => "settled",
            BillingStatus::Partial => "partial",
            BillingStatus::Estimated => "estimated",
            BillingStatus::Released => "released",
            BillingStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<BillingStatus> {
        [
            BillingStatus::Settled,
            BillingStatus::Partial,
            BillingStatus::Estimated,
            BillingStatus::Released,
            BillingStatus::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A reservation of an account's credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: HoldId,
    pub account: AccountId,
    /// The key whose monthly spend the hold counts against.
    pub key: Option<KeyId>,
    pub amount: Nanos,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub status: HoldStatus,
    /// What settling charged; zero otherwise.
    pub charged: Nanos,
    pub resolved_at: Option<DateTime<Utc>>,
    /// The data-plane request this hold pays for: its ledger entries carry this id, never the
    /// hold's own (which the billing API would accept).
    pub reference: Option<RequestId>,
}

/// How to resolve a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Charge this much; more than the hold is charged as the hold.
    Settle(Nanos),
    Release,
    Expire,
}

/// The outcome of resolving a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The hold as resolved (by this call or the first one).
    pub hold: Hold,
    /// What to persist: empty when the hold had been resolved before.
    pub transfers: Vec<Transfer>,
    /// False when the hold had been resolved before: a no-op returning the first outcome.
    pub first: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("needs {required} but the wallet has {available}")]
    InsufficientBalance { required: Nanos, available: Nanos },
    /// The account owes `debt`: no hold opens until new credit pays it.
    #[error("the account owes {debt}")]
    InDebt { debt: Nanos },
    #[error("the key's monthly cap of {cap} would be exceeded ({spent} spent, {held} held)")]
    KeyCapReached {
        cap: Nanos,
        spent: Nanos,
        held: Nanos,
    },
    /// The caller must load the wallet (or the key's spend) from the store first.
    #[error("not loaded")]
    NotLoaded,
    /// The balance would pass [`MAX_AMOUNT`].
    #[error("the amount would take the wallet over its limit")]
    Overflow,
    /// A negative amount (or a grant over [`MAX_AMOUNT`]): a bug in the caller, refused as it is.
    #[error("the amount {0} is out of range")]
    InvalidAmount(Nanos),
}

/// A calendar month (UTC) as one number, so months compare and roll over simply.
pub fn month_of(at: DateTime<Utc>) -> i32 {
    at.year() * 12 + at.month0() as i32
}

/// The first instant of `at`'s calendar month (UTC).
pub fn month_start(at: DateTime<Utc>) -> DateTime<Utc> {
    at.date_naive()
        .with_day(1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
        .unwrap_or(at)
}

/// How much credit a node carves from a wallet's free balance (what no node's lease holds) to
/// cover a hold of `needed`: an eighth of what is free, so every node can take a share and each
/// carve serves many requests of a hot wallet, in whole holds of this size, so a lease of equal
/// holds never ends with a part too small to use. Never less than `needed`: as the free balance
/// runs low (under sixteen holds' worth) this is exactly `needed`, a per-request hold. `None` when
/// the free balance cannot cover `needed`.
pub fn lease_size(free: Nanos, needed: Nanos) -> Option<Nanos> {
    const SHARE: i64 = 8;
    if needed.0 < 0 || free < needed {
        return None;
    }
    if needed == Nanos::ZERO {
        return Some(Nanos::ZERO);
    }
    let holds = (free.0 / SHARE / needed.0).max(1);
    Some(Nanos(holds * needed.0))
}

/// A key's spend in one calendar month: charged so far, and reserved by its pending holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeySpend {
    month: i32,
    spent: Nanos,
    held: Nanos,
}

impl KeySpend {
    /// A charge counts in the month it is settled; a new month starts from zero. Months only
    /// move forward: a clock read just before the turn of the month, by a caller that took the
    /// book's lock just after another's, must not reset the new month's spend.
    fn roll_to(&mut self, month: i32) {
        if month > self.month {
            self.month = month;
            self.spent = Nanos::ZERO;
        }
    }
}

/// What a new hold is for.
#[derive(Debug, Clone, Copy)]
pub struct HoldRequest {
    pub id: HoldId,
    pub account: AccountId,
    pub key: Option<KeyId>,
    pub amount: Nanos,
    /// The key's monthly spend cap, if it has one.
    pub key_cap: Option<Nanos>,
    pub at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The data-plane request the hold pays for, if it is one's.
    pub reference: Option<RequestId>,
}

/// The in-memory ledger state: loaded wallets, pending holds (and resolved ones until the
/// caller forgets them), and loaded key spends.
#[derive(Debug, Default)]
pub struct Book {
    wallets: HashMap<AccountId, Wallet>,
    key_spend: HashMap<KeyId, KeySpend>,
    holds: HashMap<HoldId, Hold>,
}

impl Book {
    pub fn new() -> Book {
        Book::default()
    }

    pub fn wallet(&self, account: AccountId) -> Option<Wallet> {
        self.wallets.get(&account).copied()
    }

    /// Installs a wallet read from the store, unless one is loaded already (which is newer).
    pub fn load_wallet(&mut self, account: AccountId, wallet: Wallet) {
        self.wallets.entry(account).or_insert(wallet);
    }

    pub fn key_spend_loaded(&self, key: KeyId) -> bool {
        self.key_spend.contains_key(&key)
    }

    /// Installs a key's spend this month read from the store, unless already loaded. What it
    /// holds is counted from the pending holds in the book.
    pub fn load_key_spend(&mut self, key: KeyId, at: DateTime<Utc>, spent_this_month: Nanos) {
        if self.key_spend.contains_key(&key) {
            return;
        }
        let held = self
            .holds
            .values()
            .filter(|h| h.key == Some(key) && h.status == HoldStatus::Pending)
            .fold(Nanos::ZERO, |sum, h| {
                Nanos(sum.0.saturating_add(h.amount.0))
            });
        self.key_spend.insert(
            key,
            KeySpend {
                month: month_of(at),
                spent: spent_this_month,
                held,
            },
        );
    }

    /// What the key has been charged in `at`'s month, if its spend is loaded.
    pub fn key_spent(&self, key: KeyId, at: DateTime<Utc>) -> Option<Nanos> {
        self.key_spend.get(&key).map(|s| {
            if s.month == month_of(at) {
                s.spent
            } else {
                Nanos::ZERO
            }
        })
    }

    /// Puts `amount` into a loaded wallet from `from` (the outside, or a dispute won back) and
    /// pays what the account owes from it first: the credit, then the repayment if any.
    pub fn credit(
        &mut self,
        account: AccountId,
        amount: Nanos,
        from: LedgerAccount,
    ) -> Result<Vec<Transfer>, Refusal> {
        if !(Nanos::ZERO..=MAX_AMOUNT).contains(&amount) {
            return Err(Refusal::InvalidAmount(amount));
        }
        let wallet = self.wallets.get_mut(&account).ok_or(Refusal::NotLoaded)?;
        let total = wallet.available.0 + wallet.held.0 + amount.0;
        if total > MAX_AMOUNT.0 {
            return Err(Refusal::Overflow);
        }
        let mut transfers = Vec::new();
        if amount == Nanos::ZERO {
            return Ok(transfers);
        }
        wallet.available = Nanos(wallet.available.0 + amount.0);
        transfers.push(Transfer {
            debit: from,
            credit: LedgerAccount::Wallet(account),
            amount,
            kind: TransferKind::Grant,
        });
        let repaid = wallet.debt.min(wallet.available);
        if repaid > Nanos::ZERO {
            wallet.available = Nanos(wallet.available.0 - repaid.0);
            wallet.debt = Nanos(wallet.debt.0 - repaid.0);
            transfers.push(Transfer {
                debit: LedgerAccount::Wallet(account),
                credit: LedgerAccount::Debt(account),
                amount: repaid,
                kind: TransferKind::Repay,
            });
        }
        Ok(transfers)
    }

    /// Takes `amount` out of a loaded wallet to `to` (the outside for a refund, the disputed
    /// account for a dispute), as transfers of `kind`. What the wallet no longer has becomes
    /// debt: the wallet never goes below zero.
    pub fn take(
        &mut self,
        account: AccountId,
        amount: Nanos,
        to: LedgerAccount,
        kind: TransferKind,
    ) -> Result<Vec<Transfer>, Refusal> {
        if !(Nanos::ZERO..=MAX_AMOUNT).contains(&amount) {
            return Err(Refusal::InvalidAmount(amount));
        }
        let wallet = self.wallets.get_mut(&account).ok_or(Refusal::NotLoaded)?;
        if wallet.debt.0 + amount.0 > MAX_AMOUNT.0 {
            return Err(Refusal::Overflow);
        }
        let taken = wallet.available.min(amount);
        let owed = Nanos(amount.0 - taken.0);
        wallet.available = Nanos(wallet.available.0 - taken.0);
        wallet.debt = Nanos(wallet.debt.0 + owed.0);
        let mut transfers = Vec::new();
        if taken > Nanos::ZERO {
            transfers.push(Transfer {
                debit: LedgerAccount::Wallet(account),
                credit: to,
                amount: taken,
                kind,
            });
        }
        if owed > Nanos::ZERO {
            transfers.push(Transfer {
                debit: LedgerAccount::Debt(account),
                credit: to,
                amount: owed,
                kind: TransferKind::Debt,
            });
        }
        Ok(transfers)
    }

    /// Pays `amount` out of a loaded wallet to `to`, as a transfer of `kind`, only if the wallet
    /// has it all: unlike [`Book::take`], a payment never makes debt.
    pub fn pay(
        &mut self,
        account: AccountId,
        amount: Nanos,
        to: LedgerAccount,
        kind: TransferKind,
    ) -> Result<Vec<Transfer>, Refusal> {
        if !(Nanos::ZERO..=MAX_AMOUNT).contains(&amount) {
            return Err(Refusal::InvalidAmount(amount));
        }
        let wallet = self.wallets.get_mut(&account).ok_or(Refusal::NotLoaded)?;
        if wallet.available < amount {
            return Err(Refusal::InsufficientBalance {
                required: amount,
                available: wallet.available,
            });
        }
        wallet.available = Nanos(wallet.available.0 - amount.0);
        Ok((amount > Nanos::ZERO)
            .then_some(Transfer {
                debit: LedgerAccount::Wallet(account),
                credit: to,
                amount,
                kind,
            })
            .into_iter()
            .collect())
    }

    /// Adds credit to a loaded wallet without a transfer: a lease carved from the stored
    /// wallet, which the ledger already counts as the account's.
    pub fn add_lease(&mut self, account: AccountId, amount: Nanos) {
        if let Some(wallet) = self.wallets.get_mut(&account) {
            wallet.available = Nanos(wallet.available.0.saturating_add(amount.0));
        }
    }

    /// Takes everything available from a loaded wallet (a lease being given back); returns it.
    pub fn take_lease(&mut self, account: AccountId) -> Nanos {
        self.wallets
            .get_mut(&account)
            .map_or(Nanos::ZERO, |wallet| std::mem::take(&mut wallet.available))
    }

    /// Accounts whose loaded wallet has credit available.
    pub fn wallets_with_credit(&self) -> Vec<AccountId> {
        self.wallets
            .iter()
            .filter(|(_, w)| w.available > Nanos::ZERO)
            .map(|(a, _)| *a)
            .collect()
    }

    /// Hands a pending hold over to the store: the book forgets it as if it were resolved
    /// elsewhere, leaving the wallet's available credit as it is (the hold's amount stays
    /// reserved until whoever resolves it returns what it did not charge).
    pub fn detach(&mut self, id: HoldId) {
        let Some(hold) = self.holds.remove(&id) else {
            return;
        };
        if hold.status != HoldStatus::Pending {
            return;
        }
        if let Some(wallet) = self.wallets.get_mut(&hold.account) {
            wallet.held = Nanos(wallet.held.0 - hold.amount.0);
        }
        if let Some(spend) = hold.key.and_then(|k| self.key_spend.get_mut(&k)) {
            spend.held = Nanos(spend.held.0 - hold.amount.0);
        }
    }

    /// Reserves `amount` from the wallet, or refuses without changing anything. The check and
    /// the reservation are one step on `&mut self`: there is no window between them.
    pub fn open(&mut self, request: HoldRequest) -> Result<(Hold, Option<Transfer>), Refusal> {
        // An amount over any wallet's limit is refused below, as more than the wallet has.
        if request.amount < Nanos::ZERO {
            return Err(Refusal::InvalidAmount(request.amount));
        }
        let month = month_of(request.at);
        let wallet = self
            .wallets
            .get(&request.account)
            .ok_or(Refusal::NotLoaded)?;
        if wallet.debt > Nanos::ZERO {
            return Err(Refusal::InDebt { debt: wallet.debt });
        }
        if wallet.available < request.amount {
            return Err(Refusal::InsufficientBalance {
                required: request.amount,
                available: wallet.available,
            });
        }
        if let Some(key) = request.key {
            let spend = self.key_spend.get_mut(&key).ok_or(Refusal::NotLoaded)?;
            spend.roll_to(month);
            if let Some(cap) = request.key_cap {
                let committed = spend.spent.0.saturating_add(spend.held.0);
                if committed.saturating_add(request.amount.0) > cap.0 {
                    return Err(Refusal::KeyCapReached {
                        cap,
                        spent: spend.spent,
                        held: spend.held,
                    });
                }
            }
            spend.held = Nanos(spend.held.0.saturating_add(request.amount.0));
        }
        let wallet = self
            .wallets
            .get_mut(&request.account)
            .ok_or(Refusal::NotLoaded)?;
        wallet.available = Nanos(wallet.available.0 - request.amount.0);
        wallet.held = Nanos(wallet.held.0.saturating_add(request.amount.0));
        let hold = Hold {
            id: request.id,
            account: request.account,
            key: request.key,
            amount: request.amount,
            created_at: request.at,
            expires_at: request.expires_at,
            status: HoldStatus::Pending,
            charged: Nanos::ZERO,
            resolved_at: None,
            reference: request.reference,
        };
        self.holds.insert(hold.id, hold.clone());
        let transfer = (request.amount > Nanos::ZERO).then_some(Transfer {
            debit: LedgerAccount::Wallet(request.account),
            credit: LedgerAccount::Holds(request.account),
            amount: request.amount,
            kind: TransferKind::Hold,
        });
        Ok((hold, transfer))
    }

    /// Puts back a pending hold read from the store (its amount is already in the loaded
    /// wallet's `held`).
    pub fn restore(&mut self, hold: Hold) {
        if self.holds.contains_key(&hold.id) {
            return;
        }
        // A loaded key spend counts the pending holds it knows; add this one to it.
        if let Some(spend) = hold.key.and_then(|k| self.key_spend.get_mut(&k)) {
            if hold.status == HoldStatus::Pending {
                spend.held = Nanos(spend.held.0.saturating_add(hold.amount.0));
            }
        }
        self.holds.insert(hold.id, hold);
    }

    /// Resolves a hold exactly once. Resolving it again changes nothing and returns the first
    /// outcome. `None` if the book does not know the hold.
    pub fn resolve(&mut self, id: HoldId, how: Resolve, at: DateTime<Utc>) -> Option<Resolution> {
        let hold = self.holds.get_mut(&id)?;
        if hold.status != HoldStatus::Pending {
            return Some(Resolution {
                hold: hold.clone(),
                transfers: Vec::new(),
                first: false,
            });
        }
        let (status, charged) = match how {
            // The TTL is a deadline: past it nothing is charged, whether or not the sweeper has
            // come by yet (an idempotent retry may already have taken over).
            Resolve::Settle(_) if at >= hold.expires_at => (HoldStatus::Expired, Nanos::ZERO),
            Resolve::Settle(cost) => (HoldStatus::Settled, cost.clamp(Nanos::ZERO, hold.amount)),
            Resolve::Release => (HoldStatus::Released, Nanos::ZERO),
            Resolve::Expire => (HoldStatus::Expired, Nanos::ZERO),
        };
        hold.status = status;
        hold.charged = charged;
        hold.resolved_at = Some(at);
        let returned = Nanos(hold.amount.0 - charged.0);
        let account = hold.account;
        if let Some(wallet) = self.wallets.get_mut(&account) {
            wallet.held = Nanos(wallet.held.0 - hold.amount.0);
            wallet.available = Nanos(wallet.available.0.saturating_add(returned.0));
        }
        if let Some(spend) = hold.key.and_then(|k| self.key_spend.get_mut(&k)) {
            spend.held = Nanos(spend.held.0 - hold.amount.0);
            spend.roll_to(month_of(at));
            spend.spent = Nanos(spend.spent.0.saturating_add(charged.0));
        }
        let mut transfers = Vec::with_capacity(2);
        if charged > Nanos::ZERO {
            transfers.push(Transfer {
                debit: LedgerAccount::Holds(account),
                credit: LedgerAccount::Revenue,
                amount: charged,
                kind: TransferKind::Charge,
            });
        }
        if returned > Nanos::ZERO {
            transfers.push(Transfer {
                debit: LedgerAccount::Holds(account),
                credit: LedgerAccount::Wallet(account),
                amount: returned,
                kind: TransferKind::Release,
            });
        }
        Some(Resolution {
            hold: hold.clone(),
            transfers,
            first: true,
        })
    }

    pub fn hold(&self, id: HoldId) -> Option<&Hold> {
        self.holds.get(&id)
    }

    /// Pending holds whose TTL has passed at `now`.
    pub fn expired(&self, now: DateTime<Utc>) -> Vec<HoldId> {
        self.holds
            .values()
            .filter(|h| h.status == HoldStatus::Pending && h.expires_at <= now)
            .map(|h| h.id)
            .collect()
    }

    /// Drops a resolved hold from memory (once its resolution is stored). Pending holds stay.
    pub fn forget(&mut self, id: HoldId) {
        if self
            .holds
            .get(&id)
            .is_some_and(|h| h.status != HoldStatus::Pending)
        {
            self.holds.remove(&id);
        }
    }

    /// Undoes, in the book, transfers the store refused (a ledger write that was never stored):
    /// each moves the loaded wallets back by what it had moved them. A hold whose opening the
    /// store refused and that is still pending here leaves the book, so nothing resolves it.
    pub fn undo(&mut self, transfers: &[Transfer], unopened: Option<HoldId>) {
        // A hold resolved here meanwhile stays: its resolution's write is refused and undone too.
        let pending = unopened
            .and_then(|id| self.holds.get(&id))
            .is_some_and(|h| h.status == HoldStatus::Pending);
        if let Some(hold) = unopened
            .filter(|_| pending)
            .and_then(|id| self.holds.remove(&id))
        {
            if let Some(spend) = hold.key.and_then(|k| self.key_spend.get_mut(&k)) {
                spend.held = Nanos(spend.held.0 - hold.amount.0);
            }
        }
        for moved in transfers.iter().flat_map(Transfer::balance_moves) {
            if let Some(wallet) = self.wallets.get_mut(&moved.account) {
                wallet.available = Nanos(wallet.available.0 - moved.available);
                wallet.held = Nanos(wallet.held.0 - moved.held);
                wallet.debt = Nanos(wallet.debt.0 - moved.debt);
            }
        }
    }

    pub fn pending_holds(&self) -> usize {
        self.holds
            .values()
            .filter(|h| h.status == HoldStatus::Pending)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeDelta, TimeZone};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 31, 23, 0, 0).unwrap()
    }

    #[test]
    fn a_key_spend_month_never_rolls_backwards() {
        let account = AccountId::new();
        let key = KeyId::new();
        let mut book = book_with(account, 1000);
        let february = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
        book.load_key_spend(key, february, Nanos(0));
        let (hold, _) = book
            .open(HoldRequest {
                at: february,
                ..request(account, Some(key), 40)
            })
            .unwrap();
        book.resolve(hold.id, Resolve::Settle(Nanos(40)), february);
        // A caller that read the clock a moment before midnight takes the lock after: the
        // month stays February, and February's spend stands against the cap.
        let capped = HoldRequest {
            key_cap: Some(Nanos(50)),
            at: february - TimeDelta::milliseconds(1),
            ..request(account, Some(key), 20)
        };
        assert!(matches!(
            book.open(capped),
            Err(Refusal::KeyCapReached {
                spent: Nanos(40),
                ..
            })
        ));
    }

    #[test]
    fn negative_holds_and_grants_past_the_limit_are_refused() {
        let account = AccountId::new();
        let mut book = Book::new();
        book.load_wallet(account, Wallet::default());
        assert!(matches!(
            book.open(request(account, None, -5)),
            Err(Refusal::InvalidAmount(Nanos(-5)))
        ));
        assert!(matches!(
            book.credit(account, Nanos(-1), LedgerAccount::External),
            Err(Refusal::InvalidAmount(_))
        ));
        assert!(matches!(
            book.take(
                account,
                Nanos(-1),
                LedgerAccount::External,
                TransferKind::Refund
            ),
            Err(Refusal::InvalidAmount(_))
        ));
        book.credit(account, MAX_AMOUNT, LedgerAccount::External)
            .unwrap();
        assert!(matches!(
            book.credit(account, Nanos(1), LedgerAccount::External),
            Err(Refusal::Overflow)
        ));
        assert_eq!(book.wallet(account).unwrap().available, MAX_AMOUNT);
        // More than any wallet can hold is simply more than this one has.
        assert!(matches!(
            book.open(request(account, None, i64::MAX)),
            Err(Refusal::InsufficientBalance { .. })
        ));
    }

    #[test]
    fn a_take_beyond_the_wallet_becomes_debt_and_new_credit_pays_it_first() {
        let account = AccountId::new();
        let mut book = book_with(account, 30);
        let taken = book
            .take(
                account,
                Nanos(50),
                LedgerAccount::External,
                TransferKind::Refund,
            )
            .unwrap();
        assert_eq!(
            taken
                .iter()
                .map(|t| (t.debit, t.amount.0, t.kind))
                .collect::<Vec<_>>(),
            [
                (LedgerAccount::Wallet(account), 30, TransferKind::Refund),
                (LedgerAccount::Debt(account), 20, TransferKind::Debt),
            ]
        );
        let wallet = book.wallet(account).unwrap();
        assert_eq!((wallet.available, wallet.debt), (Nanos(0), Nanos(20)));
        // Released credit comes back while the debt stands: still no hold opens.
        book.add_lease(account, Nanos(5));
        assert_eq!(
            book.open(request(account, None, 1)),
            Err(Refusal::InDebt { debt: Nanos(20) })
        );
        book.take_lease(account);
        // A credit smaller than the debt all goes to it; the next one pays the rest.
        let first = book
            .credit(account, Nanos(15), LedgerAccount::External)
            .unwrap();
        assert_eq!(
            first
                .iter()
                .map(|t| (t.kind, t.amount.0))
                .collect::<Vec<_>>(),
            [(TransferKind::Grant, 15), (TransferKind::Repay, 15)]
        );
        book.credit(account, Nanos(25), LedgerAccount::External)
            .unwrap();
        let wallet = book.wallet(account).unwrap();
        assert_eq!((wallet.available, wallet.debt), (Nanos(20), Nanos(0)));
    }

    #[test]
    fn a_payment_takes_all_it_needs_from_the_wallet_or_nothing() {
        let account = AccountId::new();
        let mut book = book_with(account, 30);
        assert_eq!(
            book.pay(
                account,
                Nanos(31),
                LedgerAccount::Revenue,
                TransferKind::Fee
            ),
            Err(Refusal::InsufficientBalance {
                required: Nanos(31),
                available: Nanos(30)
            })
        );
        assert_eq!(book.wallet(account).unwrap().available, Nanos(30));
        let paid = book
            .pay(
                account,
                Nanos(30),
                LedgerAccount::Revenue,
                TransferKind::Fee,
            )
            .unwrap();
        assert_eq!(
            paid.iter()
                .map(|t| (t.debit, t.credit, t.amount.0, t.kind))
                .collect::<Vec<_>>(),
            [(
                LedgerAccount::Wallet(account),
                LedgerAccount::Revenue,
                30,
                TransferKind::Fee
            )]
        );
        let wallet = book.wallet(account).unwrap();
        assert_eq!((wallet.available, wallet.debt), (Nanos(0), Nanos(0)));
        assert!(book
            .pay(account, Nanos(0), LedgerAccount::Revenue, TransferKind::Fee)
            .unwrap()
            .is_empty());
        assert_eq!(
            book.pay(
                account,
                Nanos(-1),
                LedgerAccount::Revenue,
                TransferKind::Fee
            ),
            Err(Refusal::InvalidAmount(Nanos(-1)))
        );
    }

    /// A book with one wallet loaded, holding `available`.
    fn book_with(account: AccountId, available: i64) -> Book {
        let mut book = Book::new();
        book.load_wallet(
            account,
            Wallet {
                available: Nanos(available),
                ..Wallet::default()
            },
        );
        book
    }

    fn request(book_account: AccountId, key: Option<KeyId>, amount: i64) -> HoldRequest {
        HoldRequest {
            id: HoldId::new(),
            account: book_account,
            key,
            amount: Nanos(amount),
            key_cap: None,
            at: t0(),
            expires_at: t0() + TimeDelta::days(1),
            reference: None,
        }
    }

    #[test]
    fn a_hold_settled_past_its_ttl_is_expired_and_charges_nothing() {
        let account = AccountId::new();
        let mut book = book_with(account, 100);
        let (hold, _) = book.open(request(account, None, 60)).unwrap();
        let late = book
            .resolve(hold.id, Resolve::Settle(Nanos(60)), hold.expires_at)
            .unwrap();
        assert_eq!(late.hold.status, HoldStatus::Expired);
        assert_eq!(late.hold.charged, Nanos::ZERO);
        assert_eq!(book.wallet(account).unwrap().available, Nanos(100));
    }

    #[test]
    fn refuses_what_the_wallet_cannot_cover_without_changing_it() {
        let account = AccountId::new();
        let mut book = book_with(account, 10);
        assert_eq!(
            book.open(request(account, None, 11)).unwrap_err(),
            Refusal::InsufficientBalance {
                required: Nanos(11),
                available: Nanos(10)
            }
        );
        assert_eq!(book.wallet(account).unwrap().available, Nanos(10));
        let (hold, transfer) = book.open(request(account, None, 10)).unwrap();
        assert_eq!(transfer.unwrap().amount, Nanos(10));
        assert_eq!(
            book.wallet(account).unwrap(),
            Wallet {
                available: Nanos(0),
                held: Nanos(10),
                debt: Nanos(0),
            }
        );
        assert_eq!(book.pending_holds(), 1);
        assert_eq!(book.expired(hold.expires_at).len(), 1);
    }

    #[test]
    fn settles_at_most_the_hold_and_only_once() {
        let account = AccountId::new();
        let mut book = book_with(account, 100);
        let (hold, _) = book.open(request(account, None, 40)).unwrap();
        let first = book
            .resolve(hold.id, Resolve::Settle(Nanos(55)), t0())
            .unwrap();
        assert!(first.first);
        assert_eq!(first.hold.charged, Nanos(40));
        assert_eq!(first.transfers.len(), 1, "all charged, nothing returned");
        let again = book.resolve(hold.id, Resolve::Release, t0()).unwrap();
        assert!(!again.first);
        assert!(again.transfers.is_empty());
        assert_eq!(again.hold.status, HoldStatus::Settled);
        assert_eq!(book.wallet(account).unwrap().available, Nanos(60));
        book.forget(hold.id);
        assert!(book.hold(hold.id).is_none());
    }

    #[test]
    fn key_cap_counts_spent_and_held_and_resets_each_month() {
        let account = AccountId::new();
        let key = KeyId::new();
        let mut book = book_with(account, 1000);
        book.load_key_spend(key, t0(), Nanos(60));
        let capped = |amount| HoldRequest {
            key_cap: Some(Nanos(100)),
            ..request(account, Some(key), amount)
        };
        let (hold, _) = book.open(capped(30)).unwrap();
        assert!(matches!(
            book.open(capped(11)),
            Err(Refusal::KeyCapReached { .. })
        ));
        book.open(capped(10)).unwrap();
        // Settled an hour later, in February: the charge counts in the new month.
        let february = t0() + TimeDelta::hours(1);
        book.resolve(hold.id, Resolve::Settle(Nanos(30)), february);
        assert_eq!(book.key_spent(key, february), Some(Nanos(30)));
        assert_eq!(book.key_spent(key, t0()), Some(Nanos(0)));
    }

    #[test]
    fn months_start_at_midnight_utc_on_the_first() {
        assert_eq!(
            month_start(t0()),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(month_of(t0()) + 1, month_of(t0() + TimeDelta::hours(1)));
    }

    /// One step of a random ledger history.
    #[derive(Debug, Clone)]
    enum Op {
        Grant(usize, i64),
        Take(usize, i64),
        Open {
            account: usize,
            key: usize,
            amount: i64,
            cap: Option<i64>,
        },
        Settle(usize, i64),
        Release(usize),
        Advance(i64),
        Sweep,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 0..1_000i64).prop_map(|(a, n)| Op::Grant(a, n)),
            (0..3usize, 0..600i64).prop_map(|(a, n)| Op::Take(a, n)),
            (
                0..3usize,
                0..4usize,
                0..500i64,
                proptest::option::of(0..800i64)
            )
                .prop_map(|(account, key, amount, cap)| Op::Open {
                    account,
                    key,
                    amount,
                    cap
                }),
            (0..64usize, 0..700i64).prop_map(|(h, c)| Op::Settle(h, c)),
            (0..64usize).prop_map(Op::Release),
            (1..120i64).prop_map(Op::Advance),
            Just(Op::Sweep),
        ]
    }

    /// Every balance recomputed from the transfers alone.
    fn balances(transfers: &[Transfer]) -> BTreeMap<LedgerAccount, i64> {
        let mut out = BTreeMap::new();
        for t in transfers {
            assert!(t.amount > Nanos::ZERO, "transfers move a positive amount");
            *out.entry(t.debit).or_insert(0) -= t.amount.0;
            *out.entry(t.credit).or_insert(0) += t.amount.0;
        }
        out
    }

    #[test]
    fn a_lease_is_an_eighth_of_the_free_balance_in_whole_holds_and_exact_when_it_runs_low() {
        assert_eq!(lease_size(Nanos(8_000), Nanos(10)), Some(Nanos(1_000)));
        // Whole holds: 33 of 30, not 1000.
        assert_eq!(lease_size(Nanos(8_000), Nanos(30)), Some(Nanos(990)));
        // Under sixteen holds' worth: exactly the hold.
        assert_eq!(lease_size(Nanos(150), Nanos(10)), Some(Nanos(10)));
        assert_eq!(lease_size(Nanos(10), Nanos(10)), Some(Nanos(10)));
        assert_eq!(lease_size(Nanos(9), Nanos(10)), None);
        assert_eq!(lease_size(Nanos(0), Nanos(0)), Some(Nanos(0)));
        assert_eq!(lease_size(Nanos(100), Nanos(-1)), None);
    }

    #[test]
    fn a_lease_is_added_taken_back_and_a_detached_hold_leaves_the_book() {
        let account = AccountId::new();
        let key = KeyId::new();
        let mut book = Book::new();
        book.load_wallet(account, Wallet::default());
        book.load_key_spend(key, t0(), Nanos::ZERO);
        book.add_lease(account, Nanos(100));
        assert_eq!(book.wallets_with_credit(), vec![account]);
        let (hold, _) = book.open(request(account, Some(key), 30)).unwrap();
        book.detach(hold.id);
        assert!(book.hold(hold.id).is_none());
        assert_eq!(
            book.wallet(account).unwrap(),
            Wallet {
                available: Nanos(70),
                ..Wallet::default()
            }
        );
        // The key's held spend forgot the detached hold.
        let mut capped = request(account, Some(key), 70);
        capped.key_cap = Some(Nanos(70));
        assert!(book.open(capped).is_ok());
        assert_eq!(book.take_lease(account), Nanos(0));
        book.add_lease(account, Nanos(5));
        assert_eq!(book.take_lease(account), Nanos(5));
        assert!(book.wallets_with_credit().is_empty());
    }

    proptest! {
        #[test]
        fn invariants_hold_after_every_step(ops in proptest::collection::vec(op(), 1..120)) {
            let accounts = [AccountId::new(), AccountId::new(), AccountId::new()];
            let keys = [KeyId::new(), KeyId::new(), KeyId::new(), KeyId::new()];
            let mut book = Book::new();
            let mut now = t0();
            for account in accounts {
                book.load_wallet(account, Wallet::default());
            }
            for key in keys {
                book.load_key_spend(key, now, Nanos::ZERO);
            }
            let mut transfers: Vec<Transfer> = Vec::new();
            let mut opened: Vec<HoldId> = Vec::new();
            let mut first_outcome: HashMap<HoldId, Hold> = HashMap::new();
            for op in ops {
                let mut resolve = |book: &mut Book, id: HoldId, how: Resolve, now| {
                    let r = book.resolve(id, how, now).unwrap();
                    if r.first {
                        first_outcome.insert(id, r.hold.clone());
                    } else {
                        // A second resolution is a no-op returning the first outcome.
                        assert!(r.transfers.is_empty());
                        assert_eq!(Some(&r.hold), first_outcome.get(&id));
                    }
                    transfers.extend(r.transfers);
                };
                match op {
                    Op::Grant(a, n) => {
                        if let Ok(t) = book.credit(accounts[a], Nanos(n), LedgerAccount::External) {
                            transfers.extend(t);
                        }
                    }
                    Op::Take(a, n) => {
                        let to = LedgerAccount::Disputed(accounts[a]);
                        if let Ok(t) = book.take(accounts[a], Nanos(n), to, TransferKind::Dispute) {
                            transfers.extend(t);
                        }
                    }
                    Op::Open { account, key, amount, cap } => {
                        let before = book.wallet(accounts[account]).unwrap();
                        let request = HoldRequest {
                            id: HoldId::new(),
                            account: accounts[account],
                            key: Some(keys[key]),
                            amount: Nanos(amount),
                            key_cap: cap.map(Nanos),
                            at: now,
                            expires_at: now + TimeDelta::seconds(30),
                            reference: None,
                        };
                        match book.open(request) {
                            Ok((hold, transfer)) => {
                                opened.push(hold.id);
                                transfers.extend(transfer);
                                if let Some(cap) = cap {
                                    let spend = book.key_spend[&keys[key]];
                                    prop_assert!(spend.spent.0 + spend.held.0 <= cap);
                                }
                            }
                            Err(_) => prop_assert_eq!(book.wallet(accounts[account]).unwrap(), before),
                        }
                    }
                    Op::Settle(i, cost) => {
                        if let Some(&id) = opened.get(i) {
                            resolve(&mut book, id, Resolve::Settle(Nanos(cost)), now);
                        }
                    }
                    Op::Release(i) => {
                        if let Some(&id) = opened.get(i) {
                            resolve(&mut book, id, Resolve::Release, now);
                        }
                    }
                    Op::Advance(s) => now += TimeDelta::seconds(s),
                    Op::Sweep => {
                        for id in book.expired(now) {
                            resolve(&mut book, id, Resolve::Expire, now);
                        }
                    }
                }

                let balances = balances(&transfers);
                prop_assert_eq!(balances.values().sum::<i64>(), 0, "the ledger sums to zero");
                let mut revenue = 0;
                for account in accounts {
                    let wallet = book.wallet(account).unwrap();
                    prop_assert!(wallet.available.0 >= 0 && wallet.held.0 >= 0 && wallet.debt.0 >= 0);
                    let ledger = |a| balances.get(&a).copied().unwrap_or(0);
                    prop_assert_eq!(wallet.debt.0, -ledger(LedgerAccount::Debt(account)));
                    prop_assert_eq!(wallet.available.0, ledger(LedgerAccount::Wallet(account)));
                    prop_assert_eq!(wallet.held.0, ledger(LedgerAccount::Holds(account)));
                    let pending: i64 = opened.iter().filter_map(|id| book.hold(*id))
                        .filter(|h| h.account == account && h.status == HoldStatus::Pending)
                        .map(|h| h.amount.0).sum();
                    prop_assert_eq!(wallet.held.0, pending);
                    revenue += opened.iter().filter_map(|id| book.hold(*id))
                        .filter(|h| h.account == account).map(|h| h.charged.0).sum::<i64>();
                }
                prop_assert_eq!(revenue, balances.get(&LedgerAccount::Revenue).copied().unwrap_or(0));
            }
        }
    }
}
