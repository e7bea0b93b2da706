//! No stuck states: launches and terminations while the agent, the worker
//! and the api are killed (SIGKILL) and restarted at arbitrary points. Every
//! allocation still settles — `running` with its process alive on the host,
//! or `failed` with a reason — and then terminates, its process gone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::path::Path;
use std::time::Duration;

use keel_client::apis::allocations_api;
use keel_client::models::{AllocationState, NewAllocation};

mod common;

use common::{Keel, Process, eventually, pid_is_alive};

/// Rounds of two launches.
const ROUNDS: usize = 4;

fn kill(process: &mut Process) {
    let _ = process.child.kill();
    let _ = process.child.wait();
}

/// A small deterministic generator: the interleaving varies per launch but
/// a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

fn workload_pid(agent_state: &Path, id: &str) -> Option<u32> {
    std::fs::read_to_string(agent_state.join("runtime").join(id).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[tokio::test]
async fn allocations_settle_whatever_is_killed_during_a_launch() {
    let mut keel = Keel::new("settling").await;
    // Short deadlines, so that what was interrupted is retried soon.
    keel.control_plane_env.extend([
        ("KEEL_LIFECYCLE__START_SECS", "4".into()),
        ("KEEL_LIFECYCLE__STOP_SECS", "4".into()),
        ("KEEL_LIFECYCLE__ATTEMPTS", "4".into()),
    ]);
    let mut api = keel.api();
    keel.ready().await;
    keel.enrol("settling-node");
    let mut agent = keel.agent();
    let mut worker = keel.worker();
    let (tenant, project) = keel.sign_up("settle@example.com").await;

    let mut random = Lcg(0x5eed);
    let mut admin = keel.database.admin().await;
    let (mut running, mut failed, mut answered) = (0, 0, 0);
    // Rounds of two launches (this host has room for two cpu.small at a
    // time), each interrupted by a kill; all settle, then all terminate.
    for round in 0..ROUNDS {
        for n in 0..2 {
            let mut new = NewAllocation::new("cpu.small".into(), format!("settle-{round}-{n}"));
            new.command = Some(Some(vec!["sleep".into(), "300".into()]));
            let launch = {
                let tenant = tenant.clone();
                let project = project.clone();
                tokio::spawn(async move {
                    allocations_api::allocation_create(&tenant, &project, new, None).await
                })
            };
            // Somewhere in the launch, one of the three dies and comes back.
            tokio::time::sleep(Duration::from_millis(random.next(400))).await;
            match random.next(3) {
                0 => {
                    kill(&mut agent);
                    agent = keel.agent();
                }
                1 => {
                    kill(&mut worker);
                    worker = keel.worker();
                }
                _ => {
                    kill(&mut api);
                    api = keel.api();
                }
            }
            // A launch the api died in the middle of may or may not exist.
            if let Ok(Ok(_)) = launch.await {
                answered += 1;
            }
            keel.ready().await;
        }
        // Whatever the api committed before it died counts too.
        let ids: Vec<String> = sqlx::query_scalar::<_, uuid::Uuid>(
            "SELECT id FROM allocations WHERE state <> 'terminated' ORDER BY id",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();

        // Every allocation settles: running with a live process, or failed
        // with a reason (never for want of room: there is room).
        for id in &ids {
            let settled = eventually("the allocation to settle", &keel.logs, || async {
                let allocation = allocations_api::allocation_get(&tenant, &project, id)
                    .await
                    .ok()?;
                matches!(
                    allocation.state,
                    AllocationState::Running | AllocationState::Failed
                )
                .then_some(allocation)
            })
            .await;
            if settled.state == AllocationState::Running {
                eventually("its process to run", &keel.logs, || async {
                    workload_pid(&keel.agent_state, id).filter(|pid| pid_is_alive(*pid))
                })
                .await;
                running += 1;
            } else {
                let reason = settled.failure_reason.flatten().unwrap_or_default();
                assert_ne!(reason, "insufficient_capacity");
                failed += 1;
            }
        }

        // And every allocation terminates, its process gone.
        for id in &ids {
            let _ = allocations_api::allocation_terminate(&tenant, &project, id, None).await;
        }
        for id in &ids {
            eventually("the allocation to be terminated", &keel.logs, || async {
                let allocation = allocations_api::allocation_get(&tenant, &project, id)
                    .await
                    .ok()?;
                (allocation.state == AllocationState::Terminated).then_some(())
            })
            .await;
            eventually("its process to be gone", &keel.logs, || async {
                workload_pid(&keel.agent_state, id)
                    .is_none_or(|pid| !pid_is_alive(pid))
                    .then_some(())
            })
            .await;
        }
    }
    eprintln!(
        "{answered} launches answered, {running} ran, {failed} failed, {} restarts",
        keel.started - 3
    );
    assert!(running >= ROUNDS, "most launches run: {running}");
    let reserved: i64 = sqlx::query_scalar("SELECT COALESCE(sum(reserved_vcpus), 0) FROM hosts")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(reserved, 0, "every reservation was released exactly once");
    drop((api, worker));
    kill(&mut agent);
    keel.clean_up();
}
