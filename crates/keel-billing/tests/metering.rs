//! Metering against a real Postgres: runs become usage records cut at
//! month ends, exactly once per source event under redelivery and two
//! workers at once, and through the real outbox path.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::sync::Arc;

use keel_billing::meter::MeteringConsumer;
use keel_core::ResourceName;
use keel_core::ids::TenantId;
use keel_db::{Audit, NewEvent, RequestMeta};
use keel_outbox::{Consumer, relay, worker};
use serde_json::json;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

mod common;
use common::{Allocation, records};

const HOUR_US: i64 = 3_600_000_000;

#[tokio::test]
async fn a_run_becomes_one_usage_record_per_month_it_touches() {
    let test = keel_testing::test_db().await;
    let meter = MeteringConsumer::new(test.db.clone());
    let allocation = Allocation::new();
    let started = datetime!(2026-01-31 23:00:00.25 UTC);
    let ended = datetime!(2026-02-01 01:00:00.25 UTC);
    meter
        .handle(&allocation.event("running", Some("provisioning"), started))
        .await
        .unwrap();
    assert!(
        records(&test, allocation.id).await.is_empty(),
        "still running"
    );
    meter
        .handle(&allocation.event("terminating", Some("running"), ended))
        .await
        .unwrap();
    let got = records(&test, allocation.id).await;
    assert_eq!(
        got,
        [
            (
                time::macros::date!(2026 - 01 - 01),
                started,
                datetime!(2026-02-01 00:00 UTC),
                HOUR_US - 250_000
            ),
            (
                time::macros::date!(2026 - 02 - 01),
                datetime!(2026-02-01 00:00 UTC),
                ended,
                HOUR_US + 250_000
            ),
        ]
    );
    let (flavor, region, project): (String, String, Uuid) = sqlx::query_as(
        "SELECT DISTINCT flavor, region, project_id FROM usage_records WHERE allocation_id = $1",
    )
    .bind(allocation.id)
    .fetch_one(&mut test.admin().await)
    .await
    .unwrap();
    assert_eq!(
        (flavor.as_str(), region.as_str(), project),
        ("cpu.small", "local-1", allocation.project)
    );
}

#[tokio::test]
async fn redelivered_and_concurrent_deliveries_meter_once() {
    let test = keel_testing::test_db().await;
    let meter = Arc::new(MeteringConsumer::new(test.db.clone()));
    let allocation = Allocation::new();
    let open = allocation.event(
        "running",
        Some("provisioning"),
        datetime!(2026-03-01 10:00 UTC),
    );
    let close = allocation.event("stopping", Some("running"), datetime!(2026-03-01 12:00 UTC));
    meter.handle(&open).await.unwrap();
    meter.handle(&open).await.unwrap();
    // Two workers run the close at once, and a third runs it again later
    // (one was killed after its effect, before its delivery was marked).
    let (a, b) = (Arc::clone(&meter), Arc::clone(&meter));
    let (first, second) = (close.clone(), close.clone());
    let (x, y) = tokio::join!(async move { a.handle(&first).await }, async move {
        b.handle(&second).await
    });
    x.unwrap();
    y.unwrap();
    meter.handle(&close).await.unwrap();
    meter.handle(&open).await.unwrap();
    let got = records(&test, allocation.id).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].3, 2 * HOUR_US);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM meter_runs WHERE allocation_id = $1")
        .bind(allocation.id)
        .fetch_one(&mut test.admin().await)
        .await
        .unwrap();
    assert_eq!(runs, 1, "the redelivered open opened nothing new");
}

#[tokio::test]
async fn stop_and_start_meter_two_runs_and_the_stopped_time_is_free() {
    let test = keel_testing::test_db().await;
    let meter = MeteringConsumer::new(test.db.clone());
    let allocation = Allocation::new();
    for (state, previous, at) in [
        ("running", "provisioning", datetime!(2026-06-10 08:00 UTC)),
        ("stopping", "running", datetime!(2026-06-10 09:00 UTC)),
        ("running", "starting", datetime!(2026-06-10 12:00 UTC)),
        ("lost", "running", datetime!(2026-06-10 12:30 UTC)),
        ("running", "lost", datetime!(2026-06-10 12:40 UTC)),
        ("failed", "running", datetime!(2026-06-10 13:00 UTC)),
    ] {
        meter
            .handle(&allocation.event(state, Some(previous), at))
            .await
            .unwrap();
    }
    let quantities: Vec<i64> = records(&test, allocation.id)
        .await
        .into_iter()
        .map(|record| record.3)
        .collect();
    assert_eq!(quantities, [HOUR_US, HOUR_US / 2, HOUR_US / 3]);
}

#[tokio::test]
async fn a_close_with_no_open_run_meters_nothing_and_a_bad_payload_is_an_error() {
    let test = keel_testing::test_db().await;
    let meter = MeteringConsumer::new(test.db.clone());
    let allocation = Allocation::new();
    // Its run began before billing was deployed.
    meter
        .handle(&allocation.event(
            "terminating",
            Some("running"),
            datetime!(2026-06-10 09:00 UTC),
        ))
        .await
        .unwrap();
    assert!(records(&test, allocation.id).await.is_empty());
    let mut broken = allocation.event("running", None, datetime!(2026-06-10 09:00 UTC));
    broken.payload = json!({"allocation_id": "not-a-uuid"});
    assert!(meter.handle(&broken).await.is_err());
}

#[tokio::test]
async fn an_open_over_an_unclosed_run_fails_and_a_late_close_leaves_the_next_run_alone() {
    let test = keel_testing::test_db().await;
    let meter = MeteringConsumer::new(test.db.clone());
    let allocation = Allocation::new();
    let first = allocation.event(
        "running",
        Some("provisioning"),
        datetime!(2026-08-01 10:00 UTC),
    );
    let close = allocation.event("stopping", Some("running"), datetime!(2026-08-01 11:00 UTC));
    let second = allocation.event("running", Some("starting"), datetime!(2026-08-01 12:00 UTC));
    meter.handle(&first).await.unwrap();
    // The close never reached billing: the next open refuses to guess.
    let error = meter.handle(&second).await.unwrap_err();
    assert!(error.0.contains("open run"), "{}", error.0);
    meter.handle(&close).await.unwrap();
    meter.handle(&second).await.unwrap();
    // A late copy of the old close, and an older close of another
    // delivery, leave the run that began after them open.
    meter.handle(&close).await.unwrap();
    let stale = allocation.event("lost", Some("running"), datetime!(2026-08-01 11:30 UTC));
    meter.handle(&stale).await.unwrap();
    let open: Vec<Uuid> = sqlx::query_scalar(
        "SELECT opened_by FROM meter_runs WHERE allocation_id = $1 AND ended_at IS NULL",
    )
    .bind(allocation.id)
    .fetch_all(&mut test.admin().await)
    .await
    .unwrap();
    assert_eq!(open, [second.id.as_uuid()]);
    let quantities: Vec<i64> = records(&test, allocation.id)
        .await
        .into_iter()
        .map(|record| record.3)
        .collect();
    assert_eq!(quantities, [HOUR_US]);
}

#[tokio::test]
async fn a_batch_meters_what_one_by_one_would_and_a_bad_event_fails_alone() {
    let test = keel_testing::test_db().await;
    let meter = Arc::new(MeteringConsumer::new(test.db.clone()).in_batches_of(50));
    assert_eq!(meter.batch_size(), 50);
    let start = datetime!(2026-01-31 21:00:00.5 UTC);
    let hours = |n: i64| time::Duration::hours(n);
    // Five allocations metered in batches, five twins one by one, with the
    // same times (some runs cross the month end).
    let batched: Vec<Allocation> = (0..5).map(|_| Allocation::new()).collect();
    let twins: Vec<Allocation> = (0..5).map(|_| Allocation::new()).collect();
    let opens = |of: &[Allocation]| -> Vec<keel_outbox::DeliveredEvent> {
        of.iter()
            .map(|a| a.event("running", Some("provisioning"), start))
            .collect()
    };
    let closes = |of: &[Allocation]| -> Vec<keel_outbox::DeliveredEvent> {
        of.iter()
            .enumerate()
            .map(|(n, a)| a.event("terminating", Some("running"), start + hours(n as i64 + 1)))
            .collect()
    };
    // With them: an open over a run no event closed, and a broken payload.
    let blocked = Allocation::new();
    meter
        .handle(&blocked.event("running", Some("provisioning"), start))
        .await
        .unwrap();
    let mut first = opens(&batched);
    first.push(blocked.event("running", Some("starting"), start + hours(1)));
    let mut broken = Allocation::new().event("running", None, start);
    broken.payload = json!({"allocation_id": "not-a-uuid"});
    first.push(broken);
    for _ in 0..2 {
        // Delivered twice: the same outcome, nothing twice.
        let results = meter.handle_batch(&first).await;
        assert_eq!(results.len(), 7);
        assert!(results[..5].iter().all(Result::is_ok), "{results:?}");
        let blocked_error = results[5].as_ref().unwrap_err();
        assert!(blocked_error.0.contains("open run"), "{}", blocked_error.0);
        assert!(results[6].is_err());
    }
    // The closes: two workers at once, then once more.
    let second = closes(&batched);
    let (a, b) = (Arc::clone(&meter), Arc::clone(&meter));
    let (x, y) = tokio::join!(a.handle_batch(&second), b.handle_batch(&second));
    assert!(x.iter().chain(y.iter()).all(Result::is_ok));
    assert!(meter.handle_batch(&second).await.iter().all(Result::is_ok));
    // All of it took the set-based path (a failed batch would have been
    // metered one by one, to the same records).
    assert_eq!(keel_billing::meter::batch_fallbacks(), 0);
    for event in opens(&twins).iter().chain(closes(&twins).iter()) {
        meter.handle(event).await.unwrap();
    }
    for (one, twin) in batched.iter().zip(&twins) {
        let got = records(&test, one.id).await;
        assert!(!got.is_empty());
        assert_eq!(got, records(&test, twin.id).await);
    }
    // One allocation twice in a batch (never released so, but a redelivery
    // could): metered in order, one by one.
    let twice = Allocation::new();
    let both = [
        twice.event("running", Some("provisioning"), start),
        twice.event("stopping", Some("running"), start + hours(2)),
    ];
    assert!(meter.handle_batch(&both).await.iter().all(Result::is_ok));
    let got = records(&test, twice.id).await;
    assert_eq!(got.iter().map(|record| record.3).sum::<i64>(), 2 * HOUR_US);
}

async fn emit(
    db: &keel_db::Db,
    allocation: &Allocation,
    version: i64,
    state: &str,
    previous: &str,
    at: OffsetDateTime,
) {
    let mut tx = db
        .begin_system(RequestMeta::system("test", "test"))
        .await
        .unwrap();
    let name = ResourceName::new(
        None,
        Some(TenantId::from(allocation.tenant)),
        None,
        "allocation",
        allocation.id,
    );
    let event_type: &'static str = match state {
        "running" => "allocation.running",
        "terminating" => "allocation.terminating",
        _ => "allocation.terminated",
    };
    tx.emit(NewEvent::new(
        event_type,
        "allocation",
        allocation.id,
        version,
        Some(TenantId::from(allocation.tenant)),
        name.clone(),
        allocation.payload(state, Some(previous), at),
    ));
    tx.commit(Audit::new("allocation.test", None, name))
        .await
        .unwrap();
}

#[tokio::test]
async fn through_the_outbox_a_delivery_run_again_after_a_lost_mark_meters_once() {
    let test = keel_testing::test_db().await;
    let meter = Arc::new(MeteringConsumer::new(test.db.clone()));
    let consumers: Vec<Arc<dyn Consumer>> = vec![meter.clone()];
    let allocation = Allocation::new();
    emit(
        &test.db,
        &allocation,
        1,
        "running",
        "provisioning",
        datetime!(2026-07-01 00:00 UTC),
    )
    .await;
    emit(
        &test.db,
        &allocation,
        2,
        "terminating",
        "running",
        datetime!(2026-07-01 00:30 UTC),
    )
    .await;
    emit(
        &test.db,
        &allocation,
        3,
        "terminated",
        "terminating",
        datetime!(2026-07-01 00:31 UTC),
    )
    .await;
    // Each pass releases the next event of the allocation; each delivery
    // runs, then runs again as if its worker had been killed after the
    // effect and before marking it (delivery back to queued, no inbox row).
    for _ in 0..3 {
        relay::drain(&test.db, &consumers).await.unwrap();
        let queued: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT event_id FROM outbox_deliveries WHERE consumer = 'billing' AND status = 'queued'",
        )
        .fetch_all(&mut test.admin().await)
        .await
        .unwrap();
        for (event_id,) in queued {
            let job = keel_outbox::DeliveryJob {
                consumer: "billing".into(),
                event_id: event_id.into(),
                more: Vec::new(),
            };
            worker::run_delivery(&test.db, meter.as_ref(), &job)
                .await
                .unwrap();
            let mut admin = test.admin().await;
            sqlx::query(
                "UPDATE outbox_deliveries SET status = 'queued' WHERE consumer = 'billing' AND event_id = $1",
            )
            .bind(event_id)
            .execute(&mut admin)
            .await
            .unwrap();
            sqlx::query("DELETE FROM consumer_inbox WHERE consumer = 'billing' AND event_id = $1")
                .bind(event_id)
                .execute(&mut admin)
                .await
                .unwrap();
            worker::run_delivery(&test.db, meter.as_ref(), &job)
                .await
                .unwrap();
        }
    }
    let got = records(&test, allocation.id).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].3, HOUR_US / 2);
    let unwanted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_deliveries d JOIN outbox o ON o.id = d.event_id
         WHERE d.consumer = 'billing' AND o.event_type = 'allocation.terminated'",
    )
    .fetch_one(&mut test.admin().await)
    .await
    .unwrap();
    assert_eq!(unwanted, 0, "billing wants only what opens or closes a run");
}
