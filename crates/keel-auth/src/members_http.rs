//! Handlers of `/v1/members`, `/v1/invitations` and
//! `/v1/projects/{project_id}/grants`. Thin: extract, authorise, call one
//! service function in [`crate::members`], map the result.

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use keel_core::ids::{InvitationId, ProjectId, UserId};
use keel_core::page::{PageParams, Paginated};
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, IfMatch, Json, Path, Query, Tagged};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::authz::{Action, authorize_project, authorize_tenant};
use crate::http::page_error;
use crate::idempotency::ShownOnce;
use crate::model::{
    GrantRequest, InvitationAcceptRequest, InvitationCreated, InvitationRequest, InvitationView,
    MemberUpdateRequest, MemberView, ProjectGrantView,
};
use crate::{AuthError, Ctx, TokenKeys, members};
use axum::Extension;

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(member_list))
        .routes(routes!(member_update, member_remove))
        .routes(routes!(invitation_list, invitation_create))
        .routes(routes!(invitation_revoke))
        .routes(routes!(invitation_accept))
        .routes(routes!(project_grant_list))
        .routes(routes!(project_grant_set, project_grant_remove))
}

/// List the members of the caller's tenant.
#[utoipa::path(
    get,
    path = "/v1/members",
    operation_id = "member_list",
    tag = "members",
    params(PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of members", body = Paginated<MemberView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn member_list(
    ctx: Ctx,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<MemberView>>, ApiError> {
    let page = params.validate().map_err(page_error)?;
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::MemberList).await?;
    Ok(Json(members::member_list(tx.conn(), &tenant, page).await?))
}

/// Change a member's role. Only owners touch the owner role; the last
/// owner cannot be demoted.
#[utoipa::path(
    patch,
    path = "/v1/members/{user_id}",
    operation_id = "member_update",
    tag = "members",
    params(
        ("user_id" = UserId, Path, description = "The member"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the change is based on"),
    ),
    request_body = MemberUpdateRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed; `ETag` carries the new version", body = MemberView),
        (status = 400, description = "`invalid_path` or `invalid_header`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`last_owner`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
    )
)]
async fn member_update(
    ctx: Ctx,
    Path(user_id): Path<UserId>,
    IfMatch(expected): IfMatch,
    Json(request): Json<MemberUpdateRequest>,
) -> Result<Tagged<MemberView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::MemberUpdate).await?;
    let member = members::member_update(tx, &tenant, user_id, request, expected).await?;
    Ok(Tagged(member.version, member))
}

/// Remove a member, or leave the tenant (your own user id). The last owner
/// can do neither.
#[utoipa::path(
    delete,
    path = "/v1/members/{user_id}",
    operation_id = "member_remove",
    tag = "members",
    params(
        ("user_id" = UserId, Path, description = "The member, or yourself to leave"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the removal is based on"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "`invalid_path` or `invalid_header`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`last_owner`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`", body = ErrorBody),
    )
)]
async fn member_remove(
    ctx: Ctx,
    Path(user_id): Path<UserId>,
    IfMatch(expected): IfMatch,
) -> Result<StatusCode, ApiError> {
    let action = if Some(user_id) == ctx.principal.user_id() {
        Action::MemberLeave
    } else {
        Action::MemberRemove
    };
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, action).await?;
    members::member_remove(tx, &tenant, user_id, expected).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List the tenant's open invitations.
#[utoipa::path(
    get,
    path = "/v1/invitations",
    operation_id = "invitation_list",
    tag = "members",
    params(PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of open invitations", body = Paginated<InvitationView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
    )
)]
async fn invitation_list(
    ctx: Ctx,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<InvitationView>>, ApiError> {
    let page = params.validate().map_err(page_error)?;
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::InvitationList).await?;
    Ok(Json(
        members::invitation_list(tx.conn(), &tenant, page).await?,
    ))
}

/// Invite someone by email. The response carries the invitation token,
/// shown only here; it expires after seven days.
#[utoipa::path(
    post,
    path = "/v1/invitations",
    operation_id = "invitation_create",
    tag = "members",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and request replay the first response")),
    request_body = InvitationRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Invited", body = InvitationCreated),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 409, description = "`already_member` or `invitation_pending`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn invitation_create(
    ctx: Ctx,
    Json(request): Json<InvitationRequest>,
) -> Result<(StatusCode, Extension<ShownOnce>, Json<InvitationCreated>), ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::InvitationCreate).await?;
    let created = members::invitation_create(tx, &tenant, request).await?;
    Ok((StatusCode::CREATED, Extension(ShownOnce), Json(created)))
}

/// Withdraw an open invitation.
#[utoipa::path(
    delete,
    path = "/v1/invitations/{invitation_id}",
    operation_id = "invitation_revoke",
    tag = "members",
    params(("invitation_id" = InvitationId, Path, description = "The invitation")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn invitation_revoke(
    ctx: Ctx,
    Path(invitation_id): Path<InvitationId>,
) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::InvitationRevoke).await?;
    members::invitation_revoke(tx, &tenant, invitation_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Accept an invitation as the signed-in user (whose email it must name).
/// Log in with the returned tenant to act in it.
#[utoipa::path(
    post,
    path = "/v1/invitations/accept",
    operation_id = "invitation_accept",
    tag = "members",
    request_body = InvitationAcceptRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Now a member of the inviting tenant", body = MemberView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`invitation_email_mismatch`", body = ErrorBody),
        (status = 404, description = "`not_found`: unknown, revoked or used token", body = ErrorBody),
        (status = 409, description = "`already_member`", body = ErrorBody),
        (status = 410, description = "`invitation_expired`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
    )
)]
async fn invitation_accept(
    ctx: Ctx,
    State(db): State<Db>,
    Json(request): Json<InvitationAcceptRequest>,
) -> Result<Json<MemberView>, ApiError> {
    let user = ctx.principal.user_session()?;
    {
        // The caller's own session must be live.
        let mut tx = ctx.begin().await.map_err(AuthError::from)?;
        authorize_tenant(tx.conn(), &ctx.principal, Action::InvitationAccept).await?;
    }
    Ok(Json(
        members::invitation_accept(&db, ctx.meta.clone(), &user, &request.token).await?,
    ))
}

/// List the grants on a project.
#[utoipa::path(
    get,
    path = "/v1/projects/{project_id}/grants",
    operation_id = "project_grant_list",
    tag = "members",
    params(("project_id" = ProjectId, Path, description = "The project"), PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of grants", body = Paginated<ProjectGrantView>),
        (status = 400, description = "`invalid_path` or `invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn project_grant_list(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<ProjectGrantView>>, ApiError> {
    let page = params.validate().map_err(page_error)?;
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ProjectGrantList,
        project_id,
    )
    .await?;
    Ok(Json(members::grant_list(tx.conn(), &project, page).await?))
}

/// Give a member a role on this project (or change it). Grants only add
/// to the member's tenant role.
#[utoipa::path(
    put,
    path = "/v1/projects/{project_id}/grants/{user_id}",
    operation_id = "project_grant_set",
    tag = "members",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("user_id" = UserId, Path, description = "The member"),
    ),
    request_body = GrantRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Granted; `ETag` carries its version", body = ProjectGrantView),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such project or member", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn project_grant_set(
    ctx: Ctx,
    Path((project_id, user_id)): Path<(ProjectId, UserId)>,
    Json(request): Json<GrantRequest>,
) -> Result<Tagged<ProjectGrantView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ProjectGrantManage,
        project_id,
    )
    .await?;
    let grant = members::grant_set(tx, &project, user_id, request).await?;
    Ok(Tagged(grant.version, grant))
}

/// Take a member's grant on this project away.
#[utoipa::path(
    delete,
    path = "/v1/projects/{project_id}/grants/{user_id}",
    operation_id = "project_grant_remove",
    tag = "members",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("user_id" = UserId, Path, description = "The member"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn project_grant_remove(
    ctx: Ctx,
    Path((project_id, user_id)): Path<(ProjectId, UserId)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ProjectGrantManage,
        project_id,
    )
    .await?;
    members::grant_remove(tx, &project, user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
