//! Billing. This slice meters: the billing worker is a second consumer of
//! the outbox (next to provisioning, sharing nothing with it) that turns
//! allocation lifecycle events into usage records — run time per
//! allocation and flavor, cut at period boundaries ([`meter`]). Rate
//! cards, invoices and the prepaid credit ledger build on those records.

pub mod meter;
pub mod period;
