//! Invoices: one per tenant and billing period, `draft → finalized → paid |
//! void` (doc/billing.md, "Invoices").
//!
//! A draft rates the tenant's usage records that no invoice has billed yet,
//! up to the end of its period, with the rate cards in effect when the time
//! ran; it is recomputed (and changes only if the usage did) until it is
//! finalized. Finalizing claims those records for the invoice, draws
//! prepaid credit and fixes every number; from then on only the state
//! moves. A record that arrives after its period's invoice was finalized is
//! billed by the next one. Every change of one tenant's invoices and credit
//! runs under that tenant's billing lock.

use keel_core::ResourceName;
use keel_core::ids::{InvoiceId, RateCardId, TenantId};
use keel_db::{Audit, NewEvent, WriteTx};
use serde::Serialize;
use sqlx::PgConnection;
use time::{Date, OffsetDateTime};

use crate::BillingError;
use crate::ledger::{self, EntryKind, NewEntry};
use crate::meter::RUN_METER;
use crate::money::{self, Currency, PriceUnit};
use crate::period;
pub use crate::period::Period;

/// What the platform bills in, and its tax (from `[billing]`).
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub currency: Currency,
    pub tax_rate_bp: i32,
}

impl From<&crate::BillingConfig> for Policy {
    fn from(config: &crate::BillingConfig) -> Self {
        Self {
            currency: config.currency,
            tax_rate_bp: config.tax_rate_bp,
        }
    }
}

/// An invoice, without its lines.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct InvoiceView {
    pub id: InvoiceId,
    pub tenant_id: TenantId,
    /// The first day of the billing period (a calendar month, UTC).
    #[serde(with = "iso_date")]
    #[schema(value_type = String, format = Date, example = "2026-11-01")]
    pub period_start: Date,
    /// The day after the period's last day.
    #[serde(with = "iso_date")]
    #[schema(value_type = String, format = Date, example = "2026-12-01")]
    pub period_end: Date,
    #[schema(example = "USD")]
    pub currency: String,
    /// `draft`, `finalized`, `paid` or `void`.
    #[schema(example = "finalized")]
    pub state: String,
    /// Rated usage in minor units: the sum of the lines' amounts.
    pub subtotal: i64,
    /// Prepaid credit drawn for this invoice (at finalization).
    pub credits: i64,
    /// Tax rate in basis points (1/100 of a percent).
    pub tax_rate_bp: i32,
    pub tax: i64,
    /// Due: `subtotal - credits + tax`.
    pub total: i64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finalized_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub paid_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub voided_at: Option<OffsetDateTime>,
    /// `credit` (credit covered it), `nothing_due` (it came to zero),
    /// `manual` (paid out of band, recorded by an operator) or a payment
    /// provider.
    pub payment_method: Option<String>,
    pub payment_reference: Option<String>,
    pub version: i64,
}

/// One line: a flavor's run time in a region at one price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct InvoiceLineView {
    pub line_no: i32,
    pub flavor: String,
    pub region: String,
    /// The card that priced the time; none for time no card covered (billed
    /// at 0).
    pub rate_card_id: Option<RateCardId>,
    #[schema(value_type = PriceUnit)]
    pub unit: String,
    /// Minor units per `unit`.
    pub unit_price: i64,
    /// Run time in microseconds.
    pub quantity: i64,
    /// `quantity × unit_price`, per unit, rounded half up to a minor unit.
    pub amount: i64,
}

/// An invoice with its lines.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct InvoiceDetail {
    #[serde(flatten)]
    pub invoice: InvoiceView,
    pub lines: Vec<InvoiceLineView>,
}

/// `YYYY-MM-DD`, as the API writes dates.
pub mod iso_date {
    use serde::Serializer;
    use time::Date;
    use time::macros::format_description;

    pub fn serialize<S: Serializer>(date: &Date, serializer: S) -> Result<S::Ok, S::Error> {
        let text = date
            .format(format_description!("[year]-[month]-[day]"))
            .map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }
}

const INVOICE_COLUMNS: &str = "id, tenant_id, period_start, period_end, currency, state, subtotal, \
     credits, tax_rate_bp, tax, total, created_at, updated_at, finalized_at, paid_at, voided_at, \
     payment_method, payment_reference, version";

const LINE_COLUMNS: &str =
    "line_no, flavor, region, rate_card_id, unit, unit_price, quantity, amount";

pub(crate) fn resource(invoice: &InvoiceView) -> ResourceName {
    ResourceName::new(None, Some(invoice.tenant_id), None, "invoice", invoice.id)
}

/// Serialises every change of one tenant's invoices and credit.
pub(crate) async fn lock_tenant(
    conn: &mut PgConnection,
    tenant_id: TenantId,
) -> Result<(), BillingError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('keel.billing:' || $1::text, 0))")
        .bind(tenant_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The tenant exists (billing's operator calls name tenants by id).
pub(crate) async fn tenant_known(
    conn: &mut PgConnection,
    tenant_id: TenantId,
) -> Result<(), BillingError> {
    let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM tenants WHERE id = $1)")
        .bind(tenant_id)
        .fetch_one(conn)
        .await?;
    if known {
        Ok(())
    } else {
        Err(BillingError::UnknownTenant)
    }
}

/// Which usage a computation rates.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Usage {
    /// Not billed yet, from periods up to and including this one.
    Unbilled { tenant_id: TenantId, through: Date },
    /// Billed by this invoice.
    Billed(InvoiceId),
    /// Everything metered in a period so far, billed or not, with the
    /// open runs' time in it up to `now`: the tenant's usage so far.
    SoFar {
        tenant_id: TenantId,
        period: Period,
        now: OffsetDateTime,
    },
    /// Everything not yet on a finalized invoice: unbilled records of any
    /// period and the open runs up to `now` (what prepaid credit must still
    /// cover).
    Outstanding {
        tenant_id: TenantId,
        now: OffsetDateTime,
    },
}

impl Usage {
    /// The `u` common table expression: the usage as (project_id, flavor,
    /// region, started_at, ended_at, quantity), from the parameters `$1`
    /// meter, `$2` tenant, `$3` period (date), `$4` invoice, `$5` period
    /// start, `$6` period end and `$7` now.
    pub(crate) fn cte(self) -> &'static str {
        match self {
            Usage::Unbilled { .. } => {
                "u AS (SELECT project_id, flavor, region, started_at, ended_at, quantity
                         FROM usage_records
                        WHERE tenant_id = $2 AND invoice_id IS NULL AND period_start <= $3
                          AND meter = $1)"
            }
            Usage::Billed(_) => {
                "u AS (SELECT project_id, flavor, region, started_at, ended_at, quantity
                         FROM usage_records WHERE invoice_id = $4 AND meter = $1)"
            }
            Usage::SoFar { .. } => {
                "u AS (SELECT project_id, flavor, region, started_at, ended_at, quantity
                         FROM usage_records
                        WHERE tenant_id = $2 AND period_start = $3 AND meter = $1
                       UNION ALL
                       SELECT r.project_id, r.flavor, r.region, o.started_at, o.ended_at,
                              ((extract(epoch FROM o.ended_at) - extract(epoch FROM o.started_at))
                               * 1000000)::bigint
                         FROM meter_runs r
                        CROSS JOIN LATERAL (
                              SELECT greatest(coalesce(r.billed_until, r.started_at), $5) AS started_at,
                                     least($6, $7) AS ended_at) o
                        WHERE r.tenant_id = $2 AND r.ended_at IS NULL
                          AND o.started_at < o.ended_at)"
            }
            Usage::Outstanding { .. } => {
                "u AS (SELECT project_id, flavor, region, started_at, ended_at, quantity
                         FROM usage_records
                        WHERE tenant_id = $2 AND invoice_id IS NULL AND meter = $1
                       UNION ALL
                       SELECT project_id, flavor, region, coalesce(billed_until, started_at), $7,
                              ((extract(epoch FROM $7::timestamptz)
                                - extract(epoch FROM coalesce(billed_until, started_at))) * 1000000)::bigint
                         FROM meter_runs
                        WHERE tenant_id = $2 AND ended_at IS NULL
                          AND coalesce(billed_until, started_at) < $7)"
            }
        }
    }

    pub(crate) fn bind<'q, O>(
        self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        let (tenant_id, date, invoice_id, window) = match self {
            Usage::Unbilled { tenant_id, through } => (Some(tenant_id), Some(through), None, None),
            Usage::Billed(invoice_id) => (None, None, Some(invoice_id), None),
            Usage::SoFar {
                tenant_id,
                period,
                now,
            } => (
                Some(tenant_id),
                Some(period.0),
                None,
                Some((period.start(), period.end(), now)),
            ),
            Usage::Outstanding { tenant_id, now } => {
                (Some(tenant_id), None, None, Some((now, now, now)))
            }
        };
        query
            .bind(RUN_METER)
            .bind(tenant_id)
            .bind(date)
            .bind(invoice_id)
            .bind(window.map(|w| w.0))
            .bind(window.map(|w| w.1))
            .bind(window.map(|w| w.2))
    }
}

/// A line before it is numbered and stored.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RatedQuantity {
    flavor: String,
    region: String,
    rate_card_id: Option<RateCardId>,
    unit: String,
    unit_price: i64,
    currency: Option<String>,
    quantity: i64,
}

/// Rated lines and their sums.
#[derive(Debug, PartialEq)]
pub(crate) struct Rated {
    pub lines: Vec<InvoiceLineView>,
    pub subtotal: i64,
    pub tax: i64,
}

/// Rates usage: each record's time is split among the cards in effect while
/// it ran (cards of a pair never overlap); time no card covers is a line at
/// price 0, so the lines' quantities always add up to the usage.
pub(crate) async fn rate(
    conn: &mut PgConnection,
    usage: Usage,
    policy: Policy,
) -> Result<Rated, BillingError> {
    let sql = format!(
        "WITH {},
         priced AS (
            SELECT u.flavor, u.region, c.id AS rate_card_id, c.unit, c.unit_price, c.currency,
                   c.effective_from,
                   sum((extract(epoch FROM least(u.ended_at, coalesce(c.effective_until, 'infinity')))
                        - extract(epoch FROM greatest(u.started_at, c.effective_from))) * 1000000
                   )::bigint AS quantity
              FROM u JOIN rate_cards c
                ON c.flavor = u.flavor AND c.region = u.region
               AND c.effective_from < u.ended_at
               AND (c.effective_until IS NULL OR c.effective_until > u.started_at)
             GROUP BY u.flavor, u.region, c.id
         ), unpriced AS (
            SELECT t.flavor, t.region, t.quantity - coalesce(p.quantity, 0) AS quantity
              FROM (SELECT flavor, region, sum(quantity)::bigint AS quantity FROM u GROUP BY 1, 2) t
              LEFT JOIN (SELECT flavor, region, sum(quantity)::bigint AS quantity
                           FROM priced GROUP BY 1, 2) p USING (flavor, region)
         )
         SELECT flavor, region, rate_card_id, unit, unit_price, currency, quantity
           FROM (SELECT flavor, region, rate_card_id, unit, unit_price, currency, quantity,
                        effective_from FROM priced
                 UNION ALL
                 SELECT flavor, region, NULL, 'hour', 0, NULL, quantity, NULL
                   FROM unpriced WHERE quantity > 0) lines
          ORDER BY flavor, region, effective_from NULLS LAST",
        usage.cte()
    );
    let rows: Vec<RatedQuantity> = usage
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)))
        .fetch_all(conn)
        .await?;
    let mut lines = Vec::with_capacity(rows.len());
    let mut subtotal: i64 = 0;
    for (row, line_no) in rows.into_iter().zip(1..) {
        if let Some(currency) = &row.currency
            && currency != policy.currency.code()
        {
            return Err(BillingError::CurrencyMismatch {
                given: currency.clone(),
                billing: policy.currency.to_string(),
            });
        }
        let unit = PriceUnit::parse(&row.unit).ok_or(BillingError::Overflow)?;
        let amount =
            money::line_amount(row.quantity, row.unit_price, unit).ok_or(BillingError::Overflow)?;
        subtotal = subtotal.checked_add(amount).ok_or(BillingError::Overflow)?;
        lines.push(InvoiceLineView {
            line_no,
            flavor: row.flavor,
            region: row.region,
            rate_card_id: row.rate_card_id,
            unit: row.unit,
            unit_price: row.unit_price,
            quantity: row.quantity,
            amount,
        });
    }
    let tax = money::tax(subtotal, policy.tax_rate_bp).ok_or(BillingError::Overflow)?;
    Ok(Rated {
        lines,
        subtotal,
        tax,
    })
}

async fn replace_lines(
    conn: &mut PgConnection,
    invoice: &InvoiceView,
    lines: &[InvoiceLineView],
) -> Result<(), BillingError> {
    sqlx::query("DELETE FROM invoice_lines WHERE invoice_id = $1")
        .bind(invoice.id)
        .execute(&mut *conn)
        .await?;
    let mut numbers = Vec::with_capacity(lines.len());
    let (mut flavors, mut regions, mut cards, mut units) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut prices, mut quantities, mut amounts) = (Vec::new(), Vec::new(), Vec::new());
    for line in lines {
        numbers.push(line.line_no);
        flavors.push(line.flavor.as_str());
        regions.push(line.region.as_str());
        cards.push(line.rate_card_id.map(|id| id.as_uuid()));
        units.push(line.unit.as_str());
        prices.push(line.unit_price);
        quantities.push(line.quantity);
        amounts.push(line.amount);
    }
    sqlx::query(
        "INSERT INTO invoice_lines (invoice_id, tenant_id, line_no, flavor, region, rate_card_id,
                                    unit, unit_price, quantity, amount)
         SELECT $1, $2, * FROM unnest($3::int[], $4::text[], $5::text[], $6::uuid[], $7::text[],
                                      $8::bigint[], $9::bigint[], $10::bigint[])",
    )
    .bind(invoice.id)
    .bind(invoice.tenant_id)
    .bind(&numbers)
    .bind(&flavors)
    .bind(&regions)
    .bind(&cards)
    .bind(&units)
    .bind(&prices)
    .bind(&quantities)
    .bind(&amounts)
    .execute(conn)
    .await?;
    Ok(())
}

async fn lines_of(
    conn: &mut PgConnection,
    invoice_id: InvoiceId,
) -> Result<Vec<InvoiceLineView>, BillingError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {LINE_COLUMNS} FROM invoice_lines WHERE invoice_id = $1 ORDER BY line_no"
    )))
    .bind(invoice_id)
    .fetch_all(conn)
    .await?)
}

async fn invoice_for_update(
    conn: &mut PgConnection,
    invoice_id: InvoiceId,
) -> Result<InvoiceView, BillingError> {
    let tenant_id: Option<TenantId> =
        sqlx::query_scalar("SELECT tenant_id FROM invoices WHERE id = $1")
            .bind(invoice_id)
            .fetch_optional(&mut *conn)
            .await?;
    let tenant_id = tenant_id.ok_or(BillingError::InvoiceNotFound)?;
    lock_tenant(conn, tenant_id).await?;
    let invoice: InvoiceView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE id = $1 FOR UPDATE"
    )))
    .bind(invoice_id)
    .fetch_one(conn)
    .await?;
    Ok(invoice)
}

async fn db_now(conn: &mut PgConnection) -> Result<OffsetDateTime, BillingError> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(conn).await?)
}

/// Refuses to bill a period while an earlier one of the tenant is a draft
/// (its usage would be counted twice).
async fn no_earlier_draft(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    period: Date,
) -> Result<(), BillingError> {
    let earlier: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM invoices
                         WHERE tenant_id = $1 AND period_start < $2 AND state = 'draft')",
    )
    .bind(tenant_id)
    .bind(period)
    .fetch_one(conn)
    .await?;
    if earlier {
        return Err(BillingError::EarlierInvoiceOpen);
    }
    Ok(())
}

/// What [`generate`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generated {
    Created,
    Updated,
    Unchanged,
    /// No usage to bill and none was asked for: nothing was written.
    Nothing,
}

/// Creates or recomputes the tenant's draft invoice for `period` (which
/// must have ended). Running it again with the same usage writes nothing;
/// an invoice past draft is returned unchanged. With `even_if_empty`, a
/// tenant without usage gets an empty draft too (an operator asked).
/// Callers cut the tenant's open runs at the period end first
/// ([`crate::meter::cut_open_runs`]).
pub async fn generate(
    mut tx: WriteTx,
    policy: Policy,
    tenant_id: TenantId,
    period: Period,
    even_if_empty: bool,
) -> Result<(Option<InvoiceDetail>, Generated), BillingError> {
    lock_tenant(tx.conn(), tenant_id).await?;
    tenant_known(tx.conn(), tenant_id).await?;
    if period.end() > db_now(tx.conn()).await? {
        return Err(BillingError::PeriodNotEnded);
    }
    let existing: Option<InvoiceView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE tenant_id = $1 AND period_start = $2
         FOR UPDATE"
    )))
    .bind(tenant_id)
    .bind(period.0)
    .fetch_optional(tx.conn())
    .await?;
    if let Some(invoice) = existing.as_ref().filter(|invoice| invoice.state != "draft") {
        let lines = lines_of(tx.conn(), invoice.id).await?;
        let detail = InvoiceDetail {
            invoice: invoice.clone(),
            lines,
        };
        tx.rollback().await?;
        return Ok((Some(detail), Generated::Unchanged));
    }
    no_earlier_draft(tx.conn(), tenant_id, period.0).await?;
    // A later draft bills this period's unbilled usage already: a second
    // draft would show it twice.
    let later: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM invoices
                         WHERE tenant_id = $1 AND period_start > $2 AND state = 'draft')",
    )
    .bind(tenant_id)
    .bind(period.0)
    .fetch_one(tx.conn())
    .await?;
    if later {
        return Err(BillingError::InvoiceState(
            "a later period of this tenant has a draft, which bills this period's usage",
        ));
    }
    let rated = rate(
        tx.conn(),
        Usage::Unbilled {
            tenant_id,
            through: period.0,
        },
        policy,
    )
    .await?;
    let total = rated
        .subtotal
        .checked_add(rated.tax)
        .ok_or(BillingError::Overflow)?;
    let (invoice, outcome) = match existing {
        Some(draft) => {
            let lines = lines_of(tx.conn(), draft.id).await?;
            if lines == rated.lines
                && draft.subtotal == rated.subtotal
                && draft.tax == rated.tax
                && draft.tax_rate_bp == policy.tax_rate_bp
            {
                tx.rollback().await?;
                return Ok((
                    Some(InvoiceDetail {
                        invoice: draft,
                        lines,
                    }),
                    Generated::Unchanged,
                ));
            }
            let updated: InvoiceView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE invoices SET subtotal = $2, tax_rate_bp = $3, tax = $4, total = $5,
                        updated_at = now(), version = version + 1
                  WHERE id = $1 RETURNING {INVOICE_COLUMNS}"
            )))
            .bind(draft.id)
            .bind(rated.subtotal)
            .bind(policy.tax_rate_bp)
            .bind(rated.tax)
            .bind(total)
            .fetch_one(tx.conn())
            .await?;
            (updated, Generated::Updated)
        }
        None if rated.lines.is_empty() && !even_if_empty => {
            tx.rollback().await?;
            return Ok((None, Generated::Nothing));
        }
        None => {
            let created: InvoiceView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO invoices (id, tenant_id, period_start, period_end, currency, state,
                                       subtotal, credits, tax_rate_bp, tax, total)
                 VALUES ($1, $2, $3, $4, $5, 'draft', $6, 0, $7, $8, $9)
                 RETURNING {INVOICE_COLUMNS}"
            )))
            .bind(InvoiceId::new())
            .bind(tenant_id)
            .bind(period.0)
            .bind(period::period_of(period.end()))
            .bind(policy.currency.code())
            .bind(rated.subtotal)
            .bind(policy.tax_rate_bp)
            .bind(rated.tax)
            .bind(total)
            .fetch_one(tx.conn())
            .await?;
            (created, Generated::Created)
        }
    };
    replace_lines(tx.conn(), &invoice, &rated.lines).await?;
    let (event, action) = match outcome {
        Generated::Created => ("invoice.drafted", "invoice.create"),
        _ => ("invoice.updated", "invoice.recompute"),
    };
    emit(&mut tx, event, &invoice);
    tx.commit(Audit::new(action, Some(tenant_id), resource(&invoice)).with_details(
        serde_json::json!({ "subtotal": invoice.subtotal, "tax": invoice.tax, "lines": rated.lines.len() }),
    ))
    .await?;
    Ok((
        Some(InvoiceDetail {
            invoice,
            lines: rated.lines,
        }),
        outcome,
    ))
}

fn emit(tx: &mut WriteTx, event_type: &'static str, invoice: &InvoiceView) {
    tx.emit(NewEvent::new(
        event_type,
        "invoice",
        invoice.id.as_uuid(),
        invoice.version,
        Some(invoice.tenant_id),
        resource(invoice),
        invoice,
    ));
}

/// Claims the tenant's unbilled usage up to the invoice's period for it and
/// rates exactly those records (claimed first, so a record the meter writes
/// meanwhile is either in both or in neither).
async fn claim_and_rate(
    conn: &mut PgConnection,
    invoice: &InvoiceView,
    policy: Policy,
) -> Result<Rated, BillingError> {
    sqlx::query(
        "UPDATE usage_records SET invoice_id = $1
          WHERE tenant_id = $2 AND invoice_id IS NULL AND period_start <= $3 AND meter = $4",
    )
    .bind(invoice.id)
    .bind(invoice.tenant_id)
    .bind(invoice.period_start)
    .bind(RUN_METER)
    .execute(&mut *conn)
    .await?;
    rate(conn, Usage::Billed(invoice.id), policy).await
}

/// The tenant's credit balance in `currency`: the sum of its entries.
pub(crate) async fn balance(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    currency: Currency,
) -> Result<i64, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(amount), 0)::bigint FROM credit_entries
          WHERE tenant_id = $1 AND currency = $2",
    )
    .bind(tenant_id)
    .bind(currency.code())
    .fetch_one(conn)
    .await?)
}

/// Finalizes a draft: claims its usage, rates it one last time, draws
/// prepaid credit (as much as the balance covers) and fixes the numbers. An
/// invoice credit covers entirely is paid at once. Finalizing a finalized
/// or paid invoice returns it unchanged.
pub async fn finalize(
    mut tx: WriteTx,
    policy: Policy,
    invoice_id: InvoiceId,
) -> Result<InvoiceDetail, BillingError> {
    let draft = invoice_for_update(tx.conn(), invoice_id).await?;
    match draft.state.as_str() {
        "draft" => {}
        "void" => return Err(BillingError::InvoiceState("a void invoice stays void")),
        _ => {
            let lines = lines_of(tx.conn(), invoice_id).await?;
            tx.rollback().await?;
            return Ok(InvoiceDetail {
                invoice: draft,
                lines,
            });
        }
    }
    if Period(draft.period_start).end() > db_now(tx.conn()).await? {
        return Err(BillingError::PeriodNotEnded);
    }
    no_earlier_draft(tx.conn(), draft.tenant_id, draft.period_start).await?;
    let currency = Currency::parse(&draft.currency).ok_or(BillingError::CurrencyMismatch {
        given: draft.currency.clone(),
        billing: policy.currency.to_string(),
    })?;
    if currency != policy.currency {
        return Err(BillingError::CurrencyMismatch {
            given: draft.currency.clone(),
            billing: policy.currency.to_string(),
        });
    }
    let rated = claim_and_rate(tx.conn(), &draft, policy).await?;
    let due = rated
        .subtotal
        .checked_add(rated.tax)
        .ok_or(BillingError::Overflow)?;
    let available = balance(tx.conn(), draft.tenant_id, currency).await?;
    let credits = available.clamp(0, due);
    let total = due - credits;
    if credits > 0 {
        let entry = ledger::append(
            tx.conn(),
            NewEntry {
                tenant_id: draft.tenant_id,
                kind: EntryKind::Draw,
                amount: -credits,
                currency,
                invoice_id: Some(draft.id),
                reference: None,
                payment_reference: None,
                note: "usage",
            },
        )
        .await?;
        tx.audit(
            Audit::new(
                "credit.draw",
                Some(draft.tenant_id),
                ResourceName::new(None, Some(draft.tenant_id), None, "credit-entry", entry.id),
            )
            .with_details(&entry),
        );
    }
    // Nothing left to pay: paid now, by credit or because nothing was due.
    let paid = total == 0;
    let method = if credits > 0 { "credit" } else { "nothing_due" };
    let finalized: InvoiceView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE invoices SET subtotal = $2, tax_rate_bp = $3, tax = $4, credits = $5, total = $6,
                state = CASE WHEN $7 THEN 'paid' ELSE 'finalized' END,
                finalized_at = now(), paid_at = CASE WHEN $7 THEN now() END,
                payment_method = CASE WHEN $7 THEN $8 END,
                updated_at = now(), version = version + 1
          WHERE id = $1 RETURNING {INVOICE_COLUMNS}"
    )))
    .bind(draft.id)
    .bind(rated.subtotal)
    .bind(policy.tax_rate_bp)
    .bind(rated.tax)
    .bind(credits)
    .bind(total)
    .bind(paid)
    .bind(method)
    .fetch_one(tx.conn())
    .await?;
    replace_lines(tx.conn(), &finalized, &rated.lines).await?;
    emit(&mut tx, "invoice.finalized", &finalized);
    if paid {
        emit(&mut tx, "invoice.paid", &finalized);
    }
    tx.commit(
        Audit::new(
            "invoice.finalize",
            Some(finalized.tenant_id),
            resource(&finalized),
        )
        .with_details(serde_json::json!({
            "subtotal": finalized.subtotal, "credits": finalized.credits,
            "tax": finalized.tax, "total": finalized.total, "state": finalized.state,
        })),
    )
    .await?;
    Ok(InvoiceDetail {
        invoice: finalized,
        lines: rated.lines,
    })
}

/// Voids an invoice nobody paid: a draft claims its usage all the same (a
/// void invoice forgives it — it is never billed again), a finalized one
/// gives back the credit it drew. A paid invoice is refunded, not voided;
/// voiding a void one returns it unchanged.
pub async fn void(
    mut tx: WriteTx,
    policy: Policy,
    invoice_id: InvoiceId,
    reason: &str,
) -> Result<InvoiceDetail, BillingError> {
    let invoice = invoice_for_update(tx.conn(), invoice_id).await?;
    let lines = match invoice.state.as_str() {
        "void" => {
            let lines = lines_of(tx.conn(), invoice_id).await?;
            tx.rollback().await?;
            return Ok(InvoiceDetail { invoice, lines });
        }
        "paid" => {
            return Err(BillingError::InvoiceState(
                "a paid invoice is refunded, not voided",
            ));
        }
        "draft" => {
            no_earlier_draft(tx.conn(), invoice.tenant_id, invoice.period_start).await?;
            let rated = claim_and_rate(tx.conn(), &invoice, policy).await?;
            let total = rated
                .subtotal
                .checked_add(rated.tax)
                .ok_or(BillingError::Overflow)?;
            sqlx::query(
                "UPDATE invoices SET subtotal = $2, tax = $3, total = $4, tax_rate_bp = $5
                  WHERE id = $1",
            )
            .bind(invoice.id)
            .bind(rated.subtotal)
            .bind(rated.tax)
            .bind(total)
            .bind(policy.tax_rate_bp)
            .execute(tx.conn())
            .await?;
            replace_lines(tx.conn(), &invoice, &rated.lines).await?;
            rated.lines
        }
        _ => {
            if invoice.credits > 0 {
                let currency = Currency::parse(&invoice.currency).ok_or_else(|| {
                    BillingError::CurrencyMismatch {
                        given: invoice.currency.clone(),
                        billing: policy.currency.to_string(),
                    }
                })?;
                let entry = ledger::append(
                    tx.conn(),
                    NewEntry {
                        tenant_id: invoice.tenant_id,
                        kind: EntryKind::Reversal,
                        amount: invoice.credits,
                        currency,
                        invoice_id: Some(invoice.id),
                        reference: None,
                        payment_reference: None,
                        note: "invoice voided",
                    },
                )
                .await?;
                tx.audit(
                    Audit::new(
                        "credit.reversal",
                        Some(invoice.tenant_id),
                        ResourceName::new(
                            None,
                            Some(invoice.tenant_id),
                            None,
                            "credit-entry",
                            entry.id,
                        ),
                    )
                    .with_details(&entry),
                );
            }
            lines_of(tx.conn(), invoice_id).await?
        }
    };
    let voided: InvoiceView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE invoices SET state = 'void', voided_at = now(),
                finalized_at = coalesce(finalized_at, now()),
                updated_at = now(), version = version + 1
          WHERE id = $1 RETURNING {INVOICE_COLUMNS}"
    )))
    .bind(invoice.id)
    .fetch_one(tx.conn())
    .await?;
    emit(&mut tx, "invoice.voided", &voided);
    tx.commit(
        Audit::new("invoice.void", Some(voided.tenant_id), resource(&voided))
            .with_details(serde_json::json!({ "reason": reason, "was": invoice.state })),
    )
    .await?;
    Ok(InvoiceDetail {
        invoice: voided,
        lines,
    })
}

/// What paying an invoice did.
#[derive(Clone, Debug)]
pub enum Paid {
    /// The invoice is paid now.
    Now(InvoiceView),
    /// It was paid with this reference before; nothing changed.
    Already(InvoiceView),
}

/// Pays a finalized invoice with money received, in the caller's
/// transaction: the payment and its settlement in the ledger (they net to
/// zero; a refund of the payment then shows as money owed) with their
/// audit rows, and the invoice `paid` (`invoice.paid`); the caller audits
/// the payment itself. `ledger_reference` is the
/// provider's payment (`stripe:pi_…`), which refunds name; the manual
/// provider has none. Paying again by the same method with the same
/// reference changes nothing.
pub async fn pay(
    tx: &mut WriteTx,
    invoice_id: InvoiceId,
    method: &str,
    reference: &str,
    ledger_reference: Option<&str>,
) -> Result<Paid, BillingError> {
    let invoice = invoice_for_update(tx.conn(), invoice_id).await?;
    match invoice.state.as_str() {
        "finalized" => {}
        "paid"
            if invoice.payment_reference.as_deref() == Some(reference)
                && invoice.payment_method.as_deref() == Some(method) =>
        {
            return Ok(Paid::Already(invoice));
        }
        "paid" => return Err(BillingError::InvoiceState("the invoice is paid already")),
        "draft" => {
            return Err(BillingError::InvoiceState(
                "a draft is finalized before it is paid",
            ));
        }
        _ => return Err(BillingError::InvoiceState("a void invoice is not paid")),
    }
    let currency = Currency::parse(&invoice.currency).ok_or(BillingError::CurrencyMismatch {
        given: invoice.currency.clone(),
        billing: invoice.currency.clone(),
    })?;
    lock_tenant(tx.conn(), invoice.tenant_id).await?;
    for (kind, amount, reference) in [
        (EntryKind::Payment, invoice.total, ledger_reference),
        (EntryKind::Settlement, -invoice.total, None),
    ] {
        let entry = ledger::append(
            tx.conn(),
            NewEntry {
                tenant_id: invoice.tenant_id,
                kind,
                amount,
                currency,
                invoice_id: Some(invoice.id),
                reference,
                payment_reference: None,
                note: method,
            },
        )
        .await?;
        tx.audit(
            Audit::new(
                if kind == EntryKind::Payment {
                    "credit.payment"
                } else {
                    "credit.settlement"
                },
                Some(invoice.tenant_id),
                ResourceName::new(
                    None,
                    Some(invoice.tenant_id),
                    None,
                    "credit-entry",
                    entry.id,
                ),
            )
            .with_details(&entry),
        );
    }
    let paid: InvoiceView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE invoices SET state = 'paid', paid_at = now(), payment_method = $2,
                payment_reference = $3, updated_at = now(), version = version + 1
          WHERE id = $1 RETURNING {INVOICE_COLUMNS}"
    )))
    .bind(invoice.id)
    .bind(method)
    .bind(reference)
    .fetch_one(tx.conn())
    .await?;
    emit(tx, "invoice.paid", &paid);
    Ok(Paid::Now(paid))
}

/// Records that a finalized invoice was paid outside Keel (the manual
/// payment provider). Marking it again with the same reference returns it
/// unchanged.
pub async fn mark_paid(
    mut tx: WriteTx,
    invoice_id: InvoiceId,
    method: &str,
    reference: &str,
) -> Result<InvoiceDetail, BillingError> {
    let paid = pay(&mut tx, invoice_id, method, reference, None).await?;
    let lines = lines_of(tx.conn(), invoice_id).await?;
    let invoice = match paid {
        Paid::Already(invoice) => {
            tx.rollback().await?;
            invoice
        }
        Paid::Now(invoice) => {
            tx.commit(
                Audit::new(
                    "invoice.mark_paid",
                    Some(invoice.tenant_id),
                    resource(&invoice),
                )
                .with_details(serde_json::json!({ "method": method, "reference": reference })),
            )
            .await?;
            invoice
        }
    };
    Ok(InvoiceDetail { invoice, lines })
}

/// One way an invoice fails to add up.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Discrepancy {
    pub invoice_id: InvoiceId,
    pub tenant_id: TenantId,
    pub state: String,
    pub problem: String,
}

/// Checks every invoice (or one tenant's): total = subtotal − credits + tax;
/// subtotal = the sum of the lines; each line's amount is its quantity at
/// its price, rounded once; tax is the rate of the subtotal; the credits
/// are the ledger's draw for the invoice (given back if it was voided); and,
/// once finalized, rating the usage records the invoice claimed again gives
/// exactly its lines. Returns what does not hold (nothing, normally) and
/// how many invoices were checked.
pub async fn reconcile(
    conn: &mut PgConnection,
    tenant_id: Option<TenantId>,
) -> Result<(usize, Vec<Discrepancy>), BillingError> {
    let invoices: Vec<InvoiceView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE $1::uuid IS NULL OR tenant_id = $1
          ORDER BY tenant_id, period_start"
    )))
    .bind(tenant_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut found = Vec::new();
    for invoice in &invoices {
        let mut problem = |text: String| {
            found.push(Discrepancy {
                invoice_id: invoice.id,
                tenant_id: invoice.tenant_id,
                state: invoice.state.clone(),
                problem: text,
            })
        };
        let lines = lines_of(&mut *conn, invoice.id).await?;
        if invoice.total != invoice.subtotal - invoice.credits + invoice.tax {
            problem(format!(
                "total {} is not subtotal {} - credits {} + tax {}",
                invoice.total, invoice.subtotal, invoice.credits, invoice.tax
            ));
        }
        let sum: i128 = lines.iter().map(|line| i128::from(line.amount)).sum();
        if sum != i128::from(invoice.subtotal) {
            problem(format!(
                "subtotal {} is not the sum of the lines {sum}",
                invoice.subtotal
            ));
        }
        for line in &lines {
            let expected = PriceUnit::parse(&line.unit)
                .and_then(|unit| money::line_amount(line.quantity, line.unit_price, unit));
            if expected != Some(line.amount) {
                problem(format!(
                    "line {} amount {} is not {} µs at {} per {}",
                    line.line_no, line.amount, line.quantity, line.unit_price, line.unit
                ));
            }
        }
        if money::tax(invoice.subtotal, invoice.tax_rate_bp) != Some(invoice.tax) {
            problem(format!(
                "tax {} is not {} bp of {}",
                invoice.tax, invoice.tax_rate_bp, invoice.subtotal
            ));
        }
        let (drawn, given_back, received, settled): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT coalesce(-sum(amount) FILTER (WHERE kind = 'draw'), 0)::bigint,
                    coalesce(sum(amount) FILTER (WHERE kind = 'reversal'), 0)::bigint,
                    coalesce(sum(amount) FILTER (WHERE kind = 'payment'), 0)::bigint,
                    coalesce(-sum(amount) FILTER (WHERE kind = 'settlement'), 0)::bigint
               FROM credit_entries WHERE invoice_id = $1",
        )
        .bind(invoice.id)
        .fetch_one(&mut *conn)
        .await?;
        if drawn != invoice.credits {
            problem(format!(
                "credits {} but the ledger drew {drawn}",
                invoice.credits
            ));
        }
        let expected_back = if invoice.state == "void" { drawn } else { 0 };
        if given_back != expected_back {
            problem(format!(
                "the ledger gave back {given_back} of its draw, expected {expected_back}"
            ));
        }
        // Money paid for the invoice (not by credit) is one payment of its
        // total, settled on it.
        let expected_paid = if invoice.state == "paid" {
            invoice.total
        } else {
            0
        };
        if received != expected_paid || settled != expected_paid {
            problem(format!(
                "the ledger received {received} and settled {settled} for it, expected {expected_paid}"
            ));
        }
        if invoice.state != "draft" {
            match Currency::parse(&invoice.currency) {
                None => problem(format!("currency {} is not ISO 4217", invoice.currency)),
                Some(currency) => {
                    let policy = Policy {
                        currency,
                        tax_rate_bp: invoice.tax_rate_bp,
                    };
                    match rate(&mut *conn, Usage::Billed(invoice.id), policy).await {
                        Ok(rated) if rated.lines == lines => {}
                        Ok(_) => problem(
                            "its lines are not the rating of the usage it billed".to_owned(),
                        ),
                        Err(BillingError::Database(error)) => return Err(error.into()),
                        Err(error) => problem(format!("its usage cannot be rated: {error}")),
                    }
                }
            }
        }
    }
    Ok((invoices.len(), found))
}

/// One page of a tenant's invoices, oldest period first.
pub async fn list(
    conn: &mut PgConnection,
    tenant_id: Option<TenantId>,
    state: Option<&str>,
    page: keel_core::page::Page,
) -> Result<keel_core::page::Paginated<InvoiceView>, BillingError> {
    let rows: Vec<InvoiceView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices
          WHERE ($1::uuid IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR state = $2)
            AND ($3::uuid IS NULL OR id > $3)
          ORDER BY id LIMIT $4"
    )))
    .bind(tenant_id)
    .bind(state)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    Ok(keel_core::page::Paginated::from_rows(
        rows,
        page,
        |invoice| invoice.id.as_uuid(),
    ))
}

/// One invoice with its lines (row-level security hides other tenants'
/// from a tenant's transaction).
pub async fn get(
    conn: &mut PgConnection,
    invoice_id: InvoiceId,
) -> Result<InvoiceDetail, BillingError> {
    let invoice: Option<InvoiceView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE id = $1"
    )))
    .bind(invoice_id)
    .fetch_optional(&mut *conn)
    .await?;
    let invoice = invoice.ok_or(BillingError::InvoiceNotFound)?;
    let lines = lines_of(conn, invoice_id).await?;
    Ok(InvoiceDetail { invoice, lines })
}
