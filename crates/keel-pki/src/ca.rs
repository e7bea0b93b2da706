//! The two certificate authorities and what each of them may issue.
//!
//! One type serves both roots; its [`CaKind`] decides which issuing methods
//! it accepts, so the node CA can never mint a control-plane identity and the
//! control-plane CA never signs an agent's CSR. Every field of an issued
//! certificate is chosen here: a CSR contributes its public key and nothing
//! else.

use std::fmt;
use std::net::IpAddr;

use base64::Engine;
use rand::RngCore;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SigningKey as _,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::csr::verified_public_key;
use crate::error::PkiError;
use crate::identity::{control_plane_uri, node_uri};

/// How far back `not_before` is set, to tolerate clock skew between the
/// control plane and a freshly booted node.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::seconds(60);

/// Lifetime of a generated CA certificate: ten years.
const CA_LIFETIME: Duration = Duration::days(3652);

/// Length of the random serial numbers (RFC 5280 allows up to 20).
const SERIAL_LEN: usize = 16;

/// Which trust root a [`CertificateAuthority`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaKind {
    /// Signs agent certificates (`spiffe://keel/node/{uuid}`).
    Node,
    /// Signs worker and api certificates (`spiffe://keel/control-plane/{component}`).
    ControlPlane,
}

impl CaKind {
    /// The subject common name of this CA's certificate.
    pub fn common_name(self) -> &'static str {
        match self {
            CaKind::Node => "Keel node CA",
            CaKind::ControlPlane => "Keel control-plane CA",
        }
    }

    fn other(self) -> CaKind {
        match self {
            CaKind::Node => CaKind::ControlPlane,
            CaKind::ControlPlane => CaKind::Node,
        }
    }
}

impl fmt::Display for CaKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            CaKind::Node => "node",
            CaKind::ControlPlane => "control-plane",
        })
    }
}

/// A certificate issued by one of the CAs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The certificate, PEM-encoded.
    pub cert_pem: String,
    /// The serial number as lowercase hex (16 bytes, 32 digits), for
    /// revocation and audit.
    pub serial_hex: String,
    /// When the certificate expires (whole seconds, as written in it).
    pub not_after: OffsetDateTime,
}

/// One of the control plane's two certificate authorities.
pub struct CertificateAuthority {
    kind: CaKind,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertificateAuthority {
    /// Never prints the private key.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("CertificateAuthority")
            .field("kind", &self.kind)
            .field("fingerprint_sha256", &self.fingerprint_sha256_hex())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA: ECDSA P-256, CA with path length 0 (it signs
    /// leaves only), key usages keyCertSign and cRLSign, valid ten years.
    pub fn generate(kind: CaKind) -> Result<Self, PkiError> {
        let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = now_in_whole_seconds();
        let (serial_number, _) = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(kind.common_name());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(serial_number);
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + CA_LIFETIME;
        let certificate = params.self_signed(&key_pair)?;
        Self::from_parts(kind, certificate.der().clone(), key_pair)
    }

    /// Loads a stored CA. Checks that the certificate is a CA of the expected
    /// kind, that its self-signature holds and that the key belongs to it.
    pub fn from_pem(kind: CaKind, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(PkiError::Pem)?;
        let key_pair = KeyPair::from_pem(key_pem).map_err(PkiError::InvalidKey)?;
        Self::from_parts(kind, cert_der, key_pair)
    }

    fn from_parts(
        kind: CaKind,
        cert_der: CertificateDer<'static>,
        key_pair: KeyPair,
    ) -> Result<Self, PkiError> {
        let (rest, certificate) = x509_parser::parse_x509_certificate(cert_der.as_ref())
            .map_err(|_| PkiError::InvalidCaCertificate("not an X.509 certificate"))?;
        if !rest.is_empty() {
            return Err(PkiError::InvalidCaCertificate(
                "trailing bytes after the certificate",
            ));
        }

        let common_name = certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|name| name.as_str().ok());
        if common_name == Some(kind.other().common_name()) {
            return Err(PkiError::WrongCaKind {
                expected: kind,
                actual: kind.other(),
            });
        }
        if common_name != Some(kind.common_name()) {
            return Err(PkiError::InvalidCaCertificate("subject is not a Keel CA"));
        }

        let is_ca = matches!(certificate.basic_constraints(), Ok(Some(constraints)) if constraints.value.ca);
        if !is_ca {
            return Err(PkiError::InvalidCaCertificate("not a CA certificate"));
        }
        let can_sign_certificates =
            matches!(certificate.key_usage(), Ok(Some(usage)) if usage.value.key_cert_sign());
        if !can_sign_certificates {
            return Err(PkiError::InvalidCaCertificate(
                "key usage lacks keyCertSign",
            ));
        }
        if certificate.verify_signature(None).is_err() {
            return Err(PkiError::InvalidCaCertificate(
                "self-signature does not verify",
            ));
        }
        if certificate.public_key().subject_public_key.as_ref() != key_pair.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }

        let not_after =
            OffsetDateTime::from_unix_timestamp(certificate.validity().not_after.timestamp())
                .map_err(|_| PkiError::InvalidCaCertificate("expiry out of range"))?;
        let cert_pem = pem_encode("CERTIFICATE", cert_der.as_ref());
        let issuer = Issuer::from_ca_cert_der(&cert_der, key_pair)?;
        Ok(Self {
            kind,
            issuer,
            cert_der,
            cert_pem,
            not_after,
        })
    }

    /// Which root this is.
    pub fn kind(&self) -> CaKind {
        self.kind
    }

    /// The CA certificate, PEM-encoded (what peers put in their trust store).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key as PKCS#8 PEM, for the caller to store.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate, DER-encoded.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex: the pin delivered
    /// with a join token.
    pub fn fingerprint_sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(self.cert_der.as_ref()))
    }

    /// Signs a statement that is not a certificate (ECDSA P-256 with
    /// SHA-256, DER) over `domain ‖ message`: the control-plane CA vouches
    /// for task-signing keys this way. `domain` must end in a NUL and name
    /// the statement, so a signature for one kind of statement never passes
    /// for another. See [`verify_statement`].
    pub fn sign_statement(&self, domain: &[u8], message: &[u8]) -> Result<Vec<u8>, PkiError> {
        let mut signed = Vec::with_capacity(domain.len() + message.len());
        signed.extend_from_slice(domain);
        signed.extend_from_slice(message);
        Ok(self.issuer.key().sign(&signed)?)
    }

    /// Signs an agent's CSR (node CA only). The CSR's signature must verify;
    /// only its public key is used. The certificate names the node by its
    /// id (subject CN and the URI SAN `spiffe://keel/node/{id}`), is not a
    /// CA, allows digitalSignature with serverAuth and clientAuth (the agent
    /// both serves and calls), and lives `lifetime`.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_id: Uuid,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        self.require_kind(CaKind::Node)?;
        let public_key = verified_public_key(csr_pem)?;
        self.issue_leaf(
            &public_key,
            &node_id.hyphenated().to_string(),
            vec![uri_san(node_uri(node_id))?],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            lifetime,
        )
    }

    /// A client certificate and its fresh P-256 key (PKCS#8 PEM) for a
    /// control-plane component such as a worker (control-plane CA only).
    pub fn issue_control_plane_client(
        &self,
        component: &str,
        lifetime: Duration,
    ) -> Result<(IssuedCertificate, String), PkiError> {
        self.require_kind(CaKind::ControlPlane)?;
        let uri = control_plane_uri(component)?;
        let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issued = self.issue_leaf(
            &key_pair,
            component,
            vec![uri_san(uri)?],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            lifetime,
        )?;
        Ok((issued, key_pair.serialize_pem()))
    }

    /// A server certificate and its fresh P-256 key for a control-plane
    /// listener (control-plane CA only), e.g. the api's agent-facing TLS
    /// port. SANs: the component's URI plus the given DNS names and IPs.
    pub fn issue_server(
        &self,
        component: &str,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
        lifetime: Duration,
    ) -> Result<(IssuedCertificate, String), PkiError> {
        self.require_kind(CaKind::ControlPlane)?;
        let mut subject_alt_names = vec![uri_san(control_plane_uri(component)?)?];
        for dns_name in dns_names {
            subject_alt_names.push(dns_san(dns_name)?);
        }
        subject_alt_names.extend(ip_addresses.iter().copied().map(SanType::IpAddress));
        let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issued = self.issue_leaf(
            &key_pair,
            component,
            subject_alt_names,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            lifetime,
        )?;
        Ok((issued, key_pair.serialize_pem()))
    }

    fn require_kind(&self, expected: CaKind) -> Result<(), PkiError> {
        if self.kind == expected {
            Ok(())
        } else {
            Err(PkiError::WrongCaKind {
                expected,
                actual: self.kind,
            })
        }
    }

    /// The one place leaf certificates are built.
    fn issue_leaf(
        &self,
        public_key: &impl PublicKeyData,
        common_name: &str,
        subject_alt_names: Vec<SanType>,
        extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        if !lifetime.is_positive() {
            return Err(PkiError::InvalidLifetime);
        }
        let now = now_in_whole_seconds();
        let not_after = now
            .checked_add(lifetime)
            .filter(|not_after| *not_after <= self.not_after)
            .ok_or(PkiError::InvalidLifetime)?;
        let (serial_number, serial_hex) = random_serial();

        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.subject_alt_names = subject_alt_names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = extended_key_usages;
        params.serial_number = Some(serial_number);
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;

        let certificate = params.signed_by(public_key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: certificate.pem(),
            serial_hex,
            not_after,
        })
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Keel");
    name.push(DnType::CommonName, common_name);
    name
}

fn uri_san(uri: String) -> Result<SanType, PkiError> {
    let uri = Ia5String::try_from(uri)?;
    Ok(SanType::URI(uri))
}

fn dns_san(dns_name: &str) -> Result<SanType, PkiError> {
    let invalid = || PkiError::InvalidDnsName(dns_name.to_owned());
    // Reuse the same syntax check rustls applies to server names.
    DnsName::try_from(dns_name).map_err(|_| invalid())?;
    let ia5 = Ia5String::try_from(dns_name).map_err(|_| invalid())?;
    Ok(SanType::DnsName(ia5))
}

/// A random positive serial that encodes to exactly [`SERIAL_LEN`] bytes.
fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; SERIAL_LEN];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    // Clear the sign bit (serials are positive) and keep the first byte
    // non-zero so DER does not strip it: the hex then matches the
    // certificate byte for byte.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

/// Now, truncated to whole seconds as certificates store it, so the
/// `not_after` we report equals the one written.
/// Whether the CA certificate `ca_cert_der` signed `domain ‖ message`
/// with [`CertificateAuthority::sign_statement`].
pub fn verify_statement(
    ca_cert_der: &[u8],
    domain: &[u8],
    message: &[u8],
    signature: &[u8],
) -> bool {
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(ca_cert_der) else {
        return false;
    };
    let public_key = certificate.public_key().subject_public_key.data.as_ref();
    let mut signed = Vec::with_capacity(domain.len() + message.len());
    signed.extend_from_slice(domain);
    signed.extend_from_slice(message);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(&signed, signature)
        .is_ok()
}

fn now_in_whole_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now - Duration::nanoseconds(i64::from(now.nanosecond()))
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for (index, character) in body.chars().enumerate() {
        if index > 0 && index % 64 == 0 {
            pem.push('\n');
        }
        pem.push(character);
    }
    pem.push_str(&format!("\n-----END {label}-----\n"));
    pem
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateSigningRequestDer, UnixTime};
    use rustls::server::WebPkiClientVerifier;
    use x509_parser::certificate::X509Certificate;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;

    use super::*;
    use crate::csr::make_csr;
    use crate::identity::{control_plane_identity, node_identity};
    use crate::tls::certs_from_pem;

    const DAY: Duration = Duration::days(1);

    fn der_of(pem: &str) -> CertificateDer<'static> {
        certs_from_pem(pem).unwrap().remove(0)
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        let (rest, certificate) = x509_parser::parse_x509_certificate(der).unwrap();
        assert!(rest.is_empty());
        certificate
    }

    /// Runs rustls' own client-certificate check against one root.
    fn verify_client_cert(root: &CertificateAuthority, leaf: &CertificateDer<'_>) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.cert_der().clone()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(leaf, &[], UnixTime::now())
            .is_ok()
    }

    /// A CSR asking for everything a node must not get: CA status, a
    /// control-plane identity, extra DNS names, certificate signing.
    fn greedy_csr() -> String {
        let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec![
            "evil.example".to_owned(),
            "api.keel.internal".to_owned(),
        ])
        .unwrap();
        params.subject_alt_names.push(SanType::URI(
            Ia5String::try_from("spiffe://keel/control-plane/api").unwrap(),
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        params.distinguished_name = distinguished_name("Keel control-plane CA");
        params.serialize_request(&key_pair).unwrap().pem().unwrap()
    }

    #[test]
    fn a_generated_ca_is_a_path_length_zero_ca_valid_for_ten_years() {
        let ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let certificate = parse(ca.cert_der());
        let constraints = certificate.basic_constraints().unwrap().unwrap().value;
        assert!(constraints.ca);
        assert_eq!(constraints.path_len_constraint, Some(0));
        let usage = certificate.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign());
        assert!(!usage.digital_signature());
        let common_name = certificate.subject().iter_common_name().next().unwrap();
        assert_eq!(common_name.as_str().unwrap(), "Keel node CA");
        let lifetime = ca.not_after() - OffsetDateTime::now_utc();
        assert!(lifetime > Duration::days(3650) && lifetime <= CA_LIFETIME);
        assert_eq!(ca.fingerprint_sha256_hex().len(), 64);
    }

    #[test]
    fn a_ca_survives_a_pem_round_trip_and_still_signs() {
        let ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let loaded =
            CertificateAuthority::from_pem(CaKind::Node, ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.fingerprint_sha256_hex(), ca.fingerprint_sha256_hex());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.not_after(), ca.not_after());

        let (csr_pem, _key_pem) = make_csr("node-a").unwrap();
        let issued = loaded.sign_node_csr(&csr_pem, Uuid::new_v4(), DAY).unwrap();
        assert!(verify_client_cert(&ca, &der_of(&issued.cert_pem)));
    }

    #[test]
    fn loading_a_ca_refuses_the_wrong_kind_a_foreign_key_and_a_leaf() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();

        let wrong_kind = CertificateAuthority::from_pem(
            CaKind::ControlPlane,
            node_ca.cert_pem(),
            &node_ca.key_pem(),
        );
        assert!(matches!(
            wrong_kind,
            Err(PkiError::WrongCaKind {
                expected: CaKind::ControlPlane,
                actual: CaKind::Node
            })
        ));

        let foreign_key = CertificateAuthority::from_pem(
            CaKind::Node,
            node_ca.cert_pem(),
            &control_plane_ca.key_pem(),
        );
        assert!(matches!(foreign_key, Err(PkiError::KeyMismatch)));

        let (leaf, leaf_key) = control_plane_ca
            .issue_control_plane_client("worker", DAY)
            .unwrap();
        let not_a_ca =
            CertificateAuthority::from_pem(CaKind::ControlPlane, &leaf.cert_pem, &leaf_key);
        assert!(matches!(not_a_ca, Err(PkiError::InvalidCaCertificate(_))));

        let garbage = CertificateAuthority::from_pem(CaKind::Node, "nope", &node_ca.key_pem());
        assert!(garbage.is_err());
    }

    #[test]
    fn a_csr_signed_certificate_verifies_against_the_node_ca_and_carries_only_the_node_identity() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let node_id = Uuid::new_v4();
        let before = now_in_whole_seconds();

        let issued = node_ca
            .sign_node_csr(&greedy_csr(), node_id, Duration::hours(24))
            .unwrap();
        let der = der_of(&issued.cert_pem);

        assert!(verify_client_cert(&node_ca, &der));
        assert!(!verify_client_cert(&control_plane_ca, &der));

        let certificate = parse(&der);
        assert!(!certificate.is_ca());
        let constraints = certificate.basic_constraints().unwrap().unwrap().value;
        assert!(!constraints.ca);

        let names = &certificate
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        let expected_uri = format!("spiffe://keel/node/{node_id}");
        assert_eq!(names.len(), 1);
        assert!(matches!(names[0], GeneralName::URI(uri) if uri == expected_uri));

        let usage = certificate.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature());
        assert!(!usage.key_cert_sign() && !usage.crl_sign());
        let extended = certificate.extended_key_usage().unwrap().unwrap().value;
        assert!(extended.server_auth && extended.client_auth);
        assert!(!extended.code_signing && !extended.any);

        let common_name = certificate.subject().iter_common_name().next().unwrap();
        assert_eq!(common_name.as_str().unwrap(), node_id.to_string());
        assert_eq!(hex::encode(certificate.raw_serial()), issued.serial_hex);
        assert_eq!(issued.serial_hex.len(), 2 * SERIAL_LEN);

        let validity = certificate.validity();
        assert_eq!(
            validity.not_after.timestamp(),
            issued.not_after.unix_timestamp()
        );
        assert!(issued.not_after >= before + Duration::hours(24));
        assert!(
            validity.not_before.timestamp() <= (before - Duration::seconds(59)).unix_timestamp()
        );

        assert_eq!(node_identity(&der), Some(node_id));
    }

    #[test]
    fn two_certificates_for_the_same_csr_get_different_serials() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let (csr_pem, _key_pem) = make_csr("node-a").unwrap();
        let first = node_ca
            .sign_node_csr(&csr_pem, Uuid::new_v4(), DAY)
            .unwrap();
        let second = node_ca
            .sign_node_csr(&csr_pem, Uuid::new_v4(), DAY)
            .unwrap();
        assert_ne!(first.serial_hex, second.serial_hex);
    }

    #[test]
    fn a_csr_with_a_broken_signature_is_refused() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let (csr_pem, _key_pem) = make_csr("node-a").unwrap();
        let mut csr_der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // The last byte belongs to the signature's `s` value: the structure
        // still parses, the signature no longer verifies.
        let last = csr_der.len() - 1;
        csr_der[last] ^= 0x01;
        let broken = pem_encode("CERTIFICATE REQUEST", &csr_der);

        let result = node_ca.sign_node_csr(&broken, Uuid::new_v4(), DAY);
        assert!(matches!(result, Err(PkiError::CsrSignatureInvalid)));
    }

    #[test]
    fn a_csr_for_someone_elses_key_is_refused() {
        // Swap the public key of one CSR into another: the signature no
        // longer matches the key the CA would certify.
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let der = |pem: &str| {
            CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec()
        };
        let (mine, _) = make_csr("node-a").unwrap();
        let (theirs, _) = make_csr("node-a").unwrap();
        let (mine, theirs) = (der(&mine), der(&theirs));
        let spki = |csr: &[u8]| -> Vec<u8> {
            let (_, request) = X509CertificationRequest::from_der(csr).unwrap();
            request.certification_request_info.subject_pki.raw.to_vec()
        };
        let (my_key, their_key) = (spki(&mine), spki(&theirs));
        let start = mine
            .windows(my_key.len())
            .position(|window| window == my_key.as_slice())
            .unwrap();
        let mut forged = mine.clone();
        forged[start..start + my_key.len()].copy_from_slice(&their_key);

        let result = node_ca.sign_node_csr(
            &pem_encode("CERTIFICATE REQUEST", &forged),
            Uuid::new_v4(),
            DAY,
        );
        assert!(matches!(result, Err(PkiError::CsrSignatureInvalid)));
    }

    #[test]
    fn a_control_plane_ca_refuses_to_sign_a_node_csr() {
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let (csr_pem, _key_pem) = make_csr("node-a").unwrap();
        let result = control_plane_ca.sign_node_csr(&csr_pem, Uuid::new_v4(), DAY);
        assert!(matches!(
            result,
            Err(PkiError::WrongCaKind {
                expected: CaKind::Node,
                actual: CaKind::ControlPlane
            })
        ));
    }

    #[test]
    fn a_node_ca_refuses_to_issue_control_plane_certificates() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        assert!(matches!(
            node_ca.issue_control_plane_client("worker", DAY),
            Err(PkiError::WrongCaKind {
                expected: CaKind::ControlPlane,
                actual: CaKind::Node
            })
        ));
        assert!(matches!(
            node_ca.issue_server("api", &["api.keel.internal".to_owned()], &[], DAY),
            Err(PkiError::WrongCaKind { .. })
        ));
    }

    #[test]
    fn identities_are_never_read_across_namespaces() {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let node_id = Uuid::new_v4();
        let (csr_pem, _key_pem) = make_csr("node-a").unwrap();
        let node_cert = der_of(
            &node_ca
                .sign_node_csr(&csr_pem, node_id, DAY)
                .unwrap()
                .cert_pem,
        );
        let (worker, _key_pem) = control_plane_ca
            .issue_control_plane_client("worker", DAY)
            .unwrap();
        let worker_cert = der_of(&worker.cert_pem);

        assert_eq!(node_identity(&node_cert), Some(node_id));
        assert_eq!(control_plane_identity(&node_cert), None);
        assert_eq!(
            control_plane_identity(&worker_cert),
            Some("worker".to_owned())
        );
        assert_eq!(node_identity(&worker_cert), None);
        // A CA certificate has no identity at all.
        assert_eq!(node_identity(node_ca.cert_der()), None);
        assert_eq!(control_plane_identity(control_plane_ca.cert_der()), None);
    }

    #[test]
    fn a_control_plane_client_certificate_is_for_client_auth_only() {
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let (issued, key_pem) = control_plane_ca
            .issue_control_plane_client("worker", DAY)
            .unwrap();
        let der = der_of(&issued.cert_pem);
        assert!(verify_client_cert(&control_plane_ca, &der));
        let certificate = parse(&der);
        let extended = certificate.extended_key_usage().unwrap().unwrap().value;
        assert!(extended.client_auth && !extended.server_auth);
        let key_pair = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            certificate.public_key().subject_public_key.as_ref(),
            key_pair.public_key_raw()
        );
    }

    #[test]
    fn a_server_certificate_carries_the_uri_dns_and_ip_names() {
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (issued, _key_pem) = control_plane_ca
            .issue_server("api", &["api.keel.internal".to_owned()], &[ip], DAY)
            .unwrap();
        let der = der_of(&issued.cert_pem);
        let certificate = parse(&der);
        let names = &certificate
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(names.len(), 3);
        assert!(names.iter().any(
            |name| matches!(name, GeneralName::URI(uri) if *uri == "spiffe://keel/control-plane/api")
        ));
        assert!(
            names.iter().any(
                |name| matches!(name, GeneralName::DNSName(dns) if *dns == "api.keel.internal")
            )
        );
        assert!(
            names.iter().any(
                |name| matches!(name, GeneralName::IPAddress(bytes) if *bytes == [127, 0, 0, 1])
            )
        );
        let extended = certificate.extended_key_usage().unwrap().unwrap().value;
        assert!(extended.server_auth && !extended.client_auth);
        assert_eq!(control_plane_identity(&der), Some("api".to_owned()));
    }

    #[test]
    fn bad_names_are_refused() {
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        assert!(matches!(
            control_plane_ca.issue_control_plane_client("Worker", DAY),
            Err(PkiError::InvalidComponent(_))
        ));
        assert!(matches!(
            control_plane_ca.issue_control_plane_client("../node", DAY),
            Err(PkiError::InvalidComponent(_))
        ));
        assert!(matches!(
            control_plane_ca.issue_server("api", &["not a host".to_owned()], &[], DAY),
            Err(PkiError::InvalidDnsName(_))
        ));
    }

    #[test]
    fn lifetimes_must_be_positive_and_end_before_the_ca() {
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        for lifetime in [Duration::ZERO, Duration::seconds(-5), Duration::days(3700)] {
            assert!(matches!(
                control_plane_ca.issue_control_plane_client("worker", lifetime),
                Err(PkiError::InvalidLifetime)
            ));
        }
        assert!(matches!(
            control_plane_ca.issue_control_plane_client("worker", Duration::MAX),
            Err(PkiError::InvalidLifetime)
        ));
    }

    #[test]
    fn a_statement_verifies_only_with_its_ca_domain_and_message() {
        let ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let other = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let signature = ca.sign_statement(b"keel-test\0", b"hello").unwrap();
        let der = ca.cert_der().as_ref();
        assert!(verify_statement(der, b"keel-test\0", b"hello", &signature));
        assert!(!verify_statement(der, b"keel-test\0", b"hellO", &signature));
        assert!(!verify_statement(
            der,
            b"keel-other\0",
            b"hello",
            &signature
        ));
        assert!(!verify_statement(
            other.cert_der().as_ref(),
            b"keel-test\0",
            b"hello",
            &signature
        ));
        assert!(!verify_statement(
            der,
            b"keel-test\0",
            b"hello",
            &signature[1..]
        ));
        assert!(!verify_statement(
            b"not a certificate",
            b"keel-test\0",
            b"hello",
            &signature
        ));
    }

    #[test]
    fn debug_output_does_not_contain_the_key() {
        let ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let debug = format!("{ca:?}");
        assert!(debug.contains("ControlPlane"));
        assert!(!debug.contains("PRIVATE KEY"));
    }
}
