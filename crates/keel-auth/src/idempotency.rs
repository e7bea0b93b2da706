//! `Idempotency-Key` on authenticated POSTs, with Stripe's semantics:
//!
//! - the same key with the same request (method, path, body) replays the
//!   first response: status, `ETag`/`Location`/`Content-Type` and body byte
//!   for byte, marked `Idempotent-Replayed: true`;
//! - the same key with another request is `422 idempotency_key_reused`;
//! - a second request with a key whose first request is still running is
//!   `409 idempotency_key_in_use` (an advisory lock on the key, tried, never
//!   waited for);
//! - keys belong to the principal that sent them (and its tenant): two
//!   callers never see each other's; a person's API token does not share
//!   their sessions' keys, and a replay re-checks that the credential is
//!   still live;
//! - a response that carries a secret shown once is not stored: its replay
//!   is `409 idempotency_response_withheld` (the request did succeed);
//! - keys are kept for `idempotency_retention` (at least 24 hours), then
//!   [`purge`]d by the worker.
//!
//! The key row, the change and the stored response commit in ONE
//! transaction (see [`keel_db::DeferredCommit`]): after a crash a retry
//! finds either all of them or none, never a change without its key.
//! Only a response whose handler committed is stored; a request that failed
//! before changing anything can be retried with the same key.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRef, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keel_db::{Db, DbError, DeferredCommit, DeferredOutcome};
use keel_http::ApiError;
use sha2::{Digest, Sha256};
use time::Duration;

use crate::TokenKeys;
use crate::context::authenticate;

pub const HEADER: &str = "idempotency-key";
const REPLAYED: &str = "idempotent-replayed";
/// The largest request body hashed (the same limit as the JSON extractor).
const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;
/// The largest response stored for replay.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Response headers stored and replayed besides the body.
const KEPT_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::ETAG, header::LOCATION];
/// The shortest retention allowed.
pub const MIN_RETENTION: Duration = Duration::hours(24);

/// Put in a response's extensions by handlers whose body carries a secret
/// shown once (API tokens, service-account keys, invitation tokens): the
/// layer keeps the key and status but never the body, and answers a replay
/// with `409 idempotency_response_withheld`.
#[derive(Clone, Copy, Debug)]
pub struct ShownOnce;

const SHOWN_ONCE_HEADER: &str = "keel-shown-once";

/// Routes the layer leaves alone: they take no `Ctx` transaction (login,
/// refresh, token exchange, registration), or hand out tokens that use up
/// the one presented (tenant switch), or commit through a second
/// transaction (invitation acceptance), or through a system transaction of
/// their own (account deletion), or are the operators' (no tenant), or
/// call a payment provider with no transaction open and are idempotent by
/// ids derived from the key (checkouts, keel-payments).
fn exempt(path: &str) -> bool {
    matches!(
        path,
        "/v1/billing/checkouts"
            | "/v1/auth/login"
            | "/v1/auth/register"
            | "/v1/auth/refresh"
            | "/v1/auth/switch"
            | "/v1/auth/token"
            | "/v1/invitations/accept"
            | "/v1/auth/delete-account"
    ) || path.starts_with("/v1/admin/")
}

/// Whether `key` is an `Idempotency-Key` this API takes: 1–255 visible
/// ASCII characters (also for the routes the layer leaves to their domain).
pub fn valid_key(key: &str) -> bool {
    (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// What makes two requests "the same": method, path with query, the
/// `If-Match` precondition (a retry with another one is another request)
/// and the body.
fn request_hash(method: &Method, path: &str, if_match: &[u8], body: &[u8]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(method.as_str().as_bytes());
    hasher.update(b" ");
    hasher.update(path.as_bytes());
    hasher.update(b"\nif-match: ");
    hasher.update(if_match);
    hasher.update(b"\n");
    hasher.update(body);
    hasher.finalize().to_vec()
}

#[derive(sqlx::FromRow)]
struct Stored {
    request_hash: Vec<u8>,
    status_code: Option<i16>,
    response_headers: Option<serde_json::Value>,
    response_body: Option<Vec<u8>>,
}

fn replay(stored: Stored) -> Response {
    let shown_once = stored
        .response_headers
        .as_ref()
        .is_some_and(|headers| headers.get(SHOWN_ONCE_HEADER).is_some());
    if shown_once {
        return ApiError::conflict(
            "idempotency_response_withheld",
            "the request with this Idempotency-Key succeeded; its response held a secret that is shown only once",
        )
        .into_response();
    }
    let status = stored
        .status_code
        .and_then(|code| u16::try_from(code).ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    let mut headers = HeaderMap::new();
    if let Some(serde_json::Value::Object(map)) = stored.response_headers {
        for (name, value) in map {
            if let (Ok(name), Some(Ok(value))) = (
                HeaderName::try_from(name.as_str()),
                value.as_str().map(HeaderValue::from_str),
            ) {
                headers.insert(name, value);
            }
        }
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    (
        status,
        headers,
        Body::from(stored.response_body.unwrap_or_default()),
    )
        .into_response()
}

fn database_error(error: impl Into<DbError>) -> Response {
    ApiError::internal(error.into()).into_response()
}

/// The middleware. Requests that are not POSTs, carry no key, or carry no
/// valid bearer token pass straight through (the handler answers the
/// latter with 401).
pub async fn layer<S>(State(state): State<S>, request: Request, next: Next) -> Response
where
    S: Send + Sync,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    if request.method() != Method::POST || exempt(request.uri().path()) {
        return next.run(request).await;
    }
    let Some(raw_key) = request.headers().get(HEADER) else {
        return next.run(request).await;
    };
    let key = match raw_key.to_str() {
        Ok(key) if valid_key(key) => key.to_owned(),
        _ => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
            .into_response();
        }
    };
    let (mut parts, body) = request.into_parts();
    let keys = Arc::<TokenKeys>::from_ref(&state);
    let Ok((principal, meta)) = authenticate(&mut parts, &keys) else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let bytes = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is too large",
            )
            .into_response();
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    let if_match = parts
        .headers
        .get(header::IF_MATCH)
        .map_or(&[][..], |value| value.as_bytes());
    let hash = request_hash(&parts.method, &path, if_match, &bytes);
    let label = principal.idempotency_scope();

    let db = Db::from_ref(&state);
    let mut tx = match db.begin_tenant(meta, principal.scope()).await {
        Ok(tx) => tx,
        Err(error) => return database_error(error),
    };
    // Held until this transaction ends: a concurrent duplicate is refused
    // at once rather than queued.
    let locked: Result<bool, sqlx::Error> =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("idempotency|{}|{label}|{key}", principal.tenant_id))
            .fetch_one(tx.conn())
            .await;
    match locked {
        Ok(true) => {
            // A stored response is replayed only to a caller whose
            // credential is still live (not logged out, revoked, removed).
            if let Err(error) = crate::authz::ensure_live(tx.conn(), &principal).await {
                let _ = tx.rollback().await;
                return ApiError::from(error).into_response();
            }
        }
        Ok(false) => {
            let _ = tx.rollback().await;
            return ApiError::conflict(
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still being processed; retry later",
            )
            .into_response();
        }
        Err(error) => return database_error(error),
    }
    let stored: Result<Option<Stored>, sqlx::Error> = sqlx::query_as(
        "SELECT request_hash, status_code, response_headers, response_body FROM idempotency_keys
         WHERE tenant_id = $1 AND principal = $2 AND key = $3",
    )
    .bind(principal.tenant_id)
    .bind(&label)
    .bind(&key)
    .fetch_optional(tx.conn())
    .await;
    // Early answers roll back at once, releasing the key's lock before the
    // client can send its next request.
    match stored {
        Ok(Some(stored)) if stored.request_hash != hash => {
            let _ = tx.rollback().await;
            return ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request",
            )
            .into_response();
        }
        Ok(Some(stored)) => {
            let _ = tx.rollback().await;
            return replay(stored);
        }
        Ok(None) => {}
        Err(error) => return database_error(error),
    }
    if let Err(error) = sqlx::query(
        "INSERT INTO idempotency_keys (tenant_id, principal, key, request_hash) VALUES ($1, $2, $3, $4)",
    )
    .bind(principal.tenant_id)
    .bind(&label)
    .bind(&key)
    .bind(&hash)
    .execute(tx.conn())
    .await
    {
        return database_error(error);
    }

    let deferred = DeferredCommit::new(tx);
    parts.extensions.insert(deferred.clone());
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let mut parked = match deferred.finish() {
        DeferredOutcome::Committed(tx) => tx,
        DeferredOutcome::Unused(tx) => {
            // Nothing committed: the key is not kept, a retry runs afresh.
            let _ = tx.rollback().await;
            return response;
        }
        DeferredOutcome::Gone => return response,
    };
    let (response_parts, body) = response.into_parts();
    let body: Bytes = match axum::body::to_bytes(body, MAX_RESPONSE_BYTES).await {
        Ok(body) => body,
        Err(error) => return ApiError::internal(error).into_response(),
    };
    let shown_once = response_parts.extensions.get::<ShownOnce>().is_some();
    let stored_update = if response_parts.status.is_success() {
        let mut headers: serde_json::Map<String, serde_json::Value> = KEPT_HEADERS
            .iter()
            .filter_map(|name| {
                let value = response_parts.headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_owned(), value.into()))
            })
            .collect();
        if shown_once {
            headers.insert(SHOWN_ONCE_HEADER.to_owned(), "true".into());
        }
        sqlx::query(
            "UPDATE idempotency_keys SET status_code = $4, response_headers = $5, response_body = $6
             WHERE tenant_id = $1 AND principal = $2 AND key = $3",
        )
        .bind(principal.tenant_id)
        .bind(&label)
        .bind(&key)
        .bind(i16::try_from(response_parts.status.as_u16()).unwrap_or(500))
        .bind(serde_json::Value::Object(headers))
        // A secret shown once is never written down.
        .bind((!shown_once).then_some(body.as_ref()))
        .execute(&mut *parked)
        .await
    } else {
        // A handler that committed and still failed: keep the change, not
        // the key (error bodies are written by the outer layer).
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND principal = $2 AND key = $3",
        )
        .bind(principal.tenant_id)
        .bind(&label)
        .bind(&key)
        .execute(&mut *parked)
        .await
    };
    if let Err(error) = stored_update {
        return database_error(error);
    }
    if let Err(error) = parked.commit().await {
        // Nothing landed, neither the change nor the key.
        return database_error(error);
    }
    Response::from_parts(response_parts, Body::from(body))
}

/// The `[idempotency]` configuration section.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a key is kept, in hours (at least 24; less counts as 24).
    pub retention_hours: u32,
    /// How often the worker purges expired keys, in seconds.
    pub purge_interval_secs: u32,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            retention_hours: 24,
            purge_interval_secs: 600,
        }
    }
}

impl IdempotencyConfig {
    pub fn retention(&self) -> Duration {
        Duration::hours(i64::from(self.retention_hours)).max(MIN_RETENTION)
    }
}

/// Deletes keys older than `retention` (never less than 24 hours). Run
/// periodically by the worker; returns how many were deleted.
pub async fn purge(db: &Db, retention: Duration) -> Result<u64, DbError> {
    let retention = retention.max(MIN_RETENTION);
    let mut tx = db.begin_bookkeeping().await?;
    let deleted = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.as_seconds_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert!(valid_key("a"));
        assert!(valid_key(&"k".repeat(255)));
        assert!(!valid_key(""));
        assert!(!valid_key(&"k".repeat(256)));
        assert!(!valid_key("with space"));
        assert!(!valid_key("ünïcode"));
    }

    #[test]
    fn the_request_hash_covers_method_path_and_body() {
        let base = request_hash(&Method::POST, "/v1/projects", b"", b"{}");
        assert_ne!(
            base,
            request_hash(&Method::POST, "/v1/projectz", b"", b"{}")
        );
        assert_ne!(
            base,
            request_hash(&Method::POST, "/v1/projects", b"", b"{ }")
        );
        assert_ne!(base, request_hash(&Method::PUT, "/v1/projects", b"", b"{}"));
        assert_ne!(
            base,
            request_hash(&Method::POST, "/v1/projects", b"\"2\"", b"{}")
        );
        assert_eq!(
            base,
            request_hash(&Method::POST, "/v1/projects", b"", b"{}")
        );
    }
}
