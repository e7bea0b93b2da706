//! `status.json`: what the agent is doing, or why it stopped, for operators
//! and for `keel-agent status`.
//!
//! The one state that needs a person is `needs_reenrolment`: the node's
//! certificate expired (the agent was offline past its lifetime) or the
//! control plane refuses it (revoked, or superseded by a re-enrolment).
//! The agent then writes the reason here, logs it, and exits with
//! [`EXIT_NEEDS_REENROLMENT`] instead of starting again and again; the
//! systemd unit does not restart on that code.

use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::state::{StateError, write_file_atomically};

/// The status file in the state directory.
pub const STATUS_FILE: &str = "status.json";

/// Exit code of `run` (and `status`) when the node must be re-enrolled:
/// `EX_CONFIG` from sysexits.h.
pub const EXIT_NEEDS_REENROLMENT: u8 = 78;

/// The agent's state as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentCondition {
    /// Serving tasks.
    Running,
    /// Stopped by a signal.
    Stopped,
    /// Cannot continue without a new join token (`keel-agent join --reenrol`).
    NeedsReenrolment,
}

/// The content of `status.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub condition: AgentCondition,
    /// Why, for `needs_reenrolment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// When the current node certificate expires.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub certificate_not_after: Option<OffsetDateTime>,
    /// When the agent plans to renew it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub renewal_due: Option<OffsetDateTime>,
}

impl Status {
    pub fn new(condition: AgentCondition) -> Self {
        Self {
            condition,
            reason: None,
            updated_at: OffsetDateTime::now_utc(),
            certificate_not_after: None,
            renewal_due: None,
        }
    }
}

/// Replaces `status.json` (atomically; a failure is logged, never fatal:
/// the status file informs, it does not decide).
pub fn write_status(dir: &Path, status: &Status) {
    let path = dir.join(STATUS_FILE);
    let written = serde_json::to_vec_pretty(status)
        .map_err(std::io::Error::other)
        .and_then(|mut bytes| {
            bytes.push(b'\n');
            write_file_atomically(&path, &bytes)
        });
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "could not write the status file");
    }
}

/// Reads `status.json`, if there is one.
pub fn read_status(dir: &Path) -> Result<Option<Status>, StateError> {
    let path = dir.join(STATUS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Json { path, source }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io { path, source }),
    }
}

/// What `keel-agent status` prints, and its exit code: 0 when all is well,
/// [`EXIT_NEEDS_REENROLMENT`] when the node needs re-enrolment, 1 when the
/// task log's hash chain is broken.
pub fn report(dir: &Path) -> Result<(String, u8), StateError> {
    use std::fmt::Write as _;

    let node = crate::state::read_node_record(dir)?;
    let now = OffsetDateTime::now_utc();
    let mut out = String::new();
    let mut exit = 0;
    let _ = writeln!(
        out,
        "node           {} ({}), enrolment epoch {}",
        node.node_id, node.name, node.enrolment_epoch
    );
    let status = read_status(dir)?;
    match &status {
        Some(status) => {
            let condition = match status.condition {
                AgentCondition::Running => "running",
                AgentCondition::Stopped => "stopped",
                AgentCondition::NeedsReenrolment => "NEEDS RE-ENROLMENT",
            };
            let _ = write!(
                out,
                "condition      {condition} (since {})",
                status.updated_at
            );
            if let Some(reason) = &status.reason {
                let _ = write!(out, ": {reason}");
            }
            out.push('\n');
            if status.condition == AgentCondition::NeedsReenrolment {
                exit = EXIT_NEEDS_REENROLMENT;
            }
        }
        None => out.push_str("condition      never run\n"),
    }
    let certificate = std::fs::read_to_string(dir.join(crate::state::CERT_FILE))
        .ok()
        .and_then(|pem| keel_pki::certs_from_pem(&pem).ok())
        .and_then(|certs| keel_pki::validity(certs.first()?.as_ref()));
    match certificate {
        Some((_, not_after)) if not_after <= now => {
            let _ = writeln!(out, "certificate    EXPIRED at {not_after}");
            exit = EXIT_NEEDS_REENROLMENT;
        }
        Some((_, not_after)) => {
            let _ = write!(out, "certificate    valid until {not_after}");
            if let Some(due) = status.as_ref().and_then(|status| status.renewal_due) {
                let _ = write!(out, ", renewal due {due}");
            }
            out.push('\n');
        }
        None => out.push_str("certificate    unreadable\n"),
    }
    let keys: Vec<crate::state::SigningKeyRecord> =
        std::fs::read_to_string(dir.join(crate::state::SIGNING_KEYS_FILE))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
    let live: Vec<&str> = keys
        .iter()
        .filter(|key| key.is_live(now.unix_timestamp()))
        .map(|key| key.key_id.as_str())
        .collect();
    let _ = writeln!(
        out,
        "signing keys   {} live of {} known: {}",
        live.len(),
        keys.len(),
        live.join(", ")
    );
    let high_water = std::fs::read_to_string(dir.join(crate::state::HIGH_WATER_FILE))
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "0".to_owned());
    let _ = writeln!(out, "high-water     {high_water}");
    let log = std::fs::read_to_string(dir.join(crate::state::TASK_LOG_FILE)).unwrap_or_default();
    let summary = crate::tasks::verify_task_log(&log);
    match summary.broken_at {
        None => {
            let _ = writeln!(
                out,
                "task log       {} entries, hash chain intact{}",
                summary.chained,
                if summary.legacy > 0 {
                    format!(" ({} earlier unchained)", summary.legacy)
                } else {
                    String::new()
                }
            );
        }
        Some(line) => {
            let _ = writeln!(
                out,
                "task log       HASH CHAIN BROKEN at line {line}: the log was edited"
            );
            if exit == 0 {
                exit = 1;
            }
        }
    }
    Ok((out, exit))
}
