//! The tenant's usage so far: a period's metered time, with the runs still
//! open counted up to now, priced as its invoice would price it (an
//! estimate: the invoice adds tax and credit, and late events may still
//! add to it), broken down by project; and CSV exports of usage and
//! invoices.

use keel_core::ids::{InvoiceId, ProjectId, TenantId};
use serde::Serialize;
use sqlx::PgConnection;
use time::{Date, OffsetDateTime};

use crate::BillingError;
use crate::invoice::{InvoiceLineView, Period, Policy, Usage, iso_date, rate};
use crate::meter::RUN_METER;

/// `GET /v1/billing/usage`
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct UsageSoFar {
    #[serde(with = "iso_date")]
    #[schema(value_type = String, format = Date, example = "2026-12-01")]
    pub period_start: Date,
    #[serde(with = "iso_date")]
    #[schema(value_type = String, format = Date, example = "2027-01-01")]
    pub period_end: Date,
    /// The moment open runs are counted up to (the database's clock when
    /// read: the figures are current to the request).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub as_of: OffsetDateTime,
    #[schema(example = "USD")]
    pub currency: String,
    /// Priced as the period's invoice would be, per flavor, region and
    /// price.
    pub lines: Vec<InvoiceLineView>,
    /// The lines' sum: an estimate before tax and credit.
    pub subtotal: i64,
    /// Run time per project, flavor and region.
    pub by_project: Vec<ProjectUsage>,
}

/// One project's run time of one flavor in one region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ProjectUsage {
    pub project_id: ProjectId,
    pub flavor: String,
    pub region: String,
    /// Microseconds.
    pub quantity: i64,
}

/// The database's clock.
pub async fn db_now(conn: &mut PgConnection) -> Result<OffsetDateTime, BillingError> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(conn).await?)
}

/// The tenant's usage in `period` up to `now` (a period that has not begun
/// has none).
pub async fn so_far(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    period: Period,
    now: OffsetDateTime,
    policy: Policy,
) -> Result<UsageSoFar, BillingError> {
    let usage = Usage::SoFar {
        tenant_id,
        period,
        now,
    };
    let rated = rate(&mut *conn, usage, policy).await?;
    let by_project: Vec<ProjectUsage> = usage
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH {} SELECT project_id, flavor, region, sum(quantity)::bigint AS quantity
               FROM u GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            usage.cte()
        ))))
        .fetch_all(conn)
        .await?;
    Ok(UsageSoFar {
        period_start: period.0,
        period_end: crate::period::period_of(period.end()),
        as_of: now,
        currency: policy.currency.to_string(),
        lines: rated.lines,
        subtotal: rated.subtotal,
        by_project,
    })
}

/// A CSV document (RFC 4180, a header line first).
fn csv_document<const N: usize>(
    header: [&str; N],
    rows: impl Iterator<Item = [String; N]>,
) -> Result<String, BillingError> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let failed = |error: csv::Error| BillingError::Export(error.to_string());
    writer.write_record(header).map_err(failed)?;
    for row in rows {
        writer.write_record(&row).map_err(failed)?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|error| BillingError::Export(error.to_string()))?;
    String::from_utf8(bytes).map_err(|error| BillingError::Export(error.to_string()))
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[derive(sqlx::FromRow)]
struct UsageRow {
    allocation_id: uuid::Uuid,
    project_id: ProjectId,
    flavor: String,
    region: String,
    started_at: OffsetDateTime,
    ended_at: OffsetDateTime,
    quantity: i64,
    status: String,
    invoice_id: Option<InvoiceId>,
}

/// Every piece of run time of `period`, one row each: usage records
/// (`billed` or `unbilled`) and the open runs' time up to `now` (`open`).
pub async fn usage_csv(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    period: Period,
    now: OffsetDateTime,
) -> Result<String, BillingError> {
    let rows: Vec<UsageRow> = sqlx::query_as(
        "SELECT allocation_id, project_id, flavor, region, started_at, ended_at, quantity,
                CASE WHEN invoice_id IS NULL THEN 'unbilled' ELSE 'billed' END AS status,
                invoice_id
           FROM usage_records WHERE tenant_id = $1 AND period_start = $2 AND meter = $3
         UNION ALL
         SELECT r.allocation_id, r.project_id, r.flavor, r.region, o.started_at, o.ended_at,
                ((extract(epoch FROM o.ended_at) - extract(epoch FROM o.started_at)) * 1000000)::bigint,
                'open', NULL
           FROM meter_runs r
          CROSS JOIN LATERAL (
                SELECT greatest(coalesce(r.billed_until, r.started_at), $4) AS started_at,
                       least($5, $6) AS ended_at) o
          WHERE r.tenant_id = $1 AND r.ended_at IS NULL AND o.started_at < o.ended_at
          ORDER BY started_at, allocation_id",
    )
    .bind(tenant_id)
    .bind(period.0)
    .bind(RUN_METER)
    .bind(period.start())
    .bind(period.end())
    .bind(now)
    .fetch_all(conn)
    .await?;
    csv_document(
        [
            "allocation_id",
            "project_id",
            "flavor",
            "region",
            "started_at",
            "ended_at",
            "quantity_us",
            "status",
            "invoice_id",
        ],
        rows.into_iter().map(|row| {
            [
                row.allocation_id.to_string(),
                row.project_id.to_string(),
                row.flavor,
                row.region,
                rfc3339(row.started_at),
                rfc3339(row.ended_at),
                row.quantity.to_string(),
                row.status,
                row.invoice_id.map(|id| id.to_string()).unwrap_or_default(),
            ]
        }),
    )
}

#[derive(sqlx::FromRow)]
struct InvoiceLineRow {
    id: InvoiceId,
    period_start: Date,
    state: String,
    currency: String,
    subtotal: i64,
    credits: i64,
    tax: i64,
    total: i64,
    line_no: Option<i32>,
    flavor: Option<String>,
    region: Option<String>,
    unit: Option<String>,
    unit_price: Option<i64>,
    quantity: Option<i64>,
    amount: Option<i64>,
}

/// Every invoice of the tenant, one row per line (an invoice without lines
/// has one row with its totals only).
pub async fn invoices_csv(
    conn: &mut PgConnection,
    tenant_id: TenantId,
) -> Result<String, BillingError> {
    let rows: Vec<InvoiceLineRow> = sqlx::query_as(
        "SELECT i.id, i.period_start, i.state, i.currency, i.subtotal, i.credits, i.tax, i.total,
                l.line_no, l.flavor, l.region, l.unit, l.unit_price, l.quantity, l.amount
           FROM invoices i LEFT JOIN invoice_lines l ON l.invoice_id = i.id
          WHERE i.tenant_id = $1
          ORDER BY i.period_start, i.id, l.line_no",
    )
    .bind(tenant_id)
    .fetch_all(conn)
    .await?;
    let text = |value: Option<String>| value.unwrap_or_default();
    let number = |value: Option<i64>| value.map(|v| v.to_string()).unwrap_or_default();
    csv_document(
        [
            "invoice_id",
            "period",
            "state",
            "currency",
            "subtotal",
            "credits",
            "tax",
            "total",
            "line_no",
            "flavor",
            "region",
            "unit",
            "unit_price",
            "quantity_us",
            "amount",
        ],
        rows.into_iter().map(|row| {
            [
                row.id.to_string(),
                format!(
                    "{}-{:02}",
                    row.period_start.year(),
                    u8::from(row.period_start.month())
                ),
                row.state,
                row.currency,
                row.subtotal.to_string(),
                row.credits.to_string(),
                row.tax.to_string(),
                row.total.to_string(),
                row.line_no.map(|n| n.to_string()).unwrap_or_default(),
                text(row.flavor),
                text(row.region),
                text(row.unit),
                number(row.unit_price),
                number(row.quantity),
                number(row.amount),
            ]
        }),
    )
}
