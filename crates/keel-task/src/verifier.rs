//! The node agent's half: deciding whether an incoming task may be acted on.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use ed25519_dalek::{SIGNATURE_LENGTH, Signature, VerifyingKey};
use uuid::Uuid;

use crate::{
    ENVELOPE_VERSION, MAX_ENVELOPE_BYTES, Rejection, TaskEnvelope, TaskPayload, key_id_of,
    signed_message,
};

/// How far the agent's clock may disagree with the control plane's, in
/// seconds, before a task is considered outside its validity window.
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: i64 = 30;

/// The longest validity window, in seconds, a task may claim. Short-lived
/// tasks limit how long a leaked envelope stays useful.
pub const DEFAULT_MAX_LIFETIME_SECS: i64 = 900;

/// Upper bound on how much unauthenticated text a rejection carries, so a
/// hostile envelope cannot blow up log lines.
const MAX_REJECTION_DETAIL_CHARS: usize = 200;

/// Verifies envelopes on behalf of one node in one enrolment epoch.
///
/// The verifier holds no mutable replay state: the caller passes in the
/// highest sequence number it has already acted on and, after acting on the
/// returned payload, records the payload's `seq` as the new high-water mark.
/// Keeping that state outside lets the agent persist it however it likes.
#[derive(Debug, Clone)]
pub struct TaskVerifier {
    keys: HashMap<String, VerifyingKey>,
    node_id: Uuid,
    enrolment_epoch: u64,
    max_clock_skew_secs: i64,
    max_lifetime_secs: i64,
}

impl TaskVerifier {
    /// Creates a verifier for `node_id` in `enrolment_epoch` that trusts the
    /// given keys, with the default skew and lifetime limits.
    pub fn new(
        node_id: Uuid,
        enrolment_epoch: u64,
        trusted_keys: impl IntoIterator<Item = VerifyingKey>,
    ) -> Self {
        let mut verifier = Self {
            keys: HashMap::new(),
            node_id,
            enrolment_epoch,
            max_clock_skew_secs: DEFAULT_MAX_CLOCK_SKEW_SECS,
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
        };
        for verifying_key in trusted_keys {
            verifier.add_key(verifying_key);
        }
        verifier
    }

    /// Overrides the clock-skew allowance. Negative values are treated as
    /// zero, because a negative allowance would reject tasks that are valid.
    pub fn with_max_clock_skew_secs(mut self, max_clock_skew_secs: i64) -> Self {
        self.max_clock_skew_secs = max_clock_skew_secs.max(0);
        self
    }

    /// Overrides the longest validity window a task may claim.
    pub fn with_max_lifetime_secs(mut self, max_lifetime_secs: i64) -> Self {
        self.max_lifetime_secs = max_lifetime_secs;
        self
    }

    /// Trusts another signing key (for example during key rotation) and
    /// returns its key id.
    pub fn add_key(&mut self, verifying_key: VerifyingKey) -> String {
        let key_id = key_id_of(&verifying_key);
        self.keys.insert(key_id.clone(), verifying_key);
        key_id
    }

    /// Stops trusting the key with this id; returns whether it was trusted.
    pub fn remove_key(&mut self, key_id: &str) -> bool {
        self.keys.remove(key_id).is_some()
    }

    /// Whether a key with this id is currently trusted.
    pub fn trusts_key_id(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    /// The node this verifier accepts tasks for.
    pub fn node_id(&self) -> Uuid {
        self.node_id
    }

    /// The enrolment epoch this verifier accepts tasks for.
    pub fn enrolment_epoch(&self) -> u64 {
        self.enrolment_epoch
    }

    /// The clock-skew allowance in seconds.
    pub fn max_clock_skew_secs(&self) -> i64 {
        self.max_clock_skew_secs
    }

    /// The longest validity window in seconds a task may claim.
    pub fn max_lifetime_secs(&self) -> i64 {
        self.max_lifetime_secs
    }

    /// Checks an envelope exactly as received and returns its payload if, and
    /// only if, the node may act on it now.
    ///
    /// The checks run in a fixed order and the first failure is returned:
    /// size, envelope JSON, version, key id, base64 of payload and signature,
    /// the signature itself, payload JSON, canonical encoding, node, epoch,
    /// validity window, and finally replay against `high_water_seq`. Nothing
    /// inside the payload is looked at until the signature has been checked.
    pub fn verify(
        &self,
        envelope_bytes: &[u8],
        now_unix: i64,
        high_water_seq: u64,
    ) -> Result<TaskPayload, Rejection> {
        let payload_bytes = self.authenticate(envelope_bytes)?;
        let payload = decode_canonical_payload(&payload_bytes)?;
        self.check_binding(&payload)?;
        self.check_time_window(&payload, now_unix)?;
        check_not_replayed(&payload, high_water_seq)?;
        Ok(payload)
    }

    /// Runs every check up to and including the signature and returns the
    /// authenticated payload bytes.
    fn authenticate(&self, envelope_bytes: &[u8]) -> Result<Vec<u8>, Rejection> {
        // The size check comes first so that an oversized input costs no
        // parsing at all.
        if envelope_bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(Rejection::TooLarge {
                size: envelope_bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }

        let envelope: TaskEnvelope = serde_json::from_slice(envelope_bytes).map_err(|error| {
            Rejection::MalformedEnvelope {
                detail: bounded_detail(&error.to_string()),
            }
        })?;

        if envelope.v != ENVELOPE_VERSION {
            return Err(Rejection::UnsupportedVersion {
                version: envelope.v,
            });
        }

        let verifying_key =
            self.keys
                .get(&envelope.key_id)
                .ok_or_else(|| Rejection::UnknownKey {
                    key_id: bounded_detail(&envelope.key_id),
                })?;

        let payload_bytes = BASE64_STANDARD.decode(&envelope.payload).map_err(|error| {
            Rejection::MalformedEnvelope {
                detail: format!("payload is not valid base64: {error}"),
            }
        })?;
        let signature_bytes = BASE64_STANDARD.decode(&envelope.sig).map_err(|error| {
            Rejection::MalformedEnvelope {
                detail: format!("sig is not valid base64: {error}"),
            }
        })?;
        // A missing or truncated signature is well-formed base64 but proves
        // nothing, so it is reported as a signature failure: to an operator,
        // "unsigned" and "signed wrongly" call for the same response.
        let signature_array: [u8; SIGNATURE_LENGTH] = signature_bytes
            .as_slice()
            .try_into()
            .map_err(|_| Rejection::BadSignature)?;
        let signature = Signature::from_bytes(&signature_array);

        // `verify_strict` also refuses weak keys and non-canonical signature
        // encodings, so one payload has exactly one acceptable signature
        // under a given key.
        verifying_key
            .verify_strict(&signed_message(&payload_bytes), &signature)
            .map_err(|_| Rejection::BadSignature)?;

        Ok(payload_bytes)
    }

    /// Checks that the task was issued for this node in its current enrolment.
    fn check_binding(&self, payload: &TaskPayload) -> Result<(), Rejection> {
        if payload.node_id != self.node_id {
            return Err(Rejection::WrongNode {
                expected_node_id: self.node_id,
                task_node_id: payload.node_id,
            });
        }
        if payload.enrolment_epoch != self.enrolment_epoch {
            return Err(Rejection::WrongEpoch {
                expected_epoch: self.enrolment_epoch,
                task_epoch: payload.enrolment_epoch,
            });
        }
        Ok(())
    }

    /// Checks the validity window against the caller's clock.
    ///
    /// Saturating arithmetic keeps extreme timestamps from overflowing; a
    /// saturated result always errs on the side of rejecting.
    fn check_time_window(&self, payload: &TaskPayload, now_unix: i64) -> Result<(), Rejection> {
        if now_unix.saturating_add(self.max_clock_skew_secs) < payload.not_before {
            return Err(Rejection::NotYetValid {
                not_before: payload.not_before,
                now: now_unix,
            });
        }
        if now_unix.saturating_sub(self.max_clock_skew_secs) > payload.expires_at {
            return Err(Rejection::Expired {
                expires_at: payload.expires_at,
                now: now_unix,
            });
        }
        let lifetime_secs = payload.expires_at.saturating_sub(payload.issued_at);
        if payload.expires_at < payload.not_before || lifetime_secs > self.max_lifetime_secs {
            return Err(Rejection::InvalidWindow {
                issued_at: payload.issued_at,
                not_before: payload.not_before,
                expires_at: payload.expires_at,
            });
        }
        Ok(())
    }
}

/// Decodes authenticated payload bytes and insists they are exactly the
/// canonical encoding of what they decode to.
fn decode_canonical_payload(payload_bytes: &[u8]) -> Result<TaskPayload, Rejection> {
    let payload: TaskPayload =
        serde_json::from_slice(payload_bytes).map_err(|error| Rejection::MalformedPayload {
            detail: bounded_detail(&error.to_string()),
        })?;
    // Re-encoding cannot realistically fail, but if it did the bytes could
    // not be shown to be canonical, so that is what gets reported.
    let canonical_bytes = serde_json::to_vec(&payload).map_err(|_| Rejection::NonCanonical)?;
    if canonical_bytes != payload_bytes {
        return Err(Rejection::NonCanonical);
    }
    Ok(payload)
}

/// Rejects a task whose sequence number is not above the high-water mark.
fn check_not_replayed(payload: &TaskPayload, high_water_seq: u64) -> Result<(), Rejection> {
    if payload.seq <= high_water_seq {
        return Err(Rejection::Replayed {
            seq: payload.seq,
            high_water_seq,
        });
    }
    Ok(())
}

/// Truncates and escapes text derived from untrusted input before it goes into
/// a rejection, so it stays short and on one line.
fn bounded_detail(text: &str) -> String {
    let truncated: String = text.chars().take(MAX_REJECTION_DETAIL_CHARS).collect();
    let mut escaped = truncated.escape_debug().to_string();
    if text.chars().nth(MAX_REJECTION_DETAIL_CHARS).is_some() {
        escaped.push('…');
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DOMAIN_PREFIX, Operation, TaskSigner};

    const NOW: i64 = 1_700_000_000;
    const EPOCH: u64 = 4;
    const HIGH_WATER: u64 = 10;

    fn this_node_id() -> Uuid {
        Uuid::from_u128(0x0000_70de)
    }

    struct Fixture {
        signer: TaskSigner,
        verifier: TaskVerifier,
    }

    impl Fixture {
        fn new() -> Self {
            let signer = TaskSigner::generate();
            let verifier = TaskVerifier::new(this_node_id(), EPOCH, [signer.verifying_key()]);
            Self { signer, verifier }
        }

        fn verify(&self, envelope_bytes: &[u8]) -> Result<TaskPayload, Rejection> {
            self.verifier.verify(envelope_bytes, NOW, HIGH_WATER)
        }

        fn sign(&self, payload: &TaskPayload) -> Vec<u8> {
            self.signer.sign_to_bytes(payload).unwrap()
        }

        /// Signs arbitrary bytes as the payload, to build hostile envelopes
        /// that nonetheless carry a valid signature.
        fn sign_raw(&self, payload_bytes: &[u8]) -> Vec<u8> {
            envelope_to_bytes(&self.signer.sign_payload_bytes(payload_bytes))
        }

        /// Rebuilds the fixture signer's key from its PEM export, so tests can
        /// sign messages the public API deliberately cannot produce.
        fn signer_key_for_tests(&self) -> ed25519_dalek::SigningKey {
            use ed25519_dalek::pkcs8::DecodePrivateKey as _;
            ed25519_dalek::SigningKey::from_pkcs8_pem(&self.signer.to_pkcs8_pem()).unwrap()
        }

        fn sign_then_edit(
            &self,
            payload: &TaskPayload,
            edit: impl FnOnce(&mut TaskEnvelope),
        ) -> Vec<u8> {
            let mut envelope = self.signer.sign(payload).unwrap();
            edit(&mut envelope);
            envelope_to_bytes(&envelope)
        }
    }

    fn good_payload() -> TaskPayload {
        TaskPayload {
            task_id: Uuid::from_u128(0x7a5c),
            tenant_id: Some(Uuid::from_u128(0x7e4a)),
            node_id: this_node_id(),
            enrolment_epoch: EPOCH,
            seq: HIGH_WATER + 1,
            issued_at: NOW - 10,
            not_before: NOW - 10,
            expires_at: NOW + 300,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
            operation: Operation::StartWorkload {
                allocation_id: Uuid::from_u128(0xa110c),
                command: vec!["/bin/app".to_owned(), "--port=8080".to_owned()],
                vcpus: 2,
                memory_mib: 1024,
            },
        }
    }

    fn envelope_to_bytes(envelope: &TaskEnvelope) -> Vec<u8> {
        envelope.to_json_bytes().unwrap()
    }

    fn flip_one_bit_of_base64(encoded: &mut String, byte_index: usize) {
        let mut bytes = BASE64_STANDARD.decode(encoded.as_str()).unwrap();
        bytes[byte_index] ^= 0x01;
        *encoded = BASE64_STANDARD.encode(bytes);
    }

    fn canonical_json(payload: &TaskPayload) -> String {
        serde_json::to_string(payload).unwrap()
    }

    // --- Accepted tasks -------------------------------------------------

    #[test]
    fn a_correctly_signed_task_for_this_node_verifies() {
        let fixture = Fixture::new();
        let payload = good_payload();
        assert_eq!(fixture.verify(&fixture.sign(&payload)), Ok(payload));
    }

    #[test]
    fn a_stop_task_without_tenant_or_trace_verifies() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            tenant_id: None,
            traceparent: None,
            operation: Operation::StopWorkload {
                allocation_id: Uuid::from_u128(5),
            },
            ..good_payload()
        };
        assert_eq!(fixture.verify(&fixture.sign(&payload)), Ok(payload));
    }

    #[test]
    fn the_signature_covers_the_domain_prefix_and_the_exact_payload_bytes() {
        let fixture = Fixture::new();
        let envelope = fixture.signer.sign(&good_payload()).unwrap();
        let payload_bytes = BASE64_STANDARD.decode(&envelope.payload).unwrap();
        assert_eq!(payload_bytes, serde_json::to_vec(&good_payload()).unwrap());
        let mut message = DOMAIN_PREFIX.to_vec();
        message.extend_from_slice(&payload_bytes);
        let signature_bytes: [u8; 64] = BASE64_STANDARD
            .decode(&envelope.sig)
            .unwrap()
            .try_into()
            .unwrap();
        fixture
            .signer
            .verifying_key()
            .verify_strict(&message, &Signature::from_bytes(&signature_bytes))
            .unwrap();
        // Without the prefix the same signature must not verify.
        assert!(
            fixture
                .signer
                .verifying_key()
                .verify_strict(&payload_bytes, &Signature::from_bytes(&signature_bytes))
                .is_err()
        );
    }

    #[test]
    fn a_task_is_accepted_at_the_edges_of_the_clock_skew_allowance() {
        let fixture = Fixture::new();
        let starts_within_skew = TaskPayload {
            issued_at: NOW + 30,
            not_before: NOW + 30,
            expires_at: NOW + 300,
            ..good_payload()
        };
        assert!(fixture.verify(&fixture.sign(&starts_within_skew)).is_ok());
        let ended_within_skew = TaskPayload {
            issued_at: NOW - 300,
            not_before: NOW - 300,
            expires_at: NOW - 30,
            ..good_payload()
        };
        assert!(fixture.verify(&fixture.sign(&ended_within_skew)).is_ok());
    }

    #[test]
    fn a_task_with_exactly_the_maximum_lifetime_is_accepted() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            issued_at: NOW,
            not_before: NOW,
            expires_at: NOW + DEFAULT_MAX_LIFETIME_SECS,
            ..good_payload()
        };
        assert!(fixture.verify(&fixture.sign(&payload)).is_ok());
    }

    #[test]
    fn an_envelope_exactly_at_the_size_limit_is_not_rejected_for_size() {
        let fixture = Fixture::new();
        let mut bytes = fixture.sign(&good_payload());
        bytes.resize(MAX_ENVELOPE_BYTES, b' ');
        assert!(fixture.verify(&bytes).is_ok());
    }

    #[test]
    fn a_key_added_later_is_trusted_and_a_removed_key_is_not() {
        let mut fixture = Fixture::new();
        let rotated_signer = TaskSigner::generate();
        let envelope_bytes = rotated_signer.sign_to_bytes(&good_payload()).unwrap();
        assert!(matches!(
            fixture.verify(&envelope_bytes),
            Err(Rejection::UnknownKey { .. })
        ));

        let key_id = fixture.verifier.add_key(rotated_signer.verifying_key());
        assert_eq!(key_id, rotated_signer.key_id());
        assert!(fixture.verifier.trusts_key_id(&key_id));
        assert!(fixture.verify(&envelope_bytes).is_ok());

        assert!(fixture.verifier.remove_key(&key_id));
        assert!(matches!(
            fixture.verify(&envelope_bytes),
            Err(Rejection::UnknownKey { .. })
        ));
    }

    #[test]
    fn a_key_learned_as_base64_verifies_tasks() {
        let signer = TaskSigner::generate();
        let encoded = crate::verifying_key_to_base64(&signer.verifying_key());
        let learned = crate::verifying_key_from_base64(&encoded).unwrap();
        let verifier = TaskVerifier::new(this_node_id(), EPOCH, [learned]);
        let bytes = signer.sign_to_bytes(&good_payload()).unwrap();
        assert!(verifier.verify(&bytes, NOW, HIGH_WATER).is_ok());
    }

    // --- Size and envelope shape ----------------------------------------

    #[test]
    fn an_oversize_envelope_is_rejected_before_parsing() {
        let fixture = Fixture::new();
        let garbage = vec![b'x'; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(
            fixture.verify(&garbage),
            Err(Rejection::TooLarge {
                size: MAX_ENVELOPE_BYTES + 1,
                limit: MAX_ENVELOPE_BYTES
            })
        );
    }

    #[test]
    fn an_oversize_but_correctly_signed_task_is_rejected() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            operation: Operation::StartWorkload {
                allocation_id: Uuid::from_u128(1),
                command: vec!["a".repeat(MAX_ENVELOPE_BYTES)],
                vcpus: 1,
                memory_mib: 64,
            },
            ..good_payload()
        };
        assert!(matches!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::TooLarge { .. })
        ));
    }

    #[test]
    fn input_that_is_not_json_is_rejected_as_a_malformed_envelope() {
        let fixture = Fixture::new();
        for input in [&b""[..], b"null", b"[]", b"{", b"\xff\xfe"] {
            assert!(
                matches!(
                    fixture.verify(input),
                    Err(Rejection::MalformedEnvelope { .. })
                ),
                "{input:?}"
            );
        }
    }

    #[test]
    fn trailing_data_after_the_envelope_is_rejected() {
        let fixture = Fixture::new();
        let mut bytes = fixture.sign(&good_payload());
        bytes.extend_from_slice(b"{}");
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::MalformedEnvelope { .. })
        ));
    }

    #[test]
    fn unknown_fields_in_the_envelope_are_rejected() {
        let fixture = Fixture::new();
        let bytes = fixture.sign(&good_payload());
        let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        json["comment"] = serde_json::Value::from("ignore me");
        let bytes = serde_json::to_vec(&json).unwrap();
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::MalformedEnvelope { .. })
        ));
    }

    #[test]
    fn a_missing_envelope_field_is_rejected() {
        let fixture = Fixture::new();
        let bytes = fixture.sign(&good_payload());
        let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        json.as_object_mut().unwrap().remove("sig");
        let bytes = serde_json::to_vec(&json).unwrap();
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::MalformedEnvelope { .. })
        ));
    }

    #[test]
    fn a_wrong_envelope_version_is_rejected() {
        let fixture = Fixture::new();
        for version in [0, 2, u8::MAX] {
            let bytes = fixture.sign_then_edit(&good_payload(), |envelope| envelope.v = version);
            assert_eq!(
                fixture.verify(&bytes),
                Err(Rejection::UnsupportedVersion { version })
            );
        }
    }

    #[test]
    fn a_payload_that_is_not_base64_is_rejected_as_a_malformed_envelope() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
            envelope.payload.insert(0, '!');
        });
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::MalformedEnvelope { .. })
        ));
    }

    #[test]
    fn a_signature_that_is_not_base64_is_rejected_as_a_malformed_envelope() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
            envelope.sig = "not*base64".to_owned();
        });
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::MalformedEnvelope { .. })
        ));
    }

    // --- Keys and signatures ---------------------------------------------

    #[test]
    fn an_unknown_key_id_is_rejected() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
            envelope.key_id = "0000000000000000".to_owned();
        });
        assert_eq!(
            fixture.verify(&bytes),
            Err(Rejection::UnknownKey {
                key_id: "0000000000000000".to_owned()
            })
        );
    }

    #[test]
    fn a_huge_unknown_key_id_is_truncated_in_the_rejection() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
            envelope.key_id = "k\n".repeat(10_000);
        });
        let Err(Rejection::UnknownKey { key_id }) = fixture.verify(&bytes) else {
            panic!("expected UnknownKey");
        };
        assert!(key_id.len() < 500);
        assert!(!key_id.contains('\n'));
    }

    #[test]
    fn an_unsigned_envelope_is_rejected_as_a_bad_signature() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_then_edit(&good_payload(), |envelope| envelope.sig.clear());
        assert_eq!(fixture.verify(&bytes), Err(Rejection::BadSignature));
    }

    #[test]
    fn a_truncated_signature_is_rejected_as_a_bad_signature() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
            let signature = BASE64_STANDARD.decode(&envelope.sig).unwrap();
            envelope.sig = BASE64_STANDARD.encode(&signature[..63]);
        });
        assert_eq!(fixture.verify(&bytes), Err(Rejection::BadSignature));
    }

    #[test]
    fn a_bit_flipped_payload_is_rejected() {
        let fixture = Fixture::new();
        let payload_len = serde_json::to_vec(&good_payload()).unwrap().len();
        for byte_index in [0, 20, payload_len - 1] {
            let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
                flip_one_bit_of_base64(&mut envelope.payload, byte_index);
            });
            assert_eq!(fixture.verify(&bytes), Err(Rejection::BadSignature));
        }
    }

    #[test]
    fn a_bit_flipped_signature_is_rejected() {
        let fixture = Fixture::new();
        for byte_index in [0, 31, 32, 63] {
            let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
                flip_one_bit_of_base64(&mut envelope.sig, byte_index);
            });
            assert_eq!(fixture.verify(&bytes), Err(Rejection::BadSignature));
        }
    }

    #[test]
    fn a_payload_signed_by_another_key_under_a_known_key_id_is_rejected() {
        let fixture = Fixture::new();
        let impostor = TaskSigner::generate();
        let mut envelope = impostor.sign(&good_payload()).unwrap();
        envelope.key_id = fixture.signer.key_id().to_owned();
        assert_eq!(
            fixture.verify(&envelope_to_bytes(&envelope)),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn a_payload_signed_without_the_domain_prefix_is_rejected() {
        let fixture = Fixture::new();
        let payload_bytes = serde_json::to_vec(&good_payload()).unwrap();
        let signature =
            ed25519_dalek::Signer::sign(&fixture.signer_key_for_tests(), &payload_bytes);
        let envelope = TaskEnvelope::from_parts(
            fixture.signer.key_id(),
            &payload_bytes,
            &signature.to_bytes(),
        );
        assert_eq!(
            fixture.verify(&envelope_to_bytes(&envelope)),
            Err(Rejection::BadSignature)
        );
    }

    // --- Payload shape -------------------------------------------------------

    #[test]
    fn a_signed_payload_that_is_not_json_is_rejected_as_malformed() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_raw(b"definitely not json");
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::MalformedPayload { .. })
        ));
    }

    #[test]
    fn unknown_fields_in_the_payload_are_rejected() {
        let fixture = Fixture::new();
        let json = canonical_json(&good_payload());
        let with_extra_field = json.replacen('{', r#"{"priority":"high","#, 1);
        assert!(matches!(
            fixture.verify(&fixture.sign_raw(with_extra_field.as_bytes())),
            Err(Rejection::MalformedPayload { .. })
        ));
    }

    #[test]
    fn unknown_fields_in_the_operation_are_rejected() {
        let fixture = Fixture::new();
        let json = canonical_json(&good_payload());
        let with_extra_field = json.replace(
            r#""op":"start_workload","#,
            r#""op":"start_workload","privileged":true,"#,
        );
        assert_ne!(with_extra_field, json);
        assert!(matches!(
            fixture.verify(&fixture.sign_raw(with_extra_field.as_bytes())),
            Err(Rejection::MalformedPayload { .. })
        ));
    }

    #[test]
    fn a_payload_with_a_duplicated_field_is_rejected() {
        let fixture = Fixture::new();
        let json = canonical_json(&good_payload());
        let with_duplicate = json.replacen('{', r#"{"seq":999999,"#, 1);
        assert!(matches!(
            fixture.verify(&fixture.sign_raw(with_duplicate.as_bytes())),
            Err(Rejection::MalformedPayload { .. })
        ));
    }

    #[test]
    fn a_non_canonical_payload_is_rejected_even_when_correctly_signed() {
        let fixture = Fixture::new();
        let payload = good_payload();
        let canonical = canonical_json(&payload);

        let pretty = serde_json::to_string_pretty(&payload).unwrap();
        let spaced = canonical.replace("\":", "\": ");
        let trailing_newline = format!("{canonical}\n");
        let escaped_slash = canonical.replace("/bin/app", "\\/bin\\/app");
        let mut reordered: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&canonical).unwrap();
        let task_id = reordered.remove("task_id").unwrap();
        reordered.insert("task_id".to_owned(), task_id);
        let reordered = serde_json::to_string(&reordered).unwrap();

        for variant in [pretty, spaced, trailing_newline, escaped_slash, reordered] {
            assert_ne!(variant, canonical);
            // Each variant decodes to the very same payload...
            assert_eq!(
                serde_json::from_str::<TaskPayload>(&variant).unwrap(),
                payload
            );
            // ...but is refused because the signed bytes are not canonical.
            assert_eq!(
                fixture.verify(&fixture.sign_raw(variant.as_bytes())),
                Err(Rejection::NonCanonical),
                "{variant}"
            );
        }
    }

    #[test]
    fn a_payload_with_omitted_optional_fields_is_not_canonical() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            tenant_id: None,
            traceparent: None,
            ..good_payload()
        };
        let canonical = canonical_json(&payload);
        let omitted = canonical
            .replace(r#""tenant_id":null,"#, "")
            .replace(r#""traceparent":null,"#, "");
        assert_ne!(omitted, canonical);
        assert_eq!(
            fixture.verify(&fixture.sign_raw(omitted.as_bytes())),
            Err(Rejection::NonCanonical)
        );
    }

    // --- Binding to this node --------------------------------------------

    #[test]
    fn a_task_for_another_node_is_rejected() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            node_id: Uuid::from_u128(0xbad),
            ..good_payload()
        };
        assert_eq!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::WrongNode {
                expected_node_id: this_node_id(),
                task_node_id: Uuid::from_u128(0xbad),
            })
        );
    }

    #[test]
    fn a_task_for_another_enrolment_epoch_is_rejected() {
        let fixture = Fixture::new();
        for task_epoch in [EPOCH - 1, EPOCH + 1] {
            let payload = TaskPayload {
                enrolment_epoch: task_epoch,
                ..good_payload()
            };
            assert_eq!(
                fixture.verify(&fixture.sign(&payload)),
                Err(Rejection::WrongEpoch {
                    expected_epoch: EPOCH,
                    task_epoch,
                })
            );
        }
    }

    // --- Time window -------------------------------------------------------

    #[test]
    fn an_expired_task_is_rejected() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            issued_at: NOW - 600,
            not_before: NOW - 600,
            expires_at: NOW - 31,
            ..good_payload()
        };
        assert_eq!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::Expired {
                expires_at: NOW - 31,
                now: NOW
            })
        );
    }

    #[test]
    fn a_task_that_is_not_yet_valid_is_rejected() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            issued_at: NOW,
            not_before: NOW + 31,
            expires_at: NOW + 300,
            ..good_payload()
        };
        assert_eq!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::NotYetValid {
                not_before: NOW + 31,
                now: NOW
            })
        );
    }

    #[test]
    fn a_task_with_a_lifetime_longer_than_the_maximum_is_rejected() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            issued_at: NOW,
            not_before: NOW,
            expires_at: NOW + DEFAULT_MAX_LIFETIME_SECS + 1,
            ..good_payload()
        };
        assert!(matches!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::InvalidWindow { .. })
        ));
    }

    #[test]
    fn a_task_that_expires_before_it_becomes_valid_is_rejected() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            issued_at: NOW,
            not_before: NOW + 10,
            expires_at: NOW + 5,
            ..good_payload()
        };
        assert!(matches!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::InvalidWindow { .. })
        ));
    }

    #[test]
    fn the_skew_and_lifetime_limits_can_be_tightened() {
        let fixture = Fixture::new();
        let verifier = fixture
            .verifier
            .clone()
            .with_max_clock_skew_secs(0)
            .with_max_lifetime_secs(60);
        let just_expired = TaskPayload {
            issued_at: NOW - 30,
            not_before: NOW - 30,
            expires_at: NOW - 1,
            ..good_payload()
        };
        assert!(matches!(
            verifier.verify(&fixture.sign(&just_expired), NOW, HIGH_WATER),
            Err(Rejection::Expired { .. })
        ));
        let long_lived = TaskPayload {
            issued_at: NOW,
            not_before: NOW,
            expires_at: NOW + 61,
            ..good_payload()
        };
        assert!(matches!(
            verifier.verify(&fixture.sign(&long_lived), NOW, HIGH_WATER),
            Err(Rejection::InvalidWindow { .. })
        ));
    }

    #[test]
    fn extreme_timestamps_are_rejected_without_overflowing() {
        let fixture = Fixture::new();
        let absurd_window = TaskPayload {
            issued_at: i64::MIN,
            not_before: i64::MIN,
            expires_at: i64::MAX,
            ..good_payload()
        };
        let bytes = fixture.sign(&absurd_window);
        for now in [i64::MIN, 0, NOW, i64::MAX] {
            assert!(matches!(
                fixture.verifier.verify(&bytes, now, HIGH_WATER),
                Err(Rejection::InvalidWindow { .. })
            ));
        }
        let good_bytes = fixture.sign(&good_payload());
        assert!(matches!(
            fixture.verifier.verify(&good_bytes, i64::MAX, HIGH_WATER),
            Err(Rejection::Expired { .. })
        ));
        assert!(matches!(
            fixture.verifier.verify(&good_bytes, i64::MIN, HIGH_WATER),
            Err(Rejection::NotYetValid { .. })
        ));
    }

    // --- Replay ----------------------------------------------------------------

    #[test]
    fn a_replayed_task_with_a_sequence_equal_to_the_high_water_mark_is_rejected() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            seq: HIGH_WATER,
            ..good_payload()
        };
        assert_eq!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::Replayed {
                seq: HIGH_WATER,
                high_water_seq: HIGH_WATER
            })
        );
    }

    #[test]
    fn a_replayed_task_with_a_sequence_below_the_high_water_mark_is_rejected() {
        let fixture = Fixture::new();
        for seq in [0, HIGH_WATER - 1] {
            let payload = TaskPayload {
                seq,
                ..good_payload()
            };
            assert_eq!(
                fixture.verify(&fixture.sign(&payload)),
                Err(Rejection::Replayed {
                    seq,
                    high_water_seq: HIGH_WATER
                })
            );
        }
    }

    #[test]
    fn the_same_task_is_accepted_once_and_then_rejected_as_a_replay() {
        let fixture = Fixture::new();
        let bytes = fixture.sign(&good_payload());
        let accepted = fixture.verifier.verify(&bytes, NOW, HIGH_WATER).unwrap();
        assert_eq!(
            fixture.verifier.verify(&bytes, NOW, accepted.seq),
            Err(Rejection::Replayed {
                seq: accepted.seq,
                high_water_seq: accepted.seq
            })
        );
    }

    // --- Order of checks -------------------------------------------------------

    #[test]
    fn an_oversize_envelope_is_reported_as_too_large_even_if_malformed() {
        let fixture = Fixture::new();
        let mut bytes = b"{\"v\":9,".to_vec();
        bytes.resize(MAX_ENVELOPE_BYTES + 1, b'!');
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::TooLarge { .. })
        ));
    }

    #[test]
    fn a_wrong_version_is_reported_before_an_unknown_key() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
            envelope.v = 2;
            envelope.key_id = "unknown".to_owned();
        });
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::UnsupportedVersion { version: 2 })
        ));
    }

    #[test]
    fn an_unknown_key_is_reported_before_a_bad_signature() {
        let fixture = Fixture::new();
        let bytes = fixture.sign_then_edit(&good_payload(), |envelope| {
            envelope.key_id = "unknown".to_owned();
            envelope.sig.clear();
        });
        assert!(matches!(
            fixture.verify(&bytes),
            Err(Rejection::UnknownKey { .. })
        ));
    }

    #[test]
    fn a_bit_flipped_and_expired_task_is_reported_as_a_bad_signature() {
        let fixture = Fixture::new();
        let expired_and_for_another_node = TaskPayload {
            node_id: Uuid::from_u128(0xbad),
            enrolment_epoch: EPOCH + 1,
            issued_at: NOW - 3600,
            not_before: NOW - 3600,
            expires_at: NOW - 3000,
            seq: 0,
            ..good_payload()
        };
        let bytes = fixture.sign_then_edit(&expired_and_for_another_node, |envelope| {
            flip_one_bit_of_base64(&mut envelope.payload, 30);
        });
        assert_eq!(fixture.verify(&bytes), Err(Rejection::BadSignature));
    }

    #[test]
    fn a_non_canonical_payload_for_another_node_is_reported_as_non_canonical() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            node_id: Uuid::from_u128(0xbad),
            ..good_payload()
        };
        let pretty = serde_json::to_string_pretty(&payload).unwrap();
        assert_eq!(
            fixture.verify(&fixture.sign_raw(pretty.as_bytes())),
            Err(Rejection::NonCanonical)
        );
    }

    #[test]
    fn a_wrong_node_is_reported_before_a_wrong_epoch_expiry_or_replay() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            node_id: Uuid::from_u128(0xbad),
            enrolment_epoch: EPOCH + 1,
            expires_at: NOW - 3000,
            seq: 0,
            ..good_payload()
        };
        assert!(matches!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::WrongNode { .. })
        ));
    }

    #[test]
    fn a_wrong_epoch_is_reported_before_expiry_or_replay() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            enrolment_epoch: EPOCH + 1,
            issued_at: NOW - 3600,
            not_before: NOW - 3600,
            expires_at: NOW - 3000,
            seq: 0,
            ..good_payload()
        };
        assert!(matches!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::WrongEpoch { .. })
        ));
    }

    #[test]
    fn an_expired_replay_is_reported_as_expired() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            issued_at: NOW - 3600,
            not_before: NOW - 3600,
            expires_at: NOW - 3000,
            seq: 0,
            ..good_payload()
        };
        assert!(matches!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::Expired { .. })
        ));
    }

    #[test]
    fn an_over_long_replay_is_reported_as_an_invalid_window() {
        let fixture = Fixture::new();
        let payload = TaskPayload {
            issued_at: NOW,
            not_before: NOW,
            expires_at: NOW + 10_000,
            seq: 0,
            ..good_payload()
        };
        assert!(matches!(
            fixture.verify(&fixture.sign(&payload)),
            Err(Rejection::InvalidWindow { .. })
        ));
    }
}
