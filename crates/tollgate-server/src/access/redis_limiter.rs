//! The shared limiter: every node's decisions in one Redis, so a policy holds across the cluster.
//!
//! One Lua script (`gcra.lua`, versioned in its keys) decides all of a request's demands
//! atomically on the Redis server's clock: node clocks never disagree about a TAT. Subjects
//! expire once back at full capacity, so Redis memory follows the active subjects.
//!
//! Redis being down is a [`LimiterUnavailable`], decided quickly: commands time out after
//! [`TIMEOUT`], and after any failure (a connection refused, a command that errs or times out
//! on a live connection) Redis counts as down for [`RETRY_AFTER`]: requests meanwhile are
//! answered at once, without a round trip, and the first request after it tries again. So a
//! dead or hung Redis costs one request a second the timeout, and the others nothing. What a
//! failure means for a request (admit or refuse) is each policy's `on_limiter_failure`.

use crate::access::limits::{Demand, Limiter, LimiterUnavailable, Verdict};
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use tollgate_core::ratelimit::Standing;

/// Bumped with any change to the script's state format: old state is then simply not read.
const KEY_PREFIX: &str = "tollgate:rl:v1:";
/// The longest a command may take before the limiter counts as unavailable.
pub const TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, how long requests are answered as unavailable before Redis is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct RedisLimiter {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    /// Until when Redis counts as down, in milliseconds since `created` (0: it is not). An
    /// atomic, so the check on every request takes no lock.
    down_until_ms: AtomicU64,
    created: Instant,
    script: Script,
}

impl RedisLimiter {
    /// A limiter on the Redis at `url` (`redis://host:port/db`). Connects on first use, so a
    /// node starts while Redis is down.
    pub fn new(url: &str) -> Result<RedisLimiter, LimiterUnavailable> {
        let client = redis::Client::open(url)
            .map_err(|e| LimiterUnavailable(format!("bad Redis URL: {e}")))?;
        Ok(RedisLimiter {
            client,
            connection: OnceCell::new(),
            down_until_ms: AtomicU64::new(0),
            created: Instant::now(),
            script: Script::new(include_str!("gcra.lua")),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `command` on the connection, unless Redis failed within [`RETRY_AFTER`]; a failure
    /// starts that wait again, a success ends it.
    async fn guarded<T>(
        &self,
        command: impl AsyncFnOnce(ConnectionManager) -> Result<T, LimiterUnavailable>,
    ) -> Result<T, LimiterUnavailable> {
        if self.now_ms() < self.down_until_ms.load(Ordering::Acquire) {
            return Err(LimiterUnavailable(
                "Redis failed less than a second ago".into(),
            ));
        }
        let outcome = match self.connection().await {
            Ok(connection) => command(connection).await,
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            let retry_ms = u64::try_from(RETRY_AFTER.as_millis()).unwrap_or(u64::MAX);
            self.down_until_ms
                .store(self.now_ms().saturating_add(retry_ms), Ordering::Release);
        } else if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Release);
        }
        outcome
    }

    async fn connection(&self) -> Result<ConnectionManager, LimiterUnavailable> {
        if let Some(connection) = self.connection.get() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        let connected = self
            .connection
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await;
        connected
            .cloned()
            .map_err(|e| LimiterUnavailable(format!("cannot connect to Redis: {e}")))
    }

    /// Runs the script in `mode` over `demands`, each with its `amount`.
    async fn run(
        &self,
        mode: &str,
        demands: impl Iterator<Item = (&Demand, i64)>,
    ) -> Result<Vec<i64>, LimiterUnavailable> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(mode);
        for (demand, amount) in demands {
            let policy = &demand.policy;
            invocation
                .key(format!("{KEY_PREFIX}{}", demand.state_key()))
                .arg(policy.limit.max(1))
                .arg(
                    u64::try_from(policy.window.as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                )
                .arg(policy.burst)
                .arg(amount);
        }
        self.guarded(async |mut connection| {
            invocation
                .invoke_async(&mut connection)
                .await
                .map_err(|e| LimiterUnavailable(format!("Redis: {e}")))
        })
        .await
    }
}

/// The script's answer: `{admitted, then four numbers per demand}`.
fn verdict(reply: &[i64], demands: usize) -> Result<Verdict, LimiterUnavailable> {
    let (&admitted, rest) = reply
        .split_first()
        .ok_or_else(|| LimiterUnavailable("empty reply from the limiter script".into()))?;
    if rest.len() != demands * 4 {
        return Err(LimiterUnavailable(format!(
            "the limiter script answered {} numbers for {demands} demands",
            rest.len()
        )));
    }
    let micros = |n: i64| Duration::from_micros(u64::try_from(n).unwrap_or(0));
    let standings = rest
        .chunks_exact(4)
        .map(|s| Standing {
            admitted: s[0] == 1,
            remaining: u64::try_from(s[1]).unwrap_or(0),
            reset_after: micros(s[2]),
            retry_after: micros(s[3]),
        })
        .collect();
    Ok(Verdict {
        admitted: admitted == 1,
        standings,
    })
}

fn units(cost: u64) -> i64 {
    i64::try_from(cost).unwrap_or(i64::MAX)
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn acquire(&self, demands: &[Demand]) -> Result<Verdict, LimiterUnavailable> {
        let reply = self
            .run("acquire", demands.iter().map(|d| (d, units(d.cost))))
            .await?;
        verdict(&reply, demands.len())
    }

    async fn adjust(&self, corrections: &[(Demand, i64)]) -> Result<(), LimiterUnavailable> {
        if corrections.is_empty() {
            return Ok(());
        }
        self.run("adjust", corrections.iter().map(|(d, delta)| (d, *delta)))
            .await?;
        Ok(())
    }

    async fn peek(&self, demands: &[Demand]) -> Result<Vec<Standing>, LimiterUnavailable> {
        let reply = self.run("peek", demands.iter().map(|d| (d, 0))).await?;
        Ok(verdict(&reply, demands.len())?.standings)
    }

    async fn ping(&self) -> Result<(), LimiterUnavailable> {
        self.guarded(async |mut connection| {
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .map(drop)
                .map_err(|e| LimiterUnavailable(format!("Redis: {e}")))
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}
