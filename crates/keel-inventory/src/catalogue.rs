//! What can be launched, and where: regions, the flavor catalogue and how
//! many of each flavor fit right now.
//!
//! Operators create regions and flavors and retire flavors; a flavor's
//! name is never reused (allocations, usage records and prices name it),
//! and its size never changes — a different size is a new flavor. Retiring
//! a flavor stops new launches only: what runs on it keeps running.

use keel_db::{Audit, NewEvent, WriteTx};
use keel_http::FieldError;

use crate::enrol::field;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::InventoryError;
use keel_core::ResourceName;

/// Largest flavor dimensions accepted (far above any real host, well within
/// the columns).
const MAX_VCPUS: i32 = 4096;
const MAX_MEMORY_MIB: i32 = 64 * 1024 * 1024;
const MAX_GPUS: i32 = 64;
const MAX_DISK_GIB: i32 = 1024 * 1024;

/// `POST /v1/admin/flavors`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewFlavor {
    /// Lowercase letters, digits, `.` and `-`, 1–60 characters.
    #[schema(example = "gpu.h100.8")]
    pub name: String,
    pub vcpus: i32,
    pub memory_mib: i32,
    /// The GPU model agents report (`nvidia-smi`'s name, normalised, e.g.
    /// `nvidia-h100-80gb-hbm3`); required exactly when `gpu_count` > 0.
    #[serde(default)]
    pub gpu_model: Option<String>,
    #[serde(default)]
    pub gpu_count: i32,
    pub disk_gib: i32,
}

impl NewFlavor {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let name_ok = (1..=60).contains(&self.name.len())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !name_ok {
            errors.push(field(
                "name",
                "invalid",
                "1–60 characters: lowercase letters, digits, '.' and '-'",
            ));
        }
        let mut range = |name: &str, value: i32, min: i32, max: i32| {
            if !(min..=max).contains(&value) {
                errors.push(field(
                    name,
                    "invalid",
                    &format!("must be between {min} and {max}"),
                ));
            }
        };
        range("vcpus", self.vcpus, 1, MAX_VCPUS);
        range("memory_mib", self.memory_mib, 1, MAX_MEMORY_MIB);
        range("gpu_count", self.gpu_count, 0, MAX_GPUS);
        range("disk_gib", self.disk_gib, 0, MAX_DISK_GIB);
        match (&self.gpu_model, self.gpu_count) {
            (None, 0) => {}
            (Some(model), count) if count > 0 => {
                let model_ok = (1..=64).contains(&model.len())
                    && model.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                    });
                if !model_ok {
                    errors.push(field(
                        "gpu_model",
                        "invalid",
                        "1–64 characters: lowercase letters, digits, '.' and '-'",
                    ));
                }
            }
            (Some(_), _) => errors.push(field(
                "gpu_model",
                "invalid",
                "only a flavor with GPUs (gpu_count > 0) names a GPU model",
            )),
            (None, _) => errors.push(field(
                "gpu_model",
                "invalid",
                "a flavor with GPUs must name their model",
            )),
        }
        errors
    }
}

/// A flavor as operators see it (retired ones included).
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AdminFlavorView {
    pub name: String,
    pub vcpus: i32,
    pub memory_mib: i32,
    pub gpu_model: Option<String>,
    pub gpu_count: i32,
    pub disk_gib: i32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub retired_at: Option<OffsetDateTime>,
    pub version: i64,
    #[sqlx(skip)]
    pub resource_name: String,
}

impl AdminFlavorView {
    fn named(mut self) -> Self {
        self.resource_name = flavor_resource(&self.name).to_string();
        self
    }
}

const ADMIN_FLAVOR_COLUMNS: &str =
    "name, vcpus, memory_mib, gpu_model, gpu_count, disk_gib, created_at, retired_at, version";

fn flavor_resource(name: &str) -> ResourceName {
    ResourceName::new(None, None, None, "flavor", name)
}

/// Every flavor, retired ones too, smallest first.
pub async fn admin_flavor_list(
    conn: &mut PgConnection,
) -> Result<Vec<AdminFlavorView>, InventoryError> {
    let rows: Vec<AdminFlavorView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ADMIN_FLAVOR_COLUMNS} FROM flavors
          ORDER BY retired_at IS NOT NULL, gpu_count, vcpus, memory_mib, name"
    )))
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(AdminFlavorView::named).collect())
}

/// Creates a flavor (`flavor.created`).
pub async fn flavor_create(
    mut tx: WriteTx,
    new: NewFlavor,
) -> Result<AdminFlavorView, InventoryError> {
    let errors = new.validate();
    if !errors.is_empty() {
        return Err(InventoryError::Validation(errors));
    }
    let created: Option<AdminFlavorView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO flavors (name, vcpus, memory_mib, gpu_model, gpu_count, disk_gib)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING
         RETURNING {ADMIN_FLAVOR_COLUMNS}"
    )))
    .bind(&new.name)
    .bind(new.vcpus)
    .bind(new.memory_mib)
    .bind(&new.gpu_model)
    .bind(new.gpu_count)
    .bind(new.disk_gib)
    .fetch_optional(tx.conn())
    .await?;
    let created = created
        .ok_or_else(|| InventoryError::FlavorExists(new.name.clone()))?
        .named();
    let resource = flavor_resource(&created.name);
    tx.emit(NewEvent::new(
        "flavor.created",
        "flavor",
        flavor_aggregate_id(&created.name),
        created.version,
        None,
        resource.clone(),
        &created,
    ));
    tx.commit(Audit::new("flavor.create", None, resource))
        .await?;
    Ok(created)
}

/// Retires a flavor (`flavor.retired`): no new launches. Retiring a retired
/// flavor returns it unchanged.
pub async fn flavor_retire(
    mut tx: WriteTx,
    name: &str,
    expected_version: Option<i64>,
) -> Result<AdminFlavorView, InventoryError> {
    let current: Option<AdminFlavorView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ADMIN_FLAVOR_COLUMNS} FROM flavors WHERE name = $1 FOR UPDATE"
    )))
    .bind(name)
    .fetch_optional(tx.conn())
    .await?;
    let current = current.ok_or(InventoryError::FlavorNotFound)?;
    if expected_version.is_some_and(|expected| expected != current.version) {
        return Err(InventoryError::VersionMismatch);
    }
    if current.retired_at.is_some() {
        tx.rollback().await?;
        return Ok(current.named());
    }
    let retired: AdminFlavorView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE flavors SET retired_at = now(), version = version + 1 WHERE name = $1
         RETURNING {ADMIN_FLAVOR_COLUMNS}"
    )))
    .bind(name)
    .fetch_one(tx.conn())
    .await?;
    let retired = retired.named();
    let resource = flavor_resource(name);
    tx.emit(NewEvent::new(
        "flavor.retired",
        "flavor",
        flavor_aggregate_id(name),
        retired.version,
        None,
        resource.clone(),
        &retired,
    ));
    tx.commit(Audit::new("flavor.retire", None, resource))
        .await?;
    Ok(retired)
}

/// Flavors are keyed by name; their events need a stable aggregate id.
fn flavor_aggregate_id(name: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("keel:flavor:{name}").as_bytes(),
    )
}

/// A region.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RegionView {
    #[schema(example = "local-1")]
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// `POST /v1/admin/regions`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRegion {
    /// Lowercase letters, digits and `-`, 1–40 characters.
    #[schema(example = "eu-west-2")]
    pub name: String,
}

/// Every region, by name.
pub async fn region_list(conn: &mut PgConnection) -> Result<Vec<RegionView>, InventoryError> {
    Ok(
        sqlx::query_as("SELECT name, created_at FROM regions ORDER BY name")
            .fetch_all(conn)
            .await?,
    )
}

/// Creates a region (`region.created`).
pub async fn region_create(mut tx: WriteTx, new: NewRegion) -> Result<RegionView, InventoryError> {
    let name_ok = (1..=40).contains(&new.name.len())
        && new
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name_ok {
        return Err(InventoryError::Validation(vec![field(
            "name",
            "invalid",
            "1–40 characters: lowercase letters, digits and '-'",
        )]));
    }
    let created: Option<RegionView> = sqlx::query_as(
        "INSERT INTO regions (name) VALUES ($1) ON CONFLICT (name) DO NOTHING
         RETURNING name, created_at",
    )
    .bind(&new.name)
    .fetch_optional(tx.conn())
    .await?;
    let created = created.ok_or_else(|| InventoryError::RegionExists(new.name.clone()))?;
    let resource = ResourceName::new(Some(&created.name), None, None, "region", &created.name);
    tx.emit(NewEvent::new(
        "region.created",
        "region",
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("keel:region:{}", created.name).as_bytes(),
        ),
        1,
        None,
        resource.clone(),
        &created,
    ));
    tx.commit(Audit::new("region.create", None, resource))
        .await?;
    Ok(created)
}

/// How many of one flavor can launch now in one region.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Availability {
    pub region: String,
    pub flavor: String,
    /// How many more fit on the region's ready hosts right now, each on one
    /// host (what the scheduler would place; not a promise — a concurrent
    /// launch may take the room first).
    pub available: i64,
}

/// For every launchable flavor and every region (or one region): how many
/// more fit on ready hosts now. A host counts for a GPU flavor only with
/// that GPU model.
pub async fn availability(
    conn: &mut PgConnection,
    region: Option<&str>,
) -> Result<Vec<Availability>, InventoryError> {
    if let Some(region) = region {
        let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM regions WHERE name = $1)")
            .bind(region)
            .fetch_one(&mut *conn)
            .await?;
        if !known {
            return Err(InventoryError::UnknownRegion);
        }
    }
    Ok(sqlx::query_as(
        "SELECT r.name AS region, f.name AS flavor,
                COALESCE(sum(LEAST(
                    (h.vcpus - h.reserved_vcpus) / f.vcpus,
                    (h.memory_mib - h.reserved_memory_mib) / f.memory_mib,
                    CASE WHEN f.gpu_count = 0 THEN 2147483647
                         WHEN h.gpu_model = f.gpu_model
                              THEN (h.gpu_count - h.reserved_gpus) / f.gpu_count
                         ELSE 0 END,
                    CASE WHEN f.disk_gib = 0 THEN 2147483647
                         ELSE (h.disk_gib - h.reserved_disk_gib) / f.disk_gib END
                )) FILTER (WHERE h.id IS NOT NULL), 0)::bigint AS available
           FROM regions r
          CROSS JOIN flavors f
           LEFT JOIN hosts h ON h.region = r.name AND h.state = 'ready' AND h.revoked_at IS NULL
          WHERE f.retired_at IS NULL AND ($1::text IS NULL OR r.name = $1)
          GROUP BY r.name, f.name, f.gpu_count, f.vcpus, f.memory_mib
          ORDER BY r.name, f.gpu_count, f.vcpus, f.memory_mib, f.name",
    )
    .bind(region)
    .fetch_all(conn)
    .await?)
}
