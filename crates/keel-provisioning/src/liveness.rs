//! Host liveness: hosts that stop sending heartbeats go `offline` and their
//! allocations `lost`; what a returning host reports brings its allocations
//! back.
//!
//! - [`mark_silent_hosts_offline`] (the worker, every few seconds): a host
//!   not heard from for the grace period goes `offline` — remembering the
//!   state it had — and every allocation on it that was provisioning,
//!   running, stopping or stopped becomes `lost`, each transition audited
//!   and evented. Lost allocations keep their capacity: the host may well
//!   still run them, behind a broken link. (What happens to allocations
//!   lost for long is the lifecycle's decision, not this module's.)
//! - [`reconcile_reported`] (every heartbeat): an allocation the node says
//!   it runs and that is `lost` or still `provisioning` here becomes
//!   `running` (the report that said so may have been lost).
//!
//! Idempotent: a second sweep finds nothing; a heartbeat that lists what
//! is already running changes nothing.

use keel_core::ResourceName;
use keel_core::ids::{AllocationId, HostId};
use keel_db::{Audit, Db, NewEvent, RequestMeta};
use time::Duration;

use crate::service::{Observed, allocation_observe, transition};
use crate::{Allocation, AllocationState, ProvisioningError};

const COLUMNS: &str = crate::service::COLUMNS;

/// Marks hosts silent for longer than `grace` offline and their
/// allocations lost. Returns how many hosts went offline.
pub async fn mark_silent_hosts_offline(
    db: &Db,
    meta: RequestMeta,
    grace: Duration,
) -> Result<usize, ProvisioningError> {
    let mut tx = db.begin_system(meta).await?;
    let silent: Vec<(HostId, String, i64)> = sqlx::query_as(
        "UPDATE hosts SET state_before_offline = state, state = 'offline', version = version + 1
          WHERE id IN (SELECT id FROM hosts
                        WHERE state <> 'offline' AND revoked_at IS NULL
                          AND last_seen_at < now() - make_interval(secs => $1)
                        ORDER BY id FOR UPDATE SKIP LOCKED)
          RETURNING id, region, version",
    )
    .bind(grace.as_seconds_f64())
    .fetch_all(tx.conn())
    .await?;
    if silent.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    for (host, region, version) in &silent {
        let resource = keel_inventory::enrol::host_resource(region, *host);
        tx.emit(NewEvent::new(
            "host.offline",
            "host",
            host.as_uuid(),
            *version,
            None,
            resource.clone(),
            serde_json::json!({ "host_id": host, "grace_secs": grace.whole_seconds() }),
        ));
        tx.audit(Audit::new("host.offline", None, resource));
        let allocations: Vec<Allocation> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM allocations
              WHERE host_id = $1 AND state IN ('provisioning', 'running', 'stopping', 'stopped')
              ORDER BY id FOR UPDATE"
        )))
        .bind(host)
        .fetch_all(tx.conn())
        .await?;
        for allocation in &allocations {
            transition(&mut tx, allocation, AllocationState::Lost, None).await?;
        }
        tracing::warn!(host = %host, lost = allocations.len(), "host went silent: offline");
    }
    let count = silent.len();
    tx.commit(
        Audit::new(
            "host.liveness_sweep",
            None,
            ResourceName::new(None, None, None, "platform", "hosts"),
        )
        .with_details(serde_json::json!({ "offline": count })),
    )
    .await?;
    Ok(count)
}

/// Brings the allocations a node reports running back to `running` where
/// they are `lost` or `provisioning` here.
pub async fn reconcile_reported(
    db: &Db,
    meta: RequestMeta,
    host: HostId,
    listed: &[AllocationId],
) -> Result<usize, ProvisioningError> {
    if listed.is_empty() {
        return Ok(0);
    }
    let mut tx = db.begin_bookkeeping().await?;
    let behind: Vec<AllocationId> = sqlx::query_scalar(
        "SELECT id FROM allocations
          WHERE host_id = $1 AND id = ANY($2) AND state IN ('lost', 'provisioning')",
    )
    .bind(host)
    .bind(listed)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut changed = 0;
    for id in behind {
        let tx = db.begin_system(meta.clone()).await?;
        if allocation_observe(tx, host, id, Observed::Running)
            .await?
            .is_some()
        {
            changed += 1;
        }
    }
    Ok(changed)
}
