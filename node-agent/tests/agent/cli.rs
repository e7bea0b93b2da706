//! The `keel-agent` binary's exit codes and messages.

use std::process::Command;

use crate::support::ScratchDir;

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
    assert!(stderr.contains("--state-dir is required"), "{stderr}");
    assert!(stderr.contains("usage:"), "{stderr}");
}

#[test]
fn help_exits_successfully() {
    let output = keel_agent(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("keel-agent enrol"));
}

#[test]
fn running_without_an_enrolment_explains_what_to_do_and_exits_with_status_1() {
    let scratch = ScratchDir::new("cli");
    let output = keel_agent(&["run", "--state-dir", scratch.0.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("keel-agent enrol"), "{stderr}");
}
