//! Tenant routes of billing: prices, invoices and credit.

use axum::extract::{FromRef, State};
use keel_auth::authz::{Action, authorize_tenant};
use keel_auth::{Ctx, TokenKeys};
use keel_core::ids::InvoiceId;
use keel_core::page::{Page, PageParams, Paginated};
use keel_db::Db;
use keel_http::{ApiError, ErrorBody, Json, Path, Query};
use serde::Deserialize;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::invoice::{self, InvoiceDetail, InvoiceView};
use crate::ledger::{self, CreditView};
use crate::rates::{self, RateCardView};
use crate::{BillingConfig, BillingError};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
    Arc<BillingConfig>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(price_list))
        .routes(routes!(invoice_list))
        .routes(routes!(invoice_get))
        .routes(routes!(credit_get))
}

/// The prices in effect now and those scheduled to take effect, per flavor
/// and region.
#[utoipa::path(
    get,
    path = "/v1/prices",
    operation_id = "price_list",
    tag = "billing",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Rate cards in effect or scheduled", body = Vec<RateCardView>),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn price_list(ctx: Ctx) -> Result<Json<Vec<RateCardView>>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::PriceList).await?;
    Ok(Json(rates::current(tx.conn()).await?))
}

/// `GET /v1/billing/invoices`
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InvoiceFilter {
    /// `draft`, `finalized`, `paid` or `void`.
    pub state: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl InvoiceFilter {
    pub(crate) fn validate(&self) -> Result<Page, ApiError> {
        if let Some(state) = &self.state
            && !["draft", "finalized", "paid", "void"].contains(&state.as_str())
        {
            return Err(BillingError::Validation(vec![keel_http::FieldError {
                field: "state".into(),
                code: "invalid".into(),
                message: "one of draft, finalized, paid, void".into(),
            }])
            .into());
        }
        PageParams {
            limit: self.limit,
            cursor: self.cursor.clone(),
        }
        .validate()
        .map_err(keel_auth::http::page_error)
    }
}

/// The tenant's invoices (owners and admins), oldest first.
#[utoipa::path(
    get,
    path = "/v1/billing/invoices",
    operation_id = "invoice_list",
    tag = "billing",
    params(InvoiceFilter),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of invoices", body = Paginated<InvoiceView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
async fn invoice_list(
    ctx: Ctx,
    Query(filter): Query<InvoiceFilter>,
) -> Result<Json<Paginated<InvoiceView>>, ApiError> {
    let page = filter.validate()?;
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::BillingRead).await?;
    Ok(Json(
        invoice::list(
            tx.conn(),
            Some(tenant.tenant_id),
            filter.state.as_deref(),
            page,
        )
        .await?,
    ))
}

/// One invoice with its lines.
#[utoipa::path(
    get,
    path = "/v1/billing/invoices/{invoice_id}",
    operation_id = "invoice_get",
    tag = "billing",
    params(("invoice_id" = InvoiceId, Path, description = "The invoice")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The invoice", body = InvoiceDetail),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn invoice_get(
    ctx: Ctx,
    Path(invoice_id): Path<InvoiceId>,
) -> Result<Json<InvoiceDetail>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::BillingRead).await?;
    // Row-level security: another tenant's invoice is not found.
    Ok(Json(invoice::get(tx.conn(), invoice_id).await?))
}

/// The tenant's prepaid credit: the balance (the sum of the entries) and
/// one page of the ledger, oldest first.
#[utoipa::path(
    get,
    path = "/v1/billing/credit",
    operation_id = "credit_get",
    tag = "billing",
    params(PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Balance and entries", body = CreditView),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
    )
)]
async fn credit_get(
    ctx: Ctx,
    State(config): State<Arc<BillingConfig>>,
    Query(params): Query<PageParams>,
) -> Result<Json<CreditView>, ApiError> {
    let page = params.validate().map_err(keel_auth::http::page_error)?;
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::BillingRead).await?;
    Ok(Json(
        ledger::credit(tx.conn(), tenant.tenant_id, config.currency, page).await?,
    ))
}
