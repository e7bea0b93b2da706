//! The audit log's hash chains: sealing (the worker) and verification (an
//! endpoint for tenants, `api audit verify` for operators).
//!
//! Each tenant's entries, and the platform's (no tenant), form one chain.
//! Writers insert entries unsealed; [`seal`] later gives each chain's
//! unsealed entries, in id order, the next sequence numbers and
//! `hash = SHA-256(previous hash ‖ canonical entry)`, and moves the chain's
//! head. [`verify`] walks a chain and reports the first broken link: an
//! entry whose content no longer matches its hash, a missing sequence
//! number (a deleted entry), a wrong back-link, or a head the chain does not
//! reach (entries deleted at the end).

use futures::TryStreamExt;
use keel_db::{Db, DbError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

/// The chain of entries without a tenant (operators, the system).
pub const PLATFORM_CHAIN: Uuid = Uuid::nil();
const GENESIS: [u8; 32] = [0; 32];
/// Entries sealed per chain per transaction.
const SEAL_BATCH: i64 = 1000;

#[derive(sqlx::FromRow)]
struct Entry {
    id: Uuid,
    occurred_at: OffsetDateTime,
    tenant_id: Option<Uuid>,
    actor: String,
    actor_detail: serde_json::Value,
    action: String,
    resource: String,
    request_id: String,
    outcome: String,
    details: serde_json::Value,
    chain_seq: Option<i64>,
    prev_hash: Option<Vec<u8>>,
    entry_hash: Option<Vec<u8>>,
}

const ENTRY_COLUMNS: &str = "id, occurred_at, tenant_id, actor, actor_detail, action, resource, request_id, outcome, details, chain_seq, prev_hash, entry_hash";

/// The hash of an entry at `seq` after `prev`. Every column that describes
/// what happened is covered; the JSON has sorted keys (serde_json's map),
/// and `occurred_at` is exact (Postgres keeps microseconds).
fn entry_hash(prev: &[u8], seq: i64, entry: &Entry) -> Vec<u8> {
    let canonical = serde_json::json!({
        "seq": seq,
        "id": entry.id,
        "occurred_at_ns": entry.occurred_at.unix_timestamp_nanos().to_string(),
        "tenant_id": entry.tenant_id,
        "actor": entry.actor,
        "actor_detail": entry.actor_detail,
        "action": entry.action,
        "resource": entry.resource,
        "request_id": entry.request_id,
        "outcome": entry.outcome,
        "details": entry.details,
    });
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(canonical.to_string().as_bytes());
    hasher.finalize().to_vec()
}

/// Seals every chain's unsealed entries (up to a batch per chain). Safe to
/// run from several workers at once: each chain's head row is locked while
/// it is extended. Returns how many entries were sealed.
pub async fn seal(db: &Db) -> Result<u64, DbError> {
    let chains: Vec<Uuid> = {
        let mut tx = db.begin_bookkeeping().await?;
        sqlx::query_scalar(
            "SELECT DISTINCT COALESCE(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
             FROM audit_log WHERE entry_hash IS NULL",
        )
        .fetch_all(&mut *tx)
        .await?
    };
    let mut sealed = 0;
    for chain in chains {
        sealed += seal_chain(db, chain).await?;
    }
    Ok(sealed)
}

async fn seal_chain(db: &Db, chain: Uuid) -> Result<u64, DbError> {
    let mut tx = db.begin_bookkeeping().await?;
    sqlx::query(
        "INSERT INTO audit_chain_heads (chain_id, seq, head_hash) VALUES ($1, 0, $2)
         ON CONFLICT (chain_id) DO NOTHING",
    )
    .bind(chain)
    .bind(GENESIS.as_slice())
    .execute(&mut *tx)
    .await?;
    let (mut seq, mut prev): (i64, Vec<u8>) = sqlx::query_as(
        "SELECT seq, head_hash FROM audit_chain_heads WHERE chain_id = $1 FOR UPDATE",
    )
    .bind(chain)
    .fetch_one(&mut *tx)
    .await?;
    let entries: Vec<Entry> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLUMNS} FROM audit_log
         WHERE COALESCE(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) = $1
           AND entry_hash IS NULL
         ORDER BY id LIMIT $2"
    )))
    .bind(chain)
    .bind(SEAL_BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if entries.is_empty() {
        return Ok(0);
    }
    let (mut ids, mut seqs, mut prevs, mut hashes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for entry in &entries {
        seq += 1;
        let hash = entry_hash(&prev, seq, entry);
        ids.push(entry.id);
        seqs.push(seq);
        prevs.push(std::mem::replace(&mut prev, hash.clone()));
        hashes.push(hash);
    }
    sqlx::query(
        "UPDATE audit_log a
         SET chain_seq = u.seq, prev_hash = u.prev, entry_hash = u.hash, sealed_at = now()
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bytea[], $4::bytea[]) AS u(id, seq, prev, hash)
         WHERE a.id = u.id",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(&prevs)
    .bind(&hashes)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE audit_chain_heads SET seq = $2, head_hash = $3, updated_at = now() WHERE chain_id = $1",
    )
    .bind(chain)
    .bind(seq)
    .bind(&prev)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(entries.len() as u64)
}

/// The first place a chain stops proving itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BrokenLink {
    /// The sequence number where the chain breaks.
    pub seq: i64,
    /// The entry found there, if any.
    pub entry_id: Option<Uuid>,
    /// `entry_altered`, `entry_missing`, `link_broken` or `tail_missing`.
    pub reason: &'static str,
}

/// The result of walking one chain.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ChainVerification {
    /// The tenant id, or the nil UUID for the platform chain.
    pub chain_id: Uuid,
    /// Sealed entries checked.
    pub entries_checked: i64,
    /// Entries written but not sealed yet (sealing runs every second or so).
    pub entries_unsealed: i64,
    pub valid: bool,
    pub first_broken: Option<BrokenLink>,
}

/// Walks `chain` on `conn` (a tenant transaction for a tenant's own chain,
/// a system one for any) and reports the first broken link.
pub async fn verify(conn: &mut PgConnection, chain: Uuid) -> Result<ChainVerification, DbError> {
    let head: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT seq, head_hash FROM audit_chain_heads WHERE chain_id = $1")
            .bind(chain)
            .fetch_optional(&mut *conn)
            .await?;
    let unsealed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log
         WHERE COALESCE(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) = $1 AND entry_hash IS NULL",
    )
    .bind(chain)
    .fetch_one(&mut *conn)
    .await?;
    let mut broken = None;
    let mut expected = 1_i64;
    let mut prev = GENESIS.to_vec();
    {
        let query = format!(
            "SELECT {ENTRY_COLUMNS} FROM audit_log
             WHERE COALESCE(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) = $1
               AND chain_seq IS NOT NULL
             ORDER BY chain_seq"
        );
        let mut rows = sqlx::query_as::<_, Entry>(sqlx::AssertSqlSafe(query))
            .bind(chain)
            .fetch(&mut *conn);
        while let Some(entry) = rows.try_next().await? {
            let seq = entry.chain_seq.unwrap_or_default();
            let stored = entry.entry_hash.clone().unwrap_or_default();
            let reason = if seq != expected {
                Some(("entry_missing", None))
            } else if entry.prev_hash.as_deref() != Some(prev.as_slice()) {
                Some(("link_broken", Some(entry.id)))
            } else if entry_hash(&prev, seq, &entry) != stored {
                Some(("entry_altered", Some(entry.id)))
            } else {
                None
            };
            if let Some((reason, entry_id)) = reason {
                broken = Some(BrokenLink {
                    seq: expected,
                    entry_id,
                    reason,
                });
                break;
            }
            prev = stored;
            expected += 1;
        }
    }
    let checked = expected - 1;
    if broken.is_none() {
        let (head_seq, head_hash) = head.unwrap_or((0, GENESIS.to_vec()));
        if head_seq != checked || head_hash != prev {
            broken = Some(BrokenLink {
                seq: checked + 1,
                entry_id: None,
                reason: "tail_missing",
            });
        }
    }
    Ok(ChainVerification {
        chain_id: chain,
        entries_checked: checked,
        entries_unsealed: unsealed,
        valid: broken.is_none(),
        first_broken: broken,
    })
}

/// Every chain that has a head or entries (for `api audit verify`).
pub async fn chains(conn: &mut PgConnection) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT chain_id FROM audit_chain_heads
         UNION SELECT DISTINCT COALESCE(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) FROM audit_log
         ORDER BY 1",
    )
    .fetch_all(conn)
    .await?)
}
