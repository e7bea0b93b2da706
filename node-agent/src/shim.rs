//! `keel-agent shim`: the small supervisor that sits between the agent and
//! one workload (as `containerd-shim` does for containers).
//!
//! The agent starts one shim per workload, as root, in its own process
//! group. The shim
//!
//! 1. joins the workload's cgroups (so everything the workload ever runs is
//!    inside its limits from its first instruction) and makes itself the
//!    last choice of the out-of-memory killer;
//! 2. waits for the agent's `go` on stdin, which the agent sends only once
//!    it has recorded the shim (so no workload ever runs that the agent
//!    could not find again); without it the shim starts nothing;
//! 3. opens the log files without following links and hands them to the
//!    workload's user (nothing a previous run left in the directory can
//!    turn them into another file);
//! 4. starts the workload as the allocation's own unprivileged user, in its
//!    own process group, with a cleared environment, in its directory;
//! 5. tells the agent `started <pid>` (or `failed <reason>`) on stdout, and
//!    writes the pid to its runtime directory;
//! 6. waits for the workload and writes how it ended to `exit.json`.
//!
//! The shim is not the agent's child for long: when the agent restarts, the
//! shim carries on, and the new agent re-adopts the workload from the
//! runtime directory and learns how it ended from `exit.json` even if that
//! happened while no agent was running. The runtime directory belongs to
//! root (0700): nothing the workload can write is ever trusted.
//!
//! It uses only safe code: the user switch and the process group are the
//! standard library's `Command` options.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::cgroups::WorkloadCgroup;
use crate::state::write_file_atomically;

/// The only `PATH` a workload sees.
pub const WORKLOAD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The child's pid, in the runtime directory.
pub const PID_FILE: &str = "pid";
/// How the workload ended, in the runtime directory.
pub const EXIT_FILE: &str = "exit.json";
/// What the agent writes to the shim's stdin once it has recorded it.
pub const GO: &str = "go";

/// What the shim was asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimOptions {
    /// Root-owned bookkeeping (pid, exit status).
    pub runtime_dir: PathBuf,
    /// The workload's own directory (its HOME and working directory).
    pub workload_dir: PathBuf,
    /// The user and group to run as (none: the shim's own).
    pub user: Option<(u32, u32)>,
    /// Cgroup directories to join.
    pub cgroups: Vec<PathBuf>,
    /// Start the workload only on the agent's `go` (an agent from before
    /// the handshake, still running during an upgrade, does not ask).
    pub await_go: bool,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// How a workload ended (`exit.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    /// Set when the workload never started.
    #[serde(default)]
    pub spawn_error: Option<String>,
}

impl ExitRecord {
    /// The `reason` of a `failed` report.
    pub fn describe(&self, oom_killed: bool) -> String {
        if let Some(error) = &self.spawn_error {
            return format!("could not start workload: {error}");
        }
        if oom_killed {
            return "killed by the kernel: the workload exceeded its memory limit (out of memory)"
                .to_owned();
        }
        match (self.code, self.signal) {
            (Some(code), _) => format!("workload exited with status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "workload ended".to_owned(),
        }
    }
}

/// Parses `shim --runtime DIR --dir DIR [--await-go] [--uid N --gid N] [--cgroup DIR]... -- PROGRAM ARGS...`.
pub fn parse(arguments: &[String]) -> Result<ShimOptions, String> {
    let (flags, command) = match arguments.iter().position(|argument| argument == "--") {
        Some(at) => (&arguments[..at], arguments[at + 1..].to_vec()),
        None => return Err("shim: `-- PROGRAM ...` is missing".to_owned()),
    };
    let mut runtime_dir = None;
    let mut workload_dir = None;
    let (mut uid, mut gid) = (None, None);
    let mut cgroups = Vec::new();
    let mut await_go = false;
    let mut rest = flags.iter();
    while let Some(flag) = rest.next() {
        if flag == "--await-go" {
            await_go = true;
            continue;
        }
        let value = rest
            .next()
            .ok_or_else(|| format!("shim: {flag} needs a value"))?;
        match flag.as_str() {
            "--runtime" => runtime_dir = Some(PathBuf::from(value)),
            "--dir" => workload_dir = Some(PathBuf::from(value)),
            "--uid" => uid = Some(value.parse().map_err(|_| "shim: bad --uid")?),
            "--gid" => gid = Some(value.parse().map_err(|_| "shim: bad --gid")?),
            "--cgroup" => cgroups.push(PathBuf::from(value)),
            other => return Err(format!("shim: unknown option {other}")),
        }
    }
    Ok(ShimOptions {
        runtime_dir: runtime_dir.ok_or("shim: --runtime is required")?,
        workload_dir: workload_dir.ok_or("shim: --dir is required")?,
        user: uid.zip(gid),
        cgroups,
        await_go,
        command,
    })
}

/// Runs the shim; returns the process exit code (0 once `exit.json` is
/// written).
pub fn run(options: &ShimOptions) -> u8 {
    let cgroup = WorkloadCgroup::from_dirs(options.cgroups.clone());
    if !options.cgroups.is_empty()
        && let Err(error) = cgroup.join(std::process::id())
    {
        return refuse(
            options,
            &format!("could not join the workload's cgroups: {error}"),
        );
    }
    // The shim is tiny: the kernel should kill the workload, never it.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");

    let Some((program, arguments)) = options.command.split_first() else {
        return refuse(options, "the command is empty");
    };
    if options.await_go {
        let mut go = String::new();
        if std::io::stdin().lock().read_line(&mut go).is_err() || go.trim_end() != GO {
            return refuse(options, "the agent did not confirm the start");
        }
    }
    let logs = (
        open_log(&options.workload_dir.join("stdout.log"), options.user),
        open_log(&options.workload_dir.join("stderr.log"), options.user),
    );
    let (stdout, stderr) = match logs {
        (Ok(stdout), Ok(stderr)) => (stdout, stderr),
        (Err(error), _) | (_, Err(error)) => {
            return refuse(options, &format!("could not open the log files: {error}"));
        }
    };
    let mut command = Command::new(program);
    command
        .args(arguments)
        .current_dir(&options.workload_dir)
        .env_clear()
        .env("PATH", WORKLOAD_PATH)
        .env("HOME", &options.workload_dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    if let Some((uid, gid)) = options.user {
        // The standard library also drops supplementary groups when a
        // child of root changes its uid.
        command.uid(uid).gid(gid);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return refuse(options, &format!("cannot execute {program:?}: {error}")),
    };
    let pid = child.id();
    let _ = write_file_atomically(
        &options.runtime_dir.join(PID_FILE),
        format!("{pid}\n").as_bytes(),
    );
    say(&format!("started {pid}"));

    let record = match child.wait() {
        Ok(status) => ExitRecord {
            code: status.code(),
            signal: status.signal(),
            spawn_error: None,
        },
        Err(error) => ExitRecord {
            code: None,
            signal: None,
            spawn_error: Some(format!("could not wait for the workload: {error}")),
        },
    };
    write_exit(&options.runtime_dir, &record);
    0
}

fn refuse(options: &ShimOptions, reason: &str) -> u8 {
    write_exit(
        &options.runtime_dir,
        &ExitRecord {
            code: None,
            signal: None,
            spawn_error: Some(reason.to_owned()),
        },
    );
    say(&format!("failed {reason}"));
    0
}

fn write_exit(runtime_dir: &Path, record: &ExitRecord) {
    if let Ok(bytes) = serde_json::to_vec(record)
        && let Err(error) = write_file_atomically(&runtime_dir.join(EXIT_FILE), &bytes)
    {
        eprintln!("keel-agent shim: could not record the exit status: {error}");
    }
}

/// One line to the agent on stdout (it may no longer be listening).
fn say(line: &str) {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Opens a log file for appending on the workload's behalf.
///
/// The shim is root and the directory is the workload's, so a previous run
/// may have left anything under the name: a symbolic link (refused by
/// `O_NOFOLLOW`), a hard link to a file elsewhere, a file of another owner,
/// a FIFO. Only a plain file with one link that belongs to the workload's
/// user is kept; anything else is removed and the file is created anew
/// (`O_EXCL`) and given to the user through its descriptor.
fn open_log(path: &Path, user: Option<(u32, u32)>) -> std::io::Result<File> {
    let owner = user.map_or_else(|| nix::unistd::geteuid().as_raw(), |(uid, _)| uid);
    // Only a plain file is opened at all (a FIFO would block the open); no
    // process of the workload's user runs now to swap it meanwhile, and the
    // checks below are repeated on what was opened.
    if std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.is_file())
        && let Ok(file) = OpenOptions::new()
            .append(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
    {
        let metadata = file.metadata()?;
        if metadata.is_file() && metadata.nlink() == 1 && metadata.uid() == owner {
            return Ok(file);
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arguments(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_command_line_round_trips() {
        let options = parse(&arguments(
            "--runtime /r --dir /w --await-go --uid 5 --gid 6 --cgroup /a --cgroup /b -- sleep 30",
        ))
        .unwrap();
        assert!(options.await_go);
        assert_eq!(options.user, Some((5, 6)));
        assert_eq!(options.cgroups, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(options.command, ["sleep", "30"]);
        assert!(parse(&arguments("--runtime /r --dir /w sleep")).is_err());
        assert!(parse(&arguments("--dir /w -- sleep")).is_err());
    }

    #[test]
    fn an_exit_is_described_for_people() {
        let exited = ExitRecord {
            code: Some(3),
            signal: None,
            spawn_error: None,
        };
        assert_eq!(exited.describe(false), "workload exited with status 3");
        let killed = ExitRecord {
            code: None,
            signal: Some(9),
            spawn_error: None,
        };
        assert_eq!(killed.describe(false), "killed by signal 9");
        assert!(killed.describe(true).contains("memory limit"));
    }
}
