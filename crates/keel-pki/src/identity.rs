//! SPIFFE-style identities carried as URI SANs, and reading them back from a
//! peer certificate.
//!
//! Nodes are `spiffe://keel/node/{uuid}`; control-plane components are
//! `spiffe://keel/control-plane/{component}`. The two namespaces are disjoint
//! on purpose: a node certificate can never be read as a worker's, and the
//! other way round. Extraction is strict: exactly one URI SAN, in the expected
//! namespace, in canonical form; anything else yields `None`. These functions
//! do NOT check the chain; call them on a certificate rustls has already
//! verified against the right root.

use uuid::Uuid;
use x509_parser::extensions::GeneralName;

use crate::error::PkiError;

/// URI prefix of node identities.
pub const NODE_URI_PREFIX: &str = "spiffe://keel/node/";

/// URI prefix of control-plane component identities.
pub const CONTROL_PLANE_URI_PREFIX: &str = "spiffe://keel/control-plane/";

const MAX_COMPONENT_LEN: usize = 40;

/// The URI SAN of a node: `spiffe://keel/node/{uuid}` (lowercase, hyphenated).
pub fn node_uri(node_id: Uuid) -> String {
    format!("{NODE_URI_PREFIX}{}", node_id.hyphenated())
}

/// The URI SAN of a control-plane component, after checking its name.
pub fn control_plane_uri(component: &str) -> Result<String, PkiError> {
    validate_component(component)?;
    Ok(format!("{CONTROL_PLANE_URI_PREFIX}{component}"))
}

/// Whether `component` matches `^[a-z0-9-]{1,40}$`.
pub fn is_valid_component(component: &str) -> bool {
    (1..=MAX_COMPONENT_LEN).contains(&component.len())
        && component
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
}

pub(crate) fn validate_component(component: &str) -> Result<(), PkiError> {
    if is_valid_component(component) {
        Ok(())
    } else {
        Err(PkiError::InvalidComponent(component.to_owned()))
    }
}

/// The node id of a peer certificate (DER), if its only URI SAN is a node
/// identity in canonical form.
pub fn node_identity(cert_der: &[u8]) -> Option<Uuid> {
    let uri = single_uri_san(cert_der)?;
    let rest = uri.strip_prefix(NODE_URI_PREFIX)?;
    let node_id = Uuid::try_parse(rest).ok()?;
    // Only the canonical spelling: `Uuid::try_parse` also accepts braces,
    // `urn:uuid:`, upper case and the simple form.
    (node_id.hyphenated().to_string() == rest).then_some(node_id)
}

/// The component name of a peer certificate (DER), if its only URI SAN is a
/// control-plane identity with a valid component name.
pub fn control_plane_identity(cert_der: &[u8]) -> Option<String> {
    let uri = single_uri_san(cert_der)?;
    let component = uri.strip_prefix(CONTROL_PLANE_URI_PREFIX)?;
    is_valid_component(component).then(|| component.to_owned())
}

/// The certificate's URI SAN when there is exactly one; `None` when the
/// certificate does not parse, has trailing bytes, a malformed or duplicated
/// SAN extension, or zero or several URI SANs.
fn single_uri_san(cert_der: &[u8]) -> Option<String> {
    let (rest, certificate) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let san = certificate.subject_alternative_name().ok()??;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let only = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    Some(only.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_names_follow_the_pattern() {
        assert!(is_valid_component("api"));
        assert!(is_valid_component("worker-2"));
        assert!(is_valid_component(&"a".repeat(40)));
        assert!(!is_valid_component(""));
        assert!(!is_valid_component(&"a".repeat(41)));
        assert!(!is_valid_component("API"));
        assert!(!is_valid_component("api/../node"));
        assert!(!is_valid_component("api worker"));
        assert!(!is_valid_component("wörker"));
    }

    #[test]
    fn node_uri_is_lowercase_and_hyphenated() {
        let node_id = Uuid::from_u128(0xABCD_EF01_2345_6789_ABCD_EF01_2345_6789);
        assert_eq!(
            node_uri(node_id),
            "spiffe://keel/node/abcdef01-2345-6789-abcd-ef0123456789"
        );
    }

    #[test]
    fn garbage_is_no_identity() {
        assert_eq!(node_identity(b"not a certificate"), None);
        assert_eq!(control_plane_identity(&[]), None);
    }
}
