//! `[billing]`: the platform's billing currency, tax and invoice timing.

use serde::{Deserialize, Serialize};

use crate::money::Currency;

/// How Keel bills. Read by the api (prices, credit, invoices by hand) and
/// the worker (invoice runs); both must agree, so both read the same file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    /// The one currency prices, invoices and credit are in. Every rate card
    /// and credit entry must use it; changing it later does not convert
    /// what was billed.
    pub currency: Currency,
    /// Tax on invoices, in basis points of the rated usage (1 bp = 0.01 %).
    pub tax_rate_bp: i32,
    /// How long after a period ends the worker finalizes its draft
    /// invoices (late events still land on the draft until then).
    pub finalize_after_secs: u32,
    /// How often the worker looks for periods to invoice.
    pub invoice_interval_secs: u32,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            currency: Currency::USD,
            tax_rate_bp: 0,
            finalize_after_secs: 86_400,
            invoice_interval_secs: 300,
        }
    }
}

impl BillingConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(0..=10_000).contains(&self.tax_rate_bp) {
            return Err("billing.tax_rate_bp must be between 0 and 10000".into());
        }
        // Open runs are cut five minutes after a period ends; a draft is
        // not finalized before.
        let grace = crate::meter::CUT_GRACE.whole_seconds();
        if i64::from(self.finalize_after_secs) < grace {
            return Err(format!(
                "billing.finalize_after_secs must be at least {grace}"
            ));
        }
        if self.invoice_interval_secs == 0 {
            return Err("billing.invoice_interval_secs must be at least 1".into());
        }
        Ok(())
    }
}
