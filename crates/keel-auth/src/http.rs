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

use crate::authz::{Action, authorize_tenant};
use crate::context::anonymous_meta;
use crate::model::{LoginRequest, ProjectView, RegisterRequest, RegisterResponse, TokenResponse};
use crate::{AuthError, Ctx, TokenKeys, service};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(auth_register))
        .routes(routes!(auth_login))
        .routes(routes!(project_list))
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

/// Exchange an email and password for an access token.
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
    )
)]
async fn auth_login(
    State(db): State<Db>,
    State(keys): State<Arc<TokenKeys>>,
    request_id: RequestId,
    trace: TraceParent,
    Json(request): Json<LoginRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    Ok(Json(
        service::login(&db, &keys, anonymous_meta(&request_id, &trace), request).await?,
    ))
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
    Ok(Json(service::project_list(tx.conn(), &tenant, page).await?))
}

/// Maps a bad `limit`/`cursor` to the envelope; shared by every list.
pub fn page_error(error: keel_core::page::PageError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", error.to_string())
}
