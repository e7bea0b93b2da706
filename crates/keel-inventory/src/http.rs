//! Handlers of the tenant-facing inventory endpoints.

use std::sync::Arc;

use axum::extract::FromRef;
use keel_auth::authz::{Action, authorize_tenant};
use keel_auth::{Ctx, TokenKeys};
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, Json};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{FlavorView, InventoryError, service};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    OpenApiRouter::new().routes(routes!(flavor_list))
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
