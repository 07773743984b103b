//! Billing periods, computed and never scheduled. The period holding an instant is a pure
//! function of (anchor, length, time zone, instant), so a restart, a clock that jumps or two
//! nodes all agree on it without any job having run, and nothing can start a period twice.
//!
//! A schedule's periods follow each other without gap or overlap. Monthly periods start on the
//! anchor's day of the month at its local time of day, clamped to the month's last day (an
//! anchor on 31 January starts periods on 28 or 29 February, then 31 March); weekly ones on the
//! anchor's weekday; daily ones at its time of day. A local start time that a daylight-saving
//! change skips is read with the offset before the change (02:30 on the night clocks go
//! forward is 03:30), and one it repeats is the earlier of the two.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// How long each period of a schedule lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Length {
    Day,
    Week,
    Month,
}

/// Back-to-back periods of one length in a time zone, anchored at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub anchor: DateTime<Utc>,
    pub length: Length,
    pub zone: Tz,
}

/// One period: `start` inclusive, `end` exclusive. `index` counts periods from the anchor's
/// (0), so two instants are in the same period exactly when their indexes are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub index: i64,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Schedule {
    /// Calendar periods in `zone`: days from local midnight, weeks from Monday's, months from
    /// the first's.
    pub fn calendar(length: Length, zone: Tz) -> Schedule {
        // 3 January 2000 was a Monday and the first Monday of a month-start-aligned year.
        let first = match length {
            Length::Week => NaiveDate::from_ymd_opt(2000, 1, 3),
            Length::Day | Length::Month => NaiveDate::from_ymd_opt(2000, 1, 1),
        };
        let midnight = first
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .unwrap_or_default();
        Schedule {
            anchor: resolve(zone, midnight),
            length,
            zone,
        }
    }

    /// Periods anchored at `anchor` (a subscription's start).
    pub fn anchored(anchor: DateTime<Utc>, length: Length, zone: Tz) -> Schedule {
        Schedule {
            anchor,
            length,
            zone,
        }
    }

    /// The period holding `at`.
    pub fn period_at(&self, at: DateTime<Utc>) -> Period {
        let anchor = self.anchor.with_timezone(&self.zone).naive_local();
        let local = at.with_timezone(&self.zone).naive_local();
        let days = (local.date() - anchor.date()).num_days();
        let mut index = match self.length {
            Length::Day => days,
            Length::Week => days.div_euclid(7),
            Length::Month => months(local.date()) - months(anchor.date()),
        };
        // The estimate counts calendar steps; the time of day (and a clamped day of the month)
        // can put `at` one period either side of it.
        while self.start_of(index) > at {
            index -= 1;
        }
        while self.start_of(index + 1) <= at {
            index += 1;
        }
        Period {
            index,
            start: self.start_of(index),
            end: self.start_of(index + 1),
        }
    }

    /// When period `index` starts.
    pub fn start_of(&self, index: i64) -> DateTime<Utc> {
        let anchor = self.anchor.with_timezone(&self.zone).naive_local();
        let local = match self.length {
            Length::Day => Duration::try_days(index).and_then(|d| anchor.checked_add_signed(d)),
            Length::Week => Duration::try_weeks(index).and_then(|d| anchor.checked_add_signed(d)),
            Length::Month => {
                let month = months(anchor.date()) + index;
                let (year, month0) = (month.div_euclid(12), month.rem_euclid(12));
                i32::try_from(year).ok().and_then(|year| {
                    let day = anchor.day().min(days_in_month(year, month0 as u32 + 1));
                    NaiveDate::from_ymd_opt(year, month0 as u32 + 1, day)
                        .map(|date| date.and_time(anchor.time()))
                })
            }
        };
        match local {
            Some(local) => resolve(self.zone, local),
            None if index < 0 => DateTime::<Utc>::MIN_UTC,
            None => DateTime::<Utc>::MAX_UTC,
        }
    }
}

/// Months since year 0, so months compare and subtract simply.
fn months(date: NaiveDate) -> i64 {
    i64::from(date.year()) * 12 + i64::from(date.month0())
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    };
    next.and_then(|n| n.pred_opt())
        .map_or(28, |last| last.day())
}

/// The instant a local time names in `zone`: the earlier of two, or, for a time a change
/// skipped, the time read with the offset in force before the change.
fn resolve(zone: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    if let Some(at) = zone.from_local_datetime(&local).earliest() {
        return at.with_timezone(&Utc);
    }
    // Gaps last hours (a whole day at most, as Samoa's in 2011): step back to a local time that
    // exists, and use its offset.
    let mut before = local;
    for _ in 0..48 {
        before -= Duration::hours(1);
        if let Some(at) = zone.from_local_datetime(&before).earliest() {
            let offset = at.offset().fix();
            return (local - offset).and_utc();
        }
    }
    local.and_utc()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn starts(schedule: &Schedule, from: i64, count: i64) -> Vec<String> {
        (from..from + count)
            .map(|i| {
                schedule
                    .start_of(i)
                    .with_timezone(&schedule.zone)
                    .to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn month_end_anchors_clamp_and_come_back() {
        let schedule = Schedule::anchored(utc("2028-01-31T10:00:00Z"), Length::Month, Tz::UTC);
        assert_eq!(
            starts(&schedule, 0, 5),
            [
                "2028-01-31T10:00:00+00:00",
                "2028-02-29T10:00:00+00:00", // a leap year
                "2028-03-31T10:00:00+00:00",
                "2028-04-30T10:00:00+00:00",
                "2028-05-31T10:00:00+00:00",
            ]
        );
        assert_eq!(
            schedule.start_of(13).to_rfc3339(),
            "2029-02-28T10:00:00+00:00"
        );
        let period = schedule.period_at(utc("2028-02-29T09:59:59Z"));
        assert_eq!(period.index, 0);
        assert_eq!(period.end, utc("2028-02-29T10:00:00Z"));
        assert_eq!(schedule.period_at(utc("2028-02-29T10:00:00Z")).index, 1);
        // Before the anchor: periods count back the same way.
        assert_eq!(
            schedule.period_at(utc("2027-12-31T10:00:00Z")).start,
            utc("2027-12-31T10:00:00Z")
        );
        assert_eq!(schedule.period_at(utc("2027-12-31T10:00:00Z")).index, -1);
    }

    #[test]
    fn calendar_months_in_a_half_hour_zone_start_at_local_midnight() {
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let schedule = Schedule::calendar(Length::Month, kolkata);
        let period = schedule.period_at(utc("2026-02-28T18:29:59Z"));
        assert_eq!(period.start, utc("2026-01-31T18:30:00Z"), "1 Feb 00:00 IST");
        assert_eq!(period.end, utc("2026-02-28T18:30:00Z"), "1 Mar 00:00 IST");
        assert_eq!(
            schedule.period_at(utc("2026-02-28T18:30:00Z")).start,
            period.end
        );
    }

    #[test]
    fn days_and_weeks_across_daylight_saving_changes() {
        let new_york: Tz = "America/New_York".parse().unwrap();
        // Clocks went forward at 02:00 on 8 March 2026 and back at 02:00 on 1 November.
        let days = Schedule::calendar(Length::Day, new_york);
        let spring = days.period_at(utc("2026-03-08T12:00:00Z"));
        assert_eq!(spring.start, utc("2026-03-08T05:00:00Z"), "midnight EST");
        assert_eq!(spring.end, utc("2026-03-09T04:00:00Z"), "midnight EDT");
        assert_eq!(spring.end - spring.start, Duration::hours(23));
        let autumn = days.period_at(utc("2026-11-01T12:00:00Z"));
        assert_eq!(autumn.end - autumn.start, Duration::hours(25));

        // A daily anchor at 02:30 local: the night 02:30 does not exist it is read with EST's
        // offset (03:30 EDT); the night it happens twice, the first.
        let half_past_two = Schedule::anchored(utc("2026-03-01T07:30:00Z"), Length::Day, new_york);
        assert_eq!(
            starts(&half_past_two, 6, 3),
            [
                "2026-03-07T02:30:00-05:00",
                "2026-03-08T03:30:00-04:00",
                "2026-03-09T02:30:00-04:00",
            ]
        );
        let autumn = Schedule::anchored(utc("2026-10-31T05:30:00Z"), Length::Day, new_york);
        assert_eq!(autumn.start_of(1), utc("2026-11-01T05:30:00Z"), "01:30 EDT");

        let weeks = Schedule::calendar(Length::Week, Tz::UTC);
        let week = weeks.period_at(utc("2026-12-06T13:00:00Z"));
        assert_eq!(week.start, utc("2026-11-30T00:00:00Z"), "a Monday");
        assert_eq!(week.end, utc("2026-12-07T00:00:00Z"));
    }

    fn zones() -> impl Strategy<Value = Tz> {
        prop::sample::select(vec![
            Tz::UTC,
            Tz::Asia__Kolkata,
            Tz::America__New_York,
            Tz::Europe__Berlin,
            Tz::Australia__Lord_Howe,
            Tz::Pacific__Apia,
        ])
    }

    fn lengths() -> impl Strategy<Value = Length> {
        prop::sample::select(vec![Length::Day, Length::Week, Length::Month])
    }

    proptest! {
        /// Every instant is in exactly one period, the periods tile time, and the answer depends
        /// on nothing but its inputs.
        #[test]
        fn periods_tile_time(
            zone in zones(),
            length in lengths(),
            anchor in 946_684_800i64..2_524_608_000,
            at in 946_684_800i64..2_524_608_000,
        ) {
            let schedule = Schedule::anchored(DateTime::from_timestamp(anchor, 0).unwrap(), length, zone);
            let at = DateTime::from_timestamp(at, 0).unwrap();
            let period = schedule.period_at(at);
            prop_assert!(period.start <= at && at < period.end, "{period:?} {at}");
            prop_assert_eq!(schedule.period_at(period.start), period);
            // The next period starts where this one ends (its index is one more, or two where
            // a time zone skipped a whole day: Apia's 30 December 2011 is a period of no length).
            let next = schedule.period_at(period.end);
            prop_assert_eq!(next.start, period.end);
            prop_assert!(next.index == period.index + 1 || schedule.start_of(period.index + 1) == schedule.start_of(period.index + 2));
            prop_assert_eq!(
                schedule.period_at(period.start - Duration::seconds(1)).end,
                period.start
            );
            let longest = match length {
                Length::Day => Duration::hours(49),
                Length::Week => Duration::days(8),
                Length::Month => Duration::days(32),
            };
            prop_assert!(period.end - period.start <= longest);
        }
    }
}
