//! The control plane's half: turning payloads into signed envelopes.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
// `ed25519-dalek` exposes `zeroize` only through this re-export chain; using it
// keeps the wipe-on-drop wrapper identical to the one `pkcs8` itself returns
// without adding a direct dependency.
use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use ed25519_dalek::{SECRET_KEY_LENGTH, Signer as _, SigningKey, VerifyingKey};

use crate::{TaskEnvelope, TaskError, TaskPayload, key_id_of};

/// The fixed DER header of an RFC 8410 PKCS#8 v1 Ed25519 private key:
/// `SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING {
/// OCTET STRING (32 bytes) } }`. Only the 32-byte seed that follows varies.
const ED25519_PKCS8_V1_DER_HEADER: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

const PEM_PRIVATE_KEY_BEGIN: &str = "-----BEGIN PRIVATE KEY-----\n";
const PEM_PRIVATE_KEY_END: &str = "-----END PRIVATE KEY-----\n";

/// Signs task payloads with one Ed25519 key.
///
/// The key id is derived from the public key once, at construction, so every
/// envelope this signer produces names its key consistently.
pub struct TaskSigner {
    key_id: String,
    key: SigningKey,
}

impl TaskSigner {
    /// Wraps an existing signing key.
    pub fn new(key: SigningKey) -> Self {
        let key_id = key_id_of(&key.verifying_key());
        Self { key_id, key }
    }

    /// Creates a signer with a fresh key from the operating system's RNG.
    pub fn generate() -> Self {
        Self::new(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Loads a signer from a PKCS#8 PEM (`BEGIN PRIVATE KEY`) document.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, TaskError> {
        let key =
            SigningKey::from_pkcs8_pem(pem).map_err(|error| TaskError::InvalidPrivateKeyPem {
                detail: error.to_string(),
            })?;
        Ok(Self::new(key))
    }

    /// Exports the private key as a PKCS#8 v1 PEM document, the form that
    /// `openssl genpkey -algorithm ed25519` writes.
    ///
    /// The document is built directly from its fixed RFC 8410 layout rather
    /// than through a general DER encoder, which makes the export infallible;
    /// a unit test pins the output to the `pkcs8` crate's own v1 encoder.
    /// Every buffer that holds key material is wiped when dropped.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        let mut der = Zeroizing::new(Vec::with_capacity(
            ED25519_PKCS8_V1_DER_HEADER.len() + SECRET_KEY_LENGTH,
        ));
        der.extend_from_slice(&ED25519_PKCS8_V1_DER_HEADER);
        der.extend_from_slice(self.key.as_bytes());

        // The 48-byte document encodes to exactly 64 base64 characters, which
        // is one full PEM line, so no line wrapping is needed. Capacity is
        // reserved up front so the string never reallocates and leaves an
        // unwiped copy behind.
        let base64_len = der.len().div_ceil(3) * 4;
        let mut pem = Zeroizing::new(String::with_capacity(
            PEM_PRIVATE_KEY_BEGIN.len() + base64_len + 1 + PEM_PRIVATE_KEY_END.len(),
        ));
        pem.push_str(PEM_PRIVATE_KEY_BEGIN);
        BASE64_STANDARD.encode_string(der.as_slice(), &mut pem);
        pem.push('\n');
        pem.push_str(PEM_PRIVATE_KEY_END);
        pem
    }

    /// The public half, to be distributed to node agents.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The key id stamped on every envelope this signer produces.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Encodes the payload canonically and signs it.
    pub fn sign(&self, payload: &TaskPayload) -> Result<TaskEnvelope, TaskError> {
        let payload_bytes = serde_json::to_vec(payload)?;
        Ok(self.sign_payload_bytes(&payload_bytes))
    }

    /// Like [`TaskSigner::sign`], but returns the envelope as JSON bytes ready
    /// to send.
    pub fn sign_to_bytes(&self, payload: &TaskPayload) -> Result<Vec<u8>, TaskError> {
        self.sign(payload)?.to_json_bytes()
    }

    /// Signs arbitrary payload bytes. Kept crate-private so that the public
    /// API can only ever emit canonical payloads; tests use it to build
    /// correctly signed but otherwise hostile envelopes.
    pub(crate) fn sign_payload_bytes(&self, payload_bytes: &[u8]) -> TaskEnvelope {
        let signature = self.key.sign(&crate::signed_message(payload_bytes));
        TaskEnvelope::from_parts(&self.key_id, payload_bytes, &signature.to_bytes())
    }
}

impl fmt::Debug for TaskSigner {
    /// Shows only the key id, so a signer can be logged without leaking the key.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TaskSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    use ed25519_dalek::pkcs8::{EncodePrivateKey as _, KeypairBytes};

    #[test]
    fn the_key_id_matches_the_fingerprint_of_the_public_key() {
        let signer = TaskSigner::generate();
        assert_eq!(signer.key_id(), key_id_of(&signer.verifying_key()));
    }

    #[test]
    fn generated_signers_have_distinct_keys() {
        assert_ne!(
            TaskSigner::generate().key_id(),
            TaskSigner::generate().key_id()
        );
    }

    #[test]
    fn a_signer_survives_a_pem_round_trip() {
        let signer = TaskSigner::generate();
        let pem = signer.to_pkcs8_pem();
        let reloaded = TaskSigner::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(reloaded.key_id(), signer.key_id());
        assert_eq!(reloaded.verifying_key(), signer.verifying_key());
    }

    #[test]
    fn the_pem_export_matches_the_pkcs8_crate_v1_encoder_byte_for_byte() {
        for _ in 0..8 {
            let signer = TaskSigner::generate();
            let key_pair_without_public_key = KeypairBytes {
                secret_key: signer.key.to_bytes(),
                public_key: None,
            };
            let library_pem = key_pair_without_public_key
                .to_pkcs8_pem(LineEnding::LF)
                .unwrap();
            assert_eq!(signer.to_pkcs8_pem().as_str(), library_pem.as_str());
        }
    }

    #[test]
    fn a_pkcs8_v2_pem_with_an_embedded_public_key_is_accepted() {
        let signer = TaskSigner::generate();
        let v2_pem = signer.key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let reloaded = TaskSigner::from_pkcs8_pem(&v2_pem).unwrap();
        assert_eq!(reloaded.key_id(), signer.key_id());
    }

    #[test]
    fn garbage_pem_is_refused() {
        assert!(matches!(
            TaskSigner::from_pkcs8_pem(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            ),
            Err(TaskError::InvalidPrivateKeyPem { .. })
        ));
        assert!(TaskSigner::from_pkcs8_pem("").is_err());
    }

    #[test]
    fn debug_output_does_not_contain_the_private_key() {
        let signer = TaskSigner::new(SigningKey::from_bytes(&[0xab; 32]));
        assert_eq!(
            format!("{signer:?}"),
            format!("TaskSigner {{ key_id: {:?}, .. }}", signer.key_id())
        );
    }
}
