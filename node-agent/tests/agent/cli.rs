//! The `keel-agent` binary's exit codes and messages.

use std::process::Command;

use crate::support::{Fixture, ScratchDir};

fn keel_agent(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel-agent"))
        .args(arguments)
        .output()
        .unwrap()
}

#[test]
fn a_usage_error_exits_with_status_2_and_prints_the_usage() {
    let output = keel_agent(&["run"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--state-dir DIR is required"), "{stderr}");
    assert!(stderr.contains("usage:"), "{stderr}");
}

#[test]
fn help_exits_successfully() {
    let output = keel_agent(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("keel-agent join"));
}

#[test]
fn running_without_an_enrolment_explains_what_to_do_and_exits_with_status_1() {
    let scratch = ScratchDir::new("cli");
    let output = keel_agent(&["run", "--state-dir", scratch.0.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("keel-agent join"), "{stderr}");
}

#[test]
fn an_agent_whose_certificate_expired_offline_says_it_needs_re_enrolment_and_exits_78() {
    let fixture = Fixture::new();
    // Replace the identity with one that expires a second from now.
    let (csr_pem, key_pem) = keel_pki::make_csr("test-node").unwrap();
    let short = fixture
        .node_ca
        .sign_node_csr(&csr_pem, fixture.node_id(), time::Duration::seconds(1))
        .unwrap();
    keel_agent::state::install_identity(fixture.state_dir(), &short.cert_pem, &key_pem).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2100));

    let dir = fixture.state_dir().to_str().unwrap();
    let output = keel_agent(&["run", "--state-dir", dir]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs re-enrolment"), "{stderr}");
    assert!(stderr.contains("join-token --node"), "{stderr}");
    let status: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.state_dir().join("status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status["condition"], "needs_reenrolment");
    assert!(status["reason"].as_str().unwrap().contains("expired"));

    let report = keel_agent(&["status", "--state-dir", dir]);
    assert_eq!(report.status.code(), Some(78));
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(text.contains("EXPIRED"), "{text}");
}

#[test]
fn a_configuration_file_with_a_mistake_is_named_and_nothing_starts() {
    let scratch = ScratchDir::new("cli-config");
    std::fs::create_dir_all(&scratch.0).unwrap();
    let path = scratch.0.join("agent.toml");
    std::fs::write(
        &path,
        "state_dir = \"/tmp/x\"\n[timing]\nheartbeat_secs = 0\n",
    )
    .unwrap();
    let output = keel_agent(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("timing.heartbeat_secs"), "{stderr}");

    // A good file pointing at an unenrolled directory says what to do.
    let state = scratch.0.join("state");
    std::fs::write(
        &path,
        format!("state_dir = {:?}\n", state.to_str().unwrap()),
    )
    .unwrap();
    let output = keel_agent(&["status", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("node.json"));
}
