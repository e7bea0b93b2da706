//! Property tests of the envelope decoder, the code that faces untrusted
//! bytes first: it never panics, never accepts what was not signed, and a
//! signed envelope changed in any way is refused. Bounded (a few thousand
//! cases) so CI runs them on every push.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use keel_task::{Operation, TaskPayload, TaskSigner, TaskVerifier};
use proptest::prelude::*;
use uuid::Uuid;

const NOW: i64 = 1_700_000_000;

fn node() -> Uuid {
    Uuid::from_u128(0x0de)
}

fn signed(signer: &TaskSigner, seq: u64, command: Vec<String>) -> Vec<u8> {
    signer
        .sign_to_bytes(&TaskPayload {
            task_id: Uuid::from_u128(u128::from(seq)),
            tenant_id: Some(Uuid::from_u128(7)),
            node_id: node(),
            enrolment_epoch: 2,
            seq,
            issued_at: NOW,
            not_before: NOW,
            expires_at: NOW + 60,
            traceparent: None,
            operation: Operation::StartWorkload {
                allocation_id: Uuid::from_u128(9),
                command,
                vcpus: 1,
                memory_mib: 64,
            },
        })
        .unwrap()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes: refused, never a panic.
    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let signer = TaskSigner::generate();
        let verifier = TaskVerifier::new(node(), 2, [signer.verifying_key()]);
        prop_assert!(verifier.verify(&bytes, NOW, 0).is_err());
    }

    /// JSON-shaped noise in the envelope's own fields: refused.
    #[test]
    fn envelope_shaped_noise_is_refused(
        key_id in "[0-9a-f]{0,20}",
        payload in "[A-Za-z0-9+/=]{0,200}",
        sig in "[A-Za-z0-9+/=]{0,120}",
        version in 0u8..4,
    ) {
        let signer = TaskSigner::generate();
        let verifier = TaskVerifier::new(node(), 2, [signer.verifying_key()]);
        let bytes = serde_json::json!({"v": version, "key_id": key_id, "payload": payload, "sig": sig})
            .to_string();
        prop_assert!(verifier.verify(bytes.as_bytes(), NOW, 0).is_err());
    }

    /// A valid envelope with any one byte changed is refused (unless the
    /// change left it byte-for-byte equal, which a XOR with non-zero
    /// cannot).
    #[test]
    fn any_single_byte_change_of_a_signed_envelope_is_refused(
        command in proptest::collection::vec("[a-z]{1,8}", 1..4),
        position in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let signer = TaskSigner::generate();
        let verifier = TaskVerifier::new(node(), 2, [signer.verifying_key()]);
        let mut bytes = signed(&signer, 5, command);
        prop_assert!(verifier.verify(&bytes, NOW, 0).is_ok());
        let at = position.index(bytes.len());
        bytes[at] ^= mask;
        // A change JSON ignores (whitespace-equivalent) cannot arise from a
        // compact encoding with a XOR: any accepted result is a failure.
        prop_assert!(verifier.verify(&bytes, NOW, 0).is_err());
    }

    /// Truncated envelopes are refused; extended ones too, unless what was
    /// added is JSON whitespace (the signature covers the payload bytes
    /// inside the envelope, so trailing blanks change nothing).
    #[test]
    fn truncated_or_extended_envelopes_are_refused(
        cut in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let signer = TaskSigner::generate();
        let verifier = TaskVerifier::new(node(), 2, [signer.verifying_key()]);
        let bytes = signed(&signer, 5, vec!["sleep".into()]);
        let truncated = &bytes[..cut.index(bytes.len())];
        prop_assert!(verifier.verify(truncated, NOW, 0).is_err());
        let mut extended = bytes.clone();
        extended.extend_from_slice(&tail);
        let only_blanks = tail.iter().all(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'));
        prop_assert_eq!(verifier.verify(&extended, NOW, 0).is_ok(), only_blanks);
    }
}
