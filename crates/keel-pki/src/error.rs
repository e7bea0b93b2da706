//! The one error type of this crate.
//!
//! Variants name what went wrong in PKI terms; library errors travel as
//! `#[source]` and are not repeated in the message. None of the messages
//! contains key material.

use crate::ca::CaKind;

/// Everything that can go wrong while issuing, loading or using certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The operation belongs to the other trust root (e.g. a node CSR sent to
    /// the control-plane CA).
    #[error("this operation needs the {expected} CA, but this is the {actual} CA")]
    WrongCaKind { expected: CaKind, actual: CaKind },

    /// The CSR is not PEM, not DER, or has trailing data.
    #[error("the certificate signing request could not be parsed")]
    MalformedCsr,

    /// The CSR's self-signature does not verify: the requester has not shown
    /// that it holds the private key.
    #[error("the certificate signing request's signature does not verify")]
    CsrSignatureInvalid,

    /// The key (or signature) algorithm is not one we issue for.
    #[error("unsupported key or signature algorithm (ECDSA P-256/P-384 or Ed25519 only)")]
    UnsupportedAlgorithm,

    /// A control-plane component name outside `^[a-z0-9-]{1,40}$`.
    #[error("invalid control-plane component name {0:?}: expected 1 to 40 of a-z, 0-9 and '-'")]
    InvalidComponent(String),

    /// A DNS name that cannot go in a server certificate.
    #[error("invalid DNS name {0:?}")]
    InvalidDnsName(String),

    /// A node name that cannot be a certificate subject.
    #[error("invalid node name: must be 1 to 64 printable characters")]
    InvalidNodeName,

    /// A lifetime that is not positive, or that would outlive the CA.
    #[error("certificate lifetime must be positive and end before the CA certificate expires")]
    InvalidLifetime,

    /// A stored CA certificate that is not a usable Keel CA.
    #[error("invalid CA certificate: {0}")]
    InvalidCaCertificate(&'static str),

    /// A private key that could not be read.
    #[error("the private key could not be read")]
    InvalidKey(#[source] rcgen::Error),

    /// The private key does not belong to the certificate it was loaded with.
    #[error("the private key does not match the certificate")]
    KeyMismatch,

    /// PEM input without any certificate in it.
    #[error("no certificate found in the PEM input")]
    NoCertificates,

    /// An empty set of trust anchors: it would trust nobody (or, worse, be
    /// replaced by a default somewhere).
    #[error("no trust anchors given")]
    NoTrustAnchors,

    /// PEM input that could not be decoded.
    #[error("PEM input could not be decoded")]
    Pem(#[source] rustls::pki_types::pem::Error),

    /// Certificate generation failed inside rcgen.
    #[error("certificate generation failed")]
    Certificate(#[from] rcgen::Error),

    /// rustls rejected a certificate, key or configuration.
    #[error("TLS configuration rejected")]
    Tls(#[from] rustls::Error),

    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier could not be built")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}
