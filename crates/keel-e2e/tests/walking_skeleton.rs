//! The walking skeleton, end to end: the api, the worker and a node agent
//! run as separate processes, talk over real TLS, and a tenant drives the
//! api through the generated Rust client. An allocation goes from
//! `scheduled` to `running` while a real process runs on this host; `stop`
//! ends the process and `start` runs it again; after `terminate` it is
//! `terminated` and the process is gone. Every
//! change left its audit row; every outbox event reached the provisioning
//! consumer exactly once in effect.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::process::Command;

use keel_client::apis::configuration::Configuration;
use keel_client::apis::{allocations_api, auth_api, inventory_api};
use keel_client::models::{AllocationState, LoginRequest, NewAllocation, RegisterRequest};

mod common;

use common::{
    OtlpReceiver, TerminalAuth, binary, control_plane_env, eventually, free_port, open_terminal,
    pid_is_alive, read_until, scrape, spawn, type_line,
};

// Several threads: the test blocks on child processes while the OTLP
// receiver it hosts must keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_runs_a_real_process_on_the_host_and_terminating_it_removes_the_process() {
    let database = keel_testing::test_db().await;
    let scratch = std::env::temp_dir().join(format!("keel-e2e-{}", uuid::Uuid::new_v4().simple()));
    let (kms_dir, agent_state, logs) = (
        scratch.join("kms"),
        scratch.join("agent"),
        scratch.join("logs"),
    );
    std::fs::create_dir_all(&logs).unwrap();
    let (api_port, agents_port, agent_port) = (free_port(), free_port(), free_port());
    let (api_metrics, worker_metrics, agent_metrics) = (free_port(), free_port(), free_port());
    let base = format!("http://127.0.0.1:{api_port}");
    // All three processes export their spans to one collector.
    let collector = OtlpReceiver::start().await;
    let traced = |command: &mut Command, variable: &str| {
        command
            .env_remove("RUST_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env(variable, &collector.endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    };

    let mut api_command = Command::new(binary("api"));
    control_plane_env(&mut api_command, &database, &kms_dir, api_port, agents_port);
    traced(&mut api_command, "KEEL_TRACING__OTLP_ENDPOINT");
    api_command.env(
        "KEEL_METRICS__API_LISTEN",
        format!("127.0.0.1:{api_metrics}"),
    );
    let api = spawn("api", &mut api_command, &logs);
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

    // A join token, then enrolment and the agent itself.
    let mut token_command = Command::new(binary("api"));
    control_plane_env(
        &mut token_command,
        &database,
        &kms_dir,
        api_port,
        agents_port,
    );
    let token = token_command.arg("join-token").output().unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let enrol = Command::new(binary("keel-agent"))
        .args([
            "enrol",
            "--api-url",
            &base,
            "--join-token",
            &token,
            "--name",
            "e2e-node",
        ])
        .arg("--state-dir")
        .arg(&agent_state)
        .args(["--listen", &format!("127.0.0.1:{agent_port}")])
        .output()
        .unwrap();
    assert!(
        enrol.status.success(),
        "enrol: {}",
        String::from_utf8_lossy(&enrol.stderr)
    );
    let mut agent_command = Command::new(binary("keel-agent"));
    agent_command
        .arg("run")
        .arg("--state-dir")
        .arg(&agent_state)
        .env(
            "KEEL_AGENT_METRICS_LISTEN",
            format!("127.0.0.1:{agent_metrics}"),
        );
    traced(&mut agent_command, "KEEL_AGENT_OTLP_ENDPOINT");
    let agent = spawn("agent", &mut agent_command, &logs);
    let mut worker_command = Command::new(binary("worker"));
    control_plane_env(
        &mut worker_command,
        &database,
        &kms_dir,
        api_port,
        agents_port,
    );
    worker_command.env(
        "KEEL_METRICS__WORKER_LISTEN",
        format!("127.0.0.1:{worker_metrics}"),
    );
    traced(&mut worker_command, "KEEL_TRACING__OTLP_ENDPOINT");
    let worker = spawn("worker", &mut worker_command, &logs);

    // A tenant signs up and launches an allocation, through the generated client.
    let registered = auth_api::auth_register(
        &config,
        RegisterRequest::new(
            "e2e@example.com".into(),
            "a long enough password".into(),
            "E2E".into(),
        ),
    )
    .await
    .unwrap();
    let login = auth_api::auth_login(
        &config,
        LoginRequest::new("e2e@example.com".into(), "a long enough password".into()),
    )
    .await
    .unwrap();
    assert_eq!(login.token_type, "Bearer");
    let tenant = Configuration {
        base_path: base.clone(),
        bearer_access_token: Some(login.access_token.clone()),
        ..Default::default()
    };
    let flavors = inventory_api::flavor_list(&tenant).await.unwrap();
    assert!(
        flavors
            .items
            .iter()
            .any(|flavor| flavor.name == "cpu.small")
    );

    let project = registered.project_id.to_string();
    let mut new = NewAllocation::new("cpu.small".into(), "e2e-1".into());
    // The workload writes its pid where the test can read it, then sleeps.
    new.command = Some(Some(vec![
        "sh".into(),
        "-c".into(),
        "echo $$ > pid; exec sleep 300".into(),
    ]));
    // A client retrying with its Idempotency-Key gets the same allocation
    // back, and only one workload runs.
    let created = allocations_api::allocation_create(&tenant, &project, new.clone(), Some("e2e-1"))
        .await
        .unwrap();
    assert_eq!(created.state, AllocationState::Scheduled);
    let retried = allocations_api::allocation_create(&tenant, &project, new, Some("e2e-1"))
        .await
        .unwrap();
    assert_eq!(retried.id, created.id);
    let id = created.id.to_string();

    eventually("the allocation to be running", &logs, || async {
        let allocation = allocations_api::allocation_get(&tenant, &project, &id)
            .await
            .ok()?;
        assert_ne!(
            allocation.state,
            AllocationState::Failed,
            "{:?}",
            allocation.failure_reason
        );
        (allocation.state == AllocationState::Running).then_some(allocation)
    })
    .await;
    // The create is ONE trace: the api's request span, the worker's
    // delivery of the event it wrote, the agent's handling of the task the
    // worker signed, each the parent of the next.
    let (request, delivery, task) = eventually("the create's spans", &logs, || async {
        let spans = collector.spans();
        let task = spans
            .iter()
            .find(|span| span.service == "keel-agent" && span.name == "task start_workload")?;
        let delivery = spans
            .iter()
            .find(|span| span.span_id == task.parent_span_id)?;
        let request = spans
            .iter()
            .find(|span| span.span_id == delivery.parent_span_id)?;
        Some((request.clone(), delivery.clone(), task.clone()))
    })
    .await;
    assert_eq!(request.service, "keel-api");
    assert_eq!(request.name, "POST");
    assert_eq!(
        request.attribute("http.route"),
        Some("/v1/projects/{project_id}/allocations")
    );
    assert_eq!(request.parent_span_id, "", "the create starts the trace");
    assert_eq!(delivery.service, "keel-worker");
    assert_eq!(delivery.name, "deliver allocation.scheduled");
    assert_eq!(task.service, "keel-agent");
    assert!(
        request.trace_id == delivery.trace_id && delivery.trace_id == task.trace_id,
        "one trace id: {request:?} {delivery:?} {task:?}"
    );
    assert_eq!(request.trace_id.len(), 32);

    let pid_file = agent_state.join("workloads").join(&id).join("pid");
    let pid: u32 = eventually("the workload to write its pid", &logs, || async {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    })
    .await;
    assert!(
        pid_is_alive(pid),
        "the workload process runs on the host while running"
    );

    // Stop: the process goes, the allocation keeps its host. Start: a new
    // process runs in the same directory, as the same user.
    let uid_before = uid_of(pid);
    assert!(uid_before.is_some());

    // A terminal: a shell on a pseudo-terminal as the workload's user, in
    // its directory, that follows resizes.
    // As a browser opens it: the token in a subprotocol.
    let mut terminal = open_terminal(
        api_port,
        &login.access_token,
        &project,
        &id,
        TerminalAuth::Subprotocol,
    )
    .await
    .expect("a terminal into the running allocation");
    type_line(&mut terminal, "echo term-$((40+2)); id -u; pwd").await;
    // `pwd` answers last.
    let output = read_until(&mut terminal, &format!("/workloads/{id}")).await;
    assert!(output.contains("term-42"), "{output}");
    assert!(
        output.contains(&uid_before.unwrap().to_string()),
        "the shell runs as the workload's user: {output}"
    );
    assert!(output.contains(&format!("/workloads/{id}")), "{output}");
    {
        use futures::SinkExt as _;
        terminal
            .send(tokio_tungstenite::tungstenite::Message::text(
                r#"{"type":"resize","cols":100,"rows":30}"#,
            ))
            .await
            .unwrap();
    }
    type_line(&mut terminal, "stty size").await;
    let size = read_until(&mut terminal, "30 100").await;
    assert!(size.contains("30 100"), "{size}");
    let stopping = allocations_api::allocation_stop(&tenant, &project, &id, None)
        .await
        .unwrap();
    assert_eq!(stopping.state, AllocationState::Stopping);
    eventually("the allocation to be stopped", &logs, || async {
        let allocation = allocations_api::allocation_get(&tenant, &project, &id)
            .await
            .ok()?;
        (allocation.state == AllocationState::Stopped).then_some(())
    })
    .await;
    eventually(
        "the stopped workload's process to be gone",
        &logs,
        || async { (!pid_is_alive(pid)).then_some(()) },
    )
    .await;
    // Stopping ended the terminal session, and a stopped allocation has none.
    let ended = read_until(&mut terminal, "[closed:").await;
    assert!(ended.contains("[closed: the workload stopped]"), "{ended}");
    match open_terminal(
        api_port,
        &login.access_token,
        &project,
        &id,
        TerminalAuth::Header,
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 409);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "allocation_not_running", "{body}");
        }
        other => panic!(
            "a stopped allocation has no terminal: {:?}",
            other.map(|_| ())
        ),
    }
    let starting = allocations_api::allocation_start(&tenant, &project, &id, None)
        .await
        .unwrap();
    assert_eq!(starting.state, AllocationState::Starting);
    let running = eventually("the allocation to run again", &logs, || async {
        let allocation = allocations_api::allocation_get(&tenant, &project, &id)
            .await
            .ok()?;
        (allocation.state == AllocationState::Running).then_some(allocation)
    })
    .await;
    let pid: u32 = eventually("the workload to start again", &logs, || async {
        let again: u32 = std::fs::read_to_string(&pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (again != pid && pid_is_alive(again)).then_some(again)
    })
    .await;
    assert_eq!(
        uid_of(pid),
        uid_before,
        "a restarted workload keeps its user"
    );

    // Terminate the allocation as last seen (If-Match: its version).
    let seen = format!("\"{}\"", running.version);
    let terminating = allocations_api::allocation_terminate(&tenant, &project, &id, Some(&seen))
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
    eventually("the workload process to be gone", &logs, || async {
        (!pid_is_alive(pid)).then_some(())
    })
    .await;

    // Each process tells Prometheus what it did.
    let api_text = scrape(api_metrics).await.expect("the api serves metrics");
    assert!(
        api_text.contains(
            "keel_http_requests_total{method=\"POST\",route=\"/v1/projects/{project_id}/allocations\",status=\"202\"}"
        ),
        "{api_text}"
    );
    assert!(api_text.contains("keel_http_request_duration_seconds_bucket"));
    eventually(
        "the worker to count the terminated allocation",
        &logs,
        || async {
            scrape(worker_metrics)
                .await
                .filter(|text| text.contains("keel_allocations{state=\"terminated\"} 1"))
        },
    )
    .await;
    let worker_text = scrape(worker_metrics).await.unwrap();
    for name in [
        "keel_allocations_past_deadline 0",
        "keel_outbox_lag_seconds",
        "keel_outbox_dead_deliveries 0",
        "keel_outbox_delivery_failures_total",
    ] {
        assert!(worker_text.contains(name), "{name} in {worker_text}");
    }
    let agent_text = scrape(agent_metrics)
        .await
        .expect("the agent serves metrics");
    let accepted: u64 = agent_text
        .lines()
        .find_map(|line| line.strip_prefix("keel_agent_tasks_total{outcome=\"accepted\"} "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no accepted tasks in {agent_text}"));
    // Start, stop, start, stop (a delivery retried after a timeout adds one).
    assert!(accepted >= 4, "{agent_text}");
    assert!(agent_text.contains("keel_agent_workloads"));

    // Every state change is audited, and the capacity is back.
    let mut admin = database.admin().await;
    let transitions: Vec<String> = sqlx::query_scalar(
        "SELECT details->>'to' FROM audit_log WHERE action = 'allocation.transition' ORDER BY occurred_at, id",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        transitions,
        [
            "provisioning",
            "running",
            "stopping",
            "stopped",
            "starting",
            "running",
            "terminating",
            "terminated"
        ]
    );
    for action in [
        "tenant.register",
        "allocation.create",
        "allocation.terminate",
        "allocation.stop",
        "allocation.start",
        "allocation.terminal_open",
        "allocation.terminal_close",
        "host.enrol",
        "task.issue",
    ] {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
            .bind(action)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert!(count >= 1, "no audit row for {action}");
    }
    // The terminal session's end: how long and why, never what was typed.
    let closed: serde_json::Value = sqlx::query_scalar(
        "SELECT details FROM audit_log WHERE action = 'allocation.terminal_close'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(closed["reason"], "the workload stopped", "{closed}");
    assert!(closed["duration_secs"].is_u64(), "{closed}");
    let reserved: i32 = sqlx::query_scalar("SELECT sum(reserved_vcpus)::int FROM hosts")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(reserved, 0);

    // Every event was fanned out, and every provisioning delivery finished
    // exactly once in effect (one inbox row each).
    let unrelayed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE fanned_out_at IS NULL")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(unrelayed, 0);
    let (deliveries, done, inbox): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_deliveries WHERE consumer = 'provisioning'),
                (SELECT count(*) FROM outbox_deliveries WHERE consumer = 'provisioning' AND status = 'done'),
                (SELECT count(*) FROM consumer_inbox WHERE consumer = 'provisioning')",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        (deliveries, done, inbox),
        (4, 4, 4),
        "scheduled, stopping, starting and terminating, each once"
    );

    // The billing worker metered both runs (launch → stop, start →
    // terminate) from the same events, each bounded by its events' times.
    let runs_metered = || async {
        let mut admin = database.admin().await;
        let closed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM meter_runs WHERE allocation_id = $1::uuid AND ended_at IS NOT NULL",
        )
        .bind(&id)
        .fetch_one(&mut admin)
        .await
        .ok()?;
        (closed == 2).then_some(())
    };
    eventually("the billing worker to meter both runs", &logs, runs_metered).await;
    // Each run starts at a `running` event's time and ends at the time of
    // the stop or the terminate that followed it; the records add up to
    // the runs.
    let times: Vec<(String, time::OffsetDateTime)> = sqlx::query_as(
        "SELECT event_type, (payload ->> 'at')::timestamptz FROM outbox
         WHERE aggregate_id = $1::uuid
           AND event_type IN ('allocation.running', 'allocation.stopping', 'allocation.terminating')
         ORDER BY seq",
    )
    .bind(&id)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    let at = |wanted: &str| -> Vec<time::OffsetDateTime> {
        times
            .iter()
            .filter(|(event_type, _)| event_type == wanted)
            .map(|(_, at)| *at)
            .collect()
    };
    let (started, stopped, terminated) = (
        at("allocation.running"),
        at("allocation.stopping"),
        at("allocation.terminating"),
    );
    let runs: Vec<(time::OffsetDateTime, time::OffsetDateTime)> = sqlx::query_as(
        "SELECT started_at, ended_at FROM meter_runs WHERE allocation_id = $1::uuid ORDER BY started_at",
    )
    .bind(&id)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        runs,
        [(started[0], stopped[0]), (started[1], terminated[0])]
    );
    let metered: i64 = sqlx::query_scalar(
        "SELECT sum(quantity)::bigint FROM usage_records WHERE allocation_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    let run_time: i128 = runs
        .iter()
        .map(|(start, end)| (*end - *start).whole_microseconds())
        .sum();
    assert_eq!(i128::from(metered), run_time);

    // The worker seals every audit entry into its chain, and the chains
    // verify (`api audit verify` exits 0).
    eventually("the audit log to be sealed", &logs, || async {
        let unsealed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE entry_hash IS NULL")
                .fetch_one(&mut database.admin().await)
                .await
                .ok()?;
        (unsealed == 0).then_some(())
    })
    .await;
    let mut verify_command = Command::new(binary("api"));
    control_plane_env(
        &mut verify_command,
        &database,
        &kms_dir,
        api_port,
        agents_port,
    );
    let verified = verify_command.args(["audit", "verify"]).output().unwrap();
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(String::from_utf8_lossy(&verified.stdout).contains("\"valid\":true"));

    drop((worker, agent, api));
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The real uid of a process (`/proc/{pid}/status`).
fn uid_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
