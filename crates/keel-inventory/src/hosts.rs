//! What operators decide about hosts: whether the scheduler may place new
//! allocations on them.
//!
//! - `ready`: takes new allocations.
//! - `cordoned`: takes none; what runs there keeps running.
//! - `draining`: takes none, and the operator wants it emptied; once no
//!   allocation holds capacity on it any more, the worker moves it to
//!   `cordoned` and says so (`host.drained`), which is when it can be
//!   serviced. Keel does not move workloads (they are processes on that
//!   host, with their files), so a drain completes as tenants terminate
//!   theirs; a stopped allocation there cannot start again
//!   (`host_draining`), since it would keep the host busy.
//! - `offline` is the agent's silence, not an operator decision: an action
//!   on an offline host changes the state it comes back in.
//!
//! Every action is idempotent (asking for the state a host is in returns it
//! unchanged, with no audit row) and may carry the host's `version` as
//! `If-Match`.

use keel_core::ids::HostId;
use keel_db::{Audit, Db, NewEvent, RequestMeta, WriteTx};

use crate::InventoryError;
use crate::enrol::host_resource;
use crate::nodes::{HOST_COLUMNS, HostView};

/// An operator's decision about a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostAction {
    Cordon,
    Uncordon,
    Drain,
}

impl HostAction {
    /// The schedulable state the action asks for.
    fn target(self) -> &'static str {
        match self {
            HostAction::Cordon => "cordoned",
            HostAction::Uncordon => "ready",
            HostAction::Drain => "draining",
        }
    }

    fn audit_action(self) -> &'static str {
        match self {
            HostAction::Cordon => "host.cordon",
            HostAction::Uncordon => "host.uncordon",
            HostAction::Drain => "host.drain",
        }
    }

    fn event(self) -> &'static str {
        match self {
            HostAction::Cordon => "host.cordoned",
            HostAction::Uncordon => "host.uncordoned",
            HostAction::Drain => "host.draining",
        }
    }
}

/// Applies `action` to a host (see the module docs). A revoked host is
/// `not_found`: there is nothing left to schedule on it.
pub async fn host_act(
    mut tx: WriteTx,
    host_id: HostId,
    action: HostAction,
    expected_version: Option<i64>,
) -> Result<HostView, InventoryError> {
    let before_offline: Option<Option<String>> = sqlx::query_scalar(
        "SELECT state_before_offline FROM hosts WHERE id = $1 AND revoked_at IS NULL FOR UPDATE",
    )
    .bind(host_id)
    .fetch_optional(tx.conn())
    .await?;
    let before_offline = before_offline.ok_or(InventoryError::HostNotFound)?;
    let current: HostView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {HOST_COLUMNS} FROM hosts WHERE id = $1"
    )))
    .bind(host_id)
    .fetch_one(tx.conn())
    .await?;
    if expected_version.is_some_and(|expected| expected != current.version) {
        return Err(InventoryError::VersionMismatch);
    }
    let offline = current.state == "offline";
    let schedulable = if offline {
        before_offline.as_deref().unwrap_or("ready")
    } else {
        current.state.as_str()
    };
    if schedulable == action.target() {
        tx.rollback().await?;
        return Ok(current.named());
    }
    let updated: HostView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE hosts SET state = CASE WHEN state = 'offline' THEN state ELSE $2 END,
                          state_before_offline = CASE WHEN state = 'offline' THEN $2
                                                      ELSE state_before_offline END,
                          version = version + 1
          WHERE id = $1 RETURNING {HOST_COLUMNS}"
    )))
    .bind(host_id)
    .bind(action.target())
    .fetch_one(tx.conn())
    .await?;
    let resource = host_resource(&updated.region, host_id);
    tx.emit(NewEvent::new(
        action.event(),
        "host",
        host_id.as_uuid(),
        updated.version,
        None,
        resource.clone(),
        serde_json::json!({
            "host_id": host_id,
            "state": updated.state,
            "schedulable": action.target(),
            "was": schedulable,
        }),
    ));
    tx.commit(
        Audit::new(action.audit_action(), None, resource)
            .with_details(serde_json::json!({ "was": schedulable, "now": action.target() })),
    )
    .await?;
    Ok(updated.named())
}

/// Moves draining hosts that no allocation holds capacity on any more to
/// `cordoned` (`host.drained`). Run by the worker with its other sweeps.
/// Returns how many hosts finished draining.
pub async fn finish_drains(db: &Db, meta: RequestMeta) -> Result<usize, InventoryError> {
    let mut tx = db.begin_system(meta).await?;
    let drained: Vec<(HostId, String, i64)> = sqlx::query_as(
        "UPDATE hosts SET state = 'cordoned', version = version + 1
          WHERE id IN (SELECT h.id FROM hosts h
                        WHERE h.state = 'draining' AND h.revoked_at IS NULL
                          AND NOT EXISTS (SELECT FROM allocations a
                                           WHERE a.host_id = h.id AND a.reserved)
                        ORDER BY h.id FOR UPDATE SKIP LOCKED)
          RETURNING id, region, version",
    )
    .fetch_all(tx.conn())
    .await?;
    if drained.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    for (host_id, region, version) in &drained {
        let resource = host_resource(region, *host_id);
        tx.emit(NewEvent::new(
            "host.drained",
            "host",
            host_id.as_uuid(),
            *version,
            None,
            resource.clone(),
            serde_json::json!({ "host_id": host_id, "state": "cordoned" }),
        ));
        tx.audit(Audit::new("host.drained", None, resource));
    }
    tx.commit(
        Audit::new("host.drain_sweep", None, crate::nodes::hosts_resource())
            .with_details(serde_json::json!({ "drained": drained.len() })),
    )
    .await?;
    Ok(drained.len())
}
