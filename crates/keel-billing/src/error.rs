//! The billing domain's errors and their one mapping to HTTP.

use axum::http::StatusCode;
use keel_http::{ApiError, FieldError};

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("invalid input")]
    Validation(Vec<FieldError>),
    #[error("no such flavor")]
    UnknownFlavor,
    #[error("no such region")]
    UnknownRegion,
    #[error("no such tenant")]
    UnknownTenant,
    #[error("the currency is {given}, but Keel bills in {billing}")]
    CurrencyMismatch { given: String, billing: String },
    #[error("the rate card would overlap another card of this flavor and region")]
    RateCardOverlap,
    #[error("a price takes effect now or later, never in the past")]
    EffectiveFromInPast,
    #[error("no such invoice")]
    InvoiceNotFound,
    #[error("the period has not ended yet")]
    PeriodNotEnded,
    #[error("an earlier invoice of this tenant is still a draft; finalize it first")]
    EarlierInvoiceOpen,
    #[error("{0}")]
    InvoiceState(&'static str),
    #[error("the reference {0:?} was used for another payment or grant")]
    ReferenceUsed(String),
    #[error("an amount does not fit (a price or quantity far out of range)")]
    Overflow,
    #[error("it changed since the version in If-Match")]
    VersionMismatch,
    #[error("a period that has not begun has no usage")]
    PeriodInFuture,
    #[error("writing the export failed: {0}")]
    Export(String),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database error")]
    Db(#[from] keel_db::DbError),
    #[error(transparent)]
    Auth(#[from] keel_auth::AuthError),
}

impl From<BillingError> for ApiError {
    fn from(error: BillingError) -> Self {
        match error {
            BillingError::Validation(fields) => ApiError::validation(fields),
            BillingError::Auth(auth) => auth.into(),
            BillingError::Database(_) | BillingError::Db(_) | BillingError::Export(_) => {
                ApiError::internal(error)
            }
            other => ApiError::new(other.status(), other.code(), other.to_string()),
        }
    }
}

impl BillingError {
    fn status(&self) -> StatusCode {
        match self {
            BillingError::InvoiceNotFound | BillingError::UnknownTenant => StatusCode::NOT_FOUND,
            BillingError::Validation(_)
            | BillingError::UnknownFlavor
            | BillingError::UnknownRegion
            | BillingError::CurrencyMismatch { .. }
            | BillingError::EffectiveFromInPast
            | BillingError::PeriodNotEnded
            | BillingError::PeriodInFuture
            | BillingError::Overflow => StatusCode::UNPROCESSABLE_ENTITY,
            BillingError::RateCardOverlap
            | BillingError::EarlierInvoiceOpen
            | BillingError::InvoiceState(_)
            | BillingError::ReferenceUsed(_) => StatusCode::CONFLICT,
            BillingError::VersionMismatch => StatusCode::PRECONDITION_FAILED,
            BillingError::Database(_)
            | BillingError::Db(_)
            | BillingError::Auth(_)
            | BillingError::Export(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The envelope's `code` (doc/errors.md).
    fn code(&self) -> &'static str {
        match self {
            BillingError::Validation(_) => "validation_failed",
            BillingError::UnknownFlavor => "unknown_flavor",
            BillingError::UnknownRegion => "unknown_region",
            BillingError::UnknownTenant | BillingError::InvoiceNotFound => "not_found",
            BillingError::CurrencyMismatch { .. } => "currency_mismatch",
            BillingError::RateCardOverlap => "rate_card_overlap",
            BillingError::EffectiveFromInPast => "effective_from_in_past",
            BillingError::PeriodNotEnded => "period_not_ended",
            BillingError::PeriodInFuture => "period_in_future",
            BillingError::EarlierInvoiceOpen => "earlier_invoice_open",
            BillingError::InvoiceState(_) => "invoice_state",
            BillingError::ReferenceUsed(_) => "reference_used",
            BillingError::Overflow => "amount_out_of_range",
            BillingError::VersionMismatch => "precondition_failed",
            BillingError::Database(_)
            | BillingError::Db(_)
            | BillingError::Auth(_)
            | BillingError::Export(_) => "internal",
        }
    }
}
