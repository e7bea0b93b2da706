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
use futures::{SinkExt as _, StreamExt as _};
use keel_task::Operation;
use time::OffsetDateTime;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use uuid::Uuid;

use crate::cgroups::WorkloadCgroup;
use crate::server::error_response;
use crate::shim::WORKLOAD_PATH;
use crate::tasks::TaskInbox;
use crate::workloads::WorkloadDriver;

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
    driver: Arc<dyn WorkloadDriver>,
    /// Session ids already used, with when their grant expires. Kept in
    /// memory only, so grants issued before this agent started are refused
    /// (one used before a restart cannot be used again after it).
    used: Mutex<HashMap<Uuid, i64>>,
    started_at: i64,
    open: Arc<AtomicUsize>,
}

impl TerminalGate {
    pub fn new(inbox: Arc<TaskInbox>) -> Arc<Self> {
        Arc::new(Self {
            driver: Arc::clone(inbox.driver()),
            inbox,
            used: Mutex::new(HashMap::new()),
            started_at: OffsetDateTime::now_utc().unix_timestamp(),
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
        if payload.issued_at < self.started_at {
            return Err(refused(
                "issued_before_start",
                "the grant is older than this agent; ask for a new one".to_owned(),
            ));
        }
        match self.driver.tenant_of(allocation_id) {
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
    let driver = Arc::clone(&gate.driver);
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            // The shell starts only once the connection is a WebSocket (an
            // upgrade that fails leaves nothing behind), off the runtime's
            // threads (fork, exec and cgroup writes block).
            let allocation_id = admitted.allocation_id;
            let shell =
                tokio::task::spawn_blocking(move || driver.open_terminal(allocation_id)).await;
            let reason = match shell {
                Ok(Ok(shell)) => {
                    tracing::info!(
                        %allocation_id,
                        session_id = %admitted.session_id,
                        pid = shell.child.id(),
                        "terminal session opened"
                    );
                    bridge(socket, shell, admitted.limit).await
                }
                Ok(Err(reason)) => {
                    tracing::warn!(%allocation_id, %reason, "the shell could not start");
                    close(socket, "the shell could not start").await;
                    "the shell could not start"
                }
                Err(_) => {
                    close(socket, "the shell could not start").await;
                    "the shell could not start"
                }
            };
            tracing::info!(
                %allocation_id,
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

/// The shell of a session: killed with its whole session, and reaped,
/// however the session ends (also when its task is dropped).
struct ShellGuard(Option<Child>);

impl ShellGuard {
    /// Kills and reaps, off the runtime's threads.
    async fn end(mut self) {
        if let Some(child) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || end_shell(child)).await;
        }
    }
}

impl Drop for ShellGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            end_shell(child);
        }
    }
}

fn end_shell(mut child: Child) {
    kill_session(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let _ = child.wait();
}

/// The pseudo-terminal's controlling side, non-blocking, driven by the
/// runtime's reactor (no thread per session).
struct Pty(AsyncFd<OwnedFd>);

impl Pty {
    fn new(master: OwnedFd) -> std::io::Result<Self> {
        rustix::io::ioctl_fionbio(&master, true)?;
        // `register` is the `unsafe` successor; `new` is sound here: the
        // descriptor is an `OwnedFd` the `AsyncFd` owns, so nothing else
        // can close or reuse it while it is registered.
        #[allow(deprecated)]
        let registered = AsyncFd::new(master)?;
        Ok(Self(registered))
    }

    async fn read(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut *buffer)?)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), bytes)?)) {
                Ok(Ok(written)) => bytes = &bytes[written..],
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Relays between the socket and the shell until one side ends, the time
/// limit passes or the workload stops; returns why (also the close
/// frame's reason). Each direction is its own pump, so a side that stops
/// reading holds up only its own direction, and the limit and the stop
/// always end the session.
async fn bridge(socket: WebSocket, shell: TerminalShell, limit: Duration) -> &'static str {
    let TerminalShell {
        child,
        master,
        mut workload_stopping,
    } = shell;
    let shell = ShellGuard(Some(child));
    let pty = match Pty::new(master) {
        Ok(pty) => pty,
        Err(error) => {
            tracing::warn!(%error, "the terminal could not be driven");
            shell.end().await;
            close(socket, "the shell could not start").await;
            return "the shell could not start";
        }
    };
    let (mut to_client, mut from_client) = socket.split();

    let output = async {
        let mut buffer = vec![0_u8; 16 * 1024];
        loop {
            // EIO once the shell and everything holding its terminal are gone.
            match pty.read(&mut buffer).await {
                Ok(0) | Err(_) => return "the shell exited",
                Ok(read) => {
                    let frame = Message::Binary(buffer[..read].to_vec().into());
                    if to_client.send(frame).await.is_err() {
                        return "the client went away";
                    }
                }
            }
        }
    };
    let input = async {
        while let Some(message) = from_client.next().await {
            match message {
                Ok(Message::Binary(bytes)) => {
                    if pty.write_all(&bytes).await.is_err() {
                        return "the shell exited";
                    }
                }
                Ok(Message::Text(text)) => {
                    if let Ok(Control::Resize { cols, rows }) = serde_json::from_str(text.as_str())
                    {
                        resize(pty.0.get_ref(), cols.clamp(1, 1000), rows.clamp(1, 1000));
                    }
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(Message::Close(_)) | Err(_) => break,
            }
        }
        "the client closed the session"
    };
    let stopped = async {
        loop {
            if *workload_stopping.borrow_and_update() {
                break;
            }
            // Closed: the workload ended and the driver forgot it.
            if workload_stopping.changed().await.is_err() {
                break;
            }
        }
        "the workload stopped"
    };
    let reason = tokio::select! {
        () = tokio::time::sleep(limit) => "the session reached its time limit",
        reason = stopped => reason,
        reason = output => reason,
        reason = input => reason,
    };
    shell.end().await;
    if let Ok(socket) = to_client.reunite(from_client) {
        close(socket, reason).await;
    }
    reason
}

/// Sends a normal close with `reason`, giving up after a few seconds (a
/// client that reads nothing does not hold the session open).
async fn close(mut socket: WebSocket, reason: &'static str) {
    let frame = Message::Close(Some(CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.send(frame)).await;
}
