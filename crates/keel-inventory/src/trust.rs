//! The control plane's trust material, kept in Postgres so that every api
//! and worker process shares it, with every private key sealed by the KMS
//! (`keel_kms::envelope`): the database holds envelopes, never a key.
//!
//! - **Certificate authorities** ([`authority`]): the node CA and the
//!   control-plane CA, created once (by the first api to start) and
//!   audited. Each private key is sealed under the context
//!   `keel/ca/{kind}`, so one row's envelope cannot be passed off as
//!   another's.
//! - **Task-signing keys** ([`signers`], [`rotate_signing_key`]): a key
//!   signs from its `signs_from` (the newest such key signs) and agents
//!   trust it until its `retires_at`. A rotation adds a key that starts
//!   signing one overlap period later — long enough for every agent to
//!   learn it — and retires the others one overlap period after that, so
//!   tasks signed just before the switch still verify. Every key and every
//!   retirement carries the control-plane CA's signature (keel-task
//!   `key_statement`): agents, who pinned that CA when they joined, accept
//!   nothing else, never because a row appeared or changed. One rotation
//!   at a time: a second one while a new key is still pending is refused.
//! - **Re-wrapping** ([`rewrap`]): after a KMS master-key rotation, new
//!   envelopes already use the new master key; `rewrap` re-seals the old
//!   ones too, so the old master key can be retired.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use keel_core::ResourceName;
use keel_db::{Audit, Db, RequestMeta};
use keel_kms::{AnyKms, envelope};
use keel_pki::{CaKind, CertificateAuthority};
use keel_task::{KEY_STATEMENT_DOMAIN, TaskSigner, key_statement, verifying_key_to_base64};
use serde::Serialize;
use sqlx::PgConnection;
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

/// Why the trust material could not be loaded or changed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("the {0} CA does not exist yet: start the api once to create it")]
    MissingAuthority(CaKind),
    #[error("no task-signing key exists yet: start the api once to create one")]
    NoSigningKey,
    #[error("the rotation overlap must be at least {MIN_OVERLAP_SECS} seconds")]
    InvalidOverlap,
    #[error(
        "key {0} from the last rotation has not started signing yet: rotate again after it has"
    )]
    RotationPending(String),
    #[error("stored key material is damaged: {0}")]
    Damaged(String),
    #[error("the KMS refused: {0}")]
    Kms(#[from] keel_kms::KmsError),
    #[error(transparent)]
    Pki(#[from] keel_pki::PkiError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database error")]
    Db(#[from] keel_db::DbError),
}

/// The shortest rotation overlap: longer than the worker's key reload
/// (30 s), the agents' key refresh (60 s) and a task's lifetime (300 s).
pub const MIN_OVERLAP_SECS: i64 = 600;

fn ca_context(kind: impl std::fmt::Display) -> String {
    format!("keel/ca/{kind}")
}

fn signing_key_context(key_id: &str) -> String {
    format!("keel/task-signing-key/{key_id}")
}

fn ca_resource(kind: CaKind) -> ResourceName {
    ResourceName::new(None, None, None, "certificate-authority", kind)
}

fn signing_key_resource(key_id: &str) -> ResourceName {
    ResourceName::new(None, None, None, "task-signing-key", key_id)
}

/// The CA of `kind`, created (and audited) if there is none and `create`.
/// Two processes creating at once is harmless: one row wins and both
/// return it.
pub async fn authority(
    db: &Db,
    kms: &AnyKms,
    kind: CaKind,
    create: bool,
) -> Result<CertificateAuthority, TrustError> {
    if let Some(ca) = load_authority(db, kms, kind).await? {
        return Ok(ca);
    }
    if !create {
        return Err(TrustError::MissingAuthority(kind));
    }
    let ca = CertificateAuthority::generate(kind)?;
    let key_pem = Zeroizing::new(ca.key_pem());
    let sealed = envelope::seal(kms, &ca_context(kind), key_pem.as_bytes()).await?;
    let mut tx = db
        .begin_system(RequestMeta::system("api", "trust-bootstrap"))
        .await?;
    let inserted = sqlx::query(
        "INSERT INTO certificate_authorities (kind, certificate_pem, private_key_sealed)
         VALUES ($1, $2, $3) ON CONFLICT (kind) DO NOTHING",
    )
    .bind(kind.to_string())
    .bind(ca.cert_pem())
    .bind(&sealed)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return load_authority(db, kms, kind)
            .await?
            .ok_or(TrustError::MissingAuthority(kind));
    }
    tx.commit(
        Audit::new("pki.ca.create", None, ca_resource(kind)).with_details(serde_json::json!({
            "fingerprint_sha256": ca.fingerprint_sha256_hex(),
            "not_after": ca.not_after().unix_timestamp(),
        })),
    )
    .await?;
    tracing::info!(%kind, fingerprint = %ca.fingerprint_sha256_hex(), "created a certificate authority");
    Ok(ca)
}

async fn load_authority(
    db: &Db,
    kms: &AnyKms,
    kind: CaKind,
) -> Result<Option<CertificateAuthority>, TrustError> {
    let mut tx = db.begin_bookkeeping().await?;
    let row: Option<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT certificate_pem, private_key_sealed FROM certificate_authorities WHERE kind = $1",
    )
    .bind(kind.to_string())
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some((cert_pem, sealed)) = row else {
        return Ok(None);
    };
    let key_pem = envelope::open(kms, &ca_context(kind), &sealed).await?;
    let key_pem = std::str::from_utf8(&key_pem)
        .map_err(|_| TrustError::Damaged(format!("the {kind} CA key is not PEM")))?;
    Ok(Some(CertificateAuthority::from_pem(
        kind, &cert_pem, key_pem,
    )?))
}

/// A task-signing key as published to agents (public data only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PublishedSigningKey {
    pub key_id: String,
    /// Base64 of the 32 raw bytes of the Ed25519 public key.
    pub public_key: String,
    /// Unix seconds from which the control plane signs with this key.
    pub signs_from: i64,
    /// Unix seconds after which agents stop trusting it; absent while it
    /// is the newest key.
    pub retires_at: Option<i64>,
    /// Base64 of the control-plane CA's signature over the key,
    /// `signs_from` and `retires_at` (`keel_task::key_statement`).
    pub ca_signature: String,
}

type SigningKeyRow = (
    String,
    String,
    OffsetDateTime,
    Option<OffsetDateTime>,
    Vec<u8>,
);

fn published(row: SigningKeyRow) -> PublishedSigningKey {
    let (key_id, public_key, signs_from, retires_at, ca_signature) = row;
    PublishedSigningKey {
        key_id,
        public_key,
        signs_from: signs_from.unix_timestamp(),
        retires_at: retires_at.map(OffsetDateTime::unix_timestamp),
        ca_signature: BASE64.encode(ca_signature),
    }
}

/// The CA's signature over a key's statement.
fn sign_key_statement(
    ca: &CertificateAuthority,
    signer: &TaskSigner,
    signs_from: OffsetDateTime,
    retires_at: Option<OffsetDateTime>,
) -> Result<Vec<u8>, TrustError> {
    let statement = key_statement(
        &signer.verifying_key(),
        signs_from.unix_timestamp(),
        retires_at.map(OffsetDateTime::unix_timestamp),
    );
    Ok(ca.sign_statement(KEY_STATEMENT_DOMAIN, &statement)?)
}

/// Every task-signing key, retired ones included, oldest first (agents keep
/// the retirements they learn). Run in a system transaction.
pub async fn published_signing_keys(
    conn: &mut PgConnection,
) -> Result<Vec<PublishedSigningKey>, sqlx::Error> {
    let rows: Vec<SigningKeyRow> = sqlx::query_as(
        "SELECT key_id, public_key, signs_from, retires_at, ca_signature
           FROM task_signing_keys
          ORDER BY signs_from, key_id",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(published).collect())
}

/// A task-signing key the worker can sign with.
pub struct LoadedSigner {
    pub signer: TaskSigner,
    pub signs_from: OffsetDateTime,
    pub retires_at: Option<OffsetDateTime>,
}

/// The signer to use at `now`: the newest key whose `signs_from` has come
/// and that has not retired.
pub fn current_signer(signers: &[LoadedSigner], now: OffsetDateTime) -> Option<&TaskSigner> {
    signers
        .iter()
        .filter(|key| key.signs_from <= now && key.retires_at.is_none_or(|retires| retires > now))
        .max_by_key(|key| key.signs_from)
        .map(|key| &key.signer)
}

/// Every task-signing key not yet retired, with its private half opened.
pub async fn signers(db: &Db, kms: &AnyKms) -> Result<Vec<LoadedSigner>, TrustError> {
    let mut tx = db.begin_bookkeeping().await?;
    let rows: Vec<(String, Vec<u8>, OffsetDateTime, Option<OffsetDateTime>)> = sqlx::query_as(
        "SELECT key_id, private_key_sealed, signs_from, retires_at FROM task_signing_keys
          WHERE retires_at IS NULL OR retires_at > now() ORDER BY signs_from",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut loaded = Vec::with_capacity(rows.len());
    for (key_id, sealed, signs_from, retires_at) in rows {
        // One damaged (or planted) row must not stop every worker.
        match open_signer(kms, &key_id, &sealed).await {
            Ok(signer) => loaded.push(LoadedSigner {
                signer,
                signs_from,
                retires_at,
            }),
            Err(error) => {
                tracing::error!(%key_id, %error, "a task-signing key does not open; skipping it");
            }
        }
    }
    Ok(loaded)
}

async fn open_signer(kms: &AnyKms, key_id: &str, sealed: &[u8]) -> Result<TaskSigner, TrustError> {
    let pem = envelope::open(kms, &signing_key_context(key_id), sealed).await?;
    let pem = std::str::from_utf8(&pem)
        .map_err(|_| TrustError::Damaged(format!("task-signing key {key_id} is not PEM")))?;
    let signer = TaskSigner::from_pkcs8_pem(pem)
        .map_err(|error| TrustError::Damaged(format!("task-signing key {key_id}: {error}")))?;
    if signer.key_id() != key_id {
        return Err(TrustError::Damaged(format!(
            "task-signing key {key_id} holds key {}",
            signer.key_id()
        )));
    }
    Ok(signer)
}

fn whole_seconds(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(0).unwrap_or(at)
}

/// Creates the first task-signing key if there is none (the api's
/// start-up). Serialised with rotations by a table lock.
pub async fn ensure_signing_key(
    db: &Db,
    kms: &AnyKms,
    ca: &CertificateAuthority,
) -> Result<(), TrustError> {
    let mut tx = db
        .begin_system(RequestMeta::system("api", "trust-bootstrap"))
        .await?;
    lock_signing_keys(tx.conn()).await?;
    let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM task_signing_keys)")
        .fetch_one(tx.conn())
        .await?;
    if any {
        tx.rollback().await?;
        return Ok(());
    }
    let signer = TaskSigner::generate();
    let signs_from = db_now(tx.conn()).await?;
    insert_signing_key(tx.conn(), kms, ca, &signer, signs_from).await?;
    tx.commit(
        Audit::new(
            "task_signing_key.create",
            None,
            signing_key_resource(signer.key_id()),
        )
        .with_details(serde_json::json!({ "signs_from": signs_from.unix_timestamp() })),
    )
    .await?;
    tracing::info!(
        key_id = signer.key_id(),
        "created the first task-signing key"
    );
    Ok(())
}

async fn lock_signing_keys(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("LOCK TABLE task_signing_keys IN SHARE ROW EXCLUSIVE MODE")
        .execute(conn)
        .await
        .map(|_| ())
}

/// The database's clock, in whole seconds: one clock for every process.
async fn db_now(conn: &mut PgConnection) -> Result<OffsetDateTime, sqlx::Error> {
    let now: OffsetDateTime = sqlx::query_scalar("SELECT date_trunc('second', now())")
        .fetch_one(conn)
        .await?;
    Ok(whole_seconds(now))
}

async fn insert_signing_key(
    conn: &mut PgConnection,
    kms: &AnyKms,
    ca: &CertificateAuthority,
    signer: &TaskSigner,
    signs_from: OffsetDateTime,
) -> Result<(), TrustError> {
    let ca_signature = sign_key_statement(ca, signer, signs_from, None)?;
    let sealed = envelope::seal(
        kms,
        &signing_key_context(signer.key_id()),
        signer.to_pkcs8_pem().as_bytes(),
    )
    .await?;
    sqlx::query(
        "INSERT INTO task_signing_keys (key_id, public_key, private_key_sealed, signs_from, ca_signature)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(signer.key_id())
    .bind(verifying_key_to_base64(&signer.verifying_key()))
    .bind(&sealed)
    .bind(signs_from)
    .bind(&ca_signature)
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds a task-signing key that signs from `now + overlap` and retires
/// every other live key at `now + 2 × overlap`, each statement signed by
/// the control-plane CA `ca`. Refused while the previous rotation's key has
/// not started signing. Audited as `task_signing_key.rotate`.
pub async fn rotate_signing_key(
    db: &Db,
    kms: &AnyKms,
    ca: &CertificateAuthority,
    meta: RequestMeta,
    overlap: Duration,
) -> Result<PublishedSigningKey, TrustError> {
    if overlap < Duration::seconds(MIN_OVERLAP_SECS) {
        return Err(TrustError::InvalidOverlap);
    }
    let mut tx = db.begin_system(meta).await?;
    lock_signing_keys(tx.conn()).await?;
    let now = db_now(tx.conn()).await?;
    let pending: Option<String> =
        sqlx::query_scalar("SELECT key_id FROM task_signing_keys WHERE signs_from > $1 LIMIT 1")
            .bind(now)
            .fetch_optional(tx.conn())
            .await?;
    if let Some(key_id) = pending {
        return Err(TrustError::RotationPending(key_id));
    }
    let rows: Vec<(String, Vec<u8>, OffsetDateTime, Option<OffsetDateTime>)> = sqlx::query_as(
        "SELECT key_id, private_key_sealed, signs_from, retires_at FROM task_signing_keys
          WHERE retires_at IS NULL OR retires_at > $1",
    )
    .bind(now)
    .fetch_all(tx.conn())
    .await?;
    let signer = TaskSigner::generate();
    let signs_from = now + overlap;
    let retires_at = signs_from + overlap;
    insert_signing_key(tx.conn(), kms, ca, &signer, signs_from).await?;
    for (key_id, sealed, old_signs_from, old_retires_at) in rows {
        let retires = old_retires_at.map_or(retires_at, |current| current.min(retires_at));
        if old_retires_at == Some(retires) {
            continue;
        }
        let old = open_signer(kms, &key_id, &sealed).await?;
        let ca_signature = sign_key_statement(ca, &old, old_signs_from, Some(retires))?;
        sqlx::query(
            "UPDATE task_signing_keys SET retires_at = $2, ca_signature = $3 WHERE key_id = $1",
        )
        .bind(&key_id)
        .bind(retires)
        .bind(&ca_signature)
        .execute(tx.conn())
        .await?;
    }
    let key: PublishedSigningKey = sqlx::query_as::<_, SigningKeyRow>(
        "SELECT key_id, public_key, signs_from, retires_at, ca_signature
           FROM task_signing_keys WHERE key_id = $1",
    )
    .bind(signer.key_id())
    .fetch_one(tx.conn())
    .await
    .map(published)?;
    tx.commit(
        Audit::new(
            "task_signing_key.rotate",
            None,
            signing_key_resource(&key.key_id),
        )
        .with_details(serde_json::json!({
            "signs_from": key.signs_from,
            "others_retire_at": retires_at.unix_timestamp(),
        })),
    )
    .await?;
    Ok(key)
}

/// Re-seals every stored private key under a new data key from the KMS's
/// current master key (after a master-key rotation). Returns how many.
pub async fn rewrap(db: &Db, kms: &AnyKms, meta: RequestMeta) -> Result<usize, TrustError> {
    let mut tx = db.begin_system(meta).await?;
    lock_signing_keys(tx.conn()).await?;
    let authorities: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT kind, private_key_sealed FROM certificate_authorities ORDER BY kind FOR UPDATE",
    )
    .fetch_all(tx.conn())
    .await?;
    let keys: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT key_id, private_key_sealed FROM task_signing_keys ORDER BY key_id")
            .fetch_all(tx.conn())
            .await?;
    let mut count = 0;
    for (kind, sealed) in authorities {
        let context = ca_context(&kind);
        let secret = envelope::open(kms, &context, &sealed).await?;
        let resealed = envelope::seal(kms, &context, &secret).await?;
        sqlx::query("UPDATE certificate_authorities SET private_key_sealed = $2 WHERE kind = $1")
            .bind(&kind)
            .bind(&resealed)
            .execute(tx.conn())
            .await?;
        count += 1;
    }
    for (key_id, sealed) in keys {
        let context = signing_key_context(&key_id);
        let secret = envelope::open(kms, &context, &sealed).await?;
        let resealed = envelope::seal(kms, &context, &secret).await?;
        sqlx::query("UPDATE task_signing_keys SET private_key_sealed = $2 WHERE key_id = $1")
            .bind(&key_id)
            .bind(&resealed)
            .execute(tx.conn())
            .await?;
        count += 1;
    }
    tx.commit(
        Audit::new(
            "kms.rewrap",
            None,
            ResourceName::new(None, None, None, "kms", "master-key"),
        )
        .with_details(serde_json::json!({ "secrets": count })),
    )
    .await?;
    Ok(count)
}

/// The master keys that sealed the stored secrets, with how many each
/// (to see when a retired master key is no longer needed).
pub async fn master_key_usage(db: &Db) -> Result<Vec<(String, usize)>, TrustError> {
    let mut tx = db.begin_bookkeeping().await?;
    let sealed: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT private_key_sealed FROM certificate_authorities
         UNION ALL SELECT private_key_sealed FROM task_signing_keys",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut usage: Vec<(String, usize)> = Vec::new();
    for envelope in sealed {
        let key = envelope::master_key_id(&envelope)?;
        match usage.iter_mut().find(|(id, _)| *id == key) {
            Some((_, count)) => *count += 1,
            None => usage.push((key, 1)),
        }
    }
    Ok(usage)
}
