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
    pub const ALL: &'static [Role] = &[Role::Owner, Role::Admin, Role::Member, Role::Viewer];

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

/// Declares [`Action`] and [`Action::ALL`] from one list, so the matrix
/// snapshot can never miss a variant.
macro_rules! actions {
    ($($name:ident),+ $(,)?) => {
        /// Everything a principal can ask to do. Named `<resource>_<verb>`,
        /// like the handlers and operation ids.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Action {
            $($name),+
        }

        impl Action {
            /// Every action, in declaration order.
            pub const ALL: &'static [Action] = &[$(Action::$name),+];
        }
    };
}

actions! {
    AuditRead,
    FlavorList,
    ProjectList,
    ProjectRead,
    ProjectCreate,
    ProjectUpdate,
    ProjectDelete,
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
            Action::AuditRead => Action::AuditRead,
            Action::ProjectList
            | Action::ProjectRead
            | Action::ProjectCreate
            | Action::ProjectUpdate
            | Action::ProjectDelete => Action::ProjectRead,
            Action::AllocationList
            | Action::AllocationRead
            | Action::AllocationCreate
            | Action::AllocationTerminate => Action::AllocationRead,
        }
    }
}

/// The whole role × action matrix as text, one line per action: the
/// committed snapshot `authz-matrix.txt` is compared with it by a test.
pub fn matrix() -> String {
    let mut out = format!("{:<22}", "action");
    for role in Role::ALL {
        out.push_str(&format!(" {:<7}", role.as_str()));
    }
    out = out.trim_end().to_owned();
    out.push('\n');
    for action in Action::ALL {
        let mut line = format!("{:<22}", format!("{action:?}"));
        for role in Role::ALL {
            line.push_str(&format!(
                " {:<7}",
                if decide(*role, *action) {
                    "allow"
                } else {
                    "deny"
                }
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The decision: may a member with `role` do `action`? Pure, total, and
/// the only place this is answered.
pub fn decide(role: Role, action: Action) -> bool {
    use Action::*;
    match role {
        Role::Owner | Role::Admin => true,
        Role::Member => !matches!(
            action,
            AuditRead | ProjectCreate | ProjectUpdate | ProjectDelete
        ),
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
    fn the_role_action_matrix_matches_its_committed_snapshot() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/authz-matrix.txt");
        let produced = matrix();
        if std::env::var_os("KEEL_UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(path, &produced).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == produced,
            "the authorisation matrix changed; review it, then run with KEEL_UPDATE_SNAPSHOTS=1:\n{produced}"
        );
    }

    #[test]
    fn owners_may_do_everything_and_viewers_only_read() {
        for &action in Action::ALL {
            assert!(decide(Role::Owner, action));
        }
        assert!(decide(Role::Viewer, Action::AllocationRead));
        assert!(!decide(Role::Viewer, Action::AllocationCreate));
        assert!(!decide(Role::Viewer, Action::AllocationTerminate));
    }
}
