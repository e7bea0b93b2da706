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
    /// How the tenant pays (its own setting, or the platform's default).
    pub mode: BillingMode,
    /// `active`, `warned`, `launches_stopped` or `suspended` (prepaid
    /// tenants whose credit ran out).
    #[schema(example = "active")]
    pub standing: String,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub standing_since: Option<OffsetDateTime>,
    /// The billing currency: every amount here, and every invoice, price
    /// and credit entry, is in it.
    #[schema(example = "USD")]
    pub currency: String,
    /// How many of its minor units make one unit: the digits after the
    /// decimal point (ISO 4217: 2 for USD, 0 for JPY, 3 for BHD). Show
    /// amounts with these, not a client's own table.
    #[schema(example = 2)]
    pub currency_digits: u16,
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
    /// The tenant's own setting; `None` follows the default.
    mode: Option<String>,
    standing: String,
    standing_since: OffsetDateTime,
    low_balance_below: Option<i64>,
    checked_at: OffsetDateTime,
    stop_requested_at: Option<OffsetDateTime>,
}

impl AccountRow {
    fn mode(row: Option<&Self>, config: &BillingConfig) -> BillingMode {
        match row.and_then(|row| row.mode.as_deref()) {
            Some("prepaid") => BillingMode::Prepaid,
            Some(_) => BillingMode::Invoiced,
            None => config.default_mode,
        }
    }
}

/// `PUT /v1/admin/tenants/{tenant_id}/billing-account`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountUpdate {
    pub mode: BillingMode,
}

const ROW_COLUMNS: &str =
    "mode, standing, standing_since, low_balance_below, checked_at, stop_requested_at";

async fn row(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    lock: bool,
) -> Result<Option<AccountRow>, BillingError> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_COLUMNS} FROM billing_accounts WHERE tenant_id = $1{lock}"
    )))
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

/// The tenant's account as of `now`. Its figures are read under the
/// tenant's billing lock (shared), so a finalization that moves usage onto
/// an invoice and draws credit is seen entirely or not at all.
pub async fn account(
    conn: &mut PgConnection,
    config: &BillingConfig,
    tenant_id: TenantId,
    now: OffsetDateTime,
) -> Result<AccountView, BillingError> {
    lock_tenant_shared(&mut *conn, tenant_id).await?;
    figures(conn, config, tenant_id, now).await
}

/// The account's figures; the caller holds the tenant's billing lock.
async fn figures(
    conn: &mut PgConnection,
    config: &BillingConfig,
    tenant_id: TenantId,
    now: OffsetDateTime,
) -> Result<AccountView, BillingError> {
    let policy = Policy::from(config);
    let row = row(&mut *conn, tenant_id, false).await?;
    let balance = balance(&mut *conn, tenant_id, config.currency).await?;
    let outstanding = outstanding(&mut *conn, tenant_id, now, policy).await?;
    Ok(AccountView {
        tenant_id,
        mode: AccountRow::mode(row.as_ref(), config),
        standing: row
            .as_ref()
            .map_or_else(|| "active".to_owned(), |row| row.standing.clone()),
        standing_since: row.as_ref().map(|row| row.standing_since),
        currency: config.currency.to_string(),
        currency_digits: config.currency.exponent(),
        balance,
        outstanding,
        available: balance.saturating_sub(outstanding),
    })
}

async fn lock_tenant_shared(
    conn: &mut PgConnection,
    tenant_id: TenantId,
) -> Result<(), BillingError> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended('keel.billing:' || $1::text, 0))",
    )
    .bind(tenant_id)
    .execute(conn)
    .await?;
    Ok(())
}

fn account_resource(tenant_id: TenantId) -> ResourceName {
    ResourceName::new(None, Some(tenant_id), None, "billing-account", tenant_id)
}

/// The account's new state, written by [`write`].
struct NewState<'a> {
    standing: &'a str,
    low_balance_below: Option<i64>,
    stop_requested: bool,
}

/// Writes the account's new state as of `now` (the tenant's own mode is
/// left as it is) and returns its new version.
async fn write(
    tx: &mut WriteTx,
    tenant_id: TenantId,
    state: &NewState<'_>,
    now: OffsetDateTime,
) -> Result<i64, BillingError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO billing_accounts (tenant_id, standing, standing_since, low_balance_below,
                                       checked_at, stop_requested_at)
         VALUES ($1, $2, $4, $3, $4, CASE WHEN $5 THEN $4 END)
         ON CONFLICT (tenant_id) DO UPDATE
            SET low_balance_below = $3,
                standing_since = CASE WHEN billing_accounts.standing = $2
                                      THEN billing_accounts.standing_since ELSE $4 END,
                standing = $2, checked_at = $4,
                stop_requested_at = CASE WHEN $5 THEN $4
                                         ELSE billing_accounts.stop_requested_at END,
                version = billing_accounts.version + 1, updated_at = now()
         RETURNING version",
    )
    .bind(tenant_id)
    .bind(state.standing)
    .bind(state.low_balance_below)
    .bind(now)
    .bind(state.stop_requested)
    .fetch_one(tx.conn())
    .await?)
}

/// Queues an event on the tenant's billing account. Each event has its own
/// version: a later one bumps the account's.
async fn emit(
    tx: &mut WriteTx,
    tenant_id: TenantId,
    event: &'static str,
    version: Option<i64>,
    payload: &serde_json::Value,
) -> Result<(), BillingError> {
    let version = match version {
        Some(version) => version,
        None => {
            sqlx::query_scalar(
                "UPDATE billing_accounts SET version = version + 1 WHERE tenant_id = $1
                 RETURNING version",
            )
            .bind(tenant_id)
            .fetch_one(tx.conn())
            .await?
        }
    };
    tx.emit(NewEvent::new(
        event,
        "billing_account",
        tenant_id.as_uuid(),
        version,
        Some(tenant_id),
        account_resource(tenant_id),
        payload,
    ));
    Ok(())
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
    crate::invoice::tenant_known(tx.conn(), tenant_id).await?;
    let current = row(tx.conn(), tenant_id, true).await?;
    let held = current.as_ref().is_some_and(|row| row.standing != "active");
    let resume = update.mode == BillingMode::Invoiced && held;
    let standing = if resume {
        "active".to_owned()
    } else {
        current
            .as_ref()
            .map_or_else(|| "active".to_owned(), |row| row.standing.clone())
    };
    let now = crate::usage::db_now(tx.conn()).await?;
    sqlx::query(
        "INSERT INTO billing_accounts (tenant_id, mode, standing_since, checked_at)
         VALUES ($1, $2, $3, 'epoch')
         ON CONFLICT (tenant_id) DO UPDATE SET mode = $2, updated_at = now()",
    )
    .bind(tenant_id)
    .bind(update.mode.as_str())
    .bind(now)
    .execute(tx.conn())
    .await?;
    let payload = serde_json::json!({ "mode": update.mode, "standing": standing });
    if resume {
        let version = write(
            &mut tx,
            tenant_id,
            &NewState {
                standing: "active",
                low_balance_below: current.as_ref().and_then(|row| row.low_balance_below),
                stop_requested: false,
            },
            now.max(current.as_ref().map_or(now, |row| row.checked_at)),
        )
        .await?;
        emit(
            &mut tx,
            tenant_id,
            "billing.launches_resumed",
            Some(version),
            &payload,
        )
        .await?;
    }
    let view = figures(tx.conn(), config, tenant_id, now).await?;
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

/// Applies the credit policy to one tenant as of `now`: at most one step
/// of its standing, and a low-balance event for each threshold its
/// available credit fell below. A tenant that is not prepaid (any more)
/// and still held is made active. Nothing is written when nothing changes,
/// nor by a check as of an earlier time than the last one that changed
/// the account (two workers: the slower one's figures are older).
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
    if current.as_ref().is_some_and(|row| row.checked_at > now) {
        return Ok(Change::None);
    }
    let mode = AccountRow::mode(current.as_ref(), config);
    let (standing, since, marked, stop_requested_at) = match &current {
        Some(row) => (
            row.standing.as_str(),
            row.standing_since,
            row.low_balance_below,
            row.stop_requested_at,
        ),
        None => ("active", now, None, None),
    };
    if mode != BillingMode::Prepaid {
        if standing == "active" {
            return Ok(Change::None);
        }
        // No longer prepaid (the default changed) but still held.
        let payload = serde_json::json!({ "from": standing, "mode": mode });
        let version = write(
            &mut tx,
            tenant_id,
            &NewState {
                standing: "active",
                low_balance_below: marked,
                stop_requested: false,
            },
            now,
        )
        .await?;
        emit(
            &mut tx,
            tenant_id,
            "billing.launches_resumed",
            Some(version),
            &payload,
        )
        .await?;
        tx.commit(
            Audit::new(
                "billing.reactivate",
                Some(tenant_id),
                account_resource(tenant_id),
            )
            .with_details(payload),
        )
        .await?;
        return Ok(Change::Stepped);
    }
    let view = figures(tx.conn(), config, tenant_id, now).await?;
    let available = view.available;
    // The lowest threshold still above the available credit, and the
    // thresholds crossed since the last mark.
    let below = config
        .low_balance_thresholds
        .iter()
        .copied()
        .filter(|threshold| available < *threshold)
        .min();
    let mut crossed: Vec<i64> = config
        .low_balance_thresholds
        .iter()
        .copied()
        .filter(|threshold| available < *threshold && marked.is_none_or(|mark| *threshold < mark))
        .collect();
    crossed.sort_unstable_by(|a, b| b.cmp(a));
    crossed.dedup();
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
    // A suspended tenant with a run that opened after the last stop request
    // (it was starting then) is asked to stop again — once per such run.
    let again = next.is_none() && standing == "suspended" && {
        let reopened: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM meter_runs
                             WHERE tenant_id = $1 AND ended_at IS NULL AND started_at > $2)",
        )
        .bind(tenant_id)
        .bind(stop_requested_at.unwrap_or(since))
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
    let stepped = match next {
        Some((to, event, audit)) => Some((to, event, audit)),
        None if again => Some((standing, "billing.tenant_suspended", "billing.suspend")),
        None => None,
    };
    let new_standing = stepped.map_or(standing, |(to, _, _)| to).to_owned();
    let version = write(
        &mut tx,
        tenant_id,
        &NewState {
            standing: &new_standing,
            low_balance_below: below,
            stop_requested: stepped
                .is_some_and(|(_, event, _)| event == "billing.tenant_suspended"),
        },
        now,
    )
    .await?;
    let resource = account_resource(tenant_id);
    let mut audits = Vec::new();
    if let Some((_, event, action)) = stepped {
        emit(&mut tx, tenant_id, event, Some(version), &details).await?;
        audits.push(Audit::new(action, Some(tenant_id), resource.clone()).with_details(&details));
    }
    for threshold in &crossed {
        let low = serde_json::json!({
            "threshold": threshold, "available": available, "currency": view.currency,
        });
        let version = (stepped.is_none() && audits.is_empty()).then_some(version);
        emit(&mut tx, tenant_id, "credit.low_balance", version, &low).await?;
        audits.push(
            Audit::new("credit.low_balance", Some(tenant_id), resource.clone()).with_details(low),
        );
    }
    let changed = match (stepped, crossed.is_empty()) {
        (Some(_), _) => Change::Stepped,
        (None, false) => Change::LowBalance,
        (None, true) => Change::None,
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

/// Every tenant the policy applies to — prepaid ones, and any still held
/// whose mode changed — checked at the database's `now` (the worker's
/// loop). Returns how many changed.
pub async fn standing_run(db: &Db, config: &BillingConfig) -> Result<u32, BillingError> {
    let mut reads = db.begin_bookkeeping().await?;
    let tenants: Vec<TenantId> = sqlx::query_scalar(
        "SELECT t.id FROM tenants t LEFT JOIN billing_accounts a ON a.tenant_id = t.id
          WHERE coalesce(a.mode, $1) = 'prepaid' OR a.standing <> 'active' ORDER BY t.id",
    )
    .bind(config.default_mode.as_str())
    .fetch_all(&mut *reads)
    .await?;
    reads.commit().await?;
    let mut changed = 0;
    for tenant_id in tenants {
        // Each check reads the clock when it runs: a long loop does not
        // judge its last tenants by its first moment.
        let now: OffsetDateTime = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(db.pool())
            .await?;
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
