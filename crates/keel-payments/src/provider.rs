//! The payment-provider trait, the manual provider, and the state the
//! payment routes share.

use std::sync::Arc;

use futures::future::BoxFuture;
use keel_billing::money::Currency;
use keel_core::ids::{CheckoutId, InvoiceId, TenantId};
use time::OffsetDateTime;

use crate::PaymentError;
use crate::config::{PaymentsConfig, ProviderKind};
use crate::stripe::StripeProvider;

/// What a tenant pays for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Prepaid credit.
    Credit,
    /// One finalized invoice.
    Invoice(InvoiceId),
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Credit => "credit",
            Purpose::Invoice(_) => "invoice",
        }
    }
}

/// A payment to start, its amount fixed by Keel.
#[derive(Clone, Debug)]
pub struct CheckoutRequest {
    pub checkout_id: CheckoutId,
    pub tenant_id: TenantId,
    /// The tenant's customer at the provider, if the provider keeps them.
    pub customer: Option<String>,
    pub purpose: Purpose,
    pub amount: i64,
    pub currency: Currency,
    /// What the tenant sees it pays for.
    pub description: String,
    pub success_url: String,
    pub cancel_url: String,
}

/// How the tenant goes on to pay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Started {
    /// A page the provider hosts (Stripe Checkout); the provider tells
    /// Keel when it is paid.
    Hosted {
        session_id: String,
        url: Option<String>,
        expires_at: OffsetDateTime,
    },
    /// Out of band, as the instructions say; an operator records it.
    OutOfBand { instructions: String },
}

/// A way for tenants to pay. Stripe and the manual provider implement it;
/// whatever a provider reports paid is recorded through keel-billing's
/// ledger (purchases, invoice payments, refunds) — the same entries an
/// operator's grant or "mark paid" writes for the manual provider.
pub trait PaymentProvider: Send + Sync + 'static {
    /// `stripe` or `manual`.
    fn name(&self) -> &'static str;

    /// Creates the tenant's customer at the provider (`None`: the provider
    /// keeps no customers). The call's idempotency key is the tenant's id.
    fn create_customer(
        &self,
        tenant_id: TenantId,
        tenant_name: String,
    ) -> BoxFuture<'_, Result<Option<String>, PaymentError>>;

    /// Starts a payment. The call's idempotency key is the checkout's id.
    fn start_checkout(
        &self,
        request: CheckoutRequest,
    ) -> BoxFuture<'_, Result<Started, PaymentError>>;
}

/// Tenants pay out of band: the provider only says how.
#[derive(Clone, Debug)]
pub struct ManualProvider {
    instructions: String,
}

impl ManualProvider {
    pub fn new(instructions: impl Into<String>) -> Self {
        Self {
            instructions: instructions.into(),
        }
    }
}

impl PaymentProvider for ManualProvider {
    fn name(&self) -> &'static str {
        "manual"
    }

    fn create_customer(
        &self,
        _tenant_id: TenantId,
        _tenant_name: String,
    ) -> BoxFuture<'_, Result<Option<String>, PaymentError>> {
        Box::pin(async { Ok(None) })
    }

    fn start_checkout(
        &self,
        _request: CheckoutRequest,
    ) -> BoxFuture<'_, Result<Started, PaymentError>> {
        Box::pin(async move {
            Ok(Started::OutOfBand {
                instructions: self.instructions.clone(),
            })
        })
    }
}

/// The state of the payment routes: the configured provider, and Stripe's
/// webhook verifier when Stripe is it.
#[derive(Clone)]
pub struct Payments {
    pub config: Arc<PaymentsConfig>,
    pub provider: Arc<dyn PaymentProvider>,
    pub stripe: Option<Arc<StripeProvider>>,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments")
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

impl Payments {
    /// The provider `config` names, its client built (no call is made).
    pub fn from_config(config: &PaymentsConfig) -> Result<Self, PaymentError> {
        config.validate().map_err(PaymentError::Provider)?;
        let (provider, stripe): (Arc<dyn PaymentProvider>, _) = match config.provider {
            ProviderKind::Manual => (
                Arc::new(ManualProvider::new(config.manual_instructions.clone())),
                None,
            ),
            ProviderKind::Stripe => {
                let stripe = Arc::new(StripeProvider::new(&config.stripe)?);
                (stripe.clone(), Some(stripe))
            }
        };
        Ok(Self {
            config: Arc::new(config.clone()),
            provider,
            stripe,
        })
    }
}
