//! Billing (doc/billing.md): metering allocation run time from the outbox
//! (`meter`), billing periods (`period`), money and rounding (`money`),
//! rate cards (`rates`), invoices and their reconciliation (`invoice`), the
//! prepaid credit ledger (`ledger`), the worker's invoice runs (`runs`) and
//! the HTTP routes (`http` for tenants, `admin_http` for operators).

pub mod admin_http;
pub mod config;
pub mod error;
pub mod http;
pub mod invoice;
pub mod ledger;
pub mod meter;
pub mod money;
pub mod period;
pub mod rates;
pub mod runs;
pub mod standing;
pub mod usage;

pub use config::BillingConfig;
pub use error::BillingError;
