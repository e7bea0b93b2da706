//! Handlers of `/v1/projects/{project_id}/allocations…`.

use std::sync::Arc;

use axum::extract::FromRef;
use axum::http::StatusCode;
use keel_auth::authz::{Action, authorize_project};
use keel_auth::http::page_error;
use keel_auth::{Ctx, TokenKeys};
use keel_core::ids::{AllocationId, ProjectId};
use keel_core::page::{PageParams, Paginated};
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, IfMatch, Json, Path, Query, Tagged};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::quota::{self, ProjectQuota, TenantQuota};
use crate::{AllocationView, NewAllocation, ProvisioningError, service};
use keel_auth::authz::authorize_tenant;

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
    Arc<crate::terminal::Terminals>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(allocation_create, allocation_list))
        .routes(routes!(allocation_get))
        .routes(routes!(allocation_terminate))
        .routes(routes!(allocation_stop))
        .routes(routes!(allocation_start))
        .routes(routes!(crate::terminal::allocation_terminal))
        .routes(routes!(tenant_quota_get))
        .routes(routes!(project_quota_get))
}

/// Launch an allocation. It is placed at once: the answer is `scheduled`,
/// or `failed` with `insufficient_capacity`; then it moves on by itself.
#[utoipa::path(
    post,
    path = "/v1/projects/{project_id}/allocations",
    operation_id = "allocation_create",
    tag = "allocations",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and request replay the first response"),
    ),
    request_body = NewAllocation,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted; watch `state`. `ETag` carries its version", body = AllocationView),
        (status = 400, description = "`invalid_json` or `invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such project", body = ErrorBody),
        (status = 402, description = "`credit_exhausted`: the tenant's prepaid credit ran out; launches are held", body = ErrorBody),
        (status = 409, description = "`quota_exceeded`: the tenant's or the project's quota would be exceeded; nothing was created", body = ErrorBody),
        (status = 422, description = "`validation_failed`, `invalid_body`, `unknown_flavor`, `unknown_region`, or `flavor_unavailable` (no host of the region could run it); nothing was created", body = ErrorBody),
    )
)]
async fn allocation_create(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
    Json(new): Json<NewAllocation>,
) -> Result<(StatusCode, Tagged<AllocationView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::AllocationCreate,
        project_id,
    )
    .await
    .map_err(ProvisioningError::from)?;
    let allocation = service::allocation_create(tx, &project, new).await?;
    Ok((
        StatusCode::ACCEPTED,
        Tagged(allocation.version, allocation.into()),
    ))
}

/// List the project's allocations (terminated ones are left out).
#[utoipa::path(
    get,
    path = "/v1/projects/{project_id}/allocations",
    operation_id = "allocation_list",
    tag = "allocations",
    params(("project_id" = ProjectId, Path, description = "The project"), PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of allocations", body = Paginated<AllocationView>),
        (status = 400, description = "`invalid_query` or `invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such project", body = ErrorBody),
    )
)]
async fn allocation_list(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<AllocationView>>, ApiError> {
    let page = params.validate().map_err(page_error)?;
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::AllocationList,
        project_id,
    )
    .await
    .map_err(ProvisioningError::from)?;
    let allocations = service::allocation_list(tx.conn(), &project, page).await?;
    Ok(Json(allocations.map(AllocationView::from)))
}

/// Read one allocation (terminated ones too).
#[utoipa::path(
    get,
    path = "/v1/projects/{project_id}/allocations/{allocation_id}",
    operation_id = "allocation_get",
    tag = "allocations",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("allocation_id" = AllocationId, Path, description = "The allocation"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The allocation; `ETag` carries its version", body = AllocationView),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn allocation_get(
    ctx: Ctx,
    Path((project_id, allocation_id)): Path<(ProjectId, AllocationId)>,
) -> Result<Tagged<AllocationView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::AllocationRead,
        project_id,
    )
    .await
    .map_err(ProvisioningError::from)?;
    let allocation = service::allocation_get(tx.conn(), &project, allocation_id).await?;
    Ok(Tagged(allocation.version, allocation.into()))
}

/// Terminate an allocation: it moves to `terminating`, its workload is
/// stopped on the host, then it is `terminated` and its capacity released.
/// Send the `ETag` you read as `If-Match` to terminate only the allocation
/// as you last saw it.
#[utoipa::path(
    post,
    path = "/v1/projects/{project_id}/allocations/{allocation_id}/terminate",
    operation_id = "allocation_terminate",
    tag = "allocations",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("allocation_id" = AllocationId, Path, description = "The allocation"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the termination is based on"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted; watch `state`. `ETag` carries the new version", body = AllocationView),
        (status = 400, description = "`invalid_path` or `invalid_header`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`invalid_state_transition`: already terminated", body = ErrorBody),
        (status = 412, description = "`precondition_failed`: it changed since that `ETag`", body = ErrorBody),
    )
)]
async fn allocation_terminate(
    ctx: Ctx,
    Path((project_id, allocation_id)): Path<(ProjectId, AllocationId)>,
    IfMatch(expected): IfMatch,
) -> Result<(StatusCode, Tagged<AllocationView>), ApiError> {
    lifecycle(
        ctx,
        (project_id, allocation_id),
        expected,
        LifecycleAction::Terminate,
    )
    .await
}

/// The tenant's quota: its limits (its own or the platform defaults) and
/// what its allocations hold now.
#[utoipa::path(
    get,
    path = "/v1/quota",
    operation_id = "tenant_quota_get",
    tag = "allocations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Limits and usage", body = TenantQuota),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn tenant_quota_get(ctx: Ctx) -> Result<Json<TenantQuota>, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::QuotaRead)
        .await
        .map_err(ProvisioningError::from)?;
    Ok(Json(
        quota::tenant_quota(tx.conn(), tenant.tenant_id).await?,
    ))
}

/// A project's own quota (if an operator set one; the tenant's applies in
/// any case) and what its allocations hold now.
#[utoipa::path(
    get,
    path = "/v1/projects/{project_id}/quota",
    operation_id = "project_quota_get",
    tag = "allocations",
    params(("project_id" = ProjectId, Path, description = "The project")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Limits and usage", body = ProjectQuota),
        (status = 400, description = "`invalid_path`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such project", body = ErrorBody),
    )
)]
async fn project_quota_get(
    ctx: Ctx,
    Path(project_id): Path<ProjectId>,
) -> Result<Json<ProjectQuota>, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    let project = authorize_project(tx.conn(), &ctx.principal, Action::QuotaRead, project_id)
        .await
        .map_err(ProvisioningError::from)?;
    Ok(Json(
        quota::project_quota(tx.conn(), project.tenant_id, project.project_id).await?,
    ))
}

/// Stop a running allocation. It keeps its host and capacity (and its
/// files there); `start` runs it again.
#[utoipa::path(
    post,
    path = "/v1/projects/{project_id}/allocations/{allocation_id}/stop",
    operation_id = "allocation_stop",
    tag = "allocations",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("allocation_id" = AllocationId, Path, description = "The allocation"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the stop is based on"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted; watch `state` go `stopping` → `stopped`", body = AllocationView),
        (status = 400, description = "`invalid_path` or `invalid_header`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`invalid_state_transition`: only a running allocation stops", body = ErrorBody),
        (status = 412, description = "`precondition_failed`: it changed since that `ETag`", body = ErrorBody),
    )
)]
async fn allocation_stop(
    ctx: Ctx,
    Path((project_id, allocation_id)): Path<(ProjectId, AllocationId)>,
    IfMatch(expected): IfMatch,
) -> Result<(StatusCode, Tagged<AllocationView>), ApiError> {
    lifecycle(
        ctx,
        (project_id, allocation_id),
        expected,
        LifecycleAction::Stop,
    )
    .await
}

/// Start a stopped allocation again, on its host.
#[utoipa::path(
    post,
    path = "/v1/projects/{project_id}/allocations/{allocation_id}/start",
    operation_id = "allocation_start",
    tag = "allocations",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("allocation_id" = AllocationId, Path, description = "The allocation"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the start is based on"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted; watch `state` go `starting` → `running`", body = AllocationView),
        (status = 400, description = "`invalid_path` or `invalid_header`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 402, description = "`credit_exhausted`: the tenant's prepaid credit ran out; starts are held", body = ErrorBody),
        (status = 409, description = "`invalid_state_transition`: only a stopped allocation starts; `host_draining`: its host is being drained", body = ErrorBody),
        (status = 412, description = "`precondition_failed`: it changed since that `ETag`", body = ErrorBody),
    )
)]
async fn allocation_start(
    ctx: Ctx,
    Path((project_id, allocation_id)): Path<(ProjectId, AllocationId)>,
    IfMatch(expected): IfMatch,
) -> Result<(StatusCode, Tagged<AllocationView>), ApiError> {
    lifecycle(
        ctx,
        (project_id, allocation_id),
        expected,
        LifecycleAction::Start,
    )
    .await
}

/// A tenant's request to move an allocation along its lifecycle.
#[derive(Clone, Copy, Debug)]
enum LifecycleAction {
    Stop,
    Start,
    Terminate,
}

/// What every lifecycle request does: authorise it on the project, apply
/// it, answer `202` with the allocation and its new `ETag`.
async fn lifecycle(
    ctx: Ctx,
    (project_id, allocation_id): (ProjectId, AllocationId),
    expected: Option<i64>,
    action: LifecycleAction,
) -> Result<(StatusCode, Tagged<AllocationView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    let permission = match action {
        LifecycleAction::Stop => Action::AllocationStop,
        LifecycleAction::Start => Action::AllocationStart,
        LifecycleAction::Terminate => Action::AllocationTerminate,
    };
    let project = authorize_project(tx.conn(), &ctx.principal, permission, project_id)
        .await
        .map_err(ProvisioningError::from)?;
    let allocation = match action {
        LifecycleAction::Stop => {
            service::allocation_stop(tx, &project, allocation_id, expected).await?
        }
        LifecycleAction::Start => {
            service::allocation_start(tx, &project, allocation_id, expected).await?
        }
        LifecycleAction::Terminate => {
            service::allocation_terminate(tx, &project, allocation_id, expected).await?
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        Tagged(allocation.version, allocation.into()),
    ))
}
