//! Admitting signed tasks: verification, durable replay protection, and
//! dispatch to the workload driver, in that order.
//!
//! [`TaskInbox::receive`] is the only way a task reaches a driver. It runs,
//! under one lock:
//!
//! 1. [`keel_task::TaskVerifier::verify`] against this node's id, enrolment
//!    epoch and trusted keys, and the current high-water sequence number;
//! 2. [`TaskLedger::record_accepted`]: append the task to `tasks.log` and
//!    fsync it, then replace `high-water` (write to a temporary file, fsync,
//!    rename, fsync the directory);
//! 3. the driver call, which is idempotent and quick.
//!
//! Between 1 and 2, a task whose number is more than one above the mark
//! waits (lock released) up to [`REORDER_WAIT_MS`] for the numbers below it:
//! the control plane takes numbers in order but sends concurrently, so a
//! later task can arrive first. Without the wait the earlier one would be
//! refused as `replayed`. The wait changes nothing about what is accepted:
//! only verified tasks wait, the mark still only rises, and a number at or
//! below it is still refused, and the checks that depend on time are made
//! again after a wait. A number that never comes (a worker died between
//! taking and sending it) costs the tasks after it one wait; they then go
//! lowest first.
//!
//! Persisting *before* acting is what makes replay protection survive a
//! crash: if the agent dies after step 2, the task may not have run, but it
//! can never run twice. The lock makes the compare-and-advance of the
//! sequence number atomic (two concurrent tasks cannot both pass the check)
//! and keeps execution in acceptance order.
//!
//! The disk writes are small and synchronous; they run on the async worker
//! holding the lock on purpose, because tasks are rare and nothing else may
//! proceed until the high-water mark is durable anyway.
//!
//! # The task log is a hash chain
//!
//! Each line of `tasks.log` holds the envelope exactly as received (so an
//! operator can re-verify its signature and see every parameter the node
//! was told to act on), when it was accepted, and `hash = SHA-256(prev ‖
//! the line's other fields)`, where `prev` is the previous line's hash
//! (64 zeros for the first). Editing, dropping or reordering a line breaks
//! every hash after it; [`verify_task_log`] (`keel-agent status`) finds
//! the first broken line. Lines written before the chain existed (no
//! `hash`) are counted as legacy and the chain starts after them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_task::{Operation, Rejection, TaskPayload, TaskVerifier};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::state::{HIGH_WATER_FILE, PRIVATE_FILE_MODE, TASK_LOG_FILE, write_file_atomically};
use crate::workloads::{WorkloadDriver, WorkloadSpec};

/// Why the replay ledger could not be read or advanced.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A ledger file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The high-water file holds something other than a number. Starting
    /// from zero instead would reopen the door to every old task, so the
    /// agent refuses to start until an operator looks.
    #[error("{path} does not hold a sequence number: {content:?}")]
    CorruptHighWater {
        /// The high-water file.
        path: PathBuf,
        /// What it holds (truncated).
        content: String,
    },

    /// An accepted task could not be encoded for the log.
    #[error("could not encode the task log entry: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Why a task was not acted on.
#[derive(Debug, thiserror::Error)]
pub enum TaskInboxError {
    /// The task failed verification; nothing was recorded or done.
    #[error("task rejected: {0}")]
    Rejected(#[from] Rejection),

    /// The task was valid but could not be recorded durably, so it was not
    /// acted on either.
    #[error("task could not be recorded: {0}")]
    Ledger(#[from] LedgerError),

    /// The task names another tenant than the one whose workload this
    /// allocation runs: the control plane would never sign that unless its
    /// own records were tampered with.
    #[error("allocation {allocation_id} runs a workload of another tenant")]
    WrongTenant {
        /// The allocation named.
        allocation_id: Uuid,
    },

    /// A terminal grant sent as a task: grants open sessions at the
    /// terminal endpoint only.
    #[error("a terminal grant is not a task")]
    NotATask,
}

/// One line of `tasks.log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLogEntry {
    /// The task's sequence number.
    pub seq: u64,
    /// The task's id.
    pub task_id: Uuid,
    /// The allocation the task acts on.
    pub allocation_id: Uuid,
    /// The operation, as its snake_case wire tag.
    pub op: String,
    /// When the agent accepted the task.
    #[serde(with = "time::serde::rfc3339")]
    pub accepted_at: OffsetDateTime,
    /// The signed envelope exactly as received.
    #[serde(default)]
    pub envelope: String,
    /// The previous line's hash (64 zeros for the first).
    #[serde(default)]
    pub prev: String,
    /// SHA-256 over `prev` and the fields above, hex.
    #[serde(default)]
    pub hash: String,
}

/// The `prev` of the first chained line.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl TaskLogEntry {
    /// The hash this entry must carry: over `prev` and every other field,
    /// in a fixed order, each length-prefixed.
    pub fn expected_hash(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let mut hasher = Sha256::new();
        let accepted_at = self.accepted_at.unix_timestamp_nanos().to_string();
        let task_id = self.task_id.to_string();
        let allocation_id = self.allocation_id.to_string();
        let seq = self.seq.to_string();
        for field in [
            self.prev.as_str(),
            seq.as_str(),
            task_id.as_str(),
            allocation_id.as_str(),
            self.op.as_str(),
            accepted_at.as_str(),
            self.envelope.as_str(),
        ] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
        hex::encode(hasher.finalize())
    }
}

/// What [`verify_task_log`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLogSummary {
    /// Lines in the chain.
    pub chained: usize,
    /// Lines from before the chain (no hash).
    pub legacy: usize,
    /// The first line (1-based) whose hash or link is wrong, if any.
    pub broken_at: Option<usize>,
}

/// Checks the hash chain of a task log's text.
pub fn verify_task_log(text: &str) -> TaskLogSummary {
    let mut summary = TaskLogSummary {
        chained: 0,
        legacy: 0,
        broken_at: None,
    };
    let mut prev = GENESIS_HASH.to_owned();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: TaskLogEntry = match serde_json::from_str(line) {
            Ok(entry) => entry,
            Err(_) => {
                // A torn last line is a crash mid-append, not tampering.
                let is_last = text
                    .lines()
                    .skip(index + 1)
                    .all(|rest| rest.trim().is_empty());
                if !is_last {
                    summary.broken_at = Some(index + 1);
                    return summary;
                }
                continue;
            }
        };
        if entry.hash.is_empty() && summary.chained == 0 {
            summary.legacy += 1;
            continue;
        }
        if entry.prev != prev || entry.hash != entry.expected_hash() {
            summary.broken_at = Some(index + 1);
            return summary;
        }
        prev = entry.hash;
        summary.chained += 1;
    }
    summary
}

/// The wire tag of an operation, as used in `tasks.log`.
pub fn operation_name(operation: &Operation) -> &'static str {
    match operation {
        Operation::StartWorkload { .. } => "start_workload",
        Operation::StopWorkload { .. } => "stop_workload",
        Operation::OpenTerminal { .. } => "open_terminal",
    }
}

/// The durable record of accepted tasks: the high-water sequence number and
/// the append-only task log.
#[derive(Debug)]
pub struct TaskLedger {
    high_water_path: PathBuf,
    log_path: PathBuf,
    log: File,
    /// The length of the log up to its last whole, recorded line.
    log_len: u64,
    high_water: u64,
    /// The hash of the last chained line.
    last_hash: String,
}

impl TaskLedger {
    /// Opens the ledger in `state_dir`, creating its files if needed.
    ///
    /// The high-water mark is the larger of the `high-water` file and the
    /// highest `seq` in `tasks.log`, so losing the small file (or a crash
    /// between the two writes) can never lower it.
    pub fn open(state_dir: &Path) -> Result<Self, LedgerError> {
        let high_water_path = state_dir.join(HIGH_WATER_FILE);
        let log_path = state_dir.join(TASK_LOG_FILE);
        let from_file = read_high_water_file(&high_water_path)?;

        let log_error = |source| LedgerError::Io {
            path: log_path.clone(),
            source,
        };
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&log_path)
            .map_err(log_error)?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes).map_err(log_error)?;
        // A crash in the middle of an append can leave a torn last line. Its
        // task was never acted on (that waits for the fsync), so it goes:
        // the file is cut back to its last whole line, which keeps the chain
        // intact for the next entry.
        let whole = bytes
            .iter()
            .rposition(|byte| *byte == b'\n')
            .map_or(0, |newline| newline + 1);
        if whole < bytes.len() {
            tracing::warn!(
                torn_bytes = bytes.len() - whole,
                "removing a torn last line from the task log"
            );
            bytes.truncate(whole);
            log.set_len(whole as u64).map_err(log_error)?;
            log.sync_data().map_err(log_error)?;
        }
        let log_text = String::from_utf8_lossy(&bytes);
        let from_log = highest_seq_in_log(&log_text);
        let last_hash = last_hash_in_log(&log_text);

        let high_water = from_file.max(from_log);
        tracing::info!(high_water, "task ledger opened");
        Ok(Self {
            high_water_path,
            log_path,
            log,
            log_len: whole as u64,
            high_water,
            last_hash,
        })
    }

    /// The highest sequence number accepted so far (0 if none).
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Durably records that `payload` was accepted and raises the high-water
    /// mark to its sequence number. Only on success may the task be acted on.
    pub fn record_accepted(
        &mut self,
        payload: &TaskPayload,
        envelope: &[u8],
        accepted_at: OffsetDateTime,
    ) -> Result<(), LedgerError> {
        let mut entry = TaskLogEntry {
            seq: payload.seq,
            task_id: payload.task_id,
            allocation_id: payload.operation.allocation_id(),
            op: operation_name(&payload.operation).to_owned(),
            accepted_at,
            // A verified envelope is JSON, hence UTF-8.
            envelope: String::from_utf8_lossy(envelope).into_owned(),
            prev: self.last_hash.clone(),
            hash: String::new(),
        };
        entry.hash = entry.expected_hash();
        let mut line = serde_json::to_vec(&entry).map_err(LedgerError::Encode)?;
        line.push(b'\n');
        if let Err(error) = self.append(&line, payload.seq) {
            // Whatever part of the line got written goes again, so the log
            // never holds a task that was not accepted, and the next line
            // follows the chain.
            if let Err(truncate) = self
                .log
                .set_len(self.log_len)
                .and_then(|()| self.log.sync_data())
            {
                tracing::error!(%truncate, "could not cut a failed append from the task log");
            }
            return Err(error);
        }
        self.log_len += line.len() as u64;
        self.high_water = payload.seq;
        self.last_hash = entry.hash;
        Ok(())
    }

    /// Appends one line (fsynced) and raises the high-water file.
    fn append(&mut self, line: &[u8], seq: u64) -> Result<(), LedgerError> {
        let log_error = |source| LedgerError::Io {
            path: self.log_path.clone(),
            source,
        };
        // A line cut off by an earlier failure that could not be removed
        // then is removed now, or nothing more is accepted.
        if self.log.metadata().map_err(log_error)?.len() != self.log_len {
            self.log.set_len(self.log_len).map_err(log_error)?;
        }
        self.log.write_all(line).map_err(log_error)?;
        self.log.sync_data().map_err(log_error)?;
        write_file_atomically(&self.high_water_path, format!("{seq}\n").as_bytes()).map_err(
            |source| LedgerError::Io {
                path: self.high_water_path.clone(),
                source,
            },
        )
    }
}

/// The hash of the last chained line that parses (the genesis hash if none).
fn last_hash_in_log(log_text: &str) -> String {
    log_text
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<TaskLogEntry>(line).ok())
        .find(|entry| !entry.hash.is_empty())
        .map(|entry| entry.hash)
        .unwrap_or_else(|| GENESIS_HASH.to_owned())
}

fn read_high_water_file(path: &Path) -> Result<u64, LedgerError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(LedgerError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    text.trim()
        .parse()
        .map_err(|_| LedgerError::CorruptHighWater {
            path: path.to_path_buf(),
            content: text.chars().take(40).collect(),
        })
}

/// The highest `seq` among the log lines that parse; torn or foreign lines
/// are skipped with a warning.
fn highest_seq_in_log(log_text: &str) -> u64 {
    #[derive(Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    let mut highest = 0;
    for (index, line) in log_text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<SeqOnly>(line) {
            Ok(entry) => highest = highest.max(entry.seq),
            Err(error) => {
                tracing::warn!(line = index + 1, %error, "skipping unreadable task log line");
            }
        }
    }
    highest
}

/// How long (ms) a task waits for the lower sequence numbers still missing
/// before it is accepted without them, unless configured (see the module
/// docs and `[timing] reorder_wait_ms`).
pub const REORDER_WAIT_MS: u64 = 1_000;

/// Verifies, records and dispatches tasks. See the module docs.
pub struct TaskInbox {
    verifier: std::sync::RwLock<Arc<TaskVerifier>>,
    ledger: Mutex<TaskLedger>,
    /// The high-water mark, sent after every raise (under the ledger lock)
    /// to tasks waiting for their turn.
    raised: tokio::sync::watch::Sender<u64>,
    /// [`REORDER_WAIT_MS`] unless changed.
    reorder_wait_ms: std::sync::atomic::AtomicU64,
    /// The sequence numbers of the tasks waiting for their turn now.
    waiting: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    driver: Arc<dyn WorkloadDriver>,
}

impl std::fmt::Debug for TaskInbox {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TaskInbox")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl TaskInbox {
    /// An inbox that verifies with `verifier`, records in `ledger` and acts
    /// through `driver`.
    pub fn new(
        verifier: TaskVerifier,
        ledger: TaskLedger,
        driver: Arc<dyn WorkloadDriver>,
    ) -> Self {
        Self {
            verifier: std::sync::RwLock::new(Arc::new(verifier)),
            raised: tokio::sync::watch::Sender::new(ledger.high_water()),
            reorder_wait_ms: std::sync::atomic::AtomicU64::new(REORDER_WAIT_MS),
            waiting: std::sync::Mutex::default(),
            ledger: Mutex::new(ledger),
            driver,
        }
    }

    /// Verifies with `verifier` from the next task on (the trusted keys
    /// changed).
    pub fn replace_verifier(&self, verifier: TaskVerifier) {
        let verifier = Arc::new(verifier);
        match self.verifier.write() {
            Ok(mut guard) => *guard = verifier,
            Err(poisoned) => *poisoned.into_inner() = verifier,
        }
    }

    fn verifier(&self) -> Arc<TaskVerifier> {
        match self.verifier.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Checks a terminal grant ([`crate::terminal`]): the task checks
    /// (signature, node, epoch, freshness) without the sequence ledger;
    /// grants are single use by their session id instead.
    pub fn verify_grant(&self, grant: &[u8], now_unix: i64) -> Result<TaskPayload, Rejection> {
        self.verifier().verify(grant, now_unix, 0)
    }

    /// The workload driver tasks are handed to.
    pub fn driver(&self) -> &Arc<dyn WorkloadDriver> {
        &self.driver
    }

    /// Changes how long a task waits for missing lower numbers.
    pub fn set_reorder_wait(&self, wait: std::time::Duration) {
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.reorder_wait_ms
            .store(millis, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many tasks are waiting for a lower number right now.
    pub fn waiting(&self) -> usize {
        self.waiting_set().len()
    }

    fn waiting_set(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The highest sequence number accepted so far.
    pub async fn high_water(&self) -> u64 {
        self.ledger.lock().await.high_water()
    }

    /// Handles one envelope exactly as received, at time `now_unix`. Returns
    /// the accepted payload once it has been recorded and handed to the
    /// driver.
    pub async fn receive(
        &self,
        envelope_bytes: &[u8],
        mut now_unix: i64,
    ) -> Result<TaskPayload, TaskInboxError> {
        let mut ledger = self.ledger.lock().await;
        let mut payload = self
            .verifier()
            .verify(envelope_bytes, now_unix, ledger.high_water())
            .inspect_err(log_rejection)?;
        if matches!(payload.operation, Operation::OpenTerminal { .. }) {
            tracing::warn!(task_id = %payload.task_id, "task rejected: a terminal grant");
            return Err(TaskInboxError::NotATask);
        }
        // Its turn: the number right above the mark; or, once its wait is
        // over, the lowest of the waiting numbers (so that tasks waiting
        // for the same missing number still go in order).
        let wait = self
            .reorder_wait_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait);
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let high_water = ledger.high_water();
            if payload.seq <= high_water {
                // A later task's wait ran out first and it was accepted.
                let rejection = Rejection::Replayed {
                    seq: payload.seq,
                    high_water_seq: high_water,
                };
                log_rejection(&rejection);
                return Err(rejection.into());
            }
            let expired = tokio::time::Instant::now() >= deadline;
            let lowest = self
                .waiting_set()
                .first()
                .is_none_or(|lowest| *lowest >= payload.seq);
            if payload.seq == high_water + 1 || (expired && lowest) {
                break;
            }
            // Subscribed under the lock: no raise after this check is missed.
            let mut raised = self.raised.subscribe();
            waiting.get_or_insert_with(|| Waiting::new(self, payload.seq));
            drop(ledger);
            if expired {
                // A lower number waits too: it goes first (its leaving,
                // however it leaves, wakes us).
                let _ = raised.changed().await;
            } else {
                let _ = tokio::time::timeout_at(deadline, raised.changed()).await;
            }
            ledger = self.ledger.lock().await;
        }
        if let Some(waited) = waiting.take() {
            drop(waited);
            // Time passed: the checks that depend on it (the window, the
            // keys now trusted) are made again.
            now_unix = OffsetDateTime::now_utc().unix_timestamp();
            payload = self
                .verifier()
                .verify(envelope_bytes, now_unix, ledger.high_water())
                .inspect_err(log_rejection)?;
        }

        // A workload belongs to the tenant whose task started it: a task
        // for the same allocation that names another tenant is refused.
        if let Some(claimed) = payload.tenant_id {
            let allocation_id = payload.operation.allocation_id();
            if let Some(Some(owner)) = self.driver.tenant_of(allocation_id)
                && owner != claimed
            {
                tracing::warn!(%allocation_id, "task rejected: another tenant's allocation");
                return Err(TaskInboxError::WrongTenant { allocation_id });
            }
        }

        // The task's work is a span of the trace the worker signed into it
        // (a verified payload: the trace context is as trusted as the task).
        let span = tracing::info_span!(
            "task",
            otel.name = %format_args!("task {}", operation_name(&payload.operation)),
            task_id = %payload.task_id,
            seq = payload.seq,
            // The same id the api's and the worker's log lines carry.
            trace_id = payload.traceparent.as_deref().and_then(|traceparent| traceparent.split('-').nth(1)),
        );
        if let Some(traceparent) = &payload.traceparent {
            keel_telemetry::continue_trace(&span, traceparent);
        }
        let _entered = span.enter();

        let accepted_at = OffsetDateTime::from_unix_timestamp(now_unix)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        ledger
            .record_accepted(&payload, envelope_bytes, accepted_at)
            .inspect_err(|error| {
                tracing::error!(
                    task_id = %payload.task_id,
                    seq = payload.seq,
                    %error,
                    "task could not be recorded; not acting on it"
                );
            })?;
        tracing::info!(
            task_id = %payload.task_id,
            seq = payload.seq,
            op = operation_name(&payload.operation),
            allocation_id = %payload.operation.allocation_id(),
            "task accepted"
        );

        // Still under the lock, so tasks run in the order they were accepted.
        execute(self.driver.as_ref(), &payload);
        self.raised.send_replace(ledger.high_water());
        drop(ledger);
        Ok(payload)
    }
}

/// A task's place among the waiting ones; leaving it (in order, refused or
/// cancelled with its connection) wakes the others to look again.
struct Waiting<'a> {
    inbox: &'a TaskInbox,
    seq: u64,
}

impl<'a> Waiting<'a> {
    fn new(inbox: &'a TaskInbox, seq: u64) -> Self {
        inbox.waiting_set().insert(seq);
        Self { inbox, seq }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.inbox.waiting_set().remove(&self.seq);
        self.inbox.raised.send_modify(|_| {});
    }
}

fn log_rejection(rejection: &Rejection) {
    tracing::warn!(
        reason = rejection.reason(),
        detail = %rejection,
        "task rejected"
    );
}

/// Hands one verified operation to the driver.
fn execute(driver: &dyn WorkloadDriver, payload: &TaskPayload) {
    match &payload.operation {
        Operation::StartWorkload {
            allocation_id,
            command,
            vcpus,
            memory_mib,
        } => {
            driver.start_workload(WorkloadSpec {
                allocation_id: *allocation_id,
                tenant_id: payload.tenant_id,
                command: command.clone(),
                vcpus: *vcpus,
                memory_mib: *memory_mib,
            });
        }
        Operation::StopWorkload { allocation_id } => {
            driver.stop_workload(*allocation_id);
        }
        // Refused in `receive` before anything is recorded.
        Operation::OpenTerminal { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new() -> Self {
            let path =
                std::env::temp_dir().join(format!("keel-agent-ledger-test-{}", Uuid::new_v4()));
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn payload_with_seq(seq: u64) -> TaskPayload {
        TaskPayload {
            task_id: Uuid::new_v4(),
            tenant_id: None,
            node_id: Uuid::new_v4(),
            enrolment_epoch: 1,
            seq,
            issued_at: 0,
            not_before: 0,
            expires_at: 60,
            traceparent: None,
            operation: Operation::StopWorkload {
                allocation_id: Uuid::from_u128(7),
            },
        }
    }

    #[test]
    fn a_new_ledger_starts_at_zero() {
        let scratch = ScratchDir::new();
        assert_eq!(TaskLedger::open(&scratch.0).unwrap().high_water(), 0);
    }

    #[test]
    fn the_high_water_mark_survives_reopening() {
        let scratch = ScratchDir::new();
        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        ledger
            .record_accepted(&payload_with_seq(5), b"{}", OffsetDateTime::now_utc())
            .unwrap();
        drop(ledger);
        assert_eq!(TaskLedger::open(&scratch.0).unwrap().high_water(), 5);
        assert_eq!(
            fs::read_to_string(scratch.0.join(HIGH_WATER_FILE)).unwrap(),
            "5\n"
        );
    }

    #[test]
    fn each_accepted_task_appends_one_log_line_with_the_agreed_fields() {
        let scratch = ScratchDir::new();
        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        let accepted_at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let first = payload_with_seq(1);
        ledger.record_accepted(&first, b"{}", accepted_at).unwrap();
        ledger
            .record_accepted(&payload_with_seq(2), b"{}", accepted_at)
            .unwrap();

        let log = fs::read_to_string(scratch.0.join(TASK_LOG_FILE)).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2);
        let entry: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        let hash = entry["hash"].as_str().unwrap().to_owned();
        assert_eq!(hash.len(), 64);
        assert_eq!(
            entry,
            serde_json::json!({
                "seq": 1,
                "task_id": first.task_id,
                "allocation_id": Uuid::from_u128(7),
                "op": "stop_workload",
                "accepted_at": "2023-11-14T22:13:20Z",
                "envelope": "{}",
                "prev": GENESIS_HASH,
                "hash": hash,
            })
        );
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["prev"], hash.as_str());
    }

    #[test]
    fn the_task_log_chain_survives_reopening_and_finds_any_edit() {
        let scratch = ScratchDir::new();
        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        for seq in 1..=3 {
            ledger
                .record_accepted(
                    &payload_with_seq(seq),
                    b"{\"v\":1}",
                    OffsetDateTime::now_utc(),
                )
                .unwrap();
        }
        drop(ledger);
        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        ledger
            .record_accepted(&payload_with_seq(4), b"{}", OffsetDateTime::now_utc())
            .unwrap();
        let log = fs::read_to_string(scratch.0.join(TASK_LOG_FILE)).unwrap();
        assert_eq!(
            verify_task_log(&log),
            TaskLogSummary {
                chained: 4,
                legacy: 0,
                broken_at: None
            }
        );

        // Change what a task said, drop a line, swap two lines.
        let lines: Vec<&str> = log.lines().collect();
        let edited = log.replacen("stop_workload", "start_workload", 1);
        let dropped = [lines[0], lines[2], lines[3]].join("\n");
        let swapped = [lines[1], lines[0], lines[2], lines[3]].join("\n");
        assert_eq!(verify_task_log(&edited).broken_at, Some(1));
        assert_eq!(verify_task_log(&dropped).broken_at, Some(2));
        assert_eq!(verify_task_log(&swapped).broken_at, Some(1));
    }

    #[test]
    fn legacy_lines_before_the_chain_are_counted_not_broken() {
        let scratch = ScratchDir::new();
        fs::write(scratch.0.join(TASK_LOG_FILE), "{\"seq\":1,\"task_id\":\"00000000-0000-0000-0000-000000000001\",\"allocation_id\":\"00000000-0000-0000-0000-000000000007\",\"op\":\"stop_workload\",\"accepted_at\":\"2023-11-14T22:13:20Z\"}\n").unwrap();
        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        ledger
            .record_accepted(&payload_with_seq(2), b"{}", OffsetDateTime::now_utc())
            .unwrap();
        let log = fs::read_to_string(scratch.0.join(TASK_LOG_FILE)).unwrap();
        assert_eq!(
            verify_task_log(&log),
            TaskLogSummary {
                chained: 1,
                legacy: 1,
                broken_at: None
            }
        );
    }

    #[test]
    fn a_lost_high_water_file_is_recovered_from_the_task_log() {
        let scratch = ScratchDir::new();
        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        ledger
            .record_accepted(&payload_with_seq(9), b"{}", OffsetDateTime::now_utc())
            .unwrap();
        drop(ledger);
        fs::remove_file(scratch.0.join(HIGH_WATER_FILE)).unwrap();
        assert_eq!(TaskLedger::open(&scratch.0).unwrap().high_water(), 9);
    }

    #[test]
    fn a_torn_last_log_line_is_cut_away_and_the_chain_stays_whole() {
        let scratch = ScratchDir::new();
        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        ledger
            .record_accepted(&payload_with_seq(3), b"{}", OffsetDateTime::now_utc())
            .unwrap();
        drop(ledger);
        // A crash mid-append, cut inside a multi-byte character.
        let path = scratch.0.join(TASK_LOG_FILE);
        let mut torn = fs::read(&path).unwrap();
        torn.extend_from_slice("{\"seq\":4,\"envelope\":\"\u{e9}".as_bytes());
        torn.pop();
        fs::write(&path, &torn).unwrap();

        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        assert_eq!(ledger.high_water(), 3);
        ledger
            .record_accepted(&payload_with_seq(4), b"{}", OffsetDateTime::now_utc())
            .unwrap();
        let log = fs::read_to_string(&path).unwrap();
        assert_eq!(log.lines().count(), 2);
        assert_eq!(
            verify_task_log(&log),
            TaskLogSummary {
                chained: 2,
                legacy: 0,
                broken_at: None
            }
        );
    }

    #[test]
    fn a_failed_append_leaves_no_part_of_its_line_behind() {
        let scratch = ScratchDir::new();
        let mut ledger = TaskLedger::open(&scratch.0).unwrap();
        ledger
            .record_accepted(&payload_with_seq(1), b"{}", OffsetDateTime::now_utc())
            .unwrap();
        // The high-water file cannot be replaced: a directory stands in the
        // way of the rename, so the append fails after the log was written.
        let high_water = scratch.0.join(HIGH_WATER_FILE);
        fs::remove_file(&high_water).unwrap();
        fs::create_dir(&high_water).unwrap();
        fs::write(high_water.join("blocker"), "").unwrap();
        assert!(
            ledger
                .record_accepted(&payload_with_seq(2), b"{}", OffsetDateTime::now_utc())
                .is_err()
        );
        fs::remove_dir_all(&high_water).unwrap();
        ledger
            .record_accepted(&payload_with_seq(2), b"{}", OffsetDateTime::now_utc())
            .unwrap();
        let log = fs::read_to_string(scratch.0.join(TASK_LOG_FILE)).unwrap();
        assert_eq!(log.lines().count(), 2);
        assert_eq!(verify_task_log(&log).broken_at, None);
        assert_eq!(verify_task_log(&log).chained, 2);
    }

    #[test]
    fn a_corrupt_high_water_file_stops_the_agent_instead_of_resetting_to_zero() {
        let scratch = ScratchDir::new();
        fs::write(scratch.0.join(HIGH_WATER_FILE), "garbage").unwrap();
        assert!(matches!(
            TaskLedger::open(&scratch.0),
            Err(LedgerError::CorruptHighWater { .. })
        ));
    }
}
