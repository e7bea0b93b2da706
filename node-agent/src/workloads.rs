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
//! - Each workload runs under its own **shim** (`keel-agent shim`, see
//!   [`crate::shim`]), a small root process that joins the workload's
//!   cgroups, starts it, and records how it ended. Workloads therefore
//!   outlive the agent, and an agent that restarts re-adopts them
//!   ([`ProcessDriver::new`]) and learns about any that ended meanwhile,
//!   with their exit status.
//! - **Its own user**: when the agent runs as root, every allocation runs as
//!   a uid of its own (from [`WORKLOAD_UID_BASE`], no login, no home outside
//!   its directory), so workloads cannot signal, trace or read each other.
//!   As a non-root user (development), workloads run as the agent's user,
//!   with a warning.
//! - **Limits** ([`crate::cgroups`]): memory (no swap), CPU quota and a
//!   process count, per allocation, from the flavor. Where the host has no
//!   usable cgroups, or the agent is not root, workloads run without limits
//!   and the agent says so at start.
//! - **Its own directory**, `{state}/workloads/{allocation_id}` (0700, its
//!   user's), which is also its `HOME` and holds `stdout.log` and
//!   `stderr.log`; the agent's bookkeeping lives in
//!   `{state}/runtime/{allocation_id}` (root, 0700), which no workload can
//!   write. The environment is cleared except for `PATH` and `HOME`.
//! - **Stop kills the whole tree**: SIGTERM to the workload's process
//!   group, SIGKILL after the grace period (10 s by default), then SIGKILL
//!   to anything left in its cgroup — also processes that left the group.
//!
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, geteuid};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use uuid::Uuid;

use crate::cgroups::{Layout, WorkloadCgroup};
use crate::reports::{ReportSink, WorkloadReport};
use crate::shim::{EXIT_FILE, ExitRecord, PID_FILE};
use crate::state::{WORKLOADS_DIR, write_file_atomically};
use crate::terminal::TerminalShell;

pub use crate::shim::WORKLOAD_PATH;

/// The first uid (and gid) of the per-allocation users.
pub const WORKLOAD_UID_BASE: u32 = 3_000_000;
/// How many per-allocation users there are.
const WORKLOAD_UID_SLOTS: u32 = 1_000_000;

fn is_workload_uid(uid: u32) -> bool {
    (WORKLOAD_UID_BASE..WORKLOAD_UID_BASE + WORKLOAD_UID_SLOTS).contains(&uid)
}

/// Where the next workload uid is kept (root, in the state directory).
const UID_COUNTER_FILE: &str = "next-workload-uid";

/// How long a workload gets between SIGTERM and SIGKILL by default.
pub const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);

/// Where the agent keeps its per-workload bookkeeping (root, 0700).
pub const RUNTIME_DIR: &str = "runtime";

/// Mode of the directories every workload user must be able to pass
/// through: search only, no listing.
const SEARCH_ONLY_MODE: u32 = 0o711;

/// Mode of a workload's own working directory.
const WORKLOAD_DIR_MODE: u32 = 0o700;

/// The record of one workload in `runtime/{allocation_id}/record.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WorkloadRecord {
    allocation_id: Uuid,
    #[serde(default)]
    tenant_id: Option<Uuid>,
    /// The uid and gid it runs as (absent: the agent's own).
    user: Option<(u32, u32)>,
    shim_pid: i32,
    /// The shim's start time in clock ticks (`/proc/{pid}/stat` field 22),
    /// so a recycled pid is never mistaken for the shim.
    shim_started: u64,
    cgroup: Vec<PathBuf>,
}

/// Marks that a stop was asked for (so an exit is `terminated`).
const STOP_FILE: &str = "stop-requested";
const RECORD_FILE: &str = "record.json";

/// What a driver needs to start a workload; mirrors the `start_workload`
/// operation of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// The allocation the workload belongs to; it names the workload.
    pub allocation_id: Uuid,
    /// The tenant whose task started it (later tasks must name the same).
    pub tenant_id: Option<Uuid>,
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

    /// The allocations whose workloads run now (for heartbeats).
    fn running_allocations(&self) -> Vec<Uuid>;

    /// The tenant of a running allocation's workload: `None` if it does not
    /// run here, `Some(None)` if its start named no tenant.
    fn tenant_of(&self, allocation_id: Uuid) -> Option<Option<Uuid>>;

    /// Starts a shell on a pseudo-terminal in a running workload's
    /// environment ([`crate::terminal`]). Drivers without real workloads
    /// have none.
    fn open_terminal(&self, allocation_id: Uuid) -> Result<TerminalShell, String> {
        let _ = allocation_id;
        Err("this host's workloads have no terminal".to_owned())
    }
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

    /// The program that runs shims could not be found.
    #[error("could not find the keel-agent binary to run shims with: {0}")]
    Launcher(#[source] io::Error),
}

/// One live workload, as tracked by the driver.
#[derive(Debug)]
struct RunningWorkload {
    /// The workload's first process (and process group), once started.
    pid: Option<i32>,
    tenant_id: Option<Uuid>,
    user: Option<(u32, u32)>,
    /// Set to `true` to ask the supervising task to stop the workload.
    stop_requested: watch::Sender<bool>,
}

type RunningWorkloads = Arc<Mutex<HashMap<Uuid, RunningWorkload>>>;

/// Runs each workload under a shim on this host. See the module docs.
pub struct ProcessDriver {
    workloads_dir: PathBuf,
    runtime_dir: PathBuf,
    uid_counter: PathBuf,
    launcher: PathBuf,
    /// Root: per-allocation users and cgroups. Not root: neither.
    privileged: bool,
    cgroups: Option<Layout>,
    stop_grace_period: Duration,
    reports: Arc<dyn ReportSink>,
    running: RunningWorkloads,
}

impl std::fmt::Debug for ProcessDriver {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ProcessDriver")
            .field("workloads_dir", &self.workloads_dir)
            .field("privileged", &self.privileged)
            .field("cgroups", &self.cgroups)
            .field("stop_grace_period", &self.stop_grace_period)
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WorkloadError + '_ {
    move |source| WorkloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ProcessDriver {
    /// Prepares `{state_dir}/workloads` and `{state_dir}/runtime`, decides
    /// what isolation this host allows (see the module docs), and re-adopts
    /// the workloads a previous agent left running: each is reported
    /// `running` again (the control plane ignores what it already knows),
    /// and one that ended while no agent ran is reported with how it ended.
    /// Must be called inside a tokio runtime.
    pub fn new(state_dir: &Path, reports: Arc<dyn ReportSink>) -> Result<Self, WorkloadError> {
        let launcher = std::env::current_exe().map_err(WorkloadError::Launcher)?;
        Self::with_launcher(state_dir, reports, launcher)
    }

    /// [`ProcessDriver::new`] with an explicit `keel-agent` binary for the
    /// shims (tests run inside another executable).
    pub fn with_launcher(
        state_dir: &Path,
        reports: Arc<dyn ReportSink>,
        launcher: PathBuf,
    ) -> Result<Self, WorkloadError> {
        let workloads_dir = state_dir.join(WORKLOADS_DIR);
        let runtime_dir = state_dir.join(RUNTIME_DIR);
        fs::create_dir_all(&workloads_dir).map_err(io_error(&workloads_dir))?;
        fs::create_dir_all(&runtime_dir).map_err(io_error(&runtime_dir))?;
        set_mode(&runtime_dir, 0o700)?;

        let privileged = geteuid().is_root();
        let cgroups = if privileged {
            for dir in [state_dir, workloads_dir.as_path()] {
                set_mode(dir, SEARCH_ONLY_MODE)?;
            }
            match Layout::detect().and_then(|layout| {
                layout
                    .prepare()
                    .map(|()| layout)
                    .map_err(|error| format!("could not prepare the keel cgroups: {error}"))
            }) {
                Ok(layout) => {
                    tracing::info!(
                        ?layout,
                        "workloads run as their own users, with cgroup limits"
                    );
                    Some(layout)
                }
                Err(reason) => {
                    tracing::warn!(%reason, "workloads run as their own users but WITHOUT resource limits");
                    None
                }
            }
        } else {
            set_mode(&workloads_dir, WORKLOAD_DIR_MODE)?;
            tracing::warn!(
                uid = geteuid().as_raw(),
                "the agent is not running as root, so workloads run as the agent's own user, \
                 without resource limits, and can read the agent's state"
            );
            None
        };

        let driver = Self {
            workloads_dir,
            runtime_dir,
            uid_counter: state_dir.join(UID_COUNTER_FILE),
            launcher,
            privileged,
            cgroups,
            stop_grace_period: DEFAULT_STOP_GRACE_PERIOD,
            reports,
            running: Arc::default(),
        };
        driver.readopt();
        Ok(driver)
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
            .and_then(|workload| workload.pid)
            .and_then(|pid| u32::try_from(pid).ok())
    }

    /// The uid an allocation's workload runs as, when it differs from the
    /// agent's.
    pub fn workload_uid(&self, allocation_id: Uuid) -> Option<u32> {
        lock(&self.running)
            .get(&allocation_id)
            .and_then(|workload| workload.user)
            .map(|(uid, _)| uid)
    }

    /// Whether workloads get cgroup limits on this host.
    pub fn enforces_limits(&self) -> bool {
        self.cgroups.is_some()
    }

    /// The working directory of an allocation's workload.
    pub fn workload_dir(&self, allocation_id: Uuid) -> PathBuf {
        self.workloads_dir
            .join(allocation_id.hyphenated().to_string())
    }

    fn runtime_dir_of(&self, allocation_id: Uuid) -> PathBuf {
        self.runtime_dir
            .join(allocation_id.hyphenated().to_string())
    }

    /// The user an allocation's workload runs as (`None`: the agent's own).
    ///
    /// An allocation that starts again keeps the user that owns its
    /// directory, so its files stay its own. Any other allocation gets a uid
    /// no workload had before — the next one of a persisted counter, skipping
    /// uids a workload or a workload directory still holds — so that what a
    /// previous tenant left behind outside its directory (in `/tmp`, in
    /// `/dev/shm`) never belongs to the next one, until the range of a
    /// million uids wraps around.
    fn user_for(&self, allocation_id: Uuid) -> Result<Option<(u32, u32)>, String> {
        if !self.privileged {
            return Ok(None);
        }
        let in_use: HashSet<u32> = self
            .records()
            .into_iter()
            .filter_map(|record| record.user.map(|(uid, _)| uid))
            .collect();
        let mut taken = in_use.clone();
        let mut owners: HashMap<u32, usize> = HashMap::new();
        if let Ok(entries) = fs::read_dir(&self.workloads_dir) {
            for metadata in entries.flatten().filter_map(|entry| entry.metadata().ok()) {
                taken.insert(metadata.uid());
                *owners.entry(metadata.uid()).or_default() += 1;
            }
        }
        // Its own directory's owner — if no other directory and no running
        // workload has that uid too (an agent before this scheme handed the
        // same uid to many allocations in turn).
        if let Ok(metadata) = fs::symlink_metadata(self.workload_dir(allocation_id))
            && metadata.is_dir()
            && is_workload_uid(metadata.uid())
            && owners.get(&metadata.uid()) == Some(&1)
            && !in_use.contains(&metadata.uid())
        {
            return Ok(Some((metadata.uid(), metadata.uid())));
        }
        // The counter, or — if it was lost — one past the highest uid seen.
        let highest_seen = taken
            .iter()
            .copied()
            .filter(|uid| is_workload_uid(*uid))
            .max();
        let next = fs::read_to_string(&self.uid_counter)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .filter(|uid| is_workload_uid(*uid))
            .or(highest_seen
                .map(|uid| uid + 1)
                .filter(|uid| is_workload_uid(*uid)))
            .unwrap_or(WORKLOAD_UID_BASE);
        let uid = (0..WORKLOAD_UID_SLOTS)
            .map(|offset| {
                WORKLOAD_UID_BASE + (next - WORKLOAD_UID_BASE + offset) % WORKLOAD_UID_SLOTS
            })
            .find(|uid| !taken.contains(uid))
            .ok_or("every workload uid is in use")?;
        let following = WORKLOAD_UID_BASE + (uid - WORKLOAD_UID_BASE + 1) % WORKLOAD_UID_SLOTS;
        write_file_atomically(&self.uid_counter, format!("{following}\n").as_bytes())
            .map_err(|error| format!("could not record the next workload uid: {error}"))?;
        Ok(Some((uid, uid)))
    }

    fn records(&self) -> Vec<WorkloadRecord> {
        let Ok(entries) = fs::read_dir(&self.runtime_dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| fs::read_to_string(entry.path().join(RECORD_FILE)).ok())
            .filter_map(|text| serde_json::from_str(&text).ok())
            .collect()
    }

    /// Prepares the directories and cgroups and starts the shim.
    fn spawn_shim(
        &self,
        spec: &WorkloadSpec,
        user: Option<(u32, u32)>,
    ) -> Result<(Child, WorkloadCgroup), String> {
        if spec.command.is_empty() {
            return Err("the command is empty".to_owned());
        }
        let dir = self.workload_dir(spec.allocation_id);
        let runtime = self.runtime_dir_of(spec.allocation_id);
        let prepare = |path: &Path, error: io::Error| {
            format!("could not prepare {}: {error}", path.display())
        };
        fs::create_dir_all(&dir).map_err(|error| prepare(&dir, error))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(WORKLOAD_DIR_MODE))
            .map_err(|error| prepare(&dir, error))?;
        // Earlier bookkeeping of this allocation (a finished run) goes.
        let _ = fs::remove_dir_all(&runtime);
        fs::create_dir_all(&runtime).map_err(|error| prepare(&runtime, error))?;
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700))
            .map_err(|error| prepare(&runtime, error))?;
        // The directory's parent is root's, so `dir` is no link; what is in
        // it is the workload's, and the shim opens its logs without
        // following anything there.
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|error| prepare(&dir, error))?;
        }
        let cgroup = match &self.cgroups {
            Some(layout) => {
                let cgroup = layout.workload(spec.allocation_id);
                cgroup
                    .create(spec.vcpus, spec.memory_mib)
                    .map_err(|error| format!("could not create the workload's cgroups: {error}"))?;
                cgroup
            }
            None => WorkloadCgroup::from_dirs(Vec::new()),
        };

        let mut command = Command::new(&self.launcher);
        command
            .arg("shim")
            .arg("--runtime")
            .arg(&runtime)
            .arg("--dir")
            .arg(&dir)
            .arg("--await-go");
        if let Some((uid, gid)) = user {
            command
                .args(["--uid", &uid.to_string()])
                .args(["--gid", &gid.to_string()]);
        }
        for cgroup_dir in cgroup.dirs() {
            command.arg("--cgroup").arg(cgroup_dir);
        }
        command
            .arg("--")
            .args(&spec.command)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group: signals for the agent (a Ctrl-C at a
            // terminal) do not reach it.
            .process_group(0)
            // The shim outlives the agent on purpose.
            .kill_on_drop(false);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                cgroup.remove();
                return Err(format!("could not start the shim: {error}"));
            }
        };
        // The shim starts the workload only on our `go`, which is sent once
        // the record that lets a restarted agent find it is on disk. If that
        // fails, the shim is killed before it started anything.
        let confirmed = record_and_confirm(&mut child, spec, user, &cgroup, &runtime);
        if let Err(error) = confirmed {
            // If the shim had refused already, its reason is the real one.
            let reason = fs::read_to_string(runtime.join(EXIT_FILE))
                .ok()
                .and_then(|text| serde_json::from_str::<ExitRecord>(&text).ok())
                .and_then(|exit| exit.spawn_error)
                .unwrap_or(error);
            let _ = child.start_kill();
            let _ = fs::remove_dir_all(&runtime);
            // The cgroup can go only once the shim is gone.
            tokio::spawn(async move {
                let _ = child.wait().await;
                cgroup.kill_all(None);
                cgroup.remove();
            });
            return Err(reason);
        }
        Ok((child, cgroup))
    }

    /// Takes over the workloads recorded in `runtime/`. The workload's pid is
    /// trusted only while its shim lives (a pid from before a reboot may name
    /// anything now); a stop asked for before the restart still counts.
    fn readopt(&self) {
        for record in self.records() {
            let allocation_id = record.allocation_id;
            let runtime = self.runtime_dir_of(allocation_id);
            let cgroup = WorkloadCgroup::from_dirs(record.cgroup.clone());
            let shim_alive = process_start_ticks(record.shim_pid)
                .is_some_and(|started| started == record.shim_started);
            let pid = if shim_alive { read_pid(&runtime) } else { None };
            let (stop_requested, stop_receiver) = watch::channel(runtime.join(STOP_FILE).exists());
            lock(&self.running).insert(
                allocation_id,
                RunningWorkload {
                    pid,
                    tenant_id: record.tenant_id,
                    user: record.user,
                    stop_requested,
                },
            );
            if shim_alive {
                tracing::info!(%allocation_id, pid, "re-adopted a running workload");
                self.reports.report(WorkloadReport::running(allocation_id));
            }
            tokio::spawn(supervise(Supervision {
                shim: Shim::Adopted {
                    pid: record.shim_pid,
                    started: record.shim_started,
                },
                allocation_id,
                pid,
                runtime,
                cgroup,
                stop_requested: stop_receiver,
                running: Arc::clone(&self.running),
                reports: Arc::clone(&self.reports),
                stop_grace_period: self.stop_grace_period,
                reported_running: shim_alive,
            }));
        }
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
        let spawned = self
            .user_for(allocation_id)
            .and_then(|user| Ok((user, self.spawn_shim(&spec, user)?)));
        let (user, (child, cgroup)) = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                tracing::warn!(%allocation_id, %error, "could not start workload");
                self.reports.report(WorkloadReport::failed(
                    allocation_id,
                    format!("could not start workload: {error}"),
                ));
                let _ = fs::remove_dir_all(self.runtime_dir_of(allocation_id));
                return StartOutcome::FailedToStart;
            }
        };
        let (stop_requested, stop_receiver) = watch::channel(false);
        running.insert(
            allocation_id,
            RunningWorkload {
                pid: None,
                tenant_id: spec.tenant_id,
                user,
                stop_requested,
            },
        );
        tokio::spawn(supervise(Supervision {
            shim: Shim::Child(child),
            allocation_id,
            pid: None,
            runtime: self.runtime_dir_of(allocation_id),
            cgroup,
            stop_requested: stop_receiver,
            running: Arc::clone(&self.running),
            reports: Arc::clone(&self.reports),
            stop_grace_period: self.stop_grace_period,
            reported_running: false,
        }));
        StartOutcome::Started
    }

    fn running_allocations(&self) -> Vec<Uuid> {
        lock(&self.running).keys().copied().collect()
    }

    fn tenant_of(&self, allocation_id: Uuid) -> Option<Option<Uuid>> {
        lock(&self.running)
            .get(&allocation_id)
            .map(|workload| workload.tenant_id)
    }

    fn open_terminal(&self, allocation_id: Uuid) -> Result<TerminalShell, String> {
        let (user, workload_stopping) = {
            let running = lock(&self.running);
            let workload = running
                .get(&allocation_id)
                .ok_or("the workload does not run here")?;
            if workload.pid.is_none() || *workload.stop_requested.borrow() {
                return Err("the workload is not running".to_owned());
            }
            (workload.user, workload.stop_requested.subscribe())
        };
        let cgroup = match &self.cgroups {
            Some(layout) => layout.workload(allocation_id),
            None => WorkloadCgroup::from_dirs(Vec::new()),
        };
        let (child, master) =
            crate::terminal::spawn_shell(user, &self.workload_dir(allocation_id), &cgroup)?;
        Ok(TerminalShell {
            child,
            master,
            workload_stopping,
        })
    }

    fn stop_workload(&self, allocation_id: Uuid) -> StopOutcome {
        let running = lock(&self.running);
        match running.get(&allocation_id) {
            Some(workload) => {
                tracing::info!(%allocation_id, pid = workload.pid, "stopping workload");
                let _ =
                    write_file_atomically(&self.runtime_dir_of(allocation_id).join(STOP_FILE), b"");
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

/// Writes the record of a freshly spawned shim, then tells it to go.
fn record_and_confirm(
    child: &mut Child,
    spec: &WorkloadSpec,
    user: Option<(u32, u32)>,
    cgroup: &WorkloadCgroup,
    runtime: &Path,
) -> Result<(), String> {
    let shim_pid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or("the shim exited before it could be tracked")?;
    let record = WorkloadRecord {
        allocation_id: spec.allocation_id,
        tenant_id: spec.tenant_id,
        user,
        shim_pid,
        shim_started: process_start_ticks(shim_pid).unwrap_or(0),
        cgroup: cgroup.dirs().to_vec(),
    };
    let bytes = serde_json::to_vec(&record).map_err(|error| error.to_string())?;
    write_file_atomically(&runtime.join(RECORD_FILE), &bytes)
        .map_err(|error| format!("could not record the workload: {error}"))?;
    let stdin = child
        .stdin
        .take()
        .ok_or("the shim's stdin is missing")?
        .into_owned_fd()
        .map_err(|error| format!("could not reach the shim: {error}"))?;
    // A few bytes into an empty pipe: this never blocks.
    fs::File::from(stdin)
        .write_all(format!("{}\n", crate::shim::GO).as_bytes())
        .map_err(|error| format!("could not confirm the start to the shim: {error}"))
}

/// The shim of a workload: our child, or one a previous agent started.
enum Shim {
    Child(Child),
    Adopted { pid: i32, started: u64 },
}

impl Shim {
    /// Whether the shim still runs.
    fn is_alive(&mut self) -> bool {
        match self {
            Shim::Child(child) => matches!(child.try_wait(), Ok(None)),
            Shim::Adopted { pid, started } => process_start_ticks(*pid) == Some(*started),
        }
    }

    /// Resolves when the shim has exited.
    async fn exited(&mut self) {
        match self {
            Shim::Child(child) => {
                let _ = child.wait().await;
            }
            Shim::Adopted { pid, started } => {
                while process_start_ticks(*pid) == Some(*started) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// The first line the shim says: `started PID` or `failed REASON`.
    /// `None` for an adopted shim, or one that died without a word.
    async fn first_line(&mut self) -> Option<String> {
        let Shim::Child(child) = self else {
            return None;
        };
        let stdout = child.stdout.take()?;
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stdout);
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_owned()),
        }
    }
}

/// Everything the supervising task of one workload owns.
struct Supervision {
    shim: Shim,
    allocation_id: Uuid,
    pid: Option<i32>,
    runtime: PathBuf,
    cgroup: WorkloadCgroup,
    stop_requested: watch::Receiver<bool>,
    running: RunningWorkloads,
    reports: Arc<dyn ReportSink>,
    stop_grace_period: Duration,
    reported_running: bool,
}

/// Learns that the workload started (and reports `running`), waits for it
/// to end — by itself or because a stop was asked for — cleans up and
/// reports how it ended.
async fn supervise(mut supervision: Supervision) {
    let allocation_id = supervision.allocation_id;
    if let Shim::Child(_) = supervision.shim {
        match supervision.shim.first_line().await {
            Some(line) if line.starts_with("started ") => {
                let pid = line["started ".len()..].parse::<i32>().ok();
                supervision.pid = pid;
                if let Some(workload) = lock(&supervision.running).get_mut(&allocation_id) {
                    workload.pid = pid;
                }
                tracing::info!(%allocation_id, pid, "workload started");
                supervision
                    .reports
                    .report(WorkloadReport::running(allocation_id));
                supervision.reported_running = true;
            }
            // `failed …`, or the shim died: exit.json (or its absence) says.
            _ => {}
        }
    }

    let stopped_early = tokio::select! {
        biased;
        () = supervision.shim.exited() => false,
        () = wait_for_stop_request(&mut supervision.stop_requested) => true,
    };
    if stopped_early {
        // The pid file is believed only while its shim lives: a dead shim's
        // (from before a reboot, say) may name anything by now.
        if supervision.pid.is_none() && supervision.shim.is_alive() {
            supervision.pid = read_pid(&supervision.runtime);
        }
        terminate(&mut supervision).await;
    }
    // Whatever is left of the workload goes: processes that left its group
    // (a daemonised helper), or everything if the shim itself died. The
    // cgroup names exactly the workload's processes; only where there is
    // none does the process group stand in (its leader was reaped, so the
    // id could in principle be reused: the cgroup is the precise tool).
    if supervision.cgroup.dirs().is_empty() {
        signal_group(supervision.pid, Signal::SIGKILL);
    } else {
        supervision.cgroup.kill_all(None);
    }

    let exit: Option<ExitRecord> = fs::read_to_string(supervision.runtime.join(EXIT_FILE))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let oom_killed = supervision.cgroup.oom_kills() > 0;
    supervision.cgroup.remove();

    // The final report, the removal of the bookkeeping and of the entry
    // happen under the lock that starts and stops take: a stop cannot slip
    // in unnoticed, and a new start of the allocation (which would reuse the
    // runtime directory) waits until this run is entirely gone.
    let mut running = lock(&supervision.running);
    let stop_was_requested =
        *supervision.stop_requested.borrow() || supervision.runtime.join(STOP_FILE).exists();
    let _ = fs::remove_dir_all(&supervision.runtime);
    supervision.reports.report(final_report(
        allocation_id,
        exit.as_ref(),
        stop_was_requested,
        oom_killed,
    ));
    running.remove(&allocation_id);
}

/// How a run ended, as the control plane is told.
fn final_report(
    allocation_id: Uuid,
    exit: Option<&ExitRecord>,
    stop_was_requested: bool,
    oom_killed: bool,
) -> WorkloadReport {
    match (exit, stop_was_requested) {
        (Some(exit), _) if exit.spawn_error.is_some() => {
            let reason = exit.describe(false);
            tracing::warn!(%allocation_id, %reason, "workload failed to start");
            WorkloadReport::failed(allocation_id, reason)
        }
        (_, true) => {
            tracing::info!(%allocation_id, "workload terminated");
            WorkloadReport::terminated(allocation_id)
        }
        (Some(exit), false) => {
            let reason = exit.describe(oom_killed);
            tracing::warn!(%allocation_id, %reason, "workload failed");
            WorkloadReport::failed(allocation_id, reason)
        }
        (None, false) => {
            let reason = "the workload was lost: its supervisor ended without recording how \
                          (was the host restarted?)"
                .to_owned();
            tracing::warn!(%allocation_id, %reason, "workload failed");
            WorkloadReport::failed(allocation_id, reason)
        }
    }
}

/// SIGTERM to the workload's group, SIGKILL after the grace period; waits
/// for the shim to record the exit.
async fn terminate(supervision: &mut Supervision) {
    signal_group(supervision.pid, Signal::SIGTERM);
    if tokio::time::timeout(supervision.stop_grace_period, supervision.shim.exited())
        .await
        .is_err()
    {
        tracing::warn!(
            pid = supervision.pid,
            grace_period_ms = supervision.stop_grace_period.as_millis(),
            "workload ignored SIGTERM; killing it"
        );
        signal_group(supervision.pid, Signal::SIGKILL);
        supervision
            .cgroup
            .kill_all(Some(shim_pid(&supervision.shim)));
        supervision.shim.exited().await;
    }
}

fn shim_pid(shim: &Shim) -> i32 {
    match shim {
        Shim::Child(child) => child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .unwrap_or(0),
        Shim::Adopted { pid, .. } => *pid,
    }
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

/// Signals the workload's process group. The group id cannot belong to an
/// unrelated process: Linux does not reuse a pid while a process group of
/// that id exists, and the shim (its parent) has not reaped it unless the
/// whole group is being cleaned up anyway.
fn signal_group(pid: Option<i32>, signal: Signal) {
    let Some(pid) = pid.filter(|pid| *pid > 1) else {
        return;
    };
    match killpg(Pid::from_raw(pid), signal) {
        // The group is already gone: that is what we wanted.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => {
            tracing::error!(pid, %signal, %error, "could not signal workload");
        }
    }
}

fn read_pid(runtime: &Path) -> Option<i32> {
    fs::read_to_string(runtime.join(PID_FILE))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// A process's start time in clock ticks since boot (`/proc/{pid}/stat`
/// field 22), or `None` if there is no such process (or it is a zombie).
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state); field 22 is index 19.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn set_mode(dir: &Path, mode: u32) -> Result<(), WorkloadError> {
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_error(dir))
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
    fn this_process_has_a_start_time_and_a_made_up_one_has_none() {
        let own = i32::try_from(std::process::id()).unwrap();
        assert!(process_start_ticks(own).is_some());
        assert_eq!(process_start_ticks(i32::MAX), None);
    }
}
