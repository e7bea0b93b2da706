//! Revocation on every handshake: a deny list of certificate serials that a
//! listener consults after the chain has verified, and that can never lapse
//! into "allow".
//!
//! The list is refreshed by its owner (the api reloads it from the node
//! certificate records every few seconds). Each refresh stamps it; a list
//! older than its maximum age refuses **every** handshake with "the
//! revocation list is stale" — an outage of the agent channel is visible
//! and recoverable, a revoked node quietly getting back in is neither.
//! (Puppet's expired-CRL outages are the cost of the opposite choice made
//! silently; here the refresh is local and frequent, and a failing refresh
//! is logged long before the list ages out.)

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

/// The serial number of a DER certificate as lowercase hex (as
/// [`crate::IssuedCertificate::serial_hex`] records it).
pub fn serial_hex(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex::encode(certificate.raw_serial()))
}

/// A DER certificate's validity window (`not_before`, `not_after`).
pub fn validity(der: &[u8]) -> Option<(time::OffsetDateTime, time::OffsetDateTime)> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let window = certificate.validity();
    Some((
        time::OffsetDateTime::from_unix_timestamp(window.not_before.timestamp()).ok()?,
        time::OffsetDateTime::from_unix_timestamp(window.not_after.timestamp()).ok()?,
    ))
}

/// Revoked serials, with the time they were last confirmed.
pub struct DenyList {
    max_age: Duration,
    state: RwLock<State>,
}

struct State {
    serials: HashSet<String>,
    refreshed_at: Option<Instant>,
}

/// Why the deny list refused a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Revoked,
    Stale,
}

impl DenyList {
    /// An empty list that refuses everything until its first
    /// [`DenyList::replace`], and again whenever it is older than
    /// `max_age`.
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            state: RwLock::new(State {
                serials: HashSet::new(),
                refreshed_at: None,
            }),
        }
    }

    /// Replaces the revoked serials and stamps the list as fresh.
    pub fn replace(&self, serials: impl IntoIterator<Item = String>) {
        let state = State {
            serials: serials.into_iter().collect(),
            refreshed_at: Some(Instant::now()),
        };
        match self.state.write() {
            Ok(mut guard) => *guard = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
    }

    /// Whether a certificate with this serial may be accepted now.
    pub fn check(&self, serial: &str) -> Result<(), Denied> {
        let guard = match self.state.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let fresh = guard
            .refreshed_at
            .is_some_and(|at| at.elapsed() <= self.max_age);
        if !fresh {
            return Err(Denied::Stale);
        }
        if guard.serials.contains(serial) {
            return Err(Denied::Revoked);
        }
        Ok(())
    }

    /// How many serials the list holds (for logs and metrics).
    pub fn len(&self) -> usize {
        match self.state.read() {
            Ok(guard) => guard.serials.len(),
            Err(poisoned) => poisoned.into_inner().serials.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for DenyList {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("DenyList")
            .field("max_age", &self.max_age)
            .field("len", &self.len())
            .finish()
    }
}

/// A client-certificate verifier that runs `inner` (the chain) and then the
/// deny list.
#[derive(Debug)]
pub(crate) struct DenyListClientVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) deny_list: Arc<DenyList>,
}

impl ClientCertVerifier for DenyListClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let serial = serial_hex(end_entity.as_ref())
            .ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
        match self.deny_list.check(&serial) {
            Ok(()) => Ok(verified),
            Err(Denied::Revoked) => Err(Error::InvalidCertificate(CertificateError::Revoked)),
            Err(Denied::Stale) => Err(Error::General(
                "the revocation list is stale: refusing every client certificate".to_owned(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_list_refuses_until_refreshed_then_only_revoked_serials() {
        let list = DenyList::new(Duration::from_secs(60));
        assert_eq!(list.check("aa"), Err(Denied::Stale));
        list.replace(["aa".to_owned()]);
        assert_eq!(list.check("aa"), Err(Denied::Revoked));
        assert_eq!(list.check("bb"), Ok(()));
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn a_list_older_than_its_maximum_age_refuses_everything() {
        let list = DenyList::new(Duration::ZERO);
        list.replace(Vec::new());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(list.check("bb"), Err(Denied::Stale));
    }
}
