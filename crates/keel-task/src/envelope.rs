//! The outer, unauthenticated wrapper that carries a signed payload.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use serde::{Deserialize, Serialize};

use crate::TaskError;

/// A signed task as it travels over the wire.
///
/// Nothing in an envelope is trusted on its own: `key_id` only selects which
/// trusted key to try, and `payload` means nothing until `sig` has been
/// verified over it. Unknown fields are rejected so that a sender cannot
/// smuggle data past the verifier in fields it would silently ignore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskEnvelope {
    /// The envelope format version; always [`crate::ENVELOPE_VERSION`].
    pub v: u8,
    /// The fingerprint of the signing key, as produced by [`crate::key_id_of`].
    pub key_id: String,
    /// Standard base64 of the exact payload bytes that were signed.
    pub payload: String,
    /// Standard base64 of the 64-byte Ed25519 signature over
    /// [`crate::DOMAIN_PREFIX`] followed by the payload bytes.
    pub sig: String,
}

impl TaskEnvelope {
    /// Builds an envelope from raw payload bytes and a raw signature.
    pub(crate) fn from_parts(key_id: &str, payload_bytes: &[u8], signature_bytes: &[u8]) -> Self {
        Self {
            v: crate::ENVELOPE_VERSION,
            key_id: key_id.to_owned(),
            payload: BASE64_STANDARD.encode(payload_bytes),
            sig: BASE64_STANDARD.encode(signature_bytes),
        }
    }

    /// Encodes the envelope as the compact JSON bytes that go on the wire.
    pub fn to_json_bytes(&self) -> Result<Vec<u8>, TaskError> {
        Ok(serde_json::to_vec(self)?)
    }
}
