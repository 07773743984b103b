//! Time as the console reports it: in the configured time zone (`[console] time_zone`), in
//! hours or days of that zone. The store sums usage in quarter-hour slots of UTC; every zone's
//! offset is a whole number of quarter hours, so each local hour or day is an exact sum of slots,
//! including the 23- and 25-hour days of a daylight-saving change.

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use std::collections::HashMap;
use tollgate_core::Nanos;
use tollgate_store::{SeriesSlot, UsageBucket, SERIES_SLOT};

/// An instant as the console shows it: local date and time, to the second.
pub fn shown(tz: Tz, at: DateTime<Utc>) -> String {
    at.with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// A zone's name and its offset at `at`, as a chart's caption prints it: `Asia/Kolkata (+05:30)`.
pub fn zone_caption(tz: Tz, at: DateTime<Utc>) -> String {
    format!("{} ({})", tz.name(), at.with_timezone(&tz).format("%:z"))
}

/// The instant of a local date and time as a form sends it (`2026-12-01T09:30`, or a date alone
/// for its midnight). A time skipped by a daylight-saving change is refused; one that happens
/// twice is its first occurrence.
pub fn local_input(tz: Tz, text: &str) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    let local = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
        .or_else(|_| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(|d| d.and_hms_opt(0, 0, 0).unwrap_or_default())
        })
        .map_err(|_| format!("'{text}' is not a date and time, e.g. 2026-12-01T09:30"))?;
    match tz.from_local_datetime(&local) {
        LocalResult::Single(at) | LocalResult::Ambiguous(at, _) => Ok(at.with_timezone(&Utc)),
        LocalResult::None => Err(format!(
            "{text} does not exist in {}: the clocks skip it",
            tz.name()
        )),
    }
}

/// The first instant of a local date: its midnight, or where a change skips midnight, the first
/// time the date has.
pub fn day_start(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    let mut local = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    loop {
        if let Some(at) = tz.from_local_datetime(&local).earliest() {
            return at.with_timezone(&Utc);
        }
        local += SERIES_SLOT;
    }
}

/// How wide a chart's buckets are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Hour,
    Day,
}

impl Step {
    pub fn parse(text: &str) -> Option<Step> {
        match text {
            "hour" => Some(Step::Hour),
            "day" => Some(Step::Day),
            _ => None,
        }
    }

    /// The bucket a slot starting at `at` falls in, named as the chart labels it. An hour's
    /// name carries its offset, so the hour a fall-back repeats is two buckets, not one of two
    /// hours.
    fn label(self, tz: Tz, at: DateTime<Utc>) -> String {
        let local = at.with_timezone(&tz);
        match self {
            Step::Hour => local.format("%Y-%m-%d %H:00 %:z").to_string(),
            Step::Day => local.format("%Y-%m-%d").to_string(),
        }
    }
}

/// One bucket of a chart: its start, its name, and per series its totals; `None` where there
/// is no data (before the log's retention or after now), which the chart shows as a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub label: String,
    pub totals: Option<Vec<UsageBucket>>,
}

/// Usage in local buckets over `[from, to)`: `slots` (as the store sums them) folded into the
/// hours or days of `tz`, one totals per series name in `series`, in that order. A bucket that
/// starts at or after `now`, or holds time before `known_from` (what retention has purged), is
/// not known; the current one is known so far.
pub fn fold(
    tz: Tz,
    step: Step,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    (known_from, now): (DateTime<Utc>, DateTime<Utc>),
    series: &[String],
    slots: &[SeriesSlot],
) -> Vec<Bucket> {
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut at = from;
    while at < to {
        let label = step.label(tz, at);
        if buckets.last().is_none_or(|b| b.label != label) {
            index.insert(label.clone(), buckets.len());
            buckets.push(Bucket {
                start: at,
                label,
                totals: (at < now).then(|| series.iter().map(|name| zero(name)).collect()),
            });
        }
        if at < known_from {
            if let Some(last) = buckets.last_mut() {
                last.totals = None;
            }
        }
        at += SERIES_SLOT;
    }
    let position: HashMap<&str, usize> = series
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    for slot in slots {
        let bucket = index.get(&step.label(tz, slot.start)).copied();
        let series = position.get(slot.totals.group.as_str()).copied();
        let Some(totals) = bucket
            .zip(series)
            .and_then(|(b, s)| buckets[b].totals.as_mut().map(|t| &mut t[s]))
        else {
            continue;
        };
        add(totals, &slot.totals);
    }
    buckets
}

/// No usage, for the series `group`.
pub fn zero(group: &str) -> UsageBucket {
    UsageBucket {
        group: group.to_string(),
        requests: 0,
        errors: 0,
        input_tokens: 0,
        cached_input_tokens: 0,
        output_tokens: 0,
        cost: Nanos::ZERO,
    }
}

/// Adds `more` into `into`.
pub fn add(into: &mut UsageBucket, more: &UsageBucket) {
    into.requests += more.requests;
    into.errors += more.errors;
    into.input_tokens += more.input_tokens;
    into.cached_input_tokens += more.cached_input_tokens;
    into.output_tokens += more.output_tokens;
    into.cost = Nanos(into.cost.0 + more.cost.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(at: &str, group: &str, requests: u64, cost: i64) -> SeriesSlot {
        SeriesSlot {
            start: at.parse().unwrap(),
            totals: UsageBucket {
                group: group.into(),
                requests,
                errors: 0,
                input_tokens: requests * 10,
                cached_input_tokens: 0,
                output_tokens: 0,
                cost: Nanos(cost),
            },
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn a_half_hour_zone_puts_a_slot_in_its_own_local_hour() {
        let tz: Tz = "Asia/Kolkata".parse().unwrap();
        // 04:15 UTC is 09:45 in Kolkata; 04:30 UTC is 10:00 there.
        let slots = [
            slot("2026-12-01T04:15:00Z", "", 1, 5),
            slot("2026-12-01T04:30:00Z", "", 2, 7),
        ];
        let buckets = fold(
            tz,
            Step::Hour,
            (at("2026-12-01T03:30:00Z"), at("2026-12-01T05:30:00Z")),
            (at("2026-01-01T00:00:00Z"), at("2026-12-02T00:00:00Z")),
            &[String::new()],
            &slots,
        );
        let labels: Vec<&str> = buckets.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(
            labels,
            ["2026-12-01 09:00 +05:30", "2026-12-01 10:00 +05:30"]
        );
        let requests: Vec<u64> = buckets
            .iter()
            .map(|b| b.totals.as_ref().unwrap()[0].requests)
            .collect();
        assert_eq!(requests, [1, 2]);
    }

    #[test]
    fn a_fall_back_day_has_25_hours_and_two_buckets_for_the_repeated_hour() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let day = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let (from, to) = (day_start(tz, day), day_start(tz, day.succ_opt().unwrap()));
        assert_eq!(to - from, chrono::TimeDelta::hours(25));
        // 05:30 and 06:30 UTC are both 01:30 local, first EDT then EST.
        let slots = [
            slot("2026-11-01T05:30:00Z", "", 1, 1),
            slot("2026-11-01T06:30:00Z", "", 1, 1),
        ];
        let known = (at("2026-01-01T00:00:00Z"), at("2027-01-01T00:00:00Z"));
        let hours = fold(tz, Step::Hour, (from, to), known, &[String::new()], &slots);
        assert_eq!(hours.len(), 25);
        let repeated: Vec<&Bucket> = hours
            .iter()
            .filter(|b| b.label.contains(" 01:00 "))
            .collect();
        assert_eq!(repeated.len(), 2);
        assert!(repeated
            .iter()
            .all(|b| b.totals.as_ref().unwrap()[0].requests == 1));
        let days = fold(tz, Step::Day, (from, to), known, &[String::new()], &slots);
        assert_eq!(days.len(), 1);
        assert_eq!(days[0].totals.as_ref().unwrap()[0].requests, 2);
    }

    #[test]
    fn buckets_before_retention_or_after_now_are_missing_not_zero() {
        let tz = Tz::UTC;
        let buckets = fold(
            tz,
            Step::Day,
            (at("2026-12-01T00:00:00Z"), at("2026-12-05T00:00:00Z")),
            (at("2026-12-01T06:00:00Z"), at("2026-12-03T12:00:00Z")),
            &[String::new()],
            &[],
        );
        let known: Vec<bool> = buckets.iter().map(|b| b.totals.is_some()).collect();
        // Part-purged, known, known so far, not yet.
        assert_eq!(known, [false, true, true, false]);
        assert_eq!(buckets[1].totals.as_ref().unwrap()[0].requests, 0);
    }

    #[test]
    fn a_local_time_the_clocks_skip_is_refused_and_a_repeated_one_is_its_first() {
        let tz: Tz = "America/New_York".parse().unwrap();
        assert!(local_input(tz, "2026-03-08T02:30")
            .unwrap_err()
            .contains("does not exist"));
        assert_eq!(
            local_input(tz, "2026-11-01T01:30").unwrap(),
            at("2026-11-01T05:30:00Z")
        );
        assert_eq!(
            local_input("Asia/Kolkata".parse().unwrap(), "2026-12-01").unwrap(),
            at("2026-11-30T18:30:00Z")
        );
        assert!(local_input(tz, "yesterday").is_err());
    }
}
