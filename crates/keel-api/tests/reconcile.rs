//! The reconciler: every transitional state has a deadline, past which the
//! step is retried or the allocation settled; what a host reports running
//! is reconciled with what Keel wants of it.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use axum::http::StatusCode;
use common::TestApp;
use keel_auth::authz::PlatformRole;
use keel_core::ids::{AllocationId, HostId};
use keel_db::RequestMeta;
use keel_provisioning::reconcile::{Deadlines, reconcile_deadlines, reconcile_host};
use serde_json::json;

const DEADLINES: Deadlines = Deadlines {
    start_secs: 60,
    stop_secs: 60,
    attempts: 3,
    lost_after_secs: 600,
};

/// Launches `n` cpu.small allocations on one host; returns their ids.
async fn launch(app: &TestApp, n: usize) -> (uuid::Uuid, Vec<String>) {
    let host = app.add_host(16, 65536).await;
    let tenant = app.tenant("acme").await;
    let mut ids = Vec::new();
    for i in 0..n {
        let created = app
            .post(
                &format!("/v1/projects/{}/allocations", tenant.project_id),
                Some(&tenant.token),
                json!({"name": format!("a-{i}"), "flavor": "cpu.small"}),
            )
            .await;
        assert_eq!(created.body["state"], "scheduled", "{:?}", created.body);
        ids.push(created.body["id"].as_str().unwrap().to_owned());
    }
    (host, ids)
}

/// Puts an allocation in `state`, last changed `age_secs` ago.
async fn set(app: &TestApp, id: &str, state: &str, age_secs: i64, attempts: i32) {
    let mut admin = app.database.admin().await;
    sqlx::query(
        "UPDATE allocations SET state = $2, attempts = $4,
                failure_reason = CASE WHEN $2 = 'failed' THEN 'failed before' END,
                updated_at = now() - make_interval(secs => $3)
          WHERE id = $1::uuid",
    )
    .bind(id)
    .bind(state)
    .bind(age_secs as f64)
    .bind(attempts)
    .execute(&mut admin)
    .await
    .unwrap();
}

async fn state_of(app: &TestApp, id: &str) -> (String, Option<String>, bool, i32) {
    let mut admin = app.database.admin().await;
    sqlx::query_as(
        "SELECT state, failure_reason, reserved, attempts FROM allocations WHERE id = $1::uuid",
    )
    .bind(id)
    .fetch_one(&mut admin)
    .await
    .unwrap()
}

async fn host_seen(app: &TestApp, host: uuid::Uuid, state: &str, age_secs: i64) {
    let mut admin = app.database.admin().await;
    sqlx::query(
        "UPDATE hosts SET state = $2, last_seen_at = now() - make_interval(secs => $3) WHERE id = $1",
    )
    .bind(host)
    .bind(state)
    .bind(age_secs as f64)
    .execute(&mut admin)
    .await
    .unwrap();
}

fn meta() -> RequestMeta {
    RequestMeta::system("test", "t")
}

#[tokio::test]
async fn past_its_deadline_a_start_is_retried_then_fails_and_releases_its_capacity() {
    let app = TestApp::spawn().await;
    let (host, ids) = launch(&app, 4).await;
    host_seen(&app, host, "ready", 0).await;
    set(&app, &ids[0], "provisioning", 120, 0).await; // retried
    set(&app, &ids[1], "starting", 120, 3).await; // gives up
    set(&app, &ids[2], "stopping", 120, 7).await; // stops are retried on
    set(&app, &ids[3], "provisioning", 10, 0).await; // not due yet

    let report = reconcile_deadlines(&app.state.db, meta(), &DEADLINES)
        .await
        .unwrap();
    assert_eq!((report.retried, report.failed), (2, 1), "{report:?}");
    assert_eq!(report.past_deadline, 0);
    let (state, _, _, attempts) = state_of(&app, &ids[0]).await;
    assert_eq!((state.as_str(), attempts), ("provisioning", 1));
    let (state, reason, reserved, _) = state_of(&app, &ids[1]).await;
    assert_eq!(state, "failed");
    assert_eq!(
        reason.as_deref(),
        Some("the host did not confirm the start after 4 attempts")
    );
    assert!(!reserved, "a failed start releases its capacity");
    assert_eq!(state_of(&app, &ids[2]).await.3, 8);
    assert_eq!(state_of(&app, &ids[3]).await.3, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM outbox WHERE event_type = 'allocation.retry'")
            .await,
        2
    );
    let reserved: i32 = sqlx::query_scalar("SELECT reserved_vcpus FROM hosts")
        .fetch_one(&mut app.database.admin().await)
        .await
        .unwrap();
    assert_eq!(reserved, 3);

    // A second pass right away has nothing to do.
    let again = reconcile_deadlines(&app.state.db, meta(), &DEADLINES)
        .await
        .unwrap();
    assert_eq!((again.retried, again.failed, again.terminated), (0, 0, 0));
}

#[tokio::test]
async fn on_a_host_gone_for_long_lost_work_fails_and_terminations_complete() {
    let app = TestApp::spawn().await;
    let (host, ids) = launch(&app, 4).await;
    host_seen(&app, host, "offline", 3600).await;
    set(&app, &ids[0], "lost", 3600, 0).await;
    set(&app, &ids[1], "terminating", 3600, 0).await;
    set(&app, &ids[2], "provisioning", 120, 0).await; // waits for the host
    set(&app, &ids[3], "stopping", 3600, 0).await;

    let report = reconcile_deadlines(&app.state.db, meta(), &DEADLINES)
        .await
        .unwrap();
    assert_eq!(
        (report.retried, report.failed, report.terminated),
        (0, 2, 1),
        "{report:?}"
    );
    assert_eq!(report.past_deadline, 1, "the start waiting for its host");
    let (state, reason, reserved, _) = state_of(&app, &ids[0]).await;
    assert_eq!(state, "failed");
    assert_eq!(
        reason.as_deref(),
        Some("the host has been unreachable for more than 10 minutes")
    );
    assert!(!reserved);
    assert_eq!(state_of(&app, &ids[1]).await.0, "terminated");
    assert_eq!(state_of(&app, &ids[2]).await.0, "provisioning");
    assert_eq!(state_of(&app, &ids[3]).await.0, "failed");

    // A host offline only briefly keeps what it had.
    let app = TestApp::spawn().await;
    let (host, ids) = launch(&app, 1).await;
    host_seen(&app, host, "offline", 120).await;
    set(&app, &ids[0], "lost", 3600, 0).await;
    let report = reconcile_deadlines(&app.state.db, meta(), &DEADLINES)
        .await
        .unwrap();
    assert_eq!(report.failed, 0);
    assert_eq!(state_of(&app, &ids[0]).await.0, "lost");
}

#[tokio::test]
async fn what_a_host_reports_is_reconciled_with_what_keel_wants() {
    let app = TestApp::spawn().await;
    let (host, ids) = launch(&app, 7).await;
    let host_id = HostId::from(host);
    set(&app, &ids[0], "lost", 30, 0).await; // listed → running
    set(&app, &ids[1], "failed", 30, 0).await; // listed → orphan, stopped there
    set(&app, &ids[2], "running", 120, 0).await; // missing → failed
    set(&app, &ids[3], "stopping", 120, 0).await; // missing → stopped
    set(&app, &ids[4], "terminating", 120, 0).await; // missing → terminated
    set(&app, &ids[5], "running", 5, 0).await; // missing, but just started
    set(&app, &ids[6], "lost", 120, 0).await; // the host came back without it
    let mut admin = app.database.admin().await;
    sqlx::query("UPDATE allocations SET reserved = false WHERE id = $1::uuid")
        .bind(&ids[1])
        .execute(&mut admin)
        .await
        .unwrap();
    let stranger = AllocationId::new();
    let listed: Vec<AllocationId> = [&ids[0], &ids[1]]
        .into_iter()
        .map(|id| AllocationId::from(uuid::Uuid::parse_str(id).unwrap()))
        .chain([stranger])
        .collect();

    // The first heartbeat without them only notes that they are missing.
    let acted = reconcile_host(&app.state.db, meta(), host_id, &listed)
        .await
        .unwrap();
    assert_eq!(acted, 3, "one back to running, two orphans");
    assert_eq!(state_of(&app, &ids[2]).await.0, "running");
    // Missing for the whole grace period: believed gone.
    sqlx::query(
        "UPDATE allocations SET unlisted_since = now() - interval '2 minutes'
          WHERE unlisted_since IS NOT NULL",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    let acted = reconcile_host(&app.state.db, meta(), host_id, &listed)
        .await
        .unwrap();
    assert_eq!(acted, 4, "the orphans were asked to stop a moment ago");
    assert_eq!(state_of(&app, &ids[0]).await.0, "running");
    assert_eq!(state_of(&app, &ids[1]).await.0, "failed");
    let (state, reason, reserved, _) = state_of(&app, &ids[2]).await;
    assert_eq!(state, "failed");
    assert!(reason.unwrap().contains("no longer running"));
    assert!(!reserved);
    assert_eq!(state_of(&app, &ids[3]).await.0, "stopped");
    assert_eq!(state_of(&app, &ids[4]).await.0, "terminated");
    assert_eq!(state_of(&app, &ids[5]).await.0, "running");
    let (state, reason, reserved, _) = state_of(&app, &ids[6]).await;
    assert_eq!(state, "failed");
    assert!(reason.unwrap().contains("when its host came back"));
    assert!(!reserved);
    let orphans: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE event_type = 'host.orphan_workload' ORDER BY created_at",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    let orphaned: Vec<&str> = orphans
        .iter()
        .map(|payload| payload["allocation_id"].as_str().unwrap())
        .collect();
    assert_eq!(orphaned.len(), 2);
    assert!(orphaned.contains(&ids[1].as_str()));
    assert!(orphaned.contains(&stranger.to_string().as_str()));

    // Reconciling the same report again changes nothing more.
    let again = reconcile_host(&app.state.db, meta(), host_id, &listed[..1])
        .await
        .unwrap();
    assert_eq!(again, 0);
}

#[tokio::test]
async fn operators_run_the_reconciler_on_demand() {
    let app = TestApp::spawn().await;
    let (_, operator) = app.operator(PlatformRole::Operator).await;
    let (_, reader) = app.operator(PlatformRole::ReadOnlyOperator).await;
    let (host, ids) = launch(&app, 1).await;
    host_seen(&app, host, "ready", 0).await;
    set(&app, &ids[0], "requested", 3600, 0).await;
    app.post("/v1/admin/reconcile", Some(&reader), json!({}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let ran = app
        .post("/v1/admin/reconcile", Some(&operator), json!({}))
        .await;
    assert_eq!(ran.status, StatusCode::OK, "{:?}", ran.body);
    assert_eq!(ran.body["failed"], 1);
    assert_eq!(state_of(&app, &ids[0]).await.0, "failed");
}
