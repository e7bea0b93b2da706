//! The agent's HTTPS endpoint: a mutual-TLS accept loop and the task routes.
//!
//! TLS is terminated here rather than by a generic server so that the peer
//! certificate can be read the moment the handshake completes:
//!
//! 1. The TLS configuration (from [`crate::state::AgentState::server_tls_config`])
//!    requires a client certificate chaining to the control-plane CA, so a
//!    client with no certificate, or one from any other CA (including the node
//!    CA), never completes a handshake.
//! 2. The control-plane identity in the peer certificate is attached to every
//!    request of the connection as a [`PeerIdentity`] extension.
//! 3. [`router`] refuses, with 403 `forbidden_peer`, every request whose peer
//!    is not the `worker` component, before any route runs. A request that
//!    somehow arrives without a [`PeerIdentity`] is refused the same way.
//!
//! Handshakes run in each connection's own task with a timeout, so one slow
//! or hostile client cannot hold up the accept loop, and the number of
//! connections is capped. On shutdown the loop stops accepting, asks every
//! open connection to finish its current request, and gives them a few
//! seconds before dropping them.
//!
//! Error bodies are JSON `{"code", "message"}`, like the api's.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use keel_task::MAX_ENVELOPE_BYTES;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tracing::Instrument as _;

use crate::tasks::{TaskInbox, TaskInboxError};

/// The control-plane component allowed to send tasks.
pub const WORKER_COMPONENT: &str = "worker";

/// The path tasks are posted to.
pub const TASKS_PATH: &str = "/v1/tasks";

/// How long a client gets to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client gets to send the headers of a request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections may be open at once; the control plane needs a few.
const MAX_CONNECTIONS: usize = 128;

/// How long open connections get to finish when the agent shuts down.
const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(5);

/// Who is on the other end of a connection, as proven by its certificate.
///
/// Both namespaces are read so that the accept loop can serve any mutual-TLS
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
    /// Reads the identity from the certificate chain the peer presented.
    pub fn from_peer_certificates(
        certificates: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> Self {
        let leaf = certificates.and_then(<[_]>::first);
        Self {
            control_plane_component: leaf
                .and_then(|leaf| keel_pki::control_plane_identity(leaf.as_ref())),
            node_id: leaf.and_then(|leaf| keel_pki::node_identity(leaf.as_ref())),
        }
    }

    /// Whether the peer is the control plane's worker.
    pub fn is_worker(&self) -> bool {
        self.control_plane_component.as_deref() == Some(WORKER_COMPONENT)
    }
}

/// The agent's routes, guarded by the worker-only check.
pub fn router(inbox: Arc<TaskInbox>) -> Router {
    Router::new()
        .route(TASKS_PATH, post(receive_task))
        .layer(DefaultBodyLimit::max(MAX_ENVELOPE_BYTES))
        .fallback(not_found)
        // Outermost, so that it also covers the fallback: a peer that is not
        // the worker learns nothing, not even which paths exist.
        .layer(middleware::from_fn(require_worker_peer))
        .with_state(inbox)
}

/// A JSON error response `{"code", "message"}`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "code": code, "message": message })),
    )
        .into_response()
}

async fn require_worker_peer(request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<PeerIdentity>();
    if peer.is_some_and(PeerIdentity::is_worker) {
        return next.run(request).await;
    }
    tracing::warn!(
        peer = ?peer.and_then(|peer| peer.control_plane_component.as_deref()),
        path = request.uri().path(),
        "refused a request from a peer that is not the worker"
    );
    error_response(
        StatusCode::FORBIDDEN,
        "forbidden_peer",
        "only the control plane's worker may call the agent",
    )
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn receive_task(
    State(inbox): State<Arc<TaskInbox>>,
    Extension(peer): Extension<PeerIdentity>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let envelope_bytes = match body {
        Ok(bytes) => bytes,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            tracing::warn!(reason = "too_large", "task rejected before verification");
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

    let span = tracing::info_span!(
        "task",
        peer = peer.control_plane_component.as_deref().unwrap_or_default()
    );
    let now_unix = OffsetDateTime::now_utc().unix_timestamp();
    match inbox
        .receive(&envelope_bytes, now_unix)
        .instrument(span)
        .await
    {
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
        Err(TaskInboxError::Ledger(_)) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ledger_unavailable",
            "the task could not be recorded durably, so it was not acted on",
        ),
    }
}

/// A bound, not yet serving, mutual-TLS HTTP server.
pub struct AgentServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
}

impl std::fmt::Debug for AgentServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AgentServer")
            .field("local_addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AgentServer {
    /// Binds `address` (port 0 picks a free port) to serve `app` over TLS
    /// with `tls_config`.
    pub async fn bind(
        address: SocketAddr,
        tls_config: Arc<rustls::ServerConfig>,
        app: Router,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(address).await?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls_config),
            app,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains open connections.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            acceptor,
            app,
        } = self;
        let mut shutdown = std::pin::pin!(shutdown);
        let (stop_connections, connections_should_stop) = watch::channel(false);
        let connection_slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();

        loop {
            let slot = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                slot = Arc::clone(&connection_slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_closed) => break,
                },
            };
            let (tcp, remote) = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Typically out of file descriptors; pausing briefly
                        // avoids spinning on the same error.
                        tracing::warn!(%error, "could not accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let connection = Connection {
                acceptor: acceptor.clone(),
                app: app.clone(),
                should_stop: connections_should_stop.clone(),
                remote,
            };
            connections.spawn(async move {
                connection.serve(tcp).await;
                drop(slot);
            });
            // Collect finished connections so the set does not grow forever.
            while connections.try_join_next().is_some() {}
        }

        drop(listener);
        stop_connections.send_replace(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE_PERIOD, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = connections.len(),
                "connections still open after the grace period; closing them"
            );
            connections.shutdown().await;
        }
        tracing::info!("agent server stopped");
    }
}

/// One accepted TCP connection on its way to becoming an HTTP connection.
struct Connection {
    acceptor: TlsAcceptor,
    app: Router,
    should_stop: watch::Receiver<bool>,
    remote: SocketAddr,
}

impl Connection {
    async fn serve(mut self, tcp: TcpStream) {
        let remote = self.remote;
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp));
        let tls_stream = tokio::select! {
            handshake = handshake => match handshake {
                Ok(Ok(tls_stream)) => tls_stream,
                Ok(Err(error)) => {
                    tracing::info!(%remote, %error, "TLS handshake refused");
                    return;
                }
                Err(_elapsed) => {
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            },
            _ = self.should_stop.wait_for(|stop| *stop) => return,
        };

        let peer = PeerIdentity::from_peer_certificates(tls_stream.get_ref().1.peer_certificates());
        tracing::debug!(%remote, ?peer, "TLS connection established");
        let app = self.app;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(peer.clone());
            app.clone().oneshot(request)
        });

        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(tls_stream), service);
        let mut connection = std::pin::pin!(connection);
        let finished = tokio::select! {
            result = connection.as_mut() => Some(result),
            _ = self.should_stop.wait_for(|stop| *stop) => None,
        };
        let result = match finished {
            Some(result) => result,
            None => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            tracing::debug!(%remote, %error, "connection ended with an error");
        }
    }
}
