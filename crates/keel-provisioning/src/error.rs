//! The provisioning domain's errors and their one mapping to HTTP.

use axum::http::StatusCode;
use keel_http::{ApiError, FieldError};

use crate::AllocationState;

#[derive(Debug, thiserror::Error)]
pub enum ProvisioningError {
    #[error("invalid input")]
    Validation(Vec<FieldError>),
    #[error("flavor `{0}` does not exist")]
    UnknownFlavor(String),
    #[error("region `{0}` does not exist")]
    UnknownRegion(String),
    #[error("no host in region `{region}` can run flavor `{flavor}`, even empty")]
    FlavorUnavailable { flavor: String, region: String },
    #[error("allocation not found")]
    NotFound,
    #[error("{0}")]
    QuotaExceeded(crate::quota::Exceeded),
    #[error(
        "the allocation's host is being drained: nothing starts there again; terminate it and launch a new one"
    )]
    HostDraining,
    /// The tenant's prepaid credit ran out (billing's launch hold).
    #[error("the tenant's prepaid credit has run out: {0}; add credit to launch or start again")]
    LaunchesHeld(String),
    #[error("an allocation that is {from} cannot be {action}")]
    InvalidTransition {
        from: AllocationState,
        action: &'static str,
    },
    #[error("the allocation is {0}: only a running allocation has a terminal")]
    NotRunning(AllocationState),
    #[error("{0}")]
    TerminalUnavailable(&'static str),
    #[error("this is a WebSocket endpoint: send a WebSocket upgrade request")]
    WebSocketRequired,
    #[error("the allocation changed since the version given in If-Match")]
    PreconditionFailed,
    #[error(transparent)]
    Auth(#[from] keel_auth::AuthError),
    #[error(transparent)]
    Inventory(#[from] keel_inventory::InventoryError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database error")]
    Db(#[from] keel_db::DbError),
}

impl From<ProvisioningError> for ApiError {
    fn from(error: ProvisioningError) -> Self {
        match error {
            ProvisioningError::Validation(fields) => ApiError::validation(fields),
            ProvisioningError::UnknownFlavor(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_flavor",
                error.to_string(),
            ),
            ProvisioningError::UnknownRegion(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_region",
                error.to_string(),
            ),
            ProvisioningError::FlavorUnavailable { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "flavor_unavailable",
                error.to_string(),
            ),
            ProvisioningError::NotFound => ApiError::not_found(error.to_string()),
            ProvisioningError::QuotaExceeded(_) => {
                ApiError::conflict("quota_exceeded", error.to_string())
            }
            ProvisioningError::HostDraining => {
                ApiError::conflict("host_draining", error.to_string())
            }
            ProvisioningError::LaunchesHeld(_) => ApiError::new(
                axum::http::StatusCode::PAYMENT_REQUIRED,
                "credit_exhausted",
                error.to_string(),
            ),
            ProvisioningError::InvalidTransition { .. } => {
                ApiError::conflict("invalid_state_transition", error.to_string())
            }
            ProvisioningError::NotRunning(_) => {
                ApiError::conflict("allocation_not_running", error.to_string())
            }
            ProvisioningError::TerminalUnavailable(_) => {
                ApiError::conflict("terminal_unavailable", error.to_string())
            }
            ProvisioningError::WebSocketRequired => ApiError::new(
                StatusCode::BAD_REQUEST,
                "websocket_required",
                error.to_string(),
            ),
            ProvisioningError::PreconditionFailed => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                error.to_string(),
            ),
            ProvisioningError::Auth(auth) => auth.into(),
            ProvisioningError::Inventory(inventory) => inventory.into(),
            ProvisioningError::Database(_) | ProvisioningError::Db(_) => ApiError::internal(error),
        }
    }
}
