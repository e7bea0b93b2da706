//! The request context: who is calling, and the door to their tenant's
//! transaction.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use keel_core::Actor;
use keel_core::ids::{
    ApiTokenId, ServiceAccountId, ServiceAccountKeyId, SessionId, TenantId, UserId,
};
use keel_db::{Db, DeferredCommit, RequestMeta, Scope, WriteTx};
use keel_http::{ApiError, RequestId, TraceParent};

use crate::{AuthError, TokenKeys};

/// Who is behind an access token, and the credential it came from (which
/// every authorised request checks is still live).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A user signed in interactively.
    User {
        user_id: UserId,
        session_id: SessionId,
    },
    /// A user through one of their personal API tokens.
    ApiToken {
        user_id: UserId,
        token_id: ApiTokenId,
    },
    /// A project's service account through one of its keys.
    ServiceAccount {
        service_account_id: ServiceAccountId,
        key_id: ServiceAccountKeyId,
    },
}

/// A verified caller acting in one tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub caller: Caller,
}

/// A user signed in interactively: the only caller that manages their own
/// sessions and password, memberships and tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserSession {
    pub user_id: UserId,
    pub session_id: SessionId,
}

/// Extracted by every authenticated handler: a missing or bad bearer token
/// is a 401 before the handler runs.
pub struct Ctx {
    pub principal: Principal,
    pub meta: RequestMeta,
    db: Db,
    /// The transaction the idempotency layer opened for this request.
    deferred: Option<DeferredCommit>,
}

impl Ctx {
    /// A transaction in the caller's tenant; row-level security applies.
    /// Under an `Idempotency-Key`, the first call returns the transaction
    /// that already holds the key (see `crate::idempotency`).
    pub async fn begin(&self) -> Result<WriteTx, keel_db::DbError> {
        if let Some(tx) = self.deferred.as_ref().and_then(DeferredCommit::take) {
            return Ok(tx);
        }
        self.db
            .begin_tenant(self.meta.clone(), self.principal.scope())
            .await
    }
}

/// Metadata for requests that have no principal yet (register, login,
/// enrolment).
pub fn anonymous_meta(request_id: &RequestId, trace: &TraceParent) -> RequestMeta {
    RequestMeta {
        request_id: request_id.0.clone(),
        actor: Actor::Anonymous,
        traceparent: Some(trace.0.clone()),
    }
}

/// The WebSocket subprotocol prefix that carries a bearer token:
/// `keel.bearer.<access token>`. A browser's `WebSocket` cannot set an
/// `Authorization` header, but it can offer subprotocols (Kubernetes' api
/// server takes its tokens the same way).
pub const WEBSOCKET_BEARER_PROTOCOL: &str = "keel.bearer.";

/// Middleware for WebSocket handshakes from browsers: a `GET` with
/// `Upgrade: websocket` and no `Authorization` header that offers the
/// subprotocol `keel.bearer.<token>` is handled as
/// `Authorization: Bearer <token>`. Every `keel.bearer.` entry is taken out
/// of the offered subprotocols (whatever else the request carries), so a
/// handler can never select one and echo it back. Runs before everything
/// that reads the credential (rate limits, idempotency, [`Ctx`]); any other
/// request is left alone.
pub async fn websocket_bearer_layer(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::header::{SEC_WEBSOCKET_PROTOCOL, UPGRADE};
    use axum::http::{HeaderValue, Method};

    let headers = request.headers();
    let upgrade = request.method() == Method::GET
        && headers
            .get(UPGRADE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    if !upgrade || !headers.contains_key(SEC_WEBSOCKET_PROTOCOL) {
        return next.run(request).await;
    }
    let mut tokens = Vec::new();
    let mut others = Vec::new();
    for line in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        // A line that is not text offers nothing we can read or keep.
        let Ok(line) = line.to_str() else { continue };
        for protocol in line.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match protocol.strip_prefix(WEBSOCKET_BEARER_PROTOCOL) {
                Some(token) => tokens.push(token.to_owned()),
                None => others.push(protocol.to_owned()),
            }
        }
    }
    let authorization = match tokens.first() {
        Some(token) if !headers.contains_key(AUTHORIZATION) => {
            // A token that is no header value is no token: the request
            // goes on without one and is refused as unauthenticated.
            HeaderValue::from_str(&format!("Bearer {token}")).ok()
        }
        _ => None,
    };
    let others = HeaderValue::from_str(&others.join(", ")).ok();
    let headers = request.headers_mut();
    headers.remove(SEC_WEBSOCKET_PROTOCOL);
    if let Some(others) = others.filter(|others| !others.is_empty()) {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, others);
    }
    if let Some(authorization) = authorization {
        headers.insert(AUTHORIZATION, authorization);
    }
    next.run(request).await
}

pub(crate) fn bearer(parts: &Parts) -> Result<&str, AuthError> {
    let value = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or(AuthError::Unauthenticated(
            "missing `Authorization: Bearer` header",
        ))?;
    let value = value
        .to_str()
        .map_err(|_| AuthError::Unauthenticated("malformed Authorization header"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(AuthError::Unauthenticated(
            "expected `Authorization: Bearer <token>`",
        )),
    }
}

impl<S> FromRequestParts<S> for Ctx
where
    S: Send + Sync,
    Db: FromRef<S>,
    Arc<TokenKeys>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let keys = Arc::<TokenKeys>::from_ref(state);
        let (principal, meta) = authenticate(parts, &keys)?;
        tracing::Span::current().record("principal", principal.label());
        Ok(Ctx {
            meta,
            principal,
            db: Db::from_ref(state),
            deferred: parts.extensions.get::<DeferredCommit>().cloned(),
        })
    }
}

/// The first layer to verify a request's token leaves its principal here,
/// so the token is checked once per request, not once per layer.
#[derive(Clone, Copy)]
struct Verified(Principal);

/// Verifies the bearer token of a request and builds the metadata its
/// changes carry. Shared by [`Ctx`], the rate limits and the idempotency
/// layer; the first of them to call it verifies, the others reuse that.
pub fn authenticate(
    parts: &mut Parts,
    keys: &TokenKeys,
) -> Result<(Principal, RequestMeta), AuthError> {
    let principal = match parts.extensions.get::<Verified>() {
        Some(Verified(principal)) => *principal,
        None => {
            let verified = keys.verify(bearer(parts)?)?;
            let principal = Principal {
                tenant_id: verified.tenant_id,
                caller: verified.caller,
            };
            parts.extensions.insert(Verified(principal));
            principal
        }
    };
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default();
    let meta = RequestMeta {
        request_id,
        actor: principal.actor(),
        traceparent: parts
            .extensions
            .get::<TraceParent>()
            .map(|trace| trace.0.clone()),
    };
    Ok((principal, meta))
}

impl Principal {
    /// The user behind the caller, if any (service accounts have none).
    pub fn user_id(&self) -> Option<UserId> {
        match self.caller {
            Caller::User { user_id, .. } | Caller::ApiToken { user_id, .. } => Some(user_id),
            Caller::ServiceAccount { .. } => None,
        }
    }

    /// The interactive session, or 403 for tokens and service accounts.
    pub fn user_session(&self) -> Result<UserSession, AuthError> {
        match self.caller {
            Caller::User {
                user_id,
                session_id,
            } => Ok(UserSession {
                user_id,
                session_id,
            }),
            Caller::ApiToken { .. } | Caller::ServiceAccount { .. } => Err(AuthError::Forbidden(
                "only a signed-in user can do this, not an API token or service account",
            )),
        }
    }

    /// How idempotency keys, rate limits and logs name this principal.
    /// A user's tokens and sessions share one name: they are one person.
    pub fn label(&self) -> String {
        self.actor().label()
    }

    /// The scope of this caller's idempotency keys: a person's sessions
    /// share one (a retry after a token refresh still replays), each API
    /// token and each service account has its own, so a narrower credential
    /// can never replay what a wider one did.
    pub fn idempotency_scope(&self) -> String {
        match self.caller {
            Caller::User { user_id, .. } => format!("user:{user_id}"),
            Caller::ApiToken { token_id, .. } => format!("api_token:{token_id}"),
            Caller::ServiceAccount {
                service_account_id, ..
            } => format!("service_account:{service_account_id}"),
        }
    }

    /// Who audit rows name.
    pub fn actor(&self) -> Actor {
        match self.caller {
            Caller::User { user_id, .. } | Caller::ApiToken { user_id, .. } => Actor::User {
                user_id,
                tenant_id: self.tenant_id,
            },
            Caller::ServiceAccount {
                service_account_id, ..
            } => Actor::ServiceAccount {
                service_account_id,
                tenant_id: self.tenant_id,
            },
        }
    }

    /// The transaction scope of this principal's requests.
    pub fn scope(&self) -> Scope {
        Scope::Tenant {
            tenant_id: self.tenant_id,
            user_id: self.user_id(),
        }
    }
}
