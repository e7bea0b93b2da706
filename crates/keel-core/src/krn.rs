//! Canonical resource names: `krn:keel:{region}:{tenant}:{project}:{kind}/{id}`.
//!
//! Everywhere a resource is referenced outside its own table (audit rows,
//! outbox events, logs, errors) it is referenced by this name, so one grep
//! finds every trace of it. Segments that do not apply are left empty, e.g. a
//! tenant is `krn:keel::{tenant}::tenant/{tenant}` and a host (operator
//! inventory, owned by no tenant) is `krn:keel:{region}:::host/{id}`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{ProjectId, TenantId};

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResourceName(String);

impl ResourceName {
    /// Builds a name from its parts. `kind` and `id` must not contain `:`;
    /// callers pass constants and ids, never user input.
    pub fn new(
        region: Option<&str>,
        tenant: Option<TenantId>,
        project: Option<ProjectId>,
        kind: &str,
        id: impl fmt::Display,
    ) -> Self {
        let tenant = tenant.map(|t| t.to_string()).unwrap_or_default();
        let project = project.map(|p| p.to_string()).unwrap_or_default();
        Self(format!(
            "krn:keel:{}:{tenant}:{project}:{kind}/{id}",
            region.unwrap_or("")
        ))
    }

    pub fn tenant(tenant: TenantId) -> Self {
        Self::new(None, Some(tenant), None, "tenant", tenant)
    }

    pub fn project(tenant: TenantId, project: ProjectId) -> Self {
        Self::new(None, Some(tenant), Some(project), "project", project)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn a_project_resource_name_has_every_segment_in_order() {
        let tenant = TenantId(Uuid::nil());
        let project = ProjectId(Uuid::max());
        let name = ResourceName::new(
            Some("local-1"),
            Some(tenant),
            Some(project),
            "allocation",
            7,
        );
        assert_eq!(
            name.as_str(),
            format!("krn:keel:local-1:{tenant}:{project}:allocation/7")
        );
    }

    #[test]
    fn a_tenant_resource_name_leaves_region_and_project_empty() {
        let tenant = TenantId(Uuid::nil());
        assert_eq!(
            ResourceName::tenant(tenant).as_str(),
            format!("krn:keel::{tenant}::tenant/{tenant}")
        );
    }
}
