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

use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::invoice::{self, InvoiceDetail, InvoiceView, Period, Policy};
use crate::ledger::{self, CreditView};
use crate::rates::{self, RateCardView};
use crate::standing::{self, AccountView};
use crate::usage::{self, UsageSoFar};
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
        .routes(routes!(usage_get))
        .routes(routes!(usage_csv))
        .routes(routes!(invoices_csv))
        .routes(routes!(account_get))
}

/// The tenant's billing account: how it pays, its credit balance, what it
/// owes and has not paid, and — for prepaid tenants — its standing
/// (whether launches or running allocations are stopped for lack of
/// credit).
#[utoipa::path(
    get,
    path = "/v1/billing/account",
    operation_id = "billing_account_get",
    tag = "billing",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The account", body = AccountView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
    )
)]
async fn account_get(
    ctx: Ctx,
    State(config): State<Arc<BillingConfig>>,
) -> Result<Json<AccountView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::BillingRead).await?;
    let now = usage::db_now(tx.conn()).await?;
    Ok(Json(
        standing::account(tx.conn(), &config, tenant.tenant_id, now).await?,
    ))
}

/// `GET /v1/billing/usage`
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// The month, `YYYY-MM`; the current one if left out.
    #[param(value_type = Option<String>, example = "2026-12")]
    pub period: Option<Period>,
}

/// The period asked for (the current one by default), refused if it has
/// not begun.
async fn period_asked(
    conn: &mut sqlx::PgConnection,
    query: &UsageQuery,
) -> Result<(Period, time::OffsetDateTime), BillingError> {
    let now = usage::db_now(conn).await?;
    let period = query
        .period
        .unwrap_or(Period(crate::period::period_of(now)));
    if period.start() > now {
        return Err(BillingError::PeriodInFuture);
    }
    Ok((period, now))
}

/// The tenant's usage in a period so far: run time with the open runs
/// counted up to now, priced as its invoice would be (before tax and
/// credit), and per project.
#[utoipa::path(
    get,
    path = "/v1/billing/usage",
    operation_id = "usage_get",
    tag = "billing",
    params(UsageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Usage so far", body = UsageSoFar),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
        (status = 422, description = "`period_in_future`", body = ErrorBody),
    )
)]
async fn usage_get(
    ctx: Ctx,
    State(config): State<Arc<BillingConfig>>,
    Query(query): Query<UsageQuery>,
) -> Result<Json<UsageSoFar>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::BillingRead).await?;
    let (period, now) = period_asked(tx.conn(), &query).await?;
    Ok(Json(
        usage::so_far(
            tx.conn(),
            tenant.tenant_id,
            period,
            now,
            Policy::from(&*config),
        )
        .await?,
    ))
}

fn csv_response(filename: &str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response()
}

/// The period's usage as CSV: one row per piece of run time (`billed`,
/// `unbilled`, or `open`: a run still going, up to now).
#[utoipa::path(
    get,
    path = "/v1/billing/usage.csv",
    operation_id = "usage_csv",
    tag = "billing",
    params(UsageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "RFC 4180 CSV with a header line", content_type = "text/csv", body = String),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
        (status = 422, description = "`period_in_future`", body = ErrorBody),
    )
)]
async fn usage_csv(ctx: Ctx, Query(query): Query<UsageQuery>) -> Result<Response, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::BillingRead).await?;
    let (period, now) = period_asked(tx.conn(), &query).await?;
    let body = usage::usage_csv(tx.conn(), tenant.tenant_id, period, now).await?;
    Ok(csv_response(
        &format!(
            "usage-{}-{:02}.csv",
            period.0.year(),
            u8::from(period.0.month())
        ),
        body,
    ))
}

/// Every invoice as CSV, one row per line with the invoice's totals.
#[utoipa::path(
    get,
    path = "/v1/billing/invoices.csv",
    operation_id = "invoices_csv",
    tag = "billing",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "RFC 4180 CSV with a header line", content_type = "text/csv", body = String),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
    )
)]
async fn invoices_csv(ctx: Ctx) -> Result<Response, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::BillingRead).await?;
    let body = usage::invoices_csv(tx.conn(), tenant.tenant_id).await?;
    Ok(csv_response("invoices.csv", body))
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
