//! The auth domain's errors and their one mapping to HTTP.

use axum::http::StatusCode;
use keel_http::{ApiError, FieldError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication is required: {0}")]
    Unauthenticated(&'static str),
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("invalid input")]
    Validation(Vec<FieldError>),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("not allowed: {0}")]
    Forbidden(&'static str),
    #[error("the user belongs to no tenant")]
    NoTenant,
    #[error("a project with this name already exists")]
    ProjectNameTaken,
    #[error("the project still has allocations; terminate them first")]
    ProjectNotEmpty,
    #[error("the resource changed since the version given in If-Match")]
    PreconditionFailed,
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database error")]
    Db(#[from] keel_db::DbError),
    #[error("password hashing failed")]
    Hashing,
    #[error("token signing failed")]
    Signing(#[source] jsonwebtoken::errors::Error),
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unauthenticated(why) => ApiError::unauthenticated(why),
            AuthError::InvalidCredentials => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                error.to_string(),
            ),
            AuthError::EmailTaken => ApiError::conflict("email_taken", error.to_string()),
            AuthError::Validation(fields) => ApiError::validation(fields),
            AuthError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            AuthError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", error.to_string())
            }
            AuthError::NoTenant => {
                ApiError::new(StatusCode::FORBIDDEN, "no_tenant", error.to_string())
            }
            AuthError::ProjectNameTaken => {
                ApiError::conflict("project_name_taken", error.to_string())
            }
            AuthError::ProjectNotEmpty => {
                ApiError::conflict("project_not_empty", error.to_string())
            }
            AuthError::PreconditionFailed => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                error.to_string(),
            ),
            AuthError::Database(_)
            | AuthError::Db(_)
            | AuthError::Hashing
            | AuthError::Signing(_) => ApiError::internal(error),
        }
    }
}
