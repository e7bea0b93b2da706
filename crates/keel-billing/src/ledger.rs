//! The prepaid credit ledger: append-only entries whose sum is the balance
//! (doc/billing.md, "Credit"). Grants (operators) and purchases (payments)
//! add; draws (credit paying an invoice, at finalization) and refunds take
//! away; a reversal gives back the draw of a voided invoice. Money paid for
//! an invoice is a payment and its settlement, which net to zero; a refund
//! the provider reports failed after it was recorded comes back as
//! `refund_failed`. Every entry goes through [`append`]; nothing here
//! updates or deletes one — the table refuses it too.

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
    /// `grant`, `purchase`, `draw`, `reversal`, `payment`, `settlement`,
    /// `refund` or `refund_failed`.
    #[schema(example = "grant")]
    pub kind: String,
    /// Signed minor units: positive adds credit, negative takes it away.
    pub amount: i64,
    #[schema(example = "USD")]
    pub currency: String,
    /// The invoice a draw, payment or settlement paid, or a reversal gave
    /// back.
    pub invoice_id: Option<InvoiceId>,
    /// The payment's or the operator's reference.
    pub reference: Option<String>,
    /// For a refund: the reference of the payment it returns.
    pub payment_reference: Option<String>,
    pub note: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

const ENTRY_COLUMNS: &str =
    "id, kind, amount, currency, invoice_id, reference, payment_reference, note, created_at";

/// What an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// An operator's grant (+).
    Grant,
    /// Credit bought through a payment provider (+).
    Purchase,
    /// Credit paying an invoice at finalization (−).
    Draw,
    /// A voided invoice's draw given back (+).
    Reversal,
    /// Money received for an invoice (+), settled at once.
    Payment,
    /// That money applied to the invoice (−).
    Settlement,
    /// Money paid back to the tenant (−).
    Refund,
    /// A recorded refund that failed: the money came back (+).
    RefundFailed,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Purchase => "purchase",
            EntryKind::Draw => "draw",
            EntryKind::Reversal => "reversal",
            EntryKind::Payment => "payment",
            EntryKind::Settlement => "settlement",
            EntryKind::Refund => "refund",
            EntryKind::RefundFailed => "refund_failed",
        }
    }
}

/// An entry to append. `amount` is signed (the table checks the sign
/// against the kind).
#[derive(Clone, Debug)]
pub struct NewEntry<'a> {
    pub tenant_id: TenantId,
    pub kind: EntryKind,
    pub amount: i64,
    pub currency: Currency,
    pub invoice_id: Option<InvoiceId>,
    pub reference: Option<&'a str>,
    pub payment_reference: Option<&'a str>,
    pub note: &'a str,
}

/// Appends one entry: the one way anything writes to the ledger. A
/// reference already in the ledger is [`BillingError::ReferenceUsed`]. The
/// caller holds the tenant's billing lock and audits the change.
pub async fn append(
    conn: &mut PgConnection,
    entry: NewEntry<'_>,
) -> Result<CreditEntryView, BillingError> {
    let inserted: Result<CreditEntryView, sqlx::Error> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO credit_entries
                    (id, tenant_id, kind, amount, currency, invoice_id, reference,
                     payment_reference, note)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING {ENTRY_COLUMNS}"
        )))
        .bind(CreditEntryId::new())
        .bind(entry.tenant_id)
        .bind(entry.kind.as_str())
        .bind(entry.amount)
        .bind(entry.currency.code())
        .bind(entry.invoice_id)
        .bind(entry.reference)
        .bind(entry.payment_reference)
        .bind(entry.note)
        .fetch_one(conn)
        .await;
    match inserted {
        Ok(view) => Ok(view),
        // Another tenant's entry took the reference meanwhile (the lock is
        // per tenant; the reference is unique across all of them).
        Err(error) if keel_db::is_unique_violation(&error, "credit_entries_reference_key") => Err(
            BillingError::ReferenceUsed(entry.reference.unwrap_or_default().to_owned()),
        ),
        Err(error) => Err(error.into()),
    }
}

/// The entry with this reference, and its tenant.
pub async fn by_reference(
    conn: &mut PgConnection,
    reference: &str,
) -> Result<Option<(TenantId, CreditEntryView)>, BillingError> {
    let found: Option<EntryWithTenant> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT tenant_id, {ENTRY_COLUMNS} FROM credit_entries WHERE reference = $1"
    )))
    .bind(reference)
    .fetch_optional(conn)
    .await?;
    Ok(found.map(|found| (found.tenant_id, found.entry)))
}

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
    if let Some(reference) = &reference
        && let Some((earlier_tenant, earlier)) = by_reference(tx.conn(), reference).await?
    {
        if earlier_tenant == tenant_id && earlier.amount == new.amount {
            tx.rollback().await?;
            return Ok(earlier);
        }
        return Err(BillingError::ReferenceUsed(
            new.reference.unwrap_or_default(),
        ));
    }
    let entry = append(
        tx.conn(),
        NewEntry {
            tenant_id,
            kind: EntryKind::Grant,
            amount: new.amount,
            currency: billing_currency,
            invoice_id: None,
            reference: reference.as_deref(),
            payment_reference: None,
            note: &new.note,
        },
    )
    .await
    .map_err(|error| match error {
        BillingError::ReferenceUsed(_) => {
            BillingError::ReferenceUsed(new.reference.clone().unwrap_or_default())
        }
        other => other,
    })?;
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

/// Queues the event (aggregate `tenant_credit`, versioned by the entry's
/// place in the ledger) and the audit row of a new entry.
async fn announce(
    tx: &mut WriteTx,
    event_type: &'static str,
    audit_action: &'static str,
    tenant_id: TenantId,
    entry: &CreditEntryView,
) -> Result<(), BillingError> {
    let resource = ResourceName::new(None, Some(tenant_id), None, "credit-entry", entry.id);
    let version = entry_seq(tx.conn(), entry.id).await?;
    tx.emit(NewEvent::new(
        event_type,
        "tenant_credit",
        tenant_id.as_uuid(),
        version,
        Some(tenant_id),
        resource.clone(),
        entry,
    ));
    tx.audit(Audit::new(audit_action, Some(tenant_id), resource).with_details(entry));
    Ok(())
}

/// Credit bought with a payment the provider confirmed
/// (`credit.purchased`). A payment (its reference, `stripe:pi_…`) is
/// credited once: recording it again returns the first entry and `false`.
pub async fn purchase(
    tx: &mut WriteTx,
    tenant_id: TenantId,
    amount: i64,
    currency: Currency,
    reference: &str,
    note: &str,
) -> Result<(CreditEntryView, bool), BillingError> {
    if !(1..=MAX_AMOUNT).contains(&amount) {
        return Err(BillingError::Overflow);
    }
    lock_tenant(tx.conn(), tenant_id).await?;
    if let Some((earlier_tenant, earlier)) = by_reference(tx.conn(), reference).await? {
        if earlier_tenant == tenant_id && earlier.kind == "purchase" && earlier.amount == amount {
            return Ok((earlier, false));
        }
        return Err(BillingError::ReferenceUsed(reference.to_owned()));
    }
    let entry = append(
        tx.conn(),
        NewEntry {
            tenant_id,
            kind: EntryKind::Purchase,
            amount,
            currency,
            invoice_id: None,
            reference: Some(reference),
            payment_reference: None,
            note,
        },
    )
    .await?;
    announce(tx, "credit.purchased", "credit.purchase", tenant_id, &entry).await?;
    Ok((entry, true))
}

/// What recording a refund did.
#[derive(Clone, Debug, PartialEq)]
pub enum Refunded {
    /// A new refund entry.
    Recorded(TenantId, CreditEntryView),
    /// The refund was recorded before; nothing changed.
    AlreadyRecorded(TenantId, CreditEntryView),
    /// The payment is not in the ledger (yet).
    UnknownPayment,
    /// The payment is in another currency.
    CurrencyMismatch { paid: String },
    /// With this refund, more would be paid back than was paid.
    ExceedsPayment { paid: i64, refunded: i64 },
}

/// Records money paid back for a payment (`credit.refunded`): a negative
/// entry that names the payment. Each refund (its reference) is recorded
/// once. Refused, changing nothing, when the payment is not in the ledger,
/// is in another currency, or would be refunded more than it paid.
pub async fn refund(
    tx: &mut WriteTx,
    payment_reference: &str,
    refund_reference: &str,
    amount: i64,
    currency: Currency,
) -> Result<Refunded, BillingError> {
    let Some((tenant_id, payment)) = by_reference(tx.conn(), payment_reference).await? else {
        return Ok(Refunded::UnknownPayment);
    };
    if !matches!(payment.kind.as_str(), "purchase" | "payment") {
        return Ok(Refunded::UnknownPayment);
    }
    lock_tenant(tx.conn(), tenant_id).await?;
    if let Some((_, earlier)) = by_reference(tx.conn(), refund_reference).await? {
        if earlier.kind == "refund"
            && earlier.payment_reference.as_deref() == Some(payment_reference)
        {
            return Ok(Refunded::AlreadyRecorded(tenant_id, earlier));
        }
        return Err(BillingError::ReferenceUsed(refund_reference.to_owned()));
    }
    if payment.currency != currency.code() {
        return Ok(Refunded::CurrencyMismatch {
            paid: payment.currency,
        });
    }
    // Refunds are negative, failed refunds give theirs back.
    let refunded: i64 = sqlx::query_scalar(
        "SELECT coalesce(-sum(amount), 0)::bigint FROM credit_entries
          WHERE payment_reference = $1",
    )
    .bind(payment_reference)
    .fetch_one(tx.conn())
    .await?;
    if amount <= 0 || refunded.saturating_add(amount) > payment.amount {
        return Ok(Refunded::ExceedsPayment {
            paid: payment.amount,
            refunded,
        });
    }
    let entry = append(
        tx.conn(),
        NewEntry {
            tenant_id,
            kind: EntryKind::Refund,
            amount: -amount,
            currency,
            invoice_id: None,
            reference: Some(refund_reference),
            payment_reference: Some(payment_reference),
            note: "refund",
        },
    )
    .await?;
    announce(tx, "credit.refunded", "credit.refund", tenant_id, &entry).await?;
    Ok(Refunded::Recorded(tenant_id, entry))
}

/// A recorded refund the provider then reported as failed: its money comes
/// back (`credit.refund_failed`). Does nothing (`None`) for a refund that
/// was never recorded or whose failure already was.
pub async fn refund_failed(
    tx: &mut WriteTx,
    refund_reference: &str,
) -> Result<Option<(TenantId, CreditEntryView)>, BillingError> {
    let Some((tenant_id, refund)) = by_reference(tx.conn(), refund_reference).await? else {
        return Ok(None);
    };
    if refund.kind != "refund" {
        return Ok(None);
    }
    let Some(currency) = Currency::parse(&refund.currency) else {
        return Ok(None);
    };
    lock_tenant(tx.conn(), tenant_id).await?;
    let reference = format!("{refund_reference}:failed");
    if by_reference(tx.conn(), &reference).await?.is_some() {
        return Ok(None);
    }
    let entry = append(
        tx.conn(),
        NewEntry {
            tenant_id,
            kind: EntryKind::RefundFailed,
            amount: -refund.amount,
            currency,
            invoice_id: None,
            reference: Some(&reference),
            payment_reference: refund.payment_reference.as_deref(),
            note: "refund failed",
        },
    )
    .await?;
    announce(
        tx,
        "credit.refund_failed",
        "credit.refund_failed",
        tenant_id,
        &entry,
    )
    .await?;
    Ok(Some((tenant_id, entry)))
}
