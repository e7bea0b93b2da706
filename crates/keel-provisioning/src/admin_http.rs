//! Operator endpoints of provisioning: quotas
//! (`/v1/admin/tenants/{tenant_id}/quota…`, `/v1/admin/quota-defaults`).

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_auth::TokenKeys;
use keel_auth::admin::{OperatorCtx, authorize_platform};
use keel_auth::authz::Action;
use keel_core::ids::{ProjectId, TenantId};
use keel_db::{Audit, Db};
use keel_http::{ApiError, ErrorBody, IfMatch, Json, Path, Tagged};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::ProvisioningError;
use crate::quota::{self, QuotaLimits, TenantQuota};
use crate::reconcile::{self, Deadlines, ReconcileReport};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
    Deadlines: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(admin_tenant_quota_get, admin_tenant_quota_set))
        .routes(routes!(admin_project_quota_set, admin_project_quota_remove))
        .routes(routes!(admin_quota_defaults_get, admin_quota_defaults_set))
        .routes(routes!(admin_reconcile))
}

/// Run the reconciler now: every allocation past its deadline is retried
/// or settled (as the worker does every few seconds).
#[utoipa::path(
    post,
    path = "/v1/admin/reconcile",
    operation_id = "admin_reconcile",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "What the pass did", body = ReconcileReport),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
    )
)]
async fn admin_reconcile(
    ctx: OperatorCtx,
    State(db): State<Db>,
    State(deadlines): State<Deadlines>,
) -> Result<Json<ReconcileReport>, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminReconcile).await?;
    tx.commit(Audit::new(
        "admin.reconcile",
        None,
        keel_core::ResourceName::new(None, None, None, "platform", "allocations"),
    ))
    .await
    .map_err(ProvisioningError::from)?;
    let report = reconcile::reconcile_deadlines(&db, ctx.meta.clone(), &deadlines).await?;
    Ok(Json(report))
}

/// A tenant's quota and usage. While the tenant has its own limits, the
/// `ETag` is their version (for `If-Match` on a change); while the
/// defaults apply there is none.
#[utoipa::path(
    get,
    path = "/v1/admin/tenants/{tenant_id}/quota",
    operation_id = "admin_tenant_quota_get",
    tag = "admin",
    params(("tenant_id" = TenantId, Path, description = "The tenant")),
    security(("operator" = [])),
    responses(
        (status = 200, description = "Limits and usage", body = TenantQuota,
         headers(("ETag" = String, description = "The version of the tenant's own limits, if it has any"))),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn admin_tenant_quota_get(
    ctx: OperatorCtx,
    Path(tenant_id): Path<TenantId>,
) -> Result<Response, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminQuotaRead).await?;
    quota::scope_exists(tx.conn(), tenant_id, None).await?;
    let quota = quota::tenant_quota(tx.conn(), tenant_id).await?;
    tx.commit(Audit::new(
        "admin.quota_read",
        Some(tenant_id),
        keel_core::ResourceName::new(None, Some(tenant_id), None, "quota", tenant_id),
    ))
    .await
    .map_err(ProvisioningError::from)?;
    Ok(match quota.version {
        Some(version) => Tagged(version, quota).into_response(),
        None => Json(quota).into_response(),
    })
}

/// Set a tenant's quota. Lowering it below what is in use stops new
/// launches only. With `If-Match`, only if the tenant's own limits are
/// still at that version (a tenant on the defaults has none).
#[utoipa::path(
    put,
    path = "/v1/admin/tenants/{tenant_id}/quota",
    operation_id = "admin_tenant_quota_set",
    tag = "admin",
    params(
        ("tenant_id" = TenantId, Path, description = "The tenant"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the change is based on"),
    ),
    request_body = QuotaLimits,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The limits now", body = QuotaLimits,
         headers(("ETag" = String, description = "Their version"))),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`: it changed since that `ETag`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn admin_tenant_quota_set(
    ctx: OperatorCtx,
    Path(tenant_id): Path<TenantId>,
    IfMatch(expected): IfMatch,
    Json(limits): Json<QuotaLimits>,
) -> Result<Tagged<QuotaLimits>, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminQuotaManage).await?;
    let (limits, version) = quota::quota_set(tx, tenant_id, None, limits, expected).await?;
    Ok(Tagged(version, limits))
}

/// Set a project's own quota (a second, narrower limit inside its
/// tenant's). With `If-Match`, only if its limits are still at that
/// version.
#[utoipa::path(
    put,
    path = "/v1/admin/tenants/{tenant_id}/projects/{project_id}/quota",
    operation_id = "admin_project_quota_set",
    tag = "admin",
    params(
        ("tenant_id" = TenantId, Path, description = "The tenant"),
        ("project_id" = ProjectId, Path, description = "The project"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the change is based on"),
    ),
    request_body = QuotaLimits,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The limits now", body = QuotaLimits,
         headers(("ETag" = String, description = "Their version"))),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`: it changed since that `ETag`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn admin_project_quota_set(
    ctx: OperatorCtx,
    Path((tenant_id, project_id)): Path<(TenantId, ProjectId)>,
    IfMatch(expected): IfMatch,
    Json(limits): Json<QuotaLimits>,
) -> Result<Tagged<QuotaLimits>, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminQuotaManage).await?;
    let (limits, version) =
        quota::quota_set(tx, tenant_id, Some(project_id), limits, expected).await?;
    Ok(Tagged(version, limits))
}

/// Remove a project's own quota (its tenant's still applies). With
/// `If-Match`, only if its limits are still at that version.
#[utoipa::path(
    delete,
    path = "/v1/admin/tenants/{tenant_id}/projects/{project_id}/quota",
    operation_id = "admin_project_quota_remove",
    tag = "admin",
    params(
        ("tenant_id" = TenantId, Path, description = "The tenant"),
        ("project_id" = ProjectId, Path, description = "The project"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` the change is based on"),
    ),
    security(("operator" = [])),
    responses(
        (status = 204, description = "Removed (or there was none)"),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 412, description = "`precondition_failed`: it changed since that `ETag`", body = ErrorBody),
    )
)]
async fn admin_project_quota_remove(
    ctx: OperatorCtx,
    Path((tenant_id, project_id)): Path<(TenantId, ProjectId)>,
    IfMatch(expected): IfMatch,
) -> Result<StatusCode, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminQuotaManage).await?;
    quota::project_quota_remove(tx, tenant_id, project_id, expected).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The quota of every tenant without its own.
#[utoipa::path(
    get,
    path = "/v1/admin/quota-defaults",
    operation_id = "admin_quota_defaults_get",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The default limits", body = QuotaLimits,
         headers(("ETag" = String, description = "Their version"))),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_quota_defaults_get(ctx: OperatorCtx) -> Result<Tagged<QuotaLimits>, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminQuotaRead).await?;
    let (limits, version) = quota::defaults(tx.conn()).await?;
    tx.commit(Audit::new(
        "admin.quota_defaults_read",
        None,
        keel_core::ResourceName::new(None, None, None, "platform", "quota-defaults"),
    ))
    .await
    .map_err(ProvisioningError::from)?;
    Ok(Tagged(version, limits))
}

/// Change the quota of every tenant without its own. With `If-Match`,
/// only if the defaults are still at that version.
#[utoipa::path(
    put,
    path = "/v1/admin/quota-defaults",
    operation_id = "admin_quota_defaults_set",
    tag = "admin",
    params(("If-Match" = Option<String>, Header, description = "The `ETag` the change is based on")),
    request_body = QuotaLimits,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The default limits now", body = QuotaLimits,
         headers(("ETag" = String, description = "Their version"))),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 412, description = "`precondition_failed`: it changed since that `ETag`", body = ErrorBody),
        (status = 422, description = "`validation_failed` or `invalid_body`", body = ErrorBody),
    )
)]
async fn admin_quota_defaults_set(
    ctx: OperatorCtx,
    IfMatch(expected): IfMatch,
    Json(limits): Json<QuotaLimits>,
) -> Result<Tagged<QuotaLimits>, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminQuotaManage).await?;
    let (limits, version) = quota::defaults_set(tx, limits, expected).await?;
    Ok(Tagged(version, limits))
}
