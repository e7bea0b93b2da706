//! Stripe's webhook events, applied once each. The event's row in
//! `stripe_events` is written in the transaction of its effect: a replayed
//! or redelivered event finds it and changes nothing, and an event whose
//! effect failed is not recorded, so Stripe's next delivery tries again.

use keel_billing::BillingError;
use keel_billing::invoice::{self, Paid};
use keel_billing::ledger::{self, Refunded};
use keel_billing::money::Currency;
use keel_core::ResourceName;
use keel_core::ids::{CheckoutId, InvoiceId, TenantId};
use keel_db::{Audit, Db, RequestMeta, WriteTx};
use serde::Serialize;

use crate::PaymentError;
use crate::stripe::{Incoming, RefundStatus, Verified};

/// What Keel did with an event (also the webhook's response body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WebhookOutcome {
    /// `applied`, `ignored`, `refused`, `deferred` or `duplicate`.
    pub outcome: String,
    /// Why, for anything but `applied`.
    pub detail: String,
}

impl WebhookOutcome {
    fn new(outcome: &str, detail: impl Into<String>) -> Self {
        Self {
            outcome: outcome.to_owned(),
            detail: detail.into(),
        }
    }
}

/// Applies a verified event, once. An effect the ledger refuses (it would
/// break one of its rules) lands not at all: the event is recorded as
/// `refused` in a transaction of its own, so that Stripe stops sending it
/// and an operator sees it. A database failure is an error: nothing is
/// recorded, and Stripe's next delivery tries again.
pub async fn apply(
    db: &Db,
    meta: RequestMeta,
    event: Verified,
) -> Result<WebhookOutcome, PaymentError> {
    let mut tx = db.begin_system(meta.clone()).await?;
    if !received(&mut tx, &event).await? {
        tx.rollback().await?;
        return Ok(duplicate());
    }
    let refusal = match effect(&mut tx, &event).await {
        Ok((outcome, tenant_id)) => return finish(tx, &event, outcome, tenant_id).await,
        Err(PaymentError::Billing(error)) if is_rule(&error) => error,
        Err(error) => return Err(error),
    };
    tx.rollback().await?;
    let mut tx = db.begin_system(meta).await?;
    if !received(&mut tx, &event).await? {
        tx.rollback().await?;
        return Ok(duplicate());
    }
    // The checkout it reported paid is refused with it, for good.
    let mut tenant_id = None;
    if let Incoming::Checkout { session_id, .. } = &event.incoming {
        tenant_id = sqlx::query_scalar(
            "UPDATE checkouts SET status = 'refused', updated_at = now()
              WHERE provider = 'stripe' AND provider_session_id = $1 AND status = 'open'
              RETURNING tenant_id",
        )
        .bind(session_id)
        .fetch_optional(tx.conn())
        .await?;
    }
    let outcome = WebhookOutcome::new("refused", format!("the ledger refused it: {refusal}"));
    finish(tx, &event, outcome, tenant_id).await
}

fn duplicate() -> WebhookOutcome {
    WebhookOutcome::new("duplicate", "this event was received before")
}

/// A rule of billing, not a failure of the database.
fn is_rule(error: &BillingError) -> bool {
    !matches!(
        error,
        BillingError::Database(_)
            | BillingError::Db(_)
            | BillingError::Auth(_)
            | BillingError::Export(_)
    )
}

/// Records the event as received; `false` if it was before (or a
/// concurrent delivery of it holds the row: this one waits, then sees it).
async fn received(tx: &mut WriteTx, event: &Verified) -> Result<bool, PaymentError> {
    let fresh: Option<i32> = sqlx::query_scalar(
        "INSERT INTO stripe_events (event_id, event_type, livemode, outcome)
         VALUES ($1, $2, $3, 'received') ON CONFLICT (event_id) DO NOTHING RETURNING 1",
    )
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(event.livemode)
    .fetch_optional(tx.conn())
    .await?;
    Ok(fresh.is_some())
}

async fn effect(
    tx: &mut WriteTx,
    event: &Verified,
) -> Result<(WebhookOutcome, Option<TenantId>), PaymentError> {
    match &event.incoming {
        Incoming::Checkout {
            session_id,
            paid: true,
            customer,
            payment_intent,
            amount_total,
            currency,
        } => {
            checkout_paid(
                tx,
                &event.id,
                PaidSession {
                    session_id,
                    customer: customer.as_deref(),
                    payment_intent: payment_intent.as_deref(),
                    amount_total: *amount_total,
                    currency: currency.as_deref(),
                },
            )
            .await
        }
        Incoming::Checkout { paid: false, .. } => Ok((
            WebhookOutcome::new(
                "ignored",
                "the payment settles later (an asynchronous method)",
            ),
            None,
        )),
        Incoming::CheckoutLapsed { session_id } => lapsed(tx, session_id).await,
        Incoming::Refund {
            refund_id,
            payment_intent,
            amount,
            currency,
            status,
        } => {
            refund(
                tx,
                &event.id,
                RefundReport {
                    refund_id,
                    payment_intent: payment_intent.as_deref(),
                    amount: *amount,
                    currency,
                    status: *status,
                },
            )
            .await
        }
        Incoming::Dispute {
            dispute_id,
            payment_intent,
            amount,
            currency,
        } => dispute(tx, dispute_id, payment_intent.as_deref(), *amount, currency).await,
        Incoming::Other => Ok((
            WebhookOutcome::new("ignored", "Keel does not act on this event type"),
            None,
        )),
    }
}

/// Stores what was done, audits it, commits.
async fn finish(
    mut tx: WriteTx,
    event: &Verified,
    outcome: WebhookOutcome,
    tenant_id: Option<TenantId>,
) -> Result<WebhookOutcome, PaymentError> {
    sqlx::query(
        "UPDATE stripe_events SET outcome = $2, detail = $3, tenant_id = $4, updated_at = now()
          WHERE event_id = $1 AND outcome = 'received'",
    )
    .bind(&event.id)
    .bind(&outcome.outcome)
    .bind(&outcome.detail)
    .bind(tenant_id)
    .execute(tx.conn())
    .await?;
    if outcome.outcome == "refused" {
        tracing::error!(event = %event.id, detail = %outcome.detail, "refused a Stripe event: an operator should look at it");
    } else {
        tracing::info!(event = %event.id, outcome = %outcome.outcome, detail = %outcome.detail, "Stripe event");
    }
    tx.commit(
        Audit::new(
            "stripe.event",
            tenant_id,
            ResourceName::new(None, tenant_id, None, "stripe-event", &event.id),
        )
        .with_details(serde_json::json!({
            "type": event.event_type, "outcome": outcome.outcome, "detail": outcome.detail,
        })),
    )
    .await?;
    Ok(outcome)
}

/// Serializes everything that happens to one Stripe payment (its
/// checkout, its refunds): a refund and its payment arriving at once see
/// each other. Taken before the tenant's billing lock.
async fn lock_payment(tx: &mut WriteTx, payment_intent: &str) -> Result<(), PaymentError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel.stripe.payment'), hashtext($1))")
        .bind(payment_intent)
        .execute(tx.conn())
        .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct CheckoutRow {
    id: CheckoutId,
    tenant_id: TenantId,
    purpose: String,
    invoice_id: Option<InvoiceId>,
    amount: i64,
    currency: String,
    status: String,
}

struct PaidSession<'a> {
    session_id: &'a str,
    customer: Option<&'a str>,
    payment_intent: Option<&'a str>,
    amount_total: Option<i64>,
    currency: Option<&'a str>,
}

/// The reference of a Stripe payment (a PaymentIntent) in the ledger.
pub fn payment_reference(payment_intent: &str) -> String {
    format!("stripe:{payment_intent}")
}

fn refund_reference(refund_id: &str) -> String {
    format!("stripe:{refund_id}")
}

/// A Checkout session was paid: the credit it bought, or the invoice it
/// paid — if it is one Keel started, for the tenant whose customer paid,
/// for exactly the amount and currency Keel asked.
async fn checkout_paid(
    tx: &mut WriteTx,
    event_id: &str,
    session: PaidSession<'_>,
) -> Result<(WebhookOutcome, Option<TenantId>), PaymentError> {
    let row: Option<CheckoutRow> = sqlx::query_as(
        "SELECT id, tenant_id, purpose, invoice_id, amount, currency, status FROM checkouts
          WHERE provider = 'stripe' AND provider_session_id = $1 FOR UPDATE",
    )
    .bind(session.session_id)
    .fetch_optional(tx.conn())
    .await?;
    let Some(row) = row else {
        return Ok((
            WebhookOutcome::new(
                "ignored",
                format!(
                    "no checkout of Keel's is the session {}",
                    session.session_id
                ),
            ),
            None,
        ));
    };
    let tenant = Some(row.tenant_id);
    match row.status.as_str() {
        "paid" => {
            return Ok((
                WebhookOutcome::new("ignored", "the checkout was paid already"),
                tenant,
            ));
        }
        // Final: an operator settles what Stripe took.
        "refused" => {
            return Ok((
                WebhookOutcome::new(
                    "ignored",
                    "the checkout was refused before; an operator decides",
                ),
                tenant,
            ));
        }
        _ => {}
    }
    if let Some(payment_intent) = session.payment_intent {
        lock_payment(tx, payment_intent).await?;
    }
    let customer: Option<String> = sqlx::query_scalar(
        "SELECT customer_id FROM payment_customers WHERE tenant_id = $1 AND provider = 'stripe'",
    )
    .bind(row.tenant_id)
    .fetch_optional(tx.conn())
    .await?;
    let paid_currency = session.currency.map(str::to_uppercase);
    let refusal = if customer.is_none() || customer.as_deref() != session.customer {
        Some("the session's customer is not the tenant's".to_owned())
    } else if paid_currency.as_deref() != Some(row.currency.as_str()) {
        Some(format!(
            "paid in {}, but the checkout asked for {}",
            paid_currency.as_deref().unwrap_or("no currency"),
            row.currency
        ))
    } else if session.amount_total != Some(row.amount) {
        Some(format!(
            "paid {:?}, but the checkout asked for {}",
            session.amount_total, row.amount
        ))
    } else if session.payment_intent.is_none() {
        Some("the session names no payment".to_owned())
    } else {
        None
    };
    let (Some(payment_intent), None) = (session.payment_intent, &refusal) else {
        set_status(tx, row.id, "refused", None).await?;
        return Ok((
            WebhookOutcome::new("refused", refusal.unwrap_or_default()),
            tenant,
        ));
    };
    let Some(currency) = Currency::parse(&row.currency) else {
        set_status(tx, row.id, "refused", None).await?;
        return Ok((
            WebhookOutcome::new("refused", "the checkout's currency is unknown"),
            tenant,
        ));
    };
    let reference = payment_reference(payment_intent);
    let mut detail = String::new();
    let credit_instead = match (row.purpose.as_str(), row.invoice_id) {
        ("invoice", Some(invoice_id)) => {
            match invoice::pay(tx, invoice_id, "stripe", payment_intent, Some(&reference)).await {
                Ok(Paid::Now(_) | Paid::Already(_)) => false,
                Err(BillingError::InvoiceState(why)) => {
                    let invoice = invoice::get(tx.conn(), invoice_id).await?.invoice;
                    if invoice.payment_reference.as_deref() == Some(payment_intent) {
                        // An operator recorded this very payment by hand
                        // (the webhook was late): counted once.
                        detail = "an operator recorded this payment on the invoice already".into();
                        false
                    } else {
                        // Paid another way meanwhile, or voided: the money
                        // is the tenant's credit.
                        detail = format!("credited: the invoice could not take it ({why})");
                        true
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
        _ => true,
    };
    if credit_instead {
        ledger::purchase(
            tx,
            row.tenant_id,
            row.amount,
            currency,
            &reference,
            "Stripe Checkout",
        )
        .await?;
    }
    set_status(tx, row.id, "paid", Some(&reference)).await?;
    apply_deferred_refunds(tx, event_id, payment_intent).await?;
    Ok((WebhookOutcome::new("applied", detail), tenant))
}

async fn set_status(
    tx: &mut WriteTx,
    id: CheckoutId,
    status: &str,
    payment_reference: Option<&str>,
) -> Result<(), PaymentError> {
    sqlx::query(
        "UPDATE checkouts SET status = $2, payment_reference = coalesce($3, payment_reference),
                updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(payment_reference)
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Refunds that arrived before this payment, applied now that it is in
/// the ledger.
async fn apply_deferred_refunds(
    tx: &mut WriteTx,
    event_id: &str,
    payment_intent: &str,
) -> Result<(), PaymentError> {
    let waiting: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT event_id, refund_id, refund_amount, refund_currency FROM stripe_events
          WHERE outcome = 'deferred' AND deferred_payment = $1
          ORDER BY received_at FOR UPDATE",
    )
    .bind(payment_intent)
    .fetch_all(tx.conn())
    .await?;
    for (waiting_event, refund_id, amount, currency) in waiting {
        let (outcome, _) = record_refund(tx, &refund_id, payment_intent, amount, &currency).await?;
        let (outcome, detail) = match outcome.outcome.as_str() {
            // Still no payment cannot happen here; keep it waiting if so.
            "deferred" => continue,
            _ => (
                outcome.outcome,
                format!(
                    "after its payment (event {event_id}) arrived. {}",
                    outcome.detail
                ),
            ),
        };
        sqlx::query(
            "UPDATE stripe_events SET outcome = $2, detail = $3, updated_at = now()
              WHERE event_id = $1",
        )
        .bind(&waiting_event)
        .bind(&outcome)
        .bind(detail.trim_end())
        .execute(tx.conn())
        .await?;
    }
    Ok(())
}

async fn lapsed(
    tx: &mut WriteTx,
    session_id: &str,
) -> Result<(WebhookOutcome, Option<TenantId>), PaymentError> {
    let tenant: Option<TenantId> = sqlx::query_scalar(
        "UPDATE checkouts SET status = 'expired', updated_at = now()
          WHERE provider = 'stripe' AND provider_session_id = $1 AND status = 'open'
          RETURNING tenant_id",
    )
    .bind(session_id)
    .fetch_optional(tx.conn())
    .await?;
    Ok(match tenant {
        Some(tenant) => (
            WebhookOutcome::new("applied", "the checkout expired unpaid"),
            Some(tenant),
        ),
        None => (
            WebhookOutcome::new("ignored", "no open checkout is this session"),
            None,
        ),
    })
}

/// A refund as Stripe reported it.
struct RefundReport<'a> {
    refund_id: &'a str,
    payment_intent: Option<&'a str>,
    amount: i64,
    currency: &'a str,
    status: RefundStatus,
}

async fn refund(
    tx: &mut WriteTx,
    event_id: &str,
    report: RefundReport<'_>,
) -> Result<(WebhookOutcome, Option<TenantId>), PaymentError> {
    if let Some(payment_intent) = report.payment_intent {
        lock_payment(tx, payment_intent).await?;
    }
    match report.status {
        RefundStatus::Pending => Ok((
            WebhookOutcome::new("ignored", "the refund is not final yet"),
            None,
        )),
        RefundStatus::Failed => {
            // Remembered, so that a `succeeded` report that Stripe sends
            // after this one (it does not order its events) is refused.
            sqlx::query(
                "INSERT INTO stripe_failed_refunds (refund_id, event_id) VALUES ($1, $2)
                 ON CONFLICT (refund_id) DO NOTHING",
            )
            .bind(report.refund_id)
            .bind(event_id)
            .execute(tx.conn())
            .await?;
            // A refund still waiting for its payment never happened.
            let waiting = sqlx::query(
                "UPDATE stripe_events
                    SET outcome = 'ignored', detail = 'the refund failed before its payment arrived',
                        updated_at = now()
                  WHERE outcome = 'deferred' AND refund_id = $1",
            )
            .bind(report.refund_id)
            .execute(tx.conn())
            .await?
            .rows_affected();
            match ledger::refund_failed(tx, &refund_reference(report.refund_id)).await? {
                Some((tenant, _)) => Ok((
                    WebhookOutcome::new("applied", "the refund failed: its money is back"),
                    Some(tenant),
                )),
                None if waiting > 0 => Ok((
                    WebhookOutcome::new("applied", "the refund waiting for its payment failed"),
                    None,
                )),
                None => Ok((
                    WebhookOutcome::new(
                        "ignored",
                        "the refund was not recorded, or its failure was",
                    ),
                    None,
                )),
            }
        }
        RefundStatus::Succeeded => {
            let Some(payment_intent) = report.payment_intent else {
                return Ok((
                    WebhookOutcome::new("refused", "the refund names no payment"),
                    None,
                ));
            };
            let (outcome, tenant) = record_refund(
                tx,
                report.refund_id,
                payment_intent,
                report.amount,
                report.currency,
            )
            .await?;
            if outcome.outcome == "deferred" {
                sqlx::query(
                    "UPDATE stripe_events
                        SET deferred_payment = $2, refund_id = $3, refund_amount = $4,
                            refund_currency = $5
                      WHERE event_id = $1",
                )
                .bind(event_id)
                .bind(payment_intent)
                .bind(report.refund_id)
                .bind(report.amount)
                .bind(report.currency)
                .execute(tx.conn())
                .await?;
            }
            Ok((outcome, tenant))
        }
    }
}

/// A chargeback: the money may go back to the customer's bank while the
/// credit it bought is spent. Not decided here: refused, logged at error
/// and audited for an operator (who can settle it with a grant or by
/// suspending the tenant).
async fn dispute(
    tx: &mut WriteTx,
    dispute_id: &str,
    payment_intent: Option<&str>,
    amount: i64,
    currency: &str,
) -> Result<(WebhookOutcome, Option<TenantId>), PaymentError> {
    let tenant = match payment_intent {
        Some(payment_intent) => ledger::by_reference(tx.conn(), &payment_reference(payment_intent))
            .await?
            .map(|(tenant, _)| tenant),
        None => None,
    };
    Ok((
        WebhookOutcome::new(
            "refused",
            format!(
                "dispute {dispute_id} of payment {} for {amount} {currency}: an operator decides",
                payment_intent.unwrap_or("(none named)")
            ),
        ),
        tenant,
    ))
}

/// Records a succeeded refund of a payment; `deferred` when the payment is
/// not in the ledger yet.
async fn record_refund(
    tx: &mut WriteTx,
    refund_id: &str,
    payment_intent: &str,
    amount: i64,
    currency: &str,
) -> Result<(WebhookOutcome, Option<TenantId>), PaymentError> {
    let failed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM stripe_failed_refunds WHERE refund_id = $1)",
    )
    .bind(refund_id)
    .fetch_one(tx.conn())
    .await?;
    if failed {
        return Ok((
            WebhookOutcome::new("ignored", "Stripe reported this refund failed before"),
            None,
        ));
    }
    let Some(currency_code) = Currency::parse(&currency.to_uppercase()) else {
        return Ok((
            WebhookOutcome::new("refused", format!("unknown currency {currency}")),
            None,
        ));
    };
    Ok(
        match ledger::refund(
            tx,
            &payment_reference(payment_intent),
            &refund_reference(refund_id),
            amount,
            currency_code,
        )
        .await?
        {
            Refunded::Recorded(tenant, _) => (WebhookOutcome::new("applied", ""), Some(tenant)),
            Refunded::AlreadyRecorded(tenant, _) => (
                WebhookOutcome::new("ignored", "the refund was recorded before"),
                Some(tenant),
            ),
            Refunded::UnknownPayment => (
                WebhookOutcome::new(
                    "deferred",
                    "its payment is not recorded yet; applied when it is",
                ),
                None,
            ),
            Refunded::CurrencyMismatch { paid } => (
                WebhookOutcome::new(
                    "refused",
                    format!("refunded in {currency}, but the payment was in {paid}"),
                ),
                None,
            ),
            Refunded::ExceedsPayment { paid, refunded } => (
                WebhookOutcome::new(
                    "refused",
                    format!(
                        "refunding {amount} more would exceed the payment ({paid}, {refunded} refunded already)"
                    ),
                ),
                None,
            ),
        },
    )
}
