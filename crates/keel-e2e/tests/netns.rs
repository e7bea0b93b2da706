//! Across a real network link: the agent runs in its own network namespace
//! (its own address, a veth pair to the host), and the link is cut while
//! tasks are under way. A start task and a stop task sent while the link is
//! down are delivered once it is back — neither lost nor run twice — and
//! the agent's reports catch up.
//!
//! Needs root and `ip netns`; where the machine forbids network
//! namespaces the test says so and passes without running (CI runs it as
//! root).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{binary, control_plane_env, eventually, free_port, pid_is_alive, run_ok, spawn};
use keel_client::apis::configuration::Configuration;
use keel_client::apis::{allocations_api, auth_api};
use keel_client::models::{AllocationState, LoginRequest, NewAllocation, RegisterRequest};

/// A network namespace with a veth pair to the host, removed on drop.
struct Namespace {
    name: String,
    host_link: String,
    host_ip: String,
    agent_ip: String,
}

fn ip(arguments: &[&str]) -> bool {
    Command::new("ip")
        .args(arguments)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

impl Namespace {
    fn create() -> Result<Self, String> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let tag = &tag[..6];
        let octet = u8::from_str_radix(&tag[..2], 16).unwrap_or(7) % 250;
        let namespace = Self {
            name: format!("keel-e2e-{tag}"),
            host_link: format!("kv{tag}h"),
            host_ip: format!("10.231.{octet}.1"),
            agent_ip: format!("10.231.{octet}.2"),
        };
        let agent_link = format!("kv{tag}a");
        let steps: [&[&str]; 8] = [
            &["netns", "add", &namespace.name],
            &[
                "link",
                "add",
                &namespace.host_link,
                "type",
                "veth",
                "peer",
                "name",
                &agent_link,
            ],
            &["link", "set", &agent_link, "netns", &namespace.name],
            &[
                "addr",
                "add",
                &format!("{}/30", namespace.host_ip),
                "dev",
                &namespace.host_link,
            ],
            &["link", "set", &namespace.host_link, "up"],
            &[
                "-n",
                &namespace.name,
                "addr",
                "add",
                &format!("{}/30", namespace.agent_ip),
                "dev",
                &agent_link,
            ],
            &["-n", &namespace.name, "link", "set", &agent_link, "up"],
            &["-n", &namespace.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            if !ip(step) {
                return Err(format!("`ip {}` failed", step.join(" ")));
            }
        }
        Ok(namespace)
    }

    fn set_link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.host_link,
            if up { "up" } else { "down" }
        ]));
        if up {
            // Taking the link down drops its address's route; bring it back.
            let _ = ip(&[
                "addr",
                "add",
                &format!("{}/30", self.host_ip),
                "dev",
                &self.host_link,
            ]);
        }
    }

    /// `command` run inside the namespace.
    fn exec(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn task_log_count(state: &Path, allocation: &str, op: &str) -> usize {
    std::fs::read_to_string(state.join("tasks.log"))
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(allocation) && line.contains(&format!("\"op\":\"{op}\"")))
        .count()
}

#[tokio::test]
async fn tasks_sent_while_the_link_is_cut_arrive_once_when_it_returns() {
    let namespace = match Namespace::create() {
        Ok(namespace) => namespace,
        Err(reason) => {
            eprintln!(
                "SKIPPED the network-namespace test: this machine forbids network namespaces \
                 ({reason}); it needs root and `ip netns`"
            );
            return;
        }
    };
    let database = keel_testing::test_db().await;
    let scratch = std::env::temp_dir().join(format!("keel-e2e-{}", uuid::Uuid::new_v4().simple()));
    let (kms_dir, state, logs) = (
        scratch.join("kms"),
        scratch.join("agent"),
        scratch.join("logs"),
    );
    std::fs::create_dir_all(&logs).unwrap();
    let (api_port, agents_port) = (free_port(), free_port());
    let host_ip = namespace.host_ip.clone();
    let base = format!("http://{host_ip}:{api_port}");
    let control_plane = |program: &str| {
        let mut command = Command::new(binary(program));
        control_plane_env(&mut command, &database, &kms_dir, api_port, agents_port);
        command
            .env("KEEL_SERVER__LISTEN", format!("{host_ip}:{api_port}"))
            .env("KEEL_AGENT__LISTEN", format!("{host_ip}:{agents_port}"))
            .env("KEEL_AGENT__SERVER_NAMES", format!("[\"{host_ip}\"]"));
        command
    };
    let _api = spawn("api", &mut control_plane("api"), &logs);
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
    let _worker = spawn("worker", &mut control_plane("worker"), &logs);

    // The agent joins and runs inside the namespace, on its own address.
    let token = run_ok(control_plane("api").arg("join-token"))
        .trim()
        .to_owned();
    run_ok(
        namespace
            .exec(&binary("keel-agent"))
            .args(["join", "--api-url", &base, "--join-token", &token])
            .args(["--name", "netns-node"])
            .arg("--state-dir")
            .arg(&state)
            .args(["--listen", &format!("{}:7443", namespace.agent_ip)]),
    );
    let _agent = spawn(
        "agent",
        namespace
            .exec(&binary("keel-agent"))
            .arg("run")
            .arg("--state-dir")
            .arg(&state)
            .env("KEEL_AGENT_HEARTBEAT_SECS", "1"),
        &logs,
    );

    let registered = auth_api::auth_register(
        &config,
        RegisterRequest::new(
            "netns@example.com".into(),
            "a long enough password".into(),
            "Netns".into(),
        ),
    )
    .await
    .unwrap();
    let login = auth_api::auth_login(
        &config,
        LoginRequest::new("netns@example.com".into(), "a long enough password".into()),
    )
    .await
    .unwrap();
    let tenant = Configuration {
        base_path: base.clone(),
        bearer_access_token: Some(login.access_token),
        ..Default::default()
    };
    let project = registered.project_id.to_string();
    let state_of = |id: String| {
        let tenant = tenant.clone();
        let project = project.clone();
        async move {
            allocations_api::allocation_get(&tenant, &project, &id)
                .await
                .ok()
                .map(|allocation| allocation.state)
        }
    };
    // Wait until the agent is up (its first heartbeat).
    eventually("the agent's first heartbeat", &logs, || async {
        let seen: Option<bool> = sqlx::query_scalar("SELECT last_seen_at > enrolled_at FROM hosts")
            .fetch_one(&mut database.admin().await)
            .await
            .ok();
        (seen == Some(true)).then_some(())
    })
    .await;

    // The link goes down, then a launch is asked for.
    namespace.set_link(false);
    let mut new = NewAllocation::new("cpu.small".into(), "across".into());
    new.command = Some(Some(vec![
        "sh".into(),
        "-c".into(),
        "echo $$ >> pids; exec sleep 300".into(),
    ]));
    let id = allocations_api::allocation_create(&tenant, &project, new, None)
        .await
        .unwrap()
        .id
        .to_string();
    eventually("the worker to try and fail to deliver", &logs, || async {
        let attempts: Option<i32> = sqlx::query_scalar(
            "SELECT max(attempts) FROM outbox_deliveries WHERE consumer = 'provisioning'",
        )
        .fetch_one(&mut database.admin().await)
        .await
        .ok()
        .flatten();
        (attempts >= Some(1)).then_some(())
    })
    .await;
    assert_ne!(state_of(id.clone()).await, Some(AllocationState::Running));
    assert_eq!(task_log_count(&state, &id, "start_workload"), 0);

    // The link returns: the start arrives, once.
    namespace.set_link(true);
    eventually("the allocation to run", &logs, || async {
        (state_of(id.clone()).await == Some(AllocationState::Running)).then_some(())
    })
    .await;
    let pids_file = state.join("workloads").join(&id).join("pids");
    let pid: u32 = eventually("the workload to write its pid", &logs, || async {
        std::fs::read_to_string(&pids_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await;
    assert!(pid_is_alive(pid));

    // Cut again, terminate, restore: the stop arrives once, the process goes.
    namespace.set_link(false);
    allocations_api::allocation_terminate(&tenant, &project, &id, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        pid_is_alive(pid),
        "nothing reached the agent while the link was down"
    );
    namespace.set_link(true);
    eventually("the allocation to be terminated", &logs, || async {
        (state_of(id.clone()).await == Some(AllocationState::Terminated)).then_some(())
    })
    .await;
    eventually("the workload process to be gone", &logs, || async {
        (!pid_is_alive(pid)).then_some(())
    })
    .await;

    // Started once, stopped once, whatever the retries.
    assert_eq!(
        std::fs::read_to_string(&pids_file).unwrap().lines().count(),
        1,
        "the workload ran once"
    );
    assert_eq!(task_log_count(&state, &id, "start_workload"), 1);
    assert_eq!(task_log_count(&state, &id, "stop_workload"), 1);
    let issued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'task.issue' AND details->>'operation' LIKE '%start_workload%'",
    )
    .fetch_one(&mut database.admin().await)
    .await
    .unwrap();
    assert!(
        issued >= 2,
        "the start was re-sent while the link was down ({issued})"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
