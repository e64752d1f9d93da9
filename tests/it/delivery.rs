//! Delivery outcomes: every recipient is accounted for, and nothing is sent twice.

use std::time::Duration;

use futures::StreamExt;
use herald::domain::DeliveryStatus;
use herald::queue::messages::Job;
use herald::queue::Outgoing;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use mongodb::bson::{doc, DateTime, Document};
use serde_json::json;

use crate::helpers::{greeting_to_u1, spawn_app, spawn_app_with, Roles, TestOptions};

#[tokio::test]
async fn recipients_without_address_or_template_are_accounted_for_with_a_reason() {
    let app = spawn_app().await;
    app.put_user(
        "has-mail",
        json!({"email": "a@example.com", "first_name": "A"}),
    )
    .await;
    app.put_user(
        "no-mail",
        json!({"phone": "+4915112345678", "first_name": "B"}),
    )
    .await;
    let (status, body) = app
        .post_event(&json!({
            "event_type": "greeting", "channels": ["email"],
            "recipients": {"user_ids": ["has-mail", "no-mail", "ghost"]},
            "payload": {"note": "hi"}
        }))
        .await;
    assert_eq!(status, 202);
    let id = body["notification_id"].as_str().expect("id");
    let n = app.wait_finished(id, 20).await;
    assert_eq!(n["status"], "completed");
    assert_eq!(n["counts"]["sent"], 1);
    assert_eq!(n["counts"]["skipped"], 2);
    let reasons: Vec<(String, String)> = app
        .deliveries(id)
        .await
        .iter()
        .map(|d| {
            (
                d["user_id"].as_str().unwrap_or_default().to_owned(),
                d["reason"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    assert!(
        reasons.contains(&("no-mail".into(), "no_address".into())),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("ghost".into(), "unknown_user".into())),
        "{reasons:?}"
    );

    // An event type without templates is accepted; each delivery fails visibly.
    let (status, body) = app
        .post_event(
            &json!({"event_type": "never-templated", "recipients": {"user_ids": ["has-mail"]}}),
        )
        .await;
    assert_eq!(status, 202);
    let id = body["notification_id"].as_str().expect("id");
    let n = app.wait_finished(id, 20).await;
    assert_eq!(n["status"], "failed");
    let d = &app.deliveries(id).await[0];
    assert_eq!(d["status"], "failed");
    assert_eq!(d["reason"], "template_missing");
    assert!(d["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("never-templated")));

    // A template that fails in strict mode is an error on the delivery, not a blank.
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"], "recipients": {"user_ids": ["has-mail"]}}))
        .await;
    let id = body["notification_id"].as_str().expect("id");
    app.wait_finished(id, 20).await;
    assert_eq!(app.deliveries(id).await[0]["reason"], "template_error");
    assert_eq!(
        app.smtp.mails().len(),
        1,
        "only the deliverable one was sent"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_group_and_inline_recipients_fan_out_once_per_user_and_channel() {
    let app = spawn_app().await;
    for i in 0..5 {
        app.put_user(&format!("m{i}"), json!({"email": format!("m{i}@example.com"), "phone": "+15550000000", "first_name": "M"}))
            .await;
    }
    let (status, _) = app
        .put(
            "/v1/groups/team",
            &json!({"name": "Team", "user_ids": ["m0", "m1", "m2", "m3"]}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, body) = app
        .post_event(&json!({
            "event_type": "greeting", "channels": ["email", "sms"],
            "recipients": {"group_id": "team", "user_ids": ["m3", "m4"]},
            "payload": {"note": "hello"}
        }))
        .await;
    let id = body["notification_id"].as_str().expect("id");
    let n = app.wait_finished(id, 20).await;
    assert_eq!(n["counts"]["total"], 10, "5 distinct users x 2 channels");
    assert_eq!(n["counts"]["sent"], 10);
    assert_eq!(app.smtp.wait_for(5, 5).await.len(), 5);
    // SMS goes to the recording transport, and its text is in the delivery log.
    let sms: Vec<_> = app
        .deliveries(id)
        .await
        .into_iter()
        .filter(|d| d["channel"] == "sms")
        .collect();
    assert_eq!(sms.len(), 5);
    let (_, detail) = app
        .get(&format!(
            "/v1/deliveries/{}",
            sms[0]["delivery_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(
        detail["attempt_log"][0]["response"]["text"],
        "SMS for M: hello"
    );
    assert_eq!(detail["attempt_log"][0]["response"]["segments"], 1);
    let recorded = std::fs::read_to_string(app.files.join("sms.ndjson")).expect("sms recorded");
    assert_eq!(recorded.lines().count(), 5);
    app.stop().await;
}

async fn one_sent_delivery(app: &crate::helpers::TestApp) -> (String, String) {
    app.put_ana().await;
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": ["u1"]}, "payload": {"note": "x"}}))
        .await;
    let id = body["notification_id"].as_str().expect("id").to_owned();
    app.wait_finished(&id, 20).await;
    let delivery = app.deliveries(&id).await[0]["delivery_id"]
        .as_str()
        .expect("id")
        .to_owned();
    (id, delivery)
}

async fn republish(app: &crate::helpers::TestApp, notification_id: &str, delivery_id: &str) {
    app.ctx
        .broker
        .publish_confirmed(&[Outgoing {
            exchange: app.ctx.broker.names().jobs_exchange.clone(),
            routing_key: "normal".into(),
            body: Job::Deliver {
                delivery_id: delivery_id.to_owned(),
                notification_id: notification_id.to_owned(),
            }
            .encode(),
            headers: vec![],
            expiration_ms: None,
        }])
        .await
        .expect("publish");
}

#[tokio::test]
async fn a_redelivered_job_whose_delivery_is_sent_is_acked_without_sending() {
    let app = spawn_app().await;
    let (nid, did) = one_sent_delivery(&app).await;
    assert_eq!(app.smtp.wait_for(1, 5).await.len(), 1);
    // The worker committed, then died before its ack: RabbitMQ hands the job out again.
    republish(&app, &nid, &did).await;
    republish(&app, &nid, &did).await;
    app.wait_lane_drained(herald::domain::Priority::Normal)
        .await;
    assert_eq!(app.smtp.mails().len(), 1, "no second email");
    let (_, d) = app.get(&format!("/v1/deliveries/{did}")).await;
    assert_eq!(d["status"], "sent");
    assert_eq!(d["attempts"], 1);
    let (_, n) = app.get(&format!("/v1/notifications/{nid}")).await;
    assert_eq!(n["counts"]["sent"], 1);
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_left_sending_by_a_dead_worker_is_failed_outcome_unknown_not_resent() {
    let app = spawn_app().await;
    let (nid, did) = one_sent_delivery(&app).await;
    assert_eq!(app.smtp.wait_for(1, 5).await.len(), 1);
    // Rewind the record to what a worker leaves when it dies between the provider call
    // and the commit: `sending`, claimed long ago, counted as queued.
    let old = DateTime::from_millis(DateTime::now().timestamp_millis() - 3_600_000);
    app.db
        .collection::<Document>("deliveries")
        .update_one(
            doc! {"_id": &did},
            doc! {"$set": {"status": "sending", "claim": {"attempt_id": "lost-attempt", "from": "queued", "claimed_at": old, "worker": "dead-worker"}}},
        )
        .await
        .expect("rewind");
    app.db
        .collection::<Document>("notifications")
        .update_one(doc! {"_id": &nid}, doc! {"$set": {"status": "dispatching"}, "$inc": {"counts.sent": -1, "counts.queued": 1}})
        .await
        .expect("rewind counts");
    republish(&app, &nid, &did).await;
    let n = app.wait_finished(&nid, 20).await;
    assert_eq!(n["status"], "failed");
    assert_eq!(n["counts"]["failed"], 1);
    assert_eq!(n["counts"]["queued"], 0);
    let (_, d) = app.get(&format!("/v1/deliveries/{did}")).await;
    assert_eq!(d["status"], "failed");
    assert_eq!(d["reason"], "outcome_unknown");
    assert_eq!(app.smtp.mails().len(), 1, "not re-sent blindly");
    app.stop().await;
}

#[tokio::test]
async fn a_job_redelivered_after_its_worker_died_mid_send_is_not_sent_again() {
    died_mid_send(false).await;
}

#[tokio::test]
async fn a_chunk_redelivered_after_its_worker_died_mid_send_is_not_sent_again() {
    died_mid_send(true).await;
}

/// A worker claims a delivery (or the chunk holding it) as before a provider call and
/// dies without acking; the job comes back to a live worker.
async fn died_mid_send(chunked: bool) {
    // Only the API runs; this test plays the worker that dies. Its claim is taken for a
    // dead worker's one second after it was made.
    let app = spawn_app_with(TestOptions {
        roles: Roles::ApiOnly,
        env: vec![
            ("HERALD__WORKER__REDELIVERY_GRACE_SECS".into(), "1".into()),
            ("HERALD__WORKER__CHUNKED_FANOUT".into(), chunked.to_string()),
        ],
        ..Default::default()
    })
    .await;
    let nid = app.post_to_an_audience_of_one().await;

    let lane = app
        .ctx
        .broker
        .names()
        .lane(herald::domain::Priority::Normal)
        .to_owned();
    let channel = app.ctx.broker.channel().await.expect("channel");
    channel
        .basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            lane.as_str().into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // The doomed worker's fan-out round trips.
    let (lane_shared, _tasks) = herald::worker::Shared::start(
        &app.ctx.worker,
        herald::domain::Priority::Normal,
        Default::default(),
        Default::default(),
    );
    let mut delivery_id = None;
    while delivery_id.is_none() {
        let m = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a job")
            .expect("stream")
            .expect("delivery");
        match Job::decode(&m.data).expect("job") {
            Job::Dispatch { notification_id } => {
                herald::worker::dispatch::dispatch(&app.ctx.worker, &lane_shared, &notification_id)
                    .await
                    .expect("dispatch");
                m.acker.ack(Default::default()).await.expect("ack");
            }
            Job::DispatchMany { .. } => panic!("one event, one dispatch job"),
            Job::DeliverChunk { chunk_id, .. } => {
                // The doomed worker claims the chunk and starts its first window (as
                // before its provider calls) ...
                let herald::store::ChunkClaim::Claimed { chunk, attempt_id } = app
                    .ctx
                    .store
                    .claim_chunk(&chunk_id, "doomed")
                    .await
                    .expect("claim")
                else {
                    panic!("the chunk was free");
                };
                assert!(app
                    .ctx
                    .store
                    .start_window(&chunk_id, &attempt_id, 1)
                    .await
                    .expect("window"));
                delivery_id = Some(chunk.items[0].delivery_id.clone());
            }
            Job::Deliver { delivery_id: d, .. } => {
                // The doomed worker claims the delivery (as before a provider call) ...
                assert!(app
                    .ctx
                    .store
                    .claim_delivery(&d, DeliveryStatus::Queued, "doomed")
                    .await
                    .expect("claim")
                    .is_some());
                delivery_id = Some(d);
            }
        }
    }
    // ... and dies without acking: RabbitMQ requeues the job as redelivered.
    channel
        .basic_cancel("doomed".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    channel.close(200, "dead".into()).await.expect("close");

    let worker_cancel = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(herald::roles::worker(
        app.ctx.clone(),
        worker_cancel.clone(),
    ));
    let n = app.wait_finished(&nid, 20).await;
    worker_cancel.cancel();
    let _ = worker.await;
    assert_eq!(n["counts"]["failed"], 1);
    let (_, d) = app
        .get(&format!("/v1/deliveries/{}", delivery_id.expect("id")))
        .await;
    assert_eq!(d["reason"], "outcome_unknown", "{d}");
    assert!(app.smtp.mails().is_empty(), "never sent blindly");
    app.stop().await;
}

#[tokio::test]
async fn the_embedded_defaults_write_each_email_as_an_eml_file() {
    // The run command's settings: file transport; only the database, prefix and folder differ.
    let app = spawn_app_with(TestOptions {
        env: vec![("HERALD__EMAIL__TRANSPORT".into(), "file".into())],
        ..Default::default()
    })
    .await;
    app.put_ana().await;
    let (_, body) = app
        .post_event(&json!({"event_type": "greeting", "recipients": {"user_ids": ["u1"]}, "payload": {"note": "file me"}}))
        .await;
    let id = body["notification_id"].as_str().expect("id");
    let n = app.wait_finished(id, 20).await;
    assert_eq!(n["status"], "completed");
    let files: Vec<_> = std::fs::read_dir(app.files.join("email"))
        .expect("email dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .collect();
    assert_eq!(files.len(), 1);
    let eml = std::fs::read_to_string(files[0].path()).expect("read");
    assert!(eml.contains("Subject: Hello Ana"), "{eml}");
    assert!(eml.contains("file me"));
    let d = &app.deliveries(id).await;
    assert!(d
        .iter()
        .any(|d| d["channel"] == "email" && d["provider"] == "file"));
    app.stop().await;
}

#[tokio::test]
async fn a_recipient_on_several_channels_gets_each_even_when_their_lookups_share_a_batch() {
    let app = spawn_app().await;
    let users: Vec<String> = (0..12).map(|i| format!("multi-{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        app.put_user(
            u,
            json!({"email": format!("{u}@example.com"), "phone": format!("+49151000000{i:02}"), "first_name": "M"}),
        )
        .await;
    }
    let (status, body) = app
        .post_event(&json!({
            "event_type": "greeting", "channels": ["email", "sms"],
            "recipients": {"user_ids": users}, "payload": {"note": "hi"}
        }))
        .await;
    assert_eq!(status, 202, "{body}");
    let n = app
        .wait_finished(body["notification_id"].as_str().expect("id"), 30)
        .await;
    assert_eq!(n["counts"]["sent"], 24, "{n}");
    assert_eq!(n["counts"]["skipped"], 0, "{n}");
    assert_eq!(app.smtp.wait_for(12, 10).await.len(), 12);
    app.stop().await;
}

/// A delivery of `nid` to `user` by email, as the fan-out plans it.
/// herald without a worker: the tests below play its parts themselves.
async fn api_only() -> crate::helpers::TestApp {
    spawn_app_with(TestOptions {
        roles: Roles::ApiOnly,
        ..Default::default()
    })
    .await
}

/// A greeting by email to `users`, accepted and marked dispatching; its notification id.
async fn dispatching_greeting(app: &crate::helpers::TestApp, users: serde_json::Value) -> String {
    let (status, body) = app
        .post_event(&json!({"event_type": "greeting", "channels": ["email"],
                            "recipients": {"user_ids": users}, "payload": {}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let nid = body["notification_id"].as_str().expect("id").to_owned();
    app.ctx
        .store
        .mark_dispatching(&nid)
        .await
        .expect("dispatching");
    nid
}

fn planned(nid: &str, user: &str) -> herald::store::DeliveryDoc {
    let now = DateTime::now();
    herald::store::DeliveryDoc {
        id: uuid::Uuid::now_v7().to_string(),
        notification_id: nid.to_owned(),
        event_type: "greeting".to_owned(),
        user_id: user.to_owned(),
        channel: herald::domain::Channel::Email,
        priority: herald::domain::Priority::Normal,
        schedule_id: None,
        status: DeliveryStatus::Queued,
        reason: None,
        provider: None,
        attempt_count: 0,
        attempts: Vec::new(),
        last_error: None,
        claim: None,
        accepted_at: Some(now),
        created_at: now,
        updated_at: now,
        sent_at: None,
        feedback: Vec::new(),
        complained_at: None,
        unsubscribed_at: None,
        seen_at: None,
        read_at: None,
        expire_at: None,
    }
}

#[tokio::test]
async fn a_running_fan_out_is_counted_apart_and_claims_of_one_round_trip_skip_held_deliveries() {
    // No worker: the test plays the fan-out and two workers itself.
    let app = api_only().await;
    let nid = dispatching_greeting(&app, json!(["u1", "u2"])).await;
    let store = &app.ctx.store;
    let written = store
        .insert_delivery_batch(&nid, vec![planned(&nid, "u1"), planned(&nid, "u2")])
        .await
        .expect("fan-out batch");
    assert_eq!(written.len(), 2);

    // Outcome commits write the notification's counts all the time; the fan-out's are
    // kept on a document of their own while it runs, and readers see their sum.
    let raw = |nid: String| {
        let db = app.db.clone();
        async move {
            db.collection::<Document>("notifications")
                .find_one(doc! {"_id": nid})
                .await
                .expect("read")
                .expect("notification")
        }
    };
    let stored = raw(nid.clone()).await;
    assert_eq!(
        stored
            .get_document("counts")
            .expect("counts")
            .get_i64("total")
            .unwrap_or(0),
        0,
        "{stored}"
    );
    // What a reader of the API sees: total and queued.
    let api_counts = || async {
        let (_, n) = app.get(&format!("/v1/notifications/{nid}")).await;
        let c = &n["counts"];
        (c["total"].as_i64(), c["queued"].as_i64())
    };
    assert_eq!(api_counts().await, (Some(2), Some(2)));

    // Claims: one round trip for many deliveries, one attempt id; a held one is skipped.
    let [d1, d2] = [&written[0].delivery_id, &written[1].delivery_id];
    let first = store
        .claim_delivery(d1, DeliveryStatus::Queued, "w1")
        .await
        .expect("claim")
        .expect("w1 got it");
    let claims: Vec<herald::store::DeliveryClaim> = [d1, d2]
        .iter()
        .map(|d| herald::store::DeliveryClaim {
            delivery_id: (*d).clone(),
            from: DeliveryStatus::Queued,
            worker: "w2".to_owned(),
        })
        .collect();
    let got = store.claim_deliveries(&claims).await.expect("claims");
    assert_eq!(got[0], None, "held by w1");
    let second = got[1].clone().expect("w2 got the free one");
    assert_ne!(first, second);
    assert_eq!(
        store.claim_deliveries(&claims).await.expect("claims"),
        vec![None, None],
        "nothing left to claim"
    );
    let d = app
        .db
        .collection::<Document>("deliveries")
        .find_one(doc! {"_id": d2})
        .await
        .expect("read")
        .expect("delivery");
    assert_eq!(d.get_str("status"), Ok("sending"));
    let claim = d.get_document("claim").expect("claim");
    assert_eq!(claim.get_str("attempt_id"), Ok(second.as_str()));
    assert_eq!(claim.get_str("worker"), Ok("w2"));

    // The fan-out ends: its counts move onto the notification, its document goes.
    store.mark_fanout_done(&nid).await.expect("done");
    let stored = raw(nid.clone()).await;
    assert_eq!(
        stored
            .get_document("counts")
            .expect("counts")
            .get_i64("total"),
        Ok(2),
        "{stored}"
    );
    assert_eq!(app.count("fanout_progress").await, 0);
    assert_eq!(api_counts().await, (Some(2), Some(2)));
    app.stop().await;
}

#[tokio::test]
async fn fan_outs_of_one_moment_share_a_transaction_and_a_recipient_asked_twice_is_written_once() {
    // No worker: the test plays the lane's fan-out batcher itself.
    let app = api_only().await;
    let a = &dispatching_greeting(&app, json!(["u1", "u2"])).await;
    let b = &dispatching_greeting(&app, json!(["u3"])).await;
    let batch = |nid: &str, users: &[&str]| herald::store::FanoutBatch {
        notification_id: nid.to_owned(),
        planned: users.iter().map(|u| planned(nid, u)).collect(),
    };
    // The third is a second copy of A's dispatch job, asking for u2 again meanwhile.
    let batches = [
        batch(a, &["u1", "u2"]),
        batch(b, &["u3"]),
        batch(a, &["u2"]),
    ];
    let ids = |written: &[herald::store::QueuedDelivery]| {
        let mut ids: Vec<String> = written.iter().map(|q| q.delivery_id.clone()).collect();
        ids.sort();
        ids
    };
    let written = app
        .ctx
        .store
        .insert_delivery_batches(&batches)
        .await
        .expect("one transaction");
    assert_eq!(written.len(), 3);
    assert_eq!((written[0].len(), written[1].len()), (2, 1));
    assert!(written[0].iter().all(|q| &q.notification_id == a));
    assert_eq!(written[1][0].notification_id, *b);
    assert_eq!(written[2].len(), 1);
    assert!(
        written[0].contains(&written[2][0]),
        "the copy got the delivery the first wrote"
    );
    let count = |nid: &str| {
        let db = app.db.clone();
        let nid = nid.to_owned();
        async move {
            db.collection::<Document>("deliveries")
                .count_documents(doc! {"notification_id": nid})
                .await
                .expect("count")
        }
    };
    assert_eq!((count(a).await, count(b).await), (2, 1));
    let counts = |nid: &str| {
        let nid = nid.to_owned();
        let app = &app;
        async move {
            let (_, n) = app.get(&format!("/v1/notifications/{nid}")).await;
            (
                n["counts"]["total"].as_i64(),
                n["counts"]["queued"].as_i64(),
            )
        }
    };
    assert_eq!(counts(a).await, (Some(2), Some(2)));
    assert_eq!(counts(b).await, (Some(1), Some(1)));

    // The same batches again (every dispatch job redelivered): nothing new is written, and
    // each gets back its deliveries still queued, to publish again.
    let again = app
        .ctx
        .store
        .insert_delivery_batches(&batches)
        .await
        .expect("again");
    for (first, second) in written.iter().zip(&again) {
        assert_eq!(ids(first), ids(second));
    }
    assert_eq!((count(a).await, count(b).await), (2, 1));
    assert_eq!(counts(a).await, (Some(2), Some(2)));
    app.stop().await;
}

#[tokio::test]
async fn equal_outcomes_of_one_commit_share_a_write_and_each_delivery_keeps_its_own_attempt() {
    use herald::store::{AttemptDoc, Outcome, Precondition, Retry};
    // No worker: the test commits outcomes itself, as the worker's committer does.
    let app = api_only().await;
    let users: Vec<String> = (1..=7).map(|i| format!("u{i}")).collect();
    let nid = dispatching_greeting(&app, json!(users)).await;
    let store = &app.ctx.store;
    let written = store
        .insert_delivery_batch(&nid, users.iter().map(|u| planned(&nid, u)).collect())
        .await
        .expect("fan-out batch");
    store.mark_fanout_done(&nid).await.expect("done");
    let ids: Vec<String> = written.iter().map(|d| d.delivery_id.clone()).collect();

    // Five deliveries claimed in one round trip share one attempt id; a second copy of
    // one delivery's job asking in the same round trip gets nothing (it would send twice).
    let claims: Vec<herald::store::DeliveryClaim> = ids[..5]
        .iter()
        .chain([&ids[0]])
        .map(|d| herald::store::DeliveryClaim {
            delivery_id: d.clone(),
            from: DeliveryStatus::Queued,
            worker: "w1".to_owned(),
        })
        .collect();
    let mut tokens = store.claim_deliveries(&claims).await.expect("claims");
    assert_eq!(tokens.pop(), Some(None), "the copy does not claim");
    let token = tokens[0].clone().expect("claimed");
    assert!(tokens.iter().all(|t| t.as_ref() == Some(&token)));

    let attempt = |n: usize, status: DeliveryStatus, error: Option<&str>| AttemptDoc {
        attempt_id: token.clone(),
        provider: Some("smtp".to_owned()),
        started_at: DateTime::now(),
        finished_at: DateTime::now(),
        duration_ms: n as i64,
        status,
        error: error.map(str::to_owned),
        response: Some(doc! {"message_id": format!("$msg-{n}")}),
    };
    let outcome =
        |n: usize, status: DeliveryStatus, reason: Option<&str>, error: Option<&str>| Outcome {
            delivery_id: ids[n].clone(),
            notification_id: nid.clone(),
            channel: herald::domain::Channel::Email,
            precondition: Precondition::Claimed {
                attempt_id: token.clone(),
            },
            status,
            reason: reason.map(str::to_owned),
            provider: Some("smtp".to_owned()),
            attempt: Some(attempt(n, status, error)),
            retry: None,
            inbox: None,
        };
    let mut retrying = outcome(4, DeliveryStatus::Retrying, Some("smtp_4xx"), Some("busy"));
    retrying.retry = Some(Retry {
        delay_ms: 60_000,
        retry_number: 1,
        lane: herald::domain::Priority::Normal,
        not_before: None,
    });
    let unclaimed = |n: usize| Outcome {
        precondition: Precondition::Unclaimed,
        attempt: None,
        provider: None,
        ..outcome(n, DeliveryStatus::Skipped, Some("opted_out"), None)
    };
    let mut stale = outcome(0, DeliveryStatus::Failed, Some("late"), None);
    stale.precondition = Precondition::Claimed {
        attempt_id: "an-older-attempt".to_owned(),
    };
    let applied = store
        .commit_outcomes(
            &[
                outcome(0, DeliveryStatus::Sent, None, None),
                outcome(1, DeliveryStatus::Sent, None, None),
                outcome(2, DeliveryStatus::Sent, None, None),
                // A reason that looks like a field path stays text.
                outcome(3, DeliveryStatus::Failed, Some("$5 fee"), Some("rejected")),
                retrying,
                unclaimed(5),
                unclaimed(6),
                stale,
            ],
            herald::domain::Priority::Normal,
        )
        .await
        .expect("commit");
    assert_eq!(
        applied,
        vec![true, true, true, true, true, true, true, false]
    );

    let deliveries = app.db.collection::<Document>("deliveries");
    for (n, (status, reason)) in [
        ("sent", None),
        ("sent", None),
        ("sent", None),
        ("failed", Some("$5 fee")),
        ("retrying", Some("smtp_4xx")),
        ("skipped", Some("opted_out")),
        ("skipped", Some("opted_out")),
    ]
    .into_iter()
    .enumerate()
    {
        let d = deliveries
            .find_one(doc! {"_id": &ids[n]})
            .await
            .expect("read")
            .expect("delivery");
        assert_eq!(d.get_str("status"), Ok(status), "{d}");
        assert_eq!(d.get_str("reason").ok(), reason, "{d}");
        let attempts = d.get_array("attempts").expect("attempts");
        if n < 5 {
            // Each delivery got its own attempt, once.
            assert_eq!(attempts.len(), 1, "{d}");
            assert_eq!(d.get_i32("attempt_count"), Ok(1), "{d}");
            let a = attempts[0].as_document().expect("attempt");
            assert_eq!(a.get_i64("duration_ms"), Ok(n as i64), "{d}");
            assert_eq!(
                a.get_document("response")
                    .and_then(|r| r.get_str("message_id")),
                Ok(format!("$msg-{n}").as_str()),
                "{d}"
            );
        } else {
            assert!(attempts.is_empty(), "{d}");
            assert_eq!(d.get_i32("attempt_count"), Ok(0), "{d}");
        }
        assert_eq!(
            d.get_datetime("sent_at").is_ok(),
            status == "sent",
            "sent_at only on sent: {d}"
        );
        assert_eq!(
            d.get_datetime("expire_at").is_ok(),
            status != "retrying",
            "a final status expires, a retry does not: {d}"
        );
    }
    assert_eq!(
        deliveries
            .find_one(doc! {"_id": &ids[3]})
            .await
            .expect("read")
            .expect("delivery")
            .get_str("last_error"),
        Ok("rejected")
    );
    let (_, n) = app.get(&format!("/v1/notifications/{nid}")).await;
    let c = &n["counts"];
    assert_eq!(
        (
            c["sent"].as_i64(),
            c["failed"].as_i64(),
            c["retrying"].as_i64(),
            c["skipped"].as_i64(),
            c["queued"].as_i64()
        ),
        (Some(3), Some(1), Some(1), Some(2), Some(0)),
        "{n}"
    );
    assert_eq!(app.count("dead_letters").await, 1, "the failed one");
    app.stop().await;
}

/// One job dispatching several notifications (a group commit's): a notification that
/// cannot be dispatched goes back to the lane on its own and is parked for its own
/// reason; the others are sent once.
#[tokio::test]
async fn a_dispatch_of_several_sends_the_good_ones_once_and_parks_only_the_broken_one() {
    let app = spawn_app().await;
    app.put_ana().await;
    // Stored without an outbox entry: only the job below dispatches them.
    let mut ids = Vec::new();
    for note in ["first", "second"] {
        let (n, _) = greeting_to_u1(herald::domain::Priority::Normal, note);
        app.db
            .collection::<herald::store::NotificationDoc>("notifications")
            .insert_one(&n)
            .await
            .expect("insert");
        ids.push(n.id);
    }
    app.db
        .collection::<Document>("notifications")
        .insert_one(doc! {"_id": "broken", "event_id": "broken", "status": 42})
        .await
        .expect("insert");
    app.ctx
        .broker
        .publish_confirmed(&[Outgoing {
            exchange: app.ctx.broker.names().jobs_exchange.clone(),
            routing_key: "normal".into(),
            body: Job::DispatchMany {
                notification_ids: vec![ids[0].clone(), "broken".into(), ids[1].clone()],
            }
            .encode(),
            headers: vec![],
            expiration_ms: None,
        }])
        .await
        .expect("publish");

    for id in &ids {
        assert_eq!(app.wait_finished(id, 20).await["counts"]["sent"], 1);
    }
    // Parked once its retries are spent: a dispatch job of its own.
    let ch = app.ctx.broker.channel().await.expect("channel");
    let rejected = app.ctx.broker.names().rejected_queue.clone();
    let get = || {
        ch.basic_get(
            rejected.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let parked = loop {
        if let Some(m) = get().await.expect("get") {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        Job::decode(&parked.delivery.data),
        Ok(Job::Dispatch {
            notification_id: "broken".into()
        })
    );
    app.wait_lane_drained(herald::domain::Priority::Normal)
        .await;
    let mut notes: Vec<String> = app
        .smtp
        .mails()
        .iter()
        .map(|m| m.text().trim().to_owned())
        .collect();
    notes.sort();
    assert_eq!(notes, ["Hi Ana, first", "Hi Ana, second"], "each sent once");
    assert!(get().await.expect("get").is_none(), "nothing else parked");
    app.stop().await;
}
