//! The billing systems usage is exported to, each spoken in its own API: how a batch of records
//! is sent and what each answer means, and how the totals a sink holds are read back for
//! `tollgate export verify`.
//!
//! Every record carries an id derived from its request ID, so a re-sent record is recognised
//! and dropped by the sink; a sink's "already exists" is a delivery. A refusal of one record is
//! a verdict on that record (a dead letter); an outage, a refused key or a throttle is an error
//! for the whole batch, which is sent again later.
//!
//! Sink URLs come from the operator's config, never from a customer, so they are reached
//! directly (no SSRF guard; that is for accounts' webhook endpoints).

use crate::config::{Meter, SinkKind, SinkSettings};
use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tollgate_core::clock::rfc3339;
use tollgate_core::money::NANOS_PER_CREDIT;
use tollgate_core::webhook::{signature_header, WebhookSecret};
use tollgate_store::{DayTotal, ExportRecord};

/// The most of a sink's answer that is read.
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// Stripe takes one meter event per call: this many calls are in flight at once.
const STRIPE_CALLS_AT_ONCE: usize = 8;

/// A record on its way, with the customer it is billed to.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub record: &'a ExportRecord,
    pub customer: &'a str,
}

/// What the sink made of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Taken now, or taken before ("already exists").
    Delivered,
    /// Older than the sink takes.
    TooOld(String),
    /// Refused as it is.
    Rejected(String),
}

/// Why a batch got no verdict: nothing is known to have been taken; send it again later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    #[error("the sink did not answer: {0}")]
    Unreachable(String),
    #[error("the sink answered {status}: {body}")]
    Failed { status: u16, body: String },
    #[error("the sink's answer could not be read: {0}")]
    Unreadable(String),
    #[error("{0}")]
    Unsupported(String),
}

/// A meter's value for one record, as the exact decimal string sinks receive ("0", never
/// empty): credits for cost, a count otherwise.
pub fn meter_value(record: &ExportRecord, meter: Meter) -> String {
    match meter {
        Meter::Cost => record.cost.to_string(),
        other => count_of(record, other).to_string(),
    }
}

fn count_of(record: &ExportRecord, meter: Meter) -> u64 {
    match meter {
        Meter::Requests => 1,
        Meter::Cost => 0,
        Meter::InputTokens => record.input_tokens,
        Meter::CachedInputTokens => record.cached_input_tokens,
        Meter::OutputTokens => record.output_tokens,
    }
}

/// A meter's value in billionths: exact for every value Tollgate sends (cost has nine
/// decimals at most), so totals compare without rounding.
pub fn scaled(record: &ExportRecord, meter: Meter) -> i128 {
    match meter {
        Meter::Cost => i128::from(record.cost.0),
        other => i128::from(count_of(record, other)) * i128::from(NANOS_PER_CREDIT),
    }
}

/// A day's total of a meter in billionths, as [`scaled`] sums over the day's records.
pub fn day_scaled(total: &DayTotal, meter: Meter) -> i128 {
    let count = match meter {
        Meter::Cost => return i128::from(total.cost.0),
        Meter::Requests => total.requests,
        Meter::InputTokens => total.input_tokens,
        Meter::CachedInputTokens => total.cached_input_tokens,
        Meter::OutputTokens => total.output_tokens,
    };
    i128::from(count) * i128::from(NANOS_PER_CREDIT)
}

/// A decimal string in billionths; `None` if it is not one or has more than nine decimals.
pub fn parse_scaled(text: &str) -> Option<i128> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let numeric = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !numeric(whole) || !numeric(fraction) || fraction.len() > 9 {
        return None;
    }
    let whole: i128 = whole.parse().ok()?;
    let fraction: i128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<i128>().ok()? * 10_i128.pow(9 - fraction.len() as u32)
    };
    let value = whole.checked_mul(i128::from(NANOS_PER_CREDIT))? + fraction;
    Some(if negative { -value } else { value })
}

/// A number a sink sums in floating point (Stripe, OpenMeter), in billionths, to the nearest.
fn float_scaled(value: f64) -> i128 {
    (value * NANOS_PER_CREDIT as f64).round() as i128
}

/// Billionths as a decimal string.
pub fn render_scaled(value: i128) -> String {
    let sign = if value < 0 { "-" } else { "" };
    let abs = value.unsigned_abs();
    let scale = NANOS_PER_CREDIT as u128;
    let (whole, fraction) = (abs / scale, abs % scale);
    if fraction == 0 {
        format!("{sign}{whole}")
    } else {
        let digits = format!("{fraction:09}");
        format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// What a sink holds, summed per (customer, meter, UTC day), in billionths.
pub type SinkTotals = BTreeMap<(String, Meter, DateTime<Utc>), i128>;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct SinkClient {
    settings: SinkSettings,
    http: HttpClient,
}

impl SinkClient {
    pub fn new(settings: SinkSettings) -> SinkClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        SinkClient {
            settings,
            http: Client::builder(TokioExecutor::new()).build(https),
        }
    }

    pub fn settings(&self) -> &SinkSettings {
        &self.settings
    }

    /// Sends a batch; a verdict per record, in order.
    pub async fn send(&self, batch: &[Outgoing<'_>]) -> Result<Vec<Verdict>, SinkError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match self.settings.kind {
            SinkKind::Stripe => self.send_stripe(batch).await,
            SinkKind::Lago => self.send_lago(batch).await,
            SinkKind::OpenMeter | SinkKind::Webhook => self.send_cloudevents(batch).await,
        }
    }

    /// What the sink holds for these customers, per meter and day, for `[from, to)`.
    pub async fn totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customers: &[String],
    ) -> Result<SinkTotals, SinkError> {
        match self.settings.kind {
            SinkKind::Stripe => self.stripe_totals(from, to, customers).await,
            SinkKind::OpenMeter => self.openmeter_totals(from, to).await,
            SinkKind::Lago => self.lago_totals(from, to, customers).await,
            SinkKind::Webhook => self.webhook_totals(from, to).await,
        }
    }

    fn secret(&self) -> &str {
        self.settings.secret.as_ref().map_or("", |s| s.0.as_str())
    }

    fn meter_named(&self, name: &str) -> Option<Meter> {
        self.settings
            .meters
            .iter()
            .find(|(_, n)| n == name)
            .map(|(m, _)| *m)
    }

    async fn exchange(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), SinkError> {
        let timeout = self.settings.timeout;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| SinkError::Unreachable(e.to_string()))?;
            let status = response.status().as_u16();
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| SinkError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| SinkError::Unreachable(format!("no answer within {timeout:?}")))?
    }

    async fn get_json(&self, url: String) -> Result<Value, SinkError> {
        let request = http::Request::get(url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.secret()),
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| SinkError::Unreachable(e.to_string()))?;
        let (status, body) = self.exchange(request).await?;
        if !(200..300).contains(&status) {
            return Err(failed(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| SinkError::Unreadable(e.to_string()))
    }

    // Stripe: one form-encoded meter event per record and meter, identified by
    // `<request id>-<meter>`.

    async fn send_stripe(&self, batch: &[Outgoing<'_>]) -> Result<Vec<Verdict>, SinkError> {
        let calls: Vec<(usize, Meter, &str)> = (0..batch.len())
            .flat_map(|i| {
                self.settings
                    .meters
                    .iter()
                    .map(move |(meter, name)| (i, *meter, name.as_str()))
            })
            .collect();
        let mut answers = Vec::with_capacity(calls.len());
        for wave in calls.chunks(STRIPE_CALLS_AT_ONCE) {
            let sent = futures_util::future::join_all(
                wave.iter()
                    .map(|&(i, meter, name)| self.stripe_event(batch[i], meter, name)),
            )
            .await;
            answers.extend(wave.iter().map(|(i, ..)| *i).zip(sent));
        }
        let mut verdicts = vec![Verdict::Delivered; batch.len()];
        for (i, answer) in answers {
            let verdict = answer?;
            if verdicts[i] == Verdict::Delivered {
                verdicts[i] = verdict;
            }
        }
        Ok(verdicts)
    }

    async fn stripe_event(
        &self,
        out: Outgoing<'_>,
        meter: Meter,
        name: &str,
    ) -> Result<Verdict, SinkError> {
        let identifier = format!("{}-{}", out.record.request_id, meter.as_str());
        let timestamp = out.record.at.timestamp().to_string();
        let value = meter_value(out.record, meter);
        let form = [
            ("event_name", name),
            ("identifier", identifier.as_str()),
            ("timestamp", timestamp.as_str()),
            ("payload[stripe_customer_id]", out.customer),
            ("payload[value]", value.as_str()),
        ];
        let body =
            serde_urlencoded::to_string(form).map_err(|e| SinkError::Unreadable(e.to_string()))?;
        let request = http::Request::post(format!("{}/v1/billing/meter_events", self.settings.url))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.secret()),
            )
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header("idempotency-key", &identifier)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SinkError::Unreachable(e.to_string()))?;
        let (status, body) = self.exchange(request).await?;
        if (200..300).contains(&status) {
            return Ok(Verdict::Delivered);
        }
        let error: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let error = &error["error"];
        let code = error["code"].as_str().unwrap_or("");
        let message = error["message"].as_str().unwrap_or("").to_string();
        if status == 400 && (code.contains("already_exists") || code.contains("duplicate")) {
            return Ok(Verdict::Delivered);
        }
        if status == 400 && error["param"].as_str() == Some("timestamp") {
            return Ok(Verdict::TooOld(format!("Stripe: {message}")));
        }
        if matches!(status, 400 | 404 | 422) {
            return Ok(Verdict::Rejected(format!(
                "Stripe {status} {code}: {message}"
            )));
        }
        Err(failed(status, &body))
    }

    async fn stripe_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customers: &[String],
    ) -> Result<SinkTotals, SinkError> {
        let meters = self
            .get_json(format!("{}/v1/billing/meters?limit=100", self.settings.url))
            .await?;
        let mut totals = SinkTotals::new();
        for (meter, name) in &self.settings.meters {
            let id = meters["data"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["event_name"].as_str() == Some(name))
                .and_then(|m| m["id"].as_str())
                .ok_or_else(|| {
                    SinkError::Unsupported(format!(
                        "Stripe has no meter for the event name '{name}'"
                    ))
                })?;
            for customer in customers {
                let mut after: Option<String> = None;
                loop {
                    let mut query = vec![
                        ("customer", customer.clone()),
                        ("start_time", from.timestamp().to_string()),
                        ("end_time", to.timestamp().to_string()),
                        ("value_grouping_window", "day".to_string()),
                        ("limit", "100".to_string()),
                    ];
                    if let Some(after) = &after {
                        query.push(("starting_after", after.clone()));
                    }
                    let query = serde_urlencoded::to_string(&query)
                        .map_err(|e| SinkError::Unreadable(e.to_string()))?;
                    let page = self
                        .get_json(format!(
                            "{}/v1/billing/meters/{id}/event_summaries?{query}",
                            self.settings.url
                        ))
                        .await?;
                    let rows = page["data"].as_array().cloned().unwrap_or_default();
                    for row in &rows {
                        let day = row["start_time"]
                            .as_i64()
                            .and_then(|t| DateTime::from_timestamp(t, 0))
                            .ok_or_else(|| unreadable("a summary without start_time"))?;
                        let value = row["aggregated_value"]
                            .as_f64()
                            .ok_or_else(|| unreadable("a summary without aggregated_value"))?;
                        *totals.entry((customer.clone(), *meter, day)).or_default() +=
                            float_scaled(value);
                    }
                    after = rows.last().and_then(|r| r["id"].as_str()).map(String::from);
                    if !page["has_more"].as_bool().unwrap_or(false) || after.is_none() {
                        break;
                    }
                }
            }
        }
        Ok(totals)
    }

    // Lago: batches of events, one per record and meter (billable metric code), identified by
    // the `transaction_id` `<request id>-<meter>`.

    async fn send_lago(&self, batch: &[Outgoing<'_>]) -> Result<Vec<Verdict>, SinkError> {
        let mut events: Vec<(usize, Value)> = Vec::new();
        for (i, out) in batch.iter().enumerate() {
            for (meter, code) in &self.settings.meters {
                events.push((
                    i,
                    json!({
                        "transaction_id": format!("{}-{}", out.record.request_id, meter.as_str()),
                        "external_subscription_id": out.customer,
                        "code": code,
                        "timestamp": out.record.at.timestamp_millis() as f64 / 1000.0,
                        "properties": { "value": meter_value(out.record, *meter) },
                    }),
                ));
            }
        }
        let mut verdicts = vec![Verdict::Delivered; batch.len()];
        // Lago validates a batch as a whole: a batch with a bad event takes none. Each answer
        // names the bad events by position; duplicates are delivered, the others refused, and
        // the rest is sent again without them.
        let mut pending = events;
        while !pending.is_empty() {
            let body = json!({ "events": pending.iter().map(|(_, e)| e).collect::<Vec<_>>() });
            let request = http::Request::post(format!("{}/api/v1/events/batch", self.settings.url))
                .header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", self.secret()),
                )
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| SinkError::Unreachable(e.to_string()))?;
            let (status, answer) = self.exchange(request).await?;
            if (200..300).contains(&status) {
                break;
            }
            if status != 422 {
                return Err(failed(status, &answer));
            }
            let answer: Value = serde_json::from_slice(&answer)
                .map_err(|e| SinkError::Unreadable(e.to_string()))?;
            let details = answer["error_details"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if details.is_empty() {
                return Err(failed(status, answer.to_string().as_bytes()));
            }
            let mut kept = Vec::new();
            for (n, (i, event)) in pending.into_iter().enumerate() {
                match details.get(&n.to_string()) {
                    None => kept.push((i, event)),
                    Some(problem) if only_duplicate(problem) => {}
                    Some(problem) => verdicts[i] = Verdict::Rejected(format!("Lago: {problem}")),
                }
            }
            // A record with a refused event is a dead letter as a whole: its other events are
            // not sent apart from it.
            kept.retain(|(i, _)| verdicts[*i] == Verdict::Delivered);
            pending = kept;
        }
        Ok(verdicts)
    }

    async fn lago_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customers: &[String],
    ) -> Result<SinkTotals, SinkError> {
        let mut totals = SinkTotals::new();
        for customer in customers {
            let mut page = 1;
            loop {
                let query = serde_urlencoded::to_string([
                    ("external_subscription_id", customer.clone()),
                    ("timestamp_from", rfc3339(from)),
                    ("timestamp_to", rfc3339(to)),
                    ("page", page.to_string()),
                    ("per_page", "100".to_string()),
                ])
                .map_err(|e| SinkError::Unreadable(e.to_string()))?;
                let answer = self
                    .get_json(format!("{}/api/v1/events?{query}", self.settings.url))
                    .await?;
                for event in answer["events"].as_array().into_iter().flatten() {
                    let Some(meter) = event["code"].as_str().and_then(|c| self.meter_named(c))
                    else {
                        continue;
                    };
                    let at = event["timestamp"]
                        .as_str()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        .ok_or_else(|| unreadable("an event without a timestamp"))?;
                    let value = event["properties"]["value"]
                        .as_str()
                        .and_then(parse_scaled)
                        .ok_or_else(|| unreadable("an event whose value is not a decimal"))?;
                    *totals
                        .entry((customer.clone(), meter, day_of(at.to_utc())))
                        .or_default() += value;
                }
                match answer["meta"]["next_page"].as_u64() {
                    Some(next) if next > page => page = next,
                    _ => break,
                }
            }
        }
        Ok(totals)
    }

    // OpenMeter and the webhook sink: a CloudEvents batch, one event per record (id: the
    // request ID) with each meter's value under its name in `data`. The webhook sink's batch is
    // signed as Standard Webhooks are, with an id derived from the records it carries.

    async fn send_cloudevents(&self, batch: &[Outgoing<'_>]) -> Result<Vec<Verdict>, SinkError> {
        match self.post_cloudevents(batch).await? {
            None => Ok(vec![Verdict::Delivered; batch.len()]),
            // A refused batch of one is that record's verdict; a larger one is split until
            // the refused records are found.
            Some(reason) if batch.len() == 1 => Ok(vec![Verdict::Rejected(reason)]),
            Some(_) => {
                let (left, right) = batch.split_at(batch.len() / 2);
                let mut verdicts = Box::pin(self.send_cloudevents(left)).await?;
                verdicts.extend(Box::pin(self.send_cloudevents(right)).await?);
                Ok(verdicts)
            }
        }
    }

    /// `None`: taken; `Some(why)`: refused as it is.
    async fn post_cloudevents(&self, batch: &[Outgoing<'_>]) -> Result<Option<String>, SinkError> {
        let events: Vec<Value> = batch.iter().map(|out| self.cloudevent(out)).collect();
        let body = Value::Array(events).to_string();
        let mut request = http::Request::post(match self.settings.kind {
            SinkKind::OpenMeter => format!("{}/api/v1/events", self.settings.url),
            _ => self.settings.url.clone(),
        })
        .header(
            http::header::CONTENT_TYPE,
            "application/cloudevents-batch+json",
        );
        if self.settings.kind == SinkKind::Webhook {
            let secret = WebhookSecret::parse(self.secret())
                .map_err(|_| SinkError::Unsupported("the sink's secret is not whsec_".into()))?;
            let id = batch_id(batch);
            let timestamp = Utc::now().timestamp();
            let signature = signature_header(&[&secret], &id, timestamp, body.as_bytes());
            request = request
                .header(http::header::USER_AGENT, "Tollgate-Export/1")
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature);
        } else {
            request = request.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.secret()),
            );
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SinkError::Unreachable(e.to_string()))?;
        let (status, answer) = self.exchange(request).await?;
        match status {
            200..=299 | 409 => Ok(None),
            400 | 413 | 422 => Ok(Some(format!(
                "{} {status}: {}",
                self.settings.kind.as_str(),
                String::from_utf8_lossy(&answer)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ))),
            _ => Err(failed(status, &answer)),
        }
    }

    fn cloudevent(&self, out: &Outgoing<'_>) -> Value {
        let record = out.record;
        let mut data = serde_json::Map::new();
        for (meter, name) in &self.settings.meters {
            let key = match self.settings.kind {
                SinkKind::OpenMeter => meter.as_str(),
                _ => name.as_str(),
            };
            data.insert(key.to_string(), Value::String(meter_value(record, *meter)));
        }
        data.insert("account".into(), json!(record.account.to_string()));
        data.insert("key".into(), json!(record.key.to_string()));
        data.insert("route".into(), json!(record.route));
        data.insert(
            "model".into(),
            json!(record.model.clone().unwrap_or_default()),
        );
        data.insert("billing_status".into(), json!(record.status.as_str()));
        json!({
            "specversion": "1.0",
            "id": record.request_id.to_string(),
            "source": self.settings.source,
            "type": self.settings.event_type,
            "subject": out.customer,
            "time": rfc3339(record.at),
            "datacontenttype": "application/json",
            "data": data,
        })
    }

    async fn openmeter_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<SinkTotals, SinkError> {
        let mut totals = SinkTotals::new();
        for (meter, slug) in &self.settings.meters {
            let query = serde_urlencoded::to_string([
                ("from", rfc3339(from)),
                ("to", rfc3339(to)),
                ("windowSize", "DAY".to_string()),
                ("windowTimeZone", "UTC".to_string()),
                ("groupBy", "subject".to_string()),
            ])
            .map_err(|e| SinkError::Unreadable(e.to_string()))?;
            let answer = self
                .get_json(format!(
                    "{}/api/v1/meters/{slug}/query?{query}",
                    self.settings.url
                ))
                .await?;
            for row in answer["data"].as_array().into_iter().flatten() {
                let subject = row["subject"]
                    .as_str()
                    .ok_or_else(|| unreadable("a row without a subject"))?;
                let day = row["windowStart"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .ok_or_else(|| unreadable("a row without windowStart"))?;
                let value = row["value"]
                    .as_f64()
                    .ok_or_else(|| unreadable("a row without a value"))?;
                *totals
                    .entry((subject.to_string(), *meter, day.to_utc()))
                    .or_default() += float_scaled(value);
            }
        }
        Ok(totals)
    }

    async fn webhook_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<SinkTotals, SinkError> {
        let Some(url) = &self.settings.totals_url else {
            return Err(SinkError::Unsupported(format!(
                "sink '{}' has no totals_url: a webhook sink can be verified only if its \
                 receiver serves its totals",
                self.settings.name
            )));
        };
        let query = serde_urlencoded::to_string([("from", rfc3339(from)), ("to", rfc3339(to))])
            .map_err(|e| SinkError::Unreadable(e.to_string()))?;
        let answer = self.get_json(format!("{url}?{query}")).await?;
        let mut totals = SinkTotals::new();
        for row in answer.as_array().into_iter().flatten() {
            let (Some(subject), Some(meter), Some(day), Some(value)) = (
                row["subject"].as_str(),
                row["meter"].as_str().and_then(|m| self.meter_named(m)),
                row["day"]
                    .as_str()
                    .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()),
                row["value"].as_str().and_then(parse_scaled),
            ) else {
                return Err(unreadable(
                    "a totals row needs subject, meter, day (YYYY-MM-DD) and value (a decimal string)",
                ));
            };
            let day = day.and_time(chrono::NaiveTime::MIN).and_utc();
            *totals.entry((subject.to_string(), meter, day)).or_default() += value;
        }
        Ok(totals)
    }
}

/// Midnight UTC of the day `at` is in.
pub fn day_of(at: DateTime<Utc>) -> DateTime<Utc> {
    let millis = at.timestamp_millis();
    let day = millis - millis.rem_euclid(TimeDelta::days(1).num_milliseconds());
    DateTime::from_timestamp_millis(day).unwrap_or(at)
}

/// The webhook sink's `webhook-id`: the same for the same records, so a re-sent batch is
/// recognisable as one.
fn batch_id(batch: &[Outgoing<'_>]) -> String {
    let mut hash = Sha256::new();
    for out in batch {
        hash.update(out.record.request_id.to_string().as_bytes());
        hash.update(b"\n");
    }
    format!("exp_{}", &hex::encode(hash.finalize())[..32])
}

/// A Lago error entry that says only that the event exists already.
fn only_duplicate(problem: &Value) -> bool {
    problem.as_object().is_some_and(|fields| {
        !fields.is_empty()
            && fields.values().all(|errors| {
                errors
                    .as_array()
                    .is_some_and(|e| e.iter().all(|e| e == "value_already_exist"))
            })
    })
}

fn failed(status: u16, body: &[u8]) -> SinkError {
    SinkError::Failed {
        status,
        body: String::from_utf8_lossy(body).chars().take(300).collect(),
    }
}

fn unreadable(what: &str) -> SinkError {
    SinkError::Unreadable(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_scale_exactly_and_render_back() {
        for (text, scaled) in [
            ("0", 0),
            ("1", 1_000_000_000),
            ("0.000000001", 1),
            ("12.5", 12_500_000_000),
            ("-3.25", -3_250_000_000),
        ] {
            assert_eq!(parse_scaled(text), Some(scaled), "{text}");
            assert_eq!(render_scaled(scaled), text);
        }
        for bad in ["", ".5", "1.0000000001", "1e3", "x", "1.2.3"] {
            assert_eq!(parse_scaled(bad), None, "{bad}");
        }
        assert_eq!(float_scaled(0.3), 300_000_000);
    }

    #[test]
    fn a_day_starts_at_midnight_utc() {
        let at = DateTime::parse_from_rfc3339("2026-12-07T23:59:59.999Z")
            .unwrap()
            .to_utc();
        assert_eq!(rfc3339(day_of(at)), "2026-12-07T00:00:00Z");
    }

    #[test]
    fn a_lago_duplicate_is_only_value_already_exist() {
        assert!(only_duplicate(
            &json!({"transaction_id": ["value_already_exist"]})
        ));
        assert!(!only_duplicate(
            &json!({"transaction_id": ["value_already_exist"], "code": ["not_found"]})
        ));
        assert!(!only_duplicate(&json!({})));
    }
}
