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
//! The book assumes it is the only writer of the wallets it has loaded: true of the embedded
//! store, which belongs to one node.
//!
//! While the store does not answer (a commit failed, or the sweeper's ping did), no new hold is
//! opened: requests are refused with 503 before any work, so nothing is charged for them. Holds
//! already open finish as usual and their writes wait in the queue for the store to return.

use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tollgate_core::ledger::{month_start, Book, Hold, HoldRequest, Refusal, Resolution, Resolve};
use tollgate_core::{AccountId, Clock, HoldId, KeyId, Nanos, RequestId};
use tollgate_store::{BatchId, HoldRecord, HoldSource, LedgerWrite, Store, StoreError, UsageRow};

/// The most writes committed in one transaction.
const MAX_BATCH: usize = 2048;
/// How long a caller waits for its writes to be committed before answering 503.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

// Writes are nearly every message; boxing them would allocate once per write.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Committed in one batch together (a charge and its usage row); queued at that instant.
    Write(Vec<LedgerWrite>, Instant),
    Flush(oneshot::Sender<()>),
}

pub struct Ledger {
    book: Arc<Mutex<Book>>,
    /// Set while the store does not answer; cleared by the next commit or ping that succeeds.
    store_down: Arc<AtomicBool>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    queue: mpsc::UnboundedSender<Command>,
    /// Writes per committed batch, and how long the oldest write of a batch waited (for
    /// `/metrics`).
    pub batch_size: Histogram,
    pub write_lag: Histogram,
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
    Store(StoreError),
}

impl From<StoreError> for HoldRefused {
    fn from(e: StoreError) -> Self {
        HoldRefused::Store(e)
    }
}

/// What a new hold is for.
pub struct HoldSpec {
    pub account: AccountId,
    pub key: Option<KeyId>,
    pub key_cap: Option<Nanos>,
    pub amount: Nanos,
    pub ttl: Duration,
    pub source: HoldSource,
    pub request_id: Option<RequestId>,
    pub metadata: serde_json::Value,
}

impl Ledger {
    /// Starts the writer task and returns the service.
    pub fn start(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Arc<Ledger> {
        let (queue, commands) = mpsc::unbounded_channel();
        let book = Arc::new(Mutex::new(Book::new()));
        let store_down = Arc::new(AtomicBool::new(false));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let write_lag = crate::metrics::latency();
        let writer = Writer {
            store: store.clone(),
            book: book.clone(),
            store_down: store_down.clone(),
            batch_size: batch_size.clone(),
            write_lag: write_lag.clone(),
        };
        tokio::spawn(write_loop(commands, writer));
        Arc::new(Ledger {
            book,
            store_down,
            store,
            clock,
            queue,
            batch_size,
            write_lag,
        })
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock cannot leave the book half-changed: every Book
        // method checks before it mutates. So a poisoned lock is still a consistent book.
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enqueue(&self, write: LedgerWrite) {
        // The writer lives as long as the runtime; if it is gone, the process is stopping and
        // the write is lost as a crash would lose it (see the module docs).
        let _ = self.queue.send(Command::Write(vec![write], Instant::now()));
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
        if !wallet_loaded {
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
        if self.store_down.load(Ordering::Acquire) {
            return Err(HoldRefused::Store(StoreError::Unavailable(
                "the store does not answer; no new hold until it does".into(),
            )));
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
        };
        let (hold, transfer) = self.book().open(request).map_err(|refusal| match refusal {
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
            Refusal::NotLoaded | Refusal::Overflow => {
                HoldRefused::Store(StoreError::Corrupt(refusal.to_string()))
            }
        })?;
        self.enqueue(LedgerWrite::OpenHold {
            record: HoldRecord {
                hold: hold.clone(),
                source: spec.source,
                request_id: spec.request_id,
                metadata: spec.metadata,
            },
            transfer,
        });
        Ok(hold)
    }

    /// Resolves a hold the book knows (every pending one); `None` for a hold it does not know.
    /// Resolving twice returns the first outcome and writes nothing.
    pub fn resolve(&self, id: HoldId, how: Resolve) -> Option<Resolution> {
        let resolution = self.book().resolve(id, how, self.clock.now())?;
        if resolution.first {
            self.enqueue(resolve_write(&resolution));
        }
        Some(resolution)
    }

    /// Ends a data-plane request: resolves its hold (if any) and records its usage row, built
    /// from the resolution. Both are committed in the same transaction, so the store never
    /// holds a charge without its row.
    pub fn finish_request(
        &self,
        hold: Option<(HoldId, Resolve)>,
        row: impl FnOnce(Option<&Resolution>) -> UsageRow,
    ) {
        let resolution = hold.and_then(|(id, how)| self.book().resolve(id, how, self.clock.now()));
        let mut writes = Vec::with_capacity(2);
        if let Some(resolution) = resolution.as_ref().filter(|r| r.first) {
            writes.push(resolve_write(resolution));
        }
        writes.push(LedgerWrite::Usage(Box::new(row(resolution.as_ref()))));
        let _ = self.queue.send(Command::Write(writes, Instant::now()));
    }

    /// Resolves a hold and waits until the outcome is stored. A hold the book has forgotten
    /// was resolved and stored before: its stored outcome is returned.
    pub async fn resolve_durably(
        &self,
        id: HoldId,
        how: Resolve,
    ) -> Result<Option<HoldRecord>, StoreError> {
        let resolved = self.resolve(id, how).is_some();
        if resolved {
            self.flush().await?;
        }
        self.store.hold(id).await
    }

    /// Credits an account from outside and waits until it is stored.
    pub async fn grant(
        &self,
        account: AccountId,
        amount: Nanos,
        memo: &str,
        reference: &str,
    ) -> Result<(), StoreError> {
        self.load(account, None).await?;
        let transfer = self
            .book()
            .grant(account, amount)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if amount > Nanos::ZERO {
            self.enqueue(LedgerWrite::Grant {
                account,
                transfer,
                memo: memo.to_string(),
                reference: reference.to_string(),
                at: self.clock.now(),
            });
        }
        self.flush().await
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
            let mut scratch = Book::new();
            scratch.restore(record.hold.clone());
            if let Some(resolution) = scratch.resolve(record.hold.id, Resolve::Expire, now) {
                self.enqueue(resolve_write(&resolution));
            }
        }
        Ok(orphans.len())
    }

    /// At start: puts back the billing API's pending holds, and expires the data-plane holds a
    /// previous process left (their requests died with it). Returns how many were expired.
    pub async fn recover(&self) -> Result<usize, StoreError> {
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
    /// write is waiting. The sweeper calls this every tick.
    pub async fn check_store(&self) {
        let down = self.store.ping().await.is_err();
        if down != self.store_down.swap(down, Ordering::AcqRel) {
            if down {
                tracing::error!("the store does not answer: refusing new holds");
            } else {
                tracing::info!("the store answers again");
            }
        }
    }

    pub fn pending_holds(&self) -> usize {
        self.book().pending_holds()
    }
}

fn resolve_write(resolution: &Resolution) -> LedgerWrite {
    LedgerWrite::ResolveHold {
        hold: resolution.hold.clone(),
        transfers: resolution.transfers.clone(),
    }
}

/// The writer: takes everything queued, commits it in one transaction, then answers flushes.
/// A failed commit is retried (with backoff) until it succeeds: nothing queued is dropped.
struct Writer {
    store: Arc<dyn Store>,
    book: Arc<Mutex<Book>>,
    store_down: Arc<AtomicBool>,
    batch_size: Histogram,
    write_lag: Histogram,
}

async fn write_loop(mut commands: mpsc::UnboundedReceiver<Command>, writer: Writer) {
    let Writer {
        store,
        book,
        store_down,
        batch_size,
        write_lag,
    } = writer;
    let mut batch: Vec<LedgerWrite> = Vec::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = commands.recv().await {
        let mut next = Some(first);
        let mut oldest: Option<Instant> = None;
        while let Some(command) = next {
            match command {
                Command::Write(writes, queued) => {
                    batch.extend(writes);
                    oldest = Some(oldest.map_or(queued, |o| o.min(queued)));
                }
                Command::Flush(done) => flushes.push(done),
            }
            next = if batch.len() < MAX_BATCH {
                commands.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            commit_with_retry(&*store, BatchId::new(), &batch, &store_down).await;
            batch_size.observe(batch.len() as f64);
            if let Some(oldest) = oldest {
                write_lag.observe(oldest.elapsed().as_secs_f64());
            }
            let mut book = book.lock().unwrap_or_else(|p| p.into_inner());
            for write in batch.drain(..) {
                if let LedgerWrite::ResolveHold { hold, .. } = write {
                    book.forget(hold.id);
                }
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Every attempt carries the same `id`, so a retry after a commit whose answer was lost (the
/// connection dropped after COMMIT reached the store) is recognised, not applied twice.
async fn commit_with_retry(
    store: &dyn Store,
    id: BatchId,
    batch: &[LedgerWrite],
    store_down: &AtomicBool,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.commit(id, batch).await {
            Ok(()) => {
                store_down.store(false, Ordering::Release);
                return;
            }
            Err(StoreError::Corrupt(reason)) => {
                // A write the store refuses as inconsistent would be refused forever; commit
                // the others one by one and log the refused ones loudly.
                tracing::error!(%reason, "ledger batch refused; committing its writes one by one");
                for write in batch {
                    if let Err(e) = store
                        .commit(BatchId::new(), std::slice::from_ref(write))
                        .await
                    {
                        tracing::error!(error = %e, ?write, "ledger write refused and dropped");
                    }
                }
                return;
            }
            Err(e) => {
                store_down.store(true, Ordering::Release);
                tracing::warn!(error = %e, writes = batch.len(), "ledger commit failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
