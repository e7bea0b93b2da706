//! Allocation types and the lifecycle state machine.

use std::fmt;

use keel_core::ResourceName;
use keel_core::ids::{AllocationId, HostId, ProjectId, TenantId};
use keel_http::FieldError;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Where an allocation is in its life. `requested → scheduled →
/// provisioning → running → terminating → terminated`, and `failed` (with a
/// reason) from any state before `terminated`. Stop and start: `running →
/// stopping → stopped → starting → running`; a stopped allocation keeps its
/// host and capacity. `lost`: its host stopped sending heartbeats; it comes
/// back to `running` when the host reports it again, and can be terminated
/// meanwhile. A lost allocation keeps its capacity (the host may still run
/// it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AllocationState {
    Requested,
    Scheduled,
    Provisioning,
    Running,
    Stopping,
    Stopped,
    Starting,
    Terminating,
    Terminated,
    Failed,
    Lost,
}

impl AllocationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Scheduled => "scheduled",
            Self::Provisioning => "provisioning",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Terminating => "terminating",
            Self::Terminated => "terminated",
            Self::Failed => "failed",
            Self::Lost => "lost",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Requested,
            Self::Scheduled,
            Self::Provisioning,
            Self::Running,
            Self::Stopping,
            Self::Stopped,
            Self::Starting,
            Self::Terminating,
            Self::Terminated,
            Self::Failed,
            Self::Lost,
        ]
        .into_iter()
        .find(|state| state.as_str() == value)
    }

    /// May this state move to `next`? The one place the lifecycle's edges
    /// are listed.
    pub fn can_become(self, next: AllocationState) -> bool {
        use AllocationState::*;
        matches!(
            (self, next),
            (Requested, Scheduled)
                | (Scheduled, Provisioning)
                | (Provisioning | Starting | Lost, Running)
                | (Running, Stopping)
                | (Stopping, Stopped)
                | (Stopped, Starting)
                | (
                    Requested
                        | Scheduled
                        | Provisioning
                        | Running
                        | Stopping
                        | Stopped
                        | Starting
                        | Failed
                        | Lost,
                    Terminating
                )
                | (Terminating, Terminated)
                | (
                    Requested
                        | Scheduled
                        | Provisioning
                        | Running
                        | Stopping
                        | Stopped
                        | Starting
                        | Terminating
                        | Lost,
                    Failed
                )
                | (Provisioning | Running | Starting, Lost)
        )
    }

    /// States in which the allocation holds capacity on a host.
    pub fn holds_capacity(self) -> bool {
        !matches!(self, AllocationState::Terminated | AllocationState::Failed)
    }
}

impl fmt::Display for AllocationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/projects/{project_id}/allocations`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAllocation {
    /// DNS-label style: lowercase letters, digits and `-`, 1–63 characters.
    #[schema(example = "trainer-1")]
    pub name: String,
    /// A flavor name from `GET /v1/flavors`.
    #[schema(example = "cpu.small")]
    pub flavor: String,
    /// A region from `GET /v1/regions`; defaults to `local-1`.
    #[serde(default)]
    #[schema(example = "local-1")]
    pub region: Option<String>,
    /// The workload: a program and its arguments, run on the host as an
    /// unprivileged user. Defaults to `["sleep", "infinity"]`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

pub const MAX_COMMAND_ARGS: usize = 64;
pub const MAX_ARG_BYTES: usize = 1024;

fn field(field: &str, code: &str, message: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

fn name_is_valid(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

impl NewAllocation {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !name_is_valid(&self.name) {
            errors.push(field(
                "name",
                "invalid",
                "must be 1–63 lowercase letters, digits or `-`, not starting or ending with `-`",
            ));
        }
        if self.flavor.trim().is_empty() {
            errors.push(field("flavor", "required", "must name a flavor"));
        }
        if let Some(command) = &self.command {
            if command.is_empty() || command.len() > MAX_COMMAND_ARGS {
                errors.push(field("command", "invalid", "must have 1 to 64 elements"));
            } else if command
                .iter()
                .any(|arg| arg.len() > MAX_ARG_BYTES || arg.contains('\0'))
            {
                errors.push(field(
                    "command",
                    "invalid",
                    "arguments must be at most 1024 bytes, without NUL",
                ));
            } else if command[0].trim().is_empty() {
                errors.push(field("command", "invalid", "the program must not be empty"));
            }
        }
        errors
    }

    pub fn region_or_default(&self) -> &str {
        self.region.as_deref().unwrap_or(keel_core::DEFAULT_REGION)
    }

    pub fn command_or_default(&self) -> Vec<String> {
        self.command
            .clone()
            .unwrap_or_else(|| vec!["sleep".to_owned(), "infinity".to_owned()])
    }
}

/// An allocation row.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Allocation {
    pub id: AllocationId,
    pub tenant_id: TenantId,
    pub project_id: ProjectId,
    pub name: String,
    pub flavor: String,
    pub region: String,
    pub command: Vec<String>,
    pub state: String,
    pub failure_reason: Option<String>,
    pub host_id: Option<HostId>,
    pub reserved: bool,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub version: i64,
    /// Retries of the current state's step (`crate::reconcile`).
    pub attempts: i32,
}

impl Allocation {
    pub fn state(&self) -> AllocationState {
        // The column's CHECK constraint admits only known states.
        AllocationState::parse(&self.state).unwrap_or(AllocationState::Failed)
    }

    pub fn resource_name(&self) -> ResourceName {
        ResourceName::new(
            Some(&self.region),
            Some(self.tenant_id),
            Some(self.project_id),
            "allocation",
            self.id,
        )
    }
}

/// An allocation as the API shows it. The host is not shown: tenants see
/// host-independent details only.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AllocationView {
    pub id: AllocationId,
    pub project_id: ProjectId,
    pub name: String,
    /// Canonical resource name, as in audit rows and events.
    pub resource_name: String,
    pub flavor: String,
    pub region: String,
    pub command: Vec<String>,
    pub state: AllocationState,
    /// Why the allocation failed, when `state` is `failed`.
    pub failure_reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// Increases with every change.
    pub version: i64,
}

impl From<Allocation> for AllocationView {
    fn from(allocation: Allocation) -> Self {
        Self {
            state: allocation.state(),
            resource_name: allocation.resource_name().to_string(),
            id: allocation.id,
            project_id: allocation.project_id,
            name: allocation.name,
            flavor: allocation.flavor,
            region: allocation.region,
            command: allocation.command,
            failure_reason: allocation.failure_reason,
            created_at: allocation.created_at,
            updated_at: allocation.updated_at,
            version: allocation.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AllocationState::*;

    #[test]
    fn the_happy_path_and_termination_are_legal_transitions() {
        for (from, to) in [
            (Requested, Scheduled),
            (Scheduled, Provisioning),
            (Provisioning, Running),
            (Running, Terminating),
            (Provisioning, Terminating),
            (Terminating, Terminated),
            (Provisioning, Failed),
            (Failed, Terminating),
            (Running, Stopping),
            (Stopping, Stopped),
            (Stopped, Starting),
            (Starting, Running),
            (Stopped, Terminating),
            (Starting, Failed),
        ] {
            assert!(from.can_become(to), "{from} → {to}");
        }
        assert!(!Stopped.can_become(Stopping) && !Running.can_become(Starting));
        assert!(Stopped.holds_capacity());
    }

    #[test]
    fn nothing_leaves_terminated_and_nothing_skips_ahead() {
        for to in [
            Requested,
            Scheduled,
            Provisioning,
            Running,
            Terminating,
            Failed,
        ] {
            assert!(!Terminated.can_become(to));
        }
        assert!(!Requested.can_become(Running));
        assert!(!Running.can_become(Scheduled));
        assert!(!Failed.can_become(Running));
    }

    #[test]
    fn a_lost_allocation_comes_back_or_ends_and_keeps_its_capacity() {
        for from in [Provisioning, Running, Starting] {
            assert!(from.can_become(Lost), "{from} → lost");
        }
        // Nothing runs for these; they wait for the host as they are.
        assert!(!Stopped.can_become(Lost) && !Stopping.can_become(Lost));
        for to in [Running, Terminating, Failed] {
            assert!(Lost.can_become(to), "lost → {to}");
        }
        assert!(!Lost.can_become(Scheduled) && !Terminated.can_become(Lost));
        assert!(Lost.holds_capacity());
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in [
            Requested,
            Scheduled,
            Provisioning,
            Running,
            Stopping,
            Stopped,
            Starting,
            Terminating,
            Terminated,
            Failed,
            Lost,
        ] {
            assert_eq!(AllocationState::parse(state.as_str()), Some(state));
        }
        assert_eq!(AllocationState::parse("bogus"), None);
    }

    #[test]
    fn names_and_commands_are_validated() {
        let ok = NewAllocation {
            name: "trainer-1".into(),
            flavor: "cpu.small".into(),
            region: None,
            command: None,
        };
        assert!(ok.validate().is_empty());
        for bad in ["", "-x", "x-", "Upper", "a_b", &"a".repeat(64)] {
            let request = NewAllocation {
                name: bad.into(),
                ..ok.clone()
            };
            assert_eq!(request.validate()[0].field, "name", "{bad:?}");
        }
        let empty = NewAllocation {
            command: Some(vec![]),
            ..ok.clone()
        };
        assert_eq!(empty.validate()[0].field, "command");
        let nul = NewAllocation {
            command: Some(vec!["a\0b".into()]),
            ..ok
        };
        assert_eq!(nul.validate()[0].field, "command");
    }
}
