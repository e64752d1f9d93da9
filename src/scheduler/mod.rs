//! Cron campaigns: the tick that claims due slots exactly once, and the loop around it.
//! Fire times and misfire plans are `domain::cron` and `domain::plan`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::instrument;

use crate::config::SchedulerSettings;
use crate::domain::{cron, plan};
use crate::metrics::Metrics;
use crate::outbox::Relay;
use crate::store::Store;
use crate::store::{bson_time, chrono_time, Claim, RecipientsDoc, RunDoc, RunWrite, ScheduleDoc};
use crate::store::{new_notification, NotificationSpec};
use plan::{PlanLimits, PlannedRun, RunKind};

/// What one tick did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    /// Schedules this instance advanced.
    pub claimed: usize,
    /// Runs that sent a notification.
    pub sent: usize,
    /// Schedules another instance advanced first.
    pub lost: usize,
}

/// The scheduler as a handle: what firing schedules needs, and the wake-up a schedule
/// written in this process gives it.
#[derive(Clone)]
pub struct Scheduler {
    store: Store,
    relay: Relay,
    metrics: Arc<Metrics>,
    settings: SchedulerSettings,
    /// Names this process in its run records.
    instance: String,
    wake: Arc<Notify>,
}

impl Scheduler {
    pub fn new(
        store: Store,
        relay: Relay,
        metrics: Arc<Metrics>,
        settings: &SchedulerSettings,
        instance: &str,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            relay,
            metrics,
            settings: settings.clone(),
            instance: instance.to_owned(),
            wake,
        }
    }

    /// A schedule changed in this process: look again without waiting for the poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// True when nobody would receive a fire: no inline users, an empty (or deleted) group,
/// a segment matching no user.
async fn audience_is_empty(ctx: &Scheduler, r: &RecipientsDoc) -> anyhow::Result<bool> {
    if !r.user_ids.is_empty() {
        return Ok(false);
    }
    if let Some(g) = &r.group_id {
        if ctx
            .store
            .get_group(g)
            .await?
            .is_some_and(|g| g.member_count > 0)
        {
            return Ok(false);
        }
    }
    if let Some(seg) = &r.segment {
        if ctx.store.segment_has_users(seg).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The run record of a planned run, with the notification it sends (if it sends one).
fn run_write(
    ctx: &Scheduler,
    s: &ScheduleDoc,
    p: &PlannedRun,
    now: DateTime<Utc>,
    empty: bool,
) -> RunWrite {
    let reason = match p.kind {
        RunKind::Skipped => Some("misfire_skipped"),
        _ if empty => Some("empty_audience"),
        _ => None,
    };
    let send = reason.is_none().then(|| {
        let event_id = match p.kind {
            RunKind::Manual => format!("schedule:{}:manual:{}", s.id, uuid::Uuid::new_v4()),
            _ => format!("schedule:{}:{}", s.id, p.fire_time.timestamp_millis()),
        };
        new_notification(
            NotificationSpec {
                event_id: Some(event_id),
                event_type: s.event_type.clone(),
                priority: s.priority,
                recipients: s.recipients.clone(),
                channels: s.channels.clone(),
                payload: s.payload.clone(),
                source: "schedule".to_owned(),
                schedule_id: Some(s.id.clone()),
                upstream_created_at: None,
                category: s.category,
            },
            None,
        )
    });
    RunWrite {
        run: RunDoc {
            id: uuid::Uuid::now_v7().to_string(),
            schedule_id: s.id.clone(),
            fire_time: bson_time(p.fire_time),
            kind: p.kind,
            slots: p.slots as i32,
            claimed_at: bson_time(now),
            lag_ms: (now - p.fire_time).num_milliseconds(),
            notification_id: send.as_ref().map(|(n, _)| n.id.clone()),
            reason: reason.map(str::to_owned),
            instance: ctx.instance.clone(),
        },
        send,
    }
}

/// Claims every due slot of one schedule (or learns another instance did).
#[instrument(skip_all, fields(schedule_id = %s.id))]
async fn fire(
    ctx: &Scheduler,
    s: ScheduleDoc,
    now: DateTime<Utc>,
) -> anyhow::Result<(Claim, usize)> {
    let Some(due) = s.next_fire_at else {
        return Ok((Claim::LostRace, 0));
    };
    let (spec, tz) = match (
        s.cron.parse::<cron::CronSpec>(),
        cron::parse_tz(&s.timezone),
    ) {
        (Ok(spec), Ok(tz)) => (spec, tz),
        (Err(e), _) | (_, Err(e)) => {
            // Validated on write; a bad stored value stops this schedule, not the scheduler.
            tracing::error!(error = %e, "stored schedule does not parse; retiring it");
            ctx.store.advance_schedule(&s.id, due, None).await?;
            return Ok((Claim::Fired, 0));
        }
    };
    let limits = PlanLimits {
        grace: chrono::Duration::seconds(ctx.settings.misfire_grace_secs),
        max_catch_up: ctx.settings.max_catch_up,
    };
    let planned = plan::plan(
        &spec,
        tz,
        chrono_time(due),
        s.end_at.map(chrono_time),
        s.misfire_policy,
        now,
        limits,
    );
    let empty = audience_is_empty(ctx, &s.recipients).await?;
    let writes: Vec<RunWrite> = planned
        .runs
        .iter()
        .map(|p| run_write(ctx, &s, p, now, empty))
        .collect();
    let sent = writes.iter().filter(|w| w.send.is_some()).count();
    let next = planned.next.map(bson_time);
    let claim = ctx.store.claim_slots(&s.id, due, next, &writes).await?;
    match claim {
        Claim::Fired => {
            for w in &writes {
                ctx.metrics
                    .scheduler_lag_seconds
                    .observe(w.run.lag_ms.max(0) as f64 / 1000.0);
                tracing::info!(
                    fire_time = %chrono_time(w.run.fire_time),
                    kind = ?w.run.kind,
                    lag_ms = w.run.lag_ms,
                    reason = w.run.reason.as_deref().unwrap_or(""),
                    "schedule fired"
                );
            }
            if sent > 0 {
                ctx.relay.wake();
            }
        }
        Claim::SlotTaken => {
            tracing::warn!("slot already has a run; moving on without firing it again");
            ctx.store.advance_schedule(&s.id, due, next).await?;
        }
        Claim::LostRace => {}
    }
    Ok((claim, sent))
}

/// Fires every schedule due at `now`. Time is a parameter so tests can run days of
/// schedule in milliseconds; any number of instances may tick at once.
pub async fn tick(ctx: &Scheduler, now: DateTime<Utc>) -> anyhow::Result<TickReport> {
    let cfg = &ctx.settings;
    let due = ctx
        .store
        .due_schedules(bson_time(now), cfg.batch_size)
        .await?;
    let mut report = TickReport::default();
    let mut results = futures::stream::iter(due.into_iter().map(|s| fire(ctx, s, now)))
        .buffer_unordered(cfg.concurrency);
    while let Some(r) = results.next().await {
        match r {
            Ok((Claim::Fired, sent)) => {
                report.claimed += 1;
                report.sent += sent;
            }
            Ok((Claim::SlotTaken, _)) => report.claimed += 1,
            Ok((Claim::LostRace, _)) => report.lost += 1,
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "firing a schedule failed; it stays due"
            ),
        }
    }
    Ok(report)
}

/// `POST /v1/schedules/{id}/trigger`: one manual run now; the schedule's slots are untouched.
pub async fn trigger(
    ctx: &Scheduler,
    s: &ScheduleDoc,
    now: DateTime<Utc>,
) -> anyhow::Result<RunDoc> {
    let empty = audience_is_empty(ctx, &s.recipients).await?;
    let w = run_write(
        ctx,
        s,
        &PlannedRun {
            fire_time: now,
            kind: RunKind::Manual,
            slots: 1,
        },
        now,
        empty,
    );
    ctx.store.record_manual_run(&w).await?;
    if w.send.is_some() {
        ctx.relay.wake();
    }
    Ok(w.run)
}

/// Ticks until cancelled, sleeping until the earliest slot (at most the poll interval,
/// so schedules written by other processes are seen), woken early by local changes.
pub async fn run(ctx: Scheduler, cancel: CancellationToken) -> anyhow::Result<()> {
    let poll = Duration::from_millis(ctx.settings.poll_interval_ms);
    tracing::info!("scheduler running");
    while !cancel.is_cancelled() {
        let report = match tick(&ctx, Utc::now()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "scheduler tick failed");
                TickReport::default()
            }
        };
        if report.claimed + report.lost >= ctx.settings.batch_size as usize {
            continue;
        }
        let wait = match ctx.store.next_slot().await {
            Ok(Some(next)) => (chrono_time(next) - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(poll),
            _ => poll,
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    Ok(())
}
