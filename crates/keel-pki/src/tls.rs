//! rustls configurations for mutual TLS between the control plane and agents.
//!
//! Every config carries its own ring provider, so nothing depends on a
//! process-wide default provider being installed. Trust is always explicit:
//! the caller names the one root a peer must chain to (the node CA on a
//! listener that accepts agents, the control-plane CA on the agent's side),
//! so a certificate from the other root is refused even though we know it.
//! Agents are addressed by node id, not by hostname:
//! [`client_config_for_node`] checks the server's node identity instead of
//! its name.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use uuid::Uuid;

use crate::error::PkiError;
use crate::hot::HotIdentity;
use crate::revocation::{DenyList, DenyListClientVerifier};
use crate::verifier::NodeServerVerifier;

/// All certificates in a PEM string, in order. An input without any
/// certificate is an error, not an empty list.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(PkiError::Pem)?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificates);
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM string.
pub fn private_key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(PkiError::Pem)
}

/// A server config that demands a client certificate chaining to one of
/// `ca_roots` (and only those), with serverAuth/clientAuth checked by webpki.
pub fn server_config_requiring_client_certs(
    ca_roots: &[CertificateDer<'_>],
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = ring_provider();
    let roots = Arc::new(root_store(ca_roots)?);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider)).build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            certs_from_pem(cert_chain_pem)?,
            private_key_from_pem(key_pem)?,
        )?;
    Ok(Arc::new(config))
}

/// Like [`server_config_requiring_client_certs`], and every client
/// certificate is also checked against `deny_list` (see [`DenyList`]):
/// revoked serials, and everything while the list is stale, are refused.
/// The server presents whatever `identity` holds at each handshake, so it
/// can be re-issued without a restart.
pub fn server_config_with_deny_list(
    ca_roots: &[CertificateDer<'_>],
    identity: Arc<HotIdentity>,
    deny_list: Arc<DenyList>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = identity.provider();
    let roots = Arc::new(root_store(ca_roots)?);
    let inner =
        WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider)).build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(DenyListClientVerifier { inner, deny_list }))
        .with_cert_resolver(identity);
    Ok(Arc::new(config))
}

/// A server config like [`server_config_requiring_client_certs`] that
/// presents whatever `identity` holds at each handshake (renewal without
/// restart).
pub fn server_config_with_hot_identity(
    client_roots: &[CertificateDer<'_>],
    identity: Arc<HotIdentity>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = identity.provider();
    let roots = Arc::new(root_store(client_roots)?);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider)).build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(identity);
    Ok(Arc::new(config))
}

/// A client config like [`client_config`] that presents whatever
/// `identity` holds at each handshake.
pub fn client_config_with_hot_identity(
    server_roots: &[CertificateDer<'_>],
    identity: Arc<HotIdentity>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let config = ClientConfig::builder_with_provider(identity.provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(server_roots)?)
        .with_client_cert_resolver(identity);
    Ok(Arc::new(config))
}

/// A client config that trusts only `server_roots` and presents the given
/// certificate (chain) and key.
pub fn client_config(
    server_roots: &[CertificateDer<'_>],
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, PkiError> {
    let config = ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(server_roots)?)
        .with_client_auth_cert(certs_from_pem(cert_pem)?, private_key_from_pem(key_pem)?)?;
    Ok(Arc::new(config))
}

/// A client config for calling one agent: the server must present a node
/// certificate chaining to `node_ca_roots` (serverAuth, currently valid)
/// whose identity is `spiffe://keel/node/{expected_node_id}`; the server name
/// the connection is opened with (typically the agent's IP address) is not
/// checked. See [`NodeServerVerifier`]. The client presents the given
/// certificate (chain) and key, e.g. a worker's control-plane certificate.
pub fn client_config_for_node(
    node_ca_roots: &[CertificateDer<'_>],
    expected_node_id: Uuid,
    client_cert_pem: &str,
    client_key_pem: &str,
) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = ring_provider();
    let verifier = NodeServerVerifier::with_provider(node_ca_roots, expected_node_id, &provider)?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(
            certs_from_pem(client_cert_pem)?,
            private_key_from_pem(client_key_pem)?,
        )?;
    Ok(Arc::new(config))
}

/// [`client_config_for_node`] presenting whatever `identity` holds at each
/// handshake (a worker whose certificate is re-issued while it runs).
pub fn client_config_for_node_with_identity(
    node_ca_roots: &[CertificateDer<'_>],
    expected_node_id: Uuid,
    identity: Arc<HotIdentity>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = identity.provider();
    let verifier = NodeServerVerifier::with_provider(node_ca_roots, expected_node_id, &provider)?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(identity);
    Ok(Arc::new(config))
}

pub(crate) fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn root_store(roots: &[CertificateDer<'_>]) -> Result<RootCertStore, PkiError> {
    if roots.is_empty() {
        return Err(PkiError::NoTrustAnchors);
    }
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone().into_owned())?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_certificates_is_an_error() {
        assert!(matches!(certs_from_pem(""), Err(PkiError::NoCertificates)));
        assert!(matches!(
            certs_from_pem("just some text\n"),
            Err(PkiError::NoCertificates)
        ));
    }

    #[test]
    fn no_roots_means_no_config() {
        assert!(matches!(
            client_config(&[], "", ""),
            Err(PkiError::NoTrustAnchors)
        ));
        assert!(matches!(
            client_config_for_node(&[], Uuid::new_v4(), "", ""),
            Err(PkiError::NoTrustAnchors)
        ));
        assert!(matches!(
            server_config_requiring_client_certs(&[], "", ""),
            Err(PkiError::NoTrustAnchors)
        ));
    }
}
