//! Charging a data-plane request: [`Billing`] carries a request's hold and usage row from the
//! moment it is authenticated to its end; [`MeteredBody`] reads usage from a successful
//! response as it streams to the client, then settles.
//!
//! Whatever path a request takes, its billing finishes exactly once: explicitly, or, if it is
//! dropped unfinished (the client went away before the answer), by releasing its hold.

use crate::access::limits::{Demand, Limiter};
use crate::billing::allowances::{self, UnitsHeld};
use crate::billing::ledger::Ledger;
use crate::config::{Pricing, StreamPolicy, UnitsFrom};
use crate::http::headers::ClientRequestId;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tollgate_core::ledger::{BillingStatus, Hold, HoldStatus, Resolve};
use tollgate_core::metering::{LlmApi, StreamMeter, TokenUsage};
use tollgate_core::pricing::{self, TokenPrices};
use tollgate_core::ratelimit::Unit;
use tollgate_core::RequestId;
use tollgate_core::{ApiError, Clock, Nanos};
use tollgate_store::KeyRecord;
use tollgate_store::UsageRow;

/// Bodies of metered JSON responses are kept (to read their usage at the end) up to this size.
const MAX_METERED_JSON_BYTES: usize = 16 * 1024 * 1024;

/// The status a usage row records for a client that left before its answer (nginx's 499).
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// How a request's money ended, decided by whoever finishes it.
pub struct Outcome {
    pub status: u16,
    pub upstream_status: Option<u16>,
    /// `Some((cost, status))` to settle; `None` to release.
    pub charge: Option<(Nanos, BillingStatus)>,
    pub tokens: Option<TokenUsage>,
    pub units: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

impl Outcome {
    /// Charged nothing: the upstream failed, or the client left.
    pub fn released(status: u16, upstream_status: Option<u16>) -> Self {
        Outcome {
            status,
            upstream_status,
            charge: None,
            tokens: None,
            units: None,
            error_code: None,
            error_message: None,
        }
    }

    /// A free call Tollgate answered itself, settled at zero.
    pub fn free(status: u16) -> Self {
        Outcome {
            charge: Some((Nanos::ZERO, BillingStatus::Settled)),
            ..Outcome::released(status, None)
        }
    }

    /// Charged nothing: Tollgate refused or failed the call with `error`.
    pub fn refused(error: &ApiError) -> Self {
        Outcome {
            error_code: Some(error.code.as_str().to_string()),
            error_message: Some(error.message.clone()),
            ..Outcome::released(error.code.info().status, None)
        }
    }
}

struct Open {
    ledger: Arc<Ledger>,
    clock: Arc<dyn Clock>,
    started: Instant,
    hold: Option<Hold>,
    row: UsageRow,
    log_usage: bool,
    reservation: Option<Reservation>,
    /// The call's included units, when its plan meters it.
    units: Option<UnitsHeld>,
    /// Percent off the call's cost, by its plan.
    discount: u8,
}

/// What a request's token and cost rate-limit policies reserved, corrected to the actual usage
/// when it finishes.
struct Reservation {
    limiter: Arc<dyn Limiter>,
    demands: Vec<Demand>,
}

impl Reservation {
    fn correct(self, tokens: u64, cost: Nanos) {
        let corrections: Vec<(Demand, i64)> = self
            .demands
            .into_iter()
            .filter_map(|demand| {
                let actual = match demand.policy.unit {
                    Unit::Requests => return None,
                    Unit::Tokens => tokens,
                    Unit::Cost => u64::try_from(cost.0).unwrap_or(0),
                };
                let delta = i64::try_from(actual)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(i64::try_from(demand.cost).unwrap_or(i64::MAX));
                (delta != 0).then_some((demand, delta))
            })
            .collect();
        if corrections.is_empty() {
            return;
        }
        let limiter = self.limiter;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = limiter.adjust(&corrections).await {
                    tracing::warn!(error = %e, "rate-limit correction lost");
                }
            });
        }
    }
}

/// A request's billing in progress: its hold (if it has one) and its usage row.
pub struct Billing(Option<Open>);

impl Billing {
    /// `row` is filled in as far as is known at authentication; the outcome completes it. It is
    /// stored only when `log_usage` (the `usage_log` setting) is on.
    pub fn new(
        ledger: Arc<Ledger>,
        clock: Arc<dyn Clock>,
        row: UsageRow,
        log_usage: bool,
    ) -> Billing {
        Billing(Some(Open {
            ledger,
            clock,
            started: Instant::now(),
            hold: None,
            row,
            log_usage,
            reservation: None,
            units: None,
            discount: 0,
        }))
    }

    /// The token and cost policies' reservations, to correct when the request finishes.
    pub fn set_reservation(&mut self, limiter: Arc<dyn Limiter>, demands: Vec<Demand>) {
        let demands: Vec<Demand> = demands
            .into_iter()
            .filter(|d| d.policy.unit != Unit::Requests)
            .collect();
        if let (Some(open), false) = (&mut self.0, demands.is_empty()) {
            open.reservation = Some(Reservation { limiter, demands });
        }
    }

    pub fn set_hold(&mut self, hold: Hold) {
        if let Some(open) = &mut self.0 {
            open.row.hold = hold.amount;
            open.row.hold_id = Some(hold.id);
            open.hold = Some(hold);
        }
    }

    /// The call's reservation of included units, settled or returned with it.
    pub fn set_units(&mut self, units: UnitsHeld) {
        if let Some(open) = &mut self.0 {
            open.units = Some(units);
        }
    }

    /// Percent off the call's cost (its plan's discount on the route group).
    pub fn set_discount(&mut self, percent: u8) {
        if let Some(open) = &mut self.0 {
            open.discount = percent;
        }
    }

    pub fn set_model(&mut self, model: &str) {
        if let Some(open) = &mut self.0 {
            open.row.model = Some(model.to_string());
        }
    }

    /// Settles or releases the hold and records the usage row.
    pub fn finish(mut self, outcome: Outcome) {
        if let Some(open) = self.0.take() {
            open.finish(outcome);
        }
    }
}

impl Drop for Billing {
    fn drop(&mut self) {
        if let Some(open) = self.0.take() {
            open.finish(Outcome::released(CLIENT_CLOSED_REQUEST, None));
        }
    }
}

impl Open {
    fn finish(self, outcome: Outcome) {
        let Open {
            ledger,
            clock,
            started,
            hold,
            mut row,
            log_usage,
            reservation,
            units,
            discount,
        } = self;
        let charge = outcome
            .charge
            .map(|(cost, status)| (pricing::discounted(cost, discount), status));
        let tokens = outcome
            .tokens
            .map_or(0, |t| t.input + t.cached_input + t.output);
        let mut charged = Nanos::ZERO;
        // What the wallet pays: the whole cost, or the share included units did not cover.
        let wallet_cost = match (charge, units) {
            (Some((cost, _)), Some(units)) => {
                let used = allowances::units_of(units.meter, tokens, cost);
                Some(units.settle(used, cost))
            }
            (Some((cost, _)), None) => Some(cost),
            (None, Some(units)) => {
                units.release();
                None
            }
            (None, None) => None,
        };
        let how = match wallet_cost {
            Some(cost) => Resolve::Settle(cost),
            None => Resolve::Release,
        };
        let charged_status = charge.map_or(BillingStatus::Released, |(_, status)| status);
        // The charge is capped at the hold; what the usage cost beyond it is the house's loss,
        // recorded on the row and counted, so an operator can see undersized holds.
        let uncovered = match wallet_cost {
            Some(cost) => Nanos(cost.0 - hold.as_ref().map_or(0, |h| h.amount.0)),
            None => Nanos::ZERO,
        }
        .max(Nanos::ZERO);
        let had_hold = hold.is_some();
        ledger.finish_request(hold.map(|h| (h.id, how)), |resolution| {
            let (cost, billing_status) = match resolution {
                // Expired before the request finished (its TTL passed, or the sweeper came by):
                // nothing charged.
                Some(r) if r.hold.status == HoldStatus::Expired => {
                    (Nanos::ZERO, BillingStatus::Expired)
                }
                Some(r) if r.first => (r.hold.charged, charged_status),
                // Only its request resolves a data-plane hold; anything else is a defect, and
                // the row tells what the hold became, never "settled" at a price not charged.
                Some(r) => {
                    tracing::error!(
                        request_id = %row.request_id,
                        hold = %r.hold.id,
                        status = r.hold.status.as_str(),
                        "a request's hold was resolved by something other than the request"
                    );
                    let status = match r.hold.status {
                        HoldStatus::Settled => BillingStatus::Settled,
                        _ => BillingStatus::Released,
                    };
                    (r.hold.charged, status)
                }
                None if had_hold => (Nanos::ZERO, BillingStatus::Expired),
                // No hold: a free call (its cost is zero by construction).
                None => (Nanos::ZERO, charged_status),
            };
            row.status = outcome.status;
            row.upstream_status = outcome.upstream_status;
            row.cost = cost;
            row.uncovered = if billing_status == charged_status {
                uncovered
            } else {
                Nanos::ZERO
            };
            charged = cost;
            row.billing_status = billing_status;
            row.tokens = outcome.tokens;
            row.units = outcome.units;
            row.error_code = outcome.error_code;
            row.error_message = outcome.error_message;
            row.latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            row.completed_at = clock.now();
            if row.uncovered > Nanos::ZERO {
                ledger.count_uncovered(row.uncovered);
            }
            log_usage.then_some(row)
        });
        if let Some(reservation) = reservation {
            reservation.correct(tokens, charged);
        }
    }
}

/// How the cost of a successful response is found.
pub enum CostRule {
    /// Known when the headers arrive (flat price, or units from a header).
    Fixed { cost: Nanos, units: Option<String> },
    /// Units not found where the route says (a header); the stream policy decides between
    /// nothing and the flat price.
    Unknown { flat: Nanos },
    /// Tokens read from the body (JSON or SSE), at the model's prices, plus the flat price.
    /// `input_estimate` (from the request body) stands in for input a response never reported.
    Tokens {
        api: LlmApi,
        prices: TokenPrices,
        flat: Nanos,
        input_estimate: u64,
    },
    /// Units at a JSON pointer into the body, plus the flat price.
    JsonUnits {
        pointer: String,
        unit_price: Nanos,
        flat: Nanos,
    },
}

impl CostRule {
    /// The rule for a 2xx response on a route with `pricing` (and, for a metered LLM call, the
    /// model's prices and the request's input estimate).
    pub fn for_response(
        pricing: &Pricing,
        llm: Option<(TokenPrices, u64)>,
        headers: &http::HeaderMap,
    ) -> CostRule {
        if let (Some((api, _)), Some((prices, input_estimate))) = (&pricing.llm, llm) {
            return CostRule::Tokens {
                api: *api,
                prices,
                flat: pricing.flat,
                input_estimate,
            };
        }
        match &pricing.per_unit {
            None => CostRule::Fixed {
                cost: pricing.flat,
                units: None,
            },
            Some(per_unit) => match &per_unit.from {
                UnitsFrom::JsonPointer(pointer) => CostRule::JsonUnits {
                    pointer: pointer.clone(),
                    unit_price: per_unit.price,
                    flat: pricing.flat,
                },
                UnitsFrom::Header(name) => {
                    let units = headers.get(name).and_then(|v| v.to_str().ok());
                    match units.and_then(|u| {
                        pricing::per_unit_cost(u.trim(), per_unit.price)
                            .ok()
                            .map(|c| (u.trim(), c))
                    }) {
                        Some((units, cost)) => CostRule::Fixed {
                            cost: pricing::add(pricing.flat, cost),
                            units: Some(units.to_string()),
                        },
                        None => CostRule::Unknown { flat: pricing.flat },
                    }
                }
            },
        }
    }
}

enum Reader {
    Nothing,
    Json {
        chunks: Vec<Bytes>,
        len: usize,
    },
    Sse(StreamMeter),
    /// In an encoding the meter cannot decode (or that failed to decode): no usage to read.
    Unreadable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The body reached its end and the client had it all.
    Complete,
    /// The client left; the upstream was read on (within bounds) for its usage.
    ClientGone,
    /// The upstream broke the body off.
    UpstreamBroke,
}

/// Everything needed to charge a successful response once its usage is known.
pub struct Metering {
    billing: Billing,
    rule: CostRule,
    reader: Reader,
    /// Undoes the upstream's `Content-Encoding`, so the meter reads what the client will.
    decoder: Option<Decoder>,
    policy: StreamPolicy,
    drain_timeout: Duration,
    drain_max_bytes: u64,
    status: u16,
}

impl Metering {
    /// `encoding` is the response's `Content-Encoding`; one the meter cannot decode leaves the
    /// usage unread, for the stream policy to decide.
    pub fn new(
        billing: Billing,
        rule: CostRule,
        pricing: &Pricing,
        status: u16,
        is_sse: bool,
        encoding: Option<&str>,
    ) -> Metering {
        let mut reader = match &rule {
            CostRule::Tokens { api, .. } if is_sse => Reader::Sse(StreamMeter::new(*api)),
            CostRule::Tokens { .. } | CostRule::JsonUnits { .. } => Reader::Json {
                chunks: Vec::new(),
                len: 0,
            },
            CostRule::Fixed { .. } | CostRule::Unknown { .. } => Reader::Nothing,
        };
        let decoder = match (&reader, encoding) {
            (Reader::Nothing, _) | (_, None) => None,
            (_, Some(encoding)) => {
                let decoder = Decoder::for_encoding(encoding);
                if decoder.is_none() {
                    tracing::warn!(
                        encoding,
                        "cannot decode the upstream's response to meter it"
                    );
                    reader = Reader::Unreadable;
                }
                decoder
            }
        };
        Metering {
            billing,
            rule,
            reader,
            decoder,
            policy: pricing.stream_policy,
            drain_timeout: pricing.drain_timeout,
            drain_max_bytes: pricing.drain_max_bytes,
            status,
        }
    }

    fn observe(&mut self, data: &Bytes) {
        let decoded;
        let data = match &mut self.decoder {
            None => data,
            Some(decoder) => match decoder.feed(data) {
                Ok(bytes) => {
                    decoded = bytes;
                    &decoded
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the upstream's response does not decode");
                    self.decoder = None;
                    self.reader = Reader::Unreadable;
                    return;
                }
            },
        };
        match &mut self.reader {
            Reader::Nothing | Reader::Unreadable => {}
            Reader::Sse(meter) => meter.feed(data),
            Reader::Json { chunks, len } => {
                *len += data.len();
                if *len <= MAX_METERED_JSON_BYTES {
                    chunks.push(data.clone());
                } else {
                    chunks.clear();
                }
            }
        }
    }

    /// Whether the usage is known without reading further.
    fn usage_known(&self) -> bool {
        match &self.reader {
            Reader::Nothing => true,
            Reader::Sse(meter) => meter.usage().is_some(),
            Reader::Json { .. } | Reader::Unreadable => false,
        }
    }

    /// Whether the upstream itself reported the usage, in a stream's final usage event: a body
    /// broken off after that still delivered its usage.
    fn usage_reported(&self) -> bool {
        matches!(&self.reader, Reader::Sse(meter) if meter.usage().is_some())
    }

    /// The JSON body read, within the size the meter parses; borrowed when it came in one piece.
    fn json_bytes(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        match &self.reader {
            Reader::Json { chunks, len } if *len <= MAX_METERED_JSON_BYTES => {
                Some(match chunks.as_slice() {
                    [only] => std::borrow::Cow::Borrowed(&only[..]),
                    _ => std::borrow::Cow::Owned(chunks.concat()),
                })
            }
            _ => None,
        }
    }

    fn json_body(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.json_bytes()?).ok()
    }

    fn finish(self, ending: Ending) {
        let reported = if ending == Ending::Complete {
            BillingStatus::Settled
        } else {
            BillingStatus::Partial
        };
        // (cost, tokens, units) from what the upstream reported, if it did.
        let (measured, estimate) = match &self.rule {
            CostRule::Fixed { cost, units } => (Some((*cost, None, units.clone())), None),
            CostRule::Unknown { flat } => (None, Some((*flat, None, None))),
            CostRule::Tokens {
                api,
                prices,
                flat,
                input_estimate,
            } => {
                let (usage, body) = match &self.reader {
                    Reader::Sse(meter) => (meter.usage(), None),
                    _ => {
                        let bytes = self.json_bytes();
                        match bytes.as_deref().and_then(|b| usage_alone(*api, b)) {
                            Some(usage) => (Some(usage), None),
                            // Without usage in view, the whole body: the usage it may still hold
                            // (a body the shallow read refused), else the text to estimate from.
                            None => {
                                let body: Option<serde_json::Value> =
                                    bytes.and_then(|b| serde_json::from_slice(&b).ok());
                                let usage = body.as_ref().and_then(|b| api.usage_from_json(b));
                                (usage, body)
                            }
                        }
                    }
                };
                let estimate = match &self.reader {
                    Reader::Sse(meter) => meter.estimate(*input_estimate),
                    _ => TokenUsage {
                        input: *input_estimate,
                        cached_input: 0,
                        output: body.as_ref().map_or(0, |b| api.output_chars(b).div_ceil(4)),
                    },
                };
                let cost = |u: &TokenUsage| pricing::add(*flat, prices.cost(u));
                (
                    usage.map(|u| (cost(&u), Some(u), None)),
                    Some((cost(&estimate), Some(estimate), None)),
                )
            }
            CostRule::JsonUnits {
                pointer,
                unit_price,
                flat,
            } => {
                let units = self
                    .json_body()
                    .and_then(|body| body.pointer(pointer).and_then(units_text));
                let measured = units.and_then(|units| {
                    let cost = pricing::per_unit_cost(&units, *unit_price).ok()?;
                    Some((pricing::add(*flat, cost), None, Some(units)))
                });
                (measured, Some((*flat, None, None)))
            }
        };
        let (charge, tokens, units) = match (ending, measured) {
            // A body the upstream broke off is a failed call, unless its usage had arrived:
            // a flat price or a header's units do not make a broken body a success.
            (Ending::UpstreamBroke, Some(m)) if self.usage_reported() => {
                (Some((m.0, reported)), m.1, m.2)
            }
            (Ending::UpstreamBroke, _) => (None, None, None),
            (_, Some((cost, tokens, units))) => (Some((cost, reported)), tokens, units),
            (_, None) => match (self.policy, estimate) {
                (StreamPolicy::Estimate, Some((cost, tokens, units))) => {
                    (Some((cost, BillingStatus::Estimated)), tokens, units)
                }
                _ => (None, None, None),
            },
        };
        let status = if ending == Ending::ClientGone {
            CLIENT_CLOSED_REQUEST
        } else {
            self.status
        };
        self.billing.finish(Outcome {
            status,
            upstream_status: Some(self.status),
            charge,
            tokens,
            units,
            error_code: None,
            error_message: None,
        });
    }
}

/// The usage a JSON answer reports, read from its top-level `usage` member alone: serde skips the
/// rest of the body without building it.
fn usage_alone(api: LlmApi, body: &[u8]) -> Option<TokenUsage> {
    #[derive(serde::Deserialize)]
    struct UsageOnly {
        usage: Option<serde_json::Value>,
    }
    let usage = serde_json::from_slice::<UsageOnly>(body).ok()?.usage?;
    api.usage_from_object(&usage)
}

/// A units value: a JSON number or a decimal string.
fn units_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The upstream's body on its way to the client, metered as it passes.
///
/// A task of its own reads the upstream and meters what it reads, up to the route's
/// `drain_max_bytes` ahead of what the client has taken: a client that reads slowly (or stops
/// reading) cannot keep the usage from the meter until its hold's deadline has passed. When the
/// client leaves, the task reads on for the usage within the route's bounds, then settles.
pub struct MeteredBody {
    frames: mpsc::UnboundedReceiver<Result<Frame<Bytes>, hyper::Error>>,
    /// What the channel gave before the response was returned (see [`MeteredBody::start`]).
    first: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
    /// Bytes read ahead of the client: taken by the reader, given back as the client takes them.
    ahead: Arc<Semaphore>,
    budget: usize,
    size_hint: SizeHint,
    /// Set when the client did not ask for the usage chunk Tollgate asked the upstream for.
    filter: Option<UsageChunkFilter>,
    ended: bool,
    /// Told when the client has taken the last frame (or left): see [`TAKEN_WAIT`].
    taken: Option<oneshot::Sender<()>>,
}

/// After the upstream's body ends, how long the meter waits for the client to take the last of
/// it before settling. An answer is charged once it is on its way to the client, not while
/// Tollgate still holds its end (a node that died then would have charged a call its client saw
/// fail); a client that reads slowly delays its charge by this at most.
const TAKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl MeteredBody {
    /// `hide_usage_chunk`: the meter reads the OpenAI stream's usage-only chunk, but the client,
    /// which did not ask for it, does not get it.
    ///
    /// An answer of a known length is returned with its first bytes in hand, so the response's
    /// head and body leave in one write (one packet, one wake-up of the client) instead of two.
    /// A stream, or any answer without a length, is returned at once: its head goes out while
    /// the upstream is still producing the body.
    pub async fn start(inner: Incoming, metering: Metering, hide_usage_chunk: bool) -> MeteredBody {
        let sized = inner.size_hint().exact().is_some_and(|length| length > 0);
        let mut body = MeteredBody::new(inner, metering, hide_usage_chunk);
        if sized && body.filter.is_none() {
            body.first = Some(body.frames.recv().await);
        }
        body
    }

    fn new(inner: Incoming, metering: Metering, hide_usage_chunk: bool) -> MeteredBody {
        let size_hint = inner.size_hint();
        let (sender, frames) = mpsc::unbounded_channel();
        let (taken, taken_seen) = oneshot::channel();
        let budget = usize::try_from(metering.drain_max_bytes)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        let ahead = Arc::new(Semaphore::new(budget));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(read_upstream(
                    inner,
                    metering,
                    sender,
                    ahead.clone(),
                    budget,
                    taken_seen,
                ));
            }
            // Only outside a runtime, where nothing can be read: the answer is not delivered.
            Err(_) => metering.finish(Ending::UpstreamBroke),
        }
        MeteredBody {
            frames,
            first: None,
            ahead,
            budget,
            size_hint,
            filter: hide_usage_chunk.then(UsageChunkFilter::default),
            ended: false,
            taken: Some(taken),
        }
    }
}

/// How many read-ahead bytes a frame takes (at least one, so empty frames count too).
fn budget_of(frame: &Frame<Bytes>, budget: usize) -> usize {
    frame
        .data_ref()
        .map_or(1, |data| data.len().max(1))
        .min(budget)
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let next = match this.first.take() {
                Some(next) => next,
                None => ready!(this.frames.poll_recv(cx)),
            };
            let frame = match next {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    // What a filter still held when the upstream ended goes out last.
                    this.ended = true;
                    if let Some(taken) = this.taken.take() {
                        let _ = taken.send(());
                    }
                    let rest = this.filter.as_mut().map(UsageChunkFilter::finish);
                    return Poll::Ready(rest.filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))));
                }
            };
            this.ahead.add_permits(budget_of(&frame, this.budget));
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            };
            let Some(filter) = this.filter.as_mut() else {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            };
            let out = filter.pass(&data);
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match &self.filter {
            // Filtering changes the length.
            Some(_) => SizeHint::default(),
            None => self.size_hint,
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // The client is gone: a reader waiting for read-ahead room must not wait for ever.
        self.ahead.close();
        if let Some(taken) = self.taken.take() {
            let _ = taken.send(());
        }
    }
}

/// Reads the upstream's body for the client and the meter. While the client is there, each
/// frame goes to it, at most `budget` bytes ahead of what it has taken; once it is gone (or
/// stops taking), the reader reads on for the usage within the route's drain bounds. The meter
/// settles as soon as the body ends or the usage is known, whatever pace the client reads at.
async fn read_upstream(
    mut inner: Incoming,
    mut metering: Metering,
    frames: mpsc::UnboundedSender<Result<Frame<Bytes>, hyper::Error>>,
    ahead: Arc<Semaphore>,
    budget: usize,
    taken: oneshot::Receiver<()>,
) {
    // Set once the client is gone: when to stop reading for the usage, and how much was read.
    let mut draining: Option<(tokio::time::Instant, u64)> = None;
    let ending = loop {
        if draining.is_some() && metering.usage_known() {
            break Ending::ClientGone;
        }
        let next = match draining {
            None => inner.frame().await,
            Some((deadline, _)) => match tokio::time::timeout_at(deadline, inner.frame()).await {
                Ok(next) => next,
                Err(_) => break Ending::ClientGone,
            },
        };
        let frame = match next {
            None if draining.is_some() => break Ending::ClientGone,
            None => break Ending::Complete,
            Some(Err(e)) => {
                let _ = frames.send(Err(e));
                break Ending::UpstreamBroke;
            }
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            metering.observe(data);
        }
        match &mut draining {
            Some((_, read)) => {
                *read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if *read > metering.drain_max_bytes {
                    break Ending::ClientGone;
                }
            }
            None => {
                let room = u32::try_from(budget_of(&frame, budget)).unwrap_or(u32::MAX);
                let delivered = match ahead.acquire_many(room).await {
                    Ok(permits) => {
                        permits.forget();
                        frames.send(Ok(frame)).is_ok()
                    }
                    Err(_) => false,
                };
                if !delivered {
                    // The client left before the usage: read on for it, within the bounds.
                    draining = Some((tokio::time::Instant::now() + metering.drain_timeout, 0));
                }
            }
        }
    };
    if matches!(ending, Ending::Complete) {
        // Closing the channel is how the client's side learns the body has ended: a body without
        // a length (chunked, SSE) is not over for the client until then, and only then is the
        // last frame taken.
        drop(frames);
        let _ = tokio::time::timeout(TAKEN_WAIT, taken).await;
    }
    metering.finish(ending);
}

/// Drops OpenAI's usage-only chunk (`"choices": []` with a `usage` object) from an SSE stream,
/// passing every other event through as it completes. Only whole events are judged, so an
/// event split across frames waits for its end; nothing else is held back.
#[derive(Default)]
struct UsageChunkFilter {
    pending: Vec<u8>,
}

impl UsageChunkFilter {
    /// Takes the next bytes; returns the complete events among what is pending, less the usage
    /// chunk.
    fn pass(&mut self, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut start = 0;
        while let Some(end) = event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            if !is_usage_chunk(event) {
                out.extend_from_slice(event);
            }
            start += end;
        }
        self.pending.drain(..start);
        out
    }

    /// What is left when the stream ends (an event without its blank line), as it is.
    fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }
}

/// The length of the first complete event in `bytes`, blank line included.
fn event_end(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'\n', b'\n') => return Some(i + 2),
            (b'\n', b'\r') if bytes.get(i + 2) == Some(&b'\n') => return Some(i + 3),
            _ => i += 1,
        }
    }
    None
}

fn is_usage_chunk(event: &[u8]) -> bool {
    let text = String::from_utf8_lossy(event);
    let data: String = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|value| value.strip_prefix(' ').unwrap_or(value))
        .collect::<Vec<_>>()
        .join("\n");
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&data) else {
        return false;
    };
    value.get("usage").is_some_and(serde_json::Value::is_object)
        && value
            .get("choices")
            .and_then(serde_json::Value::as_array)
            .is_some_and(Vec::is_empty)
}

/// Decodes a response body in its `Content-Encoding` as it passes, for the meter alone.
enum Decoder {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
    Identity,
}

impl Decoder {
    /// The decoder for a `Content-Encoding` value; `None` for one the meter cannot read (or a
    /// chain of several).
    fn for_encoding(encoding: &str) -> Option<Decoder> {
        Some(match encoding.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Decoder::Gzip(flate2::write::GzDecoder::new(Vec::new())),
            "deflate" => Decoder::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
            "br" => Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))),
            "zstd" => Decoder::Zstd(zstd::stream::write::Decoder::new(Vec::new()).ok()?),
            "identity" | "" => Decoder::Identity,
            _ => return None,
        })
    }

    /// Feeds compressed bytes; returns what they decoded to so far.
    fn feed(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        /// Writes into a decoder whose output is a `Vec`, and takes what came out.
        fn through<W: std::io::Write>(
            decoder: &mut W,
            data: &[u8],
            output: fn(&mut W) -> &mut Vec<u8>,
        ) -> std::io::Result<Bytes> {
            decoder.write_all(data)?;
            decoder.flush()?;
            Ok(Bytes::from(std::mem::take(output(decoder))))
        }
        match self {
            Decoder::Gzip(d) => through(d, data, |d| d.get_mut()),
            Decoder::Deflate(d) => through(d, data, |d| d.get_mut()),
            Decoder::Brotli(d) => through(d.as_mut(), data, |d| d.get_mut()),
            Decoder::Zstd(d) => through(d, data, |d| d.get_mut()),
            Decoder::Identity => Ok(Bytes::copy_from_slice(data)),
        }
    }
}

/// The usage row as far as it is known once the key is.
pub(crate) fn usage_row(
    request: &http::request::Parts,
    key: &KeyRecord,
    route: &str,
    now: DateTime<Utc>,
) -> UsageRow {
    UsageRow {
        request_id: request
            .extensions
            .get::<RequestId>()
            .copied()
            .unwrap_or_default(),
        client_request_id: request
            .extensions
            .get::<ClientRequestId>()
            .map(|c| c.0.clone()),
        account_id: key.account_id,
        key_id: key.id,
        route: route.to_string(),
        model: None,
        method: request.method.to_string(),
        path: request.uri.path().to_string(),
        status: 0,
        upstream_status: None,
        units: None,
        tokens: None,
        cost: Nanos::ZERO,
        hold: Nanos::ZERO,
        uncovered: Nanos::ZERO,
        hold_id: None,
        billing_status: BillingStatus::Released,
        latency_ms: 0,
        error_code: None,
        error_message: None,
        replay_of: None,
        created_at: now,
        completed_at: now,
    }
}
