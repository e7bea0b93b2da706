//! A certificate and key that can be replaced under running TLS configs.
//!
//! Renewal must not need a restart or cut connections: a listener and a
//! client built with a [`HotIdentity`] ask it for the certificate at every
//! new handshake, and [`HotIdentity::replace`] swaps in a renewed one.
//! Connections already open keep the session they negotiated.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::PkiError;
use crate::tls::{certs_from_pem, private_key_from_pem, ring_provider};

/// The certificate (chain) and key a process presents, replaceable.
pub struct HotIdentity {
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl HotIdentity {
    /// An identity from PEM; the key must belong to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Arc<Self>, PkiError> {
        let provider = ring_provider();
        let current = certified_key(&provider, cert_pem, key_pem)?;
        Ok(Arc::new(Self {
            provider,
            current: RwLock::new(current),
        }))
    }

    /// Presents `cert_pem`/`key_pem` from the next handshake on. On error
    /// the current identity stays.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        let next = certified_key(&self.provider, cert_pem, key_pem)?;
        match self.current.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        Ok(())
    }

    /// The leaf certificate presented now, DER.
    pub fn leaf_der(&self) -> Vec<u8> {
        self.current()
            .cert
            .first()
            .map(|leaf| leaf.as_ref().to_vec())
            .unwrap_or_default()
    }

    fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn provider(&self) -> Arc<CryptoProvider> {
        Arc::clone(&self.provider)
    }
}

fn certified_key(
    provider: &CryptoProvider,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<CertifiedKey>, PkiError> {
    let key = CertifiedKey::from_der(
        certs_from_pem(cert_pem)?,
        private_key_from_pem(key_pem)?,
        provider,
    )?;
    // `from_der` lets "cannot tell" pass; a renewed pair must provably match.
    key.keys_match()?;
    Ok(Arc::new(key))
}

impl fmt::Debug for HotIdentity {
    /// Never prints the key.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("HotIdentity")
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for HotIdentity {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for HotIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
