//! Serving axum over mutual TLS, with the peer's certificate available to
//! handlers. Used by the api's agent-facing listener and by the node agent.
//!
//! The TLS handshake happens inside [`TlsListener::accept`], bounded by a
//! timeout, so a peer that fails the handshake (no certificate, one from
//! another CA) never reaches a handler. The peer's leaf certificate travels
//! as the connection's "address", [`TlsPeer`]; handlers read it with
//! `ConnectInfo<TlsPeer>` (serve with
//! `into_make_service_with_connect_info::<TlsPeer>()`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// How long a peer may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP listener that completes a TLS handshake before handing a
/// connection to axum.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
        }
    }
}

/// Who is on the other end of a TLS connection.
#[derive(Clone, Debug)]
pub struct TlsPeer {
    pub remote: SocketAddr,
    /// The DER of the peer's leaf certificate, verified by the server
    /// config's client verifier; `None` only for `local_addr`.
    pub certificate: Option<Arc<Vec<u8>>>,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = TlsPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, remote) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let certificate = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| Arc::new(leaf.to_vec()));
                    return (
                        tls,
                        TlsPeer {
                            remote,
                            certificate,
                        },
                    );
                }
                Ok(Err(error)) => tracing::warn!(%remote, %error, "TLS handshake refused"),
                Err(_) => tracing::warn!(%remote, "TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(TlsPeer {
            remote: self.tcp.local_addr()?,
            certificate: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for TlsPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
