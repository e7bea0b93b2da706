//! Inventory types.

use keel_core::ResourceName;
use serde::Serialize;

/// A flavor: the size of an allocation.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Flavor {
    pub name: String,
    pub vcpus: i32,
    pub memory_mib: i32,
    pub gpu_model: Option<String>,
    pub gpu_count: i32,
    pub disk_gib: i32,
}

/// A flavor as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct FlavorView {
    #[schema(example = "cpu.small")]
    pub name: String,
    /// `krn:keel::::flavor/{name}`: flavors belong to the platform.
    pub resource_name: String,
    pub vcpus: i32,
    pub memory_mib: i32,
    /// GPU model, e.g. `nvidia-a100`; `null` for CPU-only flavors.
    pub gpu_model: Option<String>,
    pub gpu_count: i32,
    pub disk_gib: i32,
}

impl From<Flavor> for FlavorView {
    fn from(flavor: Flavor) -> Self {
        Self {
            resource_name: ResourceName::new(None, None, None, "flavor", &flavor.name).to_string(),
            name: flavor.name,
            vcpus: flavor.vcpus,
            memory_mib: flavor.memory_mib,
            gpu_model: flavor.gpu_model,
            gpu_count: flavor.gpu_count,
            disk_gib: flavor.disk_gib,
        }
    }
}
