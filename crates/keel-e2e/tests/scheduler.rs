//! The scheduler under contention: two api processes and two workers, many
//! tenants launching at once against too little capacity. No host is ever
//! over-committed, and every launch ends placed or `failed` with
//! `insufficient_capacity` — none is left in between.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::process::Command;

use keel_client::apis::configuration::Configuration;
use keel_client::apis::{allocations_api, auth_api};
use keel_client::models::{AllocationState, LoginRequest, NewAllocation, RegisterRequest};

mod common;

use common::{binary, control_plane_env, eventually, free_port, spawn};

const TENANTS: usize = 4;
const LAUNCHES_PER_TENANT: usize = 12;
/// Three hosts of 4 vCPUs: twelve cpu.small fit.
const HOSTS: usize = 3;
const SLOTS: usize = 12;

#[tokio::test]
async fn concurrent_launches_through_two_apis_never_over_commit_a_host() {
    let database = keel_testing::test_db().await;
    let scratch = std::env::temp_dir().join(format!(
        "keel-e2e-scheduler-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let (kms_dir, logs) = (scratch.join("kms"), scratch.join("logs"));
    std::fs::create_dir_all(&logs).unwrap();

    let mut processes = Vec::new();
    let mut bases = Vec::new();
    for name in ["api-1", "api-2"] {
        let (api_port, agents_port) = (free_port(), free_port());
        let mut command = Command::new(binary("api"));
        control_plane_env(&mut command, &database, &kms_dir, api_port, agents_port);
        command.env("KEEL_RATE_LIMIT__ENABLED", "false");
        processes.push(spawn(name, &mut command, &logs));
        let config = Configuration {
            base_path: format!("http://127.0.0.1:{api_port}"),
            ..Default::default()
        };
        eventually("the api to be ready", &logs, || async {
            keel_client::apis::health_api::health_ready(&config)
                .await
                .ok()
        })
        .await;
        bases.push(config.base_path);
    }
    for name in ["worker-1", "worker-2"] {
        let mut command = Command::new(binary("worker"));
        control_plane_env(&mut command, &database, &kms_dir, free_port(), free_port());
        processes.push(spawn(name, &mut command, &logs));
    }

    // Hosts as enrolment leaves them (their agents are not needed here:
    // placement happens in the api), seen far enough ahead that no
    // liveness sweep takes them offline while the test runs slowly.
    let mut admin = database.admin().await;
    for i in 0..HOSTS {
        sqlx::query(
            "INSERT INTO hosts (id, name, region, state, agent_url, vcpus, memory_mib, disk_gib,
                                cert_serial, cert_not_after, last_seen_at)
             VALUES ($1, $2, 'local-1', 'ready', 'https://127.0.0.1:9', 4, 16384, 1000, $3,
                     now() + interval '1 day', now() + interval '1 day')",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(format!("host-{i}"))
        .bind(format!("{i:02}"))
        .execute(&mut admin)
        .await
        .unwrap();
    }

    // Tenants, each talking to both apis.
    let mut clients = Vec::new();
    for tenant in 0..TENANTS {
        let email = format!("t{tenant}@example.com");
        let base = &bases[tenant % 2];
        let anonymous = Configuration {
            base_path: base.clone(),
            ..Default::default()
        };
        let registered = auth_api::auth_register(
            &anonymous,
            RegisterRequest::new(
                email.clone(),
                "a long enough password".into(),
                format!("T{tenant}"),
            ),
        )
        .await
        .unwrap();
        let login = auth_api::auth_login(
            &anonymous,
            LoginRequest::new(email, "a long enough password".into()),
        )
        .await
        .unwrap();
        for base in &bases {
            clients.push((
                Configuration {
                    base_path: base.clone(),
                    bearer_access_token: Some(login.access_token.clone()),
                    ..Default::default()
                },
                registered.project_id.to_string(),
                tenant,
            ));
        }
    }

    let launches = clients
        .iter()
        .enumerate()
        .flat_map(|(k, (config, project, tenant))| {
            (0..LAUNCHES_PER_TENANT / 2).map(move |n| async move {
                let name = format!("t{tenant}-c{k}-{n}");
                allocations_api::allocation_create(
                    config,
                    project,
                    NewAllocation::new("cpu.small".into(), name),
                    None,
                )
                .await
            })
        });
    let results = futures::future::join_all(launches).await;
    assert_eq!(results.len(), TENANTS * LAUNCHES_PER_TENANT);
    let mut placed = 0;
    for result in &results {
        let allocation = result.as_ref().expect("every launch is answered");
        match allocation.state {
            AllocationState::Scheduled => placed += 1,
            AllocationState::Failed => assert_eq!(
                allocation
                    .failure_reason
                    .as_ref()
                    .and_then(Option::as_deref),
                Some("insufficient_capacity")
            ),
            other => panic!("a launch ended {other:?}"),
        }
    }
    assert_eq!(placed, SLOTS, "every slot is used, none twice");

    // The ledger agrees with the allocations on every host, within capacity.
    let hosts: Vec<(i32, i32, i64)> = sqlx::query_as(
        "SELECT h.vcpus, h.reserved_vcpus,
                (SELECT count(*) FROM allocations a WHERE a.host_id = h.id AND a.reserved)
           FROM hosts h",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    for (vcpus, reserved, holding) in hosts {
        assert!(reserved <= vcpus);
        assert_eq!(i64::from(reserved), holding);
    }
    let in_between: i64 =
        sqlx::query_scalar("SELECT count(*) FROM allocations WHERE state = 'requested'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(in_between, 0);
    for mut process in processes {
        process.terminate();
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
