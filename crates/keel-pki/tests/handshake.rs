//! Mutual TLS handshakes between an agent-facing listener and its clients,
//! over an in-memory duplex pipe.
//!
//! The listener trusts the node CA only. An agent with a node certificate
//! gets in; a worker whose certificate comes from the control-plane CA (a
//! root we also operate) is refused.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use keel_pki::{
    CaKind, CertificateAuthority, certs_from_pem, client_config, make_csr, node_identity,
    server_config_requiring_client_certs,
};
use rustls::pki_types::ServerName;
use time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use uuid::Uuid;

const API_HOST: &str = "api.keel.internal";

struct Fixture {
    node_ca: CertificateAuthority,
    control_plane_ca: CertificateAuthority,
    server_config: Arc<rustls::ServerConfig>,
}

/// Both CAs, and the api's agent-facing listener: a server certificate from
/// the control-plane CA, client certificates accepted from the node CA only.
fn fixture() -> Fixture {
    let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
    let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
    let (server_cert, server_key) = control_plane_ca
        .issue_server(
            "api",
            &[API_HOST.to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Duration::hours(1),
        )
        .unwrap();
    let server_config = server_config_requiring_client_certs(
        &[node_ca.cert_der().clone()],
        &server_cert.cert_pem,
        &server_key,
    )
    .unwrap();
    Fixture {
        node_ca,
        control_plane_ca,
        server_config,
    }
}

/// Runs both sides of one handshake; the client then sends "ping" and the
/// server reads it. Returns the server's view: the client's leaf
/// certificate, or the error that ended the connection.
async fn connect(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> Result<Vec<u8>, std::io::Error> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = async move {
        let mut stream = TlsAcceptor::from(server_config).accept(server_io).await?;
        let mut ping = [0u8; 4];
        stream.read_exact(&mut ping).await?;
        assert_eq!(&ping, b"ping");
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.as_ref().to_vec())
            .unwrap_or_default();
        Ok::<_, std::io::Error>(peer)
    };
    let client = async move {
        let server_name = ServerName::try_from(API_HOST).unwrap();
        let mut stream = TlsConnector::from(client_config)
            .connect(server_name, client_io)
            .await?;
        stream.write_all(b"ping").await?;
        stream.flush().await?;
        Ok::<_, std::io::Error>(stream)
    };
    let (server_result, _client_result) = tokio::time::timeout(StdDuration::from_secs(10), async {
        tokio::join!(server, client)
    })
    .await
    .expect("handshake hung");
    server_result
}

/// The rustls error behind an I/O error from tokio-rustls.
fn tls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

#[tokio::test]
async fn a_node_certificate_is_accepted_by_a_listener_that_trusts_the_node_ca() {
    let fixture = fixture();
    let node_id = Uuid::new_v4();
    let (csr_pem, node_key) = make_csr("node-a").unwrap();
    let node_cert = fixture
        .node_ca
        .sign_node_csr(&csr_pem, node_id, Duration::hours(1))
        .unwrap();
    let agent_config = client_config(
        &certs_from_pem(fixture.control_plane_ca.cert_pem()).unwrap(),
        &node_cert.cert_pem,
        &node_key,
    )
    .unwrap();

    let peer = connect(fixture.server_config, agent_config).await.unwrap();
    assert_eq!(node_identity(&peer), Some(node_id));
}

#[tokio::test]
async fn a_control_plane_certificate_is_refused_by_a_listener_that_trusts_the_node_ca() {
    let fixture = fixture();
    let (worker_cert, worker_key) = fixture
        .control_plane_ca
        .issue_control_plane_client("worker", Duration::hours(1))
        .unwrap();
    let worker_config = client_config(
        &[fixture.control_plane_ca.cert_der().clone()],
        &worker_cert.cert_pem,
        &worker_key,
    )
    .unwrap();

    let refused = connect(fixture.server_config, worker_config).await;
    let error = refused.expect_err("the listener accepted a certificate from the wrong root");
    assert_eq!(
        tls_error(&error),
        Some(&rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        ))
    );
}

#[tokio::test]
async fn an_agent_refuses_a_server_that_does_not_chain_to_the_control_plane_ca() {
    // An attacker holding a valid node certificate (which has serverAuth)
    // poses as the api: the agent trusts the control-plane CA only.
    let fixture = fixture();
    let (csr_pem, node_key) = make_csr("node-a").unwrap();
    let node_cert = fixture
        .node_ca
        .sign_node_csr(&csr_pem, Uuid::new_v4(), Duration::hours(1))
        .unwrap();
    let (imposter_csr, imposter_key) = make_csr("imposter").unwrap();
    let imposter_cert = fixture
        .node_ca
        .sign_node_csr(&imposter_csr, Uuid::new_v4(), Duration::hours(1))
        .unwrap();
    let imposter_server = server_config_requiring_client_certs(
        &[fixture.node_ca.cert_der().clone()],
        &imposter_cert.cert_pem,
        &imposter_key,
    )
    .unwrap();
    let agent_config = client_config(
        &[fixture.control_plane_ca.cert_der().clone()],
        &node_cert.cert_pem,
        &node_key,
    )
    .unwrap();

    let error = connect(imposter_server, agent_config)
        .await
        .expect_err("the agent accepted a server from the wrong root");
    // The agent aborted with "unknown CA" before checking any name.
    assert_eq!(
        tls_error(&error),
        Some(&rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA
        ))
    );
}

#[tokio::test]
async fn a_hot_identity_is_presented_anew_after_it_is_replaced_without_rebuilding_configs() {
    let fixture = fixture();
    let node_id = Uuid::new_v4();
    let issue = || {
        let (csr, key) = make_csr("node").unwrap();
        let cert = fixture
            .node_ca
            .sign_node_csr(&csr, node_id, Duration::hours(1))
            .unwrap();
        (cert.cert_pem, key)
    };
    let (first_cert, first_key) = issue();
    let identity = keel_pki::HotIdentity::from_pem(&first_cert, &first_key).unwrap();
    // The node's client config is built once, as the agent does.
    let client = keel_pki::client_config_with_hot_identity(
        &[fixture.control_plane_ca.cert_der().clone()],
        Arc::clone(&identity),
    )
    .unwrap();
    let seen = connect(fixture.server_config.clone(), client.clone())
        .await
        .unwrap();
    assert_eq!(seen, certs_from_pem(&first_cert).unwrap()[0].as_ref());

    let (second_cert, second_key) = issue();
    identity.replace(&second_cert, &second_key).unwrap();
    let seen = connect(fixture.server_config.clone(), client.clone())
        .await
        .unwrap();
    assert_eq!(seen, certs_from_pem(&second_cert).unwrap()[0].as_ref());

    // A key that does not belong to the certificate is refused and the
    // current identity stays.
    assert!(identity.replace(&first_cert, &second_key).is_err());
    let seen = connect(fixture.server_config.clone(), client)
        .await
        .unwrap();
    assert_eq!(seen, certs_from_pem(&second_cert).unwrap()[0].as_ref());
}
