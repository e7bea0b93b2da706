//! Allocation service functions. Each takes the transaction it works in
//! and commits it itself, so a transition, its audit row and its event are
//! always one unit.

use keel_auth::ProjectHandle;
use keel_core::ids::{AllocationId, HostId, ProjectId, TenantId};
use keel_core::page::{Page, Paginated};
use keel_db::{Audit, NewEvent, WriteTx};
use keel_inventory::service as inventory;
use serde::Serialize;
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::{AGGREGATE, Allocation, AllocationState, NewAllocation, ProvisioningError};

/// Why an allocation could not be placed.
pub const INSUFFICIENT_CAPACITY: &str = "insufficient_capacity";

pub(crate) const COLUMNS: &str =
    "id, tenant_id, project_id, name, flavor, region, command, state, failure_reason,
                       host_id, reserved, created_at, updated_at, version, attempts";

/// The payload of every `allocation.*` event: enough for metering without
/// reading any table (who, what size, where, and exactly when).
#[derive(Debug, Serialize)]
pub struct AllocationEvent<'a> {
    pub allocation_id: AllocationId,
    pub tenant_id: TenantId,
    pub project_id: ProjectId,
    pub state: AllocationState,
    pub previous_state: Option<AllocationState>,
    pub host_id: Option<HostId>,
    pub flavor: &'a str,
    pub region: &'a str,
    pub failure_reason: Option<&'a str>,
    /// When the allocation entered `state` (its row's `updated_at`).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

fn event_type(state: AllocationState) -> &'static str {
    match state {
        AllocationState::Requested => "allocation.requested",
        AllocationState::Scheduled => "allocation.scheduled",
        AllocationState::Provisioning => "allocation.provisioning",
        AllocationState::Running => "allocation.running",
        AllocationState::Stopping => "allocation.stopping",
        AllocationState::Stopped => "allocation.stopped",
        AllocationState::Starting => "allocation.starting",
        AllocationState::Terminating => "allocation.terminating",
        AllocationState::Terminated => "allocation.terminated",
        AllocationState::Failed => "allocation.failed",
        AllocationState::Lost => "allocation.lost",
    }
}

fn emit_state(tx: &mut WriteTx, allocation: &Allocation, previous: Option<AllocationState>) {
    tx.emit(NewEvent::new(
        event_type(allocation.state()),
        AGGREGATE,
        allocation.id.as_uuid(),
        allocation.version,
        Some(allocation.tenant_id),
        allocation.resource_name(),
        AllocationEvent {
            allocation_id: allocation.id,
            tenant_id: allocation.tenant_id,
            project_id: allocation.project_id,
            state: allocation.state(),
            previous_state: previous,
            host_id: allocation.host_id,
            flavor: &allocation.flavor,
            region: &allocation.region,
            failure_reason: allocation.failure_reason.as_deref(),
            at: allocation.updated_at,
        },
    ));
}

/// Moves an allocation to `next` if the lifecycle allows it, with an
/// optimistic version check, releasing its capacity when it stops holding
/// any; queues the event and an audit row. Returns the updated row.
pub async fn transition(
    tx: &mut WriteTx,
    allocation: &Allocation,
    next: AllocationState,
    failure_reason: Option<&str>,
) -> Result<Allocation, ProvisioningError> {
    let from = allocation.state();
    if !from.can_become(next) {
        return Err(ProvisioningError::InvalidTransition {
            from,
            action: next.as_str(),
        });
    }
    let release = allocation.reserved && !next.holds_capacity();
    if let (true, Some(host)) = (release, allocation.host_id) {
        let flavor = inventory::flavor_any(tx.conn(), &allocation.flavor).await?;
        inventory::capacity_release(tx.conn(), host, &flavor).await?;
    }
    // `clock_timestamp()`, not the transaction's start: events carry it as
    // the exact time of the change, and a transaction that waited on a lock
    // must not stamp an earlier time than the change before it.
    let updated: Option<Allocation> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE allocations SET state = $3, failure_reason = $4, reserved = reserved AND NOT $5,
                updated_at = clock_timestamp(), version = version + 1, attempts = 0,
                terminated_at = CASE WHEN $3 = 'terminated' THEN now() ELSE terminated_at END
         WHERE id = $1 AND version = $2
         RETURNING {COLUMNS}"
    )))
    .bind(allocation.id)
    .bind(allocation.version)
    .bind(next.as_str())
    .bind(if next == AllocationState::Failed {
        failure_reason
    } else {
        None
    })
    .bind(release)
    .fetch_optional(tx.conn())
    .await?;
    // A concurrent change won the race: the caller's view is stale.
    let updated = updated.ok_or(ProvisioningError::InvalidTransition {
        from,
        action: next.as_str(),
    })?;
    emit_state(tx, &updated, Some(from));
    tx.audit(
        Audit::new("allocation.transition", Some(updated.tenant_id), updated.resource_name()).with_details(
            serde_json::json!({ "from": from, "to": next, "failure_reason": updated.failure_reason }),
        ),
    );
    Ok(updated)
}

/// Creates an allocation and places it, in one transaction: `requested`,
/// then `scheduled` on a host with room (capacity reserved), or `failed`
/// with `insufficient_capacity` when none has room.
pub async fn allocation_create(
    mut tx: WriteTx,
    project: &ProjectHandle,
    new: NewAllocation,
) -> Result<Allocation, ProvisioningError> {
    let errors = new.validate();
    if !errors.is_empty() {
        return Err(ProvisioningError::Validation(errors));
    }
    let flavor = inventory::flavor_get(tx.conn(), &new.flavor)
        .await?
        .ok_or_else(|| ProvisioningError::UnknownFlavor(new.flavor.clone()))?;
    let region = new.region_or_default();
    match inventory::region_can_run(tx.conn(), region, &flavor).await? {
        None => return Err(ProvisioningError::UnknownRegion(region.to_owned())),
        Some(false) => {
            return Err(ProvisioningError::FlavorUnavailable {
                flavor: flavor.name,
                region: region.to_owned(),
            });
        }
        Some(true) => {}
    }
    refuse_if_held(&mut tx, project.tenant_id).await?;
    let id = AllocationId::new();
    let requested: Allocation = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO allocations (id, tenant_id, project_id, name, flavor, region, command, state)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'requested')
         RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(project.tenant_id)
    .bind(project.project_id)
    .bind(&new.name)
    .bind(&flavor.name)
    .bind(region)
    .bind(new.command_or_default())
    .fetch_one(tx.conn())
    .await?;
    emit_state(&mut tx, &requested, None);

    // The quota check and the placement come last, with as little as
    // possible after them: the tenant's quota lock and the chosen host's
    // row stay locked until the commit. A refused launch rolls back, so it
    // changes nothing.
    crate::quota::enforce(tx.conn(), project.tenant_id, project.project_id, &flavor).await?;
    let placed = match inventory::capacity_reserve(tx.conn(), region, &flavor).await? {
        Some(host) => {
            let scheduled: Allocation = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE allocations SET state = 'scheduled', host_id = $2, reserved = true,
                        updated_at = now(), version = version + 1
                 WHERE id = $1 RETURNING {COLUMNS}"
            )))
            .bind(id)
            .bind(host)
            .fetch_one(tx.conn())
            .await?;
            emit_state(&mut tx, &scheduled, Some(AllocationState::Requested));
            scheduled
        }
        None => {
            transition(
                &mut tx,
                &requested,
                AllocationState::Failed,
                Some(INSUFFICIENT_CAPACITY),
            )
            .await?
        }
    };
    let audit = Audit::new(
        "allocation.create",
        Some(project.tenant_id),
        placed.resource_name(),
    )
    .with_details(
        serde_json::json!({ "name": placed.name, "flavor": placed.flavor, "state": placed.state }),
    );
    tx.commit(audit).await?;
    Ok(placed)
}

/// The project's allocations, oldest first; terminated ones are left out
/// (they stay readable by id).
pub async fn allocation_list(
    conn: &mut PgConnection,
    project: &ProjectHandle,
    page: Page,
) -> Result<Paginated<Allocation>, ProvisioningError> {
    let rows: Vec<Allocation> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM allocations
         WHERE tenant_id = $1 AND project_id = $2 AND state <> 'terminated'
           AND ($3::uuid IS NULL OR id > $3)
         ORDER BY id LIMIT $4"
    )))
    .bind(project.tenant_id)
    .bind(project.project_id)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    Ok(Paginated::from_rows(rows, page, |allocation| {
        allocation.id.as_uuid()
    }))
}

/// One allocation of the project, or `NotFound`.
pub async fn allocation_get(
    conn: &mut PgConnection,
    project: &ProjectHandle,
    id: AllocationId,
) -> Result<Allocation, ProvisioningError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM allocations WHERE id = $1 AND tenant_id = $2 AND project_id = $3"
    )))
    .bind(id)
    .bind(project.tenant_id)
    .bind(project.project_id)
    .fetch_optional(conn)
    .await?
    .ok_or(ProvisioningError::NotFound)
}

/// Loads an allocation for update, by id alone: for system transactions
/// (worker, agent reports), which see every tenant.
pub async fn allocation_lock(
    conn: &mut PgConnection,
    id: AllocationId,
) -> Result<Option<Allocation>, ProvisioningError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM allocations WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Fails every allocation still on a revoked host (the `host.revoked`
/// event's consumer), each transition audited and evented like any other.
/// Returns how many. Idempotent: a second run finds none left.
pub async fn fail_allocations_of_revoked_host(
    tx: &mut WriteTx,
    host: keel_core::ids::HostId,
) -> Result<usize, ProvisioningError> {
    let allocations: Vec<Allocation> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM allocations
          WHERE host_id = $1 AND state NOT IN ('terminated', 'failed')
          ORDER BY id FOR UPDATE"
    )))
    .bind(host)
    .fetch_all(tx.conn())
    .await?;
    for allocation in &allocations {
        transition(
            tx,
            allocation,
            AllocationState::Failed,
            Some("the host was revoked by an operator"),
        )
        .await?;
    }
    Ok(allocations.len())
}

/// Asks for a running allocation to stop: it moves to `stopping`, the worker
/// tells its host, and it is `stopped` once the workload is gone. It keeps
/// its host and capacity. Stopping a stopping or stopped allocation changes
/// nothing; any other state is a conflict.
pub async fn allocation_stop(
    mut tx: WriteTx,
    project: &ProjectHandle,
    id: AllocationId,
    expected_version: Option<i64>,
) -> Result<Allocation, ProvisioningError> {
    let current = locked_for_change(&mut tx, project, id, expected_version).await?;
    if matches!(
        current.state(),
        AllocationState::Stopping | AllocationState::Stopped
    ) {
        return Ok(current);
    }
    let stopping = transition(&mut tx, &current, AllocationState::Stopping, None).await?;
    tx.commit(Audit::new(
        "allocation.stop",
        Some(project.tenant_id),
        stopping.resource_name(),
    ))
    .await?;
    Ok(stopping)
}

/// Asks for a stopped allocation to start again, on its host: it moves to
/// `starting`, the worker sends the start, and the agent's report makes it
/// `running`. Starting a starting or running allocation changes nothing;
/// any other state is a conflict.
pub async fn allocation_start(
    mut tx: WriteTx,
    project: &ProjectHandle,
    id: AllocationId,
    expected_version: Option<i64>,
) -> Result<Allocation, ProvisioningError> {
    let current = locked_for_change(&mut tx, project, id, expected_version).await?;
    if matches!(
        current.state(),
        AllocationState::Starting | AllocationState::Running
    ) {
        return Ok(current);
    }
    // A drain waits for this host to empty: nothing starts there again.
    let draining: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM hosts WHERE id = $1
                         AND (state = 'draining' OR state_before_offline = 'draining'))",
    )
    .bind(current.host_id)
    .fetch_one(tx.conn())
    .await?;
    if draining && current.state() == AllocationState::Stopped {
        return Err(ProvisioningError::HostDraining);
    }
    // A start the state allows waits while billing holds the tenant's
    // launches; one it does not allow is refused as such.
    if current.state().can_become(AllocationState::Starting) {
        refuse_if_held(&mut tx, project.tenant_id).await?;
    }
    let starting = transition(&mut tx, &current, AllocationState::Starting, None).await?;
    tx.commit(Audit::new(
        "allocation.start",
        Some(project.tenant_id),
        starting.resource_name(),
    ))
    .await?;
    Ok(starting)
}

/// Launching and starting wait while billing holds the tenant's launches
/// (its prepaid credit ran out; `launch_holds`, kept by the consumer from
/// billing's events).
async fn refuse_if_held(
    tx: &mut WriteTx,
    tenant_id: keel_core::ids::TenantId,
) -> Result<(), ProvisioningError> {
    let reason: Option<String> =
        sqlx::query_scalar("SELECT reason FROM launch_holds WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_optional(tx.conn())
            .await?;
    match reason {
        Some(reason) => Err(ProvisioningError::LaunchesHeld(reason)),
        None => Ok(()),
    }
}

/// Stops the tenant's running allocations (billing asked: the tenant's
/// credit ran out past its grace). One that is still starting is stopped
/// when billing asks again, once it runs (billing repeats the request
/// while a suspended tenant has a run open).
pub async fn stop_running_allocations_of_tenant(
    tx: &mut WriteTx,
    tenant_id: keel_core::ids::TenantId,
) -> Result<usize, ProvisioningError> {
    let allocations: Vec<Allocation> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM allocations
          WHERE tenant_id = $1 AND state = 'running'
          ORDER BY id FOR UPDATE"
    )))
    .bind(tenant_id)
    .fetch_all(tx.conn())
    .await?;
    for allocation in &allocations {
        transition(tx, allocation, AllocationState::Stopping, None).await?;
    }
    Ok(allocations.len())
}

/// The allocation, locked, after the tenant check and the `If-Match`.
async fn locked_for_change(
    tx: &mut WriteTx,
    project: &ProjectHandle,
    id: AllocationId,
    expected_version: Option<i64>,
) -> Result<Allocation, ProvisioningError> {
    let visible = allocation_get(tx.conn(), project, id).await?;
    let current = allocation_lock(tx.conn(), visible.id)
        .await?
        .ok_or(ProvisioningError::NotFound)?;
    if expected_version.is_some_and(|version| version != current.version) {
        return Err(ProvisioningError::PreconditionFailed);
    }
    Ok(current)
}

/// Asks for an allocation to be terminated: it moves to `terminating` and
/// the worker tells its host. Terminating an allocation that is already
/// terminating changes nothing; one that is terminated is a conflict.
pub async fn allocation_terminate(
    mut tx: WriteTx,
    project: &ProjectHandle,
    id: AllocationId,
    expected_version: Option<i64>,
) -> Result<Allocation, ProvisioningError> {
    let current = locked_for_change(&mut tx, project, id, expected_version).await?;
    if current.state() == AllocationState::Terminating {
        return Ok(current);
    }
    let terminating = transition(&mut tx, &current, AllocationState::Terminating, None).await?;
    // Nothing runs for an allocation that never reached a host, or whose
    // capacity is already released: it is terminated at once.
    let result = if terminating.host_id.is_none() || !terminating.reserved {
        transition(&mut tx, &terminating, AllocationState::Terminated, None).await?
    } else {
        terminating
    };
    tx.commit(Audit::new(
        "allocation.terminate",
        Some(project.tenant_id),
        result.resource_name(),
    ))
    .await?;
    Ok(result)
}

/// What an agent observed about one of its allocations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    Running,
    /// The workload ended on its own or could not start.
    Failed(String),
    /// The workload was stopped on request and is gone.
    Terminated,
}

/// Applies an agent's report in a system transaction. A node can only
/// report on allocations placed on it (others are `NotFound`). A report
/// that the lifecycle no longer allows (it arrived late) changes nothing.
pub async fn allocation_observe(
    mut tx: WriteTx,
    host: HostId,
    id: AllocationId,
    observed: Observed,
) -> Result<Option<Allocation>, ProvisioningError> {
    let current = allocation_lock(tx.conn(), id)
        .await?
        .filter(|allocation| allocation.host_id == Some(host))
        .ok_or(ProvisioningError::NotFound)?;
    let (next, reason) = match &observed {
        Observed::Running => (AllocationState::Running, None),
        // A workload that died while being terminated is simply gone, and
        // one that ended while being stopped is stopped.
        Observed::Failed(_) if current.state() == AllocationState::Terminating => {
            (AllocationState::Terminated, None)
        }
        Observed::Failed(_) | Observed::Terminated
            if current.state() == AllocationState::Stopping =>
        {
            (AllocationState::Stopped, None)
        }
        // A late or repeated report of the run that was stopped.
        Observed::Failed(_) | Observed::Terminated
            if current.state() == AllocationState::Stopped =>
        {
            tracing::info!(allocation = %id, observed = ?observed, "ignoring a report about a stopped allocation");
            return Ok(None);
        }
        Observed::Failed(reason) => (AllocationState::Failed, Some(reason.as_str())),
        Observed::Terminated => (AllocationState::Terminated, None),
    };
    if current.state() == next || !current.state().can_become(next) {
        tracing::info!(allocation = %id, state = %current.state(), observed = ?observed, "ignoring a stale report");
        return Ok(None);
    }
    let updated = transition(&mut tx, &current, next, reason).await?;
    tx.commit(Audit::new(
        "allocation.observe",
        Some(updated.tenant_id),
        updated.resource_name(),
    ))
    .await?;
    Ok(Some(updated))
}

/// How long a terminated allocation stays readable by id.
pub const TERMINATED_RETENTION: time::Duration = time::Duration::days(7);

/// Deletes allocations terminated longer than [`TERMINATED_RETENTION`] ago
/// (they already left every list; now `GET` by id is `404` too). Their
/// audit rows and events stay. Returns how many went.
pub async fn purge_terminated(
    db: &keel_db::Db,
    meta: keel_db::RequestMeta,
) -> Result<u64, ProvisioningError> {
    let mut tx = db.begin_system(meta).await?;
    let purged = sqlx::query(
        "DELETE FROM allocations
          WHERE id IN (SELECT id FROM allocations
                        WHERE state = 'terminated'
                          AND terminated_at < now() - make_interval(secs => $1)
                        ORDER BY terminated_at LIMIT 1000 FOR UPDATE SKIP LOCKED)",
    )
    .bind(TERMINATED_RETENTION.as_seconds_f64())
    .execute(tx.conn())
    .await?
    .rows_affected();
    if purged == 0 {
        tx.rollback().await?;
        return Ok(0);
    }
    tx.commit(
        Audit::new(
            "allocation.purge",
            None,
            keel_core::ResourceName::new(None, None, None, "platform", "allocations"),
        )
        .with_details(serde_json::json!({ "purged": purged })),
    )
    .await?;
    Ok(purged)
}
