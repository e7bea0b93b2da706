//! Certificate signing requests: making one (the agent's side) and reading
//! one (the CA's side).
//!
//! The CA trusts exactly one thing in a CSR: the public key, and only after
//! the CSR's self-signature has verified under that key (proof that the
//! requester holds the private key). The subject, requested extensions, SANs
//! and CA flag are never read; the CA builds every other field itself.

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PublicKeyData, SignatureAlgorithm, SubjectPublicKeyInfo,
};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;

use crate::error::PkiError;

/// Key algorithms we sign for. RSA is left out on purpose: x509-parser would
/// also accept SHA-1 and 1024-bit RSA signatures, and no Keel agent makes RSA
/// keys.
const ACCEPTED_KEY_ALGORITHMS: [&SignatureAlgorithm; 3] = [
    &PKCS_ECDSA_P256_SHA256,
    &PKCS_ECDSA_P384_SHA384,
    &PKCS_ED25519,
];

/// Upper bound of an X.520 common name.
const MAX_NODE_NAME_LEN: usize = 64;

/// What the agent does at enrolment: a fresh ECDSA P-256 key pair and a CSR
/// for it. Returns `(csr_pem, key_pem)`; the key never leaves the node.
///
/// `node_name` only goes in the CSR's subject as a courtesy for humans
/// reading it: the CA ignores it and names the certificate after the node id.
pub fn make_csr(node_name: &str) -> Result<(String, String), PkiError> {
    let node_name_is_valid = !node_name.is_empty()
        && node_name.chars().count() <= MAX_NODE_NAME_LEN
        && !node_name.chars().any(char::is_control);
    if !node_name_is_valid {
        return Err(PkiError::InvalidNodeName);
    }
    let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, node_name);
    params.distinguished_name = subject;
    let csr = params.serialize_request(&key_pair)?;
    Ok((csr.pem()?, key_pair.serialize_pem()))
}

/// Parses a PEM CSR, verifies its self-signature and returns its public key
/// and nothing else.
pub(crate) fn verified_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, PkiError> {
    let csr_der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| PkiError::MalformedCsr)?;
    let (rest, request) =
        X509CertificationRequest::from_der(csr_der.as_ref()).map_err(|_| PkiError::MalformedCsr)?;
    if !rest.is_empty() {
        return Err(PkiError::MalformedCsr);
    }

    // Check the algorithm before doing any signature arithmetic.
    let subject_public_key = &request.certification_request_info.subject_pki;
    let public_key = SubjectPublicKeyInfo::from_der(subject_public_key.raw)
        .map_err(|_| PkiError::UnsupportedAlgorithm)?;
    if !ACCEPTED_KEY_ALGORITHMS.contains(&public_key.algorithm()) {
        return Err(PkiError::UnsupportedAlgorithm);
    }

    request.verify_signature().map_err(|error| match error {
        X509Error::SignatureUnsupportedAlgorithm => PkiError::UnsupportedAlgorithm,
        _ => PkiError::CsrSignatureInvalid,
    })?;
    Ok(public_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_csr_verifies_and_yields_a_p256_key() {
        let (csr_pem, key_pem) = make_csr("node-a.example").unwrap();
        let public_key = verified_public_key(&csr_pem).unwrap();
        assert_eq!(public_key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        let key_pair = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(public_key.der_bytes(), key_pair.public_key_raw());
    }

    #[test]
    fn node_names_must_be_short_and_printable() {
        assert!(matches!(make_csr(""), Err(PkiError::InvalidNodeName)));
        assert!(matches!(
            make_csr(&"n".repeat(65)),
            Err(PkiError::InvalidNodeName)
        ));
        assert!(matches!(
            make_csr("node\nname"),
            Err(PkiError::InvalidNodeName)
        ));
    }

    #[test]
    fn garbage_is_not_a_csr() {
        assert!(matches!(
            verified_public_key("hello"),
            Err(PkiError::MalformedCsr)
        ));
        let not_der =
            "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8=\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(
            verified_public_key(not_der),
            Err(PkiError::MalformedCsr)
        ));
    }
}
