//! `[payments]`: which payment provider takes tenants' money.

use secrecy::SecretString;
use serde::Deserialize;

/// The largest amount one Checkout may take, in minor units (Stripe's own
/// limit for most currencies is 99,999,999).
pub const MAX_CHECKOUT_AMOUNT: i64 = 99_999_999;

/// How tenants pay. Read by the api.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentsConfig {
    /// `manual` (the default: tenants pay out of band; operators grant
    /// credit and mark invoices paid) or `stripe`.
    pub provider: ProviderKind,
    /// What the manual provider tells a tenant who wants to pay (bank
    /// details, whom to write to).
    pub manual_instructions: String,
    /// The smallest credit purchase, in minor units.
    pub min_purchase: i64,
    /// The largest credit purchase, in minor units.
    pub max_purchase: i64,
    /// Where the tenant's browser goes after paying, and after giving up.
    /// `{CHECKOUT_ID}` is replaced by the checkout's id.
    pub success_url: String,
    pub cancel_url: String,
    pub stripe: StripeConfig,
}

/// Which provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    #[default]
    Manual,
    Stripe,
}

/// Stripe's keys (both secret) and, for tests and proxies, its address.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StripeConfig {
    /// The secret API key (`sk_live_…`, `sk_test_…`, or a restricted key
    /// that may create customers and Checkout sessions).
    pub secret_key: Option<SecretString>,
    /// The webhook endpoint's signing secret (`whsec_…`).
    pub webhook_secret: Option<SecretString>,
    /// The API's base URL; Stripe's own unless set.
    pub api_base: Option<String>,
    /// How long one call to Stripe may take.
    pub timeout_secs: u32,
}

impl Default for StripeConfig {
    fn default() -> Self {
        Self {
            secret_key: None,
            webhook_secret: None,
            api_base: None,
            timeout_secs: 20,
        }
    }
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            provider: ProviderKind::Manual,
            manual_instructions: "Ask the operators of this cloud how to pay; they record \
                                  payments made by bank transfer or contract."
                .into(),
            min_purchase: 500,
            max_purchase: 1_000_000,
            success_url: "http://127.0.0.1:8080/billing?checkout={CHECKOUT_ID}".into(),
            cancel_url: "http://127.0.0.1:8080/billing".into(),
            stripe: StripeConfig::default(),
        }
    }
}

impl PaymentsConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_CHECKOUT_AMOUNT).contains(&self.min_purchase)
            || !(self.min_purchase..=MAX_CHECKOUT_AMOUNT).contains(&self.max_purchase)
        {
            return Err(format!(
                "payments.min_purchase and max_purchase must satisfy 1 <= min <= max <= {MAX_CHECKOUT_AMOUNT}"
            ));
        }
        for (key, url) in [
            ("success_url", &self.success_url),
            ("cancel_url", &self.cancel_url),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(format!("payments.{key} must be an http(s) URL"));
            }
        }
        if self.provider == ProviderKind::Stripe {
            if self.stripe.secret_key.is_none() || self.stripe.webhook_secret.is_none() {
                return Err(
                    "payments.provider = \"stripe\" needs payments.stripe.secret_key and \
                     payments.stripe.webhook_secret"
                        .into(),
                );
            }
            if self.stripe.timeout_secs == 0 {
                return Err("payments.stripe.timeout_secs must be at least 1".into());
            }
        }
        Ok(())
    }
}
