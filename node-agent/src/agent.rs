//! Wiring: from a loaded state directory to a serving agent.
//!
//! [`start_agent`] assembles the verifier, the replay ledger, the driver and
//! the mutual-TLS server ([`keel_http::tls::MtlsServer`]) for one state, binds, and serves in the background; tests
//! use it directly with a driver whose reports go to a channel. The `run`
//! command uses [`run_until_signal`], which adds the real report delivery
//! and the process driver and serves until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use keel_http::tls::MtlsServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::reports::{ReportDelivery, ReportError};
use crate::server::router;
use crate::state::{AgentState, StateError};
use crate::tasks::{LedgerError, TaskInbox, TaskLedger};
use crate::workloads::{ProcessDriver, WorkloadDriver, WorkloadError};

/// Why the agent could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory could not be loaded or used.
    #[error(transparent)]
    State(#[from] StateError),

    /// The replay ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),

    /// The workload driver could not be set up.
    #[error(transparent)]
    Workloads(#[from] WorkloadError),

    /// Report delivery could not be set up.
    #[error(transparent)]
    Reports(#[from] ReportError),

    /// The listen address could not be bound.
    #[error("could not listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The signal handlers could not be installed.
    #[error("could not install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// An agent server running in the background.
#[derive(Debug)]
pub struct RunningAgent {
    local_addr: SocketAddr,
    inbox: Arc<TaskInbox>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl RunningAgent {
    /// The address the server is bound to (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The inbox tasks go through, e.g. to read the high-water mark.
    pub fn inbox(&self) -> &Arc<TaskInbox> {
        &self.inbox
    }

    /// Stops accepting, drains open connections and waits for the server to
    /// finish. Running workloads are left alone.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(error) = (&mut self.server).await {
            tracing::error!(%error, "the agent server task failed");
        }
    }
}

/// Starts serving `state` on `listen` with `driver`, in the background.
/// Dropping the returned handle also stops the server.
pub async fn start_agent(
    state: &AgentState,
    listen: SocketAddr,
    driver: Arc<dyn WorkloadDriver>,
) -> Result<RunningAgent, AgentError> {
    let verifier = state.task_verifier()?;
    let ledger = TaskLedger::open(&state.dir)?;
    let inbox = Arc::new(TaskInbox::new(verifier, ledger, driver));
    let tls_config = state.server_tls_config()?;
    let server = MtlsServer::bind(listen, tls_config, router(Arc::clone(&inbox)))
        .await
        .map_err(|source| AgentError::Bind {
            address: listen,
            source,
        })?;
    let local_addr = server.local_addr().map_err(|source| AgentError::Bind {
        address: listen,
        source,
    })?;
    tracing::info!(
        %local_addr,
        node_id = %state.node.node_id,
        enrolment_epoch = state.node.enrolment_epoch,
        "agent serving"
    );

    let (stop, stopped) = oneshot::channel::<()>();
    // The server also stops when the sender is dropped, so a forgotten
    // handle cannot leave a server running.
    let server = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Ok(RunningAgent {
        local_addr,
        inbox,
        stop: Some(stop),
        server,
    })
}

/// The `run` command: load the state in `state_dir`, deliver reports to the
/// control plane, run workloads as processes, and serve on the enrolled
/// address until SIGINT or SIGTERM.
pub async fn run_until_signal(state_dir: &Path) -> Result<(), AgentError> {
    let state = AgentState::load(state_dir)?;
    let (report_queue, delivery) = ReportDelivery::for_state(&state)?;
    let driver = Arc::new(ProcessDriver::new(&state.dir, Arc::new(report_queue))?);
    let termination = termination_signal()?;

    let agent = start_agent(&state, state.node.listen, driver).await?;
    let (stop_delivery, delivery_stopped) = oneshot::channel::<()>();
    let delivery = tokio::spawn(delivery.run(async move {
        let _ = delivery_stopped.await;
    }));

    termination.await;
    tracing::info!("shutting down");
    // Tasks stop first, so nothing new is queued while delivery winds down.
    agent.shutdown().await;
    let _ = stop_delivery.send(());
    if let Err(error) = delivery.await {
        tracing::error!(%error, "the report delivery task failed");
    }
    Ok(())
}

/// A future that resolves on the first SIGINT or SIGTERM. The handlers are
/// installed before it is returned, so no signal is missed while starting.
fn termination_signal() -> Result<impl Future<Output = ()>, AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("received SIGINT"),
            _ = terminate.recv() => tracing::info!("received SIGTERM"),
        }
    })
}
