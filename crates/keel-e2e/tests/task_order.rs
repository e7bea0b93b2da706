//! One host's tasks are acted on in sequence order although the worker
//! sends them concurrently. The agent refuses a sequence number at or below
//! the highest it accepted (`replayed`); it waits briefly for a missing
//! lower number instead of refusing the earlier task when it comes. Many
//! launches and terminations at once on one host: each task is accepted on
//! its first delivery. And a task the agent does refuse as `replayed` (here:
//! the host's counter set back, as if another worker had gone ahead) is
//! decided again at once, not after a backoff.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use keel_client::apis::allocations_api;
use keel_client::apis::configuration::Configuration;
use keel_client::models::{AllocationState, NewAllocation};

mod common;

use common::{Keel, eventually};

/// Launched at once on the one host.
const LAUNCHES: usize = 16;

#[tokio::test]
async fn a_hosts_tasks_arrive_in_sequence_order() {
    let mut keel = Keel::new("task-order").await;
    keel.agent_env.extend([
        ("KEEL_AGENT_VCPUS", "32".into()),
        ("KEEL_AGENT_MEMORY_MIB", "65536".into()),
        ("KEEL_AGENT_DISK_GIB", "1000".into()),
        // However slow this machine, a missing number arrives before the
        // wait runs out: no task is ever accepted ahead of a lower one.
        ("KEEL_AGENT_REORDER_WAIT_MS", "30000".into()),
    ]);
    let _api = keel.api();
    keel.ready().await;
    keel.enrol("order-node");
    let _agent = keel.agent();
    let _worker = keel.worker();
    let (tenant, project) = keel.sign_up("order@example.com").await;
    let admin = sqlx::PgPool::connect(&keel.database.admin_url)
        .await
        .unwrap();
    eventually("the host to report its capacity", &keel.logs, || async {
        let vcpus: Option<i32> = sqlx::query_scalar("SELECT vcpus FROM hosts")
            .fetch_optional(&admin)
            .await
            .unwrap();
        (vcpus == Some(32)).then_some(())
    })
    .await;

    // Launches at once: every start task is accepted the first time.
    let launches = (0..LAUNCHES).map(|n| {
        let (tenant, project) = (tenant.clone(), project.clone());
        tokio::spawn(async move { launch(&tenant, &project, &format!("order-{n}")).await })
    });
    let mut ids = Vec::new();
    for launch in launches {
        ids.push(launch.await.unwrap());
    }
    for id in &ids {
        wait_for(&keel, &tenant, &project, id, AllocationState::Running).await;
    }
    // And so is every stop, all sent at once.
    let terminations = ids.iter().map(|id| {
        let (tenant, project, id) = (tenant.clone(), project.clone(), id.clone());
        tokio::spawn(async move {
            allocations_api::allocation_terminate(&tenant, &project, &id, None)
                .await
                .unwrap();
        })
    });
    for termination in terminations {
        termination.await.unwrap();
    }
    for id in &ids {
        wait_for(&keel, &tenant, &project, id, AllocationState::Terminated).await;
    }
    assert_eq!(retried_deliveries(&admin).await, 0, "no task was refused");
    assert!(
        !keel.log_text().contains("reached the host first"),
        "no task arrived after its successor was accepted"
    );

    // Another worker got ahead: the host's counter is behind what the agent
    // accepted (by two), so the next task is refused as `replayed` twice
    // and accepted with the third number, within one delivery attempt.
    sqlx::query("UPDATE hosts SET task_seq = task_seq - 2")
        .execute(&admin)
        .await
        .unwrap();
    let id = launch(&tenant, &project, "overtaken").await;
    wait_for(&keel, &tenant, &project, &id, AllocationState::Running).await;
    assert_eq!(retried_deliveries(&admin).await, 0);
    assert!(
        keel.log_text().matches("reached the host first").count() >= 2,
        "decided again at once"
    );
    allocations_api::allocation_terminate(&tenant, &project, &id, None)
        .await
        .unwrap();
    wait_for(&keel, &tenant, &project, &id, AllocationState::Terminated).await;
    keel.clean_up();
}

async fn launch(tenant: &Configuration, project: &str, name: &str) -> String {
    let mut new = NewAllocation::new("cpu.small".into(), name.into());
    new.command = Some(Some(vec!["sleep".into(), "300".into()]));
    allocations_api::allocation_create(tenant, project, new, None)
        .await
        .unwrap()
        .id
        .to_string()
}

async fn wait_for(
    keel: &Keel,
    tenant: &Configuration,
    project: &str,
    id: &str,
    state: AllocationState,
) {
    eventually(&format!("{id} to be {state:?}"), &keel.logs, || async {
        let allocation = allocations_api::allocation_get(tenant, project, id)
            .await
            .ok()?;
        assert_ne!(allocation.state, AllocationState::Failed, "{allocation:?}");
        (allocation.state == state).then_some(())
    })
    .await;
}

/// Provisioning deliveries that needed more than one attempt.
async fn retried_deliveries(admin: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox_deliveries WHERE consumer = 'provisioning' AND attempts > 0",
    )
    .fetch_one(admin)
    .await
    .unwrap()
}
