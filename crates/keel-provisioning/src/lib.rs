//! Provisioning: allocations and their lifecycle.
//!
//! - [`http`]: `/v1/projects/{project_id}/allocations…` (thin handlers).
//! - [`service`]: create (with placement in the same transaction),
//!   list, get, terminate, and the state changes agents report.
//! - [`quota`]: tenant and project limits, enforced when an allocation is
//!   placed; [`admin_http`]: the operators' quota endpoints.
//! - [`reconcile`]: deadlines for every transitional state, and what hosts
//!   run reconciled with what Keel wants of them.
//! - [`model`]: the state machine ([`model::AllocationState`]): which
//!   transitions are legal is decided in one place.
//!
//! Every transition is one `WriteTx`: the row, its audit row and its
//! `allocation.*` event commit together; consumers (the provisioning
//! worker, later billing and notifications) react to the events.

pub mod admin_http;
pub mod agent_http;
pub mod consumer;
mod error;
pub mod http;
pub mod liveness;
pub mod model;
pub mod quota;
pub mod reconcile;
pub mod service;
pub mod signing;
pub mod terminal;

pub use error::ProvisioningError;
pub use model::{Allocation, AllocationState, AllocationView, NewAllocation};

/// The `aggregate_type` of allocation events.
pub const AGGREGATE: &str = "allocation";
