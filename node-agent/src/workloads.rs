//! Running workloads: the [`WorkloadDriver`] contract and the real
//! [`ProcessDriver`], which runs each workload as an operating-system process.
//!
//! The task layer only decides *whether* to act; this module owns *how*. The
//! contract is kept small and synchronous on purpose — start an allocation,
//! stop an allocation, report every state change to a [`ReportSink`] — so
//! that a simulated driver (for load tests of the control plane, or for
//! machines where spawning processes is not wanted) can implement it in a few
//! lines, and so that the task layer can call it while it still holds its
//! acceptance lock: tasks are then executed in exactly the order they were
//! accepted.
//!
//! # How the process driver isolates workloads
//!
//! - Each allocation gets its own working directory,
//!   `{state}/workloads/{allocation_id}`, which is also its `HOME` and where
//!   its `stdout.log` and `stderr.log` go.
//! - The environment is cleared except for a fixed `PATH` and `HOME`, so no
//!   secret or setting of the agent leaks into a workload.
//! - Each workload leads its own process group, so a stop reaches everything
//!   the workload started, not just its first process.
//! - When the agent runs as root, workloads run as the unprivileged `nobody`
//!   user. Its working directory is then chowned to that user, and the state
//!   directory and `workloads/` are given to that user's group with mode
//!   0710 — search permission only, which a process needs in order to enter
//!   a directory below them. Listing them or reading the agent's files (all
//!   mode 0600, owned by root) stays impossible.
//! - vCPU and memory sizes are accepted but not enforced yet: that needs
//!   cgroups, which belong in a later driver.
//!
//! A stop sends SIGTERM to the whole group, waits for the grace period
//! (10 s by default) and then sends SIGKILL. All signalling happens in the
//! task that owns the child and only before it has been reaped, so the
//! process group id cannot have been recycled for an unrelated process.
//!
//! Workloads are not killed when the agent stops: a restart of the agent
//! must not take customer workloads down. Re-adopting them after a restart is
//! not implemented yet; the agent starts with an empty view of what runs.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, User, geteuid};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use uuid::Uuid;

use crate::reports::{ReportSink, WorkloadReport};
use crate::state::WORKLOADS_DIR;

/// The only `PATH` a workload sees.
pub const WORKLOAD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The user workloads run as when the agent runs as root.
pub const UNPRIVILEGED_USER: &str = "nobody";

/// How long a workload gets between SIGTERM and SIGKILL by default.
pub const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);

/// Mode of the directories a workload user must be able to pass through.
const SEARCH_ONLY_FOR_GROUP_MODE: u32 = 0o710;

/// Mode of a workload's own working directory.
const WORKLOAD_DIR_MODE: u32 = 0o700;

/// What a driver needs to start a workload; mirrors the `start_workload`
/// operation of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// The allocation the workload belongs to; it names the workload.
    pub allocation_id: Uuid,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Virtual CPUs the workload was sized for.
    pub vcpus: u32,
    /// Memory the workload was sized for, in MiB.
    pub memory_mib: u64,
}

/// What [`WorkloadDriver::start_workload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// The workload was started and `running` was reported.
    Started,
    /// A workload for this allocation is already running; nothing was done.
    AlreadyRunning,
    /// The workload could not be started and `failed` was reported.
    FailedToStart,
}

/// What [`WorkloadDriver::stop_workload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The workload is being stopped; `terminated` follows once it is gone.
    Stopping,
    /// No workload was running for this allocation; `terminated` was reported
    /// right away so that the control plane converges anyway.
    NotRunning,
}

/// Runs workloads on behalf of verified tasks.
///
/// Implementations must be idempotent (starting a running allocation and
/// stopping an unknown one are both harmless), must return quickly (the task
/// layer calls them while holding its acceptance lock, so anything slow —
/// such as waiting out a stop — belongs in a background task), and must
/// report every state change of a workload, in order, to their
/// [`ReportSink`]: `running` once started, then exactly one of `failed` or
/// `terminated`. They are called from inside a tokio runtime.
pub trait WorkloadDriver: Send + Sync {
    /// Starts the workload unless one already runs for its allocation.
    fn start_workload(&self, spec: WorkloadSpec) -> StartOutcome;

    /// Stops the workload of an allocation, if there is one.
    fn stop_workload(&self, allocation_id: Uuid) -> StopOutcome;
}

/// Why a [`ProcessDriver`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A directory could not be created or its permissions set.
    #[error("{path}: {source}")]
    Io {
        /// The directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The user database could not be read.
    #[error("could not look up the user {name:?}: {source}")]
    UserLookup {
        /// The user name looked up.
        name: &'static str,
        /// The C library's error.
        #[source]
        source: nix::Error,
    },

    /// The agent runs as root but there is no unprivileged user to run
    /// workloads as; running them as root instead is not an option.
    #[error("the agent runs as root but the user {name:?} does not exist to run workloads as")]
    NoUnprivilegedUser {
        /// The user name looked up.
        name: &'static str,
    },
}

/// Why one workload could not be started; becomes the `reason` of the
/// `failed` report.
#[derive(Debug, thiserror::Error)]
enum SpawnError {
    #[error("the command is empty")]
    EmptyCommand,

    #[error("could not prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot execute {program:?}: {source}")]
    Execute {
        program: String,
        #[source]
        source: io::Error,
    },

    #[error("the process exited before it could be tracked")]
    NoProcessId,
}

/// The account workloads run as when the agent runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WorkloadUser {
    uid: u32,
    gid: u32,
}

/// One live workload, as tracked by the driver.
#[derive(Debug)]
struct RunningWorkload {
    /// Process id of the workload's first process, which is also its process
    /// group id.
    process_group_id: i32,
    /// Set to `true` to ask the supervising task to stop the workload.
    stop_requested: watch::Sender<bool>,
}

type RunningWorkloads = Arc<Mutex<HashMap<Uuid, RunningWorkload>>>;

/// Runs each workload as a process group on this host. See the module docs.
pub struct ProcessDriver {
    workloads_dir: PathBuf,
    workload_user: Option<WorkloadUser>,
    stop_grace_period: Duration,
    reports: Arc<dyn ReportSink>,
    running: RunningWorkloads,
}

impl std::fmt::Debug for ProcessDriver {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ProcessDriver")
            .field("workloads_dir", &self.workloads_dir)
            .field("workload_user", &self.workload_user)
            .field("stop_grace_period", &self.stop_grace_period)
            .finish_non_exhaustive()
    }
}

impl ProcessDriver {
    /// Prepares `{state_dir}/workloads` and picks the user workloads run as:
    /// `nobody` when the agent is root (adjusting directory permissions as
    /// described in the module docs), the agent's own user otherwise, with a
    /// warning.
    pub fn new(state_dir: &Path, reports: Arc<dyn ReportSink>) -> Result<Self, WorkloadError> {
        let workloads_dir = state_dir.join(WORKLOADS_DIR);
        fs::create_dir_all(&workloads_dir).map_err(|source| WorkloadError::Io {
            path: workloads_dir.clone(),
            source,
        })?;

        let workload_user = if geteuid().is_root() {
            let user = User::from_name(UNPRIVILEGED_USER)
                .map_err(|source| WorkloadError::UserLookup {
                    name: UNPRIVILEGED_USER,
                    source,
                })?
                .ok_or(WorkloadError::NoUnprivilegedUser {
                    name: UNPRIVILEGED_USER,
                })?;
            let workload_user = WorkloadUser {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            };
            for dir in [state_dir, workloads_dir.as_path()] {
                grant_search_permission_to_group(dir, workload_user.gid)?;
            }
            tracing::info!(
                user = UNPRIVILEGED_USER,
                uid = workload_user.uid,
                "workloads will run as an unprivileged user"
            );
            Some(workload_user)
        } else {
            set_mode(&workloads_dir, WORKLOAD_DIR_MODE)?;
            tracing::warn!(
                uid = geteuid().as_raw(),
                "the agent is not running as root, so workloads run as the agent's own user \
                 and can read the agent's state, including its private key"
            );
            None
        };

        Ok(Self {
            workloads_dir,
            workload_user,
            stop_grace_period: DEFAULT_STOP_GRACE_PERIOD,
            reports,
            running: Arc::default(),
        })
    }

    /// Changes how long a stopping workload gets between SIGTERM and SIGKILL.
    pub fn with_stop_grace_period(mut self, stop_grace_period: Duration) -> Self {
        self.stop_grace_period = stop_grace_period;
        self
    }

    /// The process (and process group) id of a running workload.
    pub fn pid_of(&self, allocation_id: Uuid) -> Option<u32> {
        lock(&self.running)
            .get(&allocation_id)
            .and_then(|workload| u32::try_from(workload.process_group_id).ok())
    }

    /// The allocations whose workloads are currently running.
    pub fn running_allocations(&self) -> Vec<Uuid> {
        lock(&self.running).keys().copied().collect()
    }

    /// The uid workloads run as, when it differs from the agent's.
    pub fn workload_uid(&self) -> Option<u32> {
        self.workload_user.map(|user| user.uid)
    }

    /// The working directory of an allocation's workload.
    pub fn workload_dir(&self, allocation_id: Uuid) -> PathBuf {
        self.workloads_dir
            .join(allocation_id.hyphenated().to_string())
    }

    /// Creates the working directory and log files and spawns the process.
    fn spawn(&self, spec: &WorkloadSpec) -> Result<Child, SpawnError> {
        let (program, arguments) = spec.command.split_first().ok_or(SpawnError::EmptyCommand)?;
        let dir = self.workload_dir(spec.allocation_id);
        let prepare_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SpawnError::Prepare { path, source }
        };

        fs::create_dir_all(&dir).map_err(prepare_error(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(WORKLOAD_DIR_MODE))
            .map_err(prepare_error(&dir))?;
        let stdout_path = dir.join("stdout.log");
        let stderr_path = dir.join("stderr.log");
        let stdout = open_log(&stdout_path).map_err(prepare_error(&stdout_path))?;
        let stderr = open_log(&stderr_path).map_err(prepare_error(&stderr_path))?;
        if let Some(user) = self.workload_user {
            for path in [&dir, &stdout_path, &stderr_path] {
                std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                    .map_err(prepare_error(path))?;
            }
        }

        let mut command = Command::new(program);
        command
            .args(arguments)
            .current_dir(&dir)
            .env_clear()
            .env("PATH", WORKLOAD_PATH)
            .env("HOME", &dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group, so that a stop can signal everything the
            // workload started, and so that a Ctrl-C aimed at the agent's
            // terminal does not reach workloads.
            .process_group(0)
            // Workloads outlive the agent on purpose; see the module docs.
            .kill_on_drop(false);
        if let Some(user) = self.workload_user {
            // The standard library also drops supplementary groups when it
            // changes the uid of a child of root.
            command.uid(user.uid).gid(user.gid);
        }
        command.spawn().map_err(|source| SpawnError::Execute {
            program: program.clone(),
            source,
        })
    }
}

impl WorkloadDriver for ProcessDriver {
    fn start_workload(&self, spec: WorkloadSpec) -> StartOutcome {
        let allocation_id = spec.allocation_id;
        // The lock is held from the check to the insert so that two starts of
        // one allocation can never both spawn.
        let mut running = lock(&self.running);
        if running.contains_key(&allocation_id) {
            tracing::info!(%allocation_id, "workload already running; start ignored");
            return StartOutcome::AlreadyRunning;
        }

        let spawned = self.spawn(&spec).and_then(|child| {
            let process_group_id = child
                .id()
                .and_then(|pid| i32::try_from(pid).ok())
                .ok_or(SpawnError::NoProcessId)?;
            Ok((child, process_group_id))
        });
        let (child, process_group_id) = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                tracing::warn!(%allocation_id, %error, "could not start workload");
                self.reports.report(WorkloadReport::failed(
                    allocation_id,
                    format!("could not start workload: {error}"),
                ));
                return StartOutcome::FailedToStart;
            }
        };

        let (stop_requested, stop_requested_receiver) = watch::channel(false);
        running.insert(
            allocation_id,
            RunningWorkload {
                process_group_id,
                stop_requested,
            },
        );
        tracing::info!(%allocation_id, pid = process_group_id, "workload started");
        // Reported before the supervisor exists, so `running` is always queued
        // ahead of the report of how the workload ended.
        self.reports.report(WorkloadReport::running(allocation_id));
        tokio::spawn(supervise(Supervision {
            child,
            allocation_id,
            process_group_id,
            stop_requested: stop_requested_receiver,
            running: Arc::clone(&self.running),
            reports: Arc::clone(&self.reports),
            stop_grace_period: self.stop_grace_period,
        }));
        StartOutcome::Started
    }

    fn stop_workload(&self, allocation_id: Uuid) -> StopOutcome {
        let running = lock(&self.running);
        match running.get(&allocation_id) {
            Some(workload) => {
                tracing::info!(%allocation_id, pid = workload.process_group_id, "stopping workload");
                workload.stop_requested.send_replace(true);
                StopOutcome::Stopping
            }
            None => {
                tracing::info!(%allocation_id, "no such workload running; reporting it terminated");
                self.reports
                    .report(WorkloadReport::terminated(allocation_id));
                StopOutcome::NotRunning
            }
        }
    }
}

/// Everything the supervising task of one workload owns.
struct Supervision {
    child: Child,
    allocation_id: Uuid,
    process_group_id: i32,
    stop_requested: watch::Receiver<bool>,
    running: RunningWorkloads,
    reports: Arc<dyn ReportSink>,
    stop_grace_period: Duration,
}

/// Waits for the workload to end — by itself or because a stop was asked
/// for — and reports how it ended.
async fn supervise(mut supervision: Supervision) {
    let exited_by_itself = tokio::select! {
        exit = supervision.child.wait() => Some(exit),
        () = wait_for_stop_request(&mut supervision.stop_requested) => None,
    };
    let exit = match exited_by_itself {
        Some(exit) => exit,
        None => {
            terminate_process_group(
                &mut supervision.child,
                supervision.process_group_id,
                supervision.stop_grace_period,
            )
            .await
        }
    };

    // The first process is gone, but processes it started may not be (a
    // child that ignores SIGTERM, or a daemonised helper of a workload that
    // exited by itself). They are in its process group: kill what is left.
    // The group id cannot have been handed to an unrelated process, because
    // Linux does not reuse a pid while a process group of that id exists.
    signal_process_group(Pid::from_raw(supervision.process_group_id), Signal::SIGKILL);

    // Forget the workload first and read the stop flag second: stops set the
    // flag while holding the same lock, so once the entry is gone no stop can
    // slip in unnoticed between the two.
    lock(&supervision.running).remove(&supervision.allocation_id);
    let stop_was_requested = *supervision.stop_requested.borrow();

    let allocation_id = supervision.allocation_id;
    let report = if stop_was_requested {
        tracing::info!(%allocation_id, "workload terminated");
        WorkloadReport::terminated(allocation_id)
    } else {
        let reason = describe_exit(&exit);
        tracing::warn!(%allocation_id, %reason, "workload failed");
        WorkloadReport::failed(allocation_id, reason)
    };
    supervision.reports.report(report);
}

/// Resolves once a stop has been requested. If the driver is dropped without
/// one, it never resolves, which leaves the workload running.
async fn wait_for_stop_request(stop_requested: &mut watch::Receiver<bool>) {
    if stop_requested
        .wait_for(|requested| *requested)
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
}

/// SIGTERM to the group, then SIGKILL if the first process is still there
/// after the grace period. Returns how the first process ended; the
/// supervisor then kills whatever is left of the group.
async fn terminate_process_group(
    child: &mut Child,
    process_group_id: i32,
    stop_grace_period: Duration,
) -> io::Result<ExitStatus> {
    let process_group = Pid::from_raw(process_group_id);
    signal_process_group(process_group, Signal::SIGTERM);
    match tokio::time::timeout(stop_grace_period, child.wait()).await {
        Ok(exit) => exit,
        Err(_elapsed) => {
            tracing::warn!(
                pid = process_group_id,
                grace_period_ms = stop_grace_period.as_millis(),
                "workload ignored SIGTERM; killing its process group"
            );
            signal_process_group(process_group, Signal::SIGKILL);
            child.wait().await
        }
    }
}

fn signal_process_group(process_group: Pid, signal: Signal) {
    match killpg(process_group, signal) {
        // The group is already gone: that is what we wanted.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => {
            tracing::error!(pid = process_group.as_raw(), %signal, %error, "could not signal workload");
        }
    }
}

/// The `reason` of a `failed` report for a workload that ended by itself.
fn describe_exit(exit: &io::Result<ExitStatus>) -> String {
    match exit {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("workload exited with status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => format!("workload ended: {status}"),
        },
        Err(error) => format!("could not wait for workload: {error}"),
    }
}

/// Opens a log file for appending, so a restarted allocation keeps the
/// output of its previous run.
fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn grant_search_permission_to_group(dir: &Path, gid: u32) -> Result<(), WorkloadError> {
    std::os::unix::fs::chown(dir, None, Some(gid)).map_err(|source| WorkloadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    set_mode(dir, SEARCH_ONLY_FOR_GROUP_MODE)
}

fn set_mode(dir: &Path, mode: u32) -> Result<(), WorkloadError> {
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|source| WorkloadError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Locks the table of running workloads. A panic while it was held cannot
/// leave it inconsistent (every update is a single insert or remove), so a
/// poisoned lock is simply taken over.
fn lock(running: &RunningWorkloads) -> MutexGuard<'_, HashMap<Uuid, RunningWorkload>> {
    running.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_status_is_described_with_its_code() {
        let status = ExitStatus::from_raw(3 << 8);
        assert_eq!(describe_exit(&Ok(status)), "workload exited with status 3");
    }

    #[test]
    fn a_death_by_signal_is_described_with_the_signal_number() {
        let status = ExitStatus::from_raw(9);
        assert_eq!(describe_exit(&Ok(status)), "killed by signal 9");
    }
}
