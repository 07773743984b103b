//! The delivery worker: each round it fans new events out to their endpoints, claims the due
//! deliveries (at most one per endpoint at a time, so a slow receiver holds up only itself),
//! and makes each attempt in a task of its own, bounded by the attempt timeout and by how many
//! may be in flight. An attempt is a signed POST (Standard Webhooks headers) through the
//! guarded connector: no redirect is followed, no proxy is used, every address is checked.
//!
//! A 2xx delivers; 410 fails the delivery and disables the endpoint; anything else (another
//! status, a timeout, a refused address) retries on [`RETRY_DELAYS`], each delay jittered and
//! never shorter than the receiver's `Retry-After`, until the attempts run out (about a day).
//! A claim is a lease: if the node dies mid-attempt, the delivery is due again when the lease
//! ends, with the same `webhook-id` (deliveries are at least once; receivers dedupe by id).

use crate::config::WebhookSettings;
use crate::notify::egress::{GuardedConnector, Resolver};
use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tollgate_core::clock::rfc3339;
use tollgate_core::notify::{Event, EventType};
use tollgate_core::webhook::{signature_header, WebhookSecret};
use tollgate_core::Clock;
use tollgate_store::{Attempt, AttemptOutcome, Crossing, DueDelivery, Store, StoreError};

/// The wait after each failed attempt: 8 attempts over about 27 hours.
pub const RETRY_DELAYS: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// The longest `Retry-After` honoured: a receiver cannot park a delivery for longer.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Events fanned out per round.
const FAN_OUT_BATCH: u32 = 500;
/// How far ahead a key's expiry is announced (`key.expiring`).
pub const EXPIRY_NOTICE: TimeDelta = TimeDelta::days(7);
/// How often, on the server's clock, keys are looked at for an expiry to announce.
const EXPIRY_SCAN_EVERY: TimeDelta = TimeDelta::minutes(1);

type WebhookClient = Client<HttpsConnector<GuardedConnector>, Full<Bytes>>;

pub struct Sender {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    client: WebhookClient,
    settings: WebhookSettings,
    in_flight: Arc<Semaphore>,
    /// When keys were last looked at for `key.expiring`.
    expiry_scanned: std::sync::Mutex<Option<DateTime<Utc>>>,
}

impl Sender {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        settings: WebhookSettings,
        resolver: Arc<dyn Resolver>,
    ) -> Arc<Sender> {
        let connector =
            GuardedConnector::new(settings.guard.clone(), resolver, settings.attempt_timeout);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            // One attempt per connection: receivers are many and rarely called twice in a row.
            .pool_max_idle_per_host(0)
            .build(https);
        Arc::new(Sender {
            store,
            clock,
            client,
            in_flight: Arc::new(Semaphore::new(settings.concurrency)),
            settings,
            expiry_scanned: std::sync::Mutex::new(None),
        })
    }

    /// Runs rounds every poll interval until the process ends. A round the store failed (busy,
    /// or briefly away) is tried again within a second, not a whole interval later.
    pub async fn run(self: Arc<Self>) {
        loop {
            let wait = match self.round().await {
                Ok(_) => self.settings.poll_interval,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook round failed; trying again shortly");
                    self.settings.poll_interval.min(Duration::from_secs(1))
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One round: fans out, claims what is due (as many as may start now) and starts each
    /// attempt. The handles end when the attempts are recorded.
    pub async fn round(self: &Arc<Self>) -> Result<Vec<JoinHandle<()>>, StoreError> {
        let now = self.clock.now();
        self.announce_expiring_keys(now).await?;
        while self.store.fan_out(now, FAN_OUT_BATCH).await? == u64::from(FAN_OUT_BATCH) {}
        let free = self.in_flight.available_permits();
        if free == 0 {
            return Ok(Vec::new());
        }
        // Long enough for the attempt and its record; a claim outliving its node is due again.
        let lease = TimeDelta::from_std(self.settings.attempt_timeout * 2 + Duration::from_secs(5))
            .unwrap_or(TimeDelta::MAX);
        let due = self
            .store
            .claim_deliveries(now, now + lease, u32::try_from(free).unwrap_or(u32::MAX))
            .await?;
        let mut started = Vec::with_capacity(due.len());
        for delivery in due {
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                break;
            };
            let sender = self.clone();
            started.push(tokio::spawn(async move {
                let attempt = sender.attempt(&delivery).await;
                if let Err(e) = sender.store.finish_attempt(&attempt).await {
                    // The claim's lease ends and the delivery is due again.
                    tracing::warn!(error = %e, event = %attempt.event, "a webhook attempt could not be recorded");
                }
                drop(permit);
            }));
        }
        Ok(started)
    }

    /// `key.expiring` for each active key whose expiry is within [`EXPIRY_NOTICE`], once per
    /// expiry time (a key given a later expiry is announced again when that one nears).
    async fn announce_expiring_keys(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        {
            let mut scanned = self
                .expiry_scanned
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if scanned.is_some_and(|at| now - at < EXPIRY_SCAN_EVERY) {
                return Ok(());
            }
            *scanned = Some(now);
        }
        for id in self
            .store
            .keys_expiring(now, now + EXPIRY_NOTICE, 1000)
            .await?
        {
            let Some(key) = self.store.key_by_id(id).await? else {
                continue;
            };
            let Some(expires_at) = key.expires_at else {
                continue;
            };
            let data = json!({
                "key_id": key.id.to_string(),
                "key_prefix": key.display_prefix,
                "name": key.name,
                "expires_at": rfc3339(expires_at),
            });
            let event = Event::new(key.account_id, EventType::KeyExpiring, now, data);
            let crossing = Crossing {
                subject: key.id.to_string(),
                kind: EventType::KeyExpiring,
                period: expires_at.timestamp_millis().to_string(),
                currency: String::new(),
            };
            self.store.cross(&crossing, &event).await?;
        }
        Ok(())
    }

    async fn attempt(&self, delivery: &DueDelivery) -> Attempt {
        let endpoint = &delivery.endpoint;
        let event = &delivery.event;
        let at = self.clock.now();
        let answer = tokio::time::timeout(self.settings.attempt_timeout, self.post(delivery, at));
        let (status, retry_after, error) = match answer.await {
            Ok(Ok((status, retry_after))) => (Some(status), retry_after, None),
            Ok(Err(e)) => (None, None, Some(e)),
            Err(_) => (
                None,
                None,
                Some(format!(
                    "no answer within {:?}",
                    self.settings.attempt_timeout
                )),
            ),
        };
        let outcome = match status {
            Some(200..=299) => AttemptOutcome::Delivered,
            Some(410) => AttemptOutcome::Gone,
            _ => next_attempt(at, delivery.attempts + 1, retry_after, jitter()),
        };
        let error = error.or_else(|| match status {
            Some(300..=399) => Some("a redirect, which is not followed".into()),
            Some(200..=299) | None => None,
            Some(other) => Some(format!("the receiver answered {other}")),
        });
        tracing::debug!(endpoint = %endpoint.id, event = %event.id, ?status, ?outcome, "webhook attempt");
        Attempt {
            endpoint: endpoint.id,
            event: event.id,
            at,
            status,
            error,
            outcome,
        }
    }

    /// Sends the event once: the receiver's status and `Retry-After`, or why nothing was sent.
    async fn post(
        &self,
        delivery: &DueDelivery,
        at: DateTime<Utc>,
    ) -> Result<(u16, Option<Duration>), String> {
        let endpoint = &delivery.endpoint;
        let event = &delivery.event;
        let current = WebhookSecret::parse(&endpoint.secret)
            .map_err(|_| "the endpoint's secret cannot be read".to_string())?;
        let previous = endpoint
            .previous_secret
            .as_deref()
            .filter(|_| endpoint.previous_until.is_some_and(|until| until > at))
            .and_then(|text| WebhookSecret::parse(text).ok());
        let mut secrets = vec![&current];
        secrets.extend(previous.as_ref());
        let id = event.id.to_string();
        let timestamp = at.timestamp();
        let signature = signature_header(&secrets, &id, timestamp, event.body.as_bytes());
        let request = http::Request::post(&endpoint.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "Tollgate-Webhooks/1")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(event.body.clone())))
            .map_err(|e| format!("the endpoint's URL cannot be requested: {e}"))?;
        let response = self.client.request(request).await.map_err(describe)?;
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, at));
        Ok((response.status().as_u16(), retry_after))
    }
}

/// A client error as the delivery log shows it: the innermost cause (a refused address says
/// which and why).
fn describe(e: hyper_util::client::legacy::Error) -> String {
    let mut source: &dyn std::error::Error = &e;
    while let Some(inner) = source.source() {
        source = inner;
    }
    format!("not sent: {source}")
}

/// A factor in [0.8, 1.2], so receivers that came back together are not hit together.
fn jitter() -> f64 {
    rand::thread_rng().gen_range(0.8..=1.2)
}

/// After the `made`-th failed attempt: the next one's time, or no more.
pub fn next_attempt(
    at: DateTime<Utc>,
    made: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> AttemptOutcome {
    let Some(delay) = usize::try_from(made)
        .ok()
        .and_then(|made| RETRY_DELAYS.get(made.saturating_sub(1)))
    else {
        return AttemptOutcome::Failed;
    };
    let delay = delay
        .mul_f64(jitter)
        .max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER));
    AttemptOutcome::Retry(at + TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX))
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value.trim()).ok()?;
    (at.with_timezone(&Utc) - now).to_std().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    #[test]
    fn delays_grow_over_about_a_day_then_the_delivery_fails() {
        let start = at(1_000_000);
        let mut now = start;
        let mut made = 1;
        while let AttemptOutcome::Retry(next) = next_attempt(now, made, None, 1.0) {
            assert!(next > now);
            now = next;
            made += 1;
        }
        assert_eq!(made, 8, "eight attempts in all");
        let spent = now - start;
        assert!(
            (TimeDelta::hours(24)..TimeDelta::hours(30)).contains(&spent),
            "{spent}"
        );
        assert_eq!(
            next_attempt(start, 1, None, 0.8),
            AttemptOutcome::Retry(start + TimeDelta::seconds(4))
        );
    }

    #[test]
    fn retry_after_is_honoured_up_to_a_day() {
        let now = at(1_000_000);
        assert_eq!(
            next_attempt(now, 1, Some(Duration::from_secs(120)), 1.0),
            AttemptOutcome::Retry(now + TimeDelta::seconds(120))
        );
        assert_eq!(
            next_attempt(now, 1, Some(Duration::from_secs(7 * 86_400)), 1.0),
            AttemptOutcome::Retry(now + TimeDelta::hours(24))
        );
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_retry_after("Mon, 12 Jan 1970 13:47:40 GMT", now),
            Some(Duration::from_secs(1_000_060 - 1_000_000))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
