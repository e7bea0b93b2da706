//! Enrolled nodes after enrolment: who a connection is, certificate
//! renewal, the task-signing keys agents learn, and revocation.
//!
//! A node is authenticated by its certificate on the api's mutual-TLS agent
//! listener, and the database is authoritative on top of the handshake:
//! [`authenticated_node`] accepts a peer only if its certificate's serial is
//! one the node CA issued to that node, not revoked, for the node's
//! current enrolment epoch, and the node itself is not revoked. The
//! listener's [`keel_pki::DenyList`] (reloaded by [`refresh_deny_list`])
//! refuses revoked serials already during the handshake.
//!
//! Revocation ([`host_revoke`]) is immediate and total: the host row and
//! every certificate of it are marked in one audited transaction, the
//! provisioning worker signs nothing more for it (it checks `revoked_at`
//! in the transaction that assigns a task's sequence number), renewals
//! and reports are refused, and a `host.revoked` event lets the
//! provisioning worker fail the allocations that were on it.

use std::sync::Arc;
use std::time::Duration;

use keel_core::ids::HostId;
use keel_core::{Actor, ResourceName};
use keel_db::{Audit, Db, NewEvent, RequestMeta};
use keel_http::ApiError;
use keel_http::tls::TlsPeer;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::InventoryError;
use crate::enrol::{HostCapacity, NodeChannel, host_resource, record_certificate};
use crate::trust::{PublishedSigningKey, published_signing_keys};

/// A node whose certificate and record both check out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthenticatedNode {
    pub host_id: HostId,
    pub enrolment_epoch: i64,
    /// The serial of the certificate it presented.
    pub serial: String,
}

fn forbidden(message: &'static str) -> ApiError {
    ApiError::new(axum::http::StatusCode::FORBIDDEN, "forbidden_peer", message)
}

/// The node behind a connection: its certificate names it, the serial is
/// one issued to it for its current epoch and not revoked, and the node is
/// not revoked. Anything else is 403 `forbidden_peer`. The first use of a
/// certificate is recorded (see [`renew`]).
pub async fn authenticated_node(db: &Db, peer: &TlsPeer) -> Result<AuthenticatedNode, ApiError> {
    let der = peer
        .certificate
        .as_deref()
        .ok_or_else(|| forbidden("no client certificate"))?;
    let host_id = keel_pki::node_identity(der)
        .map(HostId::from)
        .ok_or_else(|| forbidden("not a node certificate"))?;
    let serial = keel_pki::serial_hex(der).ok_or_else(|| forbidden("unreadable certificate"))?;
    let mut tx = db.begin_bookkeeping().await.map_err(ApiError::internal)?;
    let epoch: Option<i64> = sqlx::query_scalar(
        "WITH peer AS (
             SELECT h.enrolment_epoch FROM hosts h
               JOIN node_certificates c
                 ON c.host_id = h.id AND c.enrolment_epoch = h.enrolment_epoch
              WHERE h.id = $1 AND c.serial = $2 AND h.revoked_at IS NULL AND c.revoked_at IS NULL
         ), first_use AS (
             UPDATE node_certificates SET first_used_at = now()
              WHERE serial = $2 AND first_used_at IS NULL AND revoked_at IS NULL
                AND EXISTS (SELECT 1 FROM peer)
         )
         SELECT enrolment_epoch FROM peer",
    )
    .bind(host_id)
    .bind(&serial)
    .fetch_optional(&mut *tx)
    .await
    .map_err(ApiError::internal)?;
    tx.commit().await.map_err(ApiError::internal)?;
    epoch
        .map(|enrolment_epoch| AuthenticatedNode {
            host_id,
            enrolment_epoch,
            serial,
        })
        .ok_or_else(|| forbidden("this node or certificate is revoked, superseded or not enrolled"))
}

/// The serials to refuse at the handshake: revoked and not yet expired
/// (an expired certificate fails the chain check anyway).
pub async fn revoked_serials(db: &Db) -> Result<Vec<String>, InventoryError> {
    let mut tx = db.begin_bookkeeping().await?;
    let serials = sqlx::query_scalar(
        "SELECT serial FROM node_certificates WHERE revoked_at IS NOT NULL AND not_after > now()",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(serials)
}

/// How often the api reloads the deny list, and how old it may get before
/// the listener refuses every node (see [`keel_pki::DenyList`]).
pub const DENY_LIST_REFRESH: Duration = Duration::from_secs(5);
pub const DENY_LIST_MAX_AGE: Duration = Duration::from_secs(60);

/// Reloads `deny_list` every [`DENY_LIST_REFRESH`] until `stopped`. A
/// failed reload is logged; after [`DENY_LIST_MAX_AGE`] without one, the
/// list refuses every handshake by itself.
pub async fn refresh_deny_list(
    db: Db,
    deny_list: Arc<keel_pki::DenyList>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(DENY_LIST_REFRESH);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        match revoked_serials(&db).await {
            Ok(serials) => deny_list.replace(serials),
            Err(error) => {
                tracing::warn!(error = %error, "reloading the certificate deny list failed");
            }
        }
    }
}

/// How long after a renewal the certificate that asked may ask again, if
/// the answer was never used (it was lost on the way).
pub const RENEWAL_RETRY_WINDOW: time::Duration = time::Duration::minutes(10);

/// `POST /v1/agent/renew`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 CSR of a NEW key the agent made.
    pub csr_pem: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RenewResponse {
    pub certificate_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

/// Issues a node a new certificate for a new key, authenticated by its
/// current one — only the newest certificate of a node renews, so a stolen
/// older key cannot extend itself (and a thief who renews first makes the
/// real node's next renewal fail loudly). The old certificate stays valid
/// for requests until it expires, so connections made with it are not cut.
///
/// One exception keeps a lost answer from stranding a node: the certificate
/// the newest one was issued to may ask again while the newest has never
/// been presented, within [`RENEWAL_RETRY_WINDOW`]. The unused certificate
/// is revoked and a new one issued (audited with `revoked_unused`).
pub async fn renew(
    db: &Db,
    meta: RequestMeta,
    channel: &NodeChannel,
    node: &AuthenticatedNode,
    request: RenewRequest,
) -> Result<RenewResponse, InventoryError> {
    let mut tx = db
        .begin_system(RequestMeta {
            actor: Actor::Node {
                host_id: node.host_id,
            },
            ..meta
        })
        .await?;
    // Re-checked under a lock: a revocation or re-enrolment committed after
    // the peer check wins, and a first use of the newest certificate
    // (recorded under the certificate's row lock) is seen.
    let current: Option<(String, String)> = sqlx::query_as(
        "SELECT region, cert_serial FROM hosts
          WHERE id = $1 AND revoked_at IS NULL AND enrolment_epoch = $2 FOR UPDATE",
    )
    .bind(node.host_id)
    .bind(node.enrolment_epoch)
    .fetch_optional(tx.conn())
    .await?;
    let Some((region, current_serial)) = current else {
        return Err(InventoryError::PeerRefused(
            "this node is revoked or was re-enrolled",
        ));
    };
    // On the database's clock, like `issued_at`.
    let (renewed_from, never_used, recent): (Option<String>, bool, bool) = sqlx::query_as(
        "SELECT renewed_from, first_used_at IS NULL,
                issued_at > now() - make_interval(secs => $2)
           FROM node_certificates WHERE serial = $1 FOR UPDATE",
    )
    .bind(&current_serial)
    .bind(RENEWAL_RETRY_WINDOW.as_seconds_f64())
    .fetch_one(tx.conn())
    .await?;
    let unused_answer = (current_serial != node.serial).then_some(&current_serial);
    if let Some(unused) = unused_answer {
        let asked_again =
            renewed_from.as_deref() == Some(node.serial.as_str()) && never_used && recent;
        if !asked_again {
            return Err(InventoryError::PeerRefused(
                "only the node's newest certificate can renew",
            ));
        }
        sqlx::query("UPDATE node_certificates SET revoked_at = now() WHERE serial = $1")
            .bind(unused)
            .execute(tx.conn())
            .await?;
    }
    let issued = channel
        .node_ca
        .sign_node_csr(
            &request.csr_pem,
            node.host_id.as_uuid(),
            channel.node_cert_lifetime,
        )
        .map_err(InventoryError::InvalidCsr)?;
    record_certificate(
        tx.conn(),
        node.host_id,
        node.enrolment_epoch,
        &issued,
        Some(&node.serial),
    )
    .await?;
    sqlx::query(
        "UPDATE hosts SET cert_serial = $2, cert_not_after = $3, last_seen_at = now() WHERE id = $1",
    )
    .bind(node.host_id)
    .bind(&issued.serial_hex)
    .bind(issued.not_after)
    .execute(tx.conn())
    .await?;
    tx.commit(
        Audit::new(
            "host.certificate_renew",
            None,
            host_resource(&region, node.host_id),
        )
        .with_details(serde_json::json!({
            "cert_serial": issued.serial_hex,
            "not_after": issued.not_after.unix_timestamp(),
            "renewed_from": node.serial,
            "revoked_unused": unused_answer,
        })),
    )
    .await?;
    Ok(RenewResponse {
        certificate_pem: issued.cert_pem,
        not_after: issued.not_after,
    })
}

/// Region, state and capacity (vcpus, memory, disk, GPU model and count).
type HostStateRow = (String, String, i32, i64, i64, Option<String>, i32);

/// Records a heartbeat: the node was seen now, with this capacity. A host
/// that was offline comes back (in the state it had before), a changed
/// capacity is taken (never below what is reserved); both are audited and
/// evented. A plain heartbeat touches only `last_seen_at`. Returns whether
/// the host came back online.
pub async fn record_heartbeat(
    db: &Db,
    meta: RequestMeta,
    node: &AuthenticatedNode,
    capacity: &HostCapacity,
) -> Result<bool, InventoryError> {
    let errors = capacity.validate("capacity");
    if !errors.is_empty() {
        return Err(InventoryError::Validation(errors));
    }
    let vcpus = i32::try_from(capacity.vcpus).unwrap_or(i32::MAX);
    let memory_mib = i64::try_from(capacity.memory_mib).unwrap_or(i64::MAX);
    let disk_gib = i64::try_from(capacity.disk_gib).unwrap_or(i64::MAX);
    let gpu_count = i32::try_from(capacity.gpu_count).unwrap_or(0);

    let mut tx = db.begin_bookkeeping().await?;
    let unchanged: Option<bool> = sqlx::query_scalar(
        "UPDATE hosts SET last_seen_at = now()
          WHERE id = $1 AND revoked_at IS NULL AND enrolment_epoch = $2
          RETURNING state <> 'offline' AND vcpus = $3 AND memory_mib = $4 AND disk_gib = $5
                    AND gpu_model IS NOT DISTINCT FROM $6 AND gpu_count = $7",
    )
    .bind(node.host_id)
    .bind(node.enrolment_epoch)
    .bind(vcpus)
    .bind(memory_mib)
    .bind(disk_gib)
    .bind(&capacity.gpu_model)
    .bind(gpu_count)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    match unchanged {
        None => {
            return Err(InventoryError::PeerRefused(
                "this node is revoked or was re-enrolled",
            ));
        }
        Some(true) => return Ok(false),
        Some(false) => {}
    }

    let mut tx = db
        .begin_system(RequestMeta {
            actor: Actor::Node {
                host_id: node.host_id,
            },
            ..meta
        })
        .await?;
    let before: Option<HostStateRow> = sqlx::query_as(
        "SELECT region, state, vcpus, memory_mib, disk_gib, gpu_model, gpu_count
           FROM hosts WHERE id = $1 AND revoked_at IS NULL FOR UPDATE",
    )
    .bind(node.host_id)
    .fetch_optional(tx.conn())
    .await?;
    let Some((region, state, ..)) = before.clone() else {
        return Err(InventoryError::PeerRefused(
            "this node is revoked or was re-enrolled",
        ));
    };
    let came_back = state == "offline";
    let (version, after): (i64, (i32, i64, i64, Option<String>, i32)) = {
        let row: (i64, i32, i64, i64, Option<String>, i32) = sqlx::query_as(
            "UPDATE hosts SET state = CASE WHEN state = 'offline'
                                           THEN COALESCE(state_before_offline, 'ready') ELSE state END,
                              state_before_offline = NULL,
                              vcpus = GREATEST($2, reserved_vcpus),
                              memory_mib = GREATEST($3, reserved_memory_mib),
                              disk_gib = GREATEST($4, reserved_disk_gib), gpu_model = $5,
                              gpu_count = GREATEST($6, reserved_gpus),
                              version = version + 1
              WHERE id = $1
              RETURNING version, vcpus, memory_mib, disk_gib, gpu_model, gpu_count",
        )
        .bind(node.host_id)
        .bind(vcpus)
        .bind(memory_mib)
        .bind(disk_gib)
        .bind(&capacity.gpu_model)
        .bind(gpu_count)
        .fetch_one(tx.conn())
        .await?;
        (row.0, (row.1, row.2, row.3, row.4, row.5))
    };
    let resource = host_resource(&region, node.host_id);
    if came_back {
        tx.emit(NewEvent::new(
            "host.online",
            "host",
            node.host_id.as_uuid(),
            version,
            None,
            resource.clone(),
            serde_json::json!({ "host_id": node.host_id }),
        ));
    }
    let capacity_changed = before
        .map(|(_, _, vcpus, memory, disk, model, gpus)| (vcpus, memory, disk, model, gpus))
        .is_some_and(|before| before != after);
    let capacity_audit = Audit::new("host.capacity_change", None, resource.clone()).with_details(
        serde_json::json!({
            "vcpus": after.0, "memory_mib": after.1, "disk_gib": after.2,
            "gpu_model": after.3, "gpu_count": after.4,
        }),
    );
    match (came_back, capacity_changed) {
        (true, changed) => {
            if changed {
                tx.audit(capacity_audit);
            }
            tx.commit(Audit::new("host.online", None, resource)).await?;
        }
        (false, true) => tx.commit(capacity_audit).await?,
        // Another heartbeat applied the same change first.
        (false, false) => tx.rollback().await?,
    }
    if came_back {
        tracing::info!(host = %node.host_id, "host is back online");
    }
    Ok(came_back)
}

/// `GET /v1/agent/signing-keys`
#[derive(Clone, Debug, Serialize)]
pub struct SigningKeys {
    pub keys: Vec<PublishedSigningKey>,
}

pub async fn signing_keys(db: &Db) -> Result<SigningKeys, InventoryError> {
    let mut tx = db.begin_bookkeeping().await?;
    let keys = published_signing_keys(&mut tx).await?;
    tx.commit().await?;
    Ok(SigningKeys { keys })
}

/// A host as operators see it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct HostView {
    pub id: HostId,
    pub name: String,
    pub region: String,
    pub state: String,
    pub agent_url: String,
    pub vcpus: i32,
    pub memory_mib: i64,
    pub gpu_model: Option<String>,
    pub gpu_count: i32,
    pub reserved_vcpus: i32,
    pub reserved_memory_mib: i64,
    pub reserved_gpus: i32,
    /// Local disk for workloads, GiB.
    pub disk_gib: i64,
    pub reserved_disk_gib: i64,
    /// Incremented by every change; `If-Match` on host operations.
    pub version: i64,
    pub enrolment_epoch: i64,
    pub cert_serial: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub cert_not_after: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub enrolled_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_seen_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
    #[sqlx(skip)]
    pub resource_name: String,
}

pub(crate) const HOST_COLUMNS: &str = "id, name, region, state, agent_url, vcpus, memory_mib, gpu_model, gpu_count,
    reserved_vcpus, reserved_memory_mib, reserved_gpus, disk_gib, reserved_disk_gib, version, enrolment_epoch, cert_serial, cert_not_after,
    enrolled_at, last_seen_at, revoked_at";

impl HostView {
    pub(crate) fn named(mut self) -> Self {
        self.resource_name = host_resource(&self.region, self.id).to_string();
        self
    }
}

/// Revokes a host (operators): no task is signed for it any more, its
/// certificates are refused (by every request check at once, and at the
/// handshake within [`DENY_LIST_REFRESH`]), it cannot renew or re-enrol.
/// Revoking a revoked host changes nothing and returns it as it is.
pub async fn host_revoke(
    mut tx: keel_db::WriteTx,
    host_id: HostId,
) -> Result<HostView, InventoryError> {
    let current: Option<HostView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {HOST_COLUMNS} FROM hosts WHERE id = $1 FOR UPDATE"
    )))
    .bind(host_id)
    .fetch_optional(tx.conn())
    .await?;
    let current = current.ok_or(InventoryError::HostNotFound)?;
    if current.revoked_at.is_some() {
        tx.rollback().await?;
        return Ok(current.named());
    }
    let version: i64 = sqlx::query_scalar(
        "UPDATE hosts SET revoked_at = now(), state = 'offline', version = version + 1
          WHERE id = $1 RETURNING version",
    )
    .bind(host_id)
    .fetch_one(tx.conn())
    .await?;
    let certificates = revoke_certificates(tx.conn(), host_id).await?;
    let revoked: HostView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {HOST_COLUMNS} FROM hosts WHERE id = $1"
    )))
    .bind(host_id)
    .fetch_one(tx.conn())
    .await?;
    let resource = host_resource(&revoked.region, host_id);
    tx.emit(NewEvent::new(
        "host.revoked",
        "host",
        host_id.as_uuid(),
        version,
        None,
        resource.clone(),
        serde_json::json!({ "host_id": host_id, "region": revoked.region }),
    ));
    tx.commit(
        Audit::new("host.revoke", None, resource)
            .with_details(serde_json::json!({ "certificates_revoked": certificates })),
    )
    .await?;
    Ok(revoked.named())
}

async fn revoke_certificates(conn: &mut PgConnection, host: HostId) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE node_certificates SET revoked_at = now() WHERE host_id = $1 AND revoked_at IS NULL",
    )
    .bind(host)
    .execute(conn)
    .await?
    .rows_affected())
}

/// One page of hosts, in id order.
pub async fn host_list(
    conn: &mut PgConnection,
    after: Option<uuid::Uuid>,
    limit: i64,
) -> Result<Vec<HostView>, InventoryError> {
    let rows: Vec<HostView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {HOST_COLUMNS} FROM hosts WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    )))
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(HostView::named).collect())
}

/// The resource name of the platform's host list (for list audits).
pub fn hosts_resource() -> ResourceName {
    ResourceName::new(None, None, None, "platform", "hosts")
}
