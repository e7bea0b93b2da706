//! Flavor lookups and the capacity ledger.

use keel_core::ids::HostId;
use sqlx::PgConnection;

use crate::{Flavor, InventoryError};

/// Every flavor that can still be launched, smallest first.
pub async fn flavor_list(conn: &mut PgConnection) -> Result<Vec<Flavor>, InventoryError> {
    Ok(sqlx::query_as(
        "SELECT name, vcpus, memory_mib, gpu_model, gpu_count, disk_gib FROM flavors
         WHERE retired_at IS NULL ORDER BY gpu_count, vcpus, memory_mib, name",
    )
    .fetch_all(conn)
    .await?)
}

/// A launchable flavor by name.
pub async fn flavor_get(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<Flavor>, InventoryError> {
    Ok(sqlx::query_as(
        "SELECT name, vcpus, memory_mib, gpu_model, gpu_count, disk_gib FROM flavors
         WHERE name = $1 AND retired_at IS NULL",
    )
    .bind(name)
    .fetch_optional(conn)
    .await?)
}

/// A flavor by name, retired or not: for allocations that already hold it.
pub async fn flavor_any(conn: &mut PgConnection, name: &str) -> Result<Flavor, InventoryError> {
    Ok(sqlx::query_as(
        "SELECT name, vcpus, memory_mib, gpu_model, gpu_count, disk_gib FROM flavors WHERE name = $1",
    )
    .bind(name)
    .fetch_one(conn)
    .await?)
}

/// Best fit: the schedulable host of the region with the least room that
/// is still enough, locked and charged in one statement (the
/// `hosts_placement` index serves the order).
macro_rules! place_sql {
    ($lock:literal) => {
        concat!(
            "WITH candidate AS (
                 SELECT id FROM hosts
                 WHERE state = 'ready' AND revoked_at IS NULL AND region = $1
                   AND vcpus - reserved_vcpus >= $2
                   AND memory_mib - reserved_memory_mib >= $3
                   AND gpu_count - reserved_gpus >= $4
                   AND ($4 = 0 OR gpu_model = $5)
                   AND disk_gib - reserved_disk_gib >= $6
                 ORDER BY vcpus - reserved_vcpus, memory_mib - reserved_memory_mib, id
                 LIMIT 1
                 ",
            $lock,
            "
             )
             UPDATE hosts SET reserved_vcpus = reserved_vcpus + $2,
                              reserved_memory_mib = reserved_memory_mib + $3,
                              reserved_gpus = reserved_gpus + $4,
                              reserved_disk_gib = reserved_disk_gib + $6
             FROM candidate WHERE hosts.id = candidate.id
             RETURNING hosts.id"
        )
    };
}
const PLACE_SKIPPING_LOCKED: &str = place_sql!("FOR UPDATE SKIP LOCKED");
const PLACE_WAITING: &str = place_sql!("FOR UPDATE");

/// Places `flavor` on a ready host of `region` that has room for it (CPUs,
/// memory, GPUs of its model, local disk) and
/// reserves the room, in the caller's transaction. Best fit: the host with
/// the least free vCPUs that still fits, so large hosts stay free for large
/// flavors. A GPU flavor only goes to a host with its GPU model. `None`
/// when no host fits.
///
/// The candidate row is locked (`FOR UPDATE`) before it is updated, so two
/// concurrent placements serialise on a host; the CHECK constraints on
/// `hosts` are the last line: a reservation beyond capacity fails the
/// transaction instead of over-committing.
pub async fn capacity_reserve(
    conn: &mut PgConnection,
    region: &str,
    flavor: &Flavor,
) -> Result<Option<HostId>, InventoryError> {
    // Concurrent placements all want the same best-fit host. The first
    // tries skip hosts another placement holds locked and take the next
    // best one, so placements proceed in parallel instead of queueing on
    // one row; the last try waits for the locks, so a locked host that
    // fits is never mistaken for no room. A candidate can also lose its
    // room between the choice and the lock; then the re-checked row drops
    // out and the next try looks again.
    const TRIES: usize = 4;
    for attempt in 0..TRIES {
        let sql = if attempt + 1 < TRIES {
            PLACE_SKIPPING_LOCKED
        } else {
            PLACE_WAITING
        };
        let placed: Option<HostId> = sqlx::query_scalar(sql)
            .bind(region)
            .bind(flavor.vcpus)
            .bind(i64::from(flavor.memory_mib))
            .bind(flavor.gpu_count)
            .bind(&flavor.gpu_model)
            .bind(i64::from(flavor.disk_gib))
            .fetch_optional(&mut *conn)
            .await?;
        if placed.is_some() {
            return Ok(placed);
        }
        let any_fits: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM hosts
                 WHERE state = 'ready' AND revoked_at IS NULL AND region = $1
                   AND vcpus - reserved_vcpus >= $2 AND memory_mib - reserved_memory_mib >= $3
                   AND gpu_count - reserved_gpus >= $4 AND ($4 = 0 OR gpu_model = $5)
                   AND disk_gib - reserved_disk_gib >= $6)",
        )
        .bind(region)
        .bind(flavor.vcpus)
        .bind(i64::from(flavor.memory_mib))
        .bind(flavor.gpu_count)
        .bind(&flavor.gpu_model)
        .bind(i64::from(flavor.disk_gib))
        .fetch_one(&mut *conn)
        .await?;
        if !any_fits {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Whether any enrolled, unrevoked host of `region` could run `flavor` if it
/// were empty (`None`: no such region). `false` means a launch can only
/// fail — a GPU flavor in a region without that GPU model, say — and is
/// refused instead of recorded as failed.
pub async fn region_can_run(
    conn: &mut PgConnection,
    region: &str,
    flavor: &Flavor,
) -> Result<Option<bool>, InventoryError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM hosts
                 WHERE region = r.name AND revoked_at IS NULL
                   AND vcpus >= $2 AND memory_mib >= $3 AND gpu_count >= $4
                   AND ($4 = 0 OR gpu_model = $5) AND disk_gib >= $6)
           FROM regions r WHERE r.name = $1",
    )
    .bind(region)
    .bind(flavor.vcpus)
    .bind(i64::from(flavor.memory_mib))
    .bind(flavor.gpu_count)
    .bind(&flavor.gpu_model)
    .bind(i64::from(flavor.disk_gib))
    .fetch_optional(conn)
    .await?)
}

/// Gives back what [`capacity_reserve`] took for `flavor` on `host`.
pub async fn capacity_release(
    conn: &mut PgConnection,
    host: HostId,
    flavor: &Flavor,
) -> Result<(), InventoryError> {
    sqlx::query(
        "UPDATE hosts SET reserved_vcpus = reserved_vcpus - $2,
                          reserved_memory_mib = reserved_memory_mib - $3,
                          reserved_gpus = reserved_gpus - $4,
                          reserved_disk_gib = reserved_disk_gib - $5
         WHERE id = $1",
    )
    .bind(host)
    .bind(flavor.vcpus)
    .bind(i64::from(flavor.memory_mib))
    .bind(flavor.gpu_count)
    .bind(i64::from(flavor.disk_gib))
    .execute(conn)
    .await?;
    Ok(())
}
