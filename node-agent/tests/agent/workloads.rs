//! Real processes started and stopped through signed tasks.

use std::path::Path;
use std::time::{Duration, Instant};

use keel_agent::{WorkloadDriver, WorkloadReport, WorkloadState};
use reqwest::StatusCode;
use uuid::Uuid;

use crate::support::{Fixture, eventually, start, stop};

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The real uid of a process, from `/proc/{pid}/status`.
fn uid_of_process(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .unwrap();
    uid_line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_started_workload_runs_as_a_real_process_and_a_stop_kills_it() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let worker = fixture.worker_client();
    let allocation_id = Uuid::new_v4();

    let (status, body) = agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(1, start(allocation_id, &["sleep", "30"]))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        agent.next_report().await,
        WorkloadReport::running(allocation_id)
    );

    let pid = agent
        .driver
        .pid_of(allocation_id)
        .expect("the workload is tracked");
    assert!(process_exists(pid));
    if let Some(workload_uid) = agent.driver.workload_uid(allocation_id) {
        assert_ne!(workload_uid, 0);
        assert_eq!(uid_of_process(pid), workload_uid);
    }

    let (status, _) = agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(2, stop(allocation_id))),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        agent.next_report().await,
        WorkloadReport::terminated(allocation_id)
    );
    eventually("the workload process is gone", || !process_exists(pid)).await;
    assert_eq!(agent.driver.pid_of(allocation_id), None);
}

#[tokio::test]
async fn starting_an_allocation_that_already_runs_does_nothing() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let worker = fixture.worker_client();
    let allocation_id = Uuid::new_v4();
    let command = ["sleep", "30"];

    agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(1, start(allocation_id, &command))),
        )
        .await;
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    let pid = agent.driver.pid_of(allocation_id).unwrap();

    let (status, _) = agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(2, start(allocation_id, &command))),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(agent.driver.pid_of(allocation_id), Some(pid));
    assert_eq!(agent.driver.running_allocations(), vec![allocation_id]);

    agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(3, stop(allocation_id))),
        )
        .await;
    // Exactly one running report was sent; the next one is the stop.
    assert_eq!(
        agent.next_report().await,
        WorkloadReport::terminated(allocation_id)
    );
}

#[tokio::test]
async fn a_workload_that_exits_by_itself_is_reported_failed_with_its_status() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let allocation_id = Uuid::new_v4();

    agent
        .post_task(
            &fixture.worker_client(),
            fixture.sign(&fixture.payload(1, start(allocation_id, &["sh", "-c", "exit 3"]))),
        )
        .await;

    assert_eq!(
        agent.next_report().await,
        WorkloadReport::running(allocation_id)
    );
    assert_eq!(
        agent.next_report().await,
        WorkloadReport::failed(allocation_id, "workload exited with status 3")
    );
    assert_eq!(agent.driver.pid_of(allocation_id), None);
}

#[tokio::test]
async fn a_workload_that_cannot_be_executed_is_reported_failed() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let allocation_id = Uuid::new_v4();

    agent
        .post_task(
            &fixture.worker_client(),
            fixture.sign(&fixture.payload(1, start(allocation_id, &["/nonexistent/program"]))),
        )
        .await;

    let report = agent.next_report().await;
    assert_eq!(report.state, WorkloadState::Failed);
    let reason = report.reason.unwrap();
    assert!(reason.starts_with("could not start workload: "), "{reason}");
}

#[tokio::test]
async fn stopping_an_unknown_allocation_reports_it_terminated_right_away() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let allocation_id = Uuid::new_v4();

    agent
        .post_task(
            &fixture.worker_client(),
            fixture.sign(&fixture.payload(1, stop(allocation_id))),
        )
        .await;

    assert_eq!(
        agent.next_report().await,
        WorkloadReport::terminated(allocation_id)
    );
}

#[tokio::test]
async fn a_workload_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let fixture = Fixture::new();
    let grace_period = Duration::from_millis(200);
    let mut agent = fixture.start_agent_with_grace(grace_period).await;
    let worker = fixture.worker_client();
    let allocation_id = Uuid::new_v4();
    // The shell and the sleep it starts both ignore SIGTERM (an ignored
    // signal stays ignored across exec); `ready` says the trap is in place.
    let script = "trap '' TERM; touch ready; sleep 30";

    agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(1, start(allocation_id, &["sh", "-c", script]))),
        )
        .await;
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    let ready_file = agent.driver.workload_dir(allocation_id).join("ready");
    eventually("the workload has set its trap", || ready_file.exists()).await;
    let pid = agent.driver.pid_of(allocation_id).unwrap();

    let stop_sent_at = Instant::now();
    agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(2, stop(allocation_id))),
        )
        .await;

    assert_eq!(
        agent.next_report().await,
        WorkloadReport::terminated(allocation_id)
    );
    assert!(stop_sent_at.elapsed() >= grace_period);
    eventually("the workload process is gone", || !process_exists(pid)).await;
}

#[tokio::test]
async fn a_stop_also_kills_children_that_outlive_the_first_process() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent_with_grace(Duration::from_secs(5)).await;
    let worker = fixture.worker_client();
    let allocation_id = Uuid::new_v4();
    // A child that ignores SIGTERM, and a first process that does not: the
    // first process dies at once on the stop, the child would live on.
    let script = "(trap '' TERM; exec sleep 300) & echo $! > child; exec sleep 300";

    agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(1, start(allocation_id, &["sh", "-c", script]))),
        )
        .await;
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    let child_file = agent.driver.workload_dir(allocation_id).join("child");
    eventually("the workload has started its child", || {
        std::fs::read_to_string(&child_file).is_ok_and(|pid| !pid.trim().is_empty())
    })
    .await;
    let child: u32 = std::fs::read_to_string(&child_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_exists(child));

    agent
        .post_task(
            &worker,
            fixture.sign(&fixture.payload(2, stop(allocation_id))),
        )
        .await;
    assert_eq!(
        agent.next_report().await,
        WorkloadReport::terminated(allocation_id)
    );
    eventually("the child is gone too", || {
        // Gone, or a zombie waiting for its (dead) parent's reaper.
        std::fs::read_to_string(format!("/proc/{child}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    })
    .await;
}

#[tokio::test]
async fn a_workload_gets_a_clean_environment_and_its_own_directory() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let allocation_id = Uuid::new_v4();
    // The test process has plenty of variables the workload must not see;
    // `env` prints exactly what the workload got.
    let script = "env | sort; pwd";

    agent
        .post_task(
            &fixture.worker_client(),
            fixture.sign(&fixture.payload(1, start(allocation_id, &["sh", "-c", script]))),
        )
        .await;
    assert_eq!(agent.next_report().await.state, WorkloadState::Running);
    assert_eq!(agent.next_report().await.state, WorkloadState::Failed);

    let dir = agent.driver.workload_dir(allocation_id);
    let output = std::fs::read_to_string(dir.join("stdout.log")).unwrap();
    let lines: Vec<&str> = output.lines().collect();
    let home = format!("HOME={}", dir.display());
    assert!(lines.contains(&home.as_str()), "{output}");
    assert!(
        lines.contains(&"PATH=/usr/local/bin:/usr/bin:/bin"),
        "{output}"
    );
    assert!(lines.contains(&dir.to_str().unwrap()), "{output}");
    // Only PATH, HOME and what the shell itself sets (PWD, SHLVL, _).
    for line in &lines {
        let name = line.split('=').next().unwrap();
        assert!(
            ["PATH", "HOME", "PWD", "SHLVL", "_", "OLDPWD"].contains(&name)
                || line.starts_with('/'),
            "unexpected variable in the workload's environment: {line}"
        );
    }
}
