//! The worker's invoice run (every `[billing] invoice_interval_secs`):
//! finalizes the drafts whose period ended `finalize_after_secs` ago, then
//! drafts (or recomputes) last month's invoice of every tenant with usage.
//! Each tenant is its own transaction; a tenant that fails is logged and
//! retried on the next run without holding up the others. Several workers
//! may run it at once: every step is idempotent under the tenant's lock.

use keel_core::ids::{InvoiceId, TenantId};
use keel_db::{Db, RequestMeta};
use time::{Date, OffsetDateTime};

use crate::BillingError;
use crate::invoice::{self, Generated, Period, Policy};
use crate::meter::{self, CUT_GRACE};

/// What one run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    pub drafted: u32,
    pub updated: u32,
    pub finalized: u32,
    pub failed: u32,
}

fn meta() -> RequestMeta {
    RequestMeta::system("billing", uuid::Uuid::now_v7().simple().to_string())
}

/// One invoice run at the database's `now`.
pub async fn invoice_run(
    db: &Db,
    policy: Policy,
    finalize_after: time::Duration,
) -> Result<RunReport, BillingError> {
    let now: OffsetDateTime = sqlx::query_scalar("SELECT now()")
        .fetch_one(db.pool())
        .await?;
    invoice_run_as_of(db, policy, finalize_after, now).await
}

/// The invoice run as it would go at `now`: which drafts are due and which
/// month is "last month" follow from it. (Each step still checks the
/// database's clock: nothing is cut or drafted before its period ended.)
/// Tests choose a `now` that does not depend on the day they run.
pub async fn invoice_run_as_of(
    db: &Db,
    policy: Policy,
    finalize_after: time::Duration,
    now: OffsetDateTime,
) -> Result<RunReport, BillingError> {
    let mut report = RunReport::default();
    // Reads across tenants, as the system role (row-level security hides
    // every tenant's rows from the runtime role outside a tenant).
    let mut reads = db.begin_bookkeeping().await?;

    // Drafts due, oldest period first (a tenant's later draft waits for
    // its earlier one).
    let due: Vec<(InvoiceId, TenantId, Date)> = sqlx::query_as(
        "SELECT id, tenant_id, period_start FROM invoices
          WHERE state = 'draft' ORDER BY period_start, tenant_id",
    )
    .fetch_all(&mut *reads)
    .await?;
    reads.commit().await?;
    for (invoice_id, tenant_id, period_start) in due {
        let period = Period(period_start);
        if period.end() + finalize_after > now {
            continue;
        }
        match finalize_one(db, policy, tenant_id, period, invoice_id).await {
            Ok(()) => report.finalized += 1,
            Err(error) => {
                report.failed += 1;
                tracing::warn!(%invoice_id, %tenant_id, error = %error, "finalizing an invoice failed");
            }
        }
    }

    // Last month's drafts, once its open runs can be cut.
    let period = Period::before(now);
    if period.end() + CUT_GRACE <= now {
        let mut reads = db.begin_bookkeeping().await?;
        let tenants: Vec<TenantId> = sqlx::query_scalar(
            "SELECT tenant_id FROM usage_records WHERE invoice_id IS NULL AND period_start <= $1
             UNION
             SELECT tenant_id FROM meter_runs
              WHERE ended_at IS NULL AND coalesce(billed_until, started_at) < $2
             EXCEPT
             SELECT tenant_id FROM invoices WHERE period_start = $1 AND state <> 'draft'",
        )
        .bind(period.0)
        .bind(period.end())
        .fetch_all(&mut *reads)
        .await?;
        reads.commit().await?;
        for tenant_id in tenants {
            match draft_one(db, policy, tenant_id, period).await {
                Ok(Generated::Created) => report.drafted += 1,
                Ok(Generated::Updated) => report.updated += 1,
                Ok(Generated::Unchanged | Generated::Nothing) => {}
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(%tenant_id, error = %error, "drafting an invoice failed");
                }
            }
        }
    }
    Ok(report)
}

/// Cuts the tenant's open runs at the period end and drafts or recomputes
/// its invoice.
pub async fn draft_one(
    db: &Db,
    policy: Policy,
    tenant_id: TenantId,
    period: Period,
) -> Result<Generated, BillingError> {
    meter::cut_open_runs(db, tenant_id.as_uuid(), period).await?;
    let tx = db.begin_system(meta()).await?;
    let (_, outcome) = invoice::generate(tx, policy, tenant_id, period, false).await?;
    Ok(outcome)
}

async fn finalize_one(
    db: &Db,
    policy: Policy,
    tenant_id: TenantId,
    period: Period,
    invoice_id: InvoiceId,
) -> Result<(), BillingError> {
    meter::cut_open_runs(db, tenant_id.as_uuid(), period).await?;
    let tx = db.begin_system(meta()).await?;
    invoice::finalize(tx, policy, invoice_id).await?;
    Ok(())
}
