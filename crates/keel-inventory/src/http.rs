//! Handlers of the tenant-facing inventory endpoints.

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use keel_auth::authz::{Action, authorize_tenant};
use keel_auth::{Ctx, TokenKeys};
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, Json, RequestId, TraceParent};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::catalogue::{self, Availability, RegionView};
use crate::enrol::{EnrolRequest, EnrolResponse, NodeChannel, node_enrol};
use crate::{FlavorView, InventoryError, service};
use keel_http::Query;

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
    Arc<NodeChannel>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(flavor_list))
        .routes(routes!(region_list))
        .routes(routes!(availability_list))
        .routes(routes!(node_enrol_handler))
}

/// All flavors (a short, fixed catalogue: not paginated).
#[derive(Serialize, utoipa::ToSchema)]
pub struct FlavorList {
    pub items: Vec<FlavorView>,
}

/// List the flavors that can be launched.
#[utoipa::path(
    get,
    path = "/v1/flavors",
    operation_id = "flavor_list",
    tag = "inventory",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every launchable flavor", body = FlavorList),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn flavor_list(ctx: Ctx) -> Result<Json<FlavorList>, ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::FlavorList)
        .await
        .map_err(InventoryError::from)?;
    let flavors = service::flavor_list(tx.conn()).await?;
    Ok(Json(FlavorList {
        items: flavors.into_iter().map(FlavorView::from).collect(),
    }))
}

/// Every region (a short list: not paginated).
#[derive(Serialize, utoipa::ToSchema)]
pub struct RegionList {
    pub items: Vec<RegionView>,
}

/// List the regions.
#[utoipa::path(
    get,
    path = "/v1/regions",
    operation_id = "region_list",
    tag = "inventory",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every region", body = RegionList),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn region_list(ctx: Ctx) -> Result<Json<RegionList>, ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::RegionList)
        .await
        .map_err(InventoryError::from)?;
    Ok(Json(RegionList {
        items: catalogue::region_list(tx.conn()).await?,
    }))
}

/// `GET /v1/availability` query.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AvailabilityQuery {
    /// Only this region.
    pub region: Option<String>,
}

/// How many of each flavor can launch now, per region.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AvailabilityList {
    pub items: Vec<Availability>,
}

/// How many of each launchable flavor fit right now, per region.
#[utoipa::path(
    get,
    path = "/v1/availability",
    operation_id = "availability_list",
    tag = "inventory",
    params(AvailabilityQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One line per region and flavor", body = AvailabilityList),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 422, description = "`unknown_region`", body = ErrorBody),
    )
)]
async fn availability_list(
    ctx: Ctx,
    Query(query): Query<AvailabilityQuery>,
) -> Result<Json<AvailabilityList>, ApiError> {
    let mut tx = ctx.begin().await.map_err(InventoryError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::AvailabilityRead)
        .await
        .map_err(InventoryError::from)?;
    Ok(Json(AvailabilityList {
        items: catalogue::availability(tx.conn(), query.region.as_deref()).await?,
    }))
}

/// Enrol a node: exchange a one-time join token and a CSR for a node
/// certificate. Called by `keel-agent enrol`, not by tenants.
#[utoipa::path(
    post,
    path = "/v1/nodes/enrol",
    operation_id = "node_enrol",
    tag = "nodes",
    request_body = EnrolRequest,
    responses(
        (status = 201, description = "Enrolled", body = EnrolResponse),
        (status = 401, description = "`invalid_join_token`: unknown, used or expired", body = ErrorBody),
        (status = 422, description = "`validation_failed`, `invalid_body` or `invalid_csr`", body = ErrorBody),
    )
)]
async fn node_enrol_handler(
    State(db): State<Db>,
    State(channel): State<Arc<NodeChannel>>,
    request_id: RequestId,
    trace: TraceParent,
    Json(request): Json<EnrolRequest>,
) -> Result<(StatusCode, Json<EnrolResponse>), ApiError> {
    let meta = keel_auth::context::anonymous_meta(&request_id, &trace);
    let enrolled = node_enrol(&db, meta, &channel, request).await?;
    Ok((StatusCode::CREATED, Json(enrolled)))
}
