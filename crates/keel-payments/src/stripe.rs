//! Stripe through async-stripe: a customer per tenant, a Checkout session
//! per payment, and the verification of Stripe's webhook events. The API
//! version is the one the crate is generated for
//! ([`api_version`]; doc/payments.md).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionLineItemsPriceData,
    CreateCheckoutSessionPaymentIntentData, ProductData,
};
use stripe_shared::{CheckoutSessionMode, CheckoutSessionPaymentStatus};
use stripe_webhook::{EventObject, Webhook, WebhookError};
use time::OffsetDateTime;

use keel_core::ids::TenantId;

use crate::PaymentError;
use crate::config::StripeConfig;
use crate::provider::{CheckoutRequest, PaymentProvider, Purpose, Started};

/// The Stripe API version every request asks for and events are read as.
pub fn api_version() -> &'static str {
    stripe_shared::version::VERSION.as_str()
}

/// The Stripe client and the webhook signing secret.
pub struct StripeProvider {
    client: stripe::Client,
    webhook_secret: SecretString,
}

impl StripeProvider {
    pub fn new(config: &StripeConfig) -> Result<Self, PaymentError> {
        let (Some(secret_key), Some(webhook_secret)) = (&config.secret_key, &config.webhook_secret)
        else {
            return Err(PaymentError::Provider(
                "Stripe needs a secret key and a webhook secret".into(),
            ));
        };
        let mut builder = stripe::ClientBuilder::new(secret_key.expose_secret())
            .timeout(Duration::from_secs(u64::from(config.timeout_secs)))
            .app_info("keel", Some(env!("CARGO_PKG_VERSION").to_owned()), None);
        if let Some(base) = &config.api_base {
            builder = builder.url(base.clone());
        }
        let client = builder
            .build()
            .map_err(|error| PaymentError::Provider(error.to_string()))?;
        Ok(Self {
            client,
            webhook_secret: webhook_secret.clone(),
        })
    }

    async fn customer(
        &self,
        tenant_id: TenantId,
        tenant_name: String,
    ) -> Result<String, PaymentError> {
        let metadata = HashMap::from([("keel_tenant_id".to_owned(), tenant_id.to_string())]);
        let customer = stripe_core::customer::CreateCustomer::new()
            .name(tenant_name)
            .metadata(metadata)
            .customize()
            .request_strategy(idempotent(&format!("keel-customer-{tenant_id}"))?)
            .send(&self.client)
            .await
            .map_err(provider_error)?;
        Ok(customer.id.to_string())
    }

    async fn create_session(&self, request: &CheckoutRequest) -> Result<Started, PaymentError> {
        let customer = request.customer.as_deref().ok_or_else(|| {
            PaymentError::Provider("a Stripe checkout needs the tenant's customer".into())
        })?;
        let currency = stripe_types::Currency::from_str(&request.currency.code().to_lowercase())
            .unwrap_or_else(|never| match never {});
        let mut metadata = HashMap::from([
            (
                "keel_checkout_id".to_owned(),
                request.checkout_id.to_string(),
            ),
            ("keel_tenant_id".to_owned(), request.tenant_id.to_string()),
            (
                "keel_purpose".to_owned(),
                request.purpose.as_str().to_owned(),
            ),
        ]);
        if let Purpose::Invoice(invoice_id) = request.purpose {
            metadata.insert("keel_invoice_id".to_owned(), invoice_id.to_string());
        }
        let mut price = CreateCheckoutSessionLineItemsPriceData::new(currency);
        price.unit_amount = Some(request.amount);
        price.product_data = Some(ProductData::new(request.description.clone()));
        let mut line = CreateCheckoutSessionLineItems::new();
        line.price_data = Some(price);
        line.quantity = Some(1);
        let mut payment_intent = CreateCheckoutSessionPaymentIntentData::new();
        payment_intent.metadata = Some(metadata.clone());
        let session = CreateCheckoutSession::new()
            .mode(CheckoutSessionMode::Payment)
            .customer(customer.to_owned())
            .client_reference_id(request.checkout_id.to_string())
            .line_items(vec![line])
            .metadata(metadata)
            .payment_intent_data(payment_intent)
            .success_url(request.success_url.clone())
            .cancel_url(request.cancel_url.clone())
            .customize()
            .request_strategy(idempotent(&format!(
                "keel-checkout-{}",
                request.checkout_id
            ))?)
            .send(&self.client)
            .await
            .map_err(provider_error)?;
        let expires_at = OffsetDateTime::from_unix_timestamp(session.expires_at)
            .map_err(|_| PaymentError::Provider("Stripe sent an impossible expiry".into()))?;
        Ok(Started::Hosted {
            session_id: session.id.to_string(),
            url: session.url,
            expires_at,
        })
    }

    /// Checks the signature of a webhook delivery (HMAC-SHA256 with the
    /// endpoint secret; the signed time within 300 s of now) and reads the
    /// event.
    pub fn verify(&self, payload: &str, signature: &str) -> Result<Verified, PaymentError> {
        let event =
            match Webhook::construct_event(payload, signature, self.webhook_secret.expose_secret())
            {
                Ok(event) => event,
                Err(WebhookError::BadTimestamp(_)) => {
                    return Err(PaymentError::InvalidSignature(
                        "signed more than 300 s from now",
                    ));
                }
                // Signed (the signature is checked first), but its object
                // does not read as this API version's: fine for an event
                // Keel does not act on; for one it acts on, Stripe is to
                // retry once the endpoint's version is fixed.
                Err(WebhookError::BadParse(reason)) => return unread(payload, reason),
                Err(
                    WebhookError::BadKey | WebhookError::BadHeader(_) | WebhookError::BadSignature,
                ) => {
                    return Err(PaymentError::InvalidSignature(
                        "it does not match the endpoint's secret",
                    ));
                }
            };
        Ok(Verified {
            id: event.id.to_string(),
            event_type: event.type_.as_str().to_owned(),
            livemode: event.livemode,
            incoming: incoming(event.data.object),
        })
    }
}

/// The event types Keel acts on.
const ACTED_ON: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "refund.created",
    "refund.updated",
    "refund.failed",
    "charge.refund.updated",
    "charge.dispute.created",
];

/// A signed event whose object did not parse: acknowledged as `Other` if
/// Keel does not act on its type, refused otherwise.
fn unread(payload: &str, reason: String) -> Result<Verified, PaymentError> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        id: String,
        #[serde(rename = "type")]
        event_type: String,
        #[serde(default)]
        livemode: bool,
    }
    match serde_json::from_str::<Envelope>(payload) {
        Ok(envelope) if !ACTED_ON.contains(&envelope.event_type.as_str()) => Ok(Verified {
            id: envelope.id,
            event_type: envelope.event_type,
            livemode: envelope.livemode,
            incoming: Incoming::Other,
        }),
        _ => Err(PaymentError::InvalidEvent(reason)),
    }
}

impl PaymentProvider for StripeProvider {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn create_customer(
        &self,
        tenant_id: TenantId,
        tenant_name: String,
    ) -> BoxFuture<'_, Result<Option<String>, PaymentError>> {
        Box::pin(async move { self.customer(tenant_id, tenant_name).await.map(Some) })
    }

    fn start_checkout(
        &self,
        request: CheckoutRequest,
    ) -> BoxFuture<'_, Result<Started, PaymentError>> {
        Box::pin(async move { self.create_session(&request).await })
    }
}

fn idempotent(key: &str) -> Result<RequestStrategy, PaymentError> {
    IdempotencyKey::new(key)
        .map(RequestStrategy::Idempotent)
        .map_err(|error| PaymentError::Provider(format!("idempotency key: {error}")))
}

fn provider_error(error: StripeError) -> PaymentError {
    match error {
        // Stripe's own message (no secrets in it) and status. A request
        // Stripe refuses (4xx, but a conflict or a rate limit) fails the
        // same way when tried again.
        StripeError::Stripe(errors, status) => {
            let message = format!(
                "Stripe answered {status}: {}",
                errors.message.as_deref().unwrap_or("no message")
            );
            if (400..500).contains(&status) && status != 409 && status != 429 {
                PaymentError::ProviderRefused(message)
            } else {
                PaymentError::Provider(message)
            }
        }
        other => PaymentError::Provider(other.to_string()),
    }
}

/// A verified event, in the terms Keel acts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    pub id: String,
    pub event_type: String,
    pub livemode: bool,
    pub incoming: Incoming,
}

/// What an event says, for the events Keel acts on.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    /// A Checkout session completed; `paid` unless its payment method
    /// settles later (then `checkout.session.async_payment_succeeded`
    /// follows).
    Checkout {
        session_id: String,
        paid: bool,
        customer: Option<String>,
        payment_intent: Option<String>,
        amount_total: Option<i64>,
        /// Lower case, as Stripe writes it.
        currency: Option<String>,
    },
    /// A Checkout session expired unpaid, or its delayed payment failed.
    CheckoutLapsed { session_id: String },
    /// A refund was created or changed.
    Refund {
        refund_id: String,
        payment_intent: Option<String>,
        amount: i64,
        currency: String,
        status: RefundStatus,
    },
    /// A customer disputed a payment (a chargeback).
    Dispute {
        dispute_id: String,
        payment_intent: Option<String>,
        amount: i64,
        currency: String,
    },
    /// Anything else: acknowledged and recorded, nothing done.
    Other,
}

/// A refund's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundStatus {
    Succeeded,
    Failed,
    Pending,
}

fn incoming(object: EventObject) -> Incoming {
    match object {
        EventObject::CheckoutSessionCompleted(session)
        | EventObject::CheckoutSessionAsyncPaymentSucceeded(session) => Incoming::Checkout {
            session_id: session.id.to_string(),
            paid: session.payment_status == CheckoutSessionPaymentStatus::Paid,
            customer: session.customer.map(|customer| customer.id().to_string()),
            payment_intent: session.payment_intent.map(|intent| intent.id().to_string()),
            amount_total: session.amount_total,
            currency: session.currency.map(|currency| currency.to_string()),
        },
        EventObject::CheckoutSessionExpired(session)
        | EventObject::CheckoutSessionAsyncPaymentFailed(session) => Incoming::CheckoutLapsed {
            session_id: session.id.to_string(),
        },
        EventObject::RefundCreated(refund)
        | EventObject::RefundUpdated(refund)
        | EventObject::RefundFailed(refund)
        | EventObject::ChargeRefundUpdated(refund) => Incoming::Refund {
            refund_id: refund.id.to_string(),
            payment_intent: refund.payment_intent.map(|intent| intent.id().to_string()),
            amount: refund.amount,
            currency: refund.currency.to_string(),
            status: match refund.status.as_deref() {
                Some("succeeded") => RefundStatus::Succeeded,
                Some("failed" | "canceled") => RefundStatus::Failed,
                _ => RefundStatus::Pending,
            },
        },
        EventObject::ChargeDisputeCreated(dispute) => Incoming::Dispute {
            dispute_id: dispute.id.to_string(),
            payment_intent: dispute.payment_intent.map(|intent| intent.id().to_string()),
            amount: dispute.amount,
            currency: dispute.currency.to_string(),
        },
        _ => Incoming::Other,
    }
}
