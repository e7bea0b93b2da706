//! Optimistic concurrency over HTTP: every mutable resource answers with an
//! `ETag` carrying its `version`; an update may send it back in `If-Match`
//! and gets `412 precondition_failed` if the resource changed since.

use axum::extract::FromRequestParts;
use axum::http::header::{ETAG, IF_MATCH};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};

use crate::ApiError;

/// The `ETag` header value for a resource version: `"3"`.
pub fn etag(version: i64) -> (axum::http::HeaderName, HeaderValue) {
    let value = HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or(HeaderValue::from_static("\"0\""));
    (ETAG, value)
}

/// A JSON response carrying the resource's version as its `ETag`: what
/// every read and write of a mutable resource answers with.
#[derive(Clone, Debug)]
pub struct Tagged<T>(pub i64, pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Tagged<T> {
    fn into_response(self) -> axum::response::Response {
        ([etag(self.0)], axum::Json(self.1)).into_response()
    }
}

/// The version an update expects, from `If-Match` (`"3"` or `W/"3"`);
/// `None` when the header is absent or `*`. A malformed value is a 400
/// `invalid_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfMatch(pub Option<i64>);

impl IfMatch {
    fn parse(value: &str) -> Option<Option<i64>> {
        let value = value.trim();
        if value == "*" {
            return Some(None);
        }
        let quoted = value.strip_prefix("W/").unwrap_or(value);
        let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
        inner
            .parse::<i64>()
            .ok()
            .filter(|version| *version > 0)
            .map(Some)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(IF_MATCH) else {
            return Ok(Self(None));
        };
        value
            .to_str()
            .ok()
            .and_then(Self::parse)
            .map(Self)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_header",
                    "If-Match must be an ETag this API returned, e.g. \"3\"",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strong_weak_and_star_etags_parse() {
        assert_eq!(IfMatch::parse("\"3\""), Some(Some(3)));
        assert_eq!(IfMatch::parse("W/\"12\""), Some(Some(12)));
        assert_eq!(IfMatch::parse("*"), Some(None));
    }

    #[test]
    fn malformed_etags_are_refused() {
        for bad in ["3", "\"x\"", "\"-1\"", "\"\"", "W/3"] {
            assert_eq!(IfMatch::parse(bad), None, "{bad}");
        }
    }
}
