//! No stuck states: launches and terminations while the agent, the worker
//! and the api are killed (SIGKILL) and restarted at arbitrary points. Every
//! allocation still settles — `running` with its process alive on the host,
//! or `failed` with a reason — and then terminates, its process gone; and
//! billing, whose deliveries the kills interrupt and the outbox redelivers,
//! metered every run exactly once.

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

/// Billing metered every run exactly once although workers were killed
/// mid-batch: each `running` event opened one run, closed at the exact time
/// of the allocation's next event, and the run's usage records add up to it
/// with no overlap.
async fn metered_exactly_once(keel: &Keel, admin: &mut sqlx::PgConnection) {
    eventually("billing to take every event", &keel.logs, || async {
        let mut admin = keel.database.admin().await;
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_deliveries WHERE consumer = 'billing' AND status <> 'done'",
        )
        .fetch_one(&mut admin)
        .await
        .ok()?;
        let unfanned: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE fanned_out_at IS NULL")
                .fetch_one(&mut admin)
                .await
                .ok()?;
        (open == 0 && unfanned == 0).then_some(())
    })
    .await;
    // The runs the events describe: a `running` event opens one, the
    // allocation's next event closes it.
    let expected: Vec<(uuid::Uuid, String, String)> = sqlx::query_as(
        "SELECT aggregate_id, payload->>'at', next_at FROM (
             SELECT aggregate_id, payload, event_type,
                    lead(payload->>'at') OVER (PARTITION BY aggregate_id ORDER BY aggregate_version)
                        AS next_at
               FROM outbox
              WHERE aggregate_type = 'allocation' AND event_type <> 'allocation.retry'
                AND payload ? 'previous_state' AND payload ? 'at') e
          WHERE event_type = 'allocation.running' ORDER BY aggregate_id, payload->>'at'",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    let metered: Vec<(uuid::Uuid, String, String)> = sqlx::query_as(
        "SELECT allocation_id,
                to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'),
                to_char(ended_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')
           FROM meter_runs ORDER BY allocation_id, started_at",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    let normalise = |at: &str| -> String {
        let parsed =
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .expect("an RFC 3339 time");
        let utc = parsed.to_offset(time::UtcOffset::UTC);
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}",
            utc.year(),
            u8::from(utc.month()),
            utc.day(),
            utc.hour(),
            utc.minute(),
            utc.second(),
            utc.microsecond()
        )
    };
    let mut expected: Vec<(uuid::Uuid, String, String)> = expected
        .into_iter()
        .map(|(id, start, end)| (id, normalise(&start), normalise(&end)))
        .collect();
    expected.sort();
    let mut metered = metered;
    metered.sort();
    assert!(!expected.is_empty(), "some allocations ran");
    assert_eq!(
        metered, expected,
        "one run per `running` event, ended by the next event"
    );
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM meter_runs r
          WHERE (SELECT coalesce(sum(quantity), 0) FROM usage_records u
                  WHERE u.allocation_id = r.allocation_id
                    AND u.started_at >= r.started_at AND u.ended_at <= r.ended_at)
                <> ((extract(epoch FROM r.ended_at) - extract(epoch FROM r.started_at)) * 1000000)::bigint",
    )
    .fetch_one(&mut *admin)
    .await
    .unwrap();
    assert_eq!(mismatched, 0, "each run's usage adds up to the run");
    let overlapping: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_records a JOIN usage_records b
             ON a.allocation_id = b.allocation_id AND a.id < b.id
            AND a.started_at < b.ended_at AND b.started_at < a.ended_at",
    )
    .fetch_one(&mut *admin)
    .await
    .unwrap();
    assert_eq!(overlapping, 0, "no time is billed twice");
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

        // And every allocation terminates, its process gone — with the
        // worker killed in the middle of the batch of terminations (and so
        // of billing's deliveries of the closes).
        for (n, id) in ids.iter().enumerate() {
            let _ = allocations_api::allocation_terminate(&tenant, &project, id, None).await;
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(random.next(300))).await;
                kill(&mut worker);
                worker = keel.worker();
            }
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
    metered_exactly_once(&keel, &mut admin).await;
    drop((api, worker));
    kill(&mut agent);
    keel.clean_up();
}
