//! Request ids: accept the caller's `X-Request-Id` (when it is a sane
//! token) or generate one; echo it in the response; run the request inside
//! a tracing span that carries it, so every log line of the request has it;
//! and write the error envelope of every non-2xx response (see
//! [`crate::error`]).

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::{ErrorBody, PendingError};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of the current request, in the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    fn from_header(value: Option<&HeaderValue>) -> Option<Self> {
        let value = value?.to_str().ok()?;
        let sane = !value.is_empty()
            && value.len() <= 128
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        sane.then(|| Self(value.to_owned()))
    }

    fn generate() -> Self {
        Self(uuid::Uuid::now_v7().simple().to_string())
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(RequestId::generate))
    }
}

/// The W3C trace context of the current request: the caller's trace (a
/// valid incoming `traceparent` header) continued with a new span id, or a
/// new trace. Written into every outbox row and signed task, so the work a
/// request causes in the worker and on the node carries the same trace id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent(pub String);

impl TraceParent {
    /// `00-{trace id}-{span id}-{flags}`, version 00 only: the caller's
    /// trace continued with a new span id.
    fn from_header(value: Option<&HeaderValue>) -> Option<Self> {
        let value = Self::valid_incoming(value)?;
        let parts: Vec<&str> = value.split('-').collect();
        Some(Self::child_of(parts[1], parts[3]))
    }

    /// The incoming header when it is a well-formed version 00 context.
    fn valid_incoming(value: Option<&HeaderValue>) -> Option<&str> {
        let value = value?.to_str().ok()?;
        let parts: Vec<&str> = value.split('-').collect();
        let hex = |part: &str, len: usize| {
            part.len() == len
                && part
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let valid = parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && parts[1].bytes().any(|b| b != b'0')
            && hex(parts[2], 16)
            && hex(parts[3], 2);
        valid.then_some(value)
    }

    fn child_of(trace_id: &str, flags: &str) -> Self {
        let span_id = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("00-{trace_id}-{}-{flags}", &span_id[..16]))
    }

    fn generate() -> Self {
        Self::child_of(&uuid::Uuid::new_v4().simple().to_string(), "01")
    }

    /// The trace id part.
    pub fn trace_id(&self) -> &str {
        self.0.split('-').nth(1).unwrap_or_default()
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for TraceParent {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<TraceParent>()
            .cloned()
            .unwrap_or_else(TraceParent::generate))
    }
}

/// The middleware; install it outermost with `axum::middleware::from_fn`.
pub async fn request_id_layer(request: Request, next: Next) -> Response {
    handle(request, next, true).await
}

/// [`request_id_layer`] for listeners whose requests are logged but not
/// exported as traces (the agent listener: every heartbeat would be a
/// trace of its own).
pub async fn untraced_request_id_layer(request: Request, next: Next) -> Response {
    handle(request, next, false).await
}

async fn handle(mut request: Request, next: Next, traced: bool) -> Response {
    let request_id = RequestId::from_header(request.headers().get(REQUEST_ID_HEADER))
        .unwrap_or_else(RequestId::generate);
    let incoming = request.headers().get("traceparent");
    macro_rules! request_span {
        ($($target:tt)*) => {
            tracing::info_span!(
                $($target)*
                "request",
                request_id = %request_id.0,
                trace_id = tracing::field::Empty,
                method = %request.method(),
                path = %request.uri().path(),
                // The semantic conventions' name when the route is not yet
                // known (the span starts before routing); `metrics` adds
                // `http.route`.
                otel.name = %request.method(),
                otel.kind = "server",
                http.route = tracing::field::Empty,
            )
        };
    }
    let span = if traced {
        request_span!()
    } else {
        request_span!(target: "keel::untraced",)
    };
    // With trace export on, the request span is the trace's position and
    // what the outbox and the tasks carry; without it, a generated id that
    // still ties the logs of all three processes together.
    if let Some(incoming) = TraceParent::valid_incoming(incoming) {
        keel_telemetry::continue_trace(&span, incoming);
    }
    let trace = keel_telemetry::traceparent(&span)
        .map(TraceParent)
        .or_else(|| TraceParent::from_header(incoming))
        .unwrap_or_else(TraceParent::generate);
    span.record("trace_id", trace.trace_id());
    request.extensions_mut().insert(request_id.clone());
    request.extensions_mut().insert(trace.clone());
    let response = async move {
        let response = next.run(request).await;
        tracing::info!(status = response.status().as_u16(), "request finished");
        response
    }
    .instrument(span)
    .await;
    let mut response = write_error_envelope(response, &request_id);
    if let Ok(value) = HeaderValue::from_str(&request_id.0) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Gives every non-2xx response the envelope: the body an [`crate::ApiError`]
/// left in the extensions, or one derived from the status for responses
/// that did not come from our code (axum's 405, for example).
fn write_error_envelope(mut response: Response, request_id: &RequestId) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let pending = match response.extensions_mut().remove::<PendingError>() {
        Some(pending) => pending,
        None => {
            let (code, message) = fallback_code(status);
            PendingError {
                code: code.to_owned(),
                message: message.to_owned(),
                fields: Vec::new(),
            }
        }
    };
    let body = ErrorBody {
        code: pending.code,
        message: pending.message,
        request_id: request_id.0.clone(),
        fields: pending.fields,
    };
    let bytes = match serde_json::to_vec(&body) {
        Ok(bytes) => bytes,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes))
}

fn fallback_code(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::BAD_REQUEST => ("bad_request", "the request is malformed"),
        StatusCode::UNAUTHORIZED => ("unauthenticated", "authentication is required"),
        StatusCode::FORBIDDEN => ("forbidden", "you may not do this"),
        StatusCode::NOT_FOUND => ("not_found", "not found"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this method is not allowed on this path",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "unsupported content type")
        }
        StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long"),
        StatusCode::SERVICE_UNAVAILABLE => (
            "unavailable",
            "the service is temporarily unavailable; retry later",
        ),
        status if status.is_server_error() => ("internal", "internal error"),
        _ => ("bad_request", "the request could not be handled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_incoming_request_id_is_kept() {
        let value = HeaderValue::from_static("abc-123_x.y");
        assert_eq!(
            RequestId::from_header(Some(&value)),
            Some(RequestId("abc-123_x.y".into()))
        );
    }

    #[test]
    fn an_incoming_trace_is_continued_with_a_new_span() {
        let incoming =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let trace = TraceParent::from_header(Some(&incoming)).unwrap();
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(trace.0.ends_with("-01"));
        assert_ne!(trace.0, incoming.to_str().unwrap());
    }

    #[test]
    fn malformed_traces_are_replaced_by_a_new_one() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-XYZ-1-01",
        ] {
            let value = HeaderValue::from_str(bad).unwrap();
            assert_eq!(TraceParent::from_header(Some(&value)), None, "{bad}");
        }
        let generated = TraceParent::generate();
        assert_eq!(generated.0.len(), 55);
        assert!(
            TraceParent::from_header(Some(&HeaderValue::from_str(&generated.0).unwrap())).is_some()
        );
    }

    #[test]
    fn an_unsafe_or_huge_request_id_is_replaced() {
        let spaces = HeaderValue::from_static("a b");
        assert_eq!(RequestId::from_header(Some(&spaces)), None);
        let huge = HeaderValue::from_str(&"a".repeat(129)).unwrap();
        assert_eq!(RequestId::from_header(Some(&huge)), None);
        assert_eq!(RequestId::from_header(None), None);
    }
}
