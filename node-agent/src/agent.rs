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
use keel_pki::HotIdentity;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{AgentConfig, DriverKind};
use crate::control::{ControlPlaneLink, LinkError, LinkOutcome};
use crate::reports::{ReportDelivery, ReportError, RetryPolicy};
use crate::server::router;
use crate::state::{AgentState, StateError};
use crate::status::{AgentCondition, Status, write_status};
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

    /// The node's certificate and key could not be put into TLS.
    #[error("the node certificate and key: {0}")]
    Identity(#[source] keel_pki::PkiError),

    /// The link to the control plane could not be set up.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// How `run` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Stopped by SIGINT or SIGTERM.
    Stopped,
    /// The node cannot go on without a new join token; the reason is also
    /// in `status.json` and the log.
    NeedsReenrolment(String),
}

/// An agent server running in the background.
#[derive(Debug)]
pub struct RunningAgent {
    local_addr: SocketAddr,
    inbox: Arc<TaskInbox>,
    identity: Arc<HotIdentity>,
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

    /// The certificate the server presents (renewal swaps it).
    pub fn identity(&self) -> &Arc<HotIdentity> {
        &self.identity
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
    let identity =
        HotIdentity::from_pem(&state.cert_pem, &state.key_pem).map_err(AgentError::Identity)?;
    start_agent_with_identity(state, listen, driver, identity).await
}

/// [`start_agent`] presenting `identity`, which the caller may renew.
pub async fn start_agent_with_identity(
    state: &AgentState,
    listen: SocketAddr,
    driver: Arc<dyn WorkloadDriver>,
    identity: Arc<HotIdentity>,
) -> Result<RunningAgent, AgentError> {
    let verifier = state.task_verifier()?;
    let ledger = TaskLedger::open(&state.dir)?;
    let inbox = Arc::new(TaskInbox::new(verifier, ledger, driver));
    let tls_config = keel_pki::server_config_with_hot_identity(
        &control_plane_roots(state)?,
        Arc::clone(&identity),
    )
    .map_err(AgentError::Identity)?;
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
        identity,
        stop: Some(stop),
        server,
    })
}

fn control_plane_roots(
    state: &AgentState,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, AgentError> {
    keel_pki::certs_from_pem(&state.control_plane_ca_pem).map_err(AgentError::Identity)
}

fn needs_reenrolment(state_dir: &Path, reason: String) -> RunOutcome {
    tracing::error!(%reason, "this node needs re-enrolment: create a join token with `api join-token --node <id>` and run `keel-agent join --reenrol`");
    let mut status = Status::new(AgentCondition::NeedsReenrolment);
    status.reason = Some(reason.clone());
    write_status(state_dir, &status);
    RunOutcome::NeedsReenrolment(reason)
}

/// The `run` command: load the state in `state_dir`, deliver reports to the
/// control plane, keep the signing keys and the certificate fresh, run
/// workloads as processes, and serve on the enrolled address until SIGINT
/// or SIGTERM — or until the node needs re-enrolment (see
/// [`RunOutcome`]).
pub async fn run_until_signal(config: &AgentConfig) -> Result<RunOutcome, AgentError> {
    let state_dir = config.state_dir.as_path();
    let state = AgentState::load(state_dir)?;
    if let Some((_, not_after)) = state.certificate_validity()
        && not_after <= OffsetDateTime::now_utc()
    {
        return Ok(needs_reenrolment(
            state_dir,
            format!("the node certificate expired at {not_after} while the agent was not running"),
        ));
    }
    let identity =
        HotIdentity::from_pem(&state.cert_pem, &state.key_pem).map_err(AgentError::Identity)?;
    let client_tls = keel_pki::client_config_with_hot_identity(
        &control_plane_roots(&state)?,
        Arc::clone(&identity),
    )
    .map_err(AgentError::Identity)?;
    let (report_queue, delivery) = ReportDelivery::new(
        &state.node.agent_api_url,
        (*client_tls).clone(),
        RetryPolicy::default(),
    )?;
    // The simulated driver runs no workload at all (scale tests and
    // benchmarks of the agent itself).
    let driver: Arc<dyn WorkloadDriver> = match config.workloads.driver {
        DriverKind::Simulated => {
            tracing::warn!("the simulated driver is configured: workloads are only pretended");
            Arc::new(crate::simulated::SimulatedDriver::new(Arc::new(
                report_queue,
            )))
        }
        DriverKind::Process => Arc::new(
            ProcessDriver::new(&state.dir, Arc::new(report_queue))?.with_stop_grace_period(
                std::time::Duration::from_secs(config.workloads.stop_grace_secs),
            ),
        ),
    };
    let termination = termination_signal()?;

    let agent = start_agent_with_identity(
        &state,
        state.node.listen,
        Arc::clone(&driver),
        Arc::clone(&identity),
    )
    .await?;
    agent
        .inbox()
        .set_reorder_wait(std::time::Duration::from_millis(
            config.timing.reorder_wait_ms,
        ));
    let metrics_driver = Arc::clone(&driver);
    let link = Arc::new(
        ControlPlaneLink::new(
            &state,
            identity,
            (*client_tls).clone(),
            Arc::clone(agent.inbox()),
            driver,
            config.link_timing(),
        )?
        .with_capacity(config.capacity),
    );
    let (stop_delivery, delivery_stopped) = oneshot::channel::<()>();
    let delivery = tokio::spawn(delivery.run(async move {
        let _ = delivery_stopped.await;
    }));
    let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
    if let Some(listen) = config.metrics_listen {
        // Metrics are not worth refusing tasks over: a listener that cannot
        // bind is logged, and the agent runs on.
        match keel_http::metrics::bind(listen).await {
            Ok(listener) => {
                let driver = Arc::clone(&metrics_driver);
                tokio::spawn(async move {
                    let served = crate::metrics::serve(listener, driver, async move {
                        let _ = metrics_stopped.await;
                    })
                    .await;
                    if let Err(error) = served {
                        tracing::error!(%listen, %error, "serving metrics failed");
                    }
                });
            }
            Err(error) => tracing::error!(%listen, %error, "could not bind the metrics listener"),
        }
    }

    let outcome = tokio::select! {
        () = termination => RunOutcome::Stopped,
        outcome = link.run(std::future::pending()) => match outcome {
            LinkOutcome::Stopped => RunOutcome::Stopped,
            LinkOutcome::NeedsReenrolment(reason) => needs_reenrolment(state_dir, reason),
        },
    };
    tracing::info!("shutting down");
    // Tasks stop first, so nothing new is queued while delivery winds down.
    agent.shutdown().await;
    let _ = stop_metrics.send(());
    let _ = stop_delivery.send(());
    if let Err(error) = delivery.await {
        tracing::error!(%error, "the report delivery task failed");
    }
    if outcome == RunOutcome::Stopped {
        write_status(state_dir, &Status::new(AgentCondition::Stopped));
    }
    Ok(outcome)
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
