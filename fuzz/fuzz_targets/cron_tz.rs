//! Any text as `cron expression \n time zone`: no panic; fire instants strictly increase.
#![no_main]

use chrono::{TimeZone, Utc};
use herald::domain::cron::{parse_tz, CronSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (expr, zone) = text.split_once('\n').unwrap_or((text, "UTC"));
    let (Ok(spec), Ok(tz)) = (expr.parse::<CronSpec>(), parse_tz(zone)) else {
        return;
    };
    let after = Utc.with_ymd_and_hms(2026, 3, 29, 0, 30, 0).unwrap();
    let fires = spec.next_after(tz, after, 3);
    assert!(fires.iter().all(|t| *t > after));
    assert!(fires.windows(2).all(|w| w[0] < w[1]));
});
