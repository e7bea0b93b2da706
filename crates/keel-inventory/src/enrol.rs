//! Node enrolment: one-time join tokens exchanged for a node certificate.
//!
//! A join token is `{id}.{secret}` with a 256-bit secret; only its SHA-256
//! is stored. It is single use and expires (one hour by default). The
//! agent makes its own key pair and sends a CSR; the node CA signs a
//! certificate built from the CSR's public key alone (see `keel-pki`). The
//! token is consumed, the host created and the certificate's serial
//! recorded in one audited transaction.
//!
//! A token made for an existing host (`for_host`) re-enrols it: the node
//! keeps its id, its enrolment epoch goes up by one (tasks signed for the
//! old epoch are refused by the agent), and every certificate issued
//! before is revoked. A revoked host cannot be re-enrolled: it was
//! removed, and comes back only as a new node.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_core::ids::{HostId, JoinTokenId};
use keel_core::{Actor, ResourceName};
use keel_db::{Audit, Db, NewEvent, RequestMeta};
use keel_http::FieldError;
use keel_pki::CertificateAuthority;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::InventoryError;
use crate::trust::{PublishedSigningKey, published_signing_keys};

/// Everything enrolment hands a new node besides its certificate and the
/// task-signing keys (read from the database at each enrolment).
pub struct NodeChannel {
    pub node_ca: CertificateAuthority,
    pub control_plane_ca_pem: String,
    /// Where agents send reports and heartbeats (the api's mTLS listener).
    pub agent_api_url: String,
    pub node_cert_lifetime: Duration,
}

/// Capacity the agent detected on its host.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostCapacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Disk available to workloads, GiB.
    #[serde(default)]
    pub disk_gib: u64,
    #[serde(default)]
    pub gpu_model: Option<String>,
    #[serde(default)]
    pub gpu_count: u32,
}

impl HostCapacity {
    /// Field errors, named under `prefix` (e.g. `capacity`).
    pub fn validate(&self, prefix: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !(1..=4096).contains(&self.vcpus) {
            errors.push(field(
                &format!("{prefix}.vcpus"),
                "invalid",
                "must be between 1 and 4096",
            ));
        }
        if !(1..=(1 << 26)).contains(&self.memory_mib) {
            errors.push(field(
                &format!("{prefix}.memory_mib"),
                "invalid",
                "must be between 1 MiB and 64 TiB",
            ));
        }
        if self.disk_gib > (1 << 30) {
            errors.push(field(
                &format!("{prefix}.disk_gib"),
                "invalid",
                "must be at most 1 EiB",
            ));
        }
        let model_ok = self.gpu_model.as_ref().is_none_or(|model| {
            (1..=64).contains(&model.len())
                && model
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        });
        if self.gpu_count > 64 || (self.gpu_count > 0) != self.gpu_model.is_some() || !model_ok {
            errors.push(field(
                &format!("{prefix}.gpu_count"),
                "invalid",
                "at most 64, with a gpu_model (1–64 letters, digits, `-`, `.`, `_`) exactly when > 0",
            ));
        }
        errors
    }
}

/// `POST /v1/nodes/enrol`
#[derive(Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrolRequest {
    /// `{id}.{secret}`, from `api join-token create`.
    pub join_token: String,
    /// PKCS#10 CSR of the key the agent made for itself.
    pub csr_pem: String,
    /// The host's name, for operators.
    pub name: String,
    /// Where the control plane reaches the agent: `https://host:port`.
    pub agent_url: String,
    pub capacity: HostCapacity,
}

impl std::fmt::Debug for EnrolRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolRequest")
            .field("join_token", &"[REDACTED]")
            .field("name", &self.name)
            .field("agent_url", &self.agent_url)
            .finish_non_exhaustive()
    }
}

/// What an enrolled node needs to serve tasks and to report.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct EnrolResponse {
    pub node_id: HostId,
    pub enrolment_epoch: i64,
    pub certificate_pem: String,
    pub node_ca_pem: String,
    pub control_plane_ca_pem: String,
    /// Every task-signing key; the agent trusts those not retired.
    pub task_signing_keys: Vec<PublishedSigningKey>,
    pub agent_api_url: String,
}

/// A newly created join token; the secret is shown only here.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct JoinTokenView {
    pub id: JoinTokenId,
    /// `{id}.{secret}`: hand it to the new host's agent.
    pub token: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    /// SHA-256 of the control-plane CA certificate, for the agent to pin.
    pub ca_fingerprint: String,
}

pub(crate) fn field(name: &str, code: &str, message: &str) -> FieldError {
    FieldError {
        field: name.to_owned(),
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

impl EnrolRequest {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let name_ok = (1..=63).contains(&self.name.len())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !name_ok {
            errors.push(field(
                "name",
                "invalid",
                "must be 1–63 lowercase letters, digits, `-` or `.`",
            ));
        }
        let url_ok = self.agent_url.strip_prefix("https://").is_some_and(|rest| {
            !rest.is_empty()
                && rest.len() <= 200
                && rest
                    .rsplit_once(':')
                    .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        }) && !self.agent_url.chars().any(char::is_whitespace);
        if !url_ok {
            errors.push(field("agent_url", "invalid", "must be https://host:port"));
        }
        errors.extend(self.capacity.validate("capacity"));
        errors
    }
}

fn secret_digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Creates a join token for `region`, valid for `ttl`; with `for_host`,
/// a token that re-enrols that (not revoked) host instead of creating one.
pub async fn join_token_create(
    db: &Db,
    meta: RequestMeta,
    channel: &NodeChannel,
    region: &str,
    ttl: Duration,
    for_host: Option<HostId>,
) -> Result<JoinTokenView, InventoryError> {
    let id = JoinTokenId::new();
    let mut secret_bytes = [0_u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret_bytes);
    let secret = URL_SAFE_NO_PAD.encode(secret_bytes);
    let expires_at = OffsetDateTime::now_utc() + ttl;
    let mut tx = db.begin_system(meta).await?;
    let region = match for_host {
        None => region.to_owned(),
        Some(host) => sqlx::query_scalar::<_, String>(
            "SELECT region FROM hosts WHERE id = $1 AND revoked_at IS NULL FOR SHARE",
        )
        .bind(host)
        .fetch_optional(tx.conn())
        .await?
        .ok_or(InventoryError::HostNotFound)?,
    };
    sqlx::query(
        "INSERT INTO join_tokens (id, secret_sha256, region, expires_at, for_host) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(secret_digest(&secret))
    .bind(&region)
    .bind(expires_at)
    .bind(for_host)
    .execute(tx.conn())
    .await?;
    let resource = ResourceName::new(Some(&region), None, None, "join-token", id);
    tx.commit(
        Audit::new("join_token.create", None, resource)
            .with_details(serde_json::json!({ "for_host": for_host })),
    )
    .await?;
    Ok(JoinTokenView {
        id,
        token: format!("{id}.{secret}"),
        expires_at,
        ca_fingerprint: control_plane_fingerprint(channel),
    })
}

fn control_plane_fingerprint(channel: &NodeChannel) -> String {
    keel_pki::certs_from_pem(&channel.control_plane_ca_pem)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .map(|der| hex::encode(Sha256::digest(der.as_ref())))
        .unwrap_or_default()
}

/// Exchanges a join token and a CSR for a node certificate, creating the
/// host with the capacity its agent reported.
pub async fn node_enrol(
    db: &Db,
    meta: RequestMeta,
    channel: &NodeChannel,
    request: EnrolRequest,
) -> Result<EnrolResponse, InventoryError> {
    let errors = request.validate();
    if !errors.is_empty() {
        return Err(InventoryError::Validation(errors));
    }
    let (token_id, secret) = request
        .join_token
        .split_once('.')
        .and_then(|(id, secret)| Some((id.parse::<JoinTokenId>().ok()?, secret)))
        .ok_or(InventoryError::InvalidJoinToken)?;
    let mut tx = db.begin_system(meta).await?;
    // Lock the token: two agents racing with one token cannot both win.
    let token: Option<JoinTokenRow> = sqlx::query_as(
        "SELECT secret_sha256, region, expires_at, used_at, for_host FROM join_tokens WHERE id = $1 FOR UPDATE",
    )
    .bind(token_id)
    .fetch_optional(tx.conn())
    .await?;
    let (region, for_host) = match token {
        Some((digest, region, expires_at, None, for_host))
            if constant_time_eq(&digest, &secret_digest(secret))
                && expires_at > OffsetDateTime::now_utc() =>
        {
            (region, for_host)
        }
        // Unknown, wrong secret, expired or used: one answer for all.
        _ => return Err(InventoryError::InvalidJoinToken),
    };
    let (host_id, epoch) = match for_host {
        None => (HostId::new(), 1),
        Some(host) => {
            // Re-enrolment: the host must still exist and not be revoked.
            let epoch: Option<i64> = sqlx::query_scalar(
                "SELECT enrolment_epoch + 1 FROM hosts WHERE id = $1 AND revoked_at IS NULL FOR UPDATE",
            )
            .bind(host)
            .fetch_optional(tx.conn())
            .await?;
            (host, epoch.ok_or(InventoryError::InvalidJoinToken)?)
        }
    };
    tx.set_actor(Actor::Node { host_id });
    let issued = channel
        .node_ca
        .sign_node_csr(
            &request.csr_pem,
            host_id.as_uuid(),
            channel.node_cert_lifetime,
        )
        .map_err(InventoryError::InvalidCsr)?;
    let capacity = &request.capacity;
    let vcpus = i32::try_from(capacity.vcpus).unwrap_or(i32::MAX);
    let memory_mib = i64::try_from(capacity.memory_mib).unwrap_or(i64::MAX);
    let gpu_count = i32::try_from(capacity.gpu_count).unwrap_or(0);
    let disk_gib = i64::try_from(capacity.disk_gib).unwrap_or(i64::MAX);
    let version: i64 = if for_host.is_none() {
        sqlx::query(
            "INSERT INTO hosts (id, name, region, state, agent_url, vcpus, memory_mib, gpu_model, gpu_count,
                                cert_serial, cert_not_after, last_seen_at, disk_gib)
             VALUES ($1, $2, $3, 'ready', $4, $5, $6, $7, $8, $9, $10, now(), $11)",
        )
        .bind(host_id)
        .bind(&request.name)
        .bind(&region)
        .bind(&request.agent_url)
        .bind(vcpus)
        .bind(memory_mib)
        .bind(&capacity.gpu_model)
        .bind(gpu_count)
        .bind(&issued.serial_hex)
        .bind(issued.not_after)
        .bind(disk_gib)
        .execute(tx.conn())
        .await?;
        1
    } else {
        // The capacity may have changed (new hardware); it is never set
        // below what running allocations hold.
        let version: i64 = sqlx::query_scalar(
            "UPDATE hosts SET enrolment_epoch = $2, cert_serial = $3, cert_not_after = $4, name = $5,
                              agent_url = $6, vcpus = GREATEST($7, reserved_vcpus),
                              memory_mib = GREATEST($8, reserved_memory_mib), gpu_model = $9,
                              gpu_count = GREATEST($10, reserved_gpus), last_seen_at = now(),
                              disk_gib = GREATEST($11, reserved_disk_gib),
                              state = COALESCE(state_before_offline, state),
                              state_before_offline = NULL, version = version + 1
              WHERE id = $1 RETURNING version",
        )
        .bind(host_id)
        .bind(epoch)
        .bind(&issued.serial_hex)
        .bind(issued.not_after)
        .bind(&request.name)
        .bind(&request.agent_url)
        .bind(vcpus)
        .bind(memory_mib)
        .bind(&capacity.gpu_model)
        .bind(gpu_count)
        .bind(disk_gib)
        .fetch_one(tx.conn())
        .await?;
        sqlx::query(
            "UPDATE node_certificates SET revoked_at = now() WHERE host_id = $1 AND revoked_at IS NULL",
        )
        .bind(host_id)
        .execute(tx.conn())
        .await?;
        version
    };
    record_certificate(tx.conn(), host_id, epoch, &issued, None).await?;
    sqlx::query("UPDATE join_tokens SET used_at = now(), host_id = $2 WHERE id = $1")
        .bind(token_id)
        .bind(host_id)
        .execute(tx.conn())
        .await?;
    let task_signing_keys = published_signing_keys(tx.conn()).await?;
    let resource = host_resource(&region, host_id);
    let (event, action) = if for_host.is_none() {
        ("host.enrolled", "host.enrol")
    } else {
        ("host.reenrolled", "host.reenrol")
    };
    tx.emit(NewEvent::new(
        event,
        "host",
        host_id.as_uuid(),
        version,
        None,
        resource.clone(),
        serde_json::json!({ "host_id": host_id, "name": request.name, "region": region, "enrolment_epoch": epoch }),
    ));
    tx.commit(
        Audit::new(action, None, resource).with_details(serde_json::json!({
            "join_token_id": token_id, "cert_serial": issued.serial_hex, "name": request.name,
            "enrolment_epoch": epoch,
        })),
    )
    .await?;
    Ok(EnrolResponse {
        node_id: host_id,
        enrolment_epoch: epoch,
        certificate_pem: issued.cert_pem,
        node_ca_pem: channel.node_ca.cert_pem().to_owned(),
        control_plane_ca_pem: channel.control_plane_ca_pem.clone(),
        task_signing_keys,
        agent_api_url: channel.agent_api_url.clone(),
    })
}

type JoinTokenRow = (
    Vec<u8>,
    String,
    OffsetDateTime,
    Option<OffsetDateTime>,
    Option<HostId>,
);

/// Records an issued node certificate (the revocation list's source).
pub async fn record_certificate(
    conn: &mut sqlx::PgConnection,
    host: HostId,
    epoch: i64,
    issued: &keel_pki::IssuedCertificate,
    renewed_from: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO node_certificates (serial, host_id, enrolment_epoch, not_after, renewed_from)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&issued.serial_hex)
    .bind(host)
    .bind(epoch)
    .bind(issued.not_after)
    .bind(renewed_from)
    .execute(conn)
    .await
    .map(|_| ())
}

/// The resource name of a host.
pub fn host_resource(region: &str, host: HostId) -> ResourceName {
    ResourceName::new(Some(region), None, None, "host", host)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
