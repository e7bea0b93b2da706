//! Key fingerprints and the text form in which the agent learns public keys.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use ed25519_dalek::{PUBLIC_KEY_LENGTH, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::TaskError;

/// How many leading bytes of the SHA-256 digest make up a key id.
///
/// Eight bytes (sixteen hex characters) is plenty to tell a handful of
/// concurrently trusted keys apart; the key id is a selector, not a security
/// boundary, because the signature is always checked against the full key.
const KEY_ID_DIGEST_BYTES: usize = 8;

/// Returns the key id of a public key: the first 16 lowercase hex characters
/// of the SHA-256 of its 32 raw bytes.
pub fn key_id_of(verifying_key: &VerifyingKey) -> String {
    let digest = Sha256::digest(verifying_key.as_bytes());
    digest
        .iter()
        .take(KEY_ID_DIGEST_BYTES)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Encodes a public key as standard base64 of its 32 raw bytes, the form in
/// which the control plane hands trusted keys to the agent.
pub fn verifying_key_to_base64(verifying_key: &VerifyingKey) -> String {
    BASE64_STANDARD.encode(verifying_key.as_bytes())
}

/// Decodes a public key from standard base64 of its 32 raw bytes.
///
/// Weak (small-order) keys are refused here rather than at verification time
/// so that a misconfigured trust list fails loudly when it is loaded.
pub fn verifying_key_from_base64(encoded: &str) -> Result<VerifyingKey, TaskError> {
    let decoded = BASE64_STANDARD.decode(encoded.trim())?;
    let raw_key_bytes: [u8; PUBLIC_KEY_LENGTH] =
        decoded
            .as_slice()
            .try_into()
            .map_err(|_| TaskError::InvalidPublicKeyLength {
                length: decoded.len(),
            })?;
    let verifying_key =
        VerifyingKey::from_bytes(&raw_key_bytes).map_err(|_| TaskError::InvalidPublicKeyPoint)?;
    if verifying_key.is_weak() {
        return Err(TaskError::WeakPublicKey);
    }
    Ok(verifying_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn sample_verifying_key() -> VerifyingKey {
        SigningKey::from_bytes(&[7u8; 32]).verifying_key()
    }

    #[test]
    fn key_id_is_sixteen_lowercase_hex_characters_of_the_sha256_of_the_key() {
        let verifying_key = sample_verifying_key();
        let key_id = key_id_of(&verifying_key);
        assert_eq!(key_id.len(), 16);
        assert!(
            key_id
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        let full_digest = Sha256::digest(verifying_key.as_bytes());
        let expected: String = full_digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(key_id, expected[..16]);
    }

    #[test]
    fn different_keys_have_different_key_ids() {
        let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
        assert_ne!(key_id_of(&sample_verifying_key()), key_id_of(&other));
    }

    #[test]
    fn a_public_key_survives_a_base64_round_trip() {
        let verifying_key = sample_verifying_key();
        let encoded = verifying_key_to_base64(&verifying_key);
        assert_eq!(verifying_key_from_base64(&encoded).unwrap(), verifying_key);
    }

    #[test]
    fn a_public_key_of_the_wrong_length_is_refused() {
        let encoded = BASE64_STANDARD.encode([1u8; 31]);
        assert!(matches!(
            verifying_key_from_base64(&encoded),
            Err(TaskError::InvalidPublicKeyLength { length: 31 })
        ));
    }

    #[test]
    fn a_public_key_that_is_not_base64_is_refused() {
        assert!(matches!(
            verifying_key_from_base64("not base64!"),
            Err(TaskError::InvalidPublicKeyBase64(_))
        ));
    }

    #[test]
    fn a_weak_public_key_is_refused() {
        // The compressed encoding of the identity point has small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let encoded = BASE64_STANDARD.encode(identity);
        assert!(matches!(
            verifying_key_from_base64(&encoded),
            Err(TaskError::WeakPublicKey)
        ));
    }
}
