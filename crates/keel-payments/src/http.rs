//! Payment routes: tenants start checkouts; Stripe posts its events.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, StatusCode};
use keel_auth::authz::{Action, authorize_tenant};
use keel_auth::{Ctx, TokenKeys};
use keel_billing::BillingConfig;
use keel_core::Actor;
use keel_core::ids::CheckoutId;
use keel_db::{Db, RequestMeta};
use keel_http::{ApiError, ErrorBody, Json, Path, RequestId, TraceParent};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::PaymentError;
use crate::checkout::{self, CheckoutView, NewCheckout};
use crate::provider::Payments;
use crate::webhook::{self, WebhookOutcome};

pub fn router<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
    Arc<BillingConfig>: FromRef<S>,
    Payments: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(checkout_create))
        .routes(routes!(checkout_get))
        .routes(routes!(stripe_webhook))
}

/// Pay: buy prepaid credit, or pay a finalized invoice. With Stripe, the
/// answer carries the Checkout page to send the tenant to (an invoice that
/// has an open checkout gets that one back, `200`); the ledger changes only
/// when Stripe reports the payment. With the manual provider the answer
/// says how to pay out of band (`200`).
#[utoipa::path(
    post,
    path = "/v1/billing/checkouts",
    operation_id = "checkout_create",
    tag = "billing",
    request_body = NewCheckout,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "A Checkout page to pay on", body = CheckoutView),
        (status = 200, description = "The invoice's open checkout, or how to pay out of band", body = CheckoutView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
        (status = 404, description = "`not_found`: no such invoice", body = ErrorBody),
        (status = 409, description = "`invoice_state`: the invoice is not finalized", body = ErrorBody),
        (status = 422, description = "`validation_failed`, `currency_mismatch`", body = ErrorBody),
        (status = 502, description = "`payment_provider_unavailable`", body = ErrorBody),
    )
)]
async fn checkout_create(
    ctx: Ctx,
    State(payments): State<Payments>,
    State(billing): State<Arc<BillingConfig>>,
    headers: HeaderMap,
    Json(new): Json<NewCheckout>,
) -> Result<(StatusCode, Json<CheckoutView>), ApiError> {
    // The idempotency layer leaves this route to the domain (no
    // transaction may stay open while the provider is called).
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|key| keel_auth::idempotency::valid_key(key))
                .ok_or(PaymentError::InvalidIdempotencyKey)?,
        ),
    };
    let (created, view) = checkout::start(&ctx, &payments, billing.currency, key, new).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

/// One of the tenant's checkouts: whether it was paid.
#[utoipa::path(
    get,
    path = "/v1/billing/checkouts/{checkout_id}",
    operation_id = "checkout_get",
    tag = "billing",
    params(("checkout_id" = CheckoutId, Path, description = "The checkout")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The checkout", body = CheckoutView),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`: members and viewers", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
async fn checkout_get(
    ctx: Ctx,
    Path(checkout_id): Path<CheckoutId>,
) -> Result<Json<CheckoutView>, ApiError> {
    let mut tx = ctx.begin().await.map_err(PaymentError::from)?;
    authorize_tenant(tx.conn(), &ctx.principal, Action::BillingRead)
        .await
        .map_err(PaymentError::from)?;
    Ok(Json(checkout::get(tx.conn(), checkout_id).await?))
}

/// Stripe's webhook endpoint. The body is checked against the
/// `Stripe-Signature` header (the endpoint's secret; signed within 300 s)
/// before anything is read, and each event takes effect once: a
/// redelivered event answers `duplicate`. Events Keel does not act on, or
/// refuses (a payment that does not match its checkout), are recorded,
/// audited and answered `200`, so that Stripe stops sending them.
#[utoipa::path(
    post,
    path = "/v1/payments/stripe/webhook",
    operation_id = "stripe_webhook",
    tag = "payments",
    request_body(content = String, description = "The event, as Stripe signed it", content_type = "application/json"),
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature of the body")),
    responses(
        (status = 200, description = "What Keel did with the event", body = WebhookOutcome),
        (status = 400, description = "`invalid_signature` (bad, missing or stale), `invalid_json`", body = ErrorBody),
        (status = 404, description = "`not_found`: Stripe is not the payment provider", body = ErrorBody),
    )
)]
async fn stripe_webhook(
    State(db): State<Db>,
    State(payments): State<Payments>,
    request_id: RequestId,
    trace: TraceParent,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<WebhookOutcome>, ApiError> {
    let stripe = payments
        .stripe
        .as_ref()
        .ok_or(PaymentError::StripeNotConfigured)?;
    let signature = headers
        .get("stripe-signature")
        .and_then(|value| value.to_str().ok())
        .ok_or(PaymentError::InvalidSignature(
            "the Stripe-Signature header is missing",
        ))?;
    let payload = std::str::from_utf8(&body)
        .map_err(|_| PaymentError::InvalidEvent("the body is not UTF-8".into()))?;
    let event = stripe.verify(payload, signature)?;
    let meta = RequestMeta {
        request_id: request_id.0.clone(),
        actor: Actor::system("stripe"),
        traceparent: Some(trace.0.clone()),
    };
    Ok(Json(webhook::apply(&db, meta, event).await?))
}
