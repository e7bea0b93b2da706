//! Key statements: how a node learns a task-signing key without trusting
//! whoever serves the key list.
//!
//! The agent learns public keys over its authenticated channel, but that
//! list comes out of the control plane's database, and signed tasks exist
//! precisely so that a database an attacker can write to cannot command a
//! node. So every key is published with a statement signed by the
//! control-plane CA — whose fingerprint the operator pinned when the node
//! joined and whose private key stays sealed by the KMS — naming the key,
//! when it starts signing and when it retires:
//!
//! `keel-task-signing-key-v1\0 ‖ public key (32) ‖ signs_from (i64 BE) ‖
//! retires? (1 byte) ‖ retires_at (i64 BE, 0 if not)`
//!
//! A row written into the key table, or a retirement moved, gains an
//! attacker nothing without the CA's key. This module builds the message;
//! `keel_pki` signs and verifies it.

use ed25519_dalek::VerifyingKey;

/// The statement's domain: it never passes for any other signed message.
pub const KEY_STATEMENT_DOMAIN: &[u8] = b"keel-task-signing-key-v1\0";

/// The message the control-plane CA signs for one task-signing key.
pub fn key_statement(key: &VerifyingKey, signs_from: i64, retires_at: Option<i64>) -> Vec<u8> {
    let mut message = Vec::with_capacity(32 + 8 + 1 + 8);
    message.extend_from_slice(key.as_bytes());
    message.extend_from_slice(&signs_from.to_be_bytes());
    message.push(u8::from(retires_at.is_some()));
    message.extend_from_slice(&retires_at.unwrap_or(0).to_be_bytes());
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TaskSigner;

    #[test]
    fn every_field_changes_the_statement() {
        let key = TaskSigner::generate().verifying_key();
        let other = TaskSigner::generate().verifying_key();
        let base = key_statement(&key, 10, Some(20));
        assert_eq!(base.len(), 49);
        for changed in [
            key_statement(&other, 10, Some(20)),
            key_statement(&key, 11, Some(20)),
            key_statement(&key, 10, Some(21)),
            key_statement(&key, 10, None),
        ] {
            assert_ne!(changed, base);
        }
        // "Never retires" and "retires at 0" differ.
        assert_ne!(
            key_statement(&key, 10, None),
            key_statement(&key, 10, Some(0))
        );
    }
}
