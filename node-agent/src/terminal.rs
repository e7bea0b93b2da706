//! Terminal sessions: a shell on a pseudo-terminal inside a running
//! workload's environment, bridged to a WebSocket the control plane's api
//! opens.
//!
//! The api may open one only with a *grant*: an [`Operation::OpenTerminal`]
//! signed by the same task-signing keys and checked by the same
//! [`keel_task::TaskVerifier`] as tasks (signature, node, enrolment epoch,
//! freshness), over a connection whose certificate names the `api`
//! component. A grant is single use (its session id is remembered until it
//! expires), names the tenant whose workload runs, and bounds the session's
//! length. Grants never go through `/v1/tasks` (it refuses them) and tasks
//! never open terminals.
//!
//! The shell runs as the workload's user, in its directory and cgroups, with
//! the workload's clean environment, as the session leader of its own
//! session with the pseudo-terminal as its controlling terminal (util-linux
//! `setsid --ctty`, so Ctrl-C and job control work), non-login and with no
//! rc file (nothing the tenant left in the directory runs before the first
//! keystroke). The session ends when the client leaves, the shell exits,
//! the time limit passes or the workload stops; then every process of the
//! shell's session is killed.
//!
//! The wire protocol (the api relays it unchanged): binary frames are
//! terminal bytes (input towards the shell, output towards the client);
//! a text frame `{"type":"resize","cols":N,"rows":N}` resizes the terminal.
//! The agent ends with a close frame whose reason says why.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts as _, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use keel_task::Operation;
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use crate::cgroups::WorkloadCgroup;
use crate::server::error_response;
use crate::shim::WORKLOAD_PATH;
use crate::tasks::TaskInbox;

/// Where the api opens sessions.
pub const TERMINAL_PATH: &str = "/v1/terminal";
/// The request header carrying the grant: the signed envelope, base64.
pub const GRANT_HEADER: &str = "x-keel-terminal-grant";
/// Sessions open at once on one agent.
pub const MAX_SESSIONS: usize = 16;
/// The longest session a grant may ask for (8 hours).
pub const MAX_SESSION_SECS: u64 = 8 * 3600;
/// The largest input frame accepted.
const MAX_FRAME_BYTES: usize = 64 * 1024;

/// A shell started for a session, before it is bridged.
pub struct TerminalShell {
    /// The shell; its pid is also its session and process group id.
    pub child: Child,
    /// The pseudo-terminal's controlling side.
    pub master: OwnedFd,
    /// Becomes `true` (or closes) when the workload stops or ends.
    pub workload_stopping: watch::Receiver<bool>,
}

/// Starts `/bin/sh` on a new pseudo-terminal as `user` in `dir`, and moves
/// it into `cgroup` before returning (it reads no file before its first
/// input, so nothing runs outside the workload's limits).
pub fn spawn_shell(
    user: Option<(u32, u32)>,
    dir: &Path,
    cgroup: &WorkloadCgroup,
) -> Result<(Child, OwnedFd), String> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let failed = |what: &str, error: &dyn std::fmt::Display| format!("{what}: {error}");
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(|error| failed("opening a pseudo-terminal", &error))?;
    grantpt(&master).map_err(|error| failed("granting the pseudo-terminal", &error))?;
    unlockpt(&master).map_err(|error| failed("unlocking the pseudo-terminal", &error))?;
    let name = ptsname(&master, Vec::new())
        .map_err(|error| failed("naming the pseudo-terminal", &error))?;
    let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name.as_bytes());
    resize(&master, 80, 24);
    // Not our controlling terminal: only the shell's.
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
        .open(name)
        .map_err(|error| failed("opening the terminal side", &error))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::fchown(&terminal, Some(uid), Some(gid))
            .map_err(|error| failed("handing the terminal to the workload's user", &error))?;
    }
    let stdio = |file: &File| {
        file.try_clone()
            .map(Stdio::from)
            .map_err(|error| failed("sharing the terminal", &error))
    };
    let mut command = Command::new("setsid");
    command
        .args(["--ctty", "/bin/sh", "-i"])
        .stdin(stdio(&terminal)?)
        .stdout(stdio(&terminal)?)
        .stderr(Stdio::from(terminal))
        .current_dir(dir)
        .env_clear()
        .env("PATH", WORKLOAD_PATH)
        .env("HOME", dir)
        .env("TERM", "xterm-256color")
        .env("SHELL", "/bin/sh");
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    let mut child = command
        .spawn()
        .map_err(|error| failed("starting the shell (setsid, /bin/sh)", &error))?;
    if !cgroup.dirs().is_empty()
        && let Err(error) = cgroup.join(child.id())
    {
        let _ = child.kill();
        let _ = child.wait();
        return Err(failed(
            "moving the shell into the workload's cgroups",
            &error,
        ));
    }
    Ok((child, master))
}

/// Sets the terminal's size (ignored when it cannot be set).
fn resize(master: &OwnedFd, cols: u16, rows: u16) {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let _ = rustix::termios::tcsetwinsize(master, size);
}

/// Kills every process of the session `sid` (the shell and anything it
/// started that kept the session), a few rounds in case some forked.
fn kill_session(sid: i32) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for _ in 0..5 {
        let members: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| session_of(*pid) == Some(sid))
            .collect();
        if members.is_empty() {
            return;
        }
        for pid in members {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The session id of a process, from `/proc/{pid}/stat`.
fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces and parentheses):
    // state, ppid, pgrp, session.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// What the terminal endpoint shares between requests.
pub struct TerminalGate {
    inbox: Arc<TaskInbox>,
    /// Session ids already used, with when their grant expires.
    used: Mutex<HashMap<Uuid, i64>>,
    open: Arc<AtomicUsize>,
}

impl TerminalGate {
    pub fn new(inbox: Arc<TaskInbox>) -> Arc<Self> {
        Arc::new(Self {
            inbox,
            used: Mutex::new(HashMap::new()),
            open: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Checks a grant; on success the session id is spent.
    fn admit(&self, grant: &[u8], now: i64) -> Result<Admitted, Refusal> {
        let refused = |code: &'static str, message: String| Refusal {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code,
            message,
        };
        let payload = self.inbox.verify_grant(grant, now).map_err(|rejection| {
            tracing::warn!(reason = rejection.reason(), detail = %rejection, "terminal grant rejected");
            refused(rejection.reason(), rejection.to_string())
        })?;
        let Operation::OpenTerminal {
            allocation_id,
            session_id,
            max_secs,
        } = payload.operation
        else {
            return Err(refused(
                "not_a_grant",
                "a task is not a terminal grant".to_owned(),
            ));
        };
        match self.inbox.driver().tenant_of(allocation_id) {
            None => {
                return Err(Refusal {
                    status: StatusCode::CONFLICT,
                    code: "not_running",
                    message: "the allocation's workload does not run here".to_owned(),
                });
            }
            Some(owner) if owner != payload.tenant_id => {
                tracing::warn!(%allocation_id, "terminal grant rejected: another tenant's workload");
                return Err(refused(
                    "wrong_tenant",
                    "the workload is another tenant's".to_owned(),
                ));
            }
            Some(_) => {}
        }
        {
            let mut used = self
                .used
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // A grant lives a minute; ten keep every session id a grant
            // still valid (with clock skew) could name.
            used.retain(|_, expires_at| *expires_at >= now - 600);
            if used.contains_key(&session_id) {
                tracing::warn!(%session_id, "terminal grant rejected: already used");
                return Err(refused(
                    "replayed",
                    "this grant was used already".to_owned(),
                ));
            }
            used.insert(session_id, payload.expires_at);
        }
        Ok(Admitted {
            allocation_id,
            session_id,
            limit: Duration::from_secs(max_secs.min(MAX_SESSION_SECS)),
        })
    }
}

/// Why a grant opens nothing.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

struct Admitted {
    allocation_id: Uuid,
    session_id: Uuid,
    limit: Duration,
}

/// Counts a session as open until dropped.
struct SessionSlot(Arc<AtomicUsize>);

impl SessionSlot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Self> {
        let mut current = open.load(Ordering::Acquire);
        loop {
            if current >= MAX_SESSIONS {
                return None;
            }
            match open.compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Self(Arc::clone(open))),
                Err(actual) => current = actual,
            }
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `GET /v1/terminal`: the api's peer check ran before (`server`).
pub async fn open_terminal(State(gate): State<Arc<TerminalGate>>, request: Request) -> Response {
    let grant = request.headers().get(GRANT_HEADER).and_then(|value| {
        base64::engine::general_purpose::STANDARD
            .decode(value.as_bytes())
            .ok()
    });
    let Some(grant) = grant else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a terminal needs a grant (x-keel-terminal-grant)",
        );
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let admitted = match gate.admit(&grant, now) {
        Ok(admitted) => admitted,
        Err(refusal) => return error_response(refusal.status, refusal.code, &refusal.message),
    };
    let (mut parts, _) = request.into_parts();
    let Ok(upgrade) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "a terminal is a WebSocket",
        );
    };
    let Some(slot) = SessionSlot::take(&gate.open) else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_sessions",
            "this host has too many terminal sessions open",
        );
    };
    let shell = match gate.inbox.driver().open_terminal(admitted.allocation_id) {
        Ok(shell) => shell,
        Err(reason) => {
            tracing::warn!(allocation_id = %admitted.allocation_id, %reason, "no terminal");
            return error_response(StatusCode::CONFLICT, "terminal_unavailable", &reason);
        }
    };
    tracing::info!(
        allocation_id = %admitted.allocation_id,
        session_id = %admitted.session_id,
        pid = shell.child.id(),
        "terminal session opened"
    );
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            let reason = bridge(socket, shell, admitted.limit).await;
            tracing::info!(
                allocation_id = %admitted.allocation_id,
                session_id = %admitted.session_id,
                reason,
                "terminal session closed"
            );
            drop(slot);
        })
}

/// A control message from the client.
#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Control {
    Resize { cols: u16, rows: u16 },
}

/// Relays between the socket and the shell until one side ends; returns
/// why it ended (also sent as the close frame's reason).
async fn bridge(mut socket: WebSocket, shell: TerminalShell, limit: Duration) -> &'static str {
    let TerminalShell {
        mut child,
        master,
        mut workload_stopping,
    } = shell;
    let (Ok(reader), Ok(writer)) = (master.try_clone(), master.try_clone()) else {
        kill_session(pid_of(&child));
        let _ = child.wait();
        return "the terminal could not be shared";
    };
    let (output, mut outputs) = tokio::sync::mpsc::channel::<Vec<u8>>(32);
    std::thread::spawn(move || {
        let mut reader = File::from(reader);
        let mut buffer = vec![0_u8; 16 * 1024];
        // Ends with EIO once every process holding the terminal is gone.
        while let Ok(read) = reader.read(&mut buffer) {
            if read == 0 || output.blocking_send(buffer[..read].to_vec()).is_err() {
                break;
            }
        }
    });
    let (input, inputs) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut writer = File::from(writer);
        for chunk in inputs {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });

    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let reason = loop {
        tokio::select! {
            () = &mut deadline => break "the session reached its time limit",
            changed = workload_stopping.changed() => {
                if changed.is_err() || *workload_stopping.borrow() {
                    break "the workload stopped";
                }
            }
            chunk = outputs.recv() => match chunk {
                Some(bytes) => {
                    if socket.send(Message::Binary(bytes.into())).await.is_err() {
                        break "the client went away";
                    }
                }
                None => break "the shell exited",
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if input.send(bytes.to_vec()).is_err() {
                        break "the shell exited";
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if let Ok(Control::Resize { cols, rows }) = serde_json::from_str(text.as_str()) {
                        resize(&master, cols.clamp(1, 1000), rows.clamp(1, 1000));
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break "the client closed the session",
            },
        }
    };
    drop(input);
    let sid = pid_of(&child);
    let _ = tokio::task::spawn_blocking(move || {
        kill_session(sid);
        let _ = child.wait();
    })
    .await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: reason.into(),
        })))
        .await;
    reason
}

fn pid_of(child: &Child) -> i32 {
    i32::try_from(child.id()).unwrap_or(i32::MAX)
}
