//! The signed contents of a task.
//!
//! The field order of [`TaskPayload`] is part of the wire contract: the
//! canonical encoding is whatever `serde_json::to_vec` produces for these
//! structures, and the verifier insists that signed bytes are canonical.
//! Reordering, renaming or adding fields therefore requires a new envelope
//! version.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the control plane is asking one node to do, and under which terms.
///
/// All times are unix seconds. The payload is only ever trusted after it has
/// come out of [`crate::TaskVerifier::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPayload {
    /// Unique id of this task, for idempotency and tracing.
    pub task_id: Uuid,
    /// The tenant on whose behalf the work runs, if any.
    pub tenant_id: Option<Uuid>,
    /// The node that must execute the task; any other node refuses it.
    pub node_id: Uuid,
    /// The node's enrolment epoch when the task was issued. Re-enrolment bumps
    /// the epoch and so invalidates every task issued before it.
    pub enrolment_epoch: u64,
    /// Per-node sequence number, strictly increasing; used to reject replays.
    pub seq: u64,
    /// When the control plane issued the task.
    pub issued_at: i64,
    /// The task must not be acted on before this time.
    pub not_before: i64,
    /// The task must not be acted on after this time.
    pub expires_at: i64,
    /// W3C trace context of the request that caused this task, if any.
    pub traceparent: Option<String>,
    /// The work itself.
    pub operation: Operation,
}

/// The work a task asks the node to perform.
///
/// Internally tagged so the JSON reads as `{"op":"stop_workload",...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Operation {
    /// Boot a workload for an allocation.
    StartWorkload {
        /// The allocation this workload belongs to.
        allocation_id: Uuid,
        /// The program and its arguments.
        command: Vec<String>,
        /// Number of virtual CPUs to give the workload.
        vcpus: u32,
        /// Memory to give the workload, in MiB.
        memory_mib: u64,
    },
    /// Stop the workload of an allocation.
    StopWorkload {
        /// The allocation whose workload should stop.
        allocation_id: Uuid,
    },
    /// A grant, not a task: lets the api open one terminal session into a
    /// running workload. It travels only to the agent's terminal endpoint,
    /// never to `/v1/tasks` (which refuses it); it is single use by
    /// `session_id` and valid for a minute.
    OpenTerminal {
        /// The allocation whose workload the shell joins.
        allocation_id: Uuid,
        /// The session this grant opens, once.
        session_id: Uuid,
        /// How long the session may last, in seconds.
        max_secs: u64,
    },
}

impl Operation {
    /// The allocation the operation acts on; every operation has one.
    pub fn allocation_id(&self) -> Uuid {
        match self {
            Operation::StartWorkload { allocation_id, .. }
            | Operation::StopWorkload { allocation_id }
            | Operation::OpenTerminal { allocation_id, .. } => *allocation_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_operation() -> Operation {
        Operation::StartWorkload {
            allocation_id: Uuid::from_u128(0xa110c),
            command: vec!["/bin/app".to_owned(), "--serve".to_owned()],
            vcpus: 2,
            memory_mib: 512,
        }
    }

    #[test]
    fn operations_are_tagged_with_a_snake_case_op_field() {
        let json = serde_json::to_string(&Operation::StopWorkload {
            allocation_id: Uuid::from_u128(1),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"op":"stop_workload","allocation_id":"00000000-0000-0000-0000-000000000001"}"#
        );
        let json = serde_json::to_string(&start_operation()).unwrap();
        assert!(json.starts_with(r#"{"op":"start_workload","#));
    }

    #[test]
    fn every_operation_reports_its_allocation_id() {
        assert_eq!(start_operation().allocation_id(), Uuid::from_u128(0xa110c));
        let stop = Operation::StopWorkload {
            allocation_id: Uuid::from_u128(9),
        };
        assert_eq!(stop.allocation_id(), Uuid::from_u128(9));
        let terminal = Operation::OpenTerminal {
            allocation_id: Uuid::from_u128(7),
            session_id: Uuid::from_u128(8),
            max_secs: 60,
        };
        assert_eq!(terminal.allocation_id(), Uuid::from_u128(7));
    }

    #[test]
    fn unknown_fields_inside_an_operation_are_refused() {
        let json = r#"{"op":"stop_workload","allocation_id":"00000000-0000-0000-0000-000000000001","force":true}"#;
        assert!(serde_json::from_str::<Operation>(json).is_err());
    }

    #[test]
    fn an_unknown_operation_is_refused() {
        let json = r#"{"op":"reboot_node","allocation_id":"00000000-0000-0000-0000-000000000001"}"#;
        assert!(serde_json::from_str::<Operation>(json).is_err());
    }
}
