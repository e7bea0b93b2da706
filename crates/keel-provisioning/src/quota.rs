//! Quotas: how much a tenant — and, if an operator says so, one of its
//! projects — may hold at once.
//!
//! Usage is what the tenant's allocations hold: every allocation that holds
//! capacity on a host counts (placed, running, stopped, lost…), with its
//! flavor's vCPUs, memory and GPUs. [`enforce`] runs in the transaction
//! that places an allocation, under a per-tenant advisory lock, so two
//! concurrent launches cannot both squeeze under the same limit. Limits
//! come from the tenant's own row, or the platform defaults; a project's
//! row adds a second, narrower limit. Lowering a limit below what is in use
//! stops new launches only; nothing running is touched.

use keel_core::ids::{ProjectId, TenantId};
use keel_db::{Audit, NewEvent, WriteTx};
use keel_http::FieldError;
use keel_inventory::Flavor;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::ProvisioningError;

/// Limits on what may be held at once.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    pub allocations: i32,
    pub vcpus: i32,
    pub memory_mib: i64,
    pub gpus: i32,
}

impl QuotaLimits {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut check = |field: &str, ok: bool| {
            if !ok {
                errors.push(FieldError {
                    field: field.to_owned(),
                    code: "invalid".to_owned(),
                    message: "must be between 0 and 1,000,000,000".to_owned(),
                });
            }
        };
        let range = 0..=1_000_000_000;
        check("allocations", range.contains(&self.allocations));
        check("vcpus", range.contains(&self.vcpus));
        check(
            "memory_mib",
            (0..=1_000_000_000_000).contains(&self.memory_mib),
        );
        check("gpus", range.contains(&self.gpus));
        errors
    }
}

/// What is held now.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema,
)]
pub struct QuotaUsage {
    pub allocations: i64,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub gpus: i64,
}

/// A tenant's quota: its limits, where they come from, and its usage.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TenantQuota {
    pub limits: QuotaLimits,
    /// `tenant` (set by an operator for this tenant) or `default`.
    pub source: &'static str,
    pub usage: QuotaUsage,
    /// The version of the tenant's own limits (its `ETag` for operators);
    /// `None` while the defaults apply.
    #[serde(skip)]
    pub version: Option<i64>,
}

/// Limits with the version of the row they come from.
#[derive(Clone, Copy, Debug, sqlx::FromRow)]
struct Versioned {
    #[sqlx(flatten)]
    limits: QuotaLimits,
    version: i64,
}

/// A project's quota: its own limits, if an operator set any (the tenant's
/// apply in any case), and its usage.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectQuota {
    pub limits: Option<QuotaLimits>,
    pub usage: QuotaUsage,
}

const LIMIT_COLUMNS: &str = "allocations, vcpus, memory_mib::bigint AS memory_mib, gpus";

async fn usage(
    conn: &mut PgConnection,
    tenant: TenantId,
    project: Option<ProjectId>,
) -> Result<QuotaUsage, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) AS allocations,
                COALESCE(sum(f.vcpus), 0)::bigint AS vcpus,
                COALESCE(sum(f.memory_mib), 0)::bigint AS memory_mib,
                COALESCE(sum(f.gpu_count), 0)::bigint AS gpus
           FROM allocations a JOIN flavors f ON f.name = a.flavor
          WHERE a.tenant_id = $1 AND a.reserved AND ($2::uuid IS NULL OR a.project_id = $2)",
    )
    .bind(tenant)
    .bind(project)
    .fetch_one(conn)
    .await
}

/// The platform defaults and their version.
pub async fn defaults(conn: &mut PgConnection) -> Result<(QuotaLimits, i64), ProvisioningError> {
    let row: Versioned = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {LIMIT_COLUMNS}, version FROM quota_defaults"
    )))
    .fetch_one(conn)
    .await?;
    Ok((row.limits, row.version))
}

/// A tenant's limits (its own or the defaults), their source and usage.
pub async fn tenant_quota(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> Result<TenantQuota, ProvisioningError> {
    let own: Option<Versioned> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {LIMIT_COLUMNS}, version FROM quotas WHERE tenant_id = $1 AND project_id IS NULL"
    )))
    .bind(tenant)
    .fetch_optional(&mut *conn)
    .await?;
    let (limits, source, version) = match own {
        Some(own) => (own.limits, "tenant", Some(own.version)),
        None => (defaults(conn).await?.0, "default", None),
    };
    Ok(TenantQuota {
        limits,
        source,
        usage: usage(conn, tenant, None).await?,
        version,
    })
}

/// A project's own limits (if any) and usage.
pub async fn project_quota(
    conn: &mut PgConnection,
    tenant: TenantId,
    project: ProjectId,
) -> Result<ProjectQuota, ProvisioningError> {
    let limits: Option<QuotaLimits> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {LIMIT_COLUMNS} FROM quotas WHERE tenant_id = $1 AND project_id = $2"
    )))
    .bind(tenant)
    .bind(project)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(ProjectQuota {
        limits,
        usage: usage(conn, tenant, Some(project)).await?,
    })
}

/// Which limit a launch would exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// `tenant` or `project`.
    pub scope: &'static str,
    /// `allocations`, `vcpus`, `memory_mib` or `gpus`.
    pub resource: &'static str,
    pub limit: i64,
    pub used: i64,
    pub requested: i64,
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "the {} quota for {} is {}: {} in use, {} more requested",
            self.scope, self.resource, self.limit, self.used, self.requested
        )
    }
}

fn first_exceeded(
    scope: &'static str,
    limits: &QuotaLimits,
    used: &QuotaUsage,
    flavor: &Flavor,
) -> Option<Exceeded> {
    [
        (
            "allocations",
            i64::from(limits.allocations),
            used.allocations,
            1,
        ),
        (
            "vcpus",
            i64::from(limits.vcpus),
            used.vcpus,
            i64::from(flavor.vcpus),
        ),
        (
            "memory_mib",
            limits.memory_mib,
            used.memory_mib,
            i64::from(flavor.memory_mib),
        ),
        (
            "gpus",
            i64::from(limits.gpus),
            used.gpus,
            i64::from(flavor.gpu_count),
        ),
    ]
    .into_iter()
    .find(|(_, limit, used, requested)| used + requested > *limit)
    .map(|(resource, limit, used, requested)| Exceeded {
        scope,
        resource,
        limit,
        used,
        requested,
    })
}

/// Refuses a launch of `flavor` in `project` that would take the tenant or
/// the project over a limit. Holds the tenant's quota lock until the
/// caller's transaction ends, so the placement that follows is counted
/// before any other launch of the tenant is checked.
pub async fn enforce(
    conn: &mut PgConnection,
    tenant: TenantId,
    project: ProjectId,
    flavor: &Flavor,
) -> Result<(), ProvisioningError> {
    // The lock first, in a statement of its own: the read below must take
    // its snapshot after the lock is held, or it could miss the placement
    // of the launch that held it before.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel.quota'), hashtext($1::text))")
        .bind(tenant)
        .execute(&mut *conn)
        .await?;
    // Both scopes' limits and usage in one round trip: the lock is held
    // until the transaction commits, so every round trip under it counts.
    let standing: Standing = sqlx::query_as(
        "WITH held AS (
             SELECT a.project_id = $2 AS in_project, f.vcpus, f.memory_mib, f.gpu_count
               FROM allocations a JOIN flavors f ON f.name = a.flavor
              WHERE a.tenant_id = $1 AND a.reserved
         ), tenant_limits AS (
             SELECT allocations, vcpus, memory_mib, gpus FROM (
                 SELECT allocations, vcpus, memory_mib, gpus, 0 AS rank
                   FROM quotas WHERE tenant_id = $1 AND project_id IS NULL
                 UNION ALL
                 SELECT allocations, vcpus, memory_mib, gpus, 1 FROM quota_defaults
             ) limits ORDER BY rank LIMIT 1
         ), used AS (
             SELECT count(*) AS allocations,
                    COALESCE(sum(vcpus), 0)::bigint AS vcpus,
                    COALESCE(sum(memory_mib), 0)::bigint AS memory_mib,
                    COALESCE(sum(gpu_count), 0)::bigint AS gpus,
                    count(*) FILTER (WHERE in_project) AS project_allocations,
                    COALESCE(sum(vcpus) FILTER (WHERE in_project), 0)::bigint AS project_vcpus,
                    COALESCE(sum(memory_mib) FILTER (WHERE in_project), 0)::bigint AS project_memory_mib,
                    COALESCE(sum(gpu_count) FILTER (WHERE in_project), 0)::bigint AS project_gpus
               FROM held
         )
         SELECT t.allocations AS tenant_allocations, t.vcpus AS tenant_vcpus,
                t.memory_mib::bigint AS tenant_memory_mib, t.gpus AS tenant_gpus,
                p.allocations AS project_allocations, p.vcpus AS project_vcpus,
                p.memory_mib::bigint AS project_memory_mib, p.gpus AS project_gpus,
                u.allocations AS used_allocations, u.vcpus AS used_vcpus,
                u.memory_mib AS used_memory_mib, u.gpus AS used_gpus,
                u.project_allocations AS project_used_allocations,
                u.project_vcpus AS project_used_vcpus,
                u.project_memory_mib AS project_used_memory_mib,
                u.project_gpus AS project_used_gpus
           FROM tenant_limits t CROSS JOIN used u
           LEFT JOIN quotas p ON p.tenant_id = $1 AND p.project_id = $2",
    )
    .bind(tenant)
    .bind(project)
    .fetch_one(&mut *conn)
    .await?;
    let tenant_limits = QuotaLimits {
        allocations: standing.tenant_allocations,
        vcpus: standing.tenant_vcpus,
        memory_mib: standing.tenant_memory_mib,
        gpus: standing.tenant_gpus,
    };
    let tenant_used = QuotaUsage {
        allocations: standing.used_allocations,
        vcpus: standing.used_vcpus,
        memory_mib: standing.used_memory_mib,
        gpus: standing.used_gpus,
    };
    if let Some(exceeded) = first_exceeded("tenant", &tenant_limits, &tenant_used, flavor) {
        return Err(ProvisioningError::QuotaExceeded(exceeded));
    }
    // A project without limits of its own has only the tenant's.
    if let (Some(allocations), Some(vcpus), Some(memory_mib), Some(gpus)) = (
        standing.project_allocations,
        standing.project_vcpus,
        standing.project_memory_mib,
        standing.project_gpus,
    ) {
        let project_limits = QuotaLimits {
            allocations,
            vcpus,
            memory_mib,
            gpus,
        };
        let project_used = QuotaUsage {
            allocations: standing.project_used_allocations,
            vcpus: standing.project_used_vcpus,
            memory_mib: standing.project_used_memory_mib,
            gpus: standing.project_used_gpus,
        };
        if let Some(exceeded) = first_exceeded("project", &project_limits, &project_used, flavor) {
            return Err(ProvisioningError::QuotaExceeded(exceeded));
        }
    }
    Ok(())
}

/// What [`enforce`] reads: both scopes' limits and usage.
#[derive(sqlx::FromRow)]
struct Standing {
    tenant_allocations: i32,
    tenant_vcpus: i32,
    tenant_memory_mib: i64,
    tenant_gpus: i32,
    project_allocations: Option<i32>,
    project_vcpus: Option<i32>,
    project_memory_mib: Option<i64>,
    project_gpus: Option<i32>,
    used_allocations: i64,
    used_vcpus: i64,
    used_memory_mib: i64,
    used_gpus: i64,
    project_used_allocations: i64,
    project_used_vcpus: i64,
    project_used_memory_mib: i64,
    project_used_gpus: i64,
}

/// Refuses a change made against a version that is not the current one
/// (`expected` from `If-Match`; `None` asks for no check). A quota that
/// does not exist has no version, so any expected one fails. Locks the row
/// until the change commits.
async fn expect_version(
    conn: &mut PgConnection,
    tenant: TenantId,
    project: Option<ProjectId>,
    expected: Option<i64>,
) -> Result<(), ProvisioningError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let current: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM quotas
         WHERE tenant_id = $1 AND project_id IS NOT DISTINCT FROM $2 FOR UPDATE",
    )
    .bind(tenant)
    .bind(project)
    .fetch_optional(conn)
    .await?;
    if current == Some(expected) {
        Ok(())
    } else {
        Err(ProvisioningError::PreconditionFailed)
    }
}

/// Sets a tenant's limits, or one project's (operators; `quota.updated`),
/// if `expected` (from `If-Match`) is absent or the current version.
/// Returns the limits and their new version.
pub async fn quota_set(
    mut tx: WriteTx,
    tenant: TenantId,
    project: Option<ProjectId>,
    limits: QuotaLimits,
    expected: Option<i64>,
) -> Result<(QuotaLimits, i64), ProvisioningError> {
    let errors = limits.validate();
    if !errors.is_empty() {
        return Err(ProvisioningError::Validation(errors));
    }
    scope_exists(tx.conn(), tenant, project).await?;
    expect_version(tx.conn(), tenant, project, expected).await?;
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO quotas (tenant_id, project_id, allocations, vcpus, memory_mib, gpus)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (tenant_id, project_id) DO UPDATE
            SET allocations = excluded.allocations, vcpus = excluded.vcpus,
                memory_mib = excluded.memory_mib, gpus = excluded.gpus,
                updated_at = now(), version = quotas.version + 1
         RETURNING version",
    )
    .bind(tenant)
    .bind(project)
    .bind(limits.allocations)
    .bind(limits.vcpus)
    .bind(limits.memory_mib)
    .bind(limits.gpus)
    .fetch_one(tx.conn())
    .await?;
    let resource = quota_resource(tenant, project);
    tx.emit(NewEvent::new(
        "quota.updated",
        "quota",
        quota_aggregate_id(tenant, project),
        version,
        Some(tenant),
        resource.clone(),
        serde_json::json!({ "tenant_id": tenant, "project_id": project, "limits": limits }),
    ));
    tx.commit(
        Audit::new("quota.update", Some(tenant), resource)
            .with_details(serde_json::json!({ "limits": limits })),
    )
    .await?;
    Ok((limits, version))
}

/// Removes a project's own limits (the tenant's still apply), if
/// `expected` (from `If-Match`) is absent or the current version.
pub async fn project_quota_remove(
    mut tx: WriteTx,
    tenant: TenantId,
    project: ProjectId,
    expected: Option<i64>,
) -> Result<(), ProvisioningError> {
    scope_exists(tx.conn(), tenant, Some(project)).await?;
    expect_version(tx.conn(), tenant, Some(project), expected).await?;
    let removed: Option<i64> = sqlx::query_scalar(
        "DELETE FROM quotas WHERE tenant_id = $1 AND project_id = $2 RETURNING version",
    )
    .bind(tenant)
    .bind(project)
    .fetch_optional(tx.conn())
    .await?;
    let Some(version) = removed else {
        tx.rollback().await?;
        return Ok(());
    };
    let resource = quota_resource(tenant, Some(project));
    tx.emit(NewEvent::new(
        "quota.removed",
        "quota",
        quota_aggregate_id(tenant, Some(project)),
        version + 1,
        Some(tenant),
        resource.clone(),
        serde_json::json!({ "tenant_id": tenant, "project_id": project }),
    ));
    tx.commit(Audit::new("quota.remove", Some(tenant), resource))
        .await?;
    Ok(())
}

/// Changes the platform defaults (operators; `quota.defaults_updated`),
/// if `expected` (from `If-Match`) is absent or the current version.
/// Returns the limits and their new version.
pub async fn defaults_set(
    mut tx: WriteTx,
    limits: QuotaLimits,
    expected: Option<i64>,
) -> Result<(QuotaLimits, i64), ProvisioningError> {
    let errors = limits.validate();
    if !errors.is_empty() {
        return Err(ProvisioningError::Validation(errors));
    }
    let version: Option<i64> = sqlx::query_scalar(
        "UPDATE quota_defaults SET allocations = $1, vcpus = $2, memory_mib = $3, gpus = $4,
                updated_at = now(), version = version + 1
         WHERE $5::bigint IS NULL OR version = $5
         RETURNING version",
    )
    .bind(limits.allocations)
    .bind(limits.vcpus)
    .bind(limits.memory_mib)
    .bind(limits.gpus)
    .bind(expected)
    .fetch_optional(tx.conn())
    .await?;
    let Some(version) = version else {
        return Err(ProvisioningError::PreconditionFailed);
    };
    let resource = keel_core::ResourceName::new(None, None, None, "platform", "quota-defaults");
    tx.emit(NewEvent::new(
        "quota.defaults_updated",
        "quota",
        uuid::Uuid::nil(),
        version,
        None,
        resource.clone(),
        serde_json::json!({ "limits": limits }),
    ));
    tx.commit(
        Audit::new("quota.defaults_update", None, resource)
            .with_details(serde_json::json!({ "limits": limits })),
    )
    .await?;
    Ok((limits, version))
}

/// 404 unless the tenant (and the project, in it) exist.
pub(crate) async fn scope_exists(
    conn: &mut PgConnection,
    tenant: TenantId,
    project: Option<ProjectId>,
) -> Result<(), ProvisioningError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM tenants WHERE id = $1)
            AND ($2::uuid IS NULL OR EXISTS (SELECT FROM projects WHERE tenant_id = $1 AND id = $2))",
    )
    .bind(tenant)
    .bind(project)
    .fetch_one(conn)
    .await?;
    if exists {
        Ok(())
    } else {
        Err(ProvisioningError::NotFound)
    }
}

fn quota_resource(tenant: TenantId, project: Option<ProjectId>) -> keel_core::ResourceName {
    match project {
        Some(project) => {
            keel_core::ResourceName::new(None, Some(tenant), Some(project), "quota", project)
        }
        None => keel_core::ResourceName::new(None, Some(tenant), None, "quota", tenant),
    }
}

/// Quotas are keyed by their scope; their events need a stable id.
fn quota_aggregate_id(tenant: TenantId, project: Option<ProjectId>) -> uuid::Uuid {
    let scope = project.map_or_else(|| tenant.to_string(), |project| project.to_string());
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("keel:quota:{tenant}:{scope}").as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_limit_a_launch_would_cross_is_named() {
        let flavor = Flavor {
            name: "cpu.medium".into(),
            vcpus: 2,
            memory_mib: 4096,
            gpu_model: None,
            gpu_count: 0,
            disk_gib: 40,
        };
        let limits = QuotaLimits {
            allocations: 3,
            vcpus: 4,
            memory_mib: 16384,
            gpus: 0,
        };
        let used = QuotaUsage {
            allocations: 1,
            vcpus: 2,
            memory_mib: 4096,
            gpus: 0,
        };
        assert_eq!(first_exceeded("tenant", &limits, &used, &flavor), None);
        let more = QuotaUsage {
            allocations: 2,
            vcpus: 3,
            ..used
        };
        let exceeded = first_exceeded("tenant", &limits, &more, &flavor).unwrap();
        assert_eq!(
            (exceeded.resource, exceeded.limit, exceeded.used),
            ("vcpus", 4, 3)
        );
        assert_eq!(
            exceeded.to_string(),
            "the tenant quota for vcpus is 4: 3 in use, 2 more requested"
        );
    }
}
