//! Mutual TLS between a worker and an agent's HTTPS endpoint, over an
//! in-memory duplex pipe.
//!
//! The agent serves its node certificate (no DNS or IP SAN, only
//! `spiffe://keel/node/{id}`) and accepts clients from the control-plane CA
//! only. The worker dials an address and authenticates the server as "the
//! node with id X, certified by the node CA" with `client_config_for_node`.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use keel_pki::{
    CaKind, CertificateAuthority, NodeServerVerifier, client_config_for_node,
    control_plane_identity, make_csr, node_identity, server_config_requiring_client_certs,
};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError};
use time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use uuid::Uuid;

/// Where the worker thinks the agent is: an address, not a name.
const AGENT_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct Fixture {
    node_ca: CertificateAuthority,
    control_plane_ca: CertificateAuthority,
    agent_id: Uuid,
    /// The agent's listener: its node certificate, clients from the
    /// control-plane CA only.
    agent_server: Arc<rustls::ServerConfig>,
    worker_cert_pem: String,
    worker_key_pem: String,
}

fn fixture() -> Fixture {
    let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
    let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
    let agent_id = Uuid::new_v4();
    let (agent_cert_pem, agent_key_pem) = node_certificate(&node_ca, agent_id);
    let agent_server = server_config_requiring_client_certs(
        &[control_plane_ca.cert_der().clone()],
        &agent_cert_pem,
        &agent_key_pem,
    )
    .unwrap();
    let (worker_cert, worker_key_pem) = control_plane_ca
        .issue_control_plane_client("worker", Duration::hours(1))
        .unwrap();
    Fixture {
        node_ca,
        control_plane_ca,
        agent_id,
        agent_server,
        worker_cert_pem: worker_cert.cert_pem,
        worker_key_pem,
    }
}

/// A node certificate and key, enrolled the way an agent does it.
fn node_certificate(node_ca: &CertificateAuthority, node_id: Uuid) -> (String, String) {
    let (csr_pem, key_pem) = make_csr("node").unwrap();
    let issued = node_ca
        .sign_node_csr(&csr_pem, node_id, Duration::hours(1))
        .unwrap();
    (issued.cert_pem, key_pem)
}

impl Fixture {
    /// The worker's config for calling the node `expected_node_id`.
    fn worker_config(&self, expected_node_id: Uuid) -> Arc<rustls::ClientConfig> {
        client_config_for_node(
            &[self.node_ca.cert_der().clone()],
            expected_node_id,
            &self.worker_cert_pem,
            &self.worker_key_pem,
        )
        .unwrap()
    }
}

/// What each side saw: the peer's leaf certificate, or the error that ended
/// the connection.
struct Outcome {
    server: Result<Vec<u8>, std::io::Error>,
    client: Result<Vec<u8>, std::io::Error>,
}

/// Runs both sides of one connection to `server_name`: the client sends
/// "ping", the server answers "pong", so each side has seen the other's
/// verdict on the handshake before it reports.
async fn connect(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = async move {
        let mut stream = TlsAcceptor::from(server_config).accept(server_io).await?;
        let mut ping = [0u8; 4];
        stream.read_exact(&mut ping).await?;
        assert_eq!(&ping, b"ping");
        stream.write_all(b"pong").await?;
        stream.flush().await?;
        Ok::<_, std::io::Error>(peer_leaf(stream.get_ref().1.peer_certificates()))
    };
    let client = async move {
        let mut stream = TlsConnector::from(client_config)
            .connect(server_name, client_io)
            .await?;
        stream.write_all(b"ping").await?;
        stream.flush().await?;
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).await?;
        assert_eq!(&pong, b"pong");
        Ok::<_, std::io::Error>(peer_leaf(stream.get_ref().1.peer_certificates()))
    };
    let (server, client) = tokio::time::timeout(StdDuration::from_secs(10), async {
        tokio::join!(server, client)
    })
    .await
    .expect("handshake hung");
    Outcome { server, client }
}

fn peer_leaf(chain: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> Vec<u8> {
    chain
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.as_ref().to_vec())
        .unwrap_or_default()
}

/// The rustls error behind an I/O error from tokio-rustls.
fn tls_error(result: &Result<Vec<u8>, std::io::Error>) -> Option<&rustls::Error> {
    result
        .as_ref()
        .err()?
        .get_ref()?
        .downcast_ref::<rustls::Error>()
}

fn agent_address() -> ServerName<'static> {
    ServerName::IpAddress(AGENT_ADDRESS.into())
}

#[tokio::test]
async fn a_worker_reaches_the_node_it_expects_by_id_not_by_address() {
    let fixture = fixture();
    let worker = fixture.worker_config(fixture.agent_id);

    let outcome = connect(
        Arc::clone(&fixture.agent_server),
        Arc::clone(&worker),
        agent_address(),
    )
    .await;
    let server_saw = outcome.server.unwrap();
    let client_saw = outcome.client.unwrap();
    assert_eq!(node_identity(&client_saw), Some(fixture.agent_id));
    assert_eq!(
        control_plane_identity(&server_saw).as_deref(),
        Some("worker")
    );

    // The name dialled plays no part: the certificate has no DNS name at
    // all, yet any name works as long as the node id matches.
    let unrelated_name = ServerName::try_from("unrelated.example").unwrap();
    let outcome = connect(fixture.agent_server, worker, unrelated_name).await;
    assert_eq!(
        node_identity(&outcome.client.unwrap()),
        Some(fixture.agent_id)
    );
    assert!(outcome.server.is_ok());
}

#[tokio::test]
async fn a_worker_refuses_a_node_other_than_the_one_it_expects() {
    let fixture = fixture();
    let worker = fixture.worker_config(Uuid::new_v4());

    let outcome = connect(fixture.agent_server, worker, agent_address()).await;
    assert_eq!(
        tls_error(&outcome.client),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName
        ))
    );
    assert_eq!(
        tls_error(&outcome.server),
        Some(&rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
        ))
    );
}

#[tokio::test]
async fn a_worker_refuses_a_server_certificate_from_the_control_plane_ca() {
    // A control-plane server certificate that even names the dialled IP: a
    // hostname check would pass it, the node verifier does not trust its root.
    let fixture = fixture();
    let (api_cert, api_key) = fixture
        .control_plane_ca
        .issue_server("api", &[], &[AGENT_ADDRESS], Duration::hours(1))
        .unwrap();
    let impostor_server = server_config_requiring_client_certs(
        &[fixture.control_plane_ca.cert_der().clone()],
        &api_cert.cert_pem,
        &api_key,
    )
    .unwrap();
    let worker = fixture.worker_config(fixture.agent_id);

    let outcome = connect(impostor_server, worker, agent_address()).await;
    assert_eq!(
        tls_error(&outcome.client),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
    assert_eq!(
        tls_error(&outcome.server),
        Some(&rustls::Error::AlertReceived(AlertDescription::UnknownCA))
    );
}

#[tokio::test]
async fn a_worker_refuses_the_expected_node_id_minted_by_a_foreign_node_ca() {
    // Right identity, wrong issuer: another "Keel node CA" is not ours.
    let fixture = fixture();
    let rogue_node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
    let (forged_cert, forged_key) = node_certificate(&rogue_node_ca, fixture.agent_id);
    let impostor_server = server_config_requiring_client_certs(
        &[fixture.control_plane_ca.cert_der().clone()],
        &forged_cert,
        &forged_key,
    )
    .unwrap();
    let worker = fixture.worker_config(fixture.agent_id);

    let outcome = connect(impostor_server, worker, agent_address()).await;
    // The rogue CA has the same subject as ours, so webpki pairs the leaf
    // with our root by name and then finds that our key did not sign it.
    assert_eq!(
        tls_error(&outcome.client),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::BadSignature
        ))
    );
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn an_agent_refuses_a_client_presenting_a_node_certificate() {
    // Another node calling the agent as if it were a worker: its certificate
    // is valid, but from the node CA, which the agent's listener does not
    // trust for clients.
    let fixture = fixture();
    let (other_node_cert, other_node_key) = node_certificate(&fixture.node_ca, Uuid::new_v4());
    let other_node = client_config_for_node(
        &[fixture.node_ca.cert_der().clone()],
        fixture.agent_id,
        &other_node_cert,
        &other_node_key,
    )
    .unwrap();

    let outcome = connect(fixture.agent_server, other_node, agent_address()).await;
    assert_eq!(
        tls_error(&outcome.server),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
    assert_eq!(
        tls_error(&outcome.client),
        Some(&rustls::Error::AlertReceived(AlertDescription::UnknownCA))
    );
}

#[tokio::test]
async fn an_agent_refuses_a_client_without_a_certificate() {
    let fixture = fixture();
    let verifier =
        NodeServerVerifier::new(&[fixture.node_ca.cert_der().clone()], fixture.agent_id).unwrap();
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier))
    .with_no_client_auth();

    let outcome = connect(fixture.agent_server, Arc::new(anonymous), agent_address()).await;
    assert_eq!(
        tls_error(&outcome.server),
        Some(&rustls::Error::NoCertificatesPresented)
    );
    assert_eq!(
        tls_error(&outcome.client),
        Some(&rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
        ))
    );
}
