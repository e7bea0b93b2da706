//! Outbox delivery against a real Postgres: fan-out, order per aggregate,
//! exactly-once effect under redelivery, backoff and dead letters, and the
//! whole path through real apalis workers.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use keel_core::ResourceName;
use keel_core::ids::TenantId;
use keel_db::{Audit, Db, NewEvent, RequestMeta};
use keel_outbox::{
    Consumer, DeliveredEvent, DeliveryJob, HandlerError, MAX_ATTEMPTS, relay, retention, worker,
};
use uuid::Uuid;

/// Records what it saw; fails while `failures_left` > 0.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(Uuid, i64)>>,
    events: Mutex<Vec<DeliveredEvent>>,
    failures_left: Mutex<u32>,
}

impl Consumer for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type.starts_with("thing.")
    }

    fn handle<'a>(&'a self, event: &'a DeliveredEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let mut failures = self.failures_left.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(HandlerError::new("induced failure"));
            }
            self.seen
                .lock()
                .unwrap()
                .push((event.aggregate_id, event.aggregate_version));
            self.events.lock().unwrap().push(event.clone());
            Ok(())
        })
    }
}

async fn emit(db: &Db, event_type: &'static str, aggregate: Uuid, version: i64) {
    let tenant = TenantId::new();
    let mut tx = db
        .begin_system(RequestMeta::system("test", "test"))
        .await
        .unwrap();
    let name = ResourceName::new(None, Some(tenant), None, "thing", aggregate);
    tx.emit(NewEvent::new(
        event_type,
        "thing",
        aggregate,
        version,
        None,
        name.clone(),
        serde_json::json!({}),
    ));
    tx.commit(Audit::new("thing.change", None, name))
        .await
        .unwrap();
}

/// Deliveries currently queued for the recorder, oldest first.
async fn queued(db: &Db) -> Vec<DeliveryJob> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT event_id FROM outbox_deliveries WHERE consumer = 'recorder' AND status = 'queued' ORDER BY seq",
    )
    .fetch_all(&mut *db.begin_bookkeeping().await.unwrap())
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id,)| DeliveryJob {
            consumer: "recorder".into(),
            event_id: id.into(),
            more: Vec::new(),
        })
        .collect()
}

#[tokio::test]
async fn events_of_one_aggregate_are_released_one_at_a_time_in_order() {
    let test = keel_testing::test_db().await;
    let recorder = Arc::new(Recorder::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![recorder.clone()];
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    emit(&test.db, "thing.created", a, 1).await;
    emit(&test.db, "thing.updated", a, 2).await;
    emit(&test.db, "thing.created", b, 1).await;
    emit(&test.db, "other.ignored", a, 3).await;

    relay::drain(&test.db, &consumers).await.unwrap();
    let first = queued(&test.db).await;
    assert_eq!(
        first.len(),
        2,
        "one per aggregate: a's second event waits for its first"
    );
    for job in &first {
        worker::run_delivery(&test.db, recorder.as_ref(), job)
            .await
            .unwrap();
    }
    relay::drain(&test.db, &consumers).await.unwrap();
    let second = queued(&test.db).await;
    assert_eq!(second.len(), 1);
    worker::run_delivery(&test.db, recorder.as_ref(), &second[0])
        .await
        .unwrap();
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter()
            .filter(|(id, _)| *id == a)
            .map(|(_, v)| *v)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(seen.len(), 3, "the event nobody wants was not delivered");
}

#[tokio::test]
async fn a_delivery_hands_the_consumer_the_event_as_stored() {
    let test = keel_testing::test_db().await;
    let recorder = Arc::new(Recorder::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![recorder.clone()];
    // A whole second (Postgres writes it without a fraction), the last
    // microsecond of a second, and a payload with some shape.
    let times = [
        (
            "2024-01-01 00:00:00+00",
            time::macros::datetime!(2024-01-01 0:00 UTC),
        ),
        (
            "1999-12-31 23:59:59.999999+00",
            time::macros::datetime!(1999-12-31 23:59:59.999_999 UTC),
        ),
    ];
    let mut admin = test.admin().await;
    for (version, (stored, _)) in (7..).zip(times) {
        let aggregate = Uuid::now_v7();
        emit(&test.db, "thing.created", aggregate, version).await;
        sqlx::query(
            "UPDATE outbox SET created_at = $2::timestamptz,
                               payload = '{\"n\": 1, \"s\": \"it''s\"}'
             WHERE aggregate_id = $1",
        )
        .bind(aggregate)
        .bind(stored)
        .execute(&mut admin)
        .await
        .unwrap();
    }
    relay::drain(&test.db, &consumers).await.unwrap();
    let jobs = queued(&test.db).await;
    assert_eq!(jobs.len(), times.len());
    for job in &jobs {
        worker::run_delivery(&test.db, recorder.as_ref(), job)
            .await
            .unwrap();
    }
    let events = recorder.events.lock().unwrap().clone();
    assert_eq!(events.len(), times.len());
    for ((event, job), (version, (_, created_at))) in events.iter().zip(&jobs).zip((7..).zip(times))
    {
        assert_eq!(event.id, job.event_id);
        assert_eq!(
            (event.event_type.as_str(), event.aggregate_version),
            ("thing.created", version)
        );
        assert_eq!(event.payload, serde_json::json!({ "n": 1, "s": "it's" }));
        assert_eq!(event.request_id, "test");
        assert_eq!(event.created_at, created_at);
    }
    assert!(queued(&test.db).await.is_empty(), "the deliveries are done");
}

/// Marks the recorder's queued delivery's apalis job as apalis marks a job
/// whose run returned an error (with one attempt allowed), and ages the
/// delivery by a minute.
async fn strand(test: &keel_testing::TestDb, status: &str) {
    let mut admin = test.admin().await;
    sqlx::query(
        "UPDATE apalis.jobs SET status = $1, attempts = 1, done_at = now() WHERE job_type = 'recorder'",
    )
    .bind(status)
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox_deliveries SET updated_at = now() - interval '1 minute' WHERE status = 'queued'",
    )
    .execute(&mut admin)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_delivery_whose_run_could_not_record_its_outcome_is_released_again() {
    let test = keel_testing::test_db().await;
    let recorder = Arc::new(Recorder::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![recorder.clone()];
    let aggregate = Uuid::now_v7();
    emit(&test.db, "thing.created", aggregate, 1).await;
    emit(&test.db, "thing.updated", aggregate, 2).await;
    relay::drain(&test.db, &consumers).await.unwrap();
    let first = queued(&test.db).await;
    assert_eq!(first.len(), 1);

    // Its job still to run (or running): left alone, however old.
    strand(&test, "Running").await;
    assert_eq!(relay::requeue_stranded(&test.db).await.unwrap(), 0);
    // Recently queued: left alone even though its job has ended.
    let mut admin = test.admin().await;
    sqlx::query("UPDATE apalis.jobs SET status = 'Failed' WHERE job_type = 'recorder'")
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox_deliveries SET updated_at = now()")
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(relay::requeue_stranded(&test.db).await.unwrap(), 0);

    // The job ended (the run's own bookkeeping failed) and the delivery is
    // still queued a minute later: handed back, one attempt more.
    strand(&test, "Failed").await;
    assert_eq!(relay::requeue_stranded(&test.db).await.unwrap(), 1);
    let (status, attempts, error): (String, i32, Option<String>) = sqlx::query_as(
        "SELECT status, attempts, last_error FROM outbox_deliveries WHERE event_id = $1",
    )
    .bind(first[0].event_id)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert!(error.is_some());
    assert_eq!(relay::requeue_stranded(&test.db).await.unwrap(), 0, "once");

    // Released again as a new job, and the aggregate's next event follows.
    relay::drain(&test.db, &consumers).await.unwrap();
    let again = queued(&test.db).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event_id, first[0].event_id);
    worker::run_delivery(&test.db, recorder.as_ref(), &again[0])
        .await
        .unwrap();
    relay::drain(&test.db, &consumers).await.unwrap();
    let next = queued(&test.db).await;
    assert_eq!(next.len(), 1);
    worker::run_delivery(&test.db, recorder.as_ref(), &next[0])
        .await
        .unwrap();
    assert_eq!(
        recorder.seen.lock().unwrap().clone(),
        [(aggregate, 1), (aggregate, 2)]
    );
}

#[tokio::test]
async fn delivered_events_and_finished_jobs_are_purged_after_their_retention() {
    let test = keel_testing::test_db().await;
    let recorder = Arc::new(Recorder::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![recorder.clone()];
    let (delivered, dead, unwanted, recent) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    emit(&test.db, "thing.created", delivered, 1).await;
    emit(&test.db, "thing.created", dead, 1).await;
    emit(&test.db, "other.ignored", unwanted, 1).await;
    emit(&test.db, "thing.created", recent, 1).await;
    relay::drain(&test.db, &consumers).await.unwrap();
    let mut admin = test.admin().await;
    sqlx::query("UPDATE outbox_deliveries SET status = 'dead' WHERE aggregate_id = $1")
        .bind(dead)
        .execute(&mut admin)
        .await
        .unwrap();
    for job in queued(&test.db).await {
        worker::run_delivery(&test.db, recorder.as_ref(), &job)
            .await
            .unwrap();
    }
    for statement in [
        // Every event but the recent one fanned out eight days ago.
        "UPDATE outbox SET fanned_out_at = now() - interval '8 days' WHERE aggregate_id <> $2",
        // apalis finished the delivered event's job two hours ago, the
        // recent one's just now; the dead one's never ran.
        "UPDATE apalis.jobs SET status = 'Done', done_at = now() - interval '2 hours'
         WHERE idempotency_key = (SELECT id::text || ':0' FROM outbox WHERE aggregate_id = $1)",
        "UPDATE apalis.jobs SET status = 'Done', done_at = now()
         WHERE idempotency_key = (SELECT id::text || ':0' FROM outbox WHERE aggregate_id = $2)",
    ] {
        sqlx::query(statement)
            .bind(delivered)
            .bind(recent)
            .execute(&mut admin)
            .await
            .unwrap();
    }

    let purged = retention::purge(&test.db).await.unwrap();
    assert_eq!(purged, retention::Purged { jobs: 1, events: 2 });
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT aggregate_id FROM outbox ORDER BY seq")
        .fetch_all(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        left,
        [dead, recent],
        "a dead letter and a recent event stay"
    );
    let (deliveries, inbox, jobs): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_deliveries), (SELECT count(*) FROM consumer_inbox),
                (SELECT count(*) FROM apalis.jobs)",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        (deliveries, inbox, jobs),
        (2, 1, 2),
        "the dead letter has no inbox row"
    );
    assert_eq!(
        retention::purge(&test.db).await.unwrap(),
        retention::Purged::default(),
        "nothing more to purge"
    );
}

#[tokio::test]
async fn a_redelivered_job_has_its_effect_once() {
    let test = keel_testing::test_db().await;
    let recorder = Arc::new(Recorder::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![recorder.clone()];
    emit(&test.db, "thing.created", Uuid::now_v7(), 1).await;
    relay::drain(&test.db, &consumers).await.unwrap();
    let job = queued(&test.db).await.remove(0);
    worker::run_delivery(&test.db, recorder.as_ref(), &job)
        .await
        .unwrap();
    // A crashed worker's job re-run by apalis, and a second relay pass.
    worker::run_delivery(&test.db, recorder.as_ref(), &job)
        .await
        .unwrap();
    relay::drain(&test.db, &consumers).await.unwrap();
    assert!(queued(&test.db).await.is_empty());
    assert_eq!(recorder.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failure_is_retried_after_a_backoff_and_then_goes_dead() {
    let test = keel_testing::test_db().await;
    let recorder = Arc::new(Recorder::default());
    *recorder.failures_left.lock().unwrap() = u32::MAX;
    let consumers: Vec<Arc<dyn Consumer>> = vec![recorder.clone()];
    emit(&test.db, "thing.created", Uuid::now_v7(), 1).await;
    relay::drain(&test.db, &consumers).await.unwrap();
    let job = queued(&test.db).await.remove(0);
    worker::run_delivery(&test.db, recorder.as_ref(), &job)
        .await
        .unwrap();

    let mut conn = test.db.begin_bookkeeping().await.unwrap();
    let (status, attempts, in_future): (String, i32, bool) = sqlx::query_as(
        "SELECT status, attempts, available_at > now() FROM outbox_deliveries WHERE consumer = 'recorder'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts, in_future), ("pending", 1, true));
    // Not due yet: the relay leaves it alone.
    drop(conn);
    relay::drain(&test.db, &consumers).await.unwrap();
    assert!(queued(&test.db).await.is_empty());

    // Fast-forward through the remaining attempts.
    for _ in 1..MAX_ATTEMPTS {
        let mut conn = test.db.begin_bookkeeping().await.unwrap();
        sqlx::query("UPDATE outbox_deliveries SET available_at = now() WHERE status = 'pending'")
            .execute(&mut *conn)
            .await
            .unwrap();
        conn.commit().await.unwrap();
        relay::drain(&test.db, &consumers).await.unwrap();
        let job = queued(&test.db).await.remove(0);
        worker::run_delivery(&test.db, recorder.as_ref(), &job)
            .await
            .unwrap();
    }
    let mut conn = test.db.begin_bookkeeping().await.unwrap();
    let (status, attempts, error): (String, i32, Option<String>) = sqlx::query_as(
        "SELECT status, attempts, last_error FROM outbox_deliveries WHERE consumer = 'recorder'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts), ("dead", MAX_ATTEMPTS));
    assert_eq!(error.as_deref(), Some("induced failure"));
}

#[tokio::test]
async fn the_relay_and_apalis_workers_deliver_an_event_without_polling_delays() {
    let test = keel_testing::test_db().await;
    let recorder = Arc::new(Recorder::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![recorder.clone()];
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn(relay::run(test.db.clone(), consumers.clone(), stopped));
    let monitor = worker::monitor(&test.db, &consumers, "test");
    let (stop_monitor, monitor_stopped) = tokio::sync::oneshot::channel::<()>();
    let monitor = tokio::spawn(monitor.run_with_signal(async move {
        let _ = monitor_stopped.await;
        Ok(())
    }));

    let aggregate = Uuid::now_v7();
    emit(&test.db, "thing.created", aggregate, 1).await;
    emit(&test.db, "thing.updated", aggregate, 2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while recorder.seen.lock().unwrap().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events were not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        *recorder.seen.lock().unwrap(),
        [(aggregate, 1), (aggregate, 2)]
    );

    let _ = stop.send(true);
    let _ = stop_monitor.send(());
    relay.await.unwrap().unwrap();
    monitor.await.unwrap().unwrap();
}

/// A consumer that takes batches of up to four; each aggregate in
/// `fail_once` fails once.
#[derive(Default)]
struct Batcher {
    seen: Mutex<Vec<(Uuid, i64)>>,
    batches: Mutex<Vec<usize>>,
    fail_once: Mutex<std::collections::HashSet<Uuid>>,
}

impl Consumer for Batcher {
    fn name(&self) -> &'static str {
        "batcher"
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type.starts_with("thing.")
    }

    fn handle<'a>(&'a self, event: &'a DeliveredEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if self.fail_once.lock().unwrap().remove(&event.aggregate_id) {
                return Err(HandlerError::new("induced failure"));
            }
            self.seen
                .lock()
                .unwrap()
                .push((event.aggregate_id, event.aggregate_version));
            Ok(())
        })
    }

    fn batch_size(&self) -> usize {
        4
    }

    fn handle_batch<'a>(
        &'a self,
        events: &'a [DeliveredEvent],
    ) -> BoxFuture<'a, Vec<Result<(), HandlerError>>> {
        Box::pin(async move {
            self.batches.lock().unwrap().push(events.len());
            let mut results = Vec::new();
            for event in events {
                results.push(self.handle(event).await);
            }
            results
        })
    }
}

/// The batcher's queued deliveries, as the jobs they were released in.
async fn queued_jobs(db: &Db) -> Vec<DeliveryJob> {
    let rows: Vec<(Vec<Uuid>,)> = sqlx::query_as(
        "SELECT array_agg(event_id ORDER BY seq) FROM outbox_deliveries
          WHERE consumer = 'batcher' AND status = 'queued'
          GROUP BY job_key ORDER BY min(seq)",
    )
    .fetch_all(&mut *db.begin_bookkeeping().await.unwrap())
    .await
    .unwrap();
    rows.into_iter()
        .map(|(ids,)| DeliveryJob {
            consumer: "batcher".into(),
            event_id: ids[0].into(),
            more: ids[1..].iter().map(|id| (*id).into()).collect(),
        })
        .collect()
}

async fn aggregate_of(db: &Db, event_id: Uuid) -> Uuid {
    sqlx::query_scalar("SELECT aggregate_id FROM outbox WHERE id = $1")
        .bind(event_id)
        .fetch_one(&mut *db.begin_bookkeeping().await.unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_holds_distinct_aggregates_and_a_failure_fails_only_its_event() {
    let test = keel_testing::test_db().await;
    let batcher = Arc::new(Batcher::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![batcher.clone()];
    let aggregates: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    for aggregate in &aggregates {
        emit(&test.db, "thing.created", *aggregate, 1).await;
        emit(&test.db, "thing.updated", *aggregate, 2).await;
    }
    let unlucky = aggregates[2];
    batcher.fail_once.lock().unwrap().insert(unlucky);

    relay::drain(&test.db, &consumers).await.unwrap();
    let jobs = queued_jobs(&test.db).await;
    let sizes: Vec<usize> = jobs.iter().map(|job| 1 + job.more.len()).collect();
    assert_eq!(sizes, [4, 2], "each aggregate's first event, four to a job");
    for job in &jobs {
        let mut seen = std::collections::HashSet::new();
        for id in std::iter::once(job.event_id).chain(job.more.iter().copied()) {
            assert!(seen.insert(aggregate_of(&test.db, id.as_uuid()).await));
        }
        worker::run_batch(&test.db, batcher.as_ref(), job)
            .await
            .unwrap();
    }
    // Running a job again changes nothing.
    worker::run_batch(&test.db, batcher.as_ref(), &jobs[0])
        .await
        .unwrap();
    assert_eq!(
        batcher.seen.lock().unwrap().len(),
        5,
        "all but the unlucky one"
    );
    let (status, attempts): (String, i32) = sqlx::query_as(
        "SELECT d.status, d.attempts FROM outbox_deliveries d JOIN outbox o ON o.id = d.event_id
          WHERE o.aggregate_id = $1 AND o.aggregate_version = 1",
    )
    .bind(unlucky)
    .fetch_one(&mut test.admin().await)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts), ("pending", 1));

    // The others' second events go; the unlucky one's waits for its first
    // (whose retry is put off, so that a slow machine does not release it).
    sqlx::query(
        "UPDATE outbox_deliveries SET available_at = now() + interval '1 hour'
          WHERE status = 'pending' AND attempts = 1",
    )
    .execute(&mut test.admin().await)
    .await
    .unwrap();
    relay::drain(&test.db, &consumers).await.unwrap();
    let jobs = queued_jobs(&test.db).await;
    assert_eq!(jobs.iter().map(|job| 1 + job.more.len()).sum::<usize>(), 5);
    for job in &jobs {
        worker::run_batch(&test.db, batcher.as_ref(), job)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE outbox_deliveries SET available_at = now() WHERE status = 'pending'")
        .execute(&mut test.admin().await)
        .await
        .unwrap();
    for _ in 0..2 {
        relay::drain(&test.db, &consumers).await.unwrap();
        for job in &queued_jobs(&test.db).await {
            worker::run_batch(&test.db, batcher.as_ref(), job)
                .await
                .unwrap();
        }
    }
    let seen = batcher.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 12);
    for aggregate in &aggregates {
        let versions: Vec<i64> = seen
            .iter()
            .filter(|(id, _)| id == aggregate)
            .map(|(_, version)| *version)
            .collect();
        assert_eq!(versions, [1, 2], "in order, once each");
    }
    let inbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM consumer_inbox WHERE consumer = 'batcher'")
            .fetch_one(&mut test.admin().await)
            .await
            .unwrap();
    assert_eq!(inbox, 12);
}

#[tokio::test]
async fn batches_go_through_the_relay_and_apalis_workers() {
    let test = keel_testing::test_db().await;
    let batcher = Arc::new(Batcher::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![batcher.clone()];
    let aggregates: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for aggregate in &aggregates {
        emit(&test.db, "thing.created", *aggregate, 1).await;
        emit(&test.db, "thing.updated", *aggregate, 2).await;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn(relay::run(test.db.clone(), consumers.clone(), stopped));
    let monitor = worker::monitor(&test.db, &consumers, "test");
    let (stop_monitor, monitor_stopped) = tokio::sync::oneshot::channel::<()>();
    let monitor = tokio::spawn(monitor.run_with_signal(async move {
        let _ = monitor_stopped.await;
        Ok(())
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while batcher.seen.lock().unwrap().len() < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events were not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = batcher.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 40);
    for aggregate in &aggregates {
        let versions: Vec<i64> = seen
            .iter()
            .filter(|(id, _)| id == aggregate)
            .map(|(_, version)| *version)
            .collect();
        assert_eq!(versions, [1, 2]);
    }
    assert!(
        batcher.batches.lock().unwrap().iter().any(|size| *size > 1),
        "{:?}",
        batcher.batches.lock().unwrap()
    );
    let _ = stop.send(true);
    let _ = stop_monitor.send(());
    relay.await.unwrap().unwrap();
    monitor.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_batch_member_is_handed_back_only_once_its_job_has_ended() {
    let test = keel_testing::test_db().await;
    let batcher = Arc::new(Batcher::default());
    let consumers: Vec<Arc<dyn Consumer>> = vec![batcher.clone()];
    for _ in 0..6 {
        emit(&test.db, "thing.created", Uuid::now_v7(), 1).await;
    }
    relay::drain(&test.db, &consumers).await.unwrap();
    let jobs = queued_jobs(&test.db).await;
    assert_eq!(jobs.len(), 2);
    let mut admin = test.admin().await;
    // Every member queued a minute ago, its job still to run: left alone.
    sqlx::query("UPDATE outbox_deliveries SET updated_at = now() - interval '1 minute'")
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("UPDATE apalis.jobs SET status = 'Running' WHERE job_type = 'batcher'")
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(relay::requeue_stranded(&test.db).await.unwrap(), 0);
    // The first job ended without recording its members: all four go back.
    let first_key = format!("{}:0", jobs[0].event_id);
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Done', done_at = now()
          WHERE job_type = 'batcher' AND idempotency_key = $1",
    )
    .bind(&first_key)
    .execute(&mut admin)
    .await
    .unwrap();
    assert_eq!(relay::requeue_stranded(&test.db).await.unwrap(), 4);
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_deliveries WHERE status = 'pending' AND attempts = 1",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(pending, 4);
}
