//! The control plane's certificate authorities.
//!
//! # Two roots, two namespaces
//!
//! Keel runs two separate trust roots, both a [`CertificateAuthority`]:
//!
//! - the **node CA** ([`CaKind::Node`]) signs agent certificates, whose only
//!   identity is the URI SAN `spiffe://keel/node/{uuid}`;
//! - the **control-plane CA** ([`CaKind::ControlPlane`]) signs worker and api
//!   certificates, named `spiffe://keel/control-plane/{component}` with
//!   `component` matching `^[a-z0-9-]{1,40}$`.
//!
//! A CA only issues into its own namespace (the node CA has no method that
//! could mint a control-plane identity, and the control-plane CA refuses
//! CSRs), and every TLS listener trusts exactly the one root its peers come
//! from. A worker certificate presented where an agent is expected is
//! therefore refused during the handshake even though it chains to a CA we
//! operate, and [`node_identity`] / [`control_plane_identity`] never read a
//! certificate of the other namespace.
//!
//! # Enrolment
//!
//! The agent makes its own key and a CSR ([`make_csr`]); the private key
//! never leaves the node. The api, after consuming a join token, calls
//! [`CertificateAuthority::sign_node_csr`], which verifies the CSR's
//! signature (proof of possession) and then takes **only its public key**:
//! subject, SANs, CA flag, key usages, lifetime and a random serial are all
//! chosen by the CA. Whatever extensions the CSR requests are ignored.
//!
//! Issued certificates are short-lived leaves: not CAs, key usage
//! digitalSignature, `not_before` one minute in the past for clock skew, and
//! never outliving the CA. CA certificates are ECDSA P-256, path length 0
//! (they sign leaves only), keyCertSign + cRLSign, valid ten years.
//!
//! # TLS
//!
//! [`server_config_requiring_client_certs`] and [`client_config`] build
//! rustls configs that carry their own ring provider (no process-wide
//! default needed) and trust only the roots they are given.
//!
//! Node certificates carry no DNS name or IP address, so a worker calling an
//! agent cannot check the server by hostname. [`client_config_for_node`]
//! (built on [`NodeServerVerifier`]) instead accepts exactly one node: a
//! chain to the node CA, for serverAuth, whose identity is the expected
//! node id; the server name is ignored.
//!
//! # What is not here
//!
//! Storage (the caller stores [`CertificateAuthority::key_pem`], sealed by
//! the KMS: `keel_inventory::trust`), join tokens and task-signing keys
//! live elsewhere. The revocation *check* is here ([`DenyList`], used by
//! [`server_config_with_deny_list`]); which serials are revoked is the
//! control plane's database.

mod ca;
mod csr;
mod error;
mod hot;
mod identity;
mod revocation;
mod tls;
mod verifier;

pub use ca::{CaKind, CertificateAuthority, IssuedCertificate, verify_statement};
pub use csr::make_csr;
pub use error::PkiError;
pub use hot::HotIdentity;
pub use identity::{
    CONTROL_PLANE_URI_PREFIX, NODE_URI_PREFIX, control_plane_identity, control_plane_uri,
    is_valid_component, node_identity, node_uri,
};
pub use revocation::{Denied, DenyList, serial_hex, validity};
pub use tls::{
    certs_from_pem, client_config, client_config_for_node, client_config_for_node_with_identity,
    client_config_with_hot_identity, private_key_from_pem, server_config_requiring_client_certs,
    server_config_with_deny_list, server_config_with_hot_identity,
};
pub use verifier::NodeServerVerifier;
