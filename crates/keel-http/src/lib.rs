//! HTTP plumbing every domain router shares: the one error envelope
//! ([`ApiError`]), extractors whose rejections use it ([`Json`], [`Path`],
//! [`Query`]), the request-id middleware, and the mutual-TLS server
//! ([`tls::MtlsServer`]) that the api's agent listener and the node agent
//! both serve on.
//!
//! Knows nothing about any domain: domains map their own error enums into
//! [`ApiError`] with one `From` impl each, and decide for themselves what a
//! peer certificate ([`tls::TlsPeer`]) means.

mod error;
mod extract;
pub mod metrics;
mod precondition;
mod request_id;
pub mod tls;

pub use error::{ApiError, ErrorBody, FieldError};
pub use extract::{Json, Path, Query};
pub use precondition::{IfMatch, Tagged, etag};
pub use request_id::{
    REQUEST_ID_HEADER, RequestId, TraceParent, request_id_layer, untraced_request_id_layer,
};

/// Fallback for unknown routes: a 404 in the envelope.
pub async fn route_not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "route_not_found",
        "no route matches this path",
    )
}
