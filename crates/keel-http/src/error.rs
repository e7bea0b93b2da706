//! The error envelope. Every non-2xx response of the api has this body:
//!
//! ```json
//! {"code": "validation_failed", "message": "…", "request_id": "…",
//!  "fields": [{"field": "email", "code": "invalid", "message": "…"}]}
//! ```
//!
//! `code` is stable and documented in `doc/errors.md`; `message` is for
//! people and may change. [`ApiError::into_response`] cannot know the
//! request id, so it stores the body in the response's extensions and the
//! request-id middleware writes it out; the middleware also turns any
//! other non-2xx response (axum's own 405, a panic guard, …) into the
//! envelope, so no response escapes it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's name in the request body, e.g. `email`.
    pub field: String,
    /// A stable machine code, e.g. `required`, `too_short`, `invalid`.
    pub code: String,
    pub message: String,
}

/// The body of every error response.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code; see doc/errors.md.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// The request's `X-Request-Id`; quote it when asking for help.
    pub request_id: String,
    /// Per-field problems, for `validation_failed`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

/// An error an HTTP handler returns. Domains convert their own errors into
/// this type in exactly one `From` impl each; that is where a status code
/// is chosen.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub fields: Vec<FieldError>,
    /// The cause of a 5xx, logged once and never shown to clients.
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            fields: Vec::new(),
            source: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 422 with per-field errors.
    pub fn validation(fields: Vec<FieldError>) -> Self {
        Self {
            fields,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "the request has invalid fields",
            )
        }
    }

    /// A 500 whose cause is logged but never shown.
    pub fn internal(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            source: Some(Box::new(source)),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }

    /// A 503 for a dependency that is down (e.g. the database).
    pub fn unavailable(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            source: Some(Box::new(source)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the service is temporarily unavailable; retry later",
            )
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

/// The envelope without its request id, carried from `into_response` to the
/// middleware in the response's extensions.
#[derive(Clone, Debug)]
pub(crate) struct PendingError {
    pub code: String,
    pub message: String,
    pub fields: Vec<FieldError>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            // Logged once, inside the request span (so with its request id).
            match &self.source {
                Some(source) => {
                    tracing::error!(code = self.code, error = %ErrorChain(source.as_ref()), "request failed")
                }
                None => {
                    tracing::error!(code = self.code, message = %self.message, "request failed")
                }
            }
        }
        let mut response = self.status.into_response();
        response.extensions_mut().insert(PendingError {
            code: self.code.to_owned(),
            message: self.message,
            fields: self.fields,
        });
        response
    }
}

/// Displays an error with all its causes: `a: b: c`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
