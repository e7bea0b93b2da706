//! Authenticating an agent's TLS endpoint by node id rather than by hostname.
//!
//! Node certificates name the node only by the URI SAN
//! `spiffe://keel/node/{uuid}`: they carry no DNS name or IP address, because
//! the address a worker dials (`https://10.0.3.7:7443`, a NAT address, a
//! tunnel) says nothing trustworthy about which node answers. The question a
//! worker has to answer is "is this the node I meant, as certified by the
//! node CA?", and [`NodeServerVerifier`] answers exactly that:
//!
//! 1. the chain must verify against the node CA roots it was given, for
//!    serverAuth, at the current time (webpki, as rustls does it);
//! 2. the server name the connection was opened with is ignored;
//! 3. the end-entity certificate's node identity must be the expected node
//!    id, otherwise the handshake fails with
//!    [`CertificateError::NotValidForName`].
//!
//! Handshake signatures are checked with the ring provider's algorithms.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use uuid::Uuid;

use crate::error::PkiError;
use crate::identity::node_identity;
use crate::tls::{ring_provider, root_store};

/// A rustls server-certificate verifier that accepts one node: a chain to
/// the node CA (serverAuth, currently valid) whose leaf names
/// `spiffe://keel/node/{expected_node_id}`. The server name is not checked.
///
/// No revocation checking is done here: node certificates are short-lived.
#[derive(Debug)]
pub struct NodeServerVerifier {
    roots: Arc<RootCertStore>,
    expected_node_id: Uuid,
    supported: WebPkiSupportedAlgorithms,
}

impl NodeServerVerifier {
    /// A verifier trusting only `node_ca_roots` (at least one) and accepting
    /// only the node `expected_node_id`, with the ring provider's signature
    /// algorithms.
    pub fn new(
        node_ca_roots: &[CertificateDer<'_>],
        expected_node_id: Uuid,
    ) -> Result<Self, PkiError> {
        Self::with_provider(node_ca_roots, expected_node_id, &ring_provider())
    }

    pub(crate) fn with_provider(
        node_ca_roots: &[CertificateDer<'_>],
        expected_node_id: Uuid,
        provider: &CryptoProvider,
    ) -> Result<Self, PkiError> {
        Ok(Self {
            roots: Arc::new(root_store(node_ca_roots)?),
            expected_node_id,
            supported: provider.signature_verification_algorithms,
        })
    }

    /// The node this verifier accepts.
    pub fn expected_node_id(&self) -> Uuid {
        self.expected_node_id
    }
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The chain first: the identity is only meaningful once the node CA
        // vouches for it.
        let certificate = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &certificate,
            &self.roots,
            intermediates,
            now,
            self.supported.all,
        )?;
        // Deliberately no `verify_server_name`: the node id is the name.
        if node_identity(end_entity.as_ref()) != Some(self.expected_node_id) {
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.supported)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.supported)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.supported.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration as StdDuration;

    use time::Duration;

    use super::*;
    use crate::ca::{CaKind, CertificateAuthority};
    use crate::csr::make_csr;
    use crate::tls::certs_from_pem;

    fn node_cert(node_ca: &CertificateAuthority, node_id: Uuid) -> CertificateDer<'static> {
        let (csr_pem, _key) = make_csr("node-a").unwrap();
        let issued = node_ca
            .sign_node_csr(&csr_pem, node_id, Duration::hours(1))
            .unwrap();
        certs_from_pem(&issued.cert_pem).unwrap().remove(0)
    }

    fn verify(
        verifier: &NodeServerVerifier,
        leaf: &CertificateDer<'_>,
        server_name: &str,
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let server_name = ServerName::try_from(server_name).unwrap();
        verifier.verify_server_cert(leaf, &[], &server_name, &[], now)
    }

    #[test]
    fn the_expected_node_is_accepted_whatever_the_server_name() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let node_id = Uuid::new_v4();
        let leaf = node_cert(&node_ca, node_id);
        let verifier = NodeServerVerifier::new(&[node_ca.cert_der().clone()], node_id).unwrap();
        assert_eq!(verifier.expected_node_id(), node_id);
        for server_name in ["127.0.0.1", "::1", "agent.example", "not-this-node.invalid"] {
            assert!(verify(&verifier, &leaf, server_name, UnixTime::now()).is_ok());
        }
    }

    #[test]
    fn another_node_is_not_valid_for_the_name() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let leaf = node_cert(&node_ca, Uuid::new_v4());
        let verifier =
            NodeServerVerifier::new(&[node_ca.cert_der().clone()], Uuid::new_v4()).unwrap();
        assert_eq!(
            verify(&verifier, &leaf, "127.0.0.1", UnixTime::now()).unwrap_err(),
            Error::InvalidCertificate(CertificateError::NotValidForName)
        );
    }

    #[test]
    fn a_certificate_outside_its_validity_is_refused() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let node_id = Uuid::new_v4();
        let leaf = node_cert(&node_ca, node_id);
        let verifier = NodeServerVerifier::new(&[node_ca.cert_der().clone()], node_id).unwrap();
        let now = UnixTime::now().as_secs();
        let later = UnixTime::since_unix_epoch(StdDuration::from_secs(now + 2 * 3600));
        assert!(matches!(
            verify(&verifier, &leaf, "127.0.0.1", later),
            Err(Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ))
        ));
        let earlier = UnixTime::since_unix_epoch(StdDuration::from_secs(now - 2 * 3600));
        assert!(matches!(
            verify(&verifier, &leaf, "127.0.0.1", earlier),
            Err(Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
            ))
        ));
    }

    #[test]
    fn a_client_only_certificate_is_not_a_server() {
        // Chain and root are fine, but the leaf lacks serverAuth: the usage
        // check fails before any identity is read.
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let (worker_cert, _key) = control_plane_ca
            .issue_control_plane_client("worker", Duration::hours(1))
            .unwrap();
        let leaf = certs_from_pem(&worker_cert.cert_pem).unwrap().remove(0);
        let verifier =
            NodeServerVerifier::new(&[control_plane_ca.cert_der().clone()], Uuid::new_v4())
                .unwrap();
        assert!(matches!(
            verify(&verifier, &leaf, "127.0.0.1", UnixTime::now()),
            Err(Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ))
        ));
    }

    #[test]
    fn a_server_from_another_root_is_an_unknown_issuer() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let (server_cert, _key) = control_plane_ca
            .issue_server(
                "api",
                &[],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                Duration::hours(1),
            )
            .unwrap();
        let leaf = certs_from_pem(&server_cert.cert_pem).unwrap().remove(0);
        let verifier =
            NodeServerVerifier::new(&[node_ca.cert_der().clone()], Uuid::new_v4()).unwrap();
        assert_eq!(
            verify(&verifier, &leaf, "127.0.0.1", UnixTime::now()).unwrap_err(),
            Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[test]
    fn garbage_is_a_bad_encoding_and_no_roots_is_no_verifier() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let verifier =
            NodeServerVerifier::new(&[node_ca.cert_der().clone()], Uuid::new_v4()).unwrap();
        let garbage = CertificateDer::from(b"not a certificate".to_vec());
        assert_eq!(
            verify(&verifier, &garbage, "127.0.0.1", UnixTime::now()).unwrap_err(),
            Error::InvalidCertificate(CertificateError::BadEncoding)
        );
        assert!(matches!(
            NodeServerVerifier::new(&[], Uuid::new_v4()),
            Err(PkiError::NoTrustAnchors)
        ));
    }
}
