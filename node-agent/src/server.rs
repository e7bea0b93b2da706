//! The agent's HTTPS endpoint: the task routes and who may call them.
//!
//! The routes are served by [`keel_http::tls::MtlsServer`], the same
//! mutual-TLS server as the api's agent listener (handshake timeouts, the
//! connection cap, the header-read timeout and the graceful drain live
//! there). This module owns what the peer certificate means to the agent:
//!
//! 1. The TLS configuration (from [`crate::state::AgentState::server_tls_config`])
//!    requires a client certificate chaining to the control-plane CA, so a
//!    client with no certificate, or one from any other CA (including the node
//!    CA), never completes a handshake.
//! 2. The server attaches the peer's leaf certificate to every request as a
//!    [`TlsPeer`] extension; [`router`]'s guard reads the identity in it as a
//!    [`PeerIdentity`] and refuses, with 403 `forbidden_peer`, every request
//!    whose peer is not the `worker` component, before any route runs. A
//!    request that somehow arrives without a [`TlsPeer`] is refused the same
//!    way. The guard passes the [`PeerIdentity`] on to the routes as a
//!    request extension.
//!
//! Error bodies are JSON `{"code", "message"}`, like the api's.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel_http::tls::TlsPeer;
use keel_task::MAX_ENVELOPE_BYTES;
use time::OffsetDateTime;

use crate::tasks::{TaskInbox, TaskInboxError};
use crate::terminal::{TERMINAL_PATH, TerminalGate, open_terminal};

/// The control-plane component allowed to send tasks.
pub const WORKER_COMPONENT: &str = "worker";
/// The control-plane component that may open terminal sessions.
pub const API_COMPONENT: &str = "api";

/// The path tasks are posted to.
pub const TASKS_PATH: &str = "/v1/tasks";

/// Who is on the other end of a connection, as proven by its certificate.
///
/// Both namespaces are read so that the same reading serves any mutual-TLS
/// router (tests use it for a stand-in control plane that receives reports
/// from nodes); which one counts is up to the router. At most one of the two
/// is ever set, because an identity certificate has exactly one URI SAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The control-plane component named by the peer certificate, if it
    /// names one in canonical form.
    pub control_plane_component: Option<String>,
    /// The node named by the peer certificate, if it names one.
    pub node_id: Option<uuid::Uuid>,
}

impl PeerIdentity {
    /// Reads the identity from the DER of the peer's leaf certificate, if
    /// it presented one.
    pub fn from_leaf_certificate(leaf: Option<&[u8]>) -> Self {
        Self {
            control_plane_component: leaf.and_then(keel_pki::control_plane_identity),
            node_id: leaf.and_then(keel_pki::node_identity),
        }
    }

    /// Reads the identity of the peer that [`keel_http::tls::MtlsServer`]
    /// attached to a request.
    pub fn from_tls_peer(peer: &TlsPeer) -> Self {
        Self::from_leaf_certificate(peer.certificate.as_deref().map(Vec::as_slice))
    }

    /// Whether the peer is the control plane's worker.
    pub fn is_worker(&self) -> bool {
        self.control_plane_component.as_deref() == Some(WORKER_COMPONENT)
    }

    /// Whether the peer is the control plane's api (terminal sessions).
    pub fn is_api(&self) -> bool {
        self.control_plane_component.as_deref() == Some(API_COMPONENT)
    }
}

/// The agent's routes, guarded by the peer check: tasks from the worker,
/// terminal sessions ([`crate::terminal`]) from the api.
pub fn router(inbox: Arc<TaskInbox>) -> Router {
    let terminal = Router::new()
        .route(TERMINAL_PATH, get(open_terminal))
        .with_state(TerminalGate::new(Arc::clone(&inbox)));
    Router::new()
        .route(TASKS_PATH, post(receive_task))
        .layer(DefaultBodyLimit::max(MAX_ENVELOPE_BYTES))
        .with_state(inbox)
        .merge(terminal)
        .fallback(not_found)
        // Outermost, so that it also covers the fallback: a peer that is not
        // the control plane learns nothing, not even which paths exist.
        .layer(middleware::from_fn(require_control_plane_peer))
}

/// A JSON error response `{"code", "message"}`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "code": code, "message": message })),
    )
        .into_response()
}

/// Lets a request through only when the [`TlsPeer`] the server attached to
/// it is the control-plane component the path is for (the api for
/// terminals, the worker for everything else), and hands the routes its
/// [`PeerIdentity`].
async fn require_control_plane_peer(mut request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<TlsPeer>()
        .map(PeerIdentity::from_tls_peer);
    let terminal = request.uri().path() == TERMINAL_PATH;
    match peer {
        Some(peer) if (terminal && peer.is_api()) || (!terminal && peer.is_worker()) => {
            request.extensions_mut().insert(peer);
            next.run(request).await
        }
        peer => {
            tracing::warn!(
                peer = ?peer.as_ref().and_then(|peer| peer.control_plane_component.as_deref()),
                path = request.uri().path(),
                "refused a request from a peer that may not call this path"
            );
            error_response(
                StatusCode::FORBIDDEN,
                "forbidden_peer",
                if terminal {
                    "only the control plane's api may open terminals"
                } else {
                    "only the control plane's worker may call the agent"
                },
            )
        }
    }
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn receive_task(
    State(inbox): State<Arc<TaskInbox>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let envelope_bytes = match body {
        Ok(bytes) => bytes,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            tracing::warn!(reason = "too_large", "task rejected before verification");
            crate::metrics::count_task("too_large");
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("a task envelope may be at most {MAX_ENVELOPE_BYTES} bytes"),
            );
        }
        Err(rejection) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &rejection.body_text(),
            );
        }
    };

    // No span here: the task's span starts once it is verified, as a child
    // of the trace it carries (`TaskInbox::receive`).
    let now_unix = OffsetDateTime::now_utc().unix_timestamp();
    let outcome = inbox.receive(&envelope_bytes, now_unix).await;
    crate::metrics::count_task(match &outcome {
        Ok(_) => "accepted",
        Err(TaskInboxError::Rejected(rejection)) => rejection.reason(),
        Err(TaskInboxError::WrongTenant { .. }) => "wrong_tenant",
        Err(TaskInboxError::NotATask) => "not_a_task",
        Err(TaskInboxError::Ledger(_)) => "ledger_unavailable",
    });
    match outcome {
        Ok(payload) => (
            StatusCode::OK,
            Json(serde_json::json!({ "task_id": payload.task_id, "status": "accepted" })),
        )
            .into_response(),
        Err(TaskInboxError::Rejected(rejection)) => error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            rejection.reason(),
            &rejection.to_string(),
        ),
        Err(error @ TaskInboxError::WrongTenant { .. }) => error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_tenant",
            &error.to_string(),
        ),
        Err(error @ TaskInboxError::NotATask) => error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_a_task",
            &error.to_string(),
        ),
        Err(TaskInboxError::Ledger(_)) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ledger_unavailable",
            "the task could not be recorded durably, so it was not acted on",
        ),
    }
}
