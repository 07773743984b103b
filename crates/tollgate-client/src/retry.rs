//! When to send a call again, and how long to wait first.
//!
//! | outcome | retried |
//! |---|---|
//! | no connection made | yes |
//! | timeout, connection lost mid-call | when the call is safe to repeat (GET, PUT, DELETE, or an `Idempotency-Key`, which every POST and PATCH carries) |
//! | 408, 429, 5xx, 409 `idempotency_in_progress` | yes |
//! | any other 4xx | never |
//! | `x-should-retry: true` / `false` | as the server says |
//!
//! The wait is the server's (`retry-after-ms`, else `Retry-After` in seconds or as an HTTP
//! date), or, when it names none, full-jitter exponential backoff: a uniform draw from zero to
//! `min(max_backoff, initial_backoff × 2^retry)`. A server wait over `max_retry_after` is not
//! waited: the error is returned at once with [`Error::retry_after`](crate::Error::retry_after)
//! set. Retries draw on a [`RetryBudget`], so a failing server is not stormed.

use http::HeaderMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How many times, and how patiently, a call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (default 2, as the OpenAI and Anthropic SDKs; 0 turns
    /// retrying off).
    pub max_retries: u32,
    /// The backoff ceiling of the first retry (default 500 ms); it doubles with each retry.
    pub initial_backoff: Duration,
    /// The most a backoff may reach (default 8 s).
    pub max_backoff: Duration,
    /// The longest server-asked wait that is waited (default 60 s).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 2,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// What to do about a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Sleep this long, then send again.
    Retry(Duration),
    /// The server asks for a longer wait than the policy allows: give the error back now.
    TooLong(Duration),
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 for the first), given the server's own wait if
    /// it named one, and a uniform draw in `[0, 1)`.
    pub fn wait(&self, retry: u32, server_wait: Option<Duration>, draw: f64) -> Wait {
        if let Some(asked) = server_wait {
            return if asked > self.max_retry_after {
                Wait::TooLong(asked)
            } else {
                Wait::Retry(asked)
            };
        }
        let doubled = self
            .initial_backoff
            .checked_mul(2u32.saturating_pow(retry))
            .unwrap_or(self.max_backoff);
        Wait::Retry(doubled.min(self.max_backoff).mul_f64(draw.clamp(0.0, 1.0)))
    }
}

/// The server's wait in `headers`, read at `now`: `retry-after-ms` (milliseconds, as the
/// OpenAI API sends it), else `Retry-After` as seconds or as an HTTP date.
pub fn server_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let after = text("retry-after")?;
    if let Ok(seconds) = after.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at: SystemTime = chrono::DateTime::parse_from_rfc2822(after).ok()?.into();
    Some(at.duration_since(now).unwrap_or_default())
}

/// Time, for waits and for reading HTTP dates; replace it to test without waiting.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The system clock and tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// The randomness of backoff: a uniform draw in `[0, 1)`. Replace it to test exact delays.
pub trait Jitter: Send + Sync + 'static {
    fn draw(&self) -> f64;
}

/// Draws from the thread's random generator.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn draw(&self) -> f64 {
        rand::random::<f64>()
    }
}

/// A token bucket that retries draw on, shared by every call of a [`Client`](crate::Client)
/// (gRPC's retry throttling): it starts full at `capacity` tokens; each retryable failure takes
/// one, each success puts back `refill`; a retry is sent only while more than half the capacity
/// is left. A server that fails everything soon gets one attempt per call, and as its answers
/// succeed again the retries come back.
#[derive(Debug)]
pub struct RetryBudget {
    capacity: u32,
    refill: u32,
    /// In thousandths of a token.
    tokens: Mutex<u32>,
}

impl RetryBudget {
    /// `capacity` tokens; `refill_per_success` in thousandths of a token.
    pub fn new(capacity: u32, refill_per_success: u32) -> RetryBudget {
        let capacity = capacity.saturating_mul(1000);
        RetryBudget {
            capacity,
            refill: refill_per_success,
            tokens: Mutex::new(capacity),
        }
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, u32> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call succeeded.
    pub fn succeeded(&self) {
        let mut tokens = self.tokens();
        *tokens = tokens.saturating_add(self.refill).min(self.capacity);
    }

    /// A call failed in a way a retry could mend: takes a token; whether a retry may be sent.
    pub fn failed(&self) -> bool {
        let mut tokens = self.tokens();
        *tokens = tokens.saturating_sub(1000);
        *tokens > self.capacity / 2
    }
}

impl Default for RetryBudget {
    /// 10 tokens, a tenth back per success (gRPC's defaults).
    fn default() -> Self {
        RetryBudget::new(10, 100)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::UNIX_EPOCH;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_backoff_table() {
        let policy = RetryPolicy::default();
        // (retry, server wait, draw) → wait
        let table = [
            (0, None, 0.0, Wait::Retry(ms(0))),
            (0, None, 0.5, Wait::Retry(ms(250))),
            (
                0,
                None,
                0.999,
                Wait::Retry(Duration::from_nanos(499_500_000)),
            ),
            (1, None, 0.5, Wait::Retry(ms(500))),
            (2, None, 0.5, Wait::Retry(ms(1000))),
            (3, None, 0.5, Wait::Retry(ms(2000))),
            (4, None, 0.5, Wait::Retry(ms(4000))),
            (5, None, 0.5, Wait::Retry(ms(4000))),
            (40, None, 1.0, Wait::Retry(ms(8000))),
            (0, Some(ms(1500)), 0.5, Wait::Retry(ms(1500))),
            (3, Some(ms(0)), 0.9, Wait::Retry(ms(0))),
            (0, Some(ms(60_000)), 0.5, Wait::Retry(ms(60_000))),
            (0, Some(ms(60_001)), 0.5, Wait::TooLong(ms(60_001))),
        ];
        for (retry, server, draw, expected) in table {
            assert_eq!(
                policy.wait(retry, server, draw),
                expected,
                "retry {retry}, server {server:?}, draw {draw}"
            );
        }
    }

    #[test]
    fn server_waits_in_each_spelling() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let wait = |pairs: &[(&'static str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, value.parse().unwrap());
            }
            server_wait(&headers, now)
        };
        assert_eq!(wait(&[("retry-after", "7")]), Some(ms(7000)));
        assert_eq!(wait(&[("retry-after-ms", "1250")]), Some(ms(1250)));
        assert_eq!(
            wait(&[("retry-after-ms", "20"), ("retry-after", "7")]),
            Some(ms(20)),
            "milliseconds win"
        );
        assert_eq!(
            wait(&[("retry-after", "Sun, 06 Nov 1994 08:49:49 GMT")]),
            Some(ms(12_000))
        );
        assert_eq!(
            wait(&[("retry-after", "Sun, 06 Nov 1994 08:00:00 GMT")]),
            Some(ms(0)),
            "a date in the past is no wait"
        );
        assert_eq!(wait(&[("retry-after", "soon")]), None);
        assert_eq!(wait(&[("retry-after-ms", "-5")]), None);
        assert_eq!(wait(&[]), None);
    }

    #[test]
    fn the_budget_stops_retries_while_most_calls_fail_and_recovers() {
        let budget = RetryBudget::default();
        let allowed: Vec<bool> = (0..7).map(|_| budget.failed()).collect();
        // 10 tokens; a retry needs more than 5 left after the failure's token.
        assert_eq!(allowed, [true, true, true, true, false, false, false]);
        for _ in 0..29 {
            budget.succeeded();
        }
        assert!(!budget.failed(), "3 + 2.9 - 1 tokens is not over 5");
        for _ in 0..20 {
            budget.succeeded();
        }
        assert!(budget.failed());
    }
}
