//! Tenant membership: members and their roles, invitations, and
//! per-project grants.
//!
//! Rules kept here, whatever the caller's role:
//! - A tenant always has an owner: the last owner can be neither demoted
//!   nor removed, and cannot leave. Every change that could take an owner
//!   away locks all owner rows (and the caller's and the target's) in one
//!   statement, in id order, so two owners demoting each other at once
//!   cannot both succeed and cannot deadlock.
//! - Only owners grant, change or take away the owner role
//!   (`Action::OwnerManage`), checked against the caller's role as locked.
//! - An invitation names an email; only a signed-in user with that email
//!   can accept it, once, before it expires.

use keel_core::ids::{InvitationId, ProjectId, TenantId, UserId};
use keel_core::page::{Page, Paginated};
use keel_core::{Actor, ResourceName};
use keel_db::{Audit, Db, NewEvent, RequestMeta, Scope, WriteTx};
use time::{Duration, OffsetDateTime};

use crate::authz::{Action, ProjectHandle, Subject, TenantHandle};
use crate::context::UserSession;
use crate::model::{
    GrantRequest, InvitationCreated, InvitationRequest, InvitationView, MemberUpdateRequest,
    MemberView, ProjectGrantView,
};
use crate::{AuthError, Role, secret};

/// How long an invitation can be accepted.
pub const INVITATION_TTL: Duration = Duration::days(7);
const INVITATION_PREFIX: &str = "kit";

pub fn member_name(tenant_id: TenantId, user_id: UserId) -> ResourceName {
    ResourceName::new(None, Some(tenant_id), None, "member", user_id)
}

fn invitation_name(tenant_id: TenantId, id: InvitationId) -> ResourceName {
    ResourceName::new(None, Some(tenant_id), None, "invitation", id)
}

fn grant_name(tenant_id: TenantId, project_id: ProjectId, user_id: UserId) -> ResourceName {
    ResourceName::new(None, Some(tenant_id), Some(project_id), "grant", user_id)
}

fn parse_role(value: &str) -> Result<Role, AuthError> {
    // The CHECK constraint allows only known roles; anything else is a bug.
    Role::parse(value).ok_or(AuthError::CorruptRole)
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    tenant_id: TenantId,
    user_id: UserId,
    email: String,
    role: String,
    created_at: OffsetDateTime,
    version: i64,
}

impl MemberRow {
    fn into_view(self) -> Result<MemberView, AuthError> {
        Ok(MemberView {
            resource_name: member_name(self.tenant_id, self.user_id).to_string(),
            user_id: self.user_id,
            email: self.email,
            role: parse_role(&self.role)?,
            joined_at: self.created_at,
            version: self.version,
        })
    }
}

const MEMBER_SELECT: &str =
    "SELECT m.tenant_id, m.user_id, u.email, m.role, m.created_at, m.version
     FROM memberships m JOIN users u ON u.id = m.user_id";

async fn member_get(
    conn: &mut sqlx::PgConnection,
    tenant_id: TenantId,
    user_id: UserId,
) -> Result<MemberView, AuthError> {
    let row: Option<MemberRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{MEMBER_SELECT} WHERE m.tenant_id = $1 AND m.user_id = $2"
    )))
    .bind(tenant_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?;
    row.ok_or(AuthError::NotFound("member"))?.into_view()
}

/// The tenant's members, in user-id order.
pub async fn member_list(
    conn: &mut sqlx::PgConnection,
    tenant: &TenantHandle,
    page: Page,
) -> Result<Paginated<MemberView>, AuthError> {
    let rows: Vec<MemberRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{MEMBER_SELECT} WHERE m.tenant_id = $1 AND ($2::uuid IS NULL OR m.user_id > $2)
         ORDER BY m.user_id LIMIT $3"
    )))
    .bind(tenant.tenant_id)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    let views = rows
        .into_iter()
        .map(MemberRow::into_view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Paginated::from_rows(views, page, |member| {
        member.user_id.as_uuid()
    }))
}

/// The rows a membership change must hold: the target, the caller, and
/// every owner, locked in user-id order.
struct Locked {
    target_role: Role,
    target_version: i64,
    caller_role: Option<Role>,
    other_owners: usize,
}

async fn lock_for_change(
    tx: &mut WriteTx,
    tenant: &TenantHandle,
    target: UserId,
) -> Result<Locked, AuthError> {
    let caller = tenant.user_id()?;
    let rows: Vec<(UserId, String, i64)> = sqlx::query_as(
        "SELECT user_id, role, version FROM memberships
         WHERE tenant_id = $1 AND (role = 'owner' OR user_id = $2 OR user_id = $3)
         ORDER BY user_id FOR UPDATE",
    )
    .bind(tenant.tenant_id)
    .bind(target)
    .bind(caller)
    .fetch_all(tx.conn())
    .await?;
    let mut locked = None;
    let mut caller_role = None;
    let mut other_owners = 0;
    for (user_id, role, version) in rows {
        let role = parse_role(&role)?;
        if user_id == target {
            locked = Some((role, version));
        } else if role == Role::Owner {
            other_owners += 1;
        }
        if user_id == caller {
            caller_role = Some(role);
        }
    }
    let (target_role, target_version) = locked.ok_or(AuthError::NotFound("member"))?;
    Ok(Locked {
        target_role,
        target_version,
        caller_role,
        other_owners,
    })
}

/// Checks, against the rows as locked, that the caller may still do
/// `action` (their role may have changed since the request was
/// authorised) and, when the owner role is involved, that they may manage
/// owners.
fn recheck(
    tenant: &TenantHandle,
    locked: &Locked,
    action: Action,
    touches_owner: bool,
) -> Result<(), AuthError> {
    let caller = locked.caller_role.ok_or(AuthError::Unauthenticated(
        "the session's tenant membership no longer exists",
    ))?;
    let handle = TenantHandle {
        subject: Subject::Tenant(caller),
        ..*tenant
    };
    if !handle.may(action) || (touches_owner && !handle.may(Action::OwnerManage)) {
        return Err(AuthError::Forbidden(
            "only owners grant or take away the owner role",
        ));
    }
    Ok(())
}

/// Changes a member's role.
pub async fn member_update(
    mut tx: WriteTx,
    tenant: &TenantHandle,
    user_id: UserId,
    request: MemberUpdateRequest,
    expected_version: Option<i64>,
) -> Result<MemberView, AuthError> {
    let locked = lock_for_change(&mut tx, tenant, user_id).await?;
    let touches_owner = locked.target_role == Role::Owner || request.role == Role::Owner;
    recheck(tenant, &locked, Action::MemberUpdate, touches_owner)?;
    if expected_version.is_some_and(|version| version != locked.target_version) {
        return Err(AuthError::PreconditionFailed);
    }
    if locked.target_role == Role::Owner && request.role != Role::Owner && locked.other_owners == 0
    {
        return Err(AuthError::LastOwner);
    }
    sqlx::query(
        "UPDATE memberships SET role = $3, version = version + 1 WHERE tenant_id = $1 AND user_id = $2",
    )
    .bind(tenant.tenant_id)
    .bind(user_id)
    .bind(request.role.as_str())
    .execute(tx.conn())
    .await?;
    let member = member_get(tx.conn(), tenant.tenant_id, user_id).await?;
    let name = member_name(tenant.tenant_id, user_id);
    tx.emit(NewEvent::new(
        "member.role_changed",
        "member",
        user_id.as_uuid(),
        member.version,
        Some(tenant.tenant_id),
        name.clone(),
        serde_json::json!({ "user_id": user_id, "from": locked.target_role, "to": request.role }),
    ));
    tx.commit(
        Audit::new("member.update", Some(tenant.tenant_id), name)
            .with_details(serde_json::json!({ "from": locked.target_role, "to": request.role })),
    )
    .await?;
    Ok(member)
}

/// Removes a member, or (when `user_id` is the caller) leaves the tenant.
/// Their sessions in this tenant stop working at once: every request
/// checks the membership.
pub async fn member_remove(
    mut tx: WriteTx,
    tenant: &TenantHandle,
    user_id: UserId,
    expected_version: Option<i64>,
) -> Result<(), AuthError> {
    let leaving = user_id == tenant.user_id()?;
    let locked = lock_for_change(&mut tx, tenant, user_id).await?;
    let action = if leaving {
        Action::MemberLeave
    } else {
        Action::MemberRemove
    };
    let touches_owner = !leaving && locked.target_role == Role::Owner;
    recheck(tenant, &locked, action, touches_owner)?;
    if expected_version.is_some_and(|version| version != locked.target_version) {
        return Err(AuthError::PreconditionFailed);
    }
    if locked.target_role == Role::Owner && locked.other_owners == 0 {
        return Err(AuthError::LastOwner);
    }
    sqlx::query("DELETE FROM memberships WHERE tenant_id = $1 AND user_id = $2")
        .bind(tenant.tenant_id)
        .bind(user_id)
        .execute(tx.conn())
        .await?;
    let name = member_name(tenant.tenant_id, user_id);
    tx.emit(NewEvent::new(
        "member.removed",
        "member",
        user_id.as_uuid(),
        locked.target_version + 1,
        Some(tenant.tenant_id),
        name.clone(),
        serde_json::json!({ "user_id": user_id, "left": leaving }),
    ));
    tx.commit(
        Audit::new(
            if leaving {
                "member.leave"
            } else {
                "member.remove"
            },
            Some(tenant.tenant_id),
            name,
        )
        .with_details(serde_json::json!({ "role": locked.target_role })),
    )
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct InvitationRow {
    id: InvitationId,
    tenant_id: TenantId,
    email: String,
    role: String,
    invited_by: Option<UserId>,
    created_at: OffsetDateTime,
    expires_at: OffsetDateTime,
}

impl InvitationRow {
    fn into_view(self) -> Result<InvitationView, AuthError> {
        Ok(InvitationView {
            resource_name: invitation_name(self.tenant_id, self.id).to_string(),
            id: self.id,
            email: self.email,
            role: parse_role(&self.role)?,
            invited_by: self.invited_by,
            created_at: self.created_at,
            expires_at: self.expires_at,
        })
    }
}

const INVITATION_COLUMNS: &str = "id, tenant_id, email, role, invited_by, created_at, expires_at";

/// Invites an email to the tenant with a role. The token in the result is
/// shown only here.
pub async fn invitation_create(
    mut tx: WriteTx,
    tenant: &TenantHandle,
    request: InvitationRequest,
) -> Result<InvitationCreated, AuthError> {
    let errors = request.validate();
    if !errors.is_empty() {
        return Err(AuthError::Validation(errors));
    }
    if request.role == Role::Owner && !tenant.may(Action::OwnerManage) {
        return Err(AuthError::Forbidden(
            "only owners grant or take away the owner role",
        ));
    }
    let email = request.email.trim();
    let already_member: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM memberships m JOIN users u ON u.id = m.user_id
                        WHERE m.tenant_id = $1 AND lower(u.email) = lower($2))",
    )
    .bind(tenant.tenant_id)
    .bind(email)
    .fetch_one(tx.conn())
    .await?;
    if already_member {
        return Err(AuthError::AlreadyMember);
    }
    // An expired invitation no longer blocks a new one for the same email.
    sqlx::query(
        "UPDATE invitations SET revoked_at = now()
         WHERE tenant_id = $1 AND lower(email) = lower($2)
           AND accepted_at IS NULL AND revoked_at IS NULL AND expires_at <= now()",
    )
    .bind(tenant.tenant_id)
    .bind(email)
    .execute(tx.conn())
    .await?;
    let id = InvitationId::new();
    let made = secret::generate(
        INVITATION_PREFIX,
        &[tenant.tenant_id.as_uuid(), id.as_uuid()],
    );
    let inserted: Result<InvitationRow, sqlx::Error> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO invitations (id, tenant_id, email, role, secret_sha256, invited_by, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {INVITATION_COLUMNS}"
    )))
        .bind(id)
        .bind(tenant.tenant_id)
        .bind(email)
        .bind(request.role.as_str())
        .bind(&made.digest)
        .bind(tenant.user_id()?)
        .bind(OffsetDateTime::now_utc() + INVITATION_TTL)
        .fetch_one(tx.conn())
        .await;
    let row = match inserted {
        Err(error) if keel_db::is_unique_violation(&error, "invitations_open_email_key") => {
            return Err(AuthError::InvitationPending);
        }
        other => other?,
    };
    let invitation = row.into_view()?;
    let name = invitation_name(tenant.tenant_id, id);
    tx.emit(NewEvent::new(
        "invitation.created",
        "invitation",
        id.as_uuid(),
        1,
        Some(tenant.tenant_id),
        name.clone(),
        serde_json::json!({ "invitation_id": id, "email": invitation.email, "role": invitation.role }),
    ));
    tx.commit(
        Audit::new("invitation.create", Some(tenant.tenant_id), name).with_details(
            serde_json::json!({ "email": invitation.email, "role": invitation.role }),
        ),
    )
    .await?;
    Ok(InvitationCreated {
        invitation,
        token: made.token,
    })
}

/// The tenant's open invitations (neither accepted nor revoked; expired
/// ones included, with their `expires_at`).
pub async fn invitation_list(
    conn: &mut sqlx::PgConnection,
    tenant: &TenantHandle,
    page: Page,
) -> Result<Paginated<InvitationView>, AuthError> {
    let rows: Vec<InvitationRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations
         WHERE tenant_id = $1 AND accepted_at IS NULL AND revoked_at IS NULL
           AND ($2::uuid IS NULL OR id > $2)
         ORDER BY id LIMIT $3"
    )))
    .bind(tenant.tenant_id)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    let views = rows
        .into_iter()
        .map(InvitationRow::into_view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Paginated::from_rows(views, page, |invitation| {
        invitation.id.as_uuid()
    }))
}

/// Withdraws an open invitation; its token stops working.
pub async fn invitation_revoke(
    mut tx: WriteTx,
    tenant: &TenantHandle,
    id: InvitationId,
) -> Result<(), AuthError> {
    let revoked = sqlx::query(
        "UPDATE invitations SET revoked_at = now()
         WHERE id = $1 AND tenant_id = $2 AND accepted_at IS NULL AND revoked_at IS NULL",
    )
    .bind(id)
    .bind(tenant.tenant_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if revoked == 0 {
        return Err(AuthError::NotFound("invitation"));
    }
    tx.commit(Audit::new(
        "invitation.revoke",
        Some(tenant.tenant_id),
        invitation_name(tenant.tenant_id, id),
    ))
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct PresentedInvitation {
    email: String,
    role: String,
    secret_sha256: Vec<u8>,
    expires_at: OffsetDateTime,
}

/// Accepts an invitation as the signed-in `user` (authorised in their
/// current tenant): they become a member of the inviting tenant. The
/// transaction runs in the inviting tenant; the token's ids only say where
/// to look, the secret proves it.
pub async fn invitation_accept(
    db: &Db,
    meta: RequestMeta,
    user: &UserSession,
    token: &str,
) -> Result<MemberView, AuthError> {
    let presented =
        secret::parse::<2>(INVITATION_PREFIX, token).ok_or(AuthError::NotFound("invitation"))?;
    let tenant_id = TenantId::from(presented.ids[0]);
    let id = InvitationId::from(presented.ids[1]);
    let meta = RequestMeta {
        actor: Actor::User {
            user_id: user.user_id,
            tenant_id,
        },
        ..meta
    };
    let mut tx = db
        .begin_tenant(
            meta,
            Scope::Tenant {
                tenant_id,
                user_id: Some(user.user_id),
            },
        )
        .await?;
    let row: Option<PresentedInvitation> = sqlx::query_as(
        "SELECT email, role, secret_sha256, expires_at FROM invitations
         WHERE id = $1 AND tenant_id = $2 AND accepted_at IS NULL AND revoked_at IS NULL
         FOR UPDATE",
    )
    .bind(id)
    .bind(tenant_id)
    .fetch_optional(tx.conn())
    .await?;
    let row = row
        .filter(|row| presented.matches(&row.secret_sha256))
        .ok_or(AuthError::NotFound("invitation"))?;
    if row.expires_at <= OffsetDateTime::now_utc() {
        return Err(AuthError::InvitationExpired);
    }
    let email: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(user.user_id)
        .fetch_one(tx.conn())
        .await?;
    if !email.trim().eq_ignore_ascii_case(row.email.trim()) {
        return Err(AuthError::InvitationEmailMismatch);
    }
    let role = parse_role(&row.role)?;
    let inserted = sqlx::query(
        "INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id, user_id) DO NOTHING",
    )
    .bind(tenant_id)
    .bind(user.user_id)
    .bind(role.as_str())
    .execute(tx.conn())
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(AuthError::AlreadyMember);
    }
    sqlx::query("UPDATE invitations SET accepted_at = now(), accepted_by = $2 WHERE id = $1")
        .bind(id)
        .bind(user.user_id)
        .execute(tx.conn())
        .await?;
    let member = member_get(tx.conn(), tenant_id, user.user_id).await?;
    let name = member_name(tenant_id, user.user_id);
    tx.emit(NewEvent::new(
        "member.added",
        "member",
        user.user_id.as_uuid(),
        member.version,
        Some(tenant_id),
        name.clone(),
        serde_json::json!({ "user_id": user.user_id, "role": role, "invitation_id": id }),
    ));
    tx.audit(Audit::new(
        "invitation.accept",
        Some(tenant_id),
        invitation_name(tenant_id, id),
    ));
    tx.commit(
        Audit::new("member.add", Some(tenant_id), name)
            .with_details(serde_json::json!({ "role": role })),
    )
    .await?;
    Ok(member)
}

#[derive(sqlx::FromRow)]
struct GrantRow {
    tenant_id: TenantId,
    project_id: ProjectId,
    user_id: UserId,
    role: String,
    created_at: OffsetDateTime,
    version: i64,
}

impl GrantRow {
    fn into_view(self) -> Result<ProjectGrantView, AuthError> {
        Ok(ProjectGrantView {
            resource_name: grant_name(self.tenant_id, self.project_id, self.user_id).to_string(),
            project_id: self.project_id,
            user_id: self.user_id,
            role: parse_role(&self.role)?,
            created_at: self.created_at,
            version: self.version,
        })
    }
}

const GRANT_COLUMNS: &str = "tenant_id, project_id, user_id, role, created_at, version";

/// The project's grants, in user-id order.
pub async fn grant_list(
    conn: &mut sqlx::PgConnection,
    project: &ProjectHandle,
    page: Page,
) -> Result<Paginated<ProjectGrantView>, AuthError> {
    let rows: Vec<GrantRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {GRANT_COLUMNS} FROM project_grants
         WHERE tenant_id = $1 AND project_id = $2 AND ($3::uuid IS NULL OR user_id > $3)
         ORDER BY user_id LIMIT $4"
    )))
    .bind(project.tenant_id)
    .bind(project.project_id)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    let views = rows
        .into_iter()
        .map(GrantRow::into_view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Paginated::from_rows(views, page, |grant| {
        grant.user_id.as_uuid()
    }))
}

/// Grants a member a role on the project (or changes their grant). The
/// member must belong to the tenant.
pub async fn grant_set(
    mut tx: WriteTx,
    project: &ProjectHandle,
    user_id: UserId,
    request: GrantRequest,
) -> Result<ProjectGrantView, AuthError> {
    if request.role == Role::Owner {
        return Err(AuthError::Validation(vec![keel_http::FieldError {
            field: "role".to_owned(),
            code: "invalid".to_owned(),
            message: "a project grant is admin, member or viewer; ownership is tenant-wide"
                .to_owned(),
        }]));
    }
    // A grant cannot exceed the granter's own role on the project.
    if request.role.max(project.role) != project.role {
        return Err(AuthError::Forbidden(
            "you cannot grant a role above your own",
        ));
    }
    let is_member: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM memberships WHERE tenant_id = $1 AND user_id = $2)",
    )
    .bind(project.tenant_id)
    .bind(user_id)
    .fetch_one(tx.conn())
    .await?;
    if !is_member {
        return Err(AuthError::NotFound("member"));
    }
    let row: GrantRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO project_grants (tenant_id, project_id, user_id, role) VALUES ($1, $2, $3, $4)
         ON CONFLICT (project_id, user_id)
           DO UPDATE SET role = EXCLUDED.role, version = project_grants.version + 1
         RETURNING {GRANT_COLUMNS}"
    )))
    .bind(project.tenant_id)
    .bind(project.project_id)
    .bind(user_id)
    .bind(request.role.as_str())
    .fetch_one(tx.conn())
    .await?;
    let grant = row.into_view()?;
    let name = grant_name(project.tenant_id, project.project_id, user_id);
    tx.commit(
        Audit::new("project_grant.set", Some(project.tenant_id), name)
            .with_details(serde_json::json!({ "role": grant.role })),
    )
    .await?;
    Ok(grant)
}

/// Takes a member's grant on the project away.
pub async fn grant_remove(
    mut tx: WriteTx,
    project: &ProjectHandle,
    user_id: UserId,
) -> Result<(), AuthError> {
    let removed = sqlx::query(
        "DELETE FROM project_grants WHERE tenant_id = $1 AND project_id = $2 AND user_id = $3",
    )
    .bind(project.tenant_id)
    .bind(project.project_id)
    .bind(user_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if removed == 0 {
        return Err(AuthError::NotFound("grant"));
    }
    tx.commit(Audit::new(
        "project_grant.remove",
        Some(project.tenant_id),
        grant_name(project.tenant_id, project.project_id, user_id),
    ))
    .await?;
    Ok(())
}
