//! Operator routes of billing: rate cards, invoices (draft, finalize, void,
//! mark paid: the manual payment provider), credit grants and the
//! reconciliation check. Operators' reads of a tenant's billing are
//! audited like their other reads of tenant data.

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use keel_auth::TokenKeys;
use keel_auth::admin::{OperatorCtx, authorize_platform};
use keel_auth::authz::Action;
use keel_core::ResourceName;
use keel_core::ids::{InvoiceId, TenantId};
use keel_core::page::{PageParams, Paginated};
use keel_db::{Audit, Db};
use keel_http::{ApiError, ErrorBody, FieldError, Json, Path, Query};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::invoice::{self, Discrepancy, InvoiceDetail, InvoiceView, Period, Policy};
use crate::ledger::{self, CreditEntryView, CreditView, NewGrant};
use crate::rates::{self, NewRateCard, RateCardFilter, RateCardView};
use crate::standing::{self, AccountUpdate, AccountView};
use crate::{BillingConfig, BillingError, meter};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
    Arc<BillingConfig>: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(admin_rate_card_list, admin_rate_card_create))
        .routes(routes!(admin_invoice_list))
        .routes(routes!(admin_invoice_get))
        .routes(routes!(admin_invoice_generate))
        .routes(routes!(admin_invoice_finalize))
        .routes(routes!(admin_invoice_void))
        .routes(routes!(admin_invoice_mark_paid))
        .routes(routes!(admin_credit_get, admin_credit_grant))
        .routes(routes!(admin_billing_reconcile))
        .routes(routes!(
            admin_billing_account_get,
            admin_billing_account_set
        ))
}

/// A tenant's billing account: mode, balance, outstanding, standing.
#[utoipa::path(
    get,
    path = "/v1/admin/tenants/{tenant_id}/billing-account",
    operation_id = "admin_billing_account_get",
    tag = "admin",
    params(("tenant_id" = TenantId, Path, description = "The tenant")),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The account", body = AccountView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn admin_billing_account_get(
    ctx: OperatorCtx,
    State(config): State<Arc<BillingConfig>>,
    Path(tenant_id): Path<TenantId>,
) -> Result<Json<AccountView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingRead).await?;
    invoice::tenant_known(tx.conn(), tenant_id).await?;
    let now = crate::usage::db_now(tx.conn()).await?;
    let view = standing::account(tx.conn(), &config, tenant_id, now).await?;
    tx.commit(Audit::new(
        "admin.billing_account_read",
        Some(tenant_id),
        ResourceName::new(None, Some(tenant_id), None, "billing-account", tenant_id),
    ))
    .await
    .map_err(BillingError::from)?;
    Ok(Json(view))
}

/// Set how a tenant pays: `prepaid` (usage draws on credit; running out
/// stops launches, then running allocations) or `invoiced`. Leaving
/// prepaid lifts any hold.
#[utoipa::path(
    put,
    path = "/v1/admin/tenants/{tenant_id}/billing-account",
    operation_id = "admin_billing_account_set",
    tag = "admin",
    params(("tenant_id" = TenantId, Path, description = "The tenant")),
    request_body = AccountUpdate,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The account", body = AccountView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
    )
)]
async fn admin_billing_account_set(
    ctx: OperatorCtx,
    State(config): State<Arc<BillingConfig>>,
    Path(tenant_id): Path<TenantId>,
    Json(update): Json<AccountUpdate>,
) -> Result<Json<AccountView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingManage).await?;
    Ok(Json(
        standing::set_mode(tx, &config, tenant_id, update).await?,
    ))
}

/// Every rate card, past ones too.
#[utoipa::path(
    get,
    path = "/v1/admin/rate-cards",
    operation_id = "admin_rate_card_list",
    tag = "admin",
    params(RateCardFilter),
    security(("operator" = [])),
    responses(
        (status = 200, description = "Rate cards by flavor, region and time", body = Vec<RateCardView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_rate_card_list(
    ctx: OperatorCtx,
    Query(filter): Query<RateCardFilter>,
) -> Result<Json<Vec<RateCardView>>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingRead).await?;
    Ok(Json(rates::list(tx.conn(), &filter).await?))
}

/// Add a price for a flavor in a region, from now or a later time. The
/// latest card of the pair, if it began earlier, ends where this one
/// begins; any other overlap is refused.
#[utoipa::path(
    post,
    path = "/v1/admin/rate-cards",
    operation_id = "admin_rate_card_create",
    tag = "admin",
    request_body = NewRateCard,
    security(("operator" = [])),
    responses(
        (status = 201, description = "The card", body = RateCardView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 409, description = "`rate_card_overlap`", body = ErrorBody),
        (status = 422, description = "`validation_failed`, `unknown_flavor`, `unknown_region`, `currency_mismatch`, `effective_from_in_past`", body = ErrorBody),
    )
)]
async fn admin_rate_card_create(
    ctx: OperatorCtx,
    State(config): State<Arc<BillingConfig>>,
    Json(new): Json<NewRateCard>,
) -> Result<(StatusCode, Json<RateCardView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingManage).await?;
    let card = rates::create(tx, config.currency, new).await?;
    Ok((StatusCode::CREATED, Json(card)))
}

/// `GET /v1/admin/invoices`
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AdminInvoiceFilter {
    pub tenant_id: Option<TenantId>,
    /// `draft`, `finalized`, `paid` or `void`.
    pub state: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Invoices of every tenant (or one), oldest first.
#[utoipa::path(
    get,
    path = "/v1/admin/invoices",
    operation_id = "admin_invoice_list",
    tag = "admin",
    params(AdminInvoiceFilter),
    security(("operator" = [])),
    responses(
        (status = 200, description = "One page of invoices", body = Paginated<InvoiceView>),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
async fn admin_invoice_list(
    ctx: OperatorCtx,
    Query(filter): Query<AdminInvoiceFilter>,
) -> Result<Json<Paginated<InvoiceView>>, ApiError> {
    let page = crate::http::InvoiceFilter {
        state: filter.state.clone(),
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    }
    .validate()?;
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingRead).await?;
    let invoices =
        invoice::list(tx.conn(), filter.tenant_id, filter.state.as_deref(), page).await?;
    tx.commit(Audit::new(
        "admin.invoice_list",
        filter.tenant_id,
        invoices_resource(filter.tenant_id),
    ))
    .await
    .map_err(BillingError::from)?;
    Ok(Json(invoices))
}

fn invoices_resource(tenant_id: Option<TenantId>) -> ResourceName {
    ResourceName::new(None, tenant_id, None, "invoices", "*")
}

/// One invoice with its lines.
#[utoipa::path(
    get,
    path = "/v1/admin/invoices/{invoice_id}",
    operation_id = "admin_invoice_get",
    tag = "admin",
    params(("invoice_id" = InvoiceId, Path, description = "The invoice")),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The invoice", body = InvoiceDetail),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn admin_invoice_get(
    ctx: OperatorCtx,
    Path(invoice_id): Path<InvoiceId>,
) -> Result<Json<InvoiceDetail>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingRead).await?;
    let detail = invoice::get(tx.conn(), invoice_id).await?;
    tx.commit(Audit::new(
        "admin.invoice_read",
        Some(detail.invoice.tenant_id),
        invoice::resource(&detail.invoice),
    ))
    .await
    .map_err(BillingError::from)?;
    Ok(Json(detail))
}

/// `POST /v1/admin/tenants/{tenant_id}/invoices`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvoiceRequest {
    /// The billing period, a month that has ended: `YYYY-MM`.
    #[schema(value_type = String, example = "2026-11")]
    pub period: Period,
}

/// Draft (or recompute) a tenant's invoice for an ended period now, rather
/// than waiting for the worker's run; an invoice past draft is returned
/// as it is. A tenant without usage gets an empty draft.
#[utoipa::path(
    post,
    path = "/v1/admin/tenants/{tenant_id}/invoices",
    operation_id = "admin_invoice_generate",
    tag = "admin",
    params(("tenant_id" = TenantId, Path, description = "The tenant")),
    request_body = InvoiceRequest,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The invoice", body = InvoiceDetail),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`: no such tenant", body = ErrorBody),
        (status = 409, description = "`earlier_invoice_open`", body = ErrorBody),
        (status = 422, description = "`validation_failed`, `period_not_ended`, `currency_mismatch`", body = ErrorBody),
    )
)]
async fn admin_invoice_generate(
    ctx: OperatorCtx,
    State(db): State<Db>,
    State(config): State<Arc<BillingConfig>>,
    Path(tenant_id): Path<TenantId>,
    Json(request): Json<InvoiceRequest>,
) -> Result<Json<InvoiceDetail>, ApiError> {
    let tx = cut_then_begin(&ctx, &db, tenant_id, request.period).await?;
    let (detail, _) =
        invoice::generate(tx, Policy::from(&*config), tenant_id, request.period, true).await?;
    // Asked with `even_if_empty`, generation always has an invoice.
    Ok(Json(detail.ok_or(BillingError::UnknownTenant)?))
}

/// Authorises a billing change; then, for a change that bills usage,
/// cuts the tenant's open runs at the period end (bookkeeping in its own
/// transaction, harmless on its own: a cut is where the run would be cut
/// anyway); then opens the transaction of the change. No transaction is
/// held open while the cut runs.
async fn cut_then_begin(
    ctx: &OperatorCtx,
    db: &Db,
    tenant_id: TenantId,
    period: Period,
) -> Result<keel_db::WriteTx, ApiError> {
    authorize_manage(ctx).await?;
    meter::cut_open_runs(db, tenant_id.as_uuid(), period).await?;
    Ok(ctx.begin().await.map_err(BillingError::from)?)
}

async fn authorize_manage(ctx: &OperatorCtx) -> Result<(), ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingManage).await?;
    Ok(())
}

/// The transaction of a change to an invoice: a draft's usage is cut at
/// its period end first (finalizing or voiding claims it).
async fn begin_invoice_change(
    ctx: &OperatorCtx,
    db: &Db,
    invoice_id: InvoiceId,
) -> Result<keel_db::WriteTx, ApiError> {
    let current = {
        let mut tx = ctx.begin().await.map_err(BillingError::from)?;
        authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingManage).await?;
        invoice::get(tx.conn(), invoice_id).await?.invoice
    };
    if current.state == "draft" {
        let period = Period(current.period_start);
        meter::cut_open_runs(db, current.tenant_id.as_uuid(), period).await?;
    }
    Ok(ctx.begin().await.map_err(BillingError::from)?)
}

/// Finalize a draft now: its usage is claimed, credit drawn, numbers fixed.
/// An invoice credit covers entirely is paid at once.
#[utoipa::path(
    post,
    path = "/v1/admin/invoices/{invoice_id}/finalize",
    operation_id = "admin_invoice_finalize",
    tag = "admin",
    params(("invoice_id" = InvoiceId, Path, description = "The invoice")),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The invoice, finalized (or paid)", body = InvoiceDetail),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`invoice_state`, `earlier_invoice_open`", body = ErrorBody),
        (status = 422, description = "`period_not_ended`, `currency_mismatch`", body = ErrorBody),
    )
)]
async fn admin_invoice_finalize(
    ctx: OperatorCtx,
    State(db): State<Db>,
    State(config): State<Arc<BillingConfig>>,
    Path(invoice_id): Path<InvoiceId>,
) -> Result<Json<InvoiceDetail>, ApiError> {
    let tx = begin_invoice_change(&ctx, &db, invoice_id).await?;
    Ok(Json(
        invoice::finalize(tx, Policy::from(&*config), invoice_id).await?,
    ))
}

/// `POST /v1/admin/invoices/{invoice_id}/void`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidRequest {
    /// Why, for the audit log (1–500 characters).
    pub reason: String,
}

/// Void an unpaid invoice: its usage is never billed; credit it drew is
/// given back.
#[utoipa::path(
    post,
    path = "/v1/admin/invoices/{invoice_id}/void",
    operation_id = "admin_invoice_void",
    tag = "admin",
    params(("invoice_id" = InvoiceId, Path, description = "The invoice")),
    request_body = VoidRequest,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The invoice, void", body = InvoiceDetail),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`invoice_state`: paid; `earlier_invoice_open`", body = ErrorBody),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
async fn admin_invoice_void(
    ctx: OperatorCtx,
    State(db): State<Db>,
    State(config): State<Arc<BillingConfig>>,
    Path(invoice_id): Path<InvoiceId>,
    Json(request): Json<VoidRequest>,
) -> Result<Json<InvoiceDetail>, ApiError> {
    let length = request.reason.trim().chars().count();
    if !(1..=500).contains(&length) {
        return Err(invalid("reason", "1–500 characters"));
    }
    let tx = begin_invoice_change(&ctx, &db, invoice_id).await?;
    Ok(Json(
        invoice::void(
            tx,
            Policy::from(&*config),
            invoice_id,
            request.reason.trim(),
        )
        .await?,
    ))
}

fn invalid(field: &str, message: &str) -> ApiError {
    BillingError::Validation(vec![FieldError {
        field: field.into(),
        code: "invalid".into(),
        message: message.into(),
    }])
    .into()
}

/// `POST /v1/admin/invoices/{invoice_id}/mark-paid`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkPaidRequest {
    /// The payment's reference (a bank transfer, a cheque), 1–200
    /// characters.
    pub reference: String,
}

/// Record that a finalized invoice was paid outside Keel (the manual
/// payment provider). Repeating it with the same reference changes
/// nothing.
#[utoipa::path(
    post,
    path = "/v1/admin/invoices/{invoice_id}/mark-paid",
    operation_id = "admin_invoice_mark_paid",
    tag = "admin",
    params(("invoice_id" = InvoiceId, Path, description = "The invoice")),
    request_body = MarkPaidRequest,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The invoice, paid", body = InvoiceDetail),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`invoice_state`", body = ErrorBody),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
async fn admin_invoice_mark_paid(
    ctx: OperatorCtx,
    Path(invoice_id): Path<InvoiceId>,
    Json(request): Json<MarkPaidRequest>,
) -> Result<Json<InvoiceDetail>, ApiError> {
    let reference = request.reference.trim();
    if !(1..=200).contains(&reference.chars().count()) {
        return Err(invalid("reference", "1–200 characters"));
    }
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingManage).await?;
    Ok(Json(
        invoice::mark_paid(tx, invoice_id, "manual", reference).await?,
    ))
}

/// A tenant's credit balance and ledger.
#[utoipa::path(
    get,
    path = "/v1/admin/tenants/{tenant_id}/credit",
    operation_id = "admin_credit_get",
    tag = "admin",
    params(("tenant_id" = TenantId, Path, description = "The tenant"), PageParams),
    security(("operator" = [])),
    responses(
        (status = 200, description = "Balance and entries", body = CreditView),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn admin_credit_get(
    ctx: OperatorCtx,
    State(config): State<Arc<BillingConfig>>,
    Path(tenant_id): Path<TenantId>,
    Query(params): Query<PageParams>,
) -> Result<Json<CreditView>, ApiError> {
    let page = params.validate().map_err(keel_auth::http::page_error)?;
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingRead).await?;
    invoice::tenant_known(tx.conn(), tenant_id).await?;
    let credit = ledger::credit(tx.conn(), tenant_id, config.currency, page).await?;
    tx.commit(Audit::new(
        "admin.credit_read",
        Some(tenant_id),
        ResourceName::new(None, Some(tenant_id), None, "credit", tenant_id),
    ))
    .await
    .map_err(BillingError::from)?;
    Ok(Json(credit))
}

/// Grant a tenant credit: a gift, a contract's prepayment, or a payment
/// received out of band (the manual payment provider). A grant with a
/// reference is made once.
#[utoipa::path(
    post,
    path = "/v1/admin/tenants/{tenant_id}/credit",
    operation_id = "admin_credit_grant",
    tag = "admin",
    params(("tenant_id" = TenantId, Path, description = "The tenant")),
    request_body = NewGrant,
    security(("operator" = [])),
    responses(
        (status = 201, description = "The ledger entry", body = CreditEntryView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: read-only operators", body = ErrorBody),
        (status = 404, description = "`not_found`: no such tenant", body = ErrorBody),
        (status = 409, description = "`reference_used`", body = ErrorBody),
        (status = 422, description = "`validation_failed`, `currency_mismatch`", body = ErrorBody),
    )
)]
async fn admin_credit_grant(
    ctx: OperatorCtx,
    State(config): State<Arc<BillingConfig>>,
    Path(tenant_id): Path<TenantId>,
    Json(new): Json<NewGrant>,
) -> Result<(StatusCode, Json<CreditEntryView>), ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingManage).await?;
    let entry = ledger::grant(tx, config.currency, tenant_id, new).await?;
    Ok((StatusCode::CREATED, Json(entry)))
}

/// The reconciliation check over every invoice.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ReconciliationReport {
    /// How many invoices were checked.
    pub checked: usize,
    /// What does not add up (empty when all is well).
    pub discrepancies: Vec<Discrepancy>,
}

/// Check that every invoice adds up: total = subtotal − credits + tax,
/// subtotal = the sum of the lines, each line its quantity at its price,
/// credits = the ledger's draw, and a finalized invoice's lines = its
/// usage rated again. Also `api billing reconcile`.
#[utoipa::path(
    get,
    path = "/v1/admin/billing/reconcile",
    operation_id = "admin_billing_reconcile",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The check's findings", body = ReconciliationReport),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
    )
)]
async fn admin_billing_reconcile(ctx: OperatorCtx) -> Result<Json<ReconciliationReport>, ApiError> {
    let mut tx = ctx.begin().await.map_err(BillingError::from)?;
    authorize_platform(tx.conn(), &ctx.principal, Action::AdminBillingRead).await?;
    let (checked, discrepancies) = invoice::reconcile(tx.conn(), None).await?;
    Ok(Json(ReconciliationReport {
        checked,
        discrepancies,
    }))
}
