//! Authorisation: ONE decision function, [`decide`], for every request,
//! and lookups that return already-authorised handles.
//!
//! Deny by default: an action is allowed only if [`decide`] lists it for
//! the caller's role. A caller who may not even read a resource gets 404
//! (never 403, which would confirm that it exists); a caller who may read
//! it but not do this to it gets 403.

use keel_core::ids::{ProjectId, TenantId, UserId};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::{AuthError, Principal};

/// A member's role in a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Member,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// Everything a principal can ask to do. Named `<resource>_<verb>`, like
/// the handlers and operation ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    FlavorList,
    ProjectList,
    ProjectRead,
    AllocationList,
    AllocationRead,
    AllocationCreate,
    AllocationTerminate,
}

impl Action {
    /// The action that decides whether the caller may see the resource at
    /// all (for the 404-versus-403 choice).
    fn read_action(self) -> Action {
        match self {
            Action::FlavorList => Action::FlavorList,
            Action::ProjectList | Action::ProjectRead => Action::ProjectRead,
            Action::AllocationList
            | Action::AllocationRead
            | Action::AllocationCreate
            | Action::AllocationTerminate => Action::AllocationRead,
        }
    }
}

/// The decision: may a member with `role` do `action`? Pure, total, and
/// the only place this is answered.
pub fn decide(role: Role, action: Action) -> bool {
    use Action::*;
    match role {
        Role::Owner | Role::Admin | Role::Member => true,
        Role::Viewer => matches!(
            action,
            FlavorList | ProjectList | ProjectRead | AllocationList | AllocationRead
        ),
    }
}

/// Proof that the caller may perform `action` on this project. Functions
/// that touch a project's resources take this, never a bare id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectHandle {
    pub tenant_id: TenantId,
    pub project_id: ProjectId,
    pub action: Action,
}

/// Proof that the caller may perform a tenant-wide `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantHandle {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub role: Role,
}

async fn member_role(
    conn: &mut PgConnection,
    principal: &Principal,
) -> Result<Option<Role>, AuthError> {
    let role: Option<String> =
        sqlx::query_scalar("SELECT role FROM memberships WHERE tenant_id = $1 AND user_id = $2")
            .bind(principal.tenant_id)
            .bind(principal.user_id)
            .fetch_optional(conn)
            .await?;
    Ok(role.as_deref().and_then(Role::parse))
}

/// Authorises a tenant-wide action (e.g. listing projects). The caller's
/// membership is read in the same transaction as the work it guards.
pub async fn authorize_tenant(
    conn: &mut PgConnection,
    principal: &Principal,
    action: Action,
) -> Result<TenantHandle, AuthError> {
    let role = authorize_tenant_membership(conn, principal).await?;
    if !decide(role, action) {
        return Err(AuthError::Forbidden("your role does not allow this"));
    }
    Ok(TenantHandle {
        tenant_id: principal.tenant_id,
        user_id: principal.user_id,
        role,
    })
}

/// Authorises `action` on a project: 404 when the project does not exist
/// or is not visible to the caller, 403 when it is visible but the action
/// is not allowed.
pub async fn authorize_project(
    conn: &mut PgConnection,
    principal: &Principal,
    action: Action,
    project_id: ProjectId,
) -> Result<ProjectHandle, AuthError> {
    let tenant = authorize_tenant_membership(conn, principal).await?;
    // Row-level security already hides other tenants' projects; the tenant
    // filter here is the application's half of the double isolation.
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM projects WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL)",
    )
    .bind(project_id)
    .bind(principal.tenant_id)
    .fetch_one(&mut *conn)
    .await?;
    if !exists || !decide(tenant, action.read_action()) {
        return Err(AuthError::NotFound("project"));
    }
    if !decide(tenant, action) {
        return Err(AuthError::Forbidden("your role does not allow this"));
    }
    Ok(ProjectHandle {
        tenant_id: principal.tenant_id,
        project_id,
        action,
    })
}

async fn authorize_tenant_membership(
    conn: &mut PgConnection,
    principal: &Principal,
) -> Result<Role, AuthError> {
    member_role(conn, principal)
        .await?
        .ok_or(AuthError::Unauthenticated(
            "the session's tenant membership no longer exists",
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_may_do_everything_and_viewers_only_read() {
        let all = [
            Action::FlavorList,
            Action::ProjectList,
            Action::ProjectRead,
            Action::AllocationList,
            Action::AllocationRead,
            Action::AllocationCreate,
            Action::AllocationTerminate,
        ];
        for action in all {
            assert!(decide(Role::Owner, action));
        }
        assert!(decide(Role::Viewer, Action::AllocationRead));
        assert!(!decide(Role::Viewer, Action::AllocationCreate));
        assert!(!decide(Role::Viewer, Action::AllocationTerminate));
    }
}
