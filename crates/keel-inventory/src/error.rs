//! The inventory domain's errors and their one mapping to HTTP.

use axum::http::StatusCode;
use keel_http::{ApiError, FieldError};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("invalid input")]
    Validation(Vec<FieldError>),
    #[error("the join token is unknown, used or expired")]
    InvalidJoinToken,
    #[error("the certificate signing request is unacceptable")]
    InvalidCsr(#[source] keel_pki::PkiError),
    #[error("no such host, or it is revoked")]
    HostNotFound,
    #[error("no such flavor")]
    FlavorNotFound,
    #[error("a flavor named {0:?} exists already (names are never reused)")]
    FlavorExists(String),
    #[error("a region named {0:?} exists already")]
    RegionExists(String),
    #[error("no such region")]
    UnknownRegion,
    #[error("it changed since the version in If-Match")]
    VersionMismatch,
    /// An authenticated node may not do this (agent listener only).
    #[error("{0}")]
    PeerRefused(&'static str),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database error")]
    Db(#[from] keel_db::DbError),
    #[error(transparent)]
    Auth(#[from] keel_auth::AuthError),
}

impl From<InventoryError> for ApiError {
    fn from(error: InventoryError) -> Self {
        match error {
            InventoryError::Validation(fields) => ApiError::validation(fields),
            InventoryError::InvalidJoinToken => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_join_token",
                error.to_string(),
            ),
            InventoryError::InvalidCsr(ref cause) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_csr",
                format!("the certificate signing request is unacceptable: {cause}"),
            ),
            InventoryError::PeerRefused(message) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden_peer", message)
            }
            InventoryError::HostNotFound | InventoryError::FlavorNotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", error.to_string())
            }
            InventoryError::FlavorExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "flavor_exists", error.to_string())
            }
            InventoryError::RegionExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "region_exists", error.to_string())
            }
            InventoryError::UnknownRegion => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_region",
                error.to_string(),
            ),
            InventoryError::VersionMismatch => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                error.to_string(),
            ),
            InventoryError::Auth(auth) => auth.into(),
            InventoryError::Trust(_) | InventoryError::Database(_) | InventoryError::Db(_) => {
                ApiError::internal(error)
            }
        }
    }
}
