//! The payments domain's errors and their one mapping to HTTP.

use axum::http::StatusCode;
use keel_billing::BillingError;
use keel_http::{ApiError, FieldError};

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("invalid input")]
    Validation(Vec<FieldError>),
    #[error("the webhook's signature is not valid: {0}")]
    InvalidSignature(&'static str),
    #[error("the webhook's body is not a Stripe event this API version reads: {0}")]
    InvalidEvent(String),
    #[error("Stripe is not this cloud's payment provider")]
    StripeNotConfigured,
    #[error("no such checkout")]
    CheckoutNotFound,
    #[error("Idempotency-Key must be 1–255 visible ASCII characters")]
    InvalidIdempotencyKey,
    #[error("this Idempotency-Key was used for another checkout")]
    IdempotencyKeyReused,
    #[error("the payment provider failed: {0}")]
    Provider(String),
    #[error("the payment provider refused the request: {0}")]
    ProviderRefused(String),
    #[error(transparent)]
    Billing(#[from] BillingError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database error")]
    Db(#[from] keel_db::DbError),
    #[error(transparent)]
    Auth(#[from] keel_auth::AuthError),
}

impl From<PaymentError> for ApiError {
    fn from(error: PaymentError) -> Self {
        match error {
            PaymentError::Validation(fields) => ApiError::validation(fields),
            PaymentError::Billing(billing) => billing.into(),
            PaymentError::Auth(auth) => auth.into(),
            PaymentError::Database(_) | PaymentError::Db(_) => ApiError::internal(error),
            PaymentError::InvalidSignature(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_signature",
                error.to_string(),
            ),
            PaymentError::InvalidIdempotencyKey => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", error.to_string())
            }
            PaymentError::IdempotencyKeyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                error.to_string(),
            ),
            PaymentError::InvalidEvent(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", error.to_string())
            }
            PaymentError::StripeNotConfigured | PaymentError::CheckoutNotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", error.to_string())
            }
            PaymentError::ProviderRefused(_) => {
                tracing::error!(%error, "the payment provider refused a request");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "payment_provider_refused",
                    "the payment provider refused the request; an operator must look at it",
                )
            }
            PaymentError::Provider(_) => {
                tracing::warn!(%error, "payment provider call failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "payment_provider_unavailable",
                    "the payment provider could not be reached or refused the request; try again",
                )
            }
        }
    }
}
