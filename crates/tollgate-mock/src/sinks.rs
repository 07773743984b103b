//! Fake billing sinks on 127.0.0.1, one server speaking the slice of each API that usage export
//! uses: Stripe's meter events and event summaries, OpenMeter's CloudEvents ingest and meter
//! query, Lago's batch events and event list, and a receiver of signed CloudEvents batches with
//! a totals endpoint. Each keeps what it was sent by the sink's own id, as the real one
//! dedupes, and answers a repeat as the real one does. Faults are set through [`FakeSinks`]:
//! an outage for the next calls, a customer whose events are refused.
//!
//! Values are summed exactly (billionths), except where the real API sums in floating point
//! (Stripe's summaries, OpenMeter's query), which the fake answers as floats too.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

/// Which API an event came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Api {
    Stripe,
    OpenMeter,
    Lago,
    CloudEvents,
}

/// One value a sink holds: a customer's amount of one meter at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub customer: String,
    /// Stripe's event name, Lago's code, or the CloudEvent's data field.
    pub meter: String,
    /// The exact decimal string sent.
    pub value: String,
    /// Unix seconds.
    pub at: i64,
}

#[derive(Default)]
struct Sinks {
    /// Each API's events by their id (identifier, transaction id, CloudEvent id + field).
    held: BTreeMap<(Api, String), Held>,
    /// With `keep` off, only the count and the sums are kept (a million rows in bounded memory).
    keep: bool,
    accepted: u64,
    duplicates: u64,
    /// The next calls answer 500.
    outage: u32,
    /// Customers whose events are refused.
    refused: Vec<String>,
    /// OpenMeter meters: slug → the data field it sums.
    openmeter_meters: HashMap<String, String>,
    /// Sums when nothing is kept: (api, customer, meter, day) → billionths.
    sums: BTreeMap<(Api, String, String, i64), i128>,
}

struct Shared {
    sinks: Mutex<Sinks>,
    /// The webhook receiver's signing secret (`whsec_...`).
    secret: Vec<u8>,
}

impl Shared {
    fn sinks(&self) -> MutexGuard<'_, Sinks> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running fakes; stop when dropped.
pub struct FakeSinks {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeSinks {
    /// Serves on a free loopback port. `webhook_secret` (`whsec_...`) is the one the CloudEvents
    /// receiver checks signatures with; `keep`: remember every event (off for a load run, which
    /// keeps only counts and sums).
    pub async fn start(webhook_secret: &str, keep: bool) -> std::io::Result<FakeSinks> {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(webhook_secret.trim_start_matches("whsec_"))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            sinks: Mutex::new(Sinks {
                keep,
                ..Sinks::default()
            }),
            secret,
        });
        let router = Router::new()
            .route("/v1/billing/meter_events", post(stripe_event))
            .route("/v1/billing/meters", get(stripe_meters))
            .route(
                "/v1/billing/meters/{id}/event_summaries",
                get(stripe_summaries),
            )
            .route("/api/v1/events", post(openmeter_ingest).get(lago_list))
            .route("/api/v1/meters/{slug}/query", get(openmeter_query))
            .route("/api/v1/events/batch", post(lago_batch))
            .route("/cloudevents", post(cloudevents_ingest))
            .route("/cloudevents/totals", get(cloudevents_totals))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "fake sinks stopped");
            }
        });
        Ok(FakeSinks { addr, shared, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next `calls` answer 500, as a sink that is down.
    pub fn fail_next(&self, calls: u32) {
        self.shared.sinks().outage = calls;
    }

    /// Events for `customer` are refused from now on.
    pub fn refuse_customer(&self, customer: &str) {
        self.shared.sinks().refused.push(customer.to_string());
    }

    /// Events of every customer are taken again.
    pub fn accept_everyone(&self) {
        self.shared.sinks().refused.clear();
    }

    /// Defines an OpenMeter meter: `slug` sums the data field `property`.
    pub fn openmeter_meter(&self, slug: &str, property: &str) {
        self.shared
            .sinks()
            .openmeter_meters
            .insert(slug.to_string(), property.to_string());
    }

    /// Everything held from one API, by id.
    pub fn held(&self, api: Api) -> BTreeMap<String, Held> {
        self.shared
            .sinks()
            .held
            .iter()
            .filter(|((a, _), _)| *a == api)
            .map(|((_, id), held)| (id.clone(), held.clone()))
            .collect()
    }

    /// (accepted, duplicates) over every API.
    pub fn counts(&self) -> (u64, u64) {
        let sinks = self.shared.sinks();
        (sinks.accepted, sinks.duplicates)
    }

    /// The exact sum of one API's values of `meter` for `customer`, as a decimal string.
    pub fn total(&self, api: Api, customer: &str, meter: &str) -> String {
        let sinks = self.shared.sinks();
        let sum: i128 = sinks
            .sums
            .iter()
            .filter(|((a, c, m, _), _)| *a == api && c == customer && m == meter)
            .map(|(_, v)| *v)
            .sum();
        render(sum)
    }
}

impl Drop for FakeSinks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const DAY: i64 = 86_400;
const SCALE: i128 = 1_000_000_000;

/// A decimal string in billionths; `None` if it is not a plain decimal of nine places at most.
fn scaled(text: &str) -> Option<i128> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 9 {
        return None;
    }
    let fraction: i128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<i128>().ok()? * 10_i128.pow(9 - fraction.len() as u32)
    };
    Some(whole.parse::<i128>().ok()? * SCALE + fraction)
}

fn render(value: i128) -> String {
    let (whole, fraction) = (value / SCALE, value % SCALE);
    if fraction == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{}", format!("{fraction:09}").trim_end_matches('0'))
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

enum Taken {
    New,
    Duplicate,
}

impl Sinks {
    /// A 500 while an outage is set.
    fn down(&mut self) -> bool {
        if self.outage > 0 {
            self.outage -= 1;
            true
        } else {
            false
        }
    }

    fn take(&mut self, api: Api, id: String, held: Held) -> Taken {
        if self.keep && self.held.contains_key(&(api, id.clone())) {
            self.duplicates += 1;
            return Taken::Duplicate;
        }
        self.accepted += 1;
        if let Some(value) = scaled(&held.value) {
            *self
                .sums
                .entry((
                    api,
                    held.customer.clone(),
                    held.meter.clone(),
                    held.at - held.at.rem_euclid(DAY),
                ))
                .or_default() += value;
        }
        if self.keep {
            self.held.insert((api, id), held);
        }
        Taken::New
    }

    /// Per day (Unix seconds at midnight UTC), the sum of one API's `meter` for `customer`.
    fn days(
        &self,
        api: Api,
        customer: Option<&str>,
        meter: &str,
        from: i64,
        to: i64,
    ) -> BTreeMap<(String, i64), i128> {
        let mut days = BTreeMap::new();
        for ((a, c, m, day), value) in &self.sums {
            if *a == api
                && m == meter
                && customer.is_none_or(|x| x == c)
                && *day >= from - from.rem_euclid(DAY)
                && *day < to
            {
                *days.entry((c.clone(), *day)).or_default() += value;
            }
        }
        days
    }
}

fn stripe_error(status: StatusCode, code: &str, param: Option<&str>, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"type": "invalid_request_error", "code": code, "param": param, "message": message}})),
    )
        .into_response()
}

async fn stripe_event(
    State(shared): State<Arc<Shared>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut sinks = shared.sinks();
    if sinks.down() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let (identifier, customer) = (field("identifier"), field("payload[stripe_customer_id]"));
    let timestamp: i64 = field("timestamp").parse().unwrap_or(0);
    if timestamp < now() - 35 * DAY {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "parameter_invalid_integer",
            Some("timestamp"),
            "Timestamp must be within the past 35 calendar days.",
        );
    }
    if sinks.refused.contains(&customer) {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "resource_missing",
            Some("payload[stripe_customer_id]"),
            "No such customer.",
        );
    }
    let held = Held {
        customer,
        meter: field("event_name"),
        value: field("payload[value]"),
        at: timestamp,
    };
    match sinks.take(Api::Stripe, identifier.clone(), held) {
        Taken::New => {
            Json(json!({"object": "billing.meter_event", "identifier": identifier})).into_response()
        }
        Taken::Duplicate => stripe_error(
            StatusCode::BAD_REQUEST,
            "resource_already_exists",
            Some("identifier"),
            "An event with this identifier already exists.",
        ),
    }
}

async fn stripe_meters(State(shared): State<Arc<Shared>>) -> Response {
    let sinks = shared.sinks();
    let mut names: Vec<&String> = sinks
        .sums
        .keys()
        .filter(|(api, ..)| *api == Api::Stripe)
        .map(|(_, _, meter, _)| meter)
        .collect();
    names.dedup();
    let data: Vec<Value> = names
        .into_iter()
        .map(|name| json!({"id": format!("mtr_{name}"), "event_name": name}))
        .collect();
    Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
}

async fn stripe_summaries(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let sinks = shared.sinks();
    let number = |name: &str| {
        query
            .get(name)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let meter = id.trim_start_matches("mtr_");
    let data: Vec<Value> = sinks
        .days(
            Api::Stripe,
            query.get("customer").map(String::as_str),
            meter,
            number("start_time"),
            number("end_time"),
        )
        .into_iter()
        .map(|((_, day), value)| {
            json!({"id": format!("mtrusg_{day}"), "aggregated_value": value as f64 / SCALE as f64,
                   "start_time": day, "end_time": day + DAY})
        })
        .collect();
    Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
}

/// Unix seconds of an RFC 3339 time (`2026-12-07T10:00:00Z`, a fraction dropped).
fn unix(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.timestamp())
}

/// Unix seconds as an RFC 3339 time in UTC, to the second.
fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Keeps a CloudEvents batch: each event's data fields that are decimal strings, one value
/// each. A refused customer refuses the whole batch, as a schema check would.
fn take_cloudevents(sinks: &mut Sinks, api: Api, body: &[u8]) -> Result<(), (StatusCode, String)> {
    let Ok(Value::Array(events)) = serde_json::from_slice::<Value>(body) else {
        return Err((
            StatusCode::BAD_REQUEST,
            "expected a JSON array of CloudEvents".into(),
        ));
    };
    for event in &events {
        let subject = event["subject"].as_str().unwrap_or_default();
        if sinks.refused.iter().any(|r| r == subject) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("subject '{subject}' is refused"),
            ));
        }
        if event["id"].as_str().is_none() || event["time"].as_str().and_then(unix).is_none() {
            return Err((
                StatusCode::BAD_REQUEST,
                "every event needs an id and a time".into(),
            ));
        }
    }
    for event in events {
        let id = event["id"].as_str().unwrap_or_default();
        let at = event["time"].as_str().and_then(unix).unwrap_or(0);
        let subject = event["subject"].as_str().unwrap_or_default();
        let fields = event["data"].as_object().cloned().unwrap_or_default();
        for (field, value) in fields {
            let Some(value) = value.as_str().filter(|v| scaled(v).is_some()) else {
                continue;
            };
            let held = Held {
                customer: subject.to_string(),
                meter: field.clone(),
                value: value.to_string(),
                at,
            };
            // A repeat is accepted and dropped, as OpenMeter's dedupe by id does.
            sinks.take(api, format!("{id}/{field}"), held);
        }
    }
    Ok(())
}

async fn openmeter_ingest(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let mut sinks = shared.sinks();
    if sinks.down() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    // OpenMeter dedupes by (source, id) silently: a repeat is accepted.
    match take_cloudevents(&mut sinks, Api::OpenMeter, &body) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn openmeter_query(
    State(shared): State<Arc<Shared>>,
    Path(slug): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let sinks = shared.sinks();
    let Some(property) = sinks.openmeter_meters.get(&slug).cloned() else {
        return (StatusCode::NOT_FOUND, format!("no meter '{slug}'")).into_response();
    };
    let time = |name: &str| query.get(name).and_then(|t| unix(t)).unwrap_or(0);
    let data: Vec<Value> = sinks
        .days(Api::OpenMeter, None, &property, time("from"), time("to"))
        .into_iter()
        .map(|((subject, day), value)| {
            json!({"subject": subject, "value": value as f64 / SCALE as f64,
                   "windowStart": rfc3339(day), "windowEnd": rfc3339(day + DAY)})
        })
        .collect();
    Json(json!({"windowSize": "DAY", "data": data})).into_response()
}

async fn lago_batch(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let mut sinks = shared.sinks();
    if sinks.down() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let events = body["events"].as_array().cloned().unwrap_or_default();
    // Validated as a whole: one bad event, and none is taken.
    let mut errors = serde_json::Map::new();
    for (i, event) in events.iter().enumerate() {
        let id = event["transaction_id"].as_str().unwrap_or_default();
        let subscription = event["external_subscription_id"]
            .as_str()
            .unwrap_or_default();
        if sinks.keep && sinks.held.contains_key(&(Api::Lago, id.to_string())) {
            errors.insert(
                i.to_string(),
                json!({"transaction_id": ["value_already_exist"]}),
            );
        } else if sinks.refused.iter().any(|r| r == subscription) {
            errors.insert(
                i.to_string(),
                json!({"external_subscription_id": ["not_found"]}),
            );
        }
    }
    if !errors.is_empty() {
        sinks.duplicates += errors
            .values()
            .filter(|e| e["transaction_id"].is_array())
            .count() as u64;
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": errors})),
        )
            .into_response();
    }
    for event in events {
        let held = Held {
            customer: event["external_subscription_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            meter: event["code"].as_str().unwrap_or_default().to_string(),
            value: event["properties"]["value"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            at: event["timestamp"].as_f64().map_or(0, |t| t.floor() as i64),
        };
        let id = event["transaction_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        sinks.take(Api::Lago, id, held);
    }
    Json(json!({"events": []})).into_response()
}

async fn lago_list(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let sinks = shared.sinks();
    let time = |name: &str| query.get(name).and_then(|t| unix(t));
    let (from, to) = (
        time("timestamp_from").unwrap_or(i64::MIN),
        time("timestamp_to").unwrap_or(i64::MAX),
    );
    let subscription = query.get("external_subscription_id");
    let page: usize = query
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let per_page: usize = query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100)
        .clamp(1, 100);
    let all: Vec<Value> = sinks
        .held
        .iter()
        .filter(|((api, _), held)| {
            *api == Api::Lago
                && subscription.is_none_or(|s| *s == held.customer)
                && held.at >= from
                && held.at < to
        })
        .map(|((_, id), held)| {
            json!({"transaction_id": id, "external_subscription_id": held.customer, "code": held.meter,
                   "timestamp": rfc3339(held.at), "properties": {"value": held.value}})
        })
        .collect();
    let pages = all.len().div_ceil(per_page);
    let events: Vec<Value> = all
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let next = (page < pages).then_some(page + 1);
    Json(json!({"events": events, "meta": {"current_page": page, "next_page": next, "total_pages": pages}}))
        .into_response()
}

/// Checks a Standard Webhooks signature: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`.
fn signed(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    !id.is_empty()
        && header("webhook-signature")
            .split(' ')
            .any(|s| s == expected)
}

async fn cloudevents_ingest(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !signed(&shared.secret, &headers, &body) {
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let mut sinks = shared.sinks();
    if sinks.down() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    match take_cloudevents(&mut sinks, Api::CloudEvents, &body) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn cloudevents_totals(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let sinks = shared.sinks();
    let time = |name: &str| query.get(name).and_then(|t| unix(t)).unwrap_or(0);
    let (from, to) = (time("from"), time("to"));
    let rows: Vec<Value> = sinks
        .sums
        .iter()
        .filter(|((api, _, _, day), _)| *api == Api::CloudEvents && *day >= from - from.rem_euclid(DAY) && *day < to)
        .map(|((_, subject, meter, day), value)| {
            json!({"subject": subject, "meter": meter, "day": &rfc3339(*day)[..10], "value": render(*value)})
        })
        .collect();
    Json(Value::Array(rows)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_both_ways() {
        for text in [
            "1970-01-01T00:00:00Z",
            "2026-12-07T10:11:12Z",
            "2000-02-29T23:59:59Z",
        ] {
            let seconds = unix(text).unwrap();
            assert_eq!(rfc3339(seconds), text);
        }
        assert_eq!(
            unix("2026-12-07T10:11:12.345Z"),
            unix("2026-12-07T10:11:12Z")
        );
        assert_eq!(unix("1970-01-02T00:00:00Z"), Some(DAY));
    }

    #[test]
    fn decimals_sum_exactly() {
        assert_eq!(
            scaled("0.1").unwrap() + scaled("0.2").unwrap(),
            scaled("0.3").unwrap()
        );
        assert_eq!(render(scaled("12.000000001").unwrap()), "12.000000001");
        assert_eq!(scaled("1e5"), None);
    }
}
