//! Handlers of `/v1/auth/*` and `/v1/projects`. Thin: extract, authorise,
//! call one service function, map the result.

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use keel_core::page::{PageParams, Paginated};
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, Json, Query, RequestId, TraceParent};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use keel_core::ids::ProjectId;
use keel_http::{IfMatch, Path, Tagged};

use crate::authz::{Action, authorize_project, authorize_tenant};
use crate::context::anonymous_meta;
use crate::limits::{ClientIp, Limits};
use crate::model::MAX_EMAIL_LEN;
use crate::model::{
    AccountDeleteRequest, LoginRequest, PasswordChangeRequest, Project, ProjectRequest,
    ProjectView, RefreshRequest, RegisterRequest, RegisterResponse, SessionView, SwitchRequest,
    TokenResponse,
};
use crate::{AuthError, Ctx, TokenKeys, service, session};
use axum::Extension;
use axum::response::{IntoResponse, Response};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
    Arc<Limits>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(auth_register))
        .routes(routes!(auth_login))
        .routes(routes!(auth_refresh))
        .routes(routes!(auth_logout))
        .routes(routes!(auth_session_get))
        .routes(routes!(auth_switch))
        .routes(routes!(auth_password_change))
        .routes(routes!(auth_account_delete))
        .routes(routes!(project_list, project_create))
        .routes(routes!(project_get, project_update, project_delete))
}

/// Create an account: a user, their tenant, and a default project.
#[utoipa::path(
    post,
    path = "/v1/auth/register",
    operation_id = "auth_register",
    tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered", body = RegisterResponse),
        (status = 409, description = "`email_taken`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn auth_register(
    State(db): State<Db>,
    request_id: RequestId,
    trace: TraceParent,
    Json(request): Json<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let registered = service::register(&db, anonymous_meta(&request_id, &trace), request).await?;
    Ok((StatusCode::CREATED, Json(registered)))
}

/// Exchange an email and password for an access token and a refresh
/// token: a new session in one of the user's tenants.
#[utoipa::path(
    post,
    path = "/v1/auth/login",
    operation_id = "auth_login",
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = TokenResponse),
        (status = 401, description = "`invalid_credentials`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many attempts from this address; see `Retry-After`", body = ErrorBody),
    )
)]
async fn auth_login(
    State(db): State<Db>,
    State(keys): State<Arc<TokenKeys>>,
    State(limits): State<Arc<Limits>>,
    client: Option<Extension<ClientIp>>,
    request_id: RequestId,
    trace: TraceParent,
    Json(request): Json<LoginRequest>,
) -> Response {
    let ip = client.and_then(|Extension(ClientIp(ip))| ip);
    // No account has an email this long; refusing it first keeps the
    // throttle's memory small.
    if request.email.len() > MAX_EMAIL_LEN {
        return ApiError::from(AuthError::InvalidCredentials).into_response();
    }
    let email = request.email.clone();
    // A throttled IP is refused before any work; a targeted account is
    // answered slowly, whatever the password.
    let delay = match limits.login_gate(ip, &email) {
        Ok(delay) => delay,
        Err(retry) => return retry.into_response(),
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match session::login(&db, &keys, anonymous_meta(&request_id, &trace), request).await {
        Ok(tokens) => {
            limits.login_succeeded(&email);
            Json(tokens).into_response()
        }
        Err(AuthError::InvalidCredentials) => {
            limits.login_failed(ip, &email);
            ApiError::from(AuthError::InvalidCredentials).into_response()
        }
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// Exchange a refresh token for a new access token and a new refresh
/// token. Each refresh token works once: presenting it again revokes the
/// session.
#[utoipa::path(
    post,
    path = "/v1/auth/refresh",
    operation_id = "auth_refresh",
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "New tokens", body = TokenResponse),
        (status = 401, description = "`invalid_refresh_token` or `refresh_token_reused`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
    )
)]
async fn auth_refresh(
    State(db): State<Db>,
    State(keys): State<Arc<TokenKeys>>,
    request_id: RequestId,
    trace: TraceParent,
    Json(request): Json<RefreshRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    Ok(Json(
        session::refresh(
            &db,
            &keys,
            anonymous_meta(&request_id, &trace),
            &request.refresh_token,
        )
        .await?,
    ))
}

/// Who the caller is: their user, the tenant this session acts in and
/// their role there, and every tenant they belong to.
#[utoipa::path(
    get,
    path = "/v1/auth/session",
    operation_id = "auth_session_get",
    tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's session", body = SessionView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: an API token or service account, not a signed-in user", body = ErrorBody),
    )
)]
async fn auth_session_get(ctx: Ctx) -> Result<Json<SessionView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::SessionRead).await?;
    Ok(Json(
        session::describe(tx.conn(), &tenant, &ctx.principal).await?,
    ))
}

/// Switch tenants: the caller's session moves to another of their
/// tenants, without the password. The current refresh token is used up (as
/// by a refresh); the new session ends when the current one would.
#[utoipa::path(
    post,
    path = "/v1/auth/switch",
    operation_id = "auth_switch",
    tag = "auth",
    request_body = SwitchRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A session in the other tenant", body = TokenResponse),
        (status = 401, description = "`unauthenticated`, `invalid_refresh_token` (not this session's, used, or expired) or `refresh_token_reused` (the session is revoked)", body = ErrorBody),
        (status = 403, description = "`forbidden`: an API token or service account, not a signed-in user", body = ErrorBody),
        (status = 404, description = "`not_found`: the caller is no member of that tenant", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: see `Retry-After`", body = ErrorBody),
    )
)]
async fn auth_switch(
    ctx: Ctx,
    State(keys): State<Arc<TokenKeys>>,
    Json(request): Json<SwitchRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::SessionSwitch).await?;
    Ok(Json(
        session::switch(tx, &keys, &ctx.principal, request).await?,
    ))
}

/// End the caller's session: its access and refresh tokens stop working
/// at once.
#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    operation_id = "auth_logout",
    tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn auth_logout(ctx: Ctx) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::SessionEnd).await?;
    session::logout(tx, &ctx.principal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Change the caller's password. Every other session of the user, in
/// every tenant, ends; this one stays.
#[utoipa::path(
    post,
    path = "/v1/auth/password",
    operation_id = "auth_password_change",
    tag = "auth",
    request_body = PasswordChangeRequest,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Changed"),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 422, description = "`validation_failed` (also for a wrong `current_password`) or `invalid_body`", body = ErrorBody),
    )
)]
async fn auth_password_change(
    ctx: Ctx,
    Json(request): Json<PasswordChangeRequest>,
) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::PasswordChange).await?;
    session::password_change(tx, &ctx.principal, request).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Delete the caller's own account: every membership, session and token,
/// in every tenant. Asks for the password again; refused while the caller
/// is the last owner of a tenant. Only a signed-in user can do this, never
/// an API token or a service account.
#[utoipa::path(
    post,
    path = "/v1/auth/delete-account",
    operation_id = "auth_account_delete",
    tag = "auth",
    request_body = AccountDeleteRequest,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted; every token of the user stops working"),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden` (an API token or service account)", body = ErrorBody),
        (status = 409, description = "`last_owner`: a tenant would be left without an owner", body = ErrorBody),
        (status = 422, description = "`validation_failed` (a wrong `current_password`) or `invalid_body`", body = ErrorBody),
    )
)]
async fn auth_account_delete(
    State(db): State<Db>,
    ctx: Ctx,
    Json(request): Json<AccountDeleteRequest>,
) -> Result<StatusCode, ApiError> {
    // A system transaction: the account spans tenants (see
    // `session::account_delete`).
    let mut tx = db
        .begin_system(ctx.meta.clone())
        .await
        .map_err(AuthError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::AccountDelete).await?;
    session::account_delete(tx, &ctx.principal, request).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List the projects of the caller's tenant.
#[utoipa::path(
    get,
    path = "/v1/projects",
    operation_id = "project_list",
    tag = "projects",
    params(PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of projects", body = Paginated<ProjectView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn project_list(
    ctx: Ctx,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<ProjectView>>, ApiError> {
    let page = params.validate().map_err(page_error)?;
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::ProjectList).await?;
    Ok(Json(
        service::project_list(tx.conn(), &tenant, page)
            .await?
            .map(ProjectView::from),
    ))
}

/// Maps a bad `limit`/`cursor` to the envelope; shared by every list.
pub fn page_error(error: keel_core::page::PageError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", error.to_string())
}

fn tagged(project: Project) -> Tagged<ProjectView> {
    Tagged(project.version, project.into())
}

/// Create a project in the caller's tenant.
#[utoipa::path(
    post,
    path = "/v1/projects",
    operation_id = "project_create",
    tag = "projects",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and request replay the first response")),
    request_body = ProjectRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created; `ETag` carries its version", body = ProjectView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers cannot create projects", body = ErrorBody),
        (status = 409, description = "`project_name_taken`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn project_create(
    ctx: Ctx,
    Json(request): Json<ProjectRequest>,
) -> Result<(StatusCode, Tagged<ProjectView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::ProjectCreate).await?;
    let project = service::project_create(tx, &tenant, request).await?;
    Ok((StatusCode::CREATED, tagged(project)))
}

/// Read one project.
#[utoipa::path(
    get,
    path = "/v1/projects/{project_id}",
    operation_id = "project_get",
    tag = "projects",
    params(("project_id" = ProjectId, Path, description = "The project")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The project; `ETag` carries its version", body = ProjectView),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn project_get(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
) -> Result<Tagged<ProjectView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    Ok(tagged(
        service::project_get(tx.conn(), &ctx.principal, project_id).await?,
    ))
}

/// Rename a project. Send the `ETag` you read as `If-Match` to be sure
/// nobody changed it in between.
#[utoipa::path(
    patch,
    path = "/v1/projects/{project_id}",
    operation_id = "project_update",
    tag = "projects",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the change is based on"),
    ),
    request_body = ProjectRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Renamed; `ETag` carries the new version", body = ProjectView),
        (status = 400, description = "`invalid_path` or `invalid_header`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`project_name_taken`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`: the project changed since that version", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn project_update(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
    IfMatch(expected): IfMatch,
    Json(request): Json<ProjectRequest>,
) -> Result<Tagged<ProjectView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project =
        authorize_project(tx.conn(), &ctx.principal, Action::ProjectUpdate, project_id).await?;
    Ok(tagged(
        service::project_update(tx, &project, request, expected).await?,
    ))
}

/// Delete a project that holds no live allocations.
#[utoipa::path(
    delete,
    path = "/v1/projects/{project_id}",
    operation_id = "project_delete",
    tag = "projects",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the deletion is based on"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_path` or `invalid_header`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`project_not_empty`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`", body = ErrorBody),
    )
)]
async fn project_delete(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
    IfMatch(expected): IfMatch,
) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project =
        authorize_project(tx.conn(), &ctx.principal, Action::ProjectDelete, project_id).await?;
    service::project_delete(tx, &project, expected).await?;
    Ok(StatusCode::NO_CONTENT)
}
