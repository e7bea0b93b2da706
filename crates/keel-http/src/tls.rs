//! Serving an axum router over mutual TLS, with the peer's certificate
//! available to every request. The one TLS server of the code base: the
//! api's agent-facing listener and the node agent's task endpoint both run
//! on [`MtlsServer`].
//!
//! TLS is terminated here rather than by `axum::serve` so that the peer
//! certificate can be read the moment the handshake completes:
//!
//! 1. The TLS configuration decides who may connect; with a client verifier
//!    that requires a certificate from a given CA, a client with no
//!    certificate, or one from any other CA, never completes a handshake and
//!    never reaches a handler.
//! 2. The remote address and the peer's leaf certificate are attached to
//!    every request of the connection as a [`TlsPeer`] extension. Handlers
//!    take [`TlsPeer`] as an extractor (which refuses with 403
//!    `forbidden_peer` when it is missing) or read it from the request's
//!    extensions in a middleware. What the certificate means (which node,
//!    which control-plane component) is for the router to decide.
//!
//! Handshakes run in each connection's own task with a timeout, so one slow
//! or hostile client cannot hold up the accept loop; the number of open
//! connections is capped, and a client gets a limited time to send the
//! headers of each request. On shutdown the server stops accepting, asks
//! every open connection to finish its current request, and gives them a few
//! seconds before dropping them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tower::ServiceExt as _;

use crate::ApiError;

/// How long a client gets to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client gets to send the headers of a request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections may be open at once. The peers of both servers are
/// few (the control plane's worker; the nodes of one api), so this is a
/// guard against exhaustion, not a tuning knob.
const MAX_CONNECTIONS: usize = 128;

/// How long open connections get to finish when the server shuts down.
const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(5);

/// Who is on the other end of a mutual-TLS connection: a request extension
/// that [`MtlsServer`] attaches to every request.
#[derive(Clone, Debug)]
pub struct TlsPeer {
    /// The peer's TCP address.
    pub remote: SocketAddr,
    /// The DER of the peer's leaf certificate, verified by the server
    /// config's client verifier; `None` only when the config lets clients
    /// connect without a certificate and this one presented none.
    pub certificate: Option<Arc<Vec<u8>>>,
}

/// Refuses with 403 `forbidden_peer` a request that did not come through
/// [`MtlsServer`], so a route mounted on the wrong listener fails closed.
impl<S> FromRequestParts<S> for TlsPeer
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Self>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_peer",
                "this endpoint is served only over mutual TLS",
            )
        })
    }
}

/// A bound, not yet serving, mutual-TLS HTTP/1 server.
pub struct MtlsServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
}

impl std::fmt::Debug for MtlsServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MtlsServer")
            .field("local_addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl MtlsServer {
    /// Binds `address` (port 0 picks a free port) to serve `app` over TLS
    /// with `tls_config`.
    pub async fn bind(
        address: SocketAddr,
        tls_config: Arc<ServerConfig>,
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
        let local_addr = listener.local_addr().ok();
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
        tracing::info!(?local_addr, "mutual-TLS server stopped");
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

        let peer = TlsPeer {
            remote,
            certificate: tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[_]>::first)
                .map(|leaf| Arc::new(leaf.to_vec())),
        };
        tracing::debug!(
            %remote,
            client_certificate = peer.certificate.is_some(),
            "TLS connection established"
        );
        let app = self.app;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(peer.clone());
            app.clone().oneshot(request)
        });

        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(tls_stream), service)
            // WebSockets (the agent's terminal endpoint) upgrade the
            // connection; the upgraded stream then lives on its own.
            .with_upgrades();
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use http_body_util::BodyExt as _;

    use super::*;

    fn app() -> Router {
        Router::new()
            .route(
                "/peer",
                get(|peer: TlsPeer| async move { peer.remote.to_string() }),
            )
            .layer(axum::middleware::from_fn(crate::request_id_layer))
    }

    #[tokio::test]
    async fn a_request_without_a_tls_peer_is_forbidden() {
        let response = app()
            .oneshot(Request::get("/peer").body(Body::empty()).unwrap())
            .await
            .unwrap();

        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "forbidden_peer");
    }

    #[tokio::test]
    async fn handlers_receive_the_tls_peer_of_the_request() {
        let mut request = Request::get("/peer").body(Body::empty()).unwrap();
        let remote: SocketAddr = "192.0.2.7:4433".parse().unwrap();
        request.extensions_mut().insert(TlsPeer {
            remote,
            certificate: Some(Arc::new(vec![0x30])),
        });

        let response = app().oneshot(request).await.unwrap();

        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.as_ref(), remote.to_string().as_bytes());
    }
}
