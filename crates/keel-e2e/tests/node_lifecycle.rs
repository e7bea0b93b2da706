//! A node's life with real processes: the agent renews its short-lived
//! certificate with a new key while serving, learns a rotated task-signing
//! key, is re-enrolled with a node-bound token (new epoch; tasks for it
//! run), and once an operator revokes it, stops with exit code 78 and says
//! so in `status.json` and `keel-agent status` — it does not crash-loop.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Process, binary, control_plane_env, eventually, free_port, run_ok, spawn};
use keel_client::apis::configuration::Configuration;
use keel_client::apis::{admin_api, allocations_api, auth_api};
use keel_client::models::{
    AllocationState, LoginRequest, NewAllocation, OperatorLoginRequest, RegisterRequest,
};

fn node_json(state: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(state.join("node.json")).unwrap()).unwrap()
}

fn agent(state: &Path, logs: &Path, name: &'static str) -> Process {
    spawn(
        name,
        Command::new(binary("keel-agent"))
            .arg("run")
            .arg("--state-dir")
            .arg(state)
            .env("KEEL_AGENT_KEY_REFRESH_SECS", "1")
            .env("KEEL_AGENT_HEARTBEAT_SECS", "1")
            .env("KEEL_AGENT_RENEWAL_RETRY_SECS", "1"),
        logs,
    )
}

#[tokio::test]
async fn an_agent_renews_learns_keys_re_enrols_and_stops_cleanly_once_revoked() {
    let database = keel_testing::test_db().await;
    let scratch = std::env::temp_dir().join(format!("keel-e2e-{}", uuid::Uuid::new_v4().simple()));
    let (kms_dir, state, logs) = (
        scratch.join("kms"),
        scratch.join("agent"),
        scratch.join("logs"),
    );
    std::fs::create_dir_all(&logs).unwrap();
    let (api_port, agents_port, agent_port) = (free_port(), free_port(), free_port());
    let base = format!("http://127.0.0.1:{api_port}");
    let api_cli = || {
        let mut command = Command::new(binary("api"));
        control_plane_env(&mut command, &database, &kms_dir, api_port, agents_port);
        command.env("KEEL_AGENT__OFFLINE_AFTER_SECS", "3");
        command
    };

    let _api = spawn(
        "api",
        api_cli().env("KEEL_PKI__NODE_CERT_LIFETIME_SECS", "20"),
        &logs,
    );
    let config = Configuration {
        base_path: base.clone(),
        ..Default::default()
    };
    eventually("the api to be ready", &logs, || async {
        keel_client::apis::health_api::health_ready(&config)
            .await
            .ok()
    })
    .await;
    let _worker = spawn(
        "worker",
        &mut api_cli_as(&binary("worker"), &api_cli),
        &logs,
    );

    let join = |token: &str, reenrol: bool| {
        let mut command = Command::new(binary("keel-agent"));
        command
            .args(["join", "--api-url", &base, "--join-token", token])
            .args(["--name", "e2e-node"])
            .arg("--state-dir")
            .arg(&state)
            .args(["--listen", &format!("127.0.0.1:{agent_port}")]);
        if reenrol {
            command.arg("--reenrol");
        }
        run_ok(&mut command);
    };
    let token = run_ok(api_cli().arg("join-token")).trim().to_owned();
    join(&token, false);
    let node_id = node_json(&state)["node_id"].as_str().unwrap().to_owned();
    let first_cert = std::fs::read_to_string(state.join("cert.pem")).unwrap();
    let first_key = std::fs::read_to_string(state.join("key.pem")).unwrap();
    let mut running_agent = agent(&state, &logs, "agent");

    // Renewal at 50–70 % of 20 s, with a new key, while serving.
    eventually("the agent to renew its certificate", &logs, || async {
        let renewed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE action = 'host.certificate_renew'",
        )
        .fetch_one(&mut database.admin().await)
        .await
        .ok()?;
        let cert = std::fs::read_to_string(state.join("cert.pem")).ok()?;
        (renewed >= 1 && cert != first_cert).then_some(())
    })
    .await;
    assert_ne!(
        std::fs::read_to_string(state.join("key.pem")).unwrap(),
        first_key,
        "a renewal makes a new key"
    );

    // A rotated task-signing key reaches the agent (vouched for by the CA).
    run_ok(api_cli().args(["keys", "rotate-task-signing", "--overlap-secs", "600"]));
    eventually("the agent to learn the new signing key", &logs, || async {
        let keys: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state.join("signing-keys.json")).ok()?)
                .ok()?;
        (keys.as_array()?.len() == 2).then_some(())
    })
    .await;

    // Heartbeats keep the host ready; once the agent stops, the worker
    // marks it offline.
    let host_state = || async {
        sqlx::query_scalar::<_, String>("SELECT state FROM hosts")
            .fetch_one(&mut database.admin().await)
            .await
            .ok()
    };
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert_eq!(host_state().await.as_deref(), Some("ready"));
    assert!(running_agent.terminate().success());
    eventually("the silent host to go offline", &logs, || async {
        (host_state().await.as_deref() == Some("offline")).then_some(())
    })
    .await;

    // Re-enrolment with a token bound to this node: same node, epoch 2.
    let token = run_ok(api_cli().args(["join-token", "--node", &node_id]))
        .trim()
        .to_owned();
    join(&token, true);
    assert_eq!(node_json(&state)["node_id"], node_id.as_str());
    assert_eq!(node_json(&state)["enrolment_epoch"], 2);
    assert_eq!(host_state().await.as_deref(), Some("ready"));
    let mut running_agent = agent(&state, &logs, "agent-epoch-2");

    // Tasks for epoch 2 run, and the renewed and re-enrolled identity
    // carries reports.
    let registered = auth_api::auth_register(
        &config,
        RegisterRequest::new(
            "node@example.com".into(),
            "a long enough password".into(),
            "Node".into(),
        ),
    )
    .await
    .unwrap();
    let login = auth_api::auth_login(
        &config,
        LoginRequest::new("node@example.com".into(), "a long enough password".into()),
    )
    .await
    .unwrap();
    let tenant = Configuration {
        base_path: base.clone(),
        bearer_access_token: Some(login.access_token),
        ..Default::default()
    };
    let project = registered.project_id.to_string();
    let mut new = NewAllocation::new("cpu.small".into(), "node-1".into());
    new.command = Some(Some(vec!["sleep".into(), "300".into()]));
    let created = allocations_api::allocation_create(&tenant, &project, new, None)
        .await
        .unwrap();
    let id = created.id.to_string();
    eventually(
        "the allocation to run on the re-enrolled node",
        &logs,
        || async {
            let allocation = allocations_api::allocation_get(&tenant, &project, &id)
                .await
                .ok()?;
            assert_ne!(allocation.state, AllocationState::Failed);
            (allocation.state == AllocationState::Running).then_some(())
        },
    )
    .await;
    let terminating = allocations_api::allocation_terminate(&tenant, &project, &id, None)
        .await
        .unwrap();
    assert_eq!(terminating.state, AllocationState::Terminating);
    eventually("the allocation to be terminated", &logs, || async {
        let allocation = allocations_api::allocation_get(&tenant, &project, &id)
            .await
            .ok()?;
        (allocation.state == AllocationState::Terminated).then_some(())
    })
    .await;

    // A second workload runs when the node is revoked.
    let mut second = NewAllocation::new("cpu.small".into(), "node-2".into());
    second.command = Some(Some(vec!["sleep".into(), "300".into()]));
    let second = allocations_api::allocation_create(&tenant, &project, second, None)
        .await
        .unwrap()
        .id
        .to_string();
    eventually("the second allocation to run", &logs, || async {
        let allocation = allocations_api::allocation_get(&tenant, &project, &second)
            .await
            .ok()?;
        (allocation.state == AllocationState::Running).then_some(())
    })
    .await;

    // An operator revokes the node: the agent stops with 78 and says why.
    run_ok(
        api_cli()
            .args(["operator", "create", "--email", "ops@example.com"])
            .env("KEEL_OPERATOR_PASSWORD", "an operator password"),
    );
    let operator = admin_api::admin_login(
        &config,
        OperatorLoginRequest::new("ops@example.com".into(), "an operator password".into()),
    )
    .await
    .unwrap();
    let admin = Configuration {
        base_path: base.clone(),
        bearer_access_token: Some(operator.access_token),
        ..Default::default()
    };
    admin_api::admin_host_revoke(&admin, &node_id)
        .await
        .unwrap();
    let exit = eventually("the revoked agent to stop", &logs, || {
        let status = running_agent.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert_eq!(exit.code(), Some(78), "needs re-enrolment");
    // The worker failed what ran there (the `host.revoked` event).
    eventually("the revoked node's allocation to fail", &logs, || async {
        let allocation = allocations_api::allocation_get(&tenant, &project, &second)
            .await
            .ok()?;
        (allocation.state == AllocationState::Failed).then_some(allocation)
    })
    .await;
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["condition"], "needs_reenrolment");
    let report = Command::new(binary("keel-agent"))
        .arg("status")
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(report.status.code(), Some(78));
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(text.contains("NEEDS RE-ENROLMENT"), "{text}");
    assert!(text.contains("hash chain intact"), "{text}");

    // And it cannot come back with a token for it.
    let refused = api_cli()
        .args(["join-token", "--node", &node_id])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    common::reap_workloads(&state);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The worker with the same environment as the api's CLI.
fn api_cli_as(program: &Path, api_cli: &dyn Fn() -> Command) -> Command {
    let template = api_cli();
    let mut command = Command::new(program);
    command.env_clear();
    for (key, value) in template.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    command
}
