//! Handlers of `POST /v1/auth/token`, `/v1/auth/api-tokens` and
//! `/v1/projects/{project_id}/service-accounts`. Thin: extract, authorise,
//! call one service function in [`crate::credentials`].

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use keel_core::ids::{ApiTokenId, ProjectId, ServiceAccountId, ServiceAccountKeyId};
use keel_core::page::{PageParams, Paginated};
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, IfMatch, Json, Path, Query, RequestId, Tagged, TraceParent};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::authz::{Action, authorize_project, authorize_tenant};
use crate::context::anonymous_meta;
use crate::credentials::{
    self, ApiTokenCreated, ApiTokenRequest, ApiTokenView, ExchangedToken, KeyRequest,
    ServiceAccountKeyCreated, ServiceAccountKeyView, ServiceAccountRequest, ServiceAccountUpdate,
    ServiceAccountView, TokenExchangeRequest,
};
use crate::http::page_error;
use crate::idempotency::ShownOnce;
use crate::{AuthError, Ctx, TokenKeys};
use axum::Extension;

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(auth_token_exchange))
        .routes(routes!(api_token_list, api_token_create))
        .routes(routes!(api_token_revoke))
        .routes(routes!(service_account_list, service_account_create))
        .routes(routes!(service_account_update, service_account_delete))
        .routes(routes!(
            service_account_key_list,
            service_account_key_create
        ))
        .routes(routes!(service_account_key_revoke))
}

/// Exchange a service-account key or a personal API token for a
/// short-lived access token.
#[utoipa::path(
    post,
    path = "/v1/auth/token",
    operation_id = "auth_token_exchange",
    tag = "auth",
    request_body = TokenExchangeRequest,
    responses(
        (status = 200, description = "An access token", body = ExchangedToken),
        (status = 401, description = "`invalid_key`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
    )
)]
async fn auth_token_exchange(
    State(db): State<Db>,
    State(keys): State<Arc<TokenKeys>>,
    request_id: RequestId,
    trace: TraceParent,
    Json(request): Json<TokenExchangeRequest>,
) -> Result<Json<ExchangedToken>, ApiError> {
    Ok(Json(
        credentials::exchange(
            &db,
            &keys,
            anonymous_meta(&request_id, &trace),
            &request.secret,
        )
        .await?,
    ))
}

/// List your personal API tokens in this tenant.
#[utoipa::path(
    get,
    path = "/v1/auth/api-tokens",
    operation_id = "api_token_list",
    tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Your live tokens", body = Vec<ApiTokenView>),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: only a signed-in user manages tokens", body = ErrorBody),
    )
)]
async fn api_token_list(ctx: Ctx) -> Result<Json<Vec<ApiTokenView>>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::ApiTokenList).await?;
    Ok(Json(credentials::api_token_list(tx.conn(), &tenant).await?))
}

/// Create a personal API token. The secret is in this response only.
#[utoipa::path(
    post,
    path = "/v1/auth/api-tokens",
    operation_id = "api_token_create",
    tag = "auth",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and request replay the first response")),
    request_body = ApiTokenRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = ApiTokenCreated),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn api_token_create(
    ctx: Ctx,
    Json(request): Json<ApiTokenRequest>,
) -> Result<(StatusCode, Extension<ShownOnce>, Json<ApiTokenCreated>), ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::ApiTokenManage).await?;
    let created = credentials::api_token_create(tx, &tenant, request).await?;
    Ok((StatusCode::CREATED, Extension(ShownOnce), Json(created)))
}

/// Revoke one of your personal API tokens.
#[utoipa::path(
    delete,
    path = "/v1/auth/api-tokens/{token_id}",
    operation_id = "api_token_revoke",
    tag = "auth",
    params(("token_id" = ApiTokenId, Path, description = "The token")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn api_token_revoke(
    ctx: Ctx,
    Path(token_id): Path<ApiTokenId>,
) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::ApiTokenManage).await?;
    credentials::api_token_revoke(tx, &tenant, token_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List the project's service accounts.
#[utoipa::path(
    get,
    path = "/v1/projects/{project_id}/service-accounts",
    operation_id = "service_account_list",
    tag = "service-accounts",
    params(("project_id" = ProjectId, Path, description = "The project"), PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of service accounts", body = Paginated<ServiceAccountView>),
        (status = 400, description = "`invalid_path` or `invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn service_account_list(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<ServiceAccountView>>, ApiError> {
    let page = params.validate().map_err(page_error)?;
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ServiceAccountList,
        project_id,
    )
    .await?;
    Ok(Json(
        credentials::account_list(tx.conn(), &project, page).await?,
    ))
}

/// Create a service account with a role on this project.
#[utoipa::path(
    post,
    path = "/v1/projects/{project_id}/service-accounts",
    operation_id = "service_account_create",
    tag = "service-accounts",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and request replay the first response"),
    ),
    request_body = ServiceAccountRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created; `ETag` carries its version", body = ServiceAccountView),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`name_taken`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn service_account_create(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
    Json(request): Json<ServiceAccountRequest>,
) -> Result<(StatusCode, Tagged<ServiceAccountView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ServiceAccountManage,
        project_id,
    )
    .await?;
    let account =
        credentials::account_create(tx, &project, ctx.principal.user_id(), request).await?;
    Ok((StatusCode::CREATED, Tagged(account.version, account)))
}

/// Disable or re-enable a service account.
#[utoipa::path(
    patch,
    path = "/v1/projects/{project_id}/service-accounts/{service_account_id}",
    operation_id = "service_account_update",
    tag = "service-accounts",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("service_account_id" = ServiceAccountId, Path, description = "The service account"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the change is based on"),
    ),
    request_body = ServiceAccountUpdate,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed; `ETag` carries the new version", body = ServiceAccountView),
        (status = 400, description = "`invalid_path` or `invalid_header`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
    )
)]
async fn service_account_update(
    ctx: Ctx,
    Path((project_id, id)): Path<(ProjectId, ServiceAccountId)>,
    IfMatch(expected): IfMatch,
    Json(request): Json<ServiceAccountUpdate>,
) -> Result<Tagged<ServiceAccountView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ServiceAccountManage,
        project_id,
    )
    .await?;
    let account = credentials::account_update(tx, &project, id, request, expected).await?;
    Ok(Tagged(account.version, account))
}

/// Delete a service account and its keys.
#[utoipa::path(
    delete,
    path = "/v1/projects/{project_id}/service-accounts/{service_account_id}",
    operation_id = "service_account_delete",
    tag = "service-accounts",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("service_account_id" = ServiceAccountId, Path, description = "The service account"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn service_account_delete(
    ctx: Ctx,
    Path((project_id, id)): Path<(ProjectId, ServiceAccountId)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ServiceAccountManage,
        project_id,
    )
    .await?;
    credentials::account_delete(tx, &project, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List a service account's keys (never their secrets).
#[utoipa::path(
    get,
    path = "/v1/projects/{project_id}/service-accounts/{service_account_id}/keys",
    operation_id = "service_account_key_list",
    tag = "service-accounts",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("service_account_id" = ServiceAccountId, Path, description = "The service account"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The keys", body = Vec<ServiceAccountKeyView>),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn service_account_key_list(
    ctx: Ctx,
    Path((project_id, id)): Path<(ProjectId, ServiceAccountId)>,
) -> Result<Json<Vec<ServiceAccountKeyView>>, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ServiceAccountList,
        project_id,
    )
    .await?;
    Ok(Json(credentials::key_list(&mut tx, &project, id).await?))
}

/// Make a new key for a service account (rotation: several may be live).
/// The secret is in this response only.
#[utoipa::path(
    post,
    path = "/v1/projects/{project_id}/service-accounts/{service_account_id}/keys",
    operation_id = "service_account_key_create",
    tag = "service-accounts",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("service_account_id" = ServiceAccountId, Path, description = "The service account"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and request replay the first response"),
    ),
    request_body = KeyRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = ServiceAccountKeyCreated),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn service_account_key_create(
    ctx: Ctx,
    Path((project_id, id)): Path<(ProjectId, ServiceAccountId)>,
    Json(request): Json<KeyRequest>,
) -> Result<
    (
        StatusCode,
        Extension<ShownOnce>,
        Json<ServiceAccountKeyCreated>,
    ),
    ApiError,
> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ServiceAccountManage,
        project_id,
    )
    .await?;
    let created = credentials::key_create(tx, &project, id, request).await?;
    Ok((StatusCode::CREATED, Extension(ShownOnce), Json(created)))
}

/// Revoke one key of a service account.
#[utoipa::path(
    delete,
    path = "/v1/projects/{project_id}/service-accounts/{service_account_id}/keys/{key_id}",
    operation_id = "service_account_key_revoke",
    tag = "service-accounts",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("service_account_id" = ServiceAccountId, Path, description = "The service account"),
        ("key_id" = ServiceAccountKeyId, Path, description = "The key"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn service_account_key_revoke(
    ctx: Ctx,
    Path((project_id, id, key_id)): Path<(ProjectId, ServiceAccountId, ServiceAccountKeyId)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(AuthError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::ServiceAccountManage,
        project_id,
    )
    .await?;
    credentials::key_revoke(tx, &project, id, key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
