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
    /// How a tenant without its own setting is billed: `invoiced` (pays
    /// its invoices; never suspended for credit) or `prepaid` (usage draws
    /// on credit; the credit policy applies).
    pub default_mode: BillingMode,
    /// Low-balance events when a prepaid tenant's available credit falls
    /// below each of these (minor units).
    pub low_balance_thresholds: Vec<i64>,
    /// How long a prepaid tenant whose credit ran out is only warned
    /// before its launches stop.
    pub stop_launches_after_secs: u32,
    /// How long after its launches stopped its running allocations stop
    /// (the grace period).
    pub suspend_after_secs: u32,
    /// How often the worker checks prepaid tenants' credit.
    pub standing_interval_secs: u32,
    /// How many events the meter takes per delivery job (1 to 1000; 1:
    /// one at a time). Keep it 1 while workers older than batched delivery
    /// still run (a rolling upgrade): they would run only the first event
    /// of a batch (doc/billing.md, "In batches").
    pub meter_batch_size: u32,
}

/// How a tenant pays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BillingMode {
    /// Usage draws on prepaid credit; running out stops launches and then
    /// running allocations.
    Prepaid,
    /// Usage is invoiced after the month and paid when due.
    Invoiced,
}

impl BillingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingMode::Prepaid => "prepaid",
            BillingMode::Invoiced => "invoiced",
        }
    }
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            currency: Currency::USD,
            tax_rate_bp: 0,
            finalize_after_secs: 86_400,
            invoice_interval_secs: 300,
            default_mode: BillingMode::Invoiced,
            low_balance_thresholds: vec![1_000],
            stop_launches_after_secs: 3_600,
            suspend_after_secs: 86_400,
            standing_interval_secs: 60,
            meter_batch_size: 1000,
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
        if !(1..=1000).contains(&self.meter_batch_size) {
            return Err("billing.meter_batch_size must be between 1 and 1000".into());
        }
        if self.invoice_interval_secs == 0 || self.standing_interval_secs == 0 {
            return Err("billing's intervals must be at least 1 second".into());
        }
        if self
            .low_balance_thresholds
            .iter()
            .any(|t| !(0..=crate::money::MAX_AMOUNT).contains(t))
        {
            return Err(format!(
                "billing.low_balance_thresholds must be between 0 and {}",
                crate::money::MAX_AMOUNT
            ));
        }
        Ok(())
    }
}
