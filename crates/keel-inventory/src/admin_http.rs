//! Operator endpoints of the inventory (`/v1/admin/hosts…`).

use axum::extract::{FromRef, Path};
use keel_auth::TokenKeys;
use keel_auth::admin::{OperatorCtx, authorize_platform};
use keel_auth::authz::Action;
use keel_core::ids::HostId;
use keel_core::page::{Page, PageParams, Paginated};
use keel_db::{Audit, Db};
use keel_http::{ApiError, ErrorBody, Json, Query};
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::InventoryError;
use crate::catalogue::{self, AdminFlavorView, NewFlavor, NewRegion, RegionView};
use crate::hosts::{self, HostAction};
use crate::nodes::{self, HostView};
use axum::http::StatusCode;
use keel_http::{IfMatch, Tagged};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(admin_host_list))
        .routes(routes!(admin_host_revoke))
        .routes(routes!(admin_host_cordon))
        .routes(routes!(admin_host_uncordon))
        .routes(routes!(admin_host_drain))
        .routes(routes!(admin_flavor_list, admin_flavor_create))
        .routes(routes!(admin_flavor_retire))
        .routes(routes!(admin_region_create))
}

/// List hosts (revoked ones included).
#[utoipa::path(
    get,
    path = "/v1/admin/hosts",
    operation_id = "admin_host_list",
    tag = "admin",
    params(PageParams),
    security(("operator" = [])),
    responses(
        (status = 200, description = "One page of hosts", body = Paginated<HostView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_host_list(
    ctx: OperatorCtx,
    Query(params): Query<PageParams>,
) -> Result<Json<Paginated<HostView>>, ApiError> {
    let page: Page = params.validate().map_err(keel_auth::http::page_error)?;
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminHostList).await?;
    let hosts = nodes::host_list(tx.conn(), page.after, page.fetch_limit()).await?;
    tx.commit(Audit::new("admin.host_list", None, nodes::hosts_resource()))
        .await
        .map_err(InventoryError::from)?;
    Ok(Json(Paginated::from_rows(hosts, page, |host| {
        host.id.as_uuid()
    })))
}

/// Revoke a host: its certificates are refused from now on, no task is
/// signed for it, it cannot renew or re-enrol, and its allocations fail.
/// Revoking a revoked host returns it unchanged.
#[utoipa::path(
    post,
    path = "/v1/admin/hosts/{host_id}/revoke",
    operation_id = "admin_host_revoke",
    tag = "admin",
    params(("host_id" = HostId, Path, description = "The host")),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The host, revoked", body = HostView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn admin_host_revoke(
    ctx: OperatorCtx,
    Path(host_id): Path<HostId>,
) -> Result<Json<HostView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminHostRevoke).await?;
    Ok(Json(nodes::host_revoke(tx, host_id).await?))
}

async fn act_on_host(
    ctx: OperatorCtx,
    host_id: HostId,
    action: HostAction,
    expected: Option<i64>,
) -> Result<Tagged<HostView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminHostManage).await?;
    let host = hosts::host_act(tx, host_id, action, expected).await?;
    Ok(Tagged(host.version, host))
}

/// Cordon a host: the scheduler places nothing new on it; what runs there
/// keeps running. On an offline host, it decides the state it returns in.
#[utoipa::path(
    post,
    path = "/v1/admin/hosts/{host_id}/cordon",
    operation_id = "admin_host_cordon",
    tag = "admin",
    params(
        ("host_id" = HostId, Path, description = "The host"),
        ("If-Match" = Option<String>, Header, description = "The host's `ETag`"),
    ),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The host; `ETag` carries its version", body = HostView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`: no such host, or it is revoked", body = ErrorBody),
        (status = 412, description = "`precondition_failed`", body = ErrorBody),
    )
)]
async fn admin_host_cordon(
    ctx: OperatorCtx,
    Path(host_id): Path<HostId>,
    IfMatch(expected): IfMatch,
) -> Result<Tagged<HostView>, ApiError> {
    act_on_host(ctx, host_id, HostAction::Cordon, expected).await
}

/// Uncordon a host: it takes new allocations again (also ends a drain).
#[utoipa::path(
    post,
    path = "/v1/admin/hosts/{host_id}/uncordon",
    operation_id = "admin_host_uncordon",
    tag = "admin",
    params(
        ("host_id" = HostId, Path, description = "The host"),
        ("If-Match" = Option<String>, Header, description = "The host's `ETag`"),
    ),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The host; `ETag` carries its version", body = HostView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`: no such host, or it is revoked", body = ErrorBody),
        (status = 412, description = "`precondition_failed`", body = ErrorBody),
    )
)]
async fn admin_host_uncordon(
    ctx: OperatorCtx,
    Path(host_id): Path<HostId>,
    IfMatch(expected): IfMatch,
) -> Result<Tagged<HostView>, ApiError> {
    act_on_host(ctx, host_id, HostAction::Uncordon, expected).await
}

/// Drain a host: nothing new is placed on it, and once no allocation holds
/// capacity there it becomes `cordoned` (event `host.drained`).
#[utoipa::path(
    post,
    path = "/v1/admin/hosts/{host_id}/drain",
    operation_id = "admin_host_drain",
    tag = "admin",
    params(
        ("host_id" = HostId, Path, description = "The host"),
        ("If-Match" = Option<String>, Header, description = "The host's `ETag`"),
    ),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The host; `ETag` carries its version", body = HostView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`: no such host, or it is revoked", body = ErrorBody),
        (status = 412, description = "`precondition_failed`", body = ErrorBody),
    )
)]
async fn admin_host_drain(
    ctx: OperatorCtx,
    Path(host_id): Path<HostId>,
    IfMatch(expected): IfMatch,
) -> Result<Tagged<HostView>, ApiError> {
    act_on_host(ctx, host_id, HostAction::Drain, expected).await
}

/// Every flavor, retired ones included.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct AdminFlavorList {
    pub items: Vec<AdminFlavorView>,
}

/// List every flavor, retired ones included.
#[utoipa::path(
    get,
    path = "/v1/admin/flavors",
    operation_id = "admin_flavor_list",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "Every flavor", body = AdminFlavorList),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_flavor_list(ctx: OperatorCtx) -> Result<Json<AdminFlavorList>, ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminFlavorList).await?;
    let items = catalogue::admin_flavor_list(tx.conn()).await?;
    tx.commit(Audit::new(
        "admin.flavor_list",
        None,
        keel_core::ResourceName::new(None, None, None, "platform", "flavors"),
    ))
    .await
    .map_err(InventoryError::from)?;
    Ok(Json(AdminFlavorList { items }))
}

/// Create a flavor. Its name is never reused and its size never changes.
#[utoipa::path(
    post,
    path = "/v1/admin/flavors",
    operation_id = "admin_flavor_create",
    tag = "admin",
    request_body = NewFlavor,
    security(("operator" = [])),
    responses(
        (status = 201, description = "Created; `ETag` carries its version", body = AdminFlavorView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 409, description = "`flavor_exists`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn admin_flavor_create(
    ctx: OperatorCtx,
    Json(new): Json<NewFlavor>,
) -> Result<(StatusCode, Tagged<AdminFlavorView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminFlavorManage).await?;
    let flavor = catalogue::flavor_create(tx, new).await?;
    Ok((StatusCode::CREATED, Tagged(flavor.version, flavor)))
}

/// Retire a flavor: no new launches; running allocations are untouched.
#[utoipa::path(
    post,
    path = "/v1/admin/flavors/{flavor}/retire",
    operation_id = "admin_flavor_retire",
    tag = "admin",
    params(
        ("flavor" = String, Path, description = "The flavor's name"),
        ("If-Match" = Option<String>, Header, description = "The flavor's `ETag`"),
    ),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The flavor, retired", body = AdminFlavorView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`", body = ErrorBody),
    )
)]
async fn admin_flavor_retire(
    ctx: OperatorCtx,
    Path(flavor): Path<String>,
    IfMatch(expected): IfMatch,
) -> Result<Tagged<AdminFlavorView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminFlavorManage).await?;
    let flavor = catalogue::flavor_retire(tx, &flavor, expected).await?;
    Ok(Tagged(flavor.version, flavor))
}

/// Create a region; hosts join it with join tokens made for it.
#[utoipa::path(
    post,
    path = "/v1/admin/regions",
    operation_id = "admin_region_create",
    tag = "admin",
    request_body = NewRegion,
    security(("operator" = [])),
    responses(
        (status = 201, description = "Created", body = RegionView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 409, description = "`region_exists`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn admin_region_create(
    ctx: OperatorCtx,
    Json(new): Json<NewRegion>,
) -> Result<(StatusCode, Json<RegionView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminRegionManage).await?;
    let region = catalogue::region_create(tx, new).await?;
    Ok((StatusCode::CREATED, Json(region)))
}
