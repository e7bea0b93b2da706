//! The auth domain's errors and their one mapping to HTTP.

use axum::http::StatusCode;
use keel_http::{ApiError, FieldError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication is required: {0}")]
    Unauthenticated(&'static str),
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("the refresh token is invalid, expired or revoked; log in again")]
    RefreshTokenInvalid,
    #[error("the refresh token was already used; the session is revoked, log in again")]
    RefreshTokenReused,
    #[error("the current password is wrong")]
    WrongPassword,
    #[error("the key or API token is invalid, expired or revoked, or its account is disabled")]
    KeyInvalid,
    #[error("a {0} with this name already exists")]
    NameTaken(&'static str),
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
    #[error("the tenant must keep an owner: promote another member to owner first")]
    LastOwner,
    #[error(
        "you are the last owner of a tenant: make another member owner there before deleting your account"
    )]
    LastOwnerOfATenant,
    #[error("that user is already a member of the tenant")]
    AlreadyMember,
    #[error("an open invitation for this email exists; revoke it first")]
    InvitationPending,
    #[error("the invitation has expired; ask for a new one")]
    InvitationExpired,
    #[error("the invitation is for another email address")]
    InvitationEmailMismatch,
    #[error("a stored role is not one Keel knows")]
    CorruptRole,
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
            AuthError::RefreshTokenInvalid => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_refresh_token",
                error.to_string(),
            ),
            AuthError::RefreshTokenReused => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "refresh_token_reused",
                error.to_string(),
            ),
            AuthError::KeyInvalid => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_key", error.to_string())
            }
            AuthError::NameTaken(_) => ApiError::conflict("name_taken", error.to_string()),
            AuthError::WrongPassword => ApiError::validation(vec![keel_http::FieldError {
                field: "current_password".to_owned(),
                code: "incorrect".to_owned(),
                message: error.to_string(),
            }]),
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
            AuthError::LastOwner | AuthError::LastOwnerOfATenant => {
                ApiError::conflict("last_owner", error.to_string())
            }
            AuthError::AlreadyMember => ApiError::conflict("already_member", error.to_string()),
            AuthError::InvitationPending => {
                ApiError::conflict("invitation_pending", error.to_string())
            }
            AuthError::InvitationExpired => {
                ApiError::new(StatusCode::GONE, "invitation_expired", error.to_string())
            }
            AuthError::InvitationEmailMismatch => ApiError::new(
                StatusCode::FORBIDDEN,
                "invitation_email_mismatch",
                error.to_string(),
            ),
            AuthError::PreconditionFailed => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                error.to_string(),
            ),
            AuthError::Database(_)
            | AuthError::Db(_)
            | AuthError::Hashing
            | AuthError::CorruptRole
            | AuthError::Signing(_) => ApiError::internal(error),
        }
    }
}
