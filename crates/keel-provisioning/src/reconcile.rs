//! The reconciler: no allocation stays in a transitional state forever, and
//! what hosts run converges on what Keel wants.
//!
//! Two halves, both idempotent:
//!
//! - [`reconcile_deadlines`] (the worker's timer, and `POST
//!   /v1/admin/reconcile` on demand): every transitional state has a
//!   deadline ([`Deadlines`]). Past it, the step is tried again
//!   (`allocation.retry`: the worker signs and sends the task anew) up to
//!   `attempts` times; then a start gives up — `failed`, with a reason the
//!   tenant reads, which releases the capacity. A start task still valid
//!   then may yet reach the agent: the workload it starts is an orphan the
//!   next heartbeat reports, and the host is told to stop it. While an
//!   earlier delivery of the allocation's step is still pending, a retry
//!   hurries it along instead of queueing another behind it. A stop or termination is retried for as long as the
//!   host is reachable (the heartbeat half completes it once the workload
//!   is gone). On an offline host nothing is retried: liveness makes its
//!   allocations `lost`, and once a host has been unreachable for
//!   `lost_after_secs`, what was lost fails, what was being stopped fails
//!   and what was being terminated is terminated — their capacity is
//!   released, and if the host returns still running them, they are
//!   orphans (below).
//! - [`reconcile_host`] (every heartbeat): the host lists the workloads it
//!   runs. Listed and `lost`/`provisioning`/`starting` here → `running`.
//!   Listed but not wanted here (failed, terminated, stopped, purged, or
//!   another host's) → an orphan: the host is told to stop it (at most once
//!   a minute). Left out of every heartbeat for a minute while `stopping` →
//!   `stopped`, `terminating` → `terminated`, `running` → `failed` (the
//!   workload ended and its report was lost), `lost` → `failed` (the host
//!   came back without it).

use keel_core::ids::{AllocationId, HostId};
use keel_db::{Audit, Db, NewEvent, RequestMeta, WriteTx};
use serde::{Deserialize, Serialize};

use crate::consumer::{ORPHAN_EVENT, OrphanWorkload, RETRY_EVENT};
use crate::service::{COLUMNS, Observed, allocation_observe, transition};
use crate::{Allocation, AllocationState, ProvisioningError};

/// How long each transitional state may last. Shorter than 1 s (60 s for
/// `lost_after_secs`) counts as that.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deadlines {
    /// `requested`, `scheduled`, `provisioning`, `starting`: until the
    /// agent confirms the start.
    #[serde(default = "default_start_secs")]
    pub start_secs: u32,
    /// `stopping`, `terminating`: until the agent confirms the stop.
    #[serde(default = "default_stop_secs")]
    pub stop_secs: u32,
    /// How many times a start is sent again before it fails.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// How long a host may be unreachable before its lost allocations fail
    /// (and those being stopped or terminated are settled).
    #[serde(default = "default_lost_after_secs")]
    pub lost_after_secs: u32,
}

fn default_start_secs() -> u32 {
    120
}
fn default_stop_secs() -> u32 {
    120
}
fn default_attempts() -> u32 {
    3
}
fn default_lost_after_secs() -> u32 {
    1800
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            start_secs: default_start_secs(),
            stop_secs: default_stop_secs(),
            attempts: default_attempts(),
            lost_after_secs: default_lost_after_secs(),
        }
    }
}

/// What one pass of [`reconcile_deadlines`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReconcileReport {
    /// Steps tried again.
    pub retried: u64,
    /// Allocations that failed (a start that never came, a host gone for
    /// too long).
    pub failed: u64,
    /// Terminations completed for a host gone for too long.
    pub terminated: u64,
    /// Allocations past their deadline after this pass: waiting for an
    /// offline host, or a stop the host has not confirmed yet. The metric
    /// to watch.
    pub past_deadline: i64,
}

/// The SQL condition "past its deadline" for an allocation row `a` whose
/// host row is `h` ($1 start, $2 stop, $3 lost, in seconds).
const PAST_DEADLINE: &str = "(
       (a.state IN ('requested', 'scheduled', 'provisioning', 'starting')
            AND a.updated_at < now() - make_interval(secs => $1))
    OR (a.state IN ('stopping', 'terminating')
            AND a.updated_at < now() - make_interval(secs => $2))
    OR (a.state = 'lost' AND a.updated_at < now() - make_interval(secs => $3)))";

/// One pass over the allocations past their deadline (at most 200, oldest
/// first; the timer comes back for the rest). See the module docs.
pub async fn reconcile_deadlines(
    db: &Db,
    meta: RequestMeta,
    deadlines: &Deadlines,
) -> Result<ReconcileReport, ProvisioningError> {
    let mut report = ReconcileReport::default();
    let mut tx = db.begin_system(meta.clone()).await?;
    let due: Vec<(Allocation, bool, bool)> = {
        let rows: Vec<AllocationWithHost> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            // The oldest 200, handled in host order: releasing capacity
            // locks host rows, and two workers must take them in one order.
            "SELECT {columns}, COALESCE(h.state = 'offline', true) AS host_offline,
                    COALESCE(h.last_seen_at < now() - make_interval(secs => $3), true)
                        AS host_gone_long
               FROM allocations a LEFT JOIN hosts h ON h.id = a.host_id
              WHERE a.id IN (SELECT a.id FROM allocations a
                              WHERE {PAST_DEADLINE} ORDER BY a.updated_at LIMIT 200)
                AND {PAST_DEADLINE}
              ORDER BY a.host_id, a.id
                FOR UPDATE OF a SKIP LOCKED",
            columns = prefixed_columns("a")
        )))
        .bind(f64::from(deadlines.start_secs.max(1)))
        .bind(f64::from(deadlines.stop_secs.max(1)))
        .bind(f64::from(deadlines.lost_after_secs.max(60)))
        .fetch_all(tx.conn())
        .await?;
        rows.into_iter()
            .map(|row| (row.allocation, row.host_offline, row.host_gone_long))
            .collect()
    };
    for (allocation, host_offline, host_gone_long) in due {
        use AllocationState::*;
        let state = allocation.state();
        match state {
            Requested => {
                fail(&mut tx, &allocation, "placement did not complete").await?;
                report.failed += 1;
            }
            Scheduled | Provisioning | Starting if !host_offline => {
                if allocation.attempts < i32::try_from(deadlines.attempts).unwrap_or(i32::MAX) {
                    retry(&mut tx, &allocation).await?;
                    report.retried += 1;
                } else {
                    let reason = format!(
                        "the host did not confirm the start after {} attempts",
                        allocation.attempts + 1
                    );
                    fail(&mut tx, &allocation, &reason).await?;
                    report.failed += 1;
                }
            }
            Stopping | Terminating if !host_offline => {
                retry(&mut tx, &allocation).await?;
                report.retried += 1;
            }
            Lost | Stopping if host_gone_long => {
                let reason = format!(
                    "the host has been unreachable for more than {} minutes",
                    deadlines.lost_after_secs / 60
                );
                fail(&mut tx, &allocation, &reason).await?;
                report.failed += 1;
            }
            Terminating if host_gone_long => {
                transition(&mut tx, &allocation, Terminated, None).await?;
                report.terminated += 1;
            }
            // Waiting for an offline host (liveness makes the starts lost
            // once their task expired).
            _ => {}
        }
    }
    report.past_deadline = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM allocations a WHERE {PAST_DEADLINE}"
    )))
    .bind(f64::from(deadlines.start_secs.max(1)))
    .bind(f64::from(deadlines.stop_secs.max(1)))
    .bind(f64::from(deadlines.lost_after_secs.max(60)))
    .fetch_one(tx.conn())
    .await?;
    if report.retried + report.failed + report.terminated == 0 {
        tx.rollback().await?;
    } else {
        tx.commit(
            Audit::new(
                "allocation.reconcile",
                None,
                keel_core::ResourceName::new(None, None, None, "platform", "allocations"),
            )
            .with_details(serde_json::json!(report)),
        )
        .await?;
    }
    Ok(report)
}

/// An allocation row with what the reconciler needs of its host.
#[derive(sqlx::FromRow)]
struct AllocationWithHost {
    #[sqlx(flatten)]
    allocation: Allocation,
    host_offline: bool,
    host_gone_long: bool,
}

fn prefixed_columns(alias: &str) -> String {
    COLUMNS
        .split(',')
        .map(|column| format!("{alias}.{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Asks for the allocation's current step again: bumps `attempts`, the
/// version and the deadline, and emits `allocation.retry`.
async fn retry(tx: &mut WriteTx, allocation: &Allocation) -> Result<(), ProvisioningError> {
    // A delivery of this allocation still waiting (backing off after a
    // failure) would hold a new event behind it: hurry it instead.
    let hurried = sqlx::query(
        "UPDATE outbox_deliveries SET available_at = now()
          WHERE consumer = $1 AND aggregate_id = $2 AND status = 'pending'",
    )
    .bind(crate::consumer::CONSUMER)
    .bind(allocation.id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    let in_flight: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM outbox_deliveries
                         WHERE consumer = $1 AND aggregate_id = $2 AND status = 'queued')",
    )
    .bind(crate::consumer::CONSUMER)
    .bind(allocation.id)
    .fetch_one(tx.conn())
    .await?;
    if hurried > 0 || in_flight {
        sqlx::query(
            "UPDATE allocations SET attempts = attempts + 1, updated_at = clock_timestamp()
              WHERE id = $1",
        )
        .bind(allocation.id)
        .execute(tx.conn())
        .await?;
        tx.audit(
            Audit::new(
                "allocation.retry",
                Some(allocation.tenant_id),
                allocation.resource_name(),
            )
            .with_details(serde_json::json!({
                "state": allocation.state(),
                "attempt": allocation.attempts + 1,
                "hurried_pending_delivery": true,
            })),
        );
        return Ok(());
    }
    let retried: Allocation = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE allocations SET attempts = attempts + 1, updated_at = clock_timestamp(),
                version = version + 1
          WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(allocation.id)
    .fetch_one(tx.conn())
    .await?;
    tx.emit(NewEvent::new(
        RETRY_EVENT,
        crate::AGGREGATE,
        retried.id.as_uuid(),
        retried.version,
        Some(retried.tenant_id),
        retried.resource_name(),
        serde_json::json!({
            "allocation_id": retried.id,
            "state": retried.state(),
            "attempt": retried.attempts,
        }),
    ));
    tx.audit(
        Audit::new(
            "allocation.retry",
            Some(retried.tenant_id),
            retried.resource_name(),
        )
        .with_details(serde_json::json!({
            "state": retried.state(),
            "attempt": retried.attempts,
        })),
    );
    tracing::warn!(allocation = %retried.id, state = %retried.state(), attempt = retried.attempts, "past its deadline: trying again");
    Ok(())
}

async fn fail(
    tx: &mut WriteTx,
    allocation: &Allocation,
    reason: &str,
) -> Result<(), ProvisioningError> {
    tracing::warn!(allocation = %allocation.id, state = %allocation.state(), reason, "past its deadline: failed");
    transition(tx, allocation, AllocationState::Failed, Some(reason)).await?;
    Ok(())
}

/// How long a workload must have been missing from a host's list before
/// the reconciler believes it (a heartbeat in flight may predate a start).
const UNLISTED_GRACE_SECS: f64 = 60.0;

/// Reconciles what a host says it runs with what Keel wants of it (see the
/// module docs). Returns how many allocations or workloads it acted on.
pub async fn reconcile_host(
    db: &Db,
    meta: RequestMeta,
    host: HostId,
    listed: &[AllocationId],
) -> Result<usize, ProvisioningError> {
    let mut tx = db.begin_bookkeeping().await?;
    // What Keel wants or remembers of each listed workload, and what it
    // thinks this host runs that the host did not list.
    let listed_states: Vec<(AllocationId, Option<String>)> = sqlx::query_as(
        "SELECT l.id, a.state FROM unnest($2::uuid[]) AS l (id)
           LEFT JOIN allocations a ON a.id = l.id AND a.host_id = $1",
    )
    .bind(host)
    .bind(listed)
    .fetch_all(&mut *tx)
    .await?;
    // A workload counts as gone only once the host has left it out of its
    // list for the whole grace period (consecutive heartbeats), and not
    // before the allocation has been in its state that long either (a
    // heartbeat in flight may predate a start).
    sqlx::query(
        "UPDATE allocations SET unlisted_since = NULL
          WHERE host_id = $1 AND id = ANY($2) AND unlisted_since IS NOT NULL",
    )
    .bind(host)
    .bind(listed)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE allocations SET unlisted_since = clock_timestamp()
          WHERE host_id = $1 AND NOT (id = ANY($2)) AND unlisted_since IS NULL
            AND state IN ('running', 'stopping', 'terminating', 'lost')",
    )
    .bind(host)
    .bind(listed)
    .execute(&mut *tx)
    .await?;
    let missing: Vec<(AllocationId, String)> = sqlx::query_as(
        "SELECT id, state FROM allocations
          WHERE host_id = $1 AND NOT (id = ANY($2))
            AND state IN ('running', 'stopping', 'terminating', 'lost')
            AND unlisted_since < now() - make_interval(secs => $3)
            AND updated_at < now() - make_interval(secs => $3)",
    )
    .bind(host)
    .bind(listed)
    .bind(UNLISTED_GRACE_SECS)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;

    let mut acted = 0;
    for (id, state) in listed_states {
        let state = state.as_deref().and_then(AllocationState::parse);
        let outcome = match state {
            Some(
                AllocationState::Lost | AllocationState::Provisioning | AllocationState::Starting,
            ) => observe(db, &meta, host, id, Observed::Running).await?,
            // Wanted and known to run, or on its way down: nothing to do.
            Some(
                AllocationState::Running
                | AllocationState::Stopping
                | AllocationState::Terminating
                | AllocationState::Scheduled,
            ) => false,
            // Not wanted here (ended, stopped, unknown, or another host's).
            _ => orphan(db, &meta, host, id).await?,
        };
        acted += usize::from(outcome);
    }
    for (id, state) in missing {
        let observed = match AllocationState::parse(&state) {
            Some(AllocationState::Running) => Observed::Failed(
                "the workload is no longer running on its host (it ended without a report)"
                    .to_owned(),
            ),
            Some(AllocationState::Lost) => Observed::Failed(
                "the workload was not running any more when its host came back".to_owned(),
            ),
            _ => Observed::Terminated,
        };
        acted += usize::from(observe(db, &meta, host, id, observed).await?);
    }
    Ok(acted)
}

async fn observe(
    db: &Db,
    meta: &RequestMeta,
    host: HostId,
    id: AllocationId,
    observed: Observed,
) -> Result<bool, ProvisioningError> {
    let tx = db.begin_system(meta.clone()).await?;
    Ok(allocation_observe(tx, host, id, observed).await?.is_some())
}

/// Queues a stop for a workload the host runs but Keel does not want there;
/// `false` if one was queued within the last minute.
async fn orphan(
    db: &Db,
    meta: &RequestMeta,
    host: HostId,
    allocation_id: AllocationId,
) -> Result<bool, ProvisioningError> {
    let mut tx = db.begin_system(meta.clone()).await?;
    // One stop a minute is enough (heartbeats come every few seconds).
    let queued: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM outbox
                         WHERE event_type = $1 AND aggregate_id = $2
                           AND created_at > now() - interval '1 minute')",
    )
    .bind(ORPHAN_EVENT)
    .bind(allocation_id)
    .fetch_one(tx.conn())
    .await?;
    if queued {
        tx.rollback().await?;
        return Ok(false);
    }
    let resource = keel_core::ResourceName::new(None, None, None, "host", host);
    // Ordered with the allocation's own events (a stop must not overtake a
    // start that made it wanted again), never with the host's.
    tx.emit(NewEvent::new(
        ORPHAN_EVENT,
        crate::AGGREGATE,
        allocation_id.as_uuid(),
        0,
        None,
        resource.clone(),
        OrphanWorkload {
            host_id: host,
            allocation_id,
        },
    ));
    tx.commit(
        Audit::new("host.orphan_workload", None, resource)
            .with_details(serde_json::json!({ "allocation_id": allocation_id })),
    )
    .await?;
    tracing::warn!(%host, %allocation_id, "the host runs a workload Keel does not want there: stopping it");
    Ok(true)
}
