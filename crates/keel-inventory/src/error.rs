//! The inventory domain's errors and their one mapping to HTTP.

use keel_http::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
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
            InventoryError::Auth(auth) => auth.into(),
            InventoryError::Database(_) | InventoryError::Db(_) => ApiError::internal(error),
        }
    }
}
