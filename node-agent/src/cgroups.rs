//! Resource limits for workloads through cgroups: v2 when the host mounts
//! the unified hierarchy with its controllers at `/sys/fs/cgroup`, else the
//! v1 `memory`, `cpu` and `pids` hierarchies (what this machine mounts).
//!
//! Each allocation gets one cgroup per controller, named after it under a
//! `keel` parent: memory (and, on v1, memory+swap) capped at the flavor's
//! memory, CPU time at `vcpus` CPUs (CFS quota over a 100 ms period), and
//! the number of processes at [`PIDS_MAX`]. The workload's shim joins them
//! before it starts the workload, so nothing the workload runs is ever
//! outside its limits. [`WorkloadCgroup::kill_all`] kills every process in
//! them — also the ones that left the workload's process group — and
//! [`WorkloadCgroup::oom_kills`] tells an out-of-memory kill from any
//! other SIGKILL.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// The cgroup root.
const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every workload cgroup.
const PARENT: &str = "keel";
/// Most processes (and threads) one workload may have.
pub const PIDS_MAX: u32 = 4096;
/// The CFS period.
const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One unified hierarchy with `cpu`, `memory` and `pids`.
    V2 { root: PathBuf },
    /// One hierarchy per controller.
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
}

impl Layout {
    /// Detects the layout, or `None` (with the reason) when limits cannot
    /// be enforced here.
    pub fn detect() -> Result<Self, String> {
        Self::detect_at(Path::new(ROOT))
    }

    fn detect_at(root: &Path) -> Result<Self, String> {
        let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let has = |name: &str| controllers.split_whitespace().any(|c| c == name);
        if has("memory") && has("cpu") && has("pids") {
            return Ok(Layout::V2 {
                root: root.to_owned(),
            });
        }
        let v1 = |name: &str| {
            let dir = root.join(name);
            dir.join("cgroup.procs").exists().then_some(dir)
        };
        match (v1("memory"), v1("cpu"), v1("pids")) {
            (Some(memory), Some(cpu), Some(pids)) => Ok(Layout::V1 { memory, cpu, pids }),
            _ => Err(format!(
                "no cgroup v2 with cpu, memory and pids at {}, nor the v1 memory, cpu and pids hierarchies",
                root.display()
            )),
        }
    }

    /// Creates the `keel` parent (and, on v2, delegates the controllers to
    /// it). Needs root.
    pub fn prepare(&self) -> io::Result<()> {
        match self {
            Layout::V2 { root } => {
                enable_controllers(root)?;
                let parent = root.join(PARENT);
                create_dir(&parent)?;
                enable_controllers(&parent)
            }
            Layout::V1 { memory, cpu, pids } => {
                for hierarchy in [memory, cpu, pids] {
                    create_dir(&hierarchy.join(PARENT))?;
                }
                Ok(())
            }
        }
    }

    /// The cgroup of one allocation (not created).
    pub fn workload(&self, allocation_id: Uuid) -> WorkloadCgroup {
        let name = allocation_id.hyphenated().to_string();
        let dirs = match self {
            Layout::V2 { root } => vec![root.join(PARENT).join(&name)],
            Layout::V1 { memory, cpu, pids } => vec![
                memory.join(PARENT).join(&name),
                cpu.join(PARENT).join(&name),
                pids.join(PARENT).join(&name),
            ],
        };
        WorkloadCgroup {
            v2: matches!(self, Layout::V2 { .. }),
            dirs,
        }
    }
}

fn enable_controllers(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory +pids")
}

fn create_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => Err(error),
        _ => Ok(()),
    }
}

/// One allocation's cgroup(s): one directory on v2, three on v1 (memory,
/// cpu, pids, in that order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadCgroup {
    v2: bool,
    dirs: Vec<PathBuf>,
}

impl WorkloadCgroup {
    /// Rebuilds a cgroup from [`WorkloadCgroup::dirs`] (as recorded).
    pub fn from_dirs(dirs: Vec<PathBuf>) -> Self {
        let v2 = dirs.len() == 1;
        Self { v2, dirs }
    }

    /// The directories, for the shim to join and the record to keep.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Creates the cgroup(s) with the limits.
    pub fn create(&self, vcpus: u32, memory_mib: u64) -> io::Result<()> {
        for dir in &self.dirs {
            create_dir(dir)?;
        }
        let memory_bytes = memory_mib.saturating_mul(1024 * 1024).max(4 * 1024 * 1024);
        let quota = u64::from(vcpus.max(1)) * CPU_PERIOD_US;
        if self.v2 {
            let dir = &self.dirs[0];
            fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
            // Swap would turn an out-of-memory kill into a slow crawl.
            let _ = fs::write(dir.join("memory.swap.max"), "0");
            fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
            fs::write(dir.join("pids.max"), PIDS_MAX.to_string())?;
        } else {
            let (memory, cpu, pids) = (&self.dirs[0], &self.dirs[1], &self.dirs[2]);
            fs::write(
                memory.join("memory.limit_in_bytes"),
                memory_bytes.to_string(),
            )?;
            // memory+swap, where swap accounting is on: no swapping past the limit.
            let memsw = memory.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                fs::write(memsw, memory_bytes.to_string())?;
            }
            fs::write(cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
            fs::write(cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
            fs::write(pids.join("pids.max"), PIDS_MAX.to_string())?;
        }
        Ok(())
    }

    /// Moves process `pid` into the cgroup(s).
    pub fn join(&self, pid: u32) -> io::Result<()> {
        for dir in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the cgroup (from the first directory: every
    /// process of the workload is in all of them).
    pub fn pids(&self) -> Vec<i32> {
        self.dirs
            .first()
            .and_then(|dir| fs::read_to_string(dir.join("cgroup.procs")).ok())
            .map(|text| {
                text.lines()
                    .filter_map(|line| line.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILLs every process in the cgroup except `spare` (the shim),
    /// until none is left (a fork racing the kill is caught by the next
    /// round). Gives up after a few rounds.
    pub fn kill_all(&self, spare: Option<i32>) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for _ in 0..50 {
            let pids: Vec<i32> = self
                .pids()
                .into_iter()
                .filter(|pid| Some(*pid) != spare)
                .collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// How many times the kernel killed a process here for want of memory.
    pub fn oom_kills(&self) -> u64 {
        let Some(memory) = self.dirs.first() else {
            return 0;
        };
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        fs::read_to_string(memory.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    let (name, value) = line.split_once(' ')?;
                    (name == key).then(|| value.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    /// Removes the cgroup(s) once empty.
    pub fn remove(&self) {
        for dir in &self.dirs {
            if let Err(error) = fs::remove_dir(dir)
                && error.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), %error, "could not remove a workload cgroup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_found_where_the_controllers_have_their_own_hierarchies() {
        let root = std::env::temp_dir().join(format!("keel-cgroup-test-{}", Uuid::new_v4()));
        for name in ["memory", "cpu", "pids"] {
            fs::create_dir_all(root.join(name)).unwrap();
            fs::write(root.join(name).join("cgroup.procs"), "").unwrap();
        }
        let layout = Layout::detect_at(&root).unwrap();
        assert!(matches!(layout, Layout::V1 { .. }));
        let cgroup = layout.workload(Uuid::from_u128(1));
        assert_eq!(cgroup.dirs().len(), 3);
        assert!(cgroup.dirs()[0].ends_with("memory/keel/00000000-0000-0000-0000-000000000001"));

        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert!(matches!(
            Layout::detect_at(&root).unwrap(),
            Layout::V2 { .. }
        ));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn no_controllers_is_a_reason_not_a_panic() {
        let root = std::env::temp_dir().join(format!("keel-cgroup-test-{}", Uuid::new_v4()));
        fs::create_dir_all(&root).unwrap();
        assert!(Layout::detect_at(&root).is_err());
        let _ = fs::remove_dir_all(&root);
    }
}
