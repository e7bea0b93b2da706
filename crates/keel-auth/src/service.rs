//! Identity service functions: registration and projects. Each
//! takes the transaction it works in; handlers only extract and map.

use keel_core::ids::{ProjectId, TenantId, UserId};
use keel_core::page::{Page, Paginated};
use keel_core::{Actor, ResourceName};
use keel_db::{Audit, Db, NewEvent, RequestMeta, Scope, WriteTx};

use crate::authz::{Action, ProjectHandle, TenantHandle, authorize_project_read};
use crate::model::{Project, ProjectRequest, RegisterRequest, RegisterResponse};
use crate::{AuthError, Principal, Role, password};

/// Creates a user, their tenant (they are its owner) and its `default`
/// project, in one audited transaction that runs inside the new tenant.
pub async fn register(
    db: &Db,
    meta: RequestMeta,
    request: RegisterRequest,
) -> Result<RegisterResponse, AuthError> {
    let errors = request.validate();
    if !errors.is_empty() {
        return Err(AuthError::Validation(errors));
    }
    let password_hash = password::hash(request.password).await?;
    let (user_id, tenant_id, project_id) = (UserId::new(), TenantId::new(), ProjectId::new());
    let meta = RequestMeta {
        actor: Actor::User { user_id, tenant_id },
        ..meta
    };
    let mut tx = db
        .begin_tenant(
            meta,
            Scope::Tenant {
                tenant_id,
                user_id: Some(user_id),
            },
        )
        .await?;
    let inserted = sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, $3)")
        .bind(user_id)
        .bind(request.email.trim())
        .bind(&password_hash)
        .execute(tx.conn())
        .await;
    match inserted {
        Err(error) if keel_db::is_unique_violation(&error, "users_email_key") => {
            return Err(AuthError::EmailTaken);
        }
        other => other?,
    };
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(tenant_id)
        .bind(request.tenant_name.trim())
        .execute(tx.conn())
        .await?;
    sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, $3)")
        .bind(tenant_id)
        .bind(user_id)
        .bind(Role::Owner.as_str())
        .execute(tx.conn())
        .await?;
    sqlx::query("INSERT INTO projects (id, tenant_id, name) VALUES ($1, $2, 'default')")
        .bind(project_id)
        .bind(tenant_id)
        .execute(tx.conn())
        .await?;
    let tenant_name = ResourceName::tenant(tenant_id);
    tx.emit(NewEvent::new(
        "tenant.registered",
        "tenant",
        tenant_id.as_uuid(),
        1,
        Some(tenant_id),
        tenant_name.clone(),
        serde_json::json!({ "tenant_id": tenant_id, "user_id": user_id, "project_id": project_id }),
    ));
    tx.audit(Audit::new(
        "project.create",
        Some(tenant_id),
        ResourceName::project(tenant_id, project_id),
    ));
    tx.commit(Audit::new("tenant.register", Some(tenant_id), tenant_name))
        .await?;
    Ok(RegisterResponse {
        user_id,
        tenant_id,
        project_id,
    })
}

/// The tenant's live projects, oldest first.
pub async fn project_list(
    conn: &mut sqlx::PgConnection,
    tenant: &TenantHandle,
    page: Page,
) -> Result<Paginated<Project>, AuthError> {
    let rows: Vec<Project> = sqlx::query_as(
        "SELECT id, tenant_id, name, created_at, version FROM projects
         WHERE tenant_id = $1 AND deleted_at IS NULL AND ($2::uuid IS NULL OR id > $2)
         ORDER BY id LIMIT $3",
    )
    .bind(tenant.tenant_id)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    Ok(Paginated::from_rows(rows, page, |project| {
        project.id.as_uuid()
    }))
}

const PROJECT_COLUMNS: &str = "id, tenant_id, name, created_at, version";

fn project_event(event_type: &'static str, project: &Project) -> NewEvent {
    NewEvent::new(
        event_type,
        "project",
        project.id.as_uuid(),
        project.version,
        Some(project.tenant_id),
        project.resource_name(),
        serde_json::json!({ "project_id": project.id, "name": project.name }),
    )
}

fn name_taken(error: sqlx::Error) -> AuthError {
    if keel_db::is_unique_violation(&error, "projects_tenant_name_key") {
        AuthError::ProjectNameTaken
    } else {
        AuthError::Database(error)
    }
}

/// Creates a project in the caller's tenant.
pub async fn project_create(
    mut tx: WriteTx,
    tenant: &TenantHandle,
    request: ProjectRequest,
) -> Result<Project, AuthError> {
    let errors = request.validate();
    if !errors.is_empty() {
        return Err(AuthError::Validation(errors));
    }
    let project: Project = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO projects (id, tenant_id, name) VALUES ($1, $2, $3) RETURNING {PROJECT_COLUMNS}"
    )))
    .bind(ProjectId::new())
    .bind(tenant.tenant_id)
    .bind(request.name.trim())
    .fetch_one(tx.conn())
    .await
    .map_err(name_taken)?;
    tx.emit(project_event("project.created", &project));
    tx.commit(Audit::new(
        "project.create",
        Some(project.tenant_id),
        ResourceName::project(project.tenant_id, project.id),
    ))
    .await?;
    Ok(project)
}

/// The caller's standing and the project, in one statement (the columns
/// are `PROJECT_COLUMNS`, written out: `concat!` takes only literals).
const PROJECT_READ: [&str; 3] = crate::authz::with_standing!(
    "SELECT s.role, s.grant_role, s.project_visible,
            p.id, p.tenant_id, p.name, p.created_at, p.version
       FROM ",
    " s
       LEFT JOIN projects p ON s.project_visible AND p.id = $4 AND p.tenant_id = $1
                           AND p.deleted_at IS NULL"
);

/// One live project of the caller's tenant, if the caller may read it:
/// the authorisation and the read are one statement (the hot read).
pub async fn project_get(
    conn: &mut sqlx::PgConnection,
    principal: &Principal,
    project_id: ProjectId,
) -> Result<Project, AuthError> {
    let (_, project) = authorize_project_read(
        conn,
        principal,
        Action::ProjectRead,
        project_id,
        &PROJECT_READ,
    )
    .await?;
    Ok(project)
}

/// Locks the project and checks the caller's expected version.
async fn project_lock(
    tx: &mut WriteTx,
    project: &ProjectHandle,
    expected: Option<i64>,
) -> Result<Project, AuthError> {
    let current: Project = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL FOR UPDATE"
    )))
    .bind(project.project_id)
    .bind(project.tenant_id)
    .fetch_optional(tx.conn())
    .await?
    .ok_or(AuthError::NotFound("project"))?;
    match expected {
        Some(version) if version != current.version => Err(AuthError::PreconditionFailed),
        _ => Ok(current),
    }
}

/// Renames a project. With `expected_version`, fails with
/// `PreconditionFailed` if the project changed since.
pub async fn project_update(
    mut tx: WriteTx,
    project: &ProjectHandle,
    request: ProjectRequest,
    expected_version: Option<i64>,
) -> Result<Project, AuthError> {
    let errors = request.validate();
    if !errors.is_empty() {
        return Err(AuthError::Validation(errors));
    }
    let current = project_lock(&mut tx, project, expected_version).await?;
    let updated: Project = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE projects SET name = $2, version = version + 1 WHERE id = $1 RETURNING {PROJECT_COLUMNS}"
    )))
    .bind(project.project_id)
    .bind(request.name.trim())
    .fetch_one(tx.conn())
    .await
    .map_err(name_taken)?;
    tx.emit(project_event("project.renamed", &updated));
    tx.commit(
        Audit::new(
            "project.update",
            Some(updated.tenant_id),
            ResourceName::project(updated.tenant_id, updated.id),
        )
        .with_details(serde_json::json!({ "from": current.name, "to": updated.name })),
    )
    .await?;
    Ok(updated)
}

/// Soft-deletes a project that holds no live allocations.
pub async fn project_delete(
    mut tx: WriteTx,
    project: &ProjectHandle,
    expected_version: Option<i64>,
) -> Result<(), AuthError> {
    let current = project_lock(&mut tx, project, expected_version).await?;
    let busy: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM allocations WHERE tenant_id = $1 AND project_id = $2
                        AND state NOT IN ('terminated', 'failed'))",
    )
    .bind(project.tenant_id)
    .bind(project.project_id)
    .fetch_one(tx.conn())
    .await?;
    if busy {
        return Err(AuthError::ProjectNotEmpty);
    }
    let deleted: Project = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE projects SET deleted_at = now(), version = version + 1 WHERE id = $1 RETURNING {PROJECT_COLUMNS}"
    )))
    .bind(project.project_id)
    .fetch_one(tx.conn())
    .await?;
    tx.emit(project_event("project.deleted", &deleted));
    tx.commit(Audit::new(
        "project.delete",
        Some(current.tenant_id),
        ResourceName::project(current.tenant_id, current.id),
    ))
    .await?;
    Ok(())
}
