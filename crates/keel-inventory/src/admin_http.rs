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
use crate::nodes::{self, HostView};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(admin_host_list))
        .routes(routes!(admin_host_revoke))
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
