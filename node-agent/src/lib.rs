//! The Keel node agent.
//!
//! The agent is the only Keel component that runs on a customer-facing host.
//! It does three things, each in its own module:
//!
//! - [`mod@enrol`] — once, at install time: make a key pair on the host, trade a
//!   single-use join token and a CSR for a node certificate, and save what the
//!   control plane handed back in the state directory ([`state`]).
//! - [`server`] and [`tasks`] — while running: serve HTTPS with mutual TLS on
//!   the enrolled address (on [`keel_http::tls::MtlsServer`], which the api's
//!   agent listener runs on too), admit only clients whose certificate chains
//!   to the control-plane CA *and* names the `worker` component, and accept a
//!   task only after [`keel_task::TaskVerifier`] has checked its signature,
//!   target node, epoch, validity window and sequence number. The new sequence
//!   high-water mark is made durable before the task is acted on, so a task
//!   can never be replayed, not even across a restart of the agent.
//! - [`workloads`] and [`reports`] — act on tasks by running workloads as
//!   operating-system processes (behind the [`workloads::WorkloadDriver`]
//!   trait so a simulated driver can stand in), and tell the control plane
//!   what happened to them over the same mutual-TLS trust, in order and with
//!   retries.
//!
//! [`agent`] wires these pieces together for the `run` command and for tests;
//! [`cli`] parses the command line of the `keel-agent` binary.
//!
//! # Trust model in one paragraph
//!
//! The node's private key never leaves the state directory. Inbound, the TLS
//! layer trusts only the control-plane CA, and the HTTP layer additionally
//! insists on the `worker` identity, so an api or node certificate cannot send
//! tasks. Even an authenticated worker cannot make the agent do anything that
//! is not signed with one of the task-signing keys received at enrolment: the
//! transport authenticates the caller, the signature authenticates the
//! command, and neither is enough on its own.

pub mod agent;
pub mod cgroups;
pub mod cli;
pub mod config;
pub mod control;
pub mod enrol;
pub mod inventory;
pub mod keyring;
pub mod metrics;
pub mod reports;
pub mod server;
pub mod shim;
pub mod simulated;
pub mod state;
pub mod status;
pub mod tasks;
pub mod terminal;
pub mod workloads;

pub use agent::{
    AgentError, RunOutcome, RunningAgent, run_until_signal, start_agent, start_agent_with_identity,
};
pub use enrol::{EnrolError, EnrolOptions, EnrolledNode, enrol};
pub use reports::{
    ReportDelivery, ReportError, ReportSink, RetryPolicy, WorkloadReport, WorkloadState,
};
pub use server::PeerIdentity;
pub use simulated::SimulatedDriver;
pub use state::{AgentState, NodeRecord, StateError};
pub use tasks::{LedgerError, TaskInbox, TaskInboxError, TaskLedger};
pub use workloads::{
    ProcessDriver, StartOutcome, StopOutcome, WorkloadDriver, WorkloadError, WorkloadSpec,
};
