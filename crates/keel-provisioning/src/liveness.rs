//! Host liveness: hosts that stop sending heartbeats go `offline` and their
//! allocations `lost`; what a returning host reports brings its allocations
//! back.
//!
//! - [`mark_silent_hosts_offline`] (the worker, every few seconds): a host
//!   not heard from for the grace period goes `offline` — remembering the
//!   state it had — and every allocation on it that was running becomes
//!   `lost`, each transition audited and evented (stopped ones run nothing
//!   and stay as they are; `provisioning` and `starting` ones are left to
//!   the delivery of their start task — or, once the task has expired
//!   while the host is still offline, they become `lost` too). Lost
//!   allocations keep their capacity: the host may well still run them,
//!   behind a broken link. What happens to allocations lost for long is
//!   [`crate::reconcile`]'s decision.
//! - What a returning host runs is reconciled by
//!   [`crate::reconcile::reconcile_host`] on every heartbeat.
//!
//! Idempotent: a second sweep finds nothing; a heartbeat that lists what
//! is already running changes nothing.

use keel_core::ids::HostId;
use keel_db::{Audit, Db, NewEvent, RequestMeta};
use time::Duration;

use crate::service::transition;
use crate::{Allocation, AllocationState, ProvisioningError};
use keel_inventory::nodes::hosts_resource;

const COLUMNS: &str = crate::service::COLUMNS;

/// Marks hosts silent for longer than `grace` offline and their
/// allocations lost. Returns how many hosts went offline.
///
/// One transaction per host, which locks the host's allocations before the
/// host row — the order every allocation transition takes (allocation,
/// then its host's capacity) — and re-checks the silence under the lock, so
/// a heartbeat that just arrived, or another worker sweeping at once,
/// leaves the host alone.
pub async fn mark_silent_hosts_offline(
    db: &Db,
    meta: RequestMeta,
    grace: Duration,
) -> Result<usize, ProvisioningError> {
    let mut tx = db.begin_bookkeeping().await?;
    let candidates: Vec<HostId> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM hosts WHERE {SILENT} ORDER BY id"
    )))
    .bind(grace.as_seconds_f64())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut offline = 0;
    for host in candidates {
        if mark_offline(db, meta.clone(), host, grace).await? {
            offline += 1;
        }
    }
    lose_expired_starts(db, meta).await?;
    Ok(offline)
}

/// `provisioning` and `starting` allocations on an offline host whose start task has
/// expired (the agent would refuse it now, so its delivery settles nothing)
/// become `lost`, like the host's other allocations.
async fn lose_expired_starts(db: &Db, meta: RequestMeta) -> Result<usize, ProvisioningError> {
    let mut tx = db.begin_system(meta).await?;
    let expired: Vec<Allocation> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM allocations
          WHERE state IN ('provisioning', 'starting')
            AND updated_at < now() - make_interval(secs => $1)
            AND host_id IN (SELECT id FROM hosts WHERE state = 'offline')
          ORDER BY id FOR UPDATE SKIP LOCKED"
    )))
    .bind(crate::consumer::TASK_LIFETIME_SECS as f64)
    .fetch_all(tx.conn())
    .await?;
    if expired.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    for allocation in &expired {
        transition(&mut tx, allocation, AllocationState::Lost, None).await?;
    }
    tx.commit(
        Audit::new("allocation.start_expired", None, hosts_resource())
            .with_details(serde_json::json!({ "lost": expired.len() })),
    )
    .await?;
    tracing::warn!(
        lost = expired.len(),
        "start tasks to offline hosts expired: allocations lost"
    );
    Ok(expired.len())
}

/// A host that is neither offline nor revoked and was last seen longer than
/// `$1` seconds ago.
const SILENT: &str = "state <> 'offline' AND revoked_at IS NULL \
                      AND last_seen_at < now() - make_interval(secs => $1)";

/// Takes one silent host offline (see [`mark_silent_hosts_offline`]);
/// `false` if it is not silent any more.
async fn mark_offline(
    db: &Db,
    meta: RequestMeta,
    host: HostId,
    grace: Duration,
) -> Result<bool, ProvisioningError> {
    let mut tx = db.begin_system(meta).await?;
    // `provisioning` and `starting` allocations are left alone: their start
    // task is still being delivered (and retried), which settles them
    // either way. Nothing runs for stopping and stopped ones.
    let allocations: Vec<Allocation> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM allocations
          WHERE host_id = $1 AND state = 'running'
          ORDER BY id FOR UPDATE"
    )))
    .bind(host)
    .fetch_all(tx.conn())
    .await?;
    let went_offline: Option<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE hosts SET state_before_offline = state, state = 'offline', version = version + 1
          WHERE id = $2 AND {SILENT}
          RETURNING region, version"
    )))
    .bind(grace.as_seconds_f64())
    .bind(host)
    .fetch_optional(tx.conn())
    .await?;
    let Some((region, version)) = went_offline else {
        tx.rollback().await?;
        return Ok(false);
    };
    let resource = keel_inventory::enrol::host_resource(&region, host);
    tx.emit(NewEvent::new(
        "host.offline",
        "host",
        host.as_uuid(),
        version,
        None,
        resource.clone(),
        serde_json::json!({ "host_id": host, "grace_secs": grace.whole_seconds() }),
    ));
    for allocation in &allocations {
        transition(&mut tx, allocation, AllocationState::Lost, None).await?;
    }
    tx.commit(
        Audit::new("host.offline", None, resource)
            .with_details(serde_json::json!({ "lost": allocations.len() })),
    )
    .await?;
    tracing::warn!(host = %host, lost = allocations.len(), "host went silent: offline");
    Ok(true)
}
