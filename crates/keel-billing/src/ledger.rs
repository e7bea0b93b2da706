//! The prepaid credit ledger: append-only entries whose sum is the balance
//! (doc/billing.md, "Credit"). Grants (operators) and purchases (payments)
//! add; draws (credit paying an invoice, at finalization) and refunds take
//! away; a reversal gives back the draw of a voided invoice. Nothing here
//! updates or deletes an entry — the table refuses it too.

use keel_core::ResourceName;
use keel_core::ids::{CreditEntryId, InvoiceId, TenantId};
use keel_core::page::{Page, Paginated};
use keel_db::{Audit, NewEvent, WriteTx};
use keel_http::FieldError;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::BillingError;
use crate::invoice::{balance, lock_tenant};
use crate::money::{Currency, MAX_AMOUNT};

/// One ledger entry.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct CreditEntryView {
    pub id: CreditEntryId,
    /// `grant`, `purchase`, `draw`, `reversal` or `refund`.
    #[schema(example = "grant")]
    pub kind: String,
    /// Signed minor units: positive adds credit, negative takes it away.
    pub amount: i64,
    #[schema(example = "USD")]
    pub currency: String,
    /// The invoice a draw paid or a reversal gave back.
    pub invoice_id: Option<InvoiceId>,
    /// The payment's or the operator's reference.
    pub reference: Option<String>,
    pub note: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

const ENTRY_COLUMNS: &str = "id, kind, amount, currency, invoice_id, reference, note, created_at";

/// A tenant's credit: the balance and one page of entries, oldest first.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CreditView {
    pub tenant_id: TenantId,
    #[schema(example = "USD")]
    pub currency: String,
    /// The sum of every entry in `currency`.
    pub balance: i64,
    pub entries: Paginated<CreditEntryView>,
}

/// `POST /v1/admin/tenants/{tenant_id}/credit`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    /// Minor units to add, 1 to 10¹².
    #[schema(example = 10000)]
    pub amount: i64,
    /// Must be the platform's billing currency.
    #[schema(example = "USD")]
    pub currency: String,
    /// Your reference (a contract, a ticket, a bank transfer); a reference
    /// is credited once: granting again with it returns the first grant.
    #[serde(default)]
    pub reference: Option<String>,
    /// Why (shown to the tenant), up to 500 characters.
    #[serde(default)]
    pub note: String,
}

/// The balance and one page of entries.
pub async fn credit(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    currency: Currency,
    page: Page,
) -> Result<CreditView, BillingError> {
    let balance = balance(&mut *conn, tenant_id, currency).await?;
    let rows: Vec<CreditEntryView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLUMNS} FROM credit_entries
          WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2)
          ORDER BY id LIMIT $3"
    )))
    .bind(tenant_id)
    .bind(page.after)
    .bind(page.fetch_limit())
    .fetch_all(conn)
    .await?;
    Ok(CreditView {
        tenant_id,
        currency: currency.to_string(),
        balance,
        entries: Paginated::from_rows(rows, page, |entry| entry.id.as_uuid()),
    })
}

/// Grants credit (`credit.granted`): an operator's gift, a contract's
/// prepayment, or a payment made out of band (the manual payment provider).
pub async fn grant(
    mut tx: WriteTx,
    billing_currency: Currency,
    tenant_id: TenantId,
    new: NewGrant,
) -> Result<CreditEntryView, BillingError> {
    let mut errors = Vec::new();
    if !(1..=MAX_AMOUNT).contains(&new.amount) {
        errors.push(FieldError {
            field: "amount".into(),
            code: "invalid".into(),
            message: format!("minor units from 1 to {MAX_AMOUNT}"),
        });
    }
    let currency = Currency::parse(&new.currency);
    if currency.is_none() {
        errors.push(FieldError {
            field: "currency".into(),
            code: "invalid".into(),
            message: "an ISO 4217 currency code, such as USD".into(),
        });
    }
    if new
        .reference
        .as_ref()
        .is_some_and(|r| r.is_empty() || r.chars().count() > 200)
    {
        errors.push(FieldError {
            field: "reference".into(),
            code: "invalid".into(),
            message: "1–200 characters".into(),
        });
    }
    if new.note.chars().count() > 500 {
        errors.push(FieldError {
            field: "note".into(),
            code: "invalid".into(),
            message: "up to 500 characters".into(),
        });
    }
    if !errors.is_empty() {
        return Err(BillingError::Validation(errors));
    }
    if currency != Some(billing_currency) {
        return Err(BillingError::CurrencyMismatch {
            given: new.currency,
            billing: billing_currency.to_string(),
        });
    }
    lock_tenant(tx.conn(), tenant_id).await?;
    crate::invoice::tenant_known(tx.conn(), tenant_id).await?;
    // Grants have their own namespace of references (payments use the
    // provider's).
    let reference = new.reference.as_ref().map(|r| format!("grant:{r}"));
    if let Some(reference) = &reference {
        let earlier: Option<EntryWithTenant> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT tenant_id, {ENTRY_COLUMNS} FROM credit_entries WHERE reference = $1"
        )))
        .bind(reference)
        .fetch_optional(tx.conn())
        .await?;
        if let Some(earlier) = earlier {
            if earlier.tenant_id == tenant_id && earlier.entry.amount == new.amount {
                tx.rollback().await?;
                return Ok(earlier.entry);
            }
            return Err(BillingError::ReferenceUsed(
                new.reference.unwrap_or_default(),
            ));
        }
    }
    let inserted: Result<CreditEntryView, sqlx::Error> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO credit_entries (id, tenant_id, kind, amount, currency, reference, note)
             VALUES ($1, $2, 'grant', $3, $4, $5, $6)
             RETURNING {ENTRY_COLUMNS}"
        )))
        .bind(CreditEntryId::new())
        .bind(tenant_id)
        .bind(new.amount)
        .bind(billing_currency.code())
        .bind(&reference)
        .bind(&new.note)
        .fetch_one(tx.conn())
        .await;
    let entry = match inserted {
        Ok(entry) => entry,
        // Another tenant's grant took the reference meanwhile (the lock is
        // per tenant; the reference is unique across all of them).
        Err(error) if keel_db::is_unique_violation(&error, "credit_entries_reference_key") => {
            return Err(BillingError::ReferenceUsed(
                new.reference.unwrap_or_default(),
            ));
        }
        Err(error) => return Err(error.into()),
    };
    let resource = ResourceName::new(None, Some(tenant_id), None, "credit-entry", entry.id);
    let version = entry_seq(tx.conn(), entry.id).await?;
    tx.emit(NewEvent::new(
        "credit.granted",
        "tenant_credit",
        tenant_id.as_uuid(),
        version,
        Some(tenant_id),
        resource.clone(),
        &entry,
    ));
    tx.commit(Audit::new("credit.grant", Some(tenant_id), resource).with_details(&entry))
        .await?;
    Ok(entry)
}

#[derive(sqlx::FromRow)]
struct EntryWithTenant {
    tenant_id: TenantId,
    #[sqlx(flatten)]
    entry: CreditEntryView,
}

/// The entry's place in the ledger: the aggregate version of credit events.
async fn entry_seq(conn: &mut PgConnection, id: CreditEntryId) -> Result<i64, BillingError> {
    Ok(
        sqlx::query_scalar("SELECT seq FROM credit_entries WHERE id = $1")
            .bind(id)
            .fetch_one(conn)
            .await?,
    )
}
