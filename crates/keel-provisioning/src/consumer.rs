//! The provisioning consumer: turns allocation events into signed tasks
//! for the node agent of the allocation's host.
//!
//! - `allocation.scheduled` → the allocation moves to `provisioning` and
//!   its host is sent a signed `start_workload` task;
//! - `allocation.starting` (a stopped allocation started again) → its host
//!   is sent `start_workload`;
//! - `allocation.stopping` and `allocation.terminating` → its host is sent
//!   a signed `stop_workload` (the agent's report then makes it `stopped`
//!   or `terminated`).
//!
//! The agent reports the outcome (`running`, `terminated`, `failed`) to the
//! api. Every delivery can run more than once, so each step first looks at
//! the allocation's current state: a task is only sent while the state
//! still asks for it, and agents execute tasks idempotently per allocation.
//! Each retry signs a new task with the host's next sequence number (the
//! agent refuses a sequence it has seen).
//!
//! # Out of order, overtaken
//!
//! Sequence numbers are taken in order in the database, but deliveries run
//! concurrently (in this worker and in others), so a host's tasks can reach
//! its agent out of order. The agent waits briefly for a missing lower
//! number before it accepts a higher one; a task that arrives after all
//! (the agent refuses it as `replayed`) is decided again at once — state
//! re-read, new number — rather than after the delivery's backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use keel_core::Actor;
use keel_core::ids::{AllocationId, HostId, TaskId};
use keel_db::{Audit, Db, RequestMeta};
use keel_outbox::{Consumer, DeliveredEvent, HandlerError};
use keel_task::{Operation, TaskPayload};
use std::sync::Arc;

use crate::signing::SignerRing;
use time::OffsetDateTime;

use crate::service::{allocation_lock, transition};
use crate::{AllocationState, ProvisioningError};

pub const CONSUMER: &str = "provisioning";
/// How long a signed task stays valid.
pub(crate) const TASK_LIFETIME_SECS: i64 = 300;

/// The worker's credentials towards node agents.
pub struct WorkerCredentials {
    pub signers: Arc<SignerRing>,
    pub node_ca_pem: String,
    /// The worker's certificate, re-issued while it runs.
    pub identity: Arc<keel_pki::HotIdentity>,
}

pub struct ProvisioningConsumer {
    db: Db,
    credentials: WorkerCredentials,
    /// One HTTPS client per host: each verifies that host's node identity.
    clients: Mutex<HashMap<HostId, reqwest::Client>>,
}

/// How often one delivery decides its task again when the agent had
/// already accepted a later one.
const OVERTAKEN_RETRIES: u32 = 3;

/// What one attempt at an event's task came to.
enum Attempt {
    /// The task was delivered, refused for good, or not needed.
    Done,
    /// The agent had accepted a later sequence number already: decide again.
    Overtaken(HandlerError),
}

impl ProvisioningConsumer {
    pub fn new(db: Db, credentials: WorkerCredentials) -> Self {
        Self {
            db,
            credentials,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client_for(&self, host: HostId) -> Result<reqwest::Client, HandlerError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| HandlerError::new("client cache poisoned"))?;
        if let Some(client) = clients.get(&host) {
            return Ok(client.clone());
        }
        let roots =
            keel_pki::certs_from_pem(&self.credentials.node_ca_pem).map_err(HandlerError::new)?;
        let tls = keel_pki::client_config_for_node_with_identity(
            &roots,
            host.as_uuid(),
            Arc::clone(&self.credentials.identity),
        )
        .map_err(HandlerError::new)?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(HandlerError::new)?;
        clients.insert(host, client.clone());
        Ok(client)
    }

    async fn on_event(&self, event: &DeliveredEvent) -> Result<(), HandlerError> {
        if event.event_type == "host.revoked" {
            return self.on_host_revoked(event).await;
        }
        if let Some(step) = BillingStep::of(&event.event_type) {
            return self.on_billing_step(event, step).await;
        }
        let mut attempt = 1;
        loop {
            let outcome = if event.event_type == ORPHAN_EVENT {
                self.on_orphan(event).await?
            } else {
                self.on_allocation_event(event).await?
            };
            match outcome {
                Attempt::Done => return Ok(()),
                Attempt::Overtaken(error) if attempt >= OVERTAKEN_RETRIES => return Err(error),
                Attempt::Overtaken(error) => {
                    tracing::info!(%error, attempt, "a later task reached the host first; deciding again");
                    attempt += 1;
                }
            }
        }
    }

    async fn on_allocation_event(&self, event: &DeliveredEvent) -> Result<Attempt, HandlerError> {
        let allocation_id = AllocationId::from(event.aggregate_id);
        let mut tx = self
            .db
            .begin_system(worker_meta(event))
            .await
            .map_err(HandlerError::new)?;
        let Some(allocation) = allocation_lock(tx.conn(), allocation_id)
            .await
            .map_err(HandlerError::new)?
        else {
            return Ok(Attempt::Done);
        };
        let Some(host) = allocation.host_id else {
            return Ok(Attempt::Done);
        };
        let stop = Operation::StopWorkload {
            allocation_id: allocation.id.as_uuid(),
        };
        let (allocation, operation) = match (event.event_type.as_str(), allocation.state()) {
            ("allocation.scheduled" | RETRY_EVENT, AllocationState::Scheduled) => {
                let provisioning =
                    transition(&mut tx, &allocation, AllocationState::Provisioning, None)
                        .await
                        .map_err(HandlerError::new)?;
                let operation = start_operation(&mut tx, &provisioning).await?;
                (provisioning, operation)
            }
            // A retry after the move to provisioning, or a stopped
            // allocation starting again on its host: send the start (again).
            ("allocation.scheduled" | RETRY_EVENT, AllocationState::Provisioning)
            | ("allocation.starting" | RETRY_EVENT, AllocationState::Starting) => {
                let operation = start_operation(&mut tx, &allocation).await?;
                (allocation, operation)
            }
            ("allocation.stopping" | RETRY_EVENT, AllocationState::Stopping)
            | ("allocation.terminating" | RETRY_EVENT, AllocationState::Terminating) => {
                (allocation, stop)
            }
            // The allocation moved on: this event asks for nothing now.
            _ => return Ok(Attempt::Done),
        };
        let order = TaskOrder {
            host,
            tenant: Some(allocation.tenant_id),
            resource: allocation.resource_name(),
            operation,
            refusal: RefusalIs::Retried,
        };
        self.issue(tx, order, event).await
    }

    /// Signs `operation` for `host` with its next sequence number, commits
    /// (with the caller's changes and a `task.issue` audit row), then sends
    /// it to the agent.
    async fn issue(
        &self,
        mut tx: keel_db::WriteTx,
        order: TaskOrder,
        event: &DeliveredEvent,
    ) -> Result<Attempt, HandlerError> {
        let TaskOrder {
            host,
            tenant,
            resource,
            operation,
            refusal,
        } = order;
        let (seq, epoch, agent_url): (i64, i64, String) = sqlx::query_as(
            "UPDATE hosts SET task_seq = task_seq + 1 WHERE id = $1 AND revoked_at IS NULL
             RETURNING task_seq, enrolment_epoch, agent_url",
        )
        .bind(host)
        .fetch_optional(tx.conn())
        .await
        .map_err(HandlerError::new)?
        .ok_or_else(|| HandlerError::new("the allocation's host is revoked"))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let allocation_id = operation.allocation_id();
        let payload = TaskPayload {
            task_id: TaskId::new().as_uuid(),
            tenant_id: tenant.map(|tenant| tenant.as_uuid()),
            node_id: host.as_uuid(),
            enrolment_epoch: u64::try_from(epoch).unwrap_or_default(),
            seq: u64::try_from(seq).unwrap_or_default(),
            issued_at: now,
            not_before: now,
            expires_at: now + TASK_LIFETIME_SECS,
            traceparent: onward_trace(event),
            operation,
        };
        let envelope = self
            .credentials
            .signers
            .sign(&payload)
            .map_err(HandlerError::new)?;
        let audit = Audit::new("task.issue", tenant, resource).with_details(
            serde_json::json!({ "task_id": payload.task_id, "host_id": host, "seq": seq, "operation": payload.operation }),
        );
        // The state change and the sequence number are committed before the
        // task leaves: a crash after this point re-sends with a new sequence.
        tx.commit(audit).await.map_err(HandlerError::new)?;

        let response = self
            .client_for(host)?
            .post(format!("{agent_url}/v1/tasks"))
            .header("content-type", "application/json")
            .body(envelope)
            .send()
            .await
            .map_err(|error| HandlerError(format!("sending the task to {agent_url}: {error}")))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            let error = HandlerError(format!("the agent refused the task ({status}): {body}"));
            if refusal == RefusalIs::Final && status.is_client_error() {
                tracing::warn!(allocation = %allocation_id, host = %host, %status, %body, "the agent refused the task; not retried");
                return Ok(Attempt::Done);
            }
            if status == reqwest::StatusCode::UNPROCESSABLE_ENTITY
                && refusal_code(&body) == Some("replayed")
            {
                return Ok(Attempt::Overtaken(error));
            }
            return Err(error);
        }
        tracing::info!(allocation = %allocation_id, host = %host, seq, "task delivered");
        Ok(Attempt::Done)
    }

    /// A host runs a workload Keel does not want there (its allocation
    /// failed, was terminated or purged while the host was away, or is not
    /// this host's): it is told to stop it. Nothing else changes.
    async fn on_orphan(&self, event: &DeliveredEvent) -> Result<Attempt, HandlerError> {
        let orphan: OrphanWorkload =
            serde_json::from_value(event.payload.clone()).map_err(HandlerError::new)?;
        let mut tx = self
            .db
            .begin_system(worker_meta(event))
            .await
            .map_err(HandlerError::new)?;
        // Still unwanted? The row stays locked until the task is issued, so
        // a start of it again cannot take a sequence number in between.
        let allocation = allocation_lock(tx.conn(), orphan.allocation_id)
            .await
            .map_err(HandlerError::new)?;
        let wanted = allocation.is_some_and(|allocation| {
            allocation.host_id == Some(orphan.host_id)
                && matches!(
                    allocation.state(),
                    AllocationState::Provisioning
                        | AllocationState::Running
                        | AllocationState::Starting
                        | AllocationState::Lost
                )
        });
        let host_live: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM hosts WHERE id = $1 AND revoked_at IS NULL)",
        )
        .bind(orphan.host_id)
        .fetch_one(tx.conn())
        .await
        .map_err(HandlerError::new)?;
        // A revoked host is told nothing more.
        if wanted || !host_live {
            return Ok(Attempt::Done);
        }
        let order = TaskOrder {
            host: orphan.host_id,
            tenant: None,
            resource: keel_core::ResourceName::new(None, None, None, "host", orphan.host_id),
            operation: Operation::StopWorkload {
                allocation_id: orphan.allocation_id.as_uuid(),
            },
            refusal: RefusalIs::Final,
        };
        self.issue(tx, order, event).await
    }
}

/// A task to sign and send to one host.
struct TaskOrder {
    host: HostId,
    /// The tenant the task names (none for an orphan's stop).
    tenant: Option<keel_core::ids::TenantId>,
    /// What its `task.issue` audit row names.
    resource: keel_core::ResourceName,
    operation: Operation,
    refusal: RefusalIs,
}

/// What an agent's refusal of a task (a 4xx) means for its delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefusalIs {
    /// Tried again (the allocation's own steps: a refusal is a bug or a
    /// race that a later, freshly signed task resolves).
    Retried,
    /// Given up (orphan stops: the next heartbeat asks again if needed).
    Final,
}

/// The `code` of an agent's error answer.
fn refusal_code(body: &str) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Refusal<'a> {
        code: &'a str,
    }
    serde_json::from_str::<Refusal<'_>>(body)
        .ok()
        .map(|refusal| refusal.code)
}

/// What the worker acts as, for one delivered event.
fn worker_meta(event: &DeliveredEvent) -> RequestMeta {
    RequestMeta {
        request_id: event.request_id.clone(),
        actor: Actor::system("worker"),
        traceparent: onward_trace(event),
    }
}

/// The trace position the worker hands on (in the events it writes and the
/// tasks it signs): its delivery span when traces are exported, else the
/// event's own, so the trace id still ties the three processes' logs.
fn onward_trace(event: &DeliveredEvent) -> Option<String> {
    keel_telemetry::current_traceparent().or_else(|| event.traceparent.clone())
}

/// The event that asks for a transitional state's task again
/// (`crate::reconcile`).
pub const RETRY_EVENT: &str = "allocation.retry";
/// The event that reports a workload a host runs without being asked to.
pub const ORPHAN_EVENT: &str = "host.orphan_workload";

/// The payload of [`ORPHAN_EVENT`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct OrphanWorkload {
    pub host_id: HostId,
    pub allocation_id: AllocationId,
}

/// Billing's events about a prepaid tenant whose credit ran out.
pub const LAUNCHES_STOPPED: &str = "billing.launches_stopped";
pub const LAUNCHES_RESUMED: &str = "billing.launches_resumed";
pub const TENANT_SUSPENDED: &str = "billing.tenant_suspended";

#[derive(Clone, Copy, Debug)]
enum BillingStep {
    HoldLaunches,
    ResumeLaunches,
    StopRunning,
}

impl BillingStep {
    fn of(event_type: &str) -> Option<Self> {
        match event_type {
            LAUNCHES_STOPPED => Some(BillingStep::HoldLaunches),
            LAUNCHES_RESUMED => Some(BillingStep::ResumeLaunches),
            TENANT_SUSPENDED => Some(BillingStep::StopRunning),
            _ => None,
        }
    }
}

impl ProvisioningConsumer {
    /// Billing's steps when a prepaid tenant's credit runs out (events of
    /// the tenant's billing account, delivered in order): hold launches
    /// (and starts), lift the hold, stop what runs (the hold stays). Each
    /// is idempotent, as a redelivery needs.
    async fn on_billing_step(
        &self,
        event: &DeliveredEvent,
        step: BillingStep,
    ) -> Result<(), HandlerError> {
        let tenant = event
            .tenant_id
            .ok_or_else(|| HandlerError("a billing event names no tenant".to_owned()))?;
        let mut tx = self
            .db
            .begin_system(worker_meta(event))
            .await
            .map_err(HandlerError::new)?;
        let resource = keel_core::ResourceName::tenant(tenant);
        let audit = match step {
            BillingStep::HoldLaunches | BillingStep::StopRunning => {
                sqlx::query(
                    "INSERT INTO launch_holds (tenant_id, reason, source_event_id)
                     VALUES ($1, 'prepaid credit exhausted', $2)
                     ON CONFLICT (tenant_id) DO NOTHING",
                )
                .bind(tenant)
                .bind(event.id.as_uuid())
                .execute(tx.conn())
                .await
                .map_err(HandlerError::new)?;
                if let BillingStep::StopRunning = step {
                    let stopped =
                        crate::service::stop_running_allocations_of_tenant(&mut tx, tenant)
                            .await
                            .map_err(HandlerError::new)?;
                    Audit::new("tenant.suspend_settle", Some(tenant), resource)
                        .with_details(serde_json::json!({ "allocations_stopped": stopped }))
                } else {
                    Audit::new("tenant.launches_hold", Some(tenant), resource)
                }
            }
            BillingStep::ResumeLaunches => {
                sqlx::query("DELETE FROM launch_holds WHERE tenant_id = $1")
                    .bind(tenant)
                    .execute(tx.conn())
                    .await
                    .map_err(HandlerError::new)?;
                Audit::new("tenant.launches_resume", Some(tenant), resource)
            }
        };
        tx.commit(audit).await.map_err(HandlerError::new)
    }

    /// A revoked host runs nothing more for anyone: its allocations fail,
    /// which releases what they held.
    async fn on_host_revoked(&self, event: &DeliveredEvent) -> Result<(), HandlerError> {
        let host = HostId::from(event.aggregate_id);
        let mut tx = self
            .db
            .begin_system(worker_meta(event))
            .await
            .map_err(HandlerError::new)?;
        let failed = crate::service::fail_allocations_of_revoked_host(&mut tx, host)
            .await
            .map_err(HandlerError::new)?;
        tx.commit(
            Audit::new(
                "host.revoke_settle",
                None,
                keel_core::ResourceName::new(None, None, None, "host", host),
            )
            .with_details(serde_json::json!({ "allocations_failed": failed })),
        )
        .await
        .map_err(HandlerError::new)?;
        tracing::info!(host = %host, failed, "failed the allocations of a revoked host");
        Ok(())
    }
}

async fn start_operation(
    tx: &mut keel_db::WriteTx,
    allocation: &crate::Allocation,
) -> Result<Operation, HandlerError> {
    let flavor = keel_inventory::service::flavor_any(tx.conn(), &allocation.flavor)
        .await
        .map_err(|error| HandlerError::new(ProvisioningError::from(error)))?;
    Ok(Operation::StartWorkload {
        allocation_id: allocation.id.as_uuid(),
        command: allocation.command.clone(),
        vcpus: u32::try_from(flavor.vcpus).unwrap_or(1),
        memory_mib: u64::try_from(flavor.memory_mib).unwrap_or(1),
    })
}

impl Consumer for ProvisioningConsumer {
    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn wants(&self, event_type: &str) -> bool {
        matches!(
            event_type,
            "allocation.scheduled"
                | "allocation.starting"
                | "allocation.stopping"
                | "allocation.terminating"
                | RETRY_EVENT
                | ORPHAN_EVENT
                | "host.revoked"
                | LAUNCHES_STOPPED
                | LAUNCHES_RESUMED
                | TENANT_SUSPENDED
        )
    }

    fn handle<'a>(&'a self, event: &'a DeliveredEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.on_event(event))
    }
}
