//! The adaptive concurrency limit behind load shedding: the gradient algorithm of Netflix's
//! concurrency-limits ("Gradient2"), fed one latency sample per finished request.
//!
//! The limit follows the ratio of a baseline latency to the latest sample. While latency stays
//! within `tolerance` times the baseline the limit grows by about √limit per sample (room for a
//! queue of that size); beyond it, the limit shrinks in proportion, never by more than half a
//! step. The limit only moves while the node is saturated (at least half full): a node carrying
//! little cannot learn its capacity, and a slow upstream serving a handful of calls is no reason
//! to shed.
//!
//! The baseline is an exponential average over about 600 samples taken while the node was *not*
//! saturated (and the first ten samples, so a node that starts under overload has one). Netflix's
//! version averages every sample, so under a lasting overload its baseline climbs to the
//! overloaded latency and the limit drifts back up; freezing it while saturated keeps the
//! meaning plain: admit as much as keeps latency within `tolerance` times what it is when the
//! node is not busy. When latency falls well below the baseline, the baseline follows it down.
//! CPU pressure, when reported, stops growth and backs the limit off by a tenth per report.

use std::time::Duration;

/// How the limit adapts; see [`AdaptiveLimit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    pub initial: u32,
    pub min: u32,
    pub max: u32,
    /// How many times the long-run latency a sample may be before the limit shrinks (≥ 1).
    pub tolerance: f64,
}

/// The weight of a new estimate against the old one; smooths out single outliers.
const SMOOTHING: f64 = 0.2;
/// The long-run latency is an exponential average over about this many samples.
const LONG_WINDOW: f64 = 600.0;
/// Samples averaged plainly before the exponential average takes over.
const WARMUP: u32 = 10;
/// The factor a CPU-pressure report multiplies the limit by.
const PRESSURE_BACKOFF: f64 = 0.9;

#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    settings: LimitSettings,
    estimate: f64,
    long_rtt_nanos: f64,
    samples: u32,
    pressured: bool,
}

impl AdaptiveLimit {
    pub fn new(settings: LimitSettings) -> AdaptiveLimit {
        let estimate = f64::from(settings.initial.clamp(settings.min, settings.max));
        AdaptiveLimit {
            settings,
            estimate,
            long_rtt_nanos: 0.0,
            samples: 0,
            pressured: false,
        }
    }

    /// How many requests may be in flight at once.
    pub fn limit(&self) -> u32 {
        // The estimate is kept within [min, max], so the conversion cannot truncate.
        self.estimate as u32
    }

    /// Learns from one request that took `rtt` while `in_flight` requests (itself included)
    /// were being served.
    pub fn on_sample(&mut self, rtt: Duration, in_flight: u32) {
        let short = (rtt.as_nanos() as f64).max(1.0);
        let saturated = f64::from(in_flight) >= self.estimate / 2.0;
        if !saturated || self.samples < WARMUP {
            self.samples = self.samples.saturating_add(1);
            let weight = if self.samples <= WARMUP {
                1.0 / f64::from(self.samples)
            } else {
                2.0 / (LONG_WINDOW + 1.0)
            };
            self.long_rtt_nanos += (short - self.long_rtt_nanos) * weight;
        }
        let long = self.long_rtt_nanos;
        // Latency has fallen well below the baseline (an overload ended, the upstream got
        // faster): let the baseline catch up rather than wait hundreds of samples.
        if long / short > 2.0 {
            self.long_rtt_nanos *= 0.95;
        }
        if !saturated {
            return;
        }
        let gradient = (self.settings.tolerance * long / short).clamp(0.5, 1.0);
        let queue = self.estimate.sqrt();
        let target = self.estimate * gradient + queue;
        let mut next = self.estimate * (1.0 - SMOOTHING) + target * SMOOTHING;
        if self.pressured {
            next = next.min(self.estimate);
        }
        self.estimate = self.clamp(next);
    }

    /// Reports whether the machine is under CPU pressure; while it is, the limit cannot grow,
    /// and each report backs it off.
    pub fn on_pressure(&mut self, pressured: bool) {
        self.pressured = pressured;
        if pressured {
            self.estimate = self.clamp(self.estimate * PRESSURE_BACKOFF);
        }
    }

    fn clamp(&self, value: f64) -> f64 {
        value.clamp(f64::from(self.settings.min), f64::from(self.settings.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(initial: u32) -> LimitSettings {
        LimitSettings {
            initial,
            min: 4,
            max: 1000,
            tolerance: 2.0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn steady_latency_under_full_load_grows_the_limit() {
        let mut limit = AdaptiveLimit::new(settings(20));
        for _ in 0..50 {
            limit.on_sample(ms(10), limit.limit());
        }
        assert!(limit.limit() > 40, "grew to {}", limit.limit());
    }

    #[test]
    fn rising_latency_under_full_load_shrinks_the_limit() {
        let mut limit = AdaptiveLimit::new(settings(100));
        for _ in 0..20 {
            limit.on_sample(ms(10), 100);
        }
        let before = limit.limit();
        // The upstream queues: every call now takes five times as long.
        for _ in 0..30 {
            limit.on_sample(ms(50), limit.limit());
        }
        assert!(limit.limit() < before / 2, "{before} -> {}", limit.limit());
    }

    #[test]
    fn a_lasting_overload_does_not_teach_the_baseline_to_accept_it() {
        let mut limit = AdaptiveLimit::new(settings(100));
        for _ in 0..20 {
            limit.on_sample(ms(10), 10);
        }
        // Saturated for thousands of samples, latency proportional to the queue the limit lets
        // form: the limit settles where latency is within the tolerance of the baseline.
        for _ in 0..5000 {
            let in_flight = limit.limit();
            limit.on_sample(ms(u64::from(in_flight)), in_flight);
        }
        assert!((20..=30).contains(&limit.limit()), "{}", limit.limit());
    }

    #[test]
    fn a_lightly_loaded_node_keeps_its_limit_however_slow_the_calls() {
        let mut limit = AdaptiveLimit::new(settings(100));
        for i in 0..200 {
            limit.on_sample(ms(if i % 2 == 0 { 10 } else { 5000 }), 10);
        }
        assert_eq!(limit.limit(), 100);
    }

    #[test]
    fn pressure_backs_off_and_stops_growth_until_it_passes() {
        let mut limit = AdaptiveLimit::new(settings(100));
        limit.on_pressure(true);
        assert_eq!(limit.limit(), 90);
        for _ in 0..20 {
            limit.on_sample(ms(10), 100);
        }
        assert!(limit.limit() <= 90);
        limit.on_pressure(false);
        for _ in 0..20 {
            limit.on_sample(ms(10), 100);
        }
        assert!(limit.limit() > 90);
    }

    proptest! {
        #[test]
        fn the_limit_stays_within_its_bounds(
            initial in 0u32..2000,
            samples in prop::collection::vec((0u64..10_000_000_000, 0u32..3000, any::<bool>()), 0..300),
        ) {
            let mut limit = AdaptiveLimit::new(settings(initial));
            for (nanos, in_flight, pressure) in samples {
                if pressure && in_flight % 7 == 0 {
                    limit.on_pressure(in_flight % 2 == 0);
                }
                limit.on_sample(Duration::from_nanos(nanos), in_flight);
                prop_assert!((4..=1000).contains(&limit.limit()));
            }
        }
    }
}
