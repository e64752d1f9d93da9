//! Campaign schedules: fired by `scheduler::tick(now)` with the clock as a parameter.

use std::time::Duration;

use chrono::{DateTime, Utc};
use herald::app::Context;
use herald::scheduler::tick;
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, Roles, TestApp, TestOptions};

async fn app() -> TestApp {
    spawn_app_with(TestOptions {
        roles: Roles::NoScheduler,
        ..Default::default()
    })
    .await
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

async fn with_users(app: &TestApp, n: usize) {
    let ids: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    for id in &ids {
        app.put_user(
            id,
            json!({"email": format!("{id}@example.com"), "first_name": id}),
        )
        .await;
    }
    let (status, body) = app
        .put(
            "/v1/groups/crowd",
            &json!({"name": "Crowd", "user_ids": ids}),
        )
        .await;
    assert!(status == 201 || status == 200, "{body}");
}

/// A yearly campaign (Jan 1, 09:00 in `tz`) so no real clock ever reaches it during a test.
fn yearly(tz: &str, policy: &str) -> Value {
    json!({
        "name": "new year", "cron": "0 9 1 1 *", "timezone": tz,
        "event_type": "greeting", "channels": ["email"],
        "recipients": {"group_id": "crowd"}, "payload": {"note": "happy new year"},
        "misfire_policy": policy
    })
}

async fn create(app: &TestApp, body: &Value) -> (String, DateTime<Utc>) {
    let (status, created) = app.post("/v1/schedules", body).await;
    assert_eq!(status, 201, "{created}");
    let next = at(created["next_fire_at"].as_str().expect("next"));
    (
        created["schedule_id"].as_str().expect("id").to_owned(),
        next,
    )
}

async fn runs(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, body) = app.get(&format!("/v1/schedules/{id}/runs")).await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_schedule_fires_once_at_its_slot_and_its_emails_arrive() {
    let app = app().await;
    with_users(&app, 2).await;
    let (id, next) = create(&app, &yearly("Europe/Berlin", "fire_once")).await;
    assert_eq!(
        next.format("%m-%d %H:%M").to_string(),
        "01-01 08:00",
        "09:00 CET is 08:00 UTC"
    );

    let before = tick(&app.ctx.scheduler, next - chrono::Duration::seconds(1))
        .await
        .expect("tick");
    assert_eq!(before.claimed, 0, "not before its time");
    let report = tick(
        &app.ctx.scheduler,
        next + chrono::Duration::milliseconds(250),
    )
    .await
    .expect("tick");
    assert_eq!((report.claimed, report.sent), (1, 1));
    let again = tick(
        &app.ctx.scheduler,
        next + chrono::Duration::milliseconds(500),
    )
    .await
    .expect("tick");
    assert_eq!(again.claimed, 0, "a slot fires once");

    let mails = app.smtp.wait_for(2, 20).await;
    assert!(mails.iter().all(|m| m.text().contains("happy new year")));
    let runs = runs(&app, &id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["kind"], "on_time");
    assert_eq!(runs[0]["lag_ms"], 250);
    let (_, s) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(s["fire_count"], 1);
    use chrono::Datelike;
    assert_eq!(
        at(s["next_fire_at"].as_str().expect("next")),
        next.with_year(next.year() + 1).expect("date"),
        "a year later"
    );
    // The notification says which schedule fired it.
    let n = app
        .wait_finished(runs[0]["notification_id"].as_str().expect("n"), 20)
        .await;
    assert_eq!(n["counts"]["sent"], 2);
    app.stop().await;
}

#[tokio::test]
async fn invalid_schedules_are_refused_with_stable_codes_and_write_nothing() {
    let app = app().await;
    with_users(&app, 1).await;
    let base = yearly("UTC", "fire_once");
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases = [
        (with("cron", json!("61 * * * *")), "invalid_cron"),
        (with("cron", json!("0 0 * * * *")), "invalid_cron"),
        (with("timezone", json!("Mars/Olympus")), "unknown_timezone"),
        (
            with("misfire_policy", json!("sometimes")),
            "validation_failed",
        ),
        (
            {
                let mut b = with("start_at", json!("2030-01-02T00:00:00Z"));
                b["end_at"] = json!("2030-01-01T00:00:00Z");
                b
            },
            "validation_failed",
        ),
        (
            with("recipients", json!({"group_id": "nobody"})),
            "unknown_group",
        ),
        (with("recipients", json!({})), "no_recipients"),
        (
            with("event_type", json!("never-templated")),
            "template_missing",
        ),
        (with("channels", json!(["push"])), "template_missing"),
        (with("colour", json!("red")), "validation_failed"),
    ];
    for (body, code) in cases {
        let (status, answer) = app.post("/v1/schedules", &body).await;
        assert_eq!(status, 422, "{code}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
    }
    assert_eq!(app.count("schedules").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn three_schedulers_racing_over_the_same_slots_fire_each_exactly_once() {
    let app = app().await;
    with_users(&app, 1).await;
    const N: usize = 1000;
    let mut slot = None;
    for i in 0..N {
        let mut body = yearly("UTC", "fire_once");
        body["name"] = json!(format!("race {i}"));
        let (_, next) = create(&app, &body).await;
        slot = Some(next);
    }
    let slot = slot.expect("slot") + chrono::Duration::milliseconds(100);
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(
            Context::build((*app.ctx.settings).clone())
                .await
                .expect("instance"),
        );
    }
    let mut claimed = 0;
    let mut lost = 0;
    loop {
        let (a, b, c) = tokio::join!(
            tick(&instances[0].scheduler, slot),
            tick(&instances[1].scheduler, slot),
            tick(&instances[2].scheduler, slot)
        );
        let reports = [a.expect("a"), b.expect("b"), c.expect("c")];
        let round: usize = reports.iter().map(|r| r.claimed).sum();
        claimed += round;
        lost += reports.iter().map(|r| r.lost).sum::<usize>();
        if round == 0 {
            break;
        }
    }
    assert_eq!(claimed, N, "every slot claimed once ({lost} lost races)");
    assert_eq!(app.count("schedule_runs").await, N as u64);
    let mails = app.smtp.wait_for(N, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.smtp.mails().len(), N, "one email per slot, not more");
    assert_eq!(mails.len(), N);
    app.stop().await;
}

#[tokio::test]
async fn pause_stops_fires_and_resume_continues_at_the_next_slot() {
    let app = app().await;
    with_users(&app, 1).await;
    let (id, next) = create(&app, &yearly("UTC", "fire_once")).await;
    let (status, paused) = app
        .post(&format!("/v1/schedules/{id}/pause"), &json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(paused["status"], "paused");
    let r = tick(&app.ctx.scheduler, next + chrono::Duration::seconds(1))
        .await
        .expect("tick");
    assert_eq!(r.claimed, 0, "paused");
    let (_, listed) = app.get("/v1/schedules?status=paused").await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1));
    let (status, resumed) = app
        .post(&format!("/v1/schedules/{id}/resume"), &json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(resumed["status"], "active");
    assert_eq!(at(resumed["next_fire_at"].as_str().expect("next")), next);
    assert_eq!(
        tick(&app.ctx.scheduler, next + chrono::Duration::seconds(1))
            .await
            .expect("tick")
            .claimed,
        1
    );
    assert_eq!(app.delete(&format!("/v1/schedules/{id}")).await, 204);
    assert_eq!(app.get(&format!("/v1/schedules/{id}")).await.0, 404);
    app.stop().await;
}

/// An hourly schedule whose scheduler was down from its slot T for 3 hours.
async fn after_outage(policy: &str) -> (TestApp, Vec<Value>) {
    let app = app().await;
    with_users(&app, 1).await;
    let mut body = yearly("UTC", policy);
    body["cron"] = json!("0 * * * *");
    let (id, next) = create(&app, &body).await;
    let now = next + chrono::Duration::hours(3) + chrono::Duration::seconds(10);
    let r = tick(&app.ctx.scheduler, now).await.expect("tick");
    assert_eq!(r.claimed, 1);
    let mut runs = runs(&app, &id).await;
    runs.reverse();
    let (_, s) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(
        at(s["next_fire_at"].as_str().expect("next")),
        next + chrono::Duration::hours(4),
        "moves on to the next future slot"
    );
    (app, runs)
}

fn kinds(runs: &[Value]) -> Vec<(String, i64, bool)> {
    runs.iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or_default().to_owned(),
                r["slots"].as_i64().unwrap_or(0),
                r["notification_id"].is_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn after_a_three_hour_outage_skip_sends_only_the_current_slot() {
    let (app, runs) = after_outage("skip").await;
    assert_eq!(
        kinds(&runs),
        [("skipped".into(), 3, false), ("on_time".into(), 1, true)]
    );
    assert_eq!(runs[0]["reason"], "misfire_skipped");
    assert_eq!(app.smtp.wait_for(1, 20).await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn after_a_three_hour_outage_fire_once_catches_up_once() {
    let (app, runs) = after_outage("fire_once").await;
    assert_eq!(
        kinds(&runs),
        [("catch_up".into(), 3, true), ("on_time".into(), 1, true)]
    );
    assert!(runs[0]["lag_ms"].as_i64().unwrap_or(0) >= 3_600_000);
    assert_eq!(app.smtp.wait_for(2, 20).await.len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn after_a_three_hour_outage_fire_all_fires_every_missed_slot() {
    let (app, runs) = after_outage("fire_all").await;
    assert_eq!(
        kinds(&runs),
        [
            ("catch_up".into(), 1, true),
            ("catch_up".into(), 1, true),
            ("catch_up".into(), 1, true),
            ("on_time".into(), 1, true)
        ]
    );
    assert_eq!(app.smtp.wait_for(4, 20).await.len(), 4);
    app.stop().await;
}

#[tokio::test]
async fn an_empty_audience_records_a_run_with_zero_deliveries_and_a_reason() {
    let app = app().await;
    with_users(&app, 0).await;
    let (id, next) = create(&app, &yearly("UTC", "fire_once")).await;
    tick(&app.ctx.scheduler, next).await.expect("tick");
    let runs = runs(&app, &id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["reason"], "empty_audience");
    assert_eq!(runs[0]["deliveries"], 0);
    assert_eq!(app.count("notifications").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn end_at_retires_a_schedule_after_its_last_slot() {
    let app = app().await;
    with_users(&app, 1).await;
    let mut body = yearly("UTC", "fire_once");
    body["cron"] = json!("0 9 * * *");
    let (_, other) = app.post("/v1/schedules", &body).await;
    let first = at(other["next_fire_at"].as_str().expect("next"));
    body["end_at"] = json!((first + chrono::Duration::hours(1)).to_rfc3339());
    let (id, next) = create(&app, &body).await;
    assert_eq!(next, first);
    tick(&app.ctx.scheduler, next + chrono::Duration::seconds(1))
        .await
        .expect("tick");
    let (_, s) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(s["status"], "retired");
    assert_eq!(s["next_fire_at"], Value::Null);
    assert_eq!(
        tick(&app.ctx.scheduler, next + chrono::Duration::days(2))
            .await
            .expect("tick")
            .claimed,
        1,
        "only the other schedule"
    );
    assert_eq!(runs(&app, &id).await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn next_fire_times_trigger_and_patch() {
    let app = app().await;
    with_users(&app, 1).await;
    let mut body = yearly("Asia/Kolkata", "fire_once");
    body["cron"] = json!("30 9 * * MON-FRI");
    let (id, _) = create(&app, &body).await;
    let (status, next) = app.get(&format!("/v1/schedules/{id}/next?count=3")).await;
    assert_eq!(status, 200, "{next}");
    let items = next["items"].as_array().expect("items");
    assert_eq!(items.len(), 3);
    for i in items {
        assert!(
            i["local"]
                .as_str()
                .is_some_and(|l| l.contains("T09:30:00+05:30")),
            "{i}"
        );
        assert!(
            i["at"].as_str().is_some_and(|u| u.contains("T04:00:00Z")),
            "{i}"
        );
    }
    assert_eq!(
        app.get(&format!("/v1/schedules/{id}/next?count=0")).await.0,
        422
    );

    let (status, run) = app
        .post(&format!("/v1/schedules/{id}/trigger"), &json!({}))
        .await;
    assert_eq!(status, 202, "{run}");
    app.wait_finished(run["notification_id"].as_str().expect("n"), 20)
        .await;
    assert_eq!(app.smtp.wait_for(1, 10).await.len(), 1);
    assert_eq!(runs(&app, &id).await[0]["kind"], "manual");

    let (status, bad) = app
        .patch(&format!("/v1/schedules/{id}"), &json!({"cron": "nope"}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(bad["error"]["code"], "invalid_cron");
    let (status, patched) = app
        .patch(
            &format!("/v1/schedules/{id}"),
            &json!({"cron": "0 12 * * *", "timezone": "UTC"}),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["cron"], "0 12 * * *");
    assert!(patched["next_fire_at"]
        .as_str()
        .is_some_and(|t| t.contains("T12:00:00")));
    assert_eq!(patched["name"], "new year", "untouched fields stay");
    app.stop().await;
}

#[tokio::test]
async fn the_seed_format_schedule_creates_a_campaign_and_send_at_delays_a_one_off() {
    let app = app().await;
    with_users(&app, 1).await;
    let event = json!({
        "event_id": "seed-sched-1", "event_type": "greeting", "created_dt": "2021-07-25 10:00:00",
        "schedule": "5 4 * * *", "start_dt": "2030-01-01", "priority": 3,
        "payload": {"user": ["c0"], "note": "daily"}
    });
    let (status, created) = app.post_event(&event).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["next_fire_at"], "2030-01-01T04:05:00.000Z");
    let (status, again) = app.post_event(&event).await;
    assert_eq!(status, 200);
    assert_eq!(again["schedule_id"], created["schedule_id"]);
    let (_, s) = app
        .get(&format!(
            "/v1/schedules/{}",
            created["schedule_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(s["cron"], "5 4 * * *");
    assert_eq!(s["priority"], "low");
    assert_eq!(s["recipients"]["user_ids"], json!(["c0"]));

    let send_at = Utc::now() + chrono::Duration::seconds(2);
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"], "recipients": {"user_ids": ["c0"]},
                            "payload": {"note": "later"}, "send_at": send_at.to_rfc3339()}))
        .await;
    assert_eq!(status, 202);
    let (_, n) = app
        .get(&format!(
            "/v1/notifications/{}",
            body["notification_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(n["status"], "scheduled");
    let mails = app.smtp.wait_for(1, 20).await;
    assert!(Utc::now() >= send_at, "not sent before send_at");
    assert!(mails[0].text().contains("later"));
    app.stop().await;
}

#[tokio::test]
async fn the_running_scheduler_fires_a_slot_when_it_comes() {
    // The whole process, with its real clock.
    let app = crate::helpers::spawn_app().await;
    with_users(&app, 1).await;
    let (id, _) = create(&app, &yearly("UTC", "fire_once")).await;
    // Bring the slot to a second from now, as if the year had passed.
    let slot = Utc::now() + chrono::Duration::seconds(1);
    let slot = mongodb::bson::DateTime::from_millis(slot.timestamp_millis());
    app.db
        .collection::<mongodb::bson::Document>("schedules")
        .update_one(
            mongodb::bson::doc! {"_id": &id},
            mongodb::bson::doc! {"$set": {"next_fire_at": slot}},
        )
        .await
        .expect("move the slot");
    let mail = app.smtp.wait_for(1, 20).await;
    assert!(mail[0].text().contains("happy new year"));
    let runs = runs(&app, &id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["kind"], "on_time");
    assert_eq!(runs[0]["fire_time"], crate::helpers::iso(slot));
    app.stop().await;
}
