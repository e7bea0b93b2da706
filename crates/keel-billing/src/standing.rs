//! When prepaid credit runs out (doc/billing.md, "When credit runs out").
//!
//! A prepaid tenant's *available* credit is its balance minus what it owes
//! and has not paid: usage not yet on a finalized invoice (open runs up to
//! now included) with its tax, and finalized invoices still due. The worker
//! checks every prepaid tenant every `[billing] standing_interval_secs`:
//!
//! ```text
//! active ──credit ≤ 0──▶ warned ──after stop_launches_after──▶ launches_stopped
//!    ▲                                                           │
//!    └────────────── credit > 0 again (any step) ◀──── suspended ◀┘ after suspend_after
//! ```
//!
//! Each step is one event on the tenant's billing account and one audit
//! row: `billing.credit_exhausted`, `billing.launches_stopped` (the
//! provisioning consumer holds launches and starts),
//! `billing.tenant_suspended` (it also stops what runs; repeated while a
//! run of a suspended tenant is open) and `billing.launches_resumed`.
//! Low-balance events (`credit.low_balance`) go out once each time the
//! available credit falls below one of `low_balance_thresholds`.

use keel_core::ResourceName;
use keel_core::ids::TenantId;
use keel_db::{Audit, Db, NewEvent, RequestMeta, WriteTx};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::BillingError;
use crate::config::{BillingConfig, BillingMode};
use crate::invoice::{Policy, Usage, balance, lock_tenant, rate};

/// A tenant's billing account.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AccountView {
    pub tenant_id: TenantId,
    pub mode: BillingMode,
    /// `active`, `warned`, `launches_stopped` or `suspended` (prepaid
    /// tenants whose credit ran out).
    #[schema(example = "active")]
    pub standing: String,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub standing_since: Option<OffsetDateTime>,
    #[schema(example = "USD")]
    pub currency: String,
    /// The sum of the credit ledger.
    pub balance: i64,
    /// What is owed and not yet paid: usage not on a finalized invoice
    /// (open runs up to now), with tax, and finalized invoices due.
    pub outstanding: i64,
    /// `balance - outstanding`: what prepaid credit has left.
    pub available: i64,
}

#[derive(Clone, Debug, sqlx::FromRow)]
struct AccountRow {
    mode: String,
    standing: String,
    standing_since: OffsetDateTime,
    low_balance_below: Option<i64>,
}

/// `PUT /v1/admin/tenants/{tenant_id}/billing-account`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountUpdate {
    pub mode: BillingMode,
}

async fn row(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    lock: bool,
) -> Result<Option<AccountRow>, BillingError> {
    let sql = if lock {
        "SELECT mode, standing, standing_since, low_balance_below
           FROM billing_accounts WHERE tenant_id = $1 FOR UPDATE"
    } else {
        "SELECT mode, standing, standing_since, low_balance_below
           FROM billing_accounts WHERE tenant_id = $1"
    };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .fetch_optional(conn)
        .await?)
}

/// What the tenant owes and has not paid, at `now`.
async fn outstanding(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    now: OffsetDateTime,
    policy: Policy,
) -> Result<i64, BillingError> {
    let rated = rate(&mut *conn, Usage::Outstanding { tenant_id, now }, policy).await?;
    let due: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(total), 0)::bigint FROM invoices
          WHERE tenant_id = $1 AND state = 'finalized' AND currency = $2",
    )
    .bind(tenant_id)
    .bind(policy.currency.code())
    .fetch_one(conn)
    .await?;
    rated
        .subtotal
        .checked_add(rated.tax)
        .and_then(|sum| sum.checked_add(due))
        .ok_or(BillingError::Overflow)
}

/// The tenant's account as of `now` (a tenant without its own row is in
/// the default mode, active).
pub async fn account(
    conn: &mut PgConnection,
    config: &BillingConfig,
    tenant_id: TenantId,
    now: OffsetDateTime,
) -> Result<AccountView, BillingError> {
    let policy = Policy::from(config);
    let row = row(&mut *conn, tenant_id, false).await?;
    let balance = balance(&mut *conn, tenant_id, config.currency).await?;
    let outstanding = outstanding(&mut *conn, tenant_id, now, policy).await?;
    let mode = match row.as_ref().map(|row| row.mode.as_str()) {
        Some("prepaid") => BillingMode::Prepaid,
        Some(_) => BillingMode::Invoiced,
        None => config.default_mode,
    };
    Ok(AccountView {
        tenant_id,
        mode,
        standing: row
            .as_ref()
            .map_or_else(|| "active".to_owned(), |row| row.standing.clone()),
        standing_since: row.as_ref().map(|row| row.standing_since),
        currency: config.currency.to_string(),
        balance,
        outstanding,
        available: balance.saturating_sub(outstanding),
    })
}

fn account_resource(tenant_id: TenantId) -> ResourceName {
    ResourceName::new(None, Some(tenant_id), None, "billing-account", tenant_id)
}

/// Writes the account's new standing (and low-balance mark), with its event
/// if there is one, in `tx`. Returns the account's new version.
#[allow(clippy::too_many_arguments)] // One step: every part of it.
async fn step(
    tx: &mut WriteTx,
    tenant_id: TenantId,
    mode: BillingMode,
    standing: &str,
    low_balance_below: Option<i64>,
    event: Option<(&'static str, &serde_json::Value)>,
    now: OffsetDateTime,
) -> Result<i64, BillingError> {
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO billing_accounts (tenant_id, mode, standing, standing_since, low_balance_below)
         VALUES ($1, $2, $3, $5, $4)
         ON CONFLICT (tenant_id) DO UPDATE
            SET mode = $2, low_balance_below = $4,
                standing_since = CASE WHEN billing_accounts.standing = $3
                                      THEN billing_accounts.standing_since ELSE $5 END,
                standing = $3, version = billing_accounts.version + 1, updated_at = now()
         RETURNING version",
    )
    .bind(tenant_id)
    .bind(mode.as_str())
    .bind(standing)
    .bind(low_balance_below)
    .bind(now)
    .fetch_one(tx.conn())
    .await?;
    if let Some((event, payload)) = event {
        emit(tx, tenant_id, event, version, payload);
    }
    Ok(version)
}

fn emit(
    tx: &mut WriteTx,
    tenant_id: TenantId,
    event: &'static str,
    version: i64,
    payload: &serde_json::Value,
) {
    tx.emit(NewEvent::new(
        event,
        "billing_account",
        tenant_id.as_uuid(),
        version,
        Some(tenant_id),
        account_resource(tenant_id),
        payload,
    ));
}

/// Sets how a tenant is billed (operators). Leaving prepaid ends any step
/// of the credit policy (launches resume).
pub async fn set_mode(
    mut tx: WriteTx,
    config: &BillingConfig,
    tenant_id: TenantId,
    update: AccountUpdate,
) -> Result<AccountView, BillingError> {
    lock_tenant(tx.conn(), tenant_id).await?;
    let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM tenants WHERE id = $1)")
        .bind(tenant_id)
        .fetch_one(tx.conn())
        .await?;
    if !known {
        return Err(BillingError::UnknownTenant);
    }
    let current = row(tx.conn(), tenant_id, true).await?;
    let held = current.as_ref().is_some_and(|row| row.standing != "active");
    let (standing, event) = match (update.mode, held) {
        (BillingMode::Invoiced, true) => ("active", Some("billing.launches_resumed")),
        (_, _) => (
            current
                .as_ref()
                .map_or("active", |row| row.standing.as_str()),
            None,
        ),
    };
    let standing = standing.to_owned();
    let payload = serde_json::json!({ "mode": update.mode, "standing": standing });
    let now = crate::usage::db_now(tx.conn()).await?;
    step(
        &mut tx,
        tenant_id,
        update.mode,
        &standing,
        current.as_ref().and_then(|row| row.low_balance_below),
        event.map(|event| (event, &payload)),
        now,
    )
    .await?;
    let view = account(tx.conn(), config, tenant_id, now).await?;
    tx.commit(
        Audit::new(
            "billing.account_update",
            Some(tenant_id),
            account_resource(tenant_id),
        )
        .with_details(payload),
    )
    .await?;
    Ok(view)
}

/// What [`evaluate`] did to one tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    LowBalance,
    Stepped,
}

/// Applies the credit policy to one prepaid tenant at `now`: at most one
/// step of its standing, and a low-balance event if the available credit
/// fell below another threshold. Nothing is written when nothing changes.
pub async fn evaluate(
    db: &Db,
    config: &BillingConfig,
    tenant_id: TenantId,
    now: OffsetDateTime,
) -> Result<Change, BillingError> {
    let mut tx = db
        .begin_system(RequestMeta::system(
            "billing",
            uuid::Uuid::now_v7().simple().to_string(),
        ))
        .await?;
    lock_tenant(tx.conn(), tenant_id).await?;
    let current = row(tx.conn(), tenant_id, true).await?;
    let mode = match current.as_ref().map(|row| row.mode.as_str()) {
        Some("prepaid") => BillingMode::Prepaid,
        Some(_) => BillingMode::Invoiced,
        None => config.default_mode,
    };
    if mode != BillingMode::Prepaid {
        return Ok(Change::None);
    }
    let view = account(tx.conn(), config, tenant_id, now).await?;
    let available = view.available;
    let (standing, since, marked) = match &current {
        Some(row) => (
            row.standing.as_str(),
            row.standing_since,
            row.low_balance_below,
        ),
        None => ("active", now, None),
    };
    // The lowest threshold still above the available credit.
    let below = config
        .low_balance_thresholds
        .iter()
        .copied()
        .filter(|threshold| available < *threshold)
        .min();
    let newly_low = match (below, marked) {
        (Some(now_below), Some(was)) => now_below < was,
        (Some(_), None) => true,
        (None, _) => false,
    };
    let waited = |secs: u32| now - since >= time::Duration::seconds(i64::from(secs));
    let next: Option<(&str, &'static str, &'static str)> = if available > 0 {
        (standing != "active").then_some((
            "active",
            "billing.launches_resumed",
            "billing.reactivate",
        ))
    } else {
        match standing {
            "active" => Some(("warned", "billing.credit_exhausted", "billing.warn")),
            "warned" if waited(config.stop_launches_after_secs) => Some((
                "launches_stopped",
                "billing.launches_stopped",
                "billing.stop_launches",
            )),
            "launches_stopped" if waited(config.suspend_after_secs) => {
                Some(("suspended", "billing.tenant_suspended", "billing.suspend"))
            }
            _ => None,
        }
    };
    // A suspended tenant whose allocation started running again (it was
    // starting when the stop went out) is asked to stop again.
    let again = next.is_none() && standing == "suspended" && {
        let reopened: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM meter_runs
                             WHERE tenant_id = $1 AND ended_at IS NULL AND started_at > $2)",
        )
        .bind(tenant_id)
        .bind(since)
        .fetch_one(tx.conn())
        .await?;
        reopened
    };
    if next.is_none() && !again && below == marked {
        tx.rollback().await?;
        return Ok(Change::None);
    }
    let details = serde_json::json!({
        "available": available, "balance": view.balance, "outstanding": view.outstanding,
        "currency": view.currency, "from": standing,
    });
    let (new_standing, stepped) = match next {
        Some((to, event, audit)) => (to, Some((event, audit))),
        None if again => (
            standing,
            Some(("billing.tenant_suspended", "billing.suspend")),
        ),
        None => (standing, None),
    };
    let new_standing = new_standing.to_owned();
    let version = step(
        &mut tx,
        tenant_id,
        mode,
        &new_standing,
        below,
        stepped.map(|(event, _)| (event, &details)),
        now,
    )
    .await?;
    let resource = account_resource(tenant_id);
    let mut audits = Vec::new();
    if let Some((_, action)) = stepped {
        audits.push(Audit::new(action, Some(tenant_id), resource.clone()).with_details(&details));
    }
    if newly_low && let Some(threshold) = below {
        let low = serde_json::json!({
            "threshold": threshold, "available": available, "currency": view.currency,
        });
        emit(&mut tx, tenant_id, "credit.low_balance", version, &low);
        audits.push(
            Audit::new("credit.low_balance", Some(tenant_id), resource.clone()).with_details(low),
        );
    }
    let changed = match (stepped, newly_low) {
        (Some(_), _) => Change::Stepped,
        (None, true) => Change::LowBalance,
        (None, false) => Change::None,
    };
    // Only the low-balance mark moved (re-armed above a threshold).
    let last = audits.pop().unwrap_or_else(|| {
        Audit::new("credit.low_balance_rearm", Some(tenant_id), resource)
            .with_details(serde_json::json!({ "available": available, "below": below }))
    });
    for audit in audits {
        tx.audit(audit);
    }
    tx.commit(last).await?;
    Ok(changed)
}

/// Every prepaid tenant, checked at the database's `now` (the worker's
/// loop). Returns how many changed.
pub async fn standing_run(db: &Db, config: &BillingConfig) -> Result<u32, BillingError> {
    let mut reads = db.begin_bookkeeping().await?;
    let now: OffsetDateTime = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *reads)
        .await?;
    let tenants: Vec<TenantId> = sqlx::query_scalar(
        "SELECT t.id FROM tenants t LEFT JOIN billing_accounts a ON a.tenant_id = t.id
          WHERE coalesce(a.mode, $1) = 'prepaid' ORDER BY t.id",
    )
    .bind(config.default_mode.as_str())
    .fetch_all(&mut *reads)
    .await?;
    reads.commit().await?;
    let mut changed = 0;
    for tenant_id in tenants {
        match evaluate(db, config, tenant_id, now).await {
            Ok(Change::None) => {}
            Ok(_) => changed += 1,
            Err(error) => {
                tracing::warn!(%tenant_id, error = %error, "checking a tenant's credit failed");
            }
        }
    }
    Ok(changed)
}
