//! The usage exporter: one loop per sink, reading the export log past the sink's cursor.
//!
//! A round takes a batch of records, sets aside those the sink cannot take yet or ever (no
//! customer mapping: parked as unmapped and sent once a mapping exists; older than the sink
//! takes: a dead letter), sends the rest, and moves the cursor past the batch, parking what
//! the sink refused, in one store transaction. A batch the sink did not answer leaves the
//! cursor where it was and is sent again after a growing pause; records it did take meanwhile
//! are recognised by their ids. Several nodes may run the same sink: the cursor moves only from
//! where a round found it, so a round that lost the race does nothing, and the sink drops what
//! both sent.

use crate::config::{CustomerIds, ExportSettings, SinkSettings};
use crate::notify::sinks::{Outgoing, SinkClient, SinkError, Verdict};
use chrono::{DateTime, TimeDelta, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::{AccountId, Clock};
use tollgate_store::{ExportRecord, ParkReason, Store, StoreError};

/// The longest pause after failed rounds.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParkedLabel {
    pub sink: String,
    pub reason: String,
}

#[derive(Default)]
struct ExportMetrics {
    exported: Family<SinkLabel, Counter>,
    failures: Family<SinkLabel, Counter>,
    parked: Family<ParkedLabel, Counter>,
    lag_records: Family<SinkLabel, Gauge>,
    lag_seconds: Family<SinkLabel, Gauge>,
}

/// Why a round ended without moving the cursor.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    pub read: usize,
    pub delivered: usize,
    pub parked: usize,
    /// Earlier unmapped records sent now that their account has a customer.
    pub unparked: usize,
}

pub struct Exporter {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    settings: ExportSettings,
    sinks: Vec<Arc<SinkClient>>,
    metrics: ExportMetrics,
}

impl Exporter {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        settings: ExportSettings,
    ) -> Arc<Exporter> {
        let sinks = settings
            .sinks
            .iter()
            .map(|sink| Arc::new(SinkClient::new(sink.clone())))
            .collect();
        Arc::new(Exporter {
            store,
            clock,
            settings,
            sinks,
            metrics: ExportMetrics::default(),
        })
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let m = &self.metrics;
        registry.register(
            "export_records",
            "Usage records a sink acknowledged",
            m.exported.clone(),
        );
        registry.register(
            "export_failures",
            "Export rounds a sink did not answer (or the store failed)",
            m.failures.clone(),
        );
        registry.register(
            "export_parked",
            "Usage records set aside per sink and reason (unmapped, too_old, rejected)",
            m.parked.clone(),
        );
        registry.register(
            "export_lag_records",
            "Usage records past the sink's cursor",
            m.lag_records.clone(),
        );
        registry.register(
            "export_lag_seconds",
            "Age of the oldest usage record past the sink's cursor",
            m.lag_seconds.clone(),
        );
    }

    /// Records each sink's start: a sink seen for the first time starts at the newest record,
    /// so configuring one never sends it the history. Run before the node serves, so every
    /// call it admits is after the start.
    pub async fn start(&self) -> Result<(), StoreError> {
        for sink in &self.settings.sinks {
            self.store
                .start_export(&sink.name, self.clock.now())
                .await?;
        }
        Ok(())
    }

    pub fn settings(&self) -> &ExportSettings {
        &self.settings
    }

    pub fn sink(&self, name: &str) -> Option<&Arc<SinkClient>> {
        self.sinks.iter().find(|s| s.settings().name == name)
    }

    /// Runs every sink's loop until the process ends.
    pub async fn run(self: Arc<Self>) {
        let loops: Vec<_> = self
            .sinks
            .iter()
            .map(|sink| tokio::spawn(self.clone().run_sink(sink.clone())))
            .collect();
        for sink in loops {
            let _ = sink.await;
        }
    }

    async fn run_sink(self: Arc<Self>, sink: Arc<SinkClient>) {
        let mut backoff = Duration::ZERO;
        loop {
            let wait = match self.round(&sink).await {
                // A full batch: more may be waiting.
                Ok(round) if round.read == sink.settings().batch_size as usize => Duration::ZERO,
                Ok(_) => self.settings.poll_interval,
                Err(e) => {
                    self.metrics.failures.get_or_create(&label(&sink)).inc();
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                    tracing::warn!(sink = %sink.settings().name, error = %e, retry_in = ?backoff,
                        "usage export round failed; the cursor stays");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            backoff = Duration::ZERO;
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// One round for one sink.
    pub async fn round(&self, sink: &SinkClient) -> Result<Round, RoundError> {
        let settings = sink.settings();
        let now = self.clock.now();
        let from = self.store.export_cursor(&settings.name).await?;
        let records = self.store.export_records(from, settings.batch_size).await?;
        let mut round = Round {
            read: records.len(),
            ..Round::default()
        };
        if let Some(last) = records.last() {
            let customers = self.customers(settings, &records).await?;
            let mut parked: Vec<(i64, ParkReason, String)> = Vec::new();
            let mut outgoing = Vec::new();
            for record in &records {
                if too_old(settings, record, now) {
                    parked.push((record.seq, ParkReason::TooOld, old_detail(settings)));
                } else if let Some(customer) = customers.get(&record.account) {
                    outgoing.push(Outgoing { record, customer });
                } else {
                    parked.push((
                        record.seq,
                        ParkReason::Unmapped,
                        format!("account {} has no customer id in this sink", record.account),
                    ));
                }
            }
            let verdicts = sink.send(&outgoing).await?;
            for (out, verdict) in outgoing.iter().zip(verdicts) {
                match verdict {
                    Verdict::Delivered => round.delivered += 1,
                    Verdict::TooOld(why) => parked.push((out.record.seq, ParkReason::TooOld, why)),
                    Verdict::Rejected(why) => {
                        parked.push((out.record.seq, ParkReason::Rejected, why));
                    }
                }
            }
            round.parked = parked.len();
            let unmapped = parked
                .iter()
                .filter(|(_, reason, _)| *reason == ParkReason::Unmapped)
                .count();
            if unmapped > 0 {
                tracing::warn!(sink = %settings.name, unmapped,
                    "usage of accounts without a customer id in this sink waits until one is set");
            }
            if self
                .store
                .advance_export(&settings.name, from, last.seq, &parked, now)
                .await?
            {
                self.count(settings, round.delivered, &parked);
            } else {
                // Another node moved the cursor first; what this round sent, the sink dropped
                // as a duplicate or took first.
                round = Round::default();
            }
        }
        // Caught up: the records that waited for a customer id, if their account has one now.
        if round.read < settings.batch_size as usize {
            round.unparked = self.send_newly_mapped(sink).await?;
        }
        self.measure_lag(settings, now).await?;
        Ok(round)
    }

    /// Sends parked unmapped records whose account now has a customer id.
    async fn send_newly_mapped(&self, sink: &SinkClient) -> Result<usize, RoundError> {
        let settings = sink.settings();
        if settings.customer == CustomerIds::Account {
            return Ok(0);
        }
        let ready = self
            .store
            .newly_mapped_exports(
                &settings.name,
                settings.kind == crate::config::SinkKind::Stripe,
                settings.batch_size,
            )
            .await?;
        if ready.is_empty() {
            return Ok(0);
        }
        let customers = self.customers(settings, &ready).await?;
        let ready: Vec<&ExportRecord> = ready.iter().collect();
        self.resend(sink, &ready, &customers).await
    }

    /// Sends parked records again (the operator's retry, or a mapping that arrived); each
    /// delivered one leaves the list, each refused one stays with the new reason. How many
    /// were delivered.
    async fn resend(
        &self,
        sink: &SinkClient,
        records: &[&ExportRecord],
        customers: &BTreeMap<AccountId, String>,
    ) -> Result<usize, RoundError> {
        let settings = sink.settings();
        let now = self.clock.now();
        let outgoing: Vec<Outgoing<'_>> = records
            .iter()
            .filter_map(|record| {
                let customer = customers.get(&record.account)?;
                Some(Outgoing { record, customer })
            })
            .collect();
        let verdicts = sink.send(&outgoing).await?;
        let mut delivered = 0;
        for (out, verdict) in outgoing.iter().zip(verdicts) {
            let now_parked = match verdict {
                Verdict::Delivered => None,
                Verdict::TooOld(why) => Some((ParkReason::TooOld, why)),
                Verdict::Rejected(why) => Some((ParkReason::Rejected, why)),
            };
            let was_delivered = now_parked.is_none();
            if self
                .store
                .repark_export(&settings.name, out.record.seq, now_parked, now)
                .await?
                && was_delivered
            {
                delivered += 1;
            }
        }
        self.metrics
            .exported
            .get_or_create(&SinkLabel {
                sink: settings.name.clone(),
            })
            .inc_by(delivered as u64);
        Ok(delivered)
    }

    /// The operator's retry of one parked record: sent now, whatever its reason (a dead
    /// letter past the sink's age is refused again). `None` if it is not parked; otherwise
    /// whether it was delivered.
    pub async fn retry_parked(
        &self,
        sink: &SinkClient,
        seq: i64,
    ) -> Result<Option<bool>, RoundError> {
        let settings = sink.settings();
        let parked = self
            .store
            .parked_exports(&settings.name, None, seq - 1, 1)
            .await?;
        let Some(parked) = parked.into_iter().find(|p| p.record.seq == seq) else {
            return Ok(None);
        };
        let record = parked.record;
        let customers = self
            .customers(settings, std::slice::from_ref(&record))
            .await?;
        if !customers.contains_key(&record.account) {
            return Ok(Some(false));
        }
        Ok(Some(self.resend(sink, &[&record], &customers).await? == 1))
    }

    /// Each account's customer id in the sink; an account missing has none.
    async fn customers(
        &self,
        settings: &SinkSettings,
        records: &[ExportRecord],
    ) -> Result<BTreeMap<AccountId, String>, StoreError> {
        let accounts: BTreeSet<AccountId> = records.iter().map(|r| r.account).collect();
        match settings.customer {
            CustomerIds::Account => Ok(accounts.into_iter().map(|a| (a, a.to_string())).collect()),
            CustomerIds::Mapped => {
                let accounts: Vec<AccountId> = accounts.into_iter().collect();
                let card = settings.kind == crate::config::SinkKind::Stripe;
                Ok(self
                    .store
                    .export_customers(&settings.name, card, &accounts)
                    .await?
                    .into_iter()
                    .collect())
            }
        }
    }

    fn count(
        &self,
        settings: &SinkSettings,
        delivered: usize,
        parked: &[(i64, ParkReason, String)],
    ) {
        let sink = settings.name.clone();
        self.metrics
            .exported
            .get_or_create(&SinkLabel { sink: sink.clone() })
            .inc_by(delivered as u64);
        for (_, reason, _) in parked {
            self.metrics
                .parked
                .get_or_create(&ParkedLabel {
                    sink: sink.clone(),
                    reason: reason.as_str().to_string(),
                })
                .inc();
        }
    }

    async fn measure_lag(
        &self,
        settings: &SinkSettings,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let standing = self.store.export_standing(&settings.name).await?;
        let label = SinkLabel {
            sink: settings.name.clone(),
        };
        self.metrics
            .lag_records
            .get_or_create(&label)
            .set(i64::try_from(standing.pending).unwrap_or(i64::MAX));
        let age = standing
            .oldest_pending
            .map_or(0, |oldest| (now - oldest).num_seconds().max(0));
        self.metrics.lag_seconds.get_or_create(&label).set(age);
        Ok(())
    }
}

fn label(sink: &SinkClient) -> SinkLabel {
    SinkLabel {
        sink: sink.settings().name.clone(),
    }
}

fn too_old(settings: &SinkSettings, record: &ExportRecord, now: DateTime<Utc>) -> bool {
    settings
        .max_age
        .is_some_and(|max| TimeDelta::from_std(max).is_ok_and(|max| now - record.at > max))
}

fn old_detail(settings: &SinkSettings) -> String {
    format!(
        "older than the {:?} {} accepts",
        settings.max_age.unwrap_or_default(),
        settings.kind.as_str()
    )
}

/// One (customer, meter, day) whose totals differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The sink's customer id; `None` for an account with none (its usage cannot be there).
    pub customer: Option<String>,
    pub account: Option<AccountId>,
    pub meter: crate::config::Meter,
    /// Midnight UTC.
    pub day: DateTime<Utc>,
    /// In billionths (see [`crate::notify::sinks::render_scaled`]).
    pub tollgate: i128,
    pub sink: i128,
}

/// A total's place: the sink's customer (or, with none, the account), meter and day.
type TotalKey = (
    Option<String>,
    Option<AccountId>,
    crate::config::Meter,
    DateTime<Utc>,
);

/// What `tollgate export verify` found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// (customer, meter, day) totals compared.
    pub compared: usize,
    pub differences: Vec<Difference>,
    /// Records still waiting to be sent: a difference while they wait is expected.
    pub pending: u64,
}

/// Compares Tollgate's charged usage per account, meter and UTC day in `[from, to)` with what
/// the sink holds. Days are whole: `from` and `to` are taken to their midnights.
pub async fn verify(
    store: &dyn Store,
    sink: &SinkClient,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Verification, RoundError> {
    use crate::notify::sinks::{day_of, day_scaled};
    let settings = sink.settings();
    let (from, to) = (day_of(from), day_of(to));
    let totals = store.export_day_totals(from, to).await?;
    let accounts: Vec<AccountId> = totals
        .iter()
        .map(|t| t.account)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let customers: BTreeMap<AccountId, String> = match settings.customer {
        CustomerIds::Account => accounts.iter().map(|a| (*a, a.to_string())).collect(),
        CustomerIds::Mapped => store
            .export_customers(
                &settings.name,
                settings.kind == crate::config::SinkKind::Stripe,
                &accounts,
            )
            .await?
            .into_iter()
            .collect(),
    };
    // Tollgate's side, keyed as the sink's is; an account without a customer keeps its id.
    let mut ours: BTreeMap<TotalKey, i128> = BTreeMap::new();
    for total in &totals {
        let customer = customers.get(&total.account).cloned();
        let account = customer.is_none().then_some(total.account);
        for (meter, _) in &settings.meters {
            let value = day_scaled(total, *meter);
            *ours
                .entry((customer.clone(), account, *meter, total.day))
                .or_default() += value;
        }
    }
    let mapped: Vec<String> = customers
        .values()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let theirs = sink.totals(from, to, &mapped).await?;
    let mut report = Verification {
        pending: store.export_standing(&settings.name).await?.pending,
        ..Verification::default()
    };
    let mut keys: BTreeSet<TotalKey> = ours.keys().cloned().collect();
    keys.extend(
        theirs
            .keys()
            .filter(|(_, _, day)| *day >= from && *day < to)
            .map(|(customer, meter, day)| (Some(customer.clone()), None, *meter, *day)),
    );
    for key in keys {
        let tollgate = ours.get(&key).copied().unwrap_or(0);
        let sink_value = key
            .0
            .as_ref()
            .and_then(|customer| theirs.get(&(customer.clone(), key.2, key.3)))
            .copied()
            .unwrap_or(0);
        report.compared += 1;
        if tollgate != sink_value {
            report.differences.push(Difference {
                customer: key.0,
                account: key.1,
                meter: key.2,
                day: key.3,
                tollgate,
                sink: sink_value,
            });
        }
    }
    Ok(report)
}
