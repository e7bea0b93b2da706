//! Endorsements: how a node learns a new task-signing key without trusting
//! whoever serves the key list.
//!
//! The agent learns public keys over its authenticated channel, but that
//! list comes out of the control plane's database, and signed tasks exist
//! precisely so that a database an attacker can write to cannot command a
//! node. So a new key counts only when a key the node already trusts
//! signed it: at rotation the current signer signs
//! `keel-task-key-endorsement-v1\0 ‖ new public key ‖ signs_from (i64 BE)`.
//! Writing a row into the key table gains an attacker nothing without a
//! private key, and those stay sealed by the KMS.

use ed25519_dalek::{Signature, Signer as _, VerifyingKey};

use crate::TaskSigner;

/// Domain separation: an endorsement can never pass for a task signature
/// (whose message starts with `keel-task-v1\0`) or the other way round.
pub const ENDORSEMENT_PREFIX: &[u8] = b"keel-task-key-endorsement-v1\0";

fn message(endorsed: &VerifyingKey, signs_from: i64) -> Vec<u8> {
    let mut message = Vec::with_capacity(ENDORSEMENT_PREFIX.len() + 32 + 8);
    message.extend_from_slice(ENDORSEMENT_PREFIX);
    message.extend_from_slice(endorsed.as_bytes());
    message.extend_from_slice(&signs_from.to_be_bytes());
    message
}

impl TaskSigner {
    /// Signs `endorsed` as the key that signs tasks from `signs_from`
    /// (unix seconds). Returns the 64-byte signature.
    pub fn endorse(&self, endorsed: &VerifyingKey, signs_from: i64) -> [u8; 64] {
        self.signing_key()
            .sign(&message(endorsed, signs_from))
            .to_bytes()
    }
}

/// Whether `endorser` signed `endorsed` with this `signs_from` (strict
/// Ed25519 verification, as for tasks).
pub fn endorsement_is_valid(
    endorser: &VerifyingKey,
    endorsed: &VerifyingKey,
    signs_from: i64,
    signature: &[u8],
) -> bool {
    let Ok(signature) = Signature::from_slice(signature) else {
        return false;
    };
    endorser
        .verify_strict(&message(endorsed, signs_from), &signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endorsement_verifies_only_for_its_key_time_and_endorser() {
        let old = TaskSigner::generate();
        let new = TaskSigner::generate();
        let stranger = TaskSigner::generate();
        let signature = old.endorse(&new.verifying_key(), 1_700_000_000);

        assert!(endorsement_is_valid(
            &old.verifying_key(),
            &new.verifying_key(),
            1_700_000_000,
            &signature
        ));
        // Another time, another key, another endorser, a flipped bit.
        assert!(!endorsement_is_valid(
            &old.verifying_key(),
            &new.verifying_key(),
            1_700_000_001,
            &signature
        ));
        assert!(!endorsement_is_valid(
            &old.verifying_key(),
            &stranger.verifying_key(),
            1_700_000_000,
            &signature
        ));
        assert!(!endorsement_is_valid(
            &stranger.verifying_key(),
            &new.verifying_key(),
            1_700_000_000,
            &signature
        ));
        let mut flipped = signature;
        flipped[10] ^= 1;
        assert!(!endorsement_is_valid(
            &old.verifying_key(),
            &new.verifying_key(),
            1_700_000_000,
            &flipped
        ));
        assert!(!endorsement_is_valid(
            &old.verifying_key(),
            &new.verifying_key(),
            1_700_000_000,
            &signature[..63]
        ));
    }

    #[test]
    fn a_task_signature_is_not_an_endorsement() {
        // Same key, but the task domain prefix: never accepted here.
        let old = TaskSigner::generate();
        let new = TaskSigner::generate();
        let mut task_message = crate::DOMAIN_PREFIX.to_vec();
        task_message
            .extend_from_slice(&message(&new.verifying_key(), 5)[ENDORSEMENT_PREFIX.len()..]);
        let signature = old.signing_key().sign(&task_message).to_bytes();
        assert!(!endorsement_is_valid(
            &old.verifying_key(),
            &new.verifying_key(),
            5,
            &signature
        ));
    }
}
