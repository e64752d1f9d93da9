//! Chunked fan-out (`worker.chunked_fanout`): a campaign's recipients cut into chunks, each
//! delivery written once with its outcome; every recipient once however many of the
//! audience's parts name them.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::helpers::*;

async fn chunked_app() -> TestApp {
    spawn_app_with(TestOptions {
        env: vec![
            ("HERALD__WORKER__CHUNKED_FANOUT".into(), "true".into()),
            // Chunks of three recipients: a dozen make several chunks and writes.
            ("HERALD__WORKER__FANOUT_BATCH_SIZE".into(), "3".into()),
        ],
        ..TestOptions::default()
    })
    .await
}

#[tokio::test]
async fn a_chunked_campaign_reaches_each_recipient_once_and_records_each_delivery_once() {
    let app = chunked_app().await;
    // u00..u11 with an address, tagged; u12 without one; u13 suppressed.
    for i in 0..14 {
        let mut profile = json!({"first_name": format!("U{i}"), "tags": ["beta"]});
        if i != 12 {
            profile["email"] = json!(format!("u{i:02}@example.com"));
        }
        app.put_user(&format!("u{i:02}"), profile).await;
    }
    let (status, _) = app
        .put("/v1/suppressions/email/u13@example.com", &json!({}))
        .await;
    assert_eq!(status, 201);
    // The group, the segment and the inline ids overlap.
    let members: Vec<String> = (0..8).map(|i| format!("u{i:02}")).collect();
    let (status, body) = app
        .put("/v1/groups/g1", &json!({"name": "G", "user_ids": members}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
            "recipients": {"user_ids": ["u03", "u11", "u11"], "group_id": "g1",
                           "segment": {"tag": "beta"}},
            "payload": {"note": "hi"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["notification_id"].as_str().expect("id").to_owned();
    let n = app.wait_finished(&id, 60).await;
    assert_eq!(n["counts"]["total"], 14, "{n}");
    assert_eq!(n["counts"]["sent"], 12, "{n}");
    assert_eq!(n["counts"]["skipped"], 2, "{n}");
    assert_eq!(n["counts"]["queued"], 0, "{n}");

    let mails = app.smtp.wait_for(12, 20).await;
    let mut per_address: BTreeMap<String, usize> = BTreeMap::new();
    for m in &mails {
        for to in &m.to {
            *per_address.entry(to.clone()).or_default() += 1;
        }
    }
    assert_eq!(per_address.len(), 12, "{per_address:?}");
    assert!(per_address.values().all(|n| *n == 1), "{per_address:?}");

    let (status, page) = app
        .get(&format!("/v1/deliveries?notification_id={id}&limit=100"))
        .await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 14, "one record per recipient: {page}");
    let reason_of = |user: &str| {
        items
            .iter()
            .find(|d| d["user_id"] == user)
            .map(|d| (d["status"].clone(), d["reason"].clone()))
    };
    assert_eq!(
        reason_of("u12"),
        Some((json!("skipped"), json!("no_address")))
    );
    assert_eq!(
        reason_of("u13"),
        Some((json!("skipped"), json!("suppressed")))
    );
    // A sent record carries its one attempt, with the provider's message id.
    let sent = items.iter().find(|d| d["status"] == "sent").expect("sent");
    let (_, detail) = app
        .get(&format!(
            "/v1/deliveries/{}",
            sent["delivery_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(detail["attempts"], 1, "{detail}");
    assert!(
        detail["attempt_log"][0]["response"]["message_id"].is_string(),
        "{detail}"
    );
    // Fourteen recipients in chunks of three: five chunks, each done.
    let chunks = app
        .db
        .collection::<mongodb::bson::Document>("chunks")
        .count_documents(mongodb::bson::doc! {"notification_id": &id, "done": true})
        .await
        .expect("count");
    assert_eq!(chunks, 5);
    // An event naming its recipients (more than a chunk's worth) takes the per-delivery
    // path, whose fan-out writes are shared across notifications: no chunk.
    let named: Vec<String> = (0..5).map(|i| format!("u{i:02}")).collect();
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
            "recipients": {"user_ids": named}, "payload": {"note": "x"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let named_id = body["notification_id"].as_str().expect("id").to_owned();
    let done = app.wait_finished(&named_id, 30).await;
    assert_eq!(done["counts"]["sent"], 5, "{done}");
    let chunks = app
        .db
        .collection::<mongodb::bson::Document>("chunks")
        .count_documents(mongodb::bson::doc! {"notification_id": &named_id})
        .await
        .expect("count");
    assert_eq!(chunks, 0);
    // The statistics moved every delivery out of `queued`.
    let (_, stats) = app.get("/v1/stats/deliveries?group_by=status").await;
    let rows: Vec<&Value> = stats["rows"].as_array().expect("rows").iter().collect();
    assert!(
        rows.iter()
            .all(|r| r["status"] != "queued" || r["count"] == 0),
        "{stats}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_chunk_whose_worker_stopped_before_sending_is_resumed_and_sent_once() {
    // Only the API runs at first; the chunk is claimed by a worker that stops before any
    // window, then a worker runs and the sweep (claim timeout 2 s) resumes the chunk.
    let app = spawn_app_with(TestOptions {
        roles: Roles::ApiOnly,
        env: vec![
            ("HERALD__WORKER__CHUNKED_FANOUT".into(), "true".into()),
            ("HERALD__WORKER__CLAIM_TIMEOUT_SECS".into(), "2".into()),
        ],
        ..TestOptions::default()
    })
    .await;
    let nid = app.post_to_an_audience_of_one().await;
    // The fan-out, as a worker would run it, then a claim that is never worked on.
    let (shared, _tasks) = herald::worker::Shared::start(
        &app.ctx.worker,
        herald::domain::Priority::Normal,
        Default::default(),
        Default::default(),
    );
    herald::worker::dispatch::dispatch(&app.ctx.worker, &shared, &nid)
        .await
        .expect("dispatch");
    let chunk_id = format!("{nid}:000000");
    assert!(matches!(
        app.ctx
            .store
            .claim_chunk(&chunk_id, "stopped")
            .await
            .expect("claim"),
        herald::store::ChunkClaim::Claimed { .. }
    ));
    // Its dispatch comes back to a worker with chunks turned off: the fan-out is done,
    // and it keeps the way it began (no per-delivery record for the chunk's recipient).
    let mut off = app.settings.clone();
    off.worker.chunked_fanout = false;
    let mut unchunked = app.ctx.worker.clone();
    unchunked.settings = std::sync::Arc::new(herald::worker::WorkerConfig::from_settings(&off));
    herald::worker::dispatch::dispatch(&unchunked, &shared, &nid)
        .await
        .expect("dispatch again");
    let cancel = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(herald::roles::worker(app.ctx.clone(), cancel.clone()));
    let n = app.wait_finished(&nid, 30).await;
    cancel.cancel();
    let _ = worker.await;
    assert_eq!(n["counts"]["sent"], 1, "{n}");
    assert_eq!(app.smtp.wait_for(1, 10).await.len(), 1);
    // Given time for a second message, none comes.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(app.smtp.mails().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_segment_is_read_in_id_order_through_an_index_without_sorting() {
    use herald::store::SegmentDoc;
    let app = spawn_app().await;
    app.put_user(
        "u1",
        json!({"email": "one@example.com", "locale": "de", "tags": ["beta"]}),
    )
    .await;
    let segments = [
        SegmentDoc {
            locale: Some("de".into()),
            tag: None,
        },
        SegmentDoc {
            locale: None,
            tag: Some("beta".into()),
        },
        SegmentDoc {
            locale: Some("de".into()),
            tag: Some("beta".into()),
        },
    ];
    for segment in &segments {
        for after in [None, Some("u0")] {
            let plan = app
                .ctx
                .store
                .explain_segment(segment, after)
                .await
                .expect("explain");
            let text = winning_plan(&plan);
            assert!(!text.contains("COLLSCAN"), "{segment:?}: {text}");
            assert!(!text.contains("\"SORT\""), "{segment:?}: {text}");
            // Not the `_id` index alone: that would walk every user.
            assert!(
                text.contains("\"indexName\":\"locale_id\"")
                    || text.contains("\"indexName\":\"tags_id\""),
                "{segment:?}: {text}"
            );
        }
    }
    app.stop().await;
}
