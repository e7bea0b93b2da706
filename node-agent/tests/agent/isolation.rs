//! Workload isolation and restart safety with real processes and, where
//! the host has them (as root here and in CI), real cgroups: the memory
//! limit kills, a stop kills processes that escaped the process group,
//! allocations run as different users, and an agent that crashes leaves
//! its workloads running for the next one to re-adopt — including one that
//! ended meanwhile, reported with its exit status.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keel_agent::{ProcessDriver, WorkloadDriver, WorkloadReport, WorkloadSpec, WorkloadState};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::support::{Fixture, ScratchDir, eventually, launcher, start};

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

fn uid_of(path: &Path) -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path).unwrap())
}

fn spec(allocation_id: Uuid, command: &[&str], memory_mib: u64) -> WorkloadSpec {
    WorkloadSpec {
        allocation_id,
        tenant_id: None,
        command: command.iter().map(|part| (*part).to_owned()).collect(),
        vcpus: 1,
        memory_mib,
    }
}

fn limits_or_skip(driver: &ProcessDriver, test: &str) -> bool {
    if driver.enforces_limits() {
        return true;
    }
    eprintln!(
        "SKIPPED {test}: this host gives the agent no usable cgroups (needs root and the \
         cgroup v2 cpu/memory/pids controllers or the v1 hierarchies)"
    );
    false
}

#[tokio::test]
async fn a_workload_over_its_memory_limit_is_killed_and_reported_failed_with_the_reason() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    if !limits_or_skip(&agent.driver, "the memory-limit test") {
        return;
    }
    let allocation_id = Uuid::new_v4();
    // `tail` on an endless stream without newlines buffers without end.
    agent.driver.start_workload(spec(
        allocation_id,
        &["sh", "-c", "exec tail /dev/zero"],
        32,
    ));
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    let report = agent.next_report().await;
    assert_eq!(report.state, WorkloadState::Failed);
    let reason = report.reason.unwrap();
    assert!(reason.contains("memory limit"), "{reason}");
}

#[tokio::test]
async fn a_stop_kills_processes_that_left_the_process_group() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent_with_grace(Duration::from_secs(2)).await;
    if !limits_or_skip(&agent.driver, "the escaped-process test") {
        return;
    }
    let allocation_id = Uuid::new_v4();
    let script = "setsid sleep 300 & echo $! > escaped; exec sleep 300";
    agent
        .driver
        .start_workload(spec(allocation_id, &["sh", "-c", script], 64));
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    let escaped_file = agent.driver.workload_dir(allocation_id).join("escaped");
    eventually("the workload started an escaping process", || {
        std::fs::read_to_string(&escaped_file).is_ok_and(|pid| !pid.trim().is_empty())
    })
    .await;
    let escaped: u32 = std::fs::read_to_string(&escaped_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(escaped));
    agent.driver.stop_workload(allocation_id);
    assert_eq!(
        agent.next_report().await,
        WorkloadReport::terminated(allocation_id)
    );
    eventually("the escaped process is gone too", || !alive(escaped)).await;
}

#[tokio::test]
async fn each_allocation_runs_as_its_own_user_in_a_directory_only_it_can_read() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    for allocation_id in [first, second] {
        agent
            .driver
            .start_workload(spec(allocation_id, &["sleep", "30"], 64));
        assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    }
    let (Some(first_uid), Some(second_uid)) = (
        agent.driver.workload_uid(first),
        agent.driver.workload_uid(second),
    ) else {
        eprintln!("SKIPPED: the agent is not root, so workloads run as its own user");
        return;
    };
    assert_ne!(first_uid, second_uid);
    assert!(first_uid >= keel_agent::workloads::WORKLOAD_UID_BASE);
    assert_eq!(uid_of(&agent.driver.workload_dir(first)), first_uid);
    assert_eq!(uid_of(&agent.driver.workload_dir(second)), second_uid);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(agent.driver.workload_dir(first))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
    // The second workload's user cannot read the first one's directory; the
    // first one's can (so the refusal is about the user, nothing else).
    let list_as = |uid: u32| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "ls",
            ])
            .arg(agent.driver.workload_dir(first))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("setpriv (util-linux) is needed for this test")
            .success()
    };
    assert!(
        list_as(first_uid),
        "the allocation's own user cannot list its directory"
    );
    assert!(
        !list_as(second_uid),
        "another allocation's user listed the directory"
    );
    for allocation_id in [first, second] {
        agent.driver.stop_workload(allocation_id);
        assert_eq!(agent.next_report().await.state, WorkloadState::Terminated);
    }
}

/// Points the saved state at a free port, so a real `keel-agent run` can
/// be reached.
fn listen_on_a_free_port(fixture: &Fixture) -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = fixture.state_dir().join("node.json");
    let mut node: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    node["listen"] = serde_json::json!(format!("127.0.0.1:{port}"));
    std::fs::write(&path, node.to_string()).unwrap();
    port
}

#[tokio::test]
async fn a_crashed_agent_leaves_workloads_running_and_the_next_one_readopts_them() {
    let fixture = Fixture::new();
    let port = listen_on_a_free_port(&fixture);
    // The real binary; its reports go nowhere (no control plane here).
    let mut agent = Command::new(env!("CARGO_BIN_EXE_keel-agent"))
        .arg("run")
        .arg("--state-dir")
        .arg(fixture.state_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let worker = fixture.worker_client();
    let url = format!("https://127.0.0.1:{port}/v1/tasks");
    let (long, short, stopping) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let tasks = [
        fixture.sign(&fixture.payload(1, start(long, &["sleep", "300"]))),
        fixture.sign(&fixture.payload(2, start(short, &["sh", "-c", "sleep 2; exit 7"]))),
        fixture.sign(&fixture.payload(3, start(stopping, &["sleep", "300"]))),
    ];
    for task in tasks {
        let mut sent = false;
        for _ in 0..100 {
            if let Ok(response) = worker
                .post(&url)
                .header("content-type", "application/json")
                .body(task.clone())
                .send()
                .await
            {
                assert!(response.status().is_success());
                sent = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(sent, "the agent never answered");
    }
    let runtime = fixture.state_dir().join("runtime");
    let pid_of = |id: Uuid| -> Option<u32> {
        std::fs::read_to_string(runtime.join(id.to_string()).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    eventually("the workloads started", || {
        pid_of(long).is_some() && pid_of(short).is_some() && pid_of(stopping).is_some()
    })
    .await;
    let (long_pid, stopping_pid) = (pid_of(long).unwrap(), pid_of(stopping).unwrap());

    // The agent crashes; its workloads do not. It had just recorded a stop
    // of one of them, but not acted on it.
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(alive(long_pid), "a crashed agent took its workload down");
    std::fs::write(
        runtime.join(stopping.to_string()).join("stop-requested"),
        "",
    )
    .unwrap();
    // The short one ends while no agent runs.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let (sink, mut reports) = mpsc::unbounded_channel();
    let driver =
        ProcessDriver::with_launcher(fixture.state_dir(), Arc::new(sink), launcher()).unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(
            tokio::time::timeout(Duration::from_secs(10), reports.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(seen.contains(&WorkloadReport::running(long)), "{seen:?}");
    assert!(
        seen.contains(&WorkloadReport::failed(
            short,
            "workload exited with status 7"
        )),
        "{seen:?}"
    );
    assert!(
        seen.contains(&WorkloadReport::terminated(stopping)),
        "the stop recorded before the crash was carried out: {seen:?}"
    );
    eventually("the stopped workload is gone", || !alive(stopping_pid)).await;
    assert_eq!(driver.pid_of(long), Some(long_pid));
    assert_eq!(driver.running_allocations(), vec![long]);

    // The re-adopted workload stops like any other.
    driver.stop_workload(long);
    let report = tokio::time::timeout(Duration::from_secs(20), reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report, WorkloadReport::terminated(long));
    eventually("the re-adopted workload is gone", || !alive(long_pid)).await;
}

#[tokio::test]
async fn a_new_allocation_never_gets_the_user_of_an_earlier_one_but_a_restart_keeps_its_own() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let first = Uuid::new_v4();
    agent
        .driver
        .start_workload(spec(first, &["sleep", "30"], 64));
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    let Some(first_uid) = agent.driver.workload_uid(first) else {
        eprintln!("SKIPPED: the agent is not root, so workloads run as its own user");
        return;
    };
    agent.driver.stop_workload(first);
    assert_eq!(agent.next_report().await.state, WorkloadState::Terminated);

    // Started again, it is the same user (its files stay its own).
    agent
        .driver
        .start_workload(spec(first, &["sleep", "30"], 64));
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    assert_eq!(agent.driver.workload_uid(first), Some(first_uid));
    agent.driver.stop_workload(first);
    assert_eq!(agent.next_report().await.state, WorkloadState::Terminated);

    // Its directory gone, its uid is still never handed to another
    // allocation (what it left in /tmp would be the newcomer's).
    std::fs::remove_dir_all(agent.driver.workload_dir(first)).unwrap();
    let second = Uuid::new_v4();
    agent
        .driver
        .start_workload(spec(second, &["sleep", "30"], 64));
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    let second_uid = agent.driver.workload_uid(second).unwrap();
    assert_ne!(second_uid, first_uid);
    agent.driver.stop_workload(second);
    assert_eq!(agent.next_report().await.state, WorkloadState::Terminated);
}

#[tokio::test]
async fn links_a_workload_left_in_its_directory_never_redirect_its_logs() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let allocation_id = Uuid::new_v4();
    agent
        .driver
        .start_workload(spec(allocation_id, &["true"], 64));
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    assert_eq!(agent.next_report().await.state, WorkloadState::Failed);
    let dir = agent.driver.workload_dir(allocation_id);
    if uid_of(&dir) == 0 {
        eprintln!("SKIPPED: the agent is not root, so there is no other user to protect");
        return;
    }
    // What a malicious workload leaves behind for the next start (as root
    // would see it): stdout.log links to a file of root's, stderr.log is a
    // hard link to another.
    let victims = ScratchDir::new("victims");
    std::fs::create_dir_all(&victims.0).unwrap();
    let (soft, hard) = (victims.0.join("soft"), victims.0.join("hard"));
    std::fs::write(&soft, "root's\n").unwrap();
    std::fs::write(&hard, "root's\n").unwrap();
    for name in ["stdout.log", "stderr.log"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    std::os::unix::fs::symlink(&soft, dir.join("stdout.log")).unwrap();
    std::fs::hard_link(&hard, dir.join("stderr.log")).unwrap();

    agent.driver.start_workload(spec(
        allocation_id,
        &["sh", "-c", "echo out; echo err >&2; sleep 30"],
        64,
    ));
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    eventually("the workload wrote its logs", || {
        std::fs::read_to_string(dir.join("stderr.log")).is_ok_and(|text| text == "err\n")
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(dir.join("stdout.log")).unwrap(),
        "out\n"
    );
    for victim in [&soft, &hard] {
        assert_eq!(std::fs::read_to_string(victim).unwrap(), "root's\n");
        assert_eq!(uid_of(victim), 0);
    }
    for name in ["stdout.log", "stderr.log"] {
        let metadata = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(metadata.is_file());
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&metadata), 1);
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&metadata), uid_of(&dir));
    }
    agent.driver.stop_workload(allocation_id);
    assert_eq!(agent.next_report().await.state, WorkloadState::Terminated);
}

#[tokio::test]
async fn after_a_reboot_a_recorded_pid_is_never_signalled() {
    let fixture = Fixture::new();
    // A process group that has nothing to do with Keel, whose id the pid
    // file of a workload from before the reboot happens to name.
    let mut bystander = std::process::Command::new("sleep")
        .arg("300")
        .process_group(0)
        .spawn()
        .unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_shim = gone.id();
    gone.wait().unwrap();

    let allocation_id = Uuid::new_v4();
    let runtime = fixture
        .state_dir()
        .join("runtime")
        .join(allocation_id.to_string());
    std::fs::create_dir_all(&runtime).unwrap();
    let record = serde_json::json!({
        "allocation_id": allocation_id,
        "tenant_id": null,
        "user": null,
        "shim_pid": dead_shim,
        "shim_started": 1,
        "cgroup": [],
    });
    std::fs::write(runtime.join("record.json"), record.to_string()).unwrap();
    std::fs::write(runtime.join("pid"), format!("{}\n", bystander.id())).unwrap();
    // A stop was asked for just before the host went down.
    std::fs::write(runtime.join("stop-requested"), "").unwrap();

    let (sink, mut reports) = mpsc::unbounded_channel();
    let driver =
        ProcessDriver::with_launcher(fixture.state_dir(), Arc::new(sink), launcher()).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report, WorkloadReport::terminated(allocation_id));
    assert!(driver.running_allocations().is_empty());
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the agent signalled a process group it does not own"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}
