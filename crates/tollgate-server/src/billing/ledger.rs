//! The ledger service: admission decides from memory, durability comes from a writer task that
//! group-commits.
//!
//! One [`Book`] (the core's ledger rules) behind a mutex is the authority for every wallet it
//! has loaded: a hold is reserved there, atomically, in a few hundred nanoseconds, and the
//! transfers it returns go on a queue. The writer drains the queue and commits everything that
//! has accumulated in one store transaction, so under load one fsync carries many requests.
//!
//! What a crash can lose, and why no customer is overcharged by it: only writes still queued.
//! A lost hold never charged anyone. A lost settle leaves its hold pending in the store, and
//! at the next start every data-plane hold of the dead process is expired (charged nothing).
//! So a crash can only ever lose the operator a charge, never add one. Grants, the billing
//! API and management reads wait for their writes to be committed ([`Ledger::flush`]).
//!
//! On the embedded store the book owns whole wallets: the store belongs to one node. On a
//! shared store each node's book owns only its *lease* on a wallet: credit carved atomically
//! from the wallet's free balance ([`LeaseStore::carve`]), which every batch the node commits
//! moves together with the balance. When its lease cannot cover a hold, the node gives back
//! what is left and carves again, an eighth of what is free or, as the wallet runs low, exactly
//! the hold; leases idle for [`LEASE_IDLE`] go back to the wallet. So the leases never sum to
//! more than the balance, and overspend is zero. Lease operations run in the writer, after every
//! write queued before them, and writes are queued under the book's lock: the store sees a
//! node's lease change in the order its book did. Billing-API holds are handed to the store
//! once opened, so any node can capture or release them.
//!
//! While the store does not answer (a commit failed, or the sweeper's ping did), no new hold is
//! opened: requests are refused with 503 before any work, so nothing is charged for them. Holds
//! already open finish as usual and their writes wait in the queue for the store to return.

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tollgate_core::ledger::{
    month_start, Book, Hold, HoldRequest, HoldStatus, LedgerAccount, Refusal, Resolution, Resolve,
    Transfer, TransferKind,
};
use tollgate_core::notify::Event;
use tollgate_core::NodeId;
use tollgate_core::{AccountId, Clock, HoldId, KeyId, Nanos, RequestId};
use tollgate_store::{
    BatchId, Carve, HoldRecord, HoldSource, LeaseStore, LedgerWrite, Store, StoreError, UsageRow,
};

/// The most writes committed in one transaction.
const MAX_BATCH: usize = 2048;
/// How long a batch that nobody waits for gathers more writes before it is committed: at a
/// steady rate below saturation, batches would otherwise carry a request or two each and every
/// request would pay a whole commit. A crash loses at most this much more of the node's last
/// writes, which (see above) can only lose the operator a charge.
const GATHER: Duration = Duration::from_millis(2);
/// A batch of this many writes is committed without gathering.
const GATHER_UNTIL: usize = 256;
/// How long a caller waits for its writes to be committed before answering 503.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A lease no hold has used for this long goes back to the wallet, for other nodes to use.
pub const LEASE_IDLE: Duration = Duration::from_secs(2);
/// How long a hold waits for other nodes to give back the credit their leases hold, while
/// nothing changes (a node that died keeps its leases until they expire); and at most.
const RECALL_STALL: Duration = Duration::from_secs(5);
const RECALL_MAX: Duration = Duration::from_secs(15);
/// Failed pings in a row after which the store counts as down.
const FAILED_PINGS_DOWN: u32 = 2;
/// How long a hold waits for its node's carve (the writer runs it after the writes before it).
const CARVE_WAIT: Duration = Duration::from_secs(10);

/// A hold's wait for credit other nodes lease: carves again after short, growing pauses, while
/// what they lease (with what is free) covers it. Under contention that balance keeps moving
/// (other holds spend it), and the hold waits on until it is served or the balance no longer
/// covers it; if the balance stands still for [`RECALL_STALL`], the credit is stuck.
struct Recall {
    started: Instant,
    balance: Nanos,
    since: Instant,
    pause: Duration,
}

impl Recall {
    fn new() -> Recall {
        Recall {
            started: Instant::now(),
            balance: Nanos::ZERO,
            since: Instant::now(),
            pause: Duration::from_millis(1),
        }
    }

    /// Notes what a carve saw of the account's balance.
    fn observe(&mut self, carve: Carve) {
        let balance = Nanos(carve.free.0.saturating_add(carve.leased.0));
        if balance != self.balance {
            self.balance = balance;
            self.since = Instant::now();
        }
    }

    /// Whether to carve again after `carve` granted nothing.
    fn waits_for(&self, carve: Carve, needed: Nanos) -> bool {
        carve.free.0.saturating_add(carve.leased.0) >= needed.0 && !self.stuck()
    }

    fn stuck(&self) -> bool {
        self.since.elapsed() >= RECALL_STALL || self.started.elapsed() >= RECALL_MAX
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(50));
    }
}

/// What [`Ledger::open`] does after the book's lock is released.
enum Next {
    /// The hold is open; the notice of its opening stored, when the caller must wait for it; and
    /// the record to keep in [`ApiRecords`] once it is stored.
    Opened(
        Hold,
        Option<oneshot::Receiver<bool>>,
        Option<Box<HoldRecord>>,
    ),
    Carve {
        give_back: Nanos,
        needed: Nanos,
    },
}

// Writes are nearly every message; boxing them would allocate once per write.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Committed in one batch together (a charge and its usage row); queued at that instant; and
    /// who to tell whether the store took them.
    Write(Vec<LedgerWrite>, Instant, Option<oneshot::Sender<bool>>),
    Flush(oneshot::Sender<()>),
    /// Run after everything queued before it is committed.
    Lease(LeaseOp),
}

enum LeaseOp {
    /// Gives `give_back` back, carves for a hold of `needed`, and adds the carve to the book.
    Carve {
        account: AccountId,
        give_back: Nanos,
        needed: Nanos,
        done: oneshot::Sender<Result<Carve, StoreError>>,
    },
    /// Gives `amount` (already taken out of the book) back to the wallet.
    Return { account: AccountId, amount: Nanos },
    /// The heartbeat that keeps the other nodes from reclaiming this node's leases.
    Renew,
}

/// A node's identity on a shared store, and the store's leases.
#[derive(Clone)]
struct Leasing {
    node: NodeId,
    leases: Arc<dyn LeaseStore>,
}

pub struct Ledger {
    book: Arc<Mutex<Book>>,
    /// Set while the store does not answer; cleared by the next commit or ping that succeeds.
    store_down: Arc<AtomicBool>,
    /// Pings that failed in a row.
    failed_pings: std::sync::atomic::AtomicU32,
    /// Set for good once the writer task has stopped.
    writer_stopped: Arc<AtomicBool>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    queue: mpsc::UnboundedSender<Command>,
    /// Grants take turns, so a grant's reference check and its write are not split.
    grants: tokio::sync::Mutex<()>,
    /// On a shared store: whose leases this book spends, and when each account last opened a
    /// hold here (for [`Ledger::return_idle_leases`]).
    leasing: Option<Leasing>,
    last_hold: Mutex<HashMap<AccountId, Instant>>,
    fees_paid: Mutex<HashMap<AccountId, (i64, String)>>,
    api_records: Arc<SharedApiRecords>,
    /// Writes per committed batch, and how long the oldest write of a batch waited (for
    /// `/metrics`).
    pub batch_size: Histogram,
    pub write_lag: Histogram,
    /// Calls whose usage cost more than their hold, and by how much in all (nanos): what the
    /// house lost to undersized holds.
    pub over_hold_calls: Counter,
    pub uncovered_nanos: Counter,
}

/// Why a hold could not be opened.
#[derive(Debug)]
pub enum HoldRefused {
    InsufficientBalance {
        required: Nanos,
        available: Nanos,
    },
    KeyCapReached {
        cap: Nanos,
        spent: Nanos,
        held: Nanos,
    },
    /// The account owes this much (a refund or dispute took back spent credit).
    InDebt {
        debt: Nanos,
    },
    /// The balance covers the hold, but other nodes lease the credit and did not give it back
    /// in time (one may have died; its leases are freed once they expire).
    CreditElsewhere {
        required: Nanos,
        balance: Nanos,
    },
    /// The store did not confirm the opening in time, so the hold was released (the release is
    /// queued behind the opening): nothing stays reserved.
    Unconfirmed,
    Store(StoreError),
}

/// Why a billing-API hold's resolution was not confirmed.
#[derive(Debug)]
pub enum ResolveFailed {
    /// Decided in the book and queued, but the store did not confirm it in time: it is applied
    /// when the store answers, and a retry answers its outcome.
    Queued,
    /// Nothing was resolved.
    Store(StoreError),
}

impl From<StoreError> for ResolveFailed {
    fn from(e: StoreError) -> Self {
        ResolveFailed::Store(e)
    }
}

impl From<StoreError> for HoldRefused {
    fn from(e: StoreError) -> Self {
        HoldRefused::Store(e)
    }
}

impl From<Refusal> for HoldRefused {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::InsufficientBalance {
                required,
                available,
            } => HoldRefused::InsufficientBalance {
                required,
                available,
            },
            Refusal::KeyCapReached { cap, spent, held } => {
                HoldRefused::KeyCapReached { cap, spent, held }
            }
            Refusal::InDebt { debt } => HoldRefused::InDebt { debt },
            Refusal::NotLoaded | Refusal::Overflow | Refusal::InvalidAmount(_) => {
                HoldRefused::Store(StoreError::Corrupt(refusal.to_string()))
            }
        }
    }
}

/// How a movement is filed: its memo and reference, whether once per reference, and the
/// event it announces.
struct Entry<'a> {
    memo: &'a str,
    reference: &'a str,
    once: bool,
    event: Option<Event>,
}

/// A movement of money from outside any hold, made by [`Ledger::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movement {
    /// Into the wallet from `from` (the outside, or a dispute won back), paying debt first.
    Credit { from: LedgerAccount },
    /// Out of the wallet to `to`, as `kind`; what the wallet no longer has becomes debt.
    Take {
        to: LedgerAccount,
        kind: TransferKind,
    },
    /// Out of the wallet to `to`, as `kind`, only if the wallet has it all.
    Pay {
        to: LedgerAccount,
        kind: TransferKind,
    },
    /// From `from` to the outside, the wallet untouched (a dispute lost: the credit it set
    /// aside is gone).
    Close { from: LedgerAccount },
}

impl Movement {
    fn make(
        self,
        book: &mut Book,
        account: AccountId,
        amount: Nanos,
    ) -> Result<Vec<Transfer>, Refusal> {
        match self {
            Movement::Credit { from } => book.credit(account, amount, from),
            Movement::Take { to, kind } => book.take(account, amount, to, kind),
            Movement::Pay { to, kind } => book.pay(account, amount, to, kind),
            Movement::Close { from } => {
                if amount < Nanos::ZERO {
                    return Err(Refusal::InvalidAmount(amount));
                }
                Ok((amount > Nanos::ZERO)
                    .then_some(Transfer {
                        debit: from,
                        credit: LedgerAccount::External,
                        amount,
                        kind: TransferKind::Chargeback,
                    })
                    .into_iter()
                    .collect())
            }
        }
    }
}

/// What became of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    Applied,
    /// A grant under the same reference was committed before; nothing changed.
    AlreadyApplied,
}

/// Why a grant was not (or not yet) applied.
#[derive(Debug)]
pub enum GrantRefused {
    /// The balance would pass the limit ([`tollgate_core::money::MAX_AMOUNT`]).
    OverLimit,
    /// Queued but not confirmed in time: it is applied when the store answers.
    Unconfirmed,
    Store(StoreError),
}

impl From<StoreError> for GrantRefused {
    fn from(e: StoreError) -> Self {
        GrantRefused::Store(e)
    }
}

/// Why a movement was not made: refused by the book (with what other nodes lease of the
/// account, on a shared store), or by the store.
enum MoveRefused {
    Book(Refusal, Nanos),
    Grant(GrantRefused),
}

impl<E: Into<GrantRefused>> From<E> for MoveRefused {
    fn from(e: E) -> Self {
        MoveRefused::Grant(e.into())
    }
}

/// Why a plan's fee was not paid.
#[derive(Debug)]
pub enum FeeRefused {
    /// The wallet's free credit falls short; on a shared store, `leased` more sits in nodes'
    /// leases, on its way back.
    Short {
        required: Nanos,
        available: Nanos,
        leased: Nanos,
    },
    Grant(GrantRefused),
}

impl From<GrantRefused> for FeeRefused {
    fn from(e: GrantRefused) -> Self {
        FeeRefused::Grant(e)
    }
}

/// What a new hold is for.
pub struct HoldSpec {
    pub account: AccountId,
    pub key: Option<KeyId>,
    pub key_cap: Option<Nanos>,
    /// What the account owes, as its key's lookup read it: on a shared store, where this
    /// node's book knows only its lease, how a node learns that a debt stops holds.
    pub account_debt: Nanos,
    pub amount: Nanos,
    pub ttl: Duration,
    pub source: HoldSource,
    pub request_id: Option<RequestId>,
    pub metadata: serde_json::Value,
}

impl Ledger {
    /// Registers the counters this keeps, for `/metrics`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "ledger_batch_size",
            "Ledger writes committed per transaction",
            self.batch_size.clone(),
        );
        registry.register(
            "ledger_write_lag_seconds",
            "Time from a ledger write being queued to its commit",
            self.write_lag.clone(),
        );
        registry.register(
            "over_hold_calls",
            "Calls whose usage cost more than their hold (the charge is capped at the hold)",
            self.over_hold_calls.clone(),
        );
        registry.register(
            "uncovered_nanos",
            "What calls' usage cost beyond their holds, in nano-units: not charged",
            self.uncovered_nanos.clone(),
        );
    }

    /// Starts the writer task and returns the service. On a shared store (one with leases) the
    /// node gets a fresh id, whose leases it spends.
    pub fn start(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Arc<Ledger> {
        Ledger::start_gathering(store, clock, GATHER)
    }

    /// [`Ledger::start`] with another window for small batches to gather in (zero: none).
    pub fn start_gathering(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        gather: Duration,
    ) -> Arc<Ledger> {
        let leasing = store.leases().map(|leases| Leasing {
            node: NodeId::new(),
            leases,
        });
        let (queue, commands) = mpsc::unbounded_channel();
        let book = Arc::new(Mutex::new(Book::new()));
        let api_records = Arc::new(SharedApiRecords::default());
        let store_down = Arc::new(AtomicBool::new(false));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let write_lag = crate::telemetry::latency();
        let writer = Writer {
            store: store.clone(),
            book: book.clone(),
            api_records: api_records.clone(),
            store_down: store_down.clone(),
            batch_size: batch_size.clone(),
            write_lag: write_lag.clone(),
            leasing: leasing.clone(),
            clock: clock.clone(),
        };
        // If the writer ever stops (a panic), nothing more would be stored: the node stops opening
        // holds (503) and says it is not ready, rather than admit calls it cannot record.
        let writer_stopped = Arc::new(AtomicBool::new(false));
        let running = tokio::spawn(write_loop(commands, writer, gather));
        let stopped = writer_stopped.clone();
        tokio::spawn(async move {
            let ended = running.await;
            stopped.store(true, Ordering::Release);
            match ended {
                Err(e) if e.is_panic() => {
                    tracing::error!("the ledger writer panicked; refusing paid calls until restart")
                }
                _ => tracing::warn!("the ledger writer stopped"),
            }
        });
        Arc::new(Ledger {
            book,
            store_down,
            failed_pings: Default::default(),
            writer_stopped,
            store,
            clock,
            queue,
            grants: tokio::sync::Mutex::new(()),
            leasing,
            last_hold: Mutex::new(HashMap::new()),
            fees_paid: Mutex::new(HashMap::new()),
            api_records,
            batch_size,
            write_lag,
            over_hold_calls: Counter::default(),
            uncovered_nanos: Counter::default(),
        })
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock cannot leave the book half-changed: every Book
        // method checks before it mutates. So a poisoned lock is still a consistent book.
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a write. Callers hold the book's lock while they queue what the book just did,
    /// so the writer commits it in the book's order. The writer lives as long as the runtime; if
    /// it is gone, the process is stopping and the write is lost as a crash would lose it (see
    /// the module docs).
    fn enqueue(&self, _book: &Book, writes: Vec<LedgerWrite>) {
        let _ = self
            .queue
            .send(Command::Write(writes, Instant::now(), None));
    }

    /// [`Ledger::enqueue`], and tells `stored` whether the store took the writes (or refused them,
    /// and they were undone in the book).
    fn enqueue_noticed(
        &self,
        _book: &Book,
        writes: Vec<LedgerWrite>,
        stored: oneshot::Sender<bool>,
    ) {
        let _ = self
            .queue
            .send(Command::Write(writes, Instant::now(), Some(stored)));
    }

    /// Makes sure the book holds the account's wallet and the key's spend this month.
    async fn load(&self, account: AccountId, key: Option<KeyId>) -> Result<(), StoreError> {
        // The common case, everything loaded, costs one lock.
        let (wallet_loaded, key_loaded) = {
            let book = self.book();
            (
                book.wallet(account).is_some(),
                key.is_none_or(|k| book.key_spend_loaded(k)),
            )
        };
        if wallet_loaded && key_loaded {
            return Ok(());
        }
        if !wallet_loaded && self.leasing.is_some() {
            // The node's lease starts empty; the first hold carves it.
            self.book().load_wallet(account, Default::default());
        } else if !wallet_loaded {
            let wallet =
                self.store.wallet(account).await?.ok_or_else(|| {
                    StoreError::Corrupt(format!("account {account} has no wallet"))
                })?;
            self.book().load_wallet(account, wallet);
        }
        if let Some(key) = key {
            if !self.book().key_spend_loaded(key) {
                let now = self.clock.now();
                let spent = self.store.key_spent_since(key, month_start(now)).await?;
                self.book().load_key_spend(key, now, spent);
            }
        }
        Ok(())
    }

    /// Reserves credit, or refuses with the reason. The decision is made from memory in one
    /// step; the hold is persisted by the writer.
    pub async fn open(&self, spec: HoldSpec) -> Result<Hold, HoldRefused> {
        if self.writer_stopped.load(Ordering::Acquire) {
            return Err(HoldRefused::Store(StoreError::Unavailable(
                "the ledger writer has stopped; no new hold until the node restarts".into(),
            )));
        }
        if self.store_down.load(Ordering::Acquire) {
            return Err(HoldRefused::Store(StoreError::Unavailable(
                "the store does not answer; no new hold until it does".into(),
            )));
        }
        if spec.account_debt > Nanos::ZERO {
            return Err(HoldRefused::InDebt {
                debt: spec.account_debt,
            });
        }
        self.load(spec.account, spec.key).await?;
        let now = self.clock.now();
        let ttl = chrono::Duration::from_std(spec.ttl).unwrap_or(chrono::Duration::MAX);
        let request = HoldRequest {
            id: HoldId::new(),
            account: spec.account,
            key: spec.key,
            amount: spec.amount,
            key_cap: spec.key_cap,
            at: now,
            expires_at: now
                .checked_add_signed(ttl)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            reference: spec
                .request_id
                .filter(|_| spec.source == HoldSource::Request),
        };
        // Another request of this node may spend what a carve brought before this one's retry
        // does; then this one carves again. Every carve that grants credit lets some request
        // through, so the loop ends: at the latest when the wallet has no credit free. Even then
        // the book is tried once more: another request's carve may have brought credit meanwhile.
        // While the other nodes' leases hold what the hold needs, the store has asked them to
        // give it back: the request waits for that (see [`Recall`]), carving again as it comes.
        let mut last_carve: Option<Carve> = None;
        let mut recall = Recall::new();
        // Taken by the one iteration that opens the hold.
        let mut metadata = Some(spec.metadata);
        loop {
            // Decided under the book's lock; awaited after it is released.
            let next = {
                let mut book = self.book();
                match book.open(request) {
                    Ok((hold, transfer)) => {
                        let record = HoldRecord {
                            hold: hold.clone(),
                            source: spec.source,
                            request_id: spec.request_id,
                            metadata: metadata.take().unwrap_or_default(),
                        };
                        // This book resolves a billing-API hold only on a store of its own.
                        let keep = (spec.source == HoldSource::Api && self.leasing.is_none())
                            .then(|| Box::new(record.clone()));
                        let write = LedgerWrite::OpenHold {
                            record,
                            transfer,
                            key_cap: spec.key_cap,
                        };
                        // A billing-API hold is answered only once it is stored, and on a
                        // shared store a capped key's spend is the store's to decide: both wait
                        // until the opening is stored (or refused).
                        let capped_elsewhere = self.leasing.is_some() && spec.key_cap.is_some();
                        if spec.source == HoldSource::Api || capped_elsewhere {
                            let (done, stored) = oneshot::channel();
                            self.enqueue_noticed(&book, vec![write], done);
                            Next::Opened(hold, Some(stored), keep)
                        } else {
                            self.enqueue(&book, vec![write]);
                            Next::Opened(hold, None, keep)
                        }
                    }
                    Err(Refusal::InsufficientBalance { required, .. })
                        if self.leasing.is_some()
                            && last_carve.is_none_or(|c| {
                                c.granted > Nanos::ZERO || recall.waits_for(c, required)
                            }) =>
                    {
                        // Give back what is left of the lease, so the carve can count it, and
                        // carve enough for this hold.
                        Next::Carve {
                            give_back: book.take_lease(spec.account),
                            needed: required,
                        }
                    }
                    Err(Refusal::InsufficientBalance { required, .. }) if last_carve.is_some() => {
                        let balance =
                            last_carve.map_or(Nanos::ZERO, |c| Nanos(c.free.0 + c.leased.0));
                        return Err(if balance >= required {
                            HoldRefused::CreditElsewhere { required, balance }
                        } else {
                            HoldRefused::InsufficientBalance {
                                required,
                                available: balance,
                            }
                        });
                    }
                    Err(refusal) => return Err(refusal.into()),
                }
            };
            match next {
                Next::Opened(hold, stored, keep) => {
                    if self.leasing.is_some() {
                        self.last_hold().insert(spec.account, Instant::now());
                    }
                    if let Some(stored) = stored {
                        match tokio::time::timeout(FLUSH_TIMEOUT, stored).await {
                            Ok(Ok(true)) => {}
                            // Refused, and undone in the book.
                            Ok(_) => return Err(self.refused_by_store(&hold, spec.key_cap).await),
                            Err(_) => {
                                // Not stored in time: the caller hears 503, so nothing may stay
                                // reserved; the release is queued behind the opening.
                                self.undo_open(&hold);
                                return Err(HoldRefused::Unconfirmed);
                            }
                        }
                    }
                    if let Some(record) = keep {
                        // Under the book's lock, as the writer forgets holds: a hold resolved
                        // and forgotten meanwhile is not kept (it would never be let go).
                        let book = self.book();
                        if book.hold(hold.id).is_some() {
                            self.api_records.lock().keep(*record);
                        }
                    }
                    if self.leasing.is_some() && spec.source == HoldSource::Api {
                        // Any node may capture it: the store resolves it, not this book.
                        self.book().detach(hold.id);
                    }
                    return Ok(hold);
                }
                Next::Carve { give_back, needed } => {
                    if last_carve.is_some_and(|c| c.granted == Nanos::ZERO) {
                        recall.pause().await;
                    }
                    let (done, carved) = oneshot::channel();
                    let _ = self.queue.send(Command::Lease(LeaseOp::Carve {
                        account: spec.account,
                        give_back,
                        needed,
                        done,
                    }));
                    let carve = match tokio::time::timeout(CARVE_WAIT, carved).await {
                        Ok(Ok(carve)) => carve?,
                        Ok(Err(_)) => {
                            return Err(StoreError::Unavailable(
                                "the ledger writer has stopped".into(),
                            )
                            .into())
                        }
                        // The carve still runs, and its outcome still reaches the book.
                        Err(_) => {
                            return Err(StoreError::Unavailable(format!(
                                "no carve of this account's credit within {CARVE_WAIT:?}"
                            ))
                            .into())
                        }
                    };
                    recall.observe(carve);
                    last_carve = Some(carve);
                }
            }
        }
    }

    /// Why the store refused to open a hold. For a capped key on a shared store: the key's month,
    /// as the store has it, if that is over the cap with this hold; otherwise the account's
    /// credit was not there (the node's lease was reclaimed and the free balance could not cover
    /// it). Anything else the store should not have refused.
    async fn refused_by_store(&self, hold: &Hold, key_cap: Option<Nanos>) -> HoldRefused {
        let (Some(leasing), Some(key), Some(cap)) = (&self.leasing, hold.key, key_cap) else {
            return HoldRefused::Store(StoreError::Corrupt(format!(
                "the store refused hold {}; nothing is reserved",
                hold.id
            )));
        };
        let (spent, held) = match leasing.leases.key_spend(key, self.clock.now()).await {
            Ok(spend) => spend,
            Err(e) => return HoldRefused::Store(e),
        };
        if spent.0.saturating_add(held.0).saturating_add(hold.amount.0) > cap.0 {
            return HoldRefused::KeyCapReached { cap, spent, held };
        }
        match self.store.wallet(hold.account).await {
            Ok(wallet) => HoldRefused::InsufficientBalance {
                required: hold.amount,
                available: wallet.map_or(Nanos::ZERO, |w| w.available),
            },
            Err(e) => HoldRefused::Store(e),
        }
    }

    /// The fee each account was last seen to have paid (its period's start and plan), so a
    /// period's calls after the first ask the store nothing.
    fn fees_paid(&self) -> MutexGuard<'_, HashMap<AccountId, (i64, String)>> {
        self.fees_paid
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn last_hold(&self) -> MutexGuard<'_, HashMap<AccountId, Instant>> {
        self.last_hold
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Resolves a hold the book knows (every pending one); `None` for a hold it does not know.
    /// Resolving twice returns the first outcome and writes nothing.
    pub fn resolve(&self, id: HoldId, how: Resolve) -> Option<Resolution> {
        let mut book = self.book();
        let resolution = book.resolve(id, how, self.clock.now())?;
        if resolution.first {
            self.enqueue(&book, vec![resolve_write(&resolution)]);
        }
        Some(resolution)
    }

    /// Ends a data-plane request: resolves its hold (if any) and records its usage row (unless
    /// the usage log is off), built from the resolution. Both are committed in the same
    /// transaction, so the store never holds a charge without its row.
    pub fn finish_request(
        &self,
        hold: Option<(HoldId, Resolve)>,
        row: impl FnOnce(Option<&Resolution>) -> Option<UsageRow>,
    ) {
        let Some((id, how)) = hold else {
            // A free call: the book has nothing to resolve, so its lock is not taken. Its row
            // moves no balance, so it needs no place in the book's order.
            if let Some(row) = row(None) {
                let writes = vec![LedgerWrite::Usage(Box::new(row))];
                let _ = self
                    .queue
                    .send(Command::Write(writes, Instant::now(), None));
            }
            return;
        };
        let mut book = self.book();
        let resolution = book.resolve(id, how, self.clock.now());
        let mut writes = Vec::with_capacity(2);
        if let Some(resolution) = resolution.as_ref().filter(|r| r.first) {
            writes.push(resolve_write(resolution));
        }
        if let Some(row) = row(resolution.as_ref()) {
            writes.push(LedgerWrite::Usage(Box::new(row)));
        }
        if !writes.is_empty() {
            self.enqueue(&book, writes);
        }
    }

    /// Resolves a billing-API hold and waits until the resolution is stored; returns the hold as
    /// resolved, by this call or by the first one. `record` is the hold as the store had it.
    /// Nothing is read back: the book's resolution, or the scratch one committed straight to the
    /// store, is what the store now holds.
    pub async fn resolve_durably(
        &self,
        record: &HoldRecord,
        how: Resolve,
    ) -> Result<Hold, ResolveFailed> {
        let id = record.hold.id;
        let in_book = {
            let mut book = self.book();
            book.resolve(id, how, self.clock.now()).map(|resolution| {
                let stored = resolution.first.then(|| {
                    let (done, stored) = oneshot::channel();
                    self.enqueue_noticed(&book, vec![resolve_write(&resolution)], done);
                    stored
                });
                (resolution.hold, stored)
            })
        };
        match in_book {
            Some((hold, Some(stored))) => match tokio::time::timeout(FLUSH_TIMEOUT, stored).await {
                Ok(Ok(true)) => Ok(hold),
                Ok(_) => Err(ResolveFailed::Store(StoreError::Corrupt(format!(
                    "the store refused the resolution of hold {id}"
                )))),
                Err(_) => Err(ResolveFailed::Queued),
            },
            // Resolved before in this book, and that resolution may still be queued.
            Some((hold, None)) => match self.flush().await {
                Ok(()) => Ok(hold),
                Err(_) => Err(ResolveFailed::Queued),
            },
            // Not in this book: resolved and stored before, or handed to a shared store.
            None if record.hold.status != HoldStatus::Pending => Ok(record.hold.clone()),
            None if self.leasing.is_some() => self.resolve_detached(record, how).await,
            None => match self.resolve_in_store(record, how).await? {
                Some(hold) => Ok(hold),
                None => self.first_outcome(id).await,
            },
        }
    }

    /// After the store refused a resolution of hold `id`: the outcome another node stored
    /// first, which stands. A hold still pending was refused for something else: corrupt.
    async fn first_outcome(&self, id: HoldId) -> Result<Hold, ResolveFailed> {
        match self.store.hold(id).await? {
            Some(first) if first.hold.status != HoldStatus::Pending => Ok(first.hold),
            _ => Err(ResolveFailed::Store(StoreError::Corrupt(format!(
                "the store refused the resolution of hold {id}"
            )))),
        }
    }

    /// Resolves `hold` in a scratch book: for a hold no book here has.
    fn resolve_outside(&self, hold: &Hold, how: Resolve) -> Option<Resolution> {
        let mut scratch = Book::new();
        scratch.restore(hold.clone());
        scratch.resolve(hold.id, how, self.clock.now())
    }

    /// Resolves a pending billing-API hold handed to the shared store, through this node's
    /// writer, so one transaction carries a batch of resolutions and takes the wallet's lock
    /// once. What it does not charge goes to the wallet's free balance. If another node resolved
    /// the hold first, the store refuses this one and the first outcome is returned.
    async fn resolve_detached(
        &self,
        record: &HoldRecord,
        how: Resolve,
    ) -> Result<Hold, ResolveFailed> {
        let Some(resolution) = self.resolve_outside(&record.hold, how) else {
            return Ok(record.hold.clone());
        };
        let hold = resolution.hold.clone();
        let (done, stored) = oneshot::channel();
        self.enqueue_noticed(&self.book(), vec![detached_write(resolution)], done);
        match tokio::time::timeout(FLUSH_TIMEOUT, stored).await {
            Ok(Ok(true)) => Ok(hold),
            Ok(Ok(false)) => self.first_outcome(record.hold.id).await,
            Ok(Err(_)) => Err(ResolveFailed::Store(StoreError::Unavailable(
                "the ledger writer has stopped".into(),
            ))),
            Err(_) => Err(ResolveFailed::Queued),
        }
    }

    /// A hold as this node's book has it: pending, or resolved here and not yet stored.
    pub fn held(&self, id: HoldId) -> Option<Hold> {
        self.book().hold(id).cloned()
    }

    /// A billing-API hold this node opened and its book still has, with its state in the book:
    /// read without asking the store. `None` sends the caller to the store (with [`Ledger::held`]
    /// laid over what it finds).
    pub fn api_hold(&self, id: HoldId) -> Option<HoldRecord> {
        let record = self.api_records.lock().get(id)?;
        // Looked up after the record: a hold the book has forgotten is stored as it ended.
        let hold = self.book().hold(id).cloned()?;
        Some(HoldRecord {
            hold,
            ..(*record).clone()
        })
    }

    /// Whether the store is shared with other nodes, each book holding only its lease of a
    /// wallet (rather than the whole wallet, and its debt).
    pub fn shared(&self) -> bool {
        self.leasing.is_some()
    }

    /// Resolves a pending hold no book here knows, straight in the store, and returns it
    /// resolved. What it does not charge goes to the wallet's free balance. If another node
    /// resolves it first, the store refuses this one ([`StoreError::Corrupt`]: a hold resolves
    /// once), the first stands, and this answers `None`.
    async fn resolve_in_store(
        &self,
        record: &HoldRecord,
        how: Resolve,
    ) -> Result<Option<Hold>, StoreError> {
        let Some(resolution) = self.resolve_outside(&record.hold, how) else {
            return Ok(None);
        };
        let hold = resolution.hold.clone();
        match self
            .store
            .commit(BatchId::new(), &[detached_write(resolution)])
            .await
        {
            Ok(()) => Ok(Some(hold)),
            Err(StoreError::Corrupt(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Credits an account from outside and waits until it is stored. With `once`, the grant is
    /// filed under `reference` and applied at most once per account: a grant already committed
    /// under it answers [`Granted::AlreadyApplied`] and changes nothing. What the account owes
    /// is paid from it first.
    ///
    /// If the store does not confirm in time, the grant stays queued and is applied when the
    /// store answers ([`GrantRefused::Unconfirmed`]): the caller must say so, never "nothing
    /// changed".
    pub async fn grant(
        &self,
        account: AccountId,
        amount: Nanos,
        memo: &str,
        reference: &str,
        once: bool,
    ) -> Result<Granted, GrantRefused> {
        let movement = Movement::Credit {
            from: LedgerAccount::External,
        };
        self.apply(account, amount, movement, memo, reference, once)
            .await
    }

    /// Moves money between an account and the outside, not through a hold (a grant, a card
    /// payment, its refund or dispute), and waits until it is stored. With `once`, applied at most
    /// once per account and reference. Such movements take turns on a node, so the check and the
    /// write are not split; across nodes the store refuses a second `payment:` movement under one
    /// reference.
    pub async fn apply(
        &self,
        account: AccountId,
        amount: Nanos,
        movement: Movement,
        memo: &str,
        reference: &str,
        once: bool,
    ) -> Result<Granted, GrantRefused> {
        self.enter(
            account,
            amount,
            movement,
            Entry {
                memo,
                reference,
                once,
                event: None,
            },
        )
        .await
    }

    /// [`Ledger::apply`] once per reference, with an event for the account's webhooks written
    /// in the movement's transaction: stored if and only if the movement is.
    pub async fn apply_announced(
        &self,
        account: AccountId,
        amount: Nanos,
        movement: Movement,
        memo: &str,
        reference: &str,
        event: Event,
    ) -> Result<Granted, GrantRefused> {
        let entry = Entry {
            memo,
            reference,
            once: true,
            event: Some(event),
        };
        self.enter(account, amount, movement, entry).await
    }

    async fn enter(
        &self,
        account: AccountId,
        amount: Nanos,
        movement: Movement,
        entry: Entry<'_>,
    ) -> Result<Granted, GrantRefused> {
        let Entry {
            memo,
            reference,
            once,
            event,
        } = entry;
        let _turn = self.grants.lock().await;
        if once {
            self.flush().await?;
            if self.store.filed(account, reference).await? {
                return Ok(Granted::AlreadyApplied);
            }
        }
        self.make_movement(account, amount, movement, memo, reference, event)
            .await
            .map_err(|refused| match refused {
                MoveRefused::Book(Refusal::Overflow | Refusal::InvalidAmount(_), _) => {
                    GrantRefused::OverLimit
                }
                MoveRefused::Book(other, _) => {
                    GrantRefused::Store(StoreError::Corrupt(other.to_string()))
                }
                MoveRefused::Grant(refused) => refused,
            })
    }

    /// Pays a plan's fee for a period from the wallet's credit (never making debt), and waits
    /// until it is stored. Each plan's fee is filed under `plan:<period>:<plan>` and paid once
    /// per period; a period costs at most its priciest plan, since what the period's other fees
    /// paid counts toward this one (an upgrade pays the difference, a downgrade nothing).
    pub async fn pay_fee(
        &self,
        account: AccountId,
        price: Nanos,
        period: DateTime<Utc>,
        plan: &str,
    ) -> Result<Nanos, FeeRefused> {
        // The period's calls after the first: nothing to ask, nothing to allocate.
        let start = period.timestamp();
        let seen = |(at, paid): &(i64, String)| *at == start && paid == plan;
        if self.fees_paid().get(&account).is_some_and(seen) {
            return Ok(Nanos::ZERO);
        }
        let prefix = format!("plan:{start}:");
        let reference = format!("{prefix}{plan}");
        // Only this writes `plan:` references, and it waits until they are stored: no flush.
        let _turn = self.grants.lock().await;
        // The period's first calls queue here together: the first pays, the rest need not ask.
        if self.fees_paid().get(&account).is_some_and(seen) {
            return Ok(Nanos::ZERO);
        }
        let paid = self.pay_fee_turn(account, price, period, plan, &prefix, &reference);
        let paid = paid.await?;
        self.fees_paid().insert(account, (start, plan.to_string()));
        Ok(paid)
    }

    async fn pay_fee_turn(
        &self,
        account: AccountId,
        price: Nanos,
        period: DateTime<Utc>,
        plan: &str,
        prefix: &str,
        reference: &str,
    ) -> Result<Nanos, FeeRefused> {
        if self
            .store
            .filed(account, reference)
            .await
            .map_err(GrantRefused::from)?
        {
            return Ok(Nanos::ZERO);
        }
        let paid = self
            .store
            .filed_total(account, prefix)
            .await
            .map_err(GrantRefused::from)?;
        let due = Nanos((price.0 - paid.0).max(0));
        if due == Nanos::ZERO {
            return Ok(Nanos::ZERO);
        }
        let memo = format!(
            "the '{plan}' plan's fee for the period from {}",
            period.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        );
        self.pay_turn(account, due, reference, &memo).await
    }

    /// Pays `amount` from the wallet's credit (never making debt) as a `fee` transfer filed under
    /// `reference` (a `pack:` purchase), once: `Ok(false)` when it was paid before.
    pub async fn pay_once(
        &self,
        account: AccountId,
        amount: Nanos,
        reference: &str,
        memo: &str,
    ) -> Result<bool, FeeRefused> {
        let _turn = self.grants.lock().await;
        if self
            .store
            .filed(account, reference)
            .await
            .map_err(GrantRefused::from)?
        {
            return Ok(false);
        }
        let paid = self.pay_turn(account, amount, reference, memo).await?;
        Ok(paid > Nanos::ZERO)
    }

    /// Pays `due` from the wallet as a `fee` under `reference`; the caller holds the turn and
    /// found nothing filed under it. `Ok(0)`: another node filed it first.
    async fn pay_turn(
        &self,
        account: AccountId,
        due: Nanos,
        reference: &str,
        memo: &str,
    ) -> Result<Nanos, FeeRefused> {
        let movement = Movement::Pay {
            to: LedgerAccount::Revenue,
            kind: TransferKind::Fee,
        };
        match self
            .make_movement(account, due, movement, memo, reference, None)
            .await
        {
            Ok(_) => Ok(due),
            Err(MoveRefused::Book(
                Refusal::InsufficientBalance {
                    required,
                    available,
                },
                leased,
            )) => Err(FeeRefused::Short {
                required,
                available,
                leased,
            }),
            Err(MoveRefused::Book(other, _)) => Err(FeeRefused::Grant(GrantRefused::Store(
                StoreError::Corrupt(other.to_string()),
            ))),
            // Another node paid it under the same reference first: the store kept one.
            Err(MoveRefused::Grant(refused)) => match self.store.filed(account, reference).await {
                Ok(true) => Ok(Nanos::ZERO),
                Ok(false) => Err(FeeRefused::Grant(refused)),
                Err(e) => Err(FeeRefused::Grant(e.into())),
            },
        }
    }

    /// Makes a movement on the free balance and waits until it is stored; the caller holds the
    /// turn (`grants`).
    async fn make_movement(
        &self,
        account: AccountId,
        amount: Nanos,
        movement: Movement,
        memo: &str,
        reference: &str,
        event: Option<Event>,
    ) -> Result<Granted, MoveRefused> {
        // On a shared store these move the free balance, for any node to carve, not this
        // node's lease: the book is left as it is, and the movement is worked out on the stored
        // wallet, less what nodes lease (the store refuses the batch if a carve took it meanwhile).
        let shared_transfers = match &self.leasing {
            Some(leasing) => {
                let mut wallet = self.store.wallet(account).await?.ok_or_else(|| {
                    StoreError::Corrupt(format!("account {account} has no wallet"))
                })?;
                let leased: i64 = leasing
                    .leases
                    .leases_of(account)
                    .await?
                    .iter()
                    .map(|(_, n)| n.0)
                    .sum();
                let free = (wallet.available.0 - leased).max(0);
                wallet.available = Nanos(free);
                let mut scratch = Book::new();
                scratch.load_wallet(account, wallet);
                Some(
                    movement
                        .make(&mut scratch, account, amount)
                        .map_err(|e| MoveRefused::Book(e, Nanos(leased)))?,
                )
            }
            None => {
                self.load(account, None).await?;
                None
            }
        };
        {
            let mut book = self.book();
            let transfers = match shared_transfers {
                Some(transfers) => transfers,
                None => movement
                    .make(&mut book, account, amount)
                    .map_err(|e| MoveRefused::Book(e, Nanos::ZERO))?,
            };
            let at = self.clock.now();
            let mut writes: Vec<LedgerWrite> = transfers
                .into_iter()
                .map(|transfer| LedgerWrite::Transfer {
                    account,
                    transfer,
                    memo: memo.to_string(),
                    reference: reference.to_string(),
                    at,
                })
                .collect();
            if !writes.is_empty() {
                writes.extend(event.map(|event| LedgerWrite::Event(Box::new(event))));
                self.enqueue(&book, writes);
            }
        }
        self.flush().await.map_err(|_| GrantRefused::Unconfirmed)?;
        // Handled is not stored: a movement the store refused was undone in the book.
        if amount > Nanos::ZERO && !self.store.filed(account, reference).await? {
            return Err(MoveRefused::Grant(GrantRefused::Store(
                StoreError::Corrupt(format!(
                    "the store refused the transfer filed under '{reference}'; it was not applied"
                )),
            )));
        }
        Ok(Granted::Applied)
    }

    /// Takes back a hold just opened whose caller is told it failed (the store did not confirm
    /// it): released in the book, or, for a hold already handed to the store, by a release queued
    /// behind its opening. Either way the store ends with nothing reserved.
    pub fn undo_open(&self, hold: &Hold) {
        if self.resolve(hold.id, Resolve::Release).is_some() {
            return;
        }
        if let Some(resolution) = self.resolve_outside(hold, Resolve::Release) {
            let book = self.book();
            self.enqueue(&book, vec![detached_write(resolution)]);
        }
    }

    /// Waits until every write queued before this call is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        let _ = self.queue.send(Command::Flush(done));
        match tokio::time::timeout(FLUSH_TIMEOUT, committed).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(StoreError::Unavailable(
                "ledger writes are not being committed".into(),
            )),
        }
    }

    /// Expires every pending hold past its TTL; returns how many.
    pub fn expire_due(&self) -> usize {
        let due = self.book().expired(self.clock.now());
        for id in &due {
            self.resolve(*id, Resolve::Expire);
        }
        due.len()
    }

    /// Expires holds past their TTL (by `grace` at least) that this node's book does not
    /// know: on a shared store, those of a node that died. The grace leaves a live node to expire
    /// its own first. The resolution is the book's own rule, applied in a scratch book.
    pub async fn expire_orphans(&self, grace: Duration) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        let Some(cutoff) = now.checked_sub_signed(grace) else {
            return Ok(0);
        };
        let orphans: Vec<HoldRecord> = self
            .store
            .holds_expired_by(cutoff)
            .await?
            .into_iter()
            .filter(|r| self.book().hold(r.hold.id).is_none())
            .collect();
        for record in &orphans {
            self.resolve_in_store(record, Resolve::Expire).await?;
        }
        Ok(orphans.len())
    }

    /// At start: puts back the billing API's pending holds, and expires the data-plane holds a
    /// previous process left (their requests died with it). Returns how many were expired.
    /// On a shared store it does nothing: pending holds may be live nodes' (or handed to the
    /// store), and those of a process that died are expired by [`Ledger::expire_orphans`].
    pub async fn recover(&self) -> Result<usize, StoreError> {
        if self.leasing.is_some() {
            return Ok(0);
        }
        let mut expired = 0;
        for record in self.store.pending_holds().await? {
            let hold = record.hold;
            let (id, account, key) = (hold.id, hold.account, hold.key);
            self.load(account, None).await?;
            // Restored before the key's spend loads, which counts it as held.
            self.book().restore(hold);
            if key.is_some() {
                self.load(account, key).await?;
            }
            if record.source == HoldSource::Request {
                self.resolve(id, Resolve::Expire);
                expired += 1;
            }
        }
        self.flush().await?;
        Ok(expired)
    }

    /// Asks the store whether it answers, so an outage is noticed (and its end) even when no
    /// write is waiting. The probe calls this every 200 ms. One slow ping on a loaded node is
    /// not an outage: the store is down after [`FAILED_PINGS_DOWN`] failures in a row, and up
    /// again at the first answer.
    pub async fn check_store(&self) {
        let failures = match self.store.ping().await {
            Ok(()) => {
                self.failed_pings.store(0, Ordering::Release);
                0
            }
            Err(_) => self.failed_pings.fetch_add(1, Ordering::AcqRel) + 1,
        };
        let down = match failures {
            0 => false,
            n if n >= FAILED_PINGS_DOWN => true,
            // One failure so far: no change either way.
            _ => return,
        };
        if down != self.store_down.swap(down, Ordering::AcqRel) {
            if down {
                tracing::error!("the store does not answer: refusing new holds");
            } else {
                tracing::info!("the store answers again");
            }
        }
    }

    /// Counts a call whose usage cost `uncovered` more than its hold (and so than its charge).
    pub fn count_uncovered(&self, uncovered: Nanos) {
        if uncovered > Nanos::ZERO {
            self.over_hold_calls.inc();
            self.uncovered_nanos
                .inc_by(u64::try_from(uncovered.0).unwrap_or(0));
        }
    }

    pub fn pending_holds(&self) -> usize {
        self.book().pending_holds()
    }

    /// Whether the writer task still runs (readiness asks).
    pub fn writer_running(&self) -> bool {
        !self.writer_stopped.load(Ordering::Acquire)
    }

    /// Another node (`by`) cannot carve a hold from the account's free balance while this node's
    /// lease could cover it: gives the lease back, behind the writes already queued.
    pub fn recall(&self, account: AccountId, by: NodeId) {
        let Some(leasing) = &self.leasing else {
            return;
        };
        if by == leasing.node {
            return;
        }
        let amount = self.book().take_lease(account);
        if amount > Nanos::ZERO {
            let _ = self
                .queue
                .send(Command::Lease(LeaseOp::Return { account, amount }));
        }
    }

    /// Gives back the leases no hold has used for `idle`, so other nodes can use their credit.
    pub fn return_idle_leases(&self, idle: Duration) {
        if self.leasing.is_none() {
            return;
        }
        let mut last_hold = self.last_hold();
        last_hold.retain(|_, at| at.elapsed() < idle);
        let mut book = self.book();
        for account in book.wallets_with_credit() {
            if !last_hold.contains_key(&account) {
                let amount = book.take_lease(account);
                let _ = self
                    .queue
                    .send(Command::Lease(LeaseOp::Return { account, amount }));
            }
        }
    }

    /// The heartbeat: renews this node's leases (in the writer, after what is queued), and
    /// reclaims the leases of nodes that stopped renewing theirs `expiry` ago.
    pub async fn renew_leases(&self, expiry: Duration) -> Result<u64, StoreError> {
        let Some(leasing) = &self.leasing else {
            return Ok(0);
        };
        let _ = self.queue.send(Command::Lease(LeaseOp::Renew));
        let expiry = chrono::Duration::from_std(expiry).unwrap_or(chrono::Duration::MAX);
        match self.clock.now().checked_sub_signed(expiry) {
            Some(cutoff) => leasing.leases.reclaim_leases(cutoff).await,
            None => Ok(0),
        }
    }
}

fn resolve_write(resolution: &Resolution) -> LedgerWrite {
    LedgerWrite::ResolveHold {
        hold: resolution.hold.clone(),
        transfers: resolution.transfers.clone(),
        detached: false,
    }
}

/// A resolution made outside the book ([`Ledger::resolve_outside`]), of a hold no book here has.
fn detached_write(resolution: Resolution) -> LedgerWrite {
    LedgerWrite::ResolveHold {
        hold: resolution.hold,
        transfers: resolution.transfers,
        detached: true,
    }
}

/// The writer: takes everything queued, commits it in one transaction, then answers flushes,
/// then runs the lease operation that ended the batch, if one did. A failed commit is retried
/// (with backoff) until it succeeds: nothing queued is dropped.
struct Writer {
    store: Arc<dyn Store>,
    book: Arc<Mutex<Book>>,
    api_records: Arc<SharedApiRecords>,
    store_down: Arc<AtomicBool>,
    batch_size: Histogram,
    write_lag: Histogram,
    leasing: Option<Leasing>,
    clock: Arc<dyn Clock>,
}

impl Writer {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn commit(&self, id: BatchId, writes: &[LedgerWrite]) -> Result<(), StoreError> {
        match &self.leasing {
            Some(leasing) => leasing.leases.commit_leased(id, leasing.node, writes).await,
            None => self.store.commit(id, writes).await,
        }
    }

    /// Every attempt carries the same `id`, so a retry after a commit whose answer was lost (the
    /// connection dropped after COMMIT reached the store) is recognised, not applied twice. What
    /// is transient (an outage) is retried, with backoff, until it succeeds; a refusal (corrupt
    /// data, [`StoreError::Corrupt`]) would be refused forever and is returned.
    async fn commit_with_retry(&self, id: BatchId, batch: &[LedgerWrite]) -> Result<(), String> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.commit(id, batch).await {
                Ok(()) => {
                    self.store_down.store(false, Ordering::Release);
                    return Ok(());
                }
                Err(StoreError::Corrupt(reason)) => return Err(reason),
                Err(e) => {
                    self.store_down.store(true, Ordering::Release);
                    tracing::warn!(error = %e, writes = batch.len(), "ledger commit failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Commits `writes`, made of groups that end at `ends` (each group one caller's writes, such as
    /// a charge and its usage row, stored together or not at all). If the store refuses the
    /// batch, it is split in halves, in order, until the refused groups stand alone: every other
    /// group is stored, and a refused one is never retried: it is logged and undone in the book.
    /// Returns the refused groups.
    async fn commit_groups(&self, writes: &[LedgerWrite], ends: &[usize]) -> Vec<usize> {
        let mut refused = Vec::new();
        let start_of = |group: usize| if group == 0 { 0 } else { ends[group - 1] };
        // Ranges of groups, the next to commit last.
        let mut todo = Vec::new();
        todo.push(0..ends.len());
        while let Some(groups) = todo.pop() {
            let slice = &writes[start_of(groups.start)..ends[groups.end - 1]];
            match self.commit_with_retry(BatchId::new(), slice).await {
                Ok(()) => {}
                Err(reason) if groups.len() == 1 => {
                    tracing::warn!(%reason, writes = ?slice, "the store refused a ledger write; it is not stored, and the book is corrected");
                    self.undo(slice);
                    refused.push(groups.start);
                }
                Err(reason) => {
                    tracing::warn!(%reason, groups = groups.len(), "ledger batch refused; finding the refused writes");
                    let middle = groups.start + groups.len() / 2;
                    todo.push(middle..groups.end);
                    todo.push(groups.start..middle);
                }
            }
        }
        refused
    }

    /// Brings the book in line with a group the store refused: what its transfers moved is moved
    /// back, and a hold it opened leaves the book.
    fn undo(&self, group: &[LedgerWrite]) {
        let mut book = self.book();
        for write in group {
            match write {
                // On a shared store such a transfer never entered the book (it is free balance).
                LedgerWrite::Transfer { transfer, .. } if self.leasing.is_none() => {
                    book.undo(std::slice::from_ref(transfer), None)
                }
                LedgerWrite::Transfer { .. } => {}
                LedgerWrite::OpenHold {
                    record, transfer, ..
                } => book.undo(transfer.as_slice(), Some(record.hold.id)),
                LedgerWrite::ResolveHold {
                    transfers,
                    detached: false,
                    ..
                } => book.undo(transfers, None),
                // Never in this book: nothing here to correct.
                LedgerWrite::ResolveHold { detached: true, .. } => {}
                LedgerWrite::Usage(_) | LedgerWrite::Event(_) => {}
            }
        }
    }

    /// Runs a lease operation and brings the book in line with its outcome: a carve is added
    /// to the lease, and what a failed operation was to give back is put back.
    async fn lease(&self, op: LeaseOp) {
        let Some(Leasing { node, leases }) = &self.leasing else {
            return;
        };
        match op {
            LeaseOp::Carve {
                account,
                give_back,
                needed,
                done,
            } => {
                let carved = leases
                    .carve(account, *node, give_back, needed, self.clock.now())
                    .await;
                let back = carved.as_ref().map_or(give_back, |c| c.granted);
                self.book().add_lease(account, back);
                let _ = done.send(carved);
            }
            LeaseOp::Return { account, amount } => {
                if let Err(e) = leases.return_lease(account, *node, amount).await {
                    tracing::warn!(error = %e, %account, "cannot give a lease back; keeping it");
                    self.book().add_lease(account, amount);
                }
            }
            LeaseOp::Renew => {
                if let Err(e) = leases.renew_leases(*node, self.clock.now()).await {
                    tracing::warn!(error = %e, "cannot renew this node's leases");
                }
            }
        }
    }
}

/// How much of billing-API holds' records (their metadata, mostly) a node keeps in memory while
/// its book has the holds. Past this, a hold is read from the store: slower, never wrong.
const API_RECORD_BYTES: usize = 16 << 20;

/// What a kept record is counted as, besides its metadata.
const API_RECORD_OVERHEAD: usize = 256;

/// Billing-API holds' records while this node's book has the holds (on a store of its own), so
/// that reading and resolving one asks the store nothing. Kept once the opening is stored; let go
/// when the book forgets the hold (its resolution stored).
#[derive(Default)]
struct ApiRecords {
    records: HashMap<HoldId, (Arc<HoldRecord>, usize)>,
    bytes: usize,
}

#[derive(Default)]
struct SharedApiRecords(Mutex<ApiRecords>);

impl SharedApiRecords {
    fn lock(&self) -> MutexGuard<'_, ApiRecords> {
        // Every method below leaves the map and its byte count consistent before it can panic.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ApiRecords {
    fn keep(&mut self, record: HoldRecord) {
        let size = API_RECORD_OVERHEAD + record.metadata.to_string().len();
        if self.bytes + size > API_RECORD_BYTES {
            return;
        }
        self.bytes += size;
        if let Some((_, replaced)) = self
            .records
            .insert(record.hold.id, (Arc::new(record), size))
        {
            self.bytes -= replaced;
        }
    }

    fn get(&self, id: HoldId) -> Option<Arc<HoldRecord>> {
        self.records.get(&id).map(|(record, _)| record.clone())
    }

    fn forget(&mut self, id: HoldId) {
        if let Some((_, size)) = self.records.remove(&id) {
            self.bytes -= size;
        }
    }
}

/// What the writer has taken off its queue for the next commit.
#[derive(Default)]
struct Gathered {
    batch: Vec<LedgerWrite>,
    /// Where each queued group of writes ends in `batch`, and who waits to hear of it.
    ends: Vec<usize>,
    notices: Vec<(usize, oneshot::Sender<bool>)>,
    flushes: Vec<oneshot::Sender<()>>,
    oldest: Option<Instant>,
    lease_op: Option<LeaseOp>,
}

impl Gathered {
    fn take(&mut self, command: Command) {
        match command {
            Command::Write(writes, queued, notice) => {
                self.batch.extend(writes);
                if let Some(notice) = notice {
                    self.notices.push((self.ends.len(), notice));
                }
                self.ends.push(self.batch.len());
                self.oldest = Some(self.oldest.map_or(queued, |o| o.min(queued)));
            }
            Command::Flush(done) => self.flushes.push(done),
            Command::Lease(op) => self.lease_op = Some(op),
        }
    }

    /// Whether to stop taking commands: the batch is full, or a lease operation must run after it.
    fn closed(&self) -> bool {
        self.batch.len() >= MAX_BATCH || self.lease_op.is_some()
    }

    /// Whether to commit without gathering more: somebody waits for this batch, or it is big
    /// enough to make a commit's fixed cost small.
    fn due(&self) -> bool {
        self.closed()
            || self.batch.len() >= GATHER_UNTIL
            || !self.flushes.is_empty()
            || !self.notices.is_empty()
    }
}

async fn write_loop(
    mut commands: mpsc::UnboundedReceiver<Command>,
    writer: Writer,
    gather: Duration,
) {
    let mut gathered = Gathered::default();
    while let Some(first) = commands.recv().await {
        gathered.take(first);
        while !gathered.closed() {
            match commands.try_recv() {
                Ok(command) => gathered.take(command),
                Err(_) => break,
            }
        }
        // A small batch nobody waits for waits a moment for more, so that a commit's fixed cost
        // (the hand-off to the store, BEGIN, the log append) is shared by more requests.
        if !gathered.due() {
            let deadline = tokio::time::Instant::now() + gather;
            while !gathered.due() {
                match tokio::time::timeout_at(deadline, commands.recv()).await {
                    Ok(Some(command)) => gathered.take(command),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let Gathered {
            batch,
            ends,
            notices,
            flushes,
            oldest,
            lease_op,
        } = &mut gathered;
        if !batch.is_empty() {
            let refused = writer.commit_groups(batch, ends).await;
            writer.batch_size.observe(batch.len() as f64);
            if let Some(oldest) = oldest.take() {
                writer.write_lag.observe(oldest.elapsed().as_secs_f64());
            }
            for (group, notice) in notices.drain(..) {
                let _ = notice.send(!refused.contains(&group));
            }
            let mut book = writer.book();
            let mut api_records = writer.api_records.lock();
            for write in batch.drain(..) {
                if let LedgerWrite::ResolveHold { hold, .. } = write {
                    book.forget(hold.id);
                    api_records.forget(hold.id);
                }
            }
            ends.clear();
        }
        // Everything queued before these flushes is handled: stored, or refused and undone in
        // the book. A caller that must know its own write was stored reads it back.
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        if let Some(op) = lease_op.take() {
            writer.lease(op).await;
        }
    }
}
