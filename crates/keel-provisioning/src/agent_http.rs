//! The agent-facing endpoints, served only on the api's mutual-TLS
//! listener (`keel_http::tls::MtlsServer`): a peer is a node agent whose
//! certificate the node CA signed, and its identity is the node id in that
//! certificate (the [`TlsPeer`] the server attaches to each request), never
//! anything it says in a body, checked against the database on every
//! request (`keel_inventory::nodes::authenticated_node`). A request without
//! a [`TlsPeer`] is refused with 403 `forbidden_peer`. These routes are not part of the public API
//! document.

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::routing::post;
use keel_core::Actor;
use keel_core::ids::AllocationId;
use keel_db::{Db, RequestMeta};
use keel_http::tls::TlsPeer;
use keel_http::{ApiError, Json, RequestId, TraceParent};
use keel_inventory::enrol::HostCapacity;
use keel_inventory::nodes::authenticated_node;
use serde::Deserialize;

use crate::ProvisioningError;
use crate::service::{Observed, allocation_observe};

pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
{
    Router::new()
        .route("/v1/agent/reports", post(agent_report))
        .route("/v1/agent/heartbeat", post(agent_heartbeat))
}

/// What an agent sends every heartbeat interval.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub capacity: HostCapacity,
    /// The workloads running on the node now.
    #[serde(default)]
    pub workloads: Vec<RunningWorkload>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningWorkload {
    pub allocation_id: AllocationId,
}

/// The most workloads one heartbeat may list.
const MAX_HEARTBEAT_WORKLOADS: usize = 10_000;

async fn agent_heartbeat(
    State(db): State<Db>,
    peer: TlsPeer,
    request_id: RequestId,
    trace: TraceParent,
    Json(heartbeat): Json<Heartbeat>,
) -> Result<StatusCode, ApiError> {
    let node = authenticated_node(&db, &peer).await?;
    if heartbeat.workloads.len() > MAX_HEARTBEAT_WORKLOADS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "a heartbeat lists at most 10000 workloads",
        ));
    }
    let meta = RequestMeta {
        request_id: request_id.0,
        actor: Actor::Node {
            host_id: node.host_id,
        },
        traceparent: Some(trace.0),
    };
    keel_inventory::nodes::record_heartbeat(&db, meta.clone(), &node, &heartbeat.capacity).await?;
    let listed: Vec<AllocationId> = heartbeat
        .workloads
        .iter()
        .map(|workload| workload.allocation_id)
        .collect();
    crate::reconcile::reconcile_host(&db, meta, node.host_id, &listed).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What an agent reports about one allocation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentReport {
    pub allocation_id: AllocationId,
    pub state: ReportedState,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReportedState {
    Running,
    Failed,
    Terminated,
}

async fn agent_report(
    State(db): State<Db>,
    peer: TlsPeer,
    request_id: RequestId,
    trace: TraceParent,
    Json(report): Json<AgentReport>,
) -> Result<StatusCode, ApiError> {
    let host = authenticated_node(&db, &peer).await?.host_id;
    let observed = match report.state {
        ReportedState::Running => Observed::Running,
        ReportedState::Terminated => Observed::Terminated,
        ReportedState::Failed => Observed::Failed(
            report
                .reason
                .filter(|reason| !reason.trim().is_empty())
                .map(|reason| reason.chars().take(500).collect())
                .unwrap_or_else(|| "the workload failed".to_owned()),
        ),
    };
    let meta = RequestMeta {
        request_id: request_id.0,
        actor: Actor::Node { host_id: host },
        traceparent: Some(trace.0),
    };
    let tx = db
        .begin_system(meta)
        .await
        .map_err(ProvisioningError::from)?;
    allocation_observe(tx, host, report.allocation_id, observed).await?;
    Ok(StatusCode::NO_CONTENT)
}
