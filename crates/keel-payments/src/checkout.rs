//! Starting a payment: credit to buy or an invoice to pay, its amount
//! fixed by Keel before the tenant sees the provider's page.

use keel_auth::Ctx;
use keel_auth::authz::{Action, authorize_tenant};
use keel_billing::BillingError;
use keel_billing::invoice;
use keel_billing::money::Currency;
use keel_core::ResourceName;
use keel_core::ids::{CheckoutId, InvoiceId, TenantId};
use keel_db::Audit;
use keel_http::FieldError;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::PaymentError;
use crate::config::MAX_CHECKOUT_AMOUNT;
use crate::provider::{CheckoutRequest, Payments, Purpose, Started};

/// `POST /v1/billing/checkouts`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCheckout {
    /// `credit` (buy prepaid credit) or `invoice` (pay a finalized invoice).
    #[schema(example = "credit")]
    pub purpose: String,
    /// Credit: minor units to buy, within the cloud's limits.
    #[serde(default)]
    #[schema(example = 5000)]
    pub amount: Option<i64>,
    /// Credit: the platform's billing currency.
    #[serde(default)]
    #[schema(example = "USD")]
    pub currency: Option<String>,
    /// Invoice: the invoice to pay (its total is the amount).
    #[serde(default)]
    pub invoice_id: Option<InvoiceId>,
}

/// A payment the tenant started.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct CheckoutView {
    /// Absent for the manual provider (nothing is created).
    pub id: Option<CheckoutId>,
    /// `stripe` or `manual`.
    pub provider: String,
    /// `credit` or `invoice`.
    pub purpose: String,
    pub invoice_id: Option<InvoiceId>,
    /// Minor units.
    pub amount: i64,
    #[schema(example = "USD")]
    pub currency: String,
    /// `open`, `paid`, `expired` or `refused` (the provider's report did
    /// not match; an operator looks at it); `out_of_band` for the manual
    /// provider.
    pub status: String,
    /// The page to pay on.
    pub url: Option<String>,
    /// How to pay, for the manual provider.
    pub instructions: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
}

const PERIOD_NAME: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]");

const CHECKOUT_COLUMNS: &str = "id, provider, purpose, invoice_id, amount, currency, status, url,
     NULL::text AS instructions, expires_at";

fn invalid(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        code: "invalid".into(),
        message: message.into(),
    }
}

/// What the request asks to pay, checked before anything is read.
fn purpose_of(
    new: &NewCheckout,
    payments: &Payments,
    billing_currency: Currency,
) -> Result<(Purpose, Option<i64>), PaymentError> {
    let mut errors = Vec::new();
    let purpose = match new.purpose.as_str() {
        "credit" => {
            let (min, max) = (payments.config.min_purchase, payments.config.max_purchase);
            match new.amount {
                Some(amount) if (min..=max).contains(&amount) => {}
                _ => errors.push(invalid(
                    "amount",
                    format!("minor units from {min} to {max}"),
                )),
            }
            if new.invoice_id.is_some() {
                errors.push(invalid("invoice_id", "only for purpose invoice"));
            }
            match new.currency.as_deref().map(Currency::parse) {
                None => errors.push(invalid("currency", "required for purpose credit")),
                Some(None) => errors.push(invalid("currency", "an ISO 4217 currency code")),
                Some(Some(_)) => {}
            }
            Some(Purpose::Credit)
        }
        "invoice" => {
            if new.amount.is_some() || new.currency.is_some() {
                errors.push(invalid(
                    if new.amount.is_some() {
                        "amount"
                    } else {
                        "currency"
                    },
                    "an invoice is paid in full, in its currency: leave it out",
                ));
            }
            match new.invoice_id {
                Some(id) => Some(Purpose::Invoice(id)),
                None => {
                    errors.push(invalid("invoice_id", "required for purpose invoice"));
                    None
                }
            }
        }
        _ => {
            errors.push(invalid("purpose", "credit or invoice"));
            None
        }
    };
    match purpose {
        Some(purpose) if errors.is_empty() => {
            if purpose == Purpose::Credit
                && let Some(currency) = &new.currency
                && Currency::parse(currency) != Some(billing_currency)
            {
                return Err(BillingError::CurrencyMismatch {
                    given: currency.clone(),
                    billing: billing_currency.to_string(),
                }
                .into());
            }
            Ok((purpose, new.amount))
        }
        _ => Err(PaymentError::Validation(errors)),
    }
}

/// Where the ids of checkouts that must come out the same on a retry are
/// derived from (UUIDv5).
const CHECKOUT_NAMESPACE: uuid::Uuid = uuid::uuid!("5c1f0a3e-7b52-4d0e-9c3a-2f6e8d4b1a90");

/// What the first, short read found.
struct Prepared {
    tenant_id: TenantId,
    tenant_name: String,
    customer: Option<String>,
    checkout_id: CheckoutId,
    amount: i64,
    currency: Currency,
    description: String,
}

/// Starts a payment (`true`: a new checkout). No transaction is open while
/// the provider is called: a short one reads and checks, the customer is
/// stored as soon as the provider made it, and a last one stores the
/// checkout. A retry is safe because the checkout's id — and with it the
/// provider's idempotency key — comes out the same: an invoice's from the
/// invoice and how many checkouts it had, a credit purchase's from the
/// caller and the request's `Idempotency-Key` (a purchase without one is a
/// new one; the key with another amount is `idempotency_key_reused`). Two
/// requests that meet on one id get the one checkout.
pub async fn start(
    ctx: &Ctx,
    payments: &Payments,
    billing_currency: Currency,
    idempotency_key: Option<&str>,
    new: NewCheckout,
) -> Result<(bool, CheckoutView), PaymentError> {
    let (purpose, amount) = purpose_of(&new, payments, billing_currency)?;
    let prepared = {
        let mut tx = ctx.begin().await?;
        let tenant = authorize_tenant(tx.conn(), &ctx.principal, Action::BillingPay).await?;
        let tenant_id = tenant.tenant_id;
        let (tenant_name, customer) = tenant_and_customer(tx.conn(), tenant_id).await?;
        let (checkout_id, amount, currency, description) = match purpose {
            Purpose::Credit => (
                match idempotency_key {
                    // Per tenant and caller, as the idempotency layer
                    // scopes keys elsewhere.
                    Some(key) => CheckoutId::from(uuid::Uuid::new_v5(
                        &CHECKOUT_NAMESPACE,
                        format!(
                            "credit:{tenant_id}:{}:{key}",
                            ctx.principal.idempotency_scope()
                        )
                        .as_bytes(),
                    )),
                    None => CheckoutId::new(),
                },
                amount.unwrap_or_default(),
                billing_currency,
                "Prepaid credit".to_owned(),
            ),
            Purpose::Invoice(invoice_id) => {
                let invoice = invoice::get(tx.conn(), invoice_id).await?.invoice;
                if invoice.state != "finalized" {
                    return Err(
                        BillingError::InvoiceState("only a finalized invoice is paid").into(),
                    );
                }
                if let Some(open) = open_checkout(tx.conn(), invoice_id).await? {
                    return Ok((false, open));
                }
                if !(1..=MAX_CHECKOUT_AMOUNT).contains(&invoice.total) {
                    return Err(BillingError::Overflow.into());
                }
                let currency = Currency::parse(&invoice.currency).ok_or_else(|| {
                    BillingError::CurrencyMismatch {
                        given: invoice.currency.clone(),
                        billing: billing_currency.to_string(),
                    }
                })?;
                let earlier: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM checkouts WHERE invoice_id = $1")
                        .bind(invoice_id)
                        .fetch_one(tx.conn())
                        .await?;
                (
                    CheckoutId::from(uuid::Uuid::new_v5(
                        &CHECKOUT_NAMESPACE,
                        format!("invoice:{invoice_id}:{earlier}").as_bytes(),
                    )),
                    invoice.total,
                    currency,
                    format!(
                        "Invoice for {}",
                        invoice.period_start.format(PERIOD_NAME).unwrap_or_default()
                    ),
                )
            }
        };
        if let Some(existing) = find(tx.conn(), checkout_id).await? {
            // The key again: the same checkout, if it asks for the same.
            if existing.purpose != purpose.as_str()
                || existing.amount != amount
                || existing.currency != currency.code()
            {
                return Err(PaymentError::IdempotencyKeyReused);
            }
            return Ok((false, existing));
        }
        Prepared {
            tenant_id,
            tenant_name,
            customer,
            checkout_id,
            amount,
            currency,
            description,
        }
    };
    let customer = match prepared.customer.clone() {
        Some(customer) => Some(customer),
        None => match payments
            .provider
            .create_customer(prepared.tenant_id, prepared.tenant_name.clone())
            .await?
        {
            Some(created) => {
                Some(store_customer(ctx, payments, prepared.tenant_id, created).await?)
            }
            None => None,
        },
    };
    let checkout_id = prepared.checkout_id;
    let started = payments
        .provider
        .start_checkout(CheckoutRequest {
            checkout_id,
            tenant_id: prepared.tenant_id,
            customer,
            purpose,
            amount: prepared.amount,
            currency: prepared.currency,
            description: prepared.description,
            success_url: payments
                .config
                .success_url
                .replace("{CHECKOUT_ID}", &checkout_id.to_string()),
            cancel_url: payments
                .config
                .cancel_url
                .replace("{CHECKOUT_ID}", &checkout_id.to_string()),
        })
        .await?;
    let invoice_id = match purpose {
        Purpose::Invoice(id) => Some(id),
        Purpose::Credit => None,
    };
    let (session_id, url, expires_at) = match started {
        Started::OutOfBand { instructions } => {
            return Ok((
                false,
                CheckoutView {
                    id: None,
                    provider: payments.provider.name().to_owned(),
                    purpose: purpose.as_str().to_owned(),
                    invoice_id,
                    amount: prepared.amount,
                    currency: prepared.currency.to_string(),
                    status: "out_of_band".into(),
                    url: None,
                    instructions: Some(instructions),
                    expires_at: None,
                },
            ));
        }
        Started::Hosted {
            session_id,
            url,
            expires_at,
        } => (session_id, url, expires_at),
    };
    let mut tx = ctx.begin().await?;
    let inserted: Option<CheckoutView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO checkouts (id, tenant_id, provider, provider_session_id, purpose, invoice_id,
                                amount, currency, url, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT DO NOTHING
         RETURNING {CHECKOUT_COLUMNS}"
    )))
    .bind(checkout_id)
    .bind(prepared.tenant_id)
    .bind(payments.provider.name())
    .bind(&session_id)
    .bind(purpose.as_str())
    .bind(invoice_id)
    .bind(prepared.amount)
    .bind(prepared.currency.code())
    .bind(&url)
    .bind(expires_at)
    .fetch_optional(tx.conn())
    .await?;
    let Some(view) = inserted else {
        // A twin request stored it first (the provider gave both the same
        // session).
        let existing = find(tx.conn(), checkout_id).await?;
        return existing
            .map(|existing| (false, existing))
            .ok_or(PaymentError::CheckoutNotFound);
    };
    tx.commit(
        Audit::new(
            "checkout.create",
            Some(prepared.tenant_id),
            ResourceName::new(
                None,
                Some(prepared.tenant_id),
                None,
                "checkout",
                checkout_id,
            ),
        )
        .with_details(serde_json::json!({
            "purpose": view.purpose, "invoice_id": view.invoice_id, "amount": view.amount,
            "currency": view.currency, "provider_session_id": session_id,
        })),
    )
    .await?;
    Ok((true, view))
}

/// Stores the customer the provider just made, in a transaction of its
/// own (so that it is kept even if the checkout then fails), and returns
/// the tenant's customer: this one, or one a concurrent request stored
/// first.
async fn store_customer(
    ctx: &Ctx,
    payments: &Payments,
    tenant_id: TenantId,
    created: String,
) -> Result<String, PaymentError> {
    let mut tx = ctx.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO payment_customers (tenant_id, provider, customer_id)
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(tenant_id)
    .bind(payments.provider.name())
    .bind(&created)
    .execute(tx.conn())
    .await?
    .rows_affected();
    let stored = tenant_and_customer(tx.conn(), tenant_id).await?.1;
    if inserted == 1 {
        tx.commit(
            Audit::new(
                "payment_customer.create",
                Some(tenant_id),
                ResourceName::new(None, Some(tenant_id), None, "payment-customer", &created),
            )
            .with_details(serde_json::json!({ "provider": payments.provider.name() })),
        )
        .await?;
    }
    stored.ok_or(PaymentError::Provider("the customer was not stored".into()))
}

async fn find(
    conn: &mut PgConnection,
    checkout_id: CheckoutId,
) -> Result<Option<CheckoutView>, PaymentError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CHECKOUT_COLUMNS} FROM checkouts WHERE id = $1"
    )))
    .bind(checkout_id)
    .fetch_optional(conn)
    .await?)
}

/// An invoice's checkout that can still be paid (a minute to spare).
async fn open_checkout(
    conn: &mut PgConnection,
    invoice_id: InvoiceId,
) -> Result<Option<CheckoutView>, PaymentError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CHECKOUT_COLUMNS} FROM checkouts
          WHERE invoice_id = $1 AND status = 'open' AND expires_at > now() + interval '1 minute'
          ORDER BY created_at DESC LIMIT 1"
    )))
    .bind(invoice_id)
    .fetch_optional(conn)
    .await?)
}

async fn tenant_and_customer(
    conn: &mut PgConnection,
    tenant_id: TenantId,
) -> Result<(String, Option<String>), PaymentError> {
    Ok(sqlx::query_as(
        "SELECT t.name, c.customer_id FROM tenants t
           LEFT JOIN payment_customers c ON c.tenant_id = t.id AND c.provider = 'stripe'
          WHERE t.id = $1",
    )
    .bind(tenant_id)
    .fetch_one(conn)
    .await?)
}

/// One of the tenant's checkouts (row-level security hides the others).
pub async fn get(
    conn: &mut PgConnection,
    checkout_id: CheckoutId,
) -> Result<CheckoutView, PaymentError> {
    find(conn, checkout_id)
        .await?
        .ok_or(PaymentError::CheckoutNotFound)
}
