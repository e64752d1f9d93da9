//! What a due schedule does now: which slots fire, which are caught up or skipped, and the next slot.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::cron::CronSpec;

/// What happens to slots missed while no scheduler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MisfirePolicy {
    /// Missed slots are dropped; the schedule moves on to the next future slot.
    Skip,
    /// One catch-up fire stands for all missed slots.
    #[default]
    FireOnce,
    /// Every missed slot fires, up to the configured maximum; the rest are skipped.
    FireAll,
}

/// Why a run happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    OnTime,
    CatchUp,
    /// Missed slots dropped by the `skip` policy (recorded so the history shows them).
    Skipped,
    /// `POST /v1/schedules/{id}/trigger`.
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRun {
    /// The slot this run claims (unique per schedule).
    pub fire_time: DateTime<Utc>,
    pub kind: RunKind,
    /// How many slots this run stands for (more than one for a `fire_once` catch-up or a skip).
    pub slots: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub runs: Vec<PlannedRun>,
    /// The slot to wait for next; `None` retires the schedule (past `end_at`).
    pub next: Option<DateTime<Utc>>,
}

/// Limits on a plan.
#[derive(Debug, Clone, Copy)]
pub struct PlanLimits {
    /// A slot fired within this long of its time is on time; older ones were missed.
    pub grace: Duration,
    /// `fire_all` fires at most this many missed slots.
    pub max_catch_up: usize,
}

/// Most slots ever counted for one plan (a minutely schedule down for a week stops here).
const COUNT_CAP: usize = 10_000;

/// Plans the runs of a schedule whose slot `due` has come (`due <= now`).
pub fn plan(
    spec: &CronSpec,
    tz: Tz,
    due: DateTime<Utc>,
    end_at: Option<DateTime<Utc>>,
    policy: MisfirePolicy,
    now: DateTime<Utc>,
    limits: PlanLimits,
) -> Plan {
    let until = end_at.map_or(now, |e| e.min(now));
    let mut slots = vec![due];
    let (later, _) = spec.between(tz, due, until, COUNT_CAP);
    slots.extend(later);
    slots.retain(|s| end_at.is_none_or(|e| *s <= e));
    let (missed, on_time): (Vec<_>, Vec<_>) =
        slots.into_iter().partition(|s| now - *s > limits.grace);

    let mut runs = Vec::new();
    if let Some(last) = missed.last().copied() {
        match policy {
            MisfirePolicy::Skip => runs.push(PlannedRun {
                fire_time: last,
                kind: RunKind::Skipped,
                slots: missed.len() as u32,
            }),
            MisfirePolicy::FireOnce => runs.push(PlannedRun {
                fire_time: last,
                kind: RunKind::CatchUp,
                slots: missed.len() as u32,
            }),
            MisfirePolicy::FireAll => {
                // The most recent slots are the ones worth sending.
                let dropped = missed.len().saturating_sub(limits.max_catch_up);
                if dropped > 0 {
                    runs.push(PlannedRun {
                        fire_time: missed[dropped - 1],
                        kind: RunKind::Skipped,
                        slots: dropped as u32,
                    });
                }
                runs.extend(missed[dropped..].iter().map(|s| PlannedRun {
                    fire_time: *s,
                    kind: RunKind::CatchUp,
                    slots: 1,
                }));
            }
        }
    }
    runs.extend(on_time.iter().map(|s| PlannedRun {
        fire_time: *s,
        kind: RunKind::OnTime,
        slots: 1,
    }));
    let next = next_within(spec, tz, now, end_at);
    Plan { runs, next }
}

/// The first slot at or after `from` (and not after `end_at`).
pub fn first_slot(
    spec: &CronSpec,
    tz: Tz,
    from: DateTime<Utc>,
    end_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    next_within(spec, tz, from - Duration::milliseconds(1), end_at)
}

/// The first slot strictly after `after`, unless it is past `end_at`.
fn next_within(
    spec: &CronSpec,
    tz: Tz,
    after: DateTime<Utc>,
    end_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    spec.next_after(tz, after, 1)
        .into_iter()
        .next()
        .filter(|n| end_at.is_none_or(|e| *n <= e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("timestamp")
            .with_timezone(&Utc)
    }

    const LIMITS: PlanLimits = PlanLimits {
        grace: Duration::seconds(60),
        max_catch_up: 2,
    };

    fn hourly() -> CronSpec {
        "0 * * * *".parse().expect("cron")
    }

    #[test]
    fn an_on_time_slot_fires_once_and_the_next_is_an_hour_later() {
        let p = plan(
            &hourly(),
            Tz::UTC,
            utc("2026-11-22T10:00:00Z"),
            None,
            MisfirePolicy::FireOnce,
            utc("2026-11-22T10:00:00.300Z"),
            LIMITS,
        );
        assert_eq!(
            p.runs,
            [PlannedRun {
                fire_time: utc("2026-11-22T10:00:00Z"),
                kind: RunKind::OnTime,
                slots: 1
            }]
        );
        assert_eq!(p.next, Some(utc("2026-11-22T11:00:00Z")));
    }

    // A 3-hour outage: slots 07:00, 08:00, 09:00 were missed; 10:00 is due now.
    fn after_outage(policy: MisfirePolicy) -> Plan {
        plan(
            &hourly(),
            Tz::UTC,
            utc("2026-11-22T07:00:00Z"),
            None,
            policy,
            utc("2026-11-22T10:00:10Z"),
            LIMITS,
        )
    }

    #[test]
    fn skip_drops_missed_slots_and_keeps_the_current_one() {
        let p = after_outage(MisfirePolicy::Skip);
        assert_eq!(
            p.runs,
            [
                PlannedRun {
                    fire_time: utc("2026-11-22T09:00:00Z"),
                    kind: RunKind::Skipped,
                    slots: 3
                },
                PlannedRun {
                    fire_time: utc("2026-11-22T10:00:00Z"),
                    kind: RunKind::OnTime,
                    slots: 1
                },
            ]
        );
        assert_eq!(p.next, Some(utc("2026-11-22T11:00:00Z")));
    }

    #[test]
    fn fire_once_catches_up_once_for_all_missed_slots() {
        let p = after_outage(MisfirePolicy::FireOnce);
        assert_eq!(
            p.runs[0],
            PlannedRun {
                fire_time: utc("2026-11-22T09:00:00Z"),
                kind: RunKind::CatchUp,
                slots: 3
            }
        );
        assert_eq!(p.runs[1].kind, RunKind::OnTime);
        assert_eq!(p.runs.len(), 2);
    }

    #[test]
    fn fire_all_fires_each_missed_slot_up_to_the_maximum() {
        let p = after_outage(MisfirePolicy::FireAll);
        let kinds: Vec<_> = p
            .runs
            .iter()
            .map(|r| (r.fire_time, r.kind, r.slots))
            .collect();
        assert_eq!(
            kinds,
            [
                (utc("2026-11-22T07:00:00Z"), RunKind::Skipped, 1),
                (utc("2026-11-22T08:00:00Z"), RunKind::CatchUp, 1),
                (utc("2026-11-22T09:00:00Z"), RunKind::CatchUp, 1),
                (utc("2026-11-22T10:00:00Z"), RunKind::OnTime, 1),
            ]
        );
    }

    #[test]
    fn end_at_retires_the_schedule_and_bounds_catch_up() {
        let p = plan(
            &hourly(),
            Tz::UTC,
            utc("2026-11-22T07:00:00Z"),
            Some(utc("2026-11-22T08:30:00Z")),
            MisfirePolicy::FireAll,
            utc("2026-11-22T10:00:10Z"),
            LIMITS,
        );
        assert_eq!(
            p.runs.iter().map(|r| r.fire_time).collect::<Vec<_>>(),
            [utc("2026-11-22T07:00:00Z"), utc("2026-11-22T08:00:00Z")]
        );
        assert_eq!(p.next, None);
    }

    #[test]
    fn the_first_slot_may_be_the_start_itself() {
        assert_eq!(
            first_slot(&hourly(), Tz::UTC, utc("2026-11-22T10:00:00Z"), None),
            Some(utc("2026-11-22T10:00:00Z"))
        );
        assert_eq!(
            first_slot(&hourly(), Tz::UTC, utc("2026-11-22T10:00:01Z"), None),
            Some(utc("2026-11-22T11:00:00Z"))
        );
    }
}
