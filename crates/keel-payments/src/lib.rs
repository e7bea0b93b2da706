//! Payments (doc/payments.md): how money reaches Keel. A payment provider
//! ([`provider::PaymentProvider`]) starts payments: Stripe through a hosted
//! Checkout page ([`stripe`]), or the manual provider, whose tenants pay out
//! of band and whose operators record it (credit grants and invoices marked
//! paid, in keel-billing). Stripe tells Keel a payment or a refund happened
//! through its webhook ([`webhook`]); each event takes effect once, in the
//! credit ledger, in the transaction that records the event.

pub mod checkout;
pub mod config;
pub mod error;
pub mod http;
pub mod provider;
pub mod stripe;
pub mod webhook;

pub use config::PaymentsConfig;
pub use error::PaymentError;
pub use provider::Payments;
