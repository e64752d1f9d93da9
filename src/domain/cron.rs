//! Cron expressions (standard 5-field) and their fire instants in a time zone, DST included.
//!
//! Accepted syntax: `minute hour day-of-month month day-of-week`, with `*`, lists `a,b`,
//! ranges `a-b`, steps `*/n` and `a-b/n`, month names `JAN`-`DEC`, weekday names
//! `SUN`-`SAT` and numbers `0`-`7` (0 and 7 are Sunday), and the macros `@yearly`
//! (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`) and `@hourly`. Seconds
//! fields are not accepted. As in Vixie cron, when both day-of-month and day-of-week are
//! restricted, a day matching either fires.
//!
//! Daylight saving time, in the schedule's IANA zone:
//! - a wall-clock time that does not exist (spring-forward gap) fires once, at the first
//!   instant after the gap;
//! - a wall-clock time that occurs twice (fall-back fold) fires once, at its first
//!   occurrence — except for schedules whose hour field is `*` (hourly and sub-hourly),
//!   which fire at every real hour, both passes of the fold included.

use std::collections::BTreeSet;
use std::str::FromStr;

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use cron::{Schedule, TimeUnitSpec};

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct CronSpec {
    source: String,
    /// One schedule, or two whose union is the Vixie day-of-month OR day-of-week rule.
    schedules: Vec<Schedule>,
    every_hour: bool,
}

const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn weekday(token: &str) -> Result<u32, String> {
    if let Some(i) = DAYS.iter().position(|d| d.eq_ignore_ascii_case(token)) {
        return Ok(i as u32);
    }
    match token.parse::<u32>() {
        Ok(n @ 0..=6) => Ok(n),
        Ok(7) => Ok(0),
        _ => Err(format!(
            "`{token}` is not a day of the week (0-7 or SUN-SAT)"
        )),
    }
}

/// Standard day-of-week field -> the set of weekdays (0 = Sunday).
fn weekdays(field: &str) -> Result<BTreeSet<u32>, String> {
    let mut set = BTreeSet::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("`{s}` is not a step"))?,
            ),
            None => (item, 1),
        };
        let (lo, hi) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            // `5-7` means Friday to Sunday: keep 7 as 7 for the range, fold later.
            let hi = if b == "7" { 7 } else { weekday(b)? };
            (weekday(a)?, hi)
        } else {
            let d = weekday(range)?;
            (d, if step > 1 { 6 } else { d })
        };
        if lo > hi {
            return Err(format!("`{range}` is a backwards range"));
        }
        set.extend((lo..=hi).step_by(step as usize).map(|d| d % 7));
    }
    Ok(set)
}

impl FromStr for CronSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let source = s.trim().to_owned();
        let expanded = match source.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_owned(),
            "@monthly" => "0 0 1 * *".to_owned(),
            "@weekly" => "0 0 * * 0".to_owned(),
            "@daily" | "@midnight" => "0 0 * * *".to_owned(),
            "@hourly" => "0 * * * *".to_owned(),
            m if m.starts_with('@') => return Err(format!("unknown macro `{source}`")),
            _ => source.clone(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            ));
        };
        let days = weekdays(dow)?;
        let dow_crate = if days.len() == 7 {
            "*".to_owned()
        } else {
            days.iter()
                .map(|d| DAYS[*d as usize])
                .collect::<Vec<_>>()
                .join(",")
        };
        let dom_restricted = dom != "*" && dom != "?";
        let dow_restricted = days.len() != 7;
        let parse = |d: &str, w: &str| {
            Schedule::from_str(&format!("0 {minute} {hour} {d} {month} {w}"))
                .map_err(|e| format!("invalid cron expression: {e}"))
        };
        let schedules = if dom_restricted && dow_restricted {
            vec![parse(dom, "*")?, parse("*", &dow_crate)?]
        } else {
            vec![parse(dom, &dow_crate)?]
        };
        let every_hour = schedules[0].hours().is_all();
        Ok(Self {
            source,
            schedules,
            every_hour,
        })
    }
}

impl CronSpec {
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Wall-clock slots strictly after `after` (a naive local time), in order.
    fn local_slots(&self, after: NaiveDateTime) -> impl Iterator<Item = NaiveDateTime> + '_ {
        let start = after.and_utc();
        let mut iters: Vec<_> = self
            .schedules
            .iter()
            .map(|s| s.after(&start).peekable())
            .collect();
        std::iter::from_fn(move || {
            let (i, _) = iters
                .iter_mut()
                .enumerate()
                .filter_map(|(i, it)| it.peek().map(|t| (i, *t)))
                .min_by_key(|(_, t)| *t)?;
            let t = iters[i].next()?;
            // The union of two schedules may name one time twice.
            for it in iters.iter_mut() {
                while it.peek() == Some(&t) {
                    it.next();
                }
            }
            Some(t.naive_utc())
        })
    }

    /// The instants a wall-clock slot fires at in `tz` (see the module doc for DST).
    fn instants(&self, tz: Tz, slot: NaiveDateTime) -> Vec<DateTime<Utc>> {
        match tz.from_local_datetime(&slot) {
            LocalResult::Single(t) => vec![t.with_timezone(&Utc)],
            LocalResult::Ambiguous(first, second) => {
                if self.every_hour {
                    vec![first.with_timezone(&Utc), second.with_timezone(&Utc)]
                } else {
                    vec![first.with_timezone(&Utc)]
                }
            }
            LocalResult::None => {
                // In a gap: the first wall-clock minute that exists again.
                let mut probe = slot;
                for _ in 0..(26 * 60) {
                    probe += Duration::minutes(1);
                    if let Some(t) = tz.from_local_datetime(&probe).earliest() {
                        return vec![t.with_timezone(&Utc)];
                    }
                }
                Vec::new()
            }
        }
    }

    /// The next `count` fire instants strictly after `after`.
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        if count == 0 {
            return Vec::new();
        }
        // Start a few hours early in wall-clock time: in a fold, the wall clock repeats.
        let margin = Duration::hours(3);
        let start = after.with_timezone(&tz).naive_local() - margin;
        let mut found = BTreeSet::new();
        let mut stop_at: Option<NaiveDateTime> = None;
        for slot in self.local_slots(start) {
            if stop_at.is_some_and(|s| slot > s) {
                break;
            }
            found.extend(self.instants(tz, slot).into_iter().filter(|t| *t > after));
            if stop_at.is_none() && found.len() >= count {
                // Later slots can still yield earlier instants only within a DST shift.
                stop_at = Some(slot + margin);
            }
        }
        found.into_iter().take(count).collect()
    }

    /// Every fire instant in `(after, until]`, at most `limit` of them, and whether more exist.
    pub fn between(
        &self,
        tz: Tz,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> (Vec<DateTime<Utc>>, bool) {
        let mut all = self.next_after(tz, after, limit + 1);
        all.retain(|t| *t <= until);
        let more = all.len() > limit;
        all.truncate(limit);
        (all, more)
    }
}

/// Parses an IANA time zone name.
pub fn parse_tz(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("`{name}` is not an IANA time zone (such as Europe/Berlin)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("timestamp")
            .with_timezone(&Utc)
    }

    fn fires(cron: &str, tz: &str, after: &str, n: usize) -> Vec<String> {
        let spec: CronSpec = cron.parse().expect("cron");
        spec.next_after(parse_tz(tz).expect("tz"), utc(after), n)
            .iter()
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .collect()
    }

    #[test]
    fn utc_daily_and_weekday_numbers_are_standard() {
        assert_eq!(
            fires("0 9 * * 1", "UTC", "2026-11-22T00:00:00Z", 2), // 2026-11-22 is a Sunday
            ["2026-11-23T09:00:00Z", "2026-11-30T09:00:00Z"],
            "1 is Monday"
        );
        assert_eq!(
            fires("0 9 * * 7", "UTC", "2026-11-22T10:00:00Z", 1),
            ["2026-11-29T09:00:00Z"]
        );
        assert_eq!(
            fires("0 9 * * SUN", "UTC", "2026-11-22T10:00:00Z", 1),
            ["2026-11-29T09:00:00Z"]
        );
        assert_eq!(
            fires("30 4 * * 1-5", "UTC", "2026-11-20T05:00:00Z", 2), // Friday after 04:30
            ["2026-11-23T04:30:00Z", "2026-11-24T04:30:00Z"]
        );
        assert_eq!(
            fires("@daily", "UTC", "2026-11-22T10:00:00Z", 1),
            ["2026-11-23T00:00:00Z"]
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_as_in_vixie_cron() {
        // The 1st of the month OR any Monday.
        assert_eq!(
            fires("0 0 1 * 1", "UTC", "2026-11-22T00:00:00Z", 3),
            [
                "2026-11-23T00:00:00Z",
                "2026-11-30T00:00:00Z",
                "2026-12-01T00:00:00Z"
            ]
        );
    }

    #[test]
    fn refusals_say_why() {
        for bad in [
            "",
            "* * * *",
            "0 0 * * * *",
            "61 * * * *",
            "0 0 * * 8",
            "@sometimes",
            "a b c d e",
        ] {
            assert!(bad.parse::<CronSpec>().is_err(), "{bad}");
        }
        assert!(parse_tz("Mars/Olympus").is_err());
    }

    #[test]
    fn europe_berlin_spring_gap_fires_once_at_the_first_instant_after_it() {
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        assert_eq!(
            fires("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]
        );
        // Hourly: the missing hour is simply not there; 03:00 fires once.
        assert_eq!(
            fires("0 * * * *", "Europe/Berlin", "2026-03-28T23:30:00Z", 3),
            [
                "2026-03-29T00:00:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-29T02:00:00Z"
            ]
        );
    }

    #[test]
    fn europe_berlin_fall_fold_fires_daily_once_and_hourly_every_real_hour() {
        // 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens at 00:30 and 01:30 UTC.
        assert_eq!(
            fires("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
        );
        assert_eq!(
            fires("0 * * * *", "Europe/Berlin", "2026-10-24T23:30:00Z", 4),
            [
                "2026-10-25T00:00:00Z",
                "2026-10-25T01:00:00Z",
                "2026-10-25T02:00:00Z",
                "2026-10-25T03:00:00Z"
            ]
        );
        assert_eq!(
            fires("*/30 * * * *", "Europe/Berlin", "2026-10-25T00:10:00Z", 4),
            [
                "2026-10-25T00:30:00Z",
                "2026-10-25T01:00:00Z",
                "2026-10-25T01:30:00Z",
                "2026-10-25T02:00:00Z"
            ]
        );
        // Asked from inside the second pass, the first pass is not fired again.
        assert_eq!(
            fires("30 2 * * *", "Europe/Berlin", "2026-10-25T01:00:00Z", 1),
            ["2026-10-26T01:30:00Z"]
        );
    }

    #[test]
    fn america_new_york_transitions() {
        // 2026-03-08 02:00 EST -> 03:00 EDT (07:00 UTC); 2026-11-01 02:00 EDT -> 01:00 EST.
        assert_eq!(
            fires("15 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", 2),
            ["2026-03-08T07:00:00Z", "2026-03-09T06:15:00Z"]
        );
        assert_eq!(
            fires("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
        );
    }

    #[test]
    fn australia_sydney_southern_hemisphere() {
        // 2026-04-05 03:00 AEDT -> 02:00 AEST (fold); 2026-10-04 02:00 AEST -> 03:00 AEDT (gap).
        assert_eq!(
            fires("30 2 * * *", "Australia/Sydney", "2026-04-04T00:00:00Z", 1),
            ["2026-04-04T15:30:00Z"]
        );
        assert_eq!(
            fires("30 2 * * *", "Australia/Sydney", "2026-10-03T00:00:00Z", 2),
            ["2026-10-03T16:00:00Z", "2026-10-04T15:30:00Z"]
        );
    }

    #[test]
    fn asia_kolkata_half_hour_offset_and_utc() {
        assert_eq!(
            fires("0 9 * * *", "Asia/Kolkata", "2026-11-22T00:00:00Z", 1),
            ["2026-11-22T03:30:00Z"]
        );
        assert_eq!(
            fires("*/20 * * * *", "UTC", "2026-11-22T00:05:00Z", 3),
            [
                "2026-11-22T00:20:00Z",
                "2026-11-22T00:40:00Z",
                "2026-11-22T01:00:00Z"
            ]
        );
    }

    #[test]
    fn between_is_bounded() {
        let spec: CronSpec = "* * * * *".parse().expect("cron");
        let (slots, more) = spec.between(
            Tz::UTC,
            utc("2026-11-22T00:00:00Z"),
            utc("2026-11-22T03:00:00Z"),
            10,
        );
        assert_eq!(slots.len(), 10);
        assert!(more);
    }
}

/// Properties over arbitrary input: parsing never panics; fire instants are strictly
/// increasing, after the given instant, and as many as asked for (a schedule that fires
/// at all fires at least once every 8 years).
#[cfg(test)]
mod properties {
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    use super::CronSpec;

    fn field(max: u32) -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_owned()),
            (0..=max).prop_map(|n| n.to_string()),
            (0..=max, 0..=max).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
            (1..=max.max(1)).prop_map(|n| format!("*/{n}")),
            (0..=max, 0..=max).prop_map(|(a, b)| format!("{a},{b}")),
        ]
    }

    fn expression() -> impl Strategy<Value = String> {
        (field(59), field(23), field(28), field(12), field(6)).prop_map(|(m, h, dom, mon, dow)| {
            format!(
                "{m} {h} {} {} {dow}",
                dom.replace('0', "1"),
                mon.replace('0', "1")
            )
        })
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,64}", tz in ".{0,32}") {
            let _ = text.parse::<CronSpec>();
            let _ = super::parse_tz(&tz);
        }

        #[test]
        fn fire_instants_increase_strictly_after_the_start(
            expr in expression(),
            zone in 0..chrono_tz::TZ_VARIANTS.len(),
            start in 0i64..4_000_000_000,
        ) {
            let Ok(spec) = expr.parse::<CronSpec>() else { return Ok(()) };
            let tz = chrono_tz::TZ_VARIANTS[zone];
            let after = Utc.timestamp_opt(start, 0).single().expect("in range");
            let fires = spec.next_after(tz, after, 5);
            prop_assert!(fires.len() <= 5);
            prop_assert!(fires.iter().all(|t| *t > after), "{expr} in {tz}: {fires:?}");
            prop_assert!(fires.windows(2).all(|w| w[0] < w[1]), "{expr} in {tz}: {fires:?}");
        }
    }
}
