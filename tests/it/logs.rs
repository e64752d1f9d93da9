//! The ops surface: the delivery log's filters and cursors, statistics, the live stream,
//! retention — checked against the raw documents read straight from MongoDB.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use herald::domain::{Channel, DeliveryStatus};
use herald::store::{DeliveryFilter, LogCursor};
use mongodb::bson::{doc, DateTime, Document};
use serde_json::{json, Value};

use crate::helpers::{iso, spawn_app, spawn_app_with, winning_plan, TestApp, TestOptions};

/// A delivery as stored, read without herald's code.
#[derive(Debug, Clone)]
struct Raw {
    id: String,
    notification_id: String,
    user_id: String,
    channel: String,
    status: String,
    event_type: String,
    provider: Option<String>,
    schedule_id: Option<String>,
    created_at: DateTime,
    latency_ms: Option<i64>,
}

async fn raw_deliveries(app: &TestApp) -> Vec<Raw> {
    let docs: Vec<Document> = app
        .db
        .collection::<Document>("deliveries")
        .find(doc! {})
        .await
        .expect("find")
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|d| d.expect("doc"))
        .collect();
    docs.into_iter()
        .map(|d| {
            let created_at = *d.get_datetime("created_at").expect("created_at");
            let latency_ms = d.get_datetime("sent_at").ok().map(|s| {
                let accepted = d.get_datetime("accepted_at").expect("accepted_at");
                s.timestamp_millis() - accepted.timestamp_millis()
            });
            Raw {
                id: d.get_str("_id").expect("id").to_owned(),
                notification_id: d.get_str("notification_id").expect("n").to_owned(),
                user_id: d.get_str("user_id").expect("u").to_owned(),
                channel: d.get_str("channel").expect("c").to_owned(),
                status: d.get_str("status").expect("s").to_owned(),
                event_type: d.get_str("event_type").expect("e").to_owned(),
                provider: d.get_str("provider").ok().map(str::to_owned),
                schedule_id: d.get_str("schedule_id").ok().map(str::to_owned),
                created_at,
                latency_ms,
            }
        })
        .collect()
}

/// Newest first, ties broken by id: the order the log promises.
fn newest_first(mut v: Vec<&Raw>) -> Vec<String> {
    v.sort_by(|a, b| {
        (b.created_at.timestamp_millis(), &b.id).cmp(&(a.created_at.timestamp_millis(), &a.id))
    });
    v.into_iter().map(|r| r.id.clone()).collect()
}

/// Walks every page of a log query; returns the ids in the order served.
async fn walk(app: &TestApp, query: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/deliveries?limit={limit}");
        if !query.is_empty() {
            path.push('&');
            path.push_str(query);
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{path}: {page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= limit);
        ids.extend(
            items
                .iter()
                .map(|i| i["delivery_id"].as_str().expect("id").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ids,
        }
    }
}

async fn seed_users(app: &TestApp, n: usize) -> Vec<String> {
    let mut ndjson = String::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("u{i:04}");
        let mut user =
            json!({"user_id": id, "email": format!("{id}@example.com"), "first_name": "P"});
        if i % 2 == 0 {
            user["phone"] = json!(format!("+1555{i:07}"));
        }
        ndjson.push_str(&user.to_string());
        ndjson.push('\n');
        ids.push(id);
    }
    let (status, report) = crate::helpers::answer(
        app.http
            .post(app.url("/v1/users/import"))
            .header("content-type", "application/x-ndjson")
            .body(ndjson),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    let (status, body) = app
        .put(
            "/v1/groups/everyone",
            &json!({"name": "everyone", "user_ids": ids}),
        )
        .await;
    assert!(status == 200 || status == 201, "{body}");
    ids
}

async fn post(app: &TestApp, body: Value) -> String {
    let (status, body) = app.post_event(&body).await;
    assert_eq!(status, 202, "{body}");
    body["notification_id"].as_str().expect("id").to_owned()
}

fn query_of(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace('+', "%2B")))
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test]
async fn the_delivery_log_filters_pages_counts_and_stats_agree_with_the_raw_records() {
    let app = spawn_app().await;
    let users = seed_users(&app, 600).await;
    // 30 emails refused for good: failures to find and count.
    app.smtp.refuse_next(30, "550 mailbox unavailable");
    let greeting = post(
        &app,
        json!({"event_type": "greeting", "channels": ["email", "sms"],
               "recipients": {"group_id": "everyone"}, "payload": {"note": "hello"}}),
    )
    .await;
    let code = post(
        &app,
        json!({"event_type": "security_code", "priority": "high", "channels": ["email"],
               "recipients": {"group_id": "everyone"}, "payload": {"code": "1234"}}),
    )
    .await;
    let (status, created) = app
        .post(
            "/v1/schedules",
            &json!({"name": "yearly", "cron": "0 9 1 1 *", "timezone": "UTC",
                    "event_type": "greeting", "channels": ["email"],
                    "recipients": {"group_id": "everyone"}, "payload": {"note": "n"}}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let schedule_id = created["schedule_id"].as_str().expect("id").to_owned();
    let (status, fired) = app
        .post(&format!("/v1/schedules/{schedule_id}/trigger"), &json!({}))
        .await;
    assert!(status == 200 || status == 202, "{fired}");
    let campaign = fired["notification_id"].as_str().expect("id").to_owned();
    let mut notifications = vec![greeting.clone(), code.clone(), campaign.clone()];
    for n in &notifications {
        app.wait_finished(n, 120).await;
    }

    let raw = raw_deliveries(&app).await;
    assert_eq!(
        raw.len(),
        600 * 2 + 600 + 600,
        "every recipient x channel has a record"
    );
    let failed_email = raw
        .iter()
        .filter(|r| r.status == "failed" && r.channel == "email")
        .count();
    assert_eq!(failed_email, 30);

    // Filters, alone and combined, against counts computed from the raw records.
    let mut times: Vec<i64> = raw
        .iter()
        .map(|r| r.created_at.timestamp_millis())
        .collect();
    times.sort_unstable();
    let (lo, hi) = (times[times.len() / 4], times[times.len() * 3 / 4]);
    let since = iso(DateTime::from_millis(lo));
    let until = iso(DateTime::from_millis(hi));
    type Pred = Box<dyn Fn(&Raw) -> bool>;
    let cases: Vec<(Vec<(&str, String)>, Pred)> = vec![
        (vec![], Box::new(|_| true)),
        (vec![("user_id", users[7].clone())], {
            let u = users[7].clone();
            Box::new(move |r| r.user_id == u)
        }),
        (
            vec![("status", "failed".into()), ("channel", "email".into())],
            Box::new(|r| r.status == "failed" && r.channel == "email"),
        ),
        (
            vec![("channel", "sms".into())],
            Box::new(|r| r.channel == "sms"),
        ),
        (
            vec![("status", "skipped".into())],
            Box::new(|r| r.status == "skipped"),
        ),
        (
            vec![("event_type", "security_code".into())],
            Box::new(|r| r.event_type == "security_code"),
        ),
        (vec![("schedule_id", schedule_id.clone())], {
            let s = schedule_id.clone();
            Box::new(move |r| r.schedule_id.as_deref() == Some(s.as_str()))
        }),
        (
            vec![
                ("notification_id", greeting.clone()),
                ("status", "sent".into()),
            ],
            {
                let n = greeting.clone();
                Box::new(move |r| r.notification_id == n && r.status == "sent")
            },
        ),
        (
            vec![
                ("user_id", users[8].clone()),
                ("channel", "email".into()),
                ("event_type", "greeting".into()),
            ],
            {
                let u = users[8].clone();
                Box::new(move |r| {
                    r.user_id == u && r.channel == "email" && r.event_type == "greeting"
                })
            },
        ),
        (
            vec![("since", since.clone()), ("until", until.clone())],
            Box::new(move |r| {
                let t = r.created_at.timestamp_millis();
                t >= lo && t < hi
            }),
        ),
        (
            vec![("channel", "email".into()), ("since", since.clone())],
            Box::new(move |r| r.channel == "email" && r.created_at.timestamp_millis() >= lo),
        ),
    ];
    for (pairs, pred) in &cases {
        let expected = newest_first(raw.iter().filter(|r| pred(r)).collect());
        let query = query_of(pairs);
        let served = walk(&app, &query, 97).await;
        assert_eq!(served.len(), expected.len(), "count for `{query}`");
        assert_eq!(served, expected, "order for `{query}`");
    }

    // Pagination covers every existing item exactly once while new deliveries arrive.
    let before: HashSet<String> = raw.iter().map(|r| r.id.clone()).collect();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut page_no = 0;
    let mut extra = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/deliveries?limit=150&cursor={c}"),
            None => "/v1/deliveries?limit=150".to_owned(),
        };
        let (_, page) = app.get(&path).await;
        seen.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|i| i["delivery_id"].as_str().expect("id").to_owned()),
        );
        page_no += 1;
        if page_no == 1 {
            // A new notification fans out to 600 more deliveries while we page.
            extra = Some(
                post(
                    &app,
                    json!({"event_type": "greeting", "channels": ["email"],
                           "recipients": {"group_id": "everyone"}, "payload": {"note": "more"}}),
                )
                .await,
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no delivery is served twice");
    for id in &before {
        assert!(unique.contains(id), "{id} was skipped");
    }
    notifications.push(extra.expect("posted"));
    for n in &notifications {
        app.wait_finished(n, 120).await;
    }

    // A notification's counters agree with its deliveries.
    let raw = raw_deliveries(&app).await;
    for n in &notifications {
        let (_, body) = app.get(&format!("/v1/notifications/{n}")).await;
        let mut expected: BTreeMap<String, i64> = BTreeMap::new();
        for r in raw.iter().filter(|r| &r.notification_id == n) {
            *expected.entry(r.status.clone()).or_default() += 1;
        }
        let total: i64 = expected.values().sum();
        assert_eq!(body["counts"]["total"], total, "{body}");
        for (status, count) in expected {
            assert_eq!(body["counts"][&status], count, "{status} of {n}: {body}");
        }
    }

    // Statistics match counts computed by hand from the raw records.
    let window = format!(
        "since={}&until={}",
        iso(DateTime::from_millis(times[0] - 3_600_000)),
        iso(DateTime::from_millis(
            chrono::Utc::now().timestamp_millis() + 3_600_000
        ))
    )
    .replace('+', "%2B");
    let (status, stats) = app
        .get(&format!(
            "/v1/stats/deliveries?{window}&group_by=channel,status,event_type,provider"
        ))
        .await;
    assert_eq!(status, 200, "{stats}");
    let mut expected: BTreeMap<(String, String, String, String), i64> = BTreeMap::new();
    for r in &raw {
        let key = (
            r.channel.clone(),
            r.status.clone(),
            r.event_type.clone(),
            r.provider.clone().unwrap_or_default(),
        );
        *expected.entry(key).or_default() += 1;
    }
    let mut served: BTreeMap<(String, String, String, String), i64> = BTreeMap::new();
    for row in stats["rows"].as_array().expect("rows") {
        let s = |k: &str| row[k].as_str().unwrap_or_default().to_owned();
        served.insert(
            (s("channel"), s("status"), s("event_type"), s("provider")),
            row["count"].as_i64().expect("n"),
        );
    }
    assert_eq!(served, expected);
    assert_eq!(stats["total"], raw.len() as i64);

    let (_, by_day) = app
        .get(&format!("/v1/stats/deliveries?{window}&group_by=day"))
        .await;
    let day_total: i64 = by_day["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["count"].as_i64().expect("n"))
        .sum();
    assert_eq!(day_total, raw.len() as i64);
    assert!(
        by_day["rows"][0]["day"].as_str().expect("day").len() == 10,
        "{by_day}"
    );

    for channel in ["email", "sms"] {
        let of = |s: &str| {
            raw.iter()
                .filter(|r| r.channel == channel && r.status == s)
                .count() as i64
        };
        let summary = &stats["channels"][channel];
        assert_eq!(summary["sent"], of("sent"), "{summary}");
        assert_eq!(summary["failed"], of("failed"), "{summary}");
        assert_eq!(summary["skipped"], of("skipped"), "{summary}");
        let decided = of("sent") + of("failed") + of("dead");
        let rate = summary["success_rate"].as_f64().expect("rate");
        assert!(
            (rate - of("sent") as f64 / decided as f64).abs() < 1e-9,
            "{summary}"
        );
        // Percentiles come from 5% buckets: never below the exact value, at most 5% above.
        let mut lat: Vec<i64> = raw
            .iter()
            .filter(|r| r.channel == channel)
            .filter_map(|r| r.latency_ms)
            .collect();
        lat.sort_unstable();
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            let exact = lat[((p * lat.len() as f64).ceil() as usize).max(1) - 1];
            let got = summary["send_latency_ms"][name]
                .as_i64()
                .expect("percentile");
            assert!(
                got >= exact && got as f64 <= exact as f64 * 1.05 + 1.0,
                "{channel} {name}: exact {exact}, got {got}"
            );
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn every_delivery_log_query_shape_walks_an_index_without_sorting() {
    let app = spawn_app().await;
    app.put_user("u1", json!({"email": "one@example.com", "first_name": "A"}))
        .await;
    let n = post(&app, json!({"event_type": "greeting", "channels": ["email"], "recipients": {"user_ids": ["u1"]}, "payload": {"note": "x"}})).await;
    app.wait_finished(&n, 20).await;
    let cursor = LogCursor {
        created_at_ms: chrono::Utc::now().timestamp_millis(),
        id: "z".into(),
    };
    let mut shapes = 0;
    for bits in 0..64u32 {
        for ranged in [false, true] {
            for after in [None, Some(&cursor)] {
                let f = DeliveryFilter {
                    notification_id: (bits & 1 != 0).then(|| "n".into()),
                    user_id: (bits & 2 != 0).then(|| "u".into()),
                    schedule_id: (bits & 4 != 0).then(|| "s".into()),
                    status: (bits & 8 != 0).then_some(DeliveryStatus::Failed),
                    channel: (bits & 16 != 0).then_some(Channel::Sms),
                    event_type: (bits & 32 != 0).then(|| "e".into()),
                    since: ranged.then(|| DateTime::from_millis(1)),
                    until: ranged.then(DateTime::now),
                };
                let plan = app
                    .ctx
                    .store
                    .explain_deliveries(&f, after)
                    .await
                    .expect("explain");
                let text = winning_plan(&plan);
                assert!(
                    !text.contains("COLLSCAN"),
                    "collection scan for {f:?}: {text}"
                );
                assert!(
                    !text.contains("\"SORT\""),
                    "in-memory sort for {f:?}: {text}"
                );
                assert!(
                    text.contains("\"indexName\":\"log_"),
                    "not a delivery-log index for {f:?}: {text}"
                );
                shapes += 1;
            }
        }
    }
    assert_eq!(shapes, 256);
    app.stop().await;
}

#[tokio::test]
async fn log_queries_refuse_bad_filters_and_foreign_cursors() {
    let app = spawn_app().await;
    for (query, code) in [
        ("status=lost", "validation_failed"),
        ("channel=pigeon", "validation_failed"),
        ("limit=0", "validation_failed"),
        ("limit=501", "validation_failed"),
        ("since=yesterday", "validation_failed"),
        ("colour=red", "validation_failed"),
        ("cursor=bm90LWEtY3Vyc29y", "invalid_cursor"),
    ] {
        let (status, body) = app.get(&format!("/v1/deliveries?{query}")).await;
        assert!(status == 400 || status == 422, "{query}: {status} {body}");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
    let (status, body) = app.get("/v1/stats/deliveries?group_by=colour").await;
    assert_eq!(status, 422, "{body}");
    app.stop().await;
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub(crate) struct Sse {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Reads events (and heartbeat comments, as `event == Some("comment")`) from a stream.
pub(crate) struct SseReader {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl SseReader {
    pub(crate) async fn open(app: &TestApp, query: &str, last_id: Option<&str>) -> Self {
        let mut req = app
            .http
            .get(app.url(&format!("/v1/deliveries/stream?{query}")));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        // Bounded: a stream that never answers fails the test instead of hanging the suite.
        let resp = tokio::time::timeout(Duration::from_secs(30), req.send())
            .await
            .expect("the stream answers within 30 s")
            .expect("stream");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/event-stream"));
        Self {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn next(&mut self, secs: u64) -> Sse {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut e = Sse {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        e.event = Some("comment".into());
                        e.data = c.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        e.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        e.event = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        e.data.push_str(v.trim());
                    }
                }
                return e;
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("chunk");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next `delivery` event, skipping heartbeats.
    pub(crate) async fn delivery(&mut self, secs: u64) -> (String, Value) {
        loop {
            let e = self.next(secs).await;
            if e.event.as_deref() == Some("delivery") {
                return (
                    e.id.expect("id"),
                    serde_json::from_str(&e.data).expect("json"),
                );
            }
        }
    }
}

#[tokio::test]
async fn the_stream_reports_status_changes_and_resumes_after_a_reconnect_without_gaps() {
    let app = spawn_app_with(TestOptions {
        env: vec![("HERALD__SERVER__SSE_HEARTBEAT_SECS".into(), "1".into())],
        ..Default::default()
    })
    .await;
    for i in 0..5 {
        app.put_user(
            &format!("s{i}"),
            json!({"email": format!("s{i}@example.com"), "first_name": "S"}),
        )
        .await;
    }
    let mut stream = SseReader::open(&app, "status=sent&channel=email", None).await;
    // Idle: heartbeats keep the connection alive.
    let beat = stream.next(5).await;
    assert_eq!(beat.event.as_deref(), Some("comment"), "{beat:?}");

    let first = post(
        &app,
        json!({"event_type": "greeting", "channels": ["email"],
        "recipients": {"user_ids": ["s0", "s1", "s2"]}, "payload": {"note": "a"}}),
    )
    .await;
    let (id, delivery) = stream.delivery(20).await;
    assert_eq!(delivery["status"], "sent");
    assert_eq!(delivery["notification_id"], first.as_str());
    let mut got: Vec<String> = vec![delivery["delivery_id"].as_str().expect("id").to_owned()];
    drop(stream);
    app.wait_finished(&first, 20).await;

    // Changes made while disconnected arrive after a reconnect with Last-Event-ID.
    let second = post(
        &app,
        json!({"event_type": "greeting", "channels": ["email"],
        "recipients": {"user_ids": ["s3", "s4"]}, "payload": {"note": "b"}}),
    )
    .await;
    app.wait_finished(&second, 20).await;
    let mut resumed = SseReader::open(&app, "status=sent&channel=email", Some(&id)).await;
    for _ in 0..4 {
        let (_, d) = resumed.delivery(20).await;
        assert_eq!(d["status"], "sent");
        got.push(d["delivery_id"].as_str().expect("id").to_owned());
    }
    let mut expected: Vec<String> = app
        .deliveries(&first)
        .await
        .into_iter()
        .chain(app.deliveries(&second).await)
        .map(|d| d["delivery_id"].as_str().expect("id").to_owned())
        .collect();
    expected.sort();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(
        sorted, expected,
        "every sent delivery exactly once across the reconnect"
    );

    let (status, body) = crate::helpers::answer(
        app.http
            .get(app.url("/v1/deliveries/stream"))
            .header("last-event-id", "garbage"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_cursor");
    app.stop().await;
}

#[tokio::test]
async fn finished_records_expire_by_status_through_ttl_indexes() {
    let app = spawn_app_with(TestOptions {
        env: vec![
            ("HERALD__RETENTION__SENT_DAYS".into(), "2".into()),
            ("HERALD__RETENTION__FAILED_DAYS".into(), "9".into()),
        ],
        ..Default::default()
    })
    .await;
    app.put_user("r1", json!({"email": "r1@example.com", "first_name": "R"}))
        .await;
    app.put_user("r2", json!({"email": "r2@example.com", "first_name": "R"}))
        .await;
    app.smtp.refuse_next(1, "550 no such user");
    let n = post(
        &app,
        json!({"event_type": "greeting", "channels": ["email"],
        "recipients": {"user_ids": ["r1", "r2"]}, "payload": {"note": "x"}}),
    )
    .await;
    app.wait_finished(&n, 20).await;
    let deliveries = app.db.collection::<Document>("deliveries");
    let mut kept = BTreeMap::new();
    for d in deliveries
        .find(doc! {})
        .await
        .expect("find")
        .collect::<Vec<_>>()
        .await
    {
        let d = d.expect("doc");
        let updated = d
            .get_datetime("updated_at")
            .expect("updated")
            .timestamp_millis();
        let expires = d
            .get_datetime("expire_at")
            .expect("a final delivery expires")
            .timestamp_millis();
        kept.insert(
            d.get_str("status").expect("status").to_owned(),
            (expires - updated) / 86_400_000,
        );
    }
    assert_eq!(kept.get("sent"), Some(&2), "{kept:?}");
    assert_eq!(kept.get("failed"), Some(&9), "{kept:?}");
    let notification = app
        .db
        .collection::<Document>("notifications")
        .find_one(doc! {"_id": &n})
        .await
        .expect("find")
        .expect("notification");
    assert!(
        notification.get_datetime("expire_at").is_ok(),
        "{notification}"
    );

    // The TTL monitor removes a record once its time has come.
    deliveries
        .update_many(
            doc! {},
            doc! {"$set": {"expire_at": DateTime::from_millis(1)}},
        )
        .await
        .expect("age");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    while deliveries.count_documents(doc! {}).await.expect("count") > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the TTL monitor did not remove expired deliveries"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    app.stop().await;
}
