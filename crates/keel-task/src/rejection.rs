//! Why the verifier refused a task.

use uuid::Uuid;

/// The first reason [`crate::TaskVerifier::verify`] found to refuse a task.
///
/// Variants are listed in the order the checks run. Details that come from the
/// unauthenticated envelope (such as a key id) are printed with `Debug`
/// formatting so that hostile input cannot forge log lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The envelope exceeds [`crate::MAX_ENVELOPE_BYTES`]; it was not parsed.
    #[error("envelope is {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// The size of the rejected input.
        size: usize,
        /// The limit it exceeded.
        limit: usize,
    },

    /// The envelope is not strict JSON of the expected shape, or its payload
    /// or signature field is not valid base64.
    #[error("malformed envelope: {detail}")]
    MalformedEnvelope {
        /// The decoder's explanation.
        detail: String,
    },

    /// The envelope declares a format version this build does not speak.
    #[error("unsupported envelope version {version}")]
    UnsupportedVersion {
        /// The version found in the envelope.
        version: u8,
    },

    /// The envelope names a signing key the verifier does not trust.
    #[error("unknown signing key id {key_id:?}")]
    UnknownKey {
        /// The key id found in the envelope (unauthenticated).
        key_id: String,
    },

    /// The signature is missing, the wrong length, or does not verify.
    #[error("bad signature")]
    BadSignature,

    /// The signed payload is not strict JSON of the expected shape.
    #[error("malformed payload: {detail}")]
    MalformedPayload {
        /// The decoder's explanation.
        detail: String,
    },

    /// The signed payload is valid but not in canonical encoding.
    #[error("payload is not canonically encoded")]
    NonCanonical,

    /// The task was issued for a different node.
    #[error("task is for node {task_node_id}, not this node {expected_node_id}")]
    WrongNode {
        /// This node's id.
        expected_node_id: Uuid,
        /// The node id in the task.
        task_node_id: Uuid,
    },

    /// The task was issued for a different enrolment of this node.
    #[error("task is for enrolment epoch {task_epoch}, current epoch is {expected_epoch}")]
    WrongEpoch {
        /// This node's current enrolment epoch.
        expected_epoch: u64,
        /// The epoch in the task.
        task_epoch: u64,
    },

    /// The task's validity window has not started yet, even allowing for skew.
    #[error("task is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// The task's `not_before`.
        not_before: i64,
        /// The verifier's clock.
        now: i64,
    },

    /// The task's validity window has ended, even allowing for skew.
    #[error("task expired at {expires_at} (now {now})")]
    Expired {
        /// The task's `expires_at`.
        expires_at: i64,
        /// The verifier's clock.
        now: i64,
    },

    /// The task's validity window is inverted or longer than allowed.
    #[error(
        "invalid validity window: issued {issued_at}, not before {not_before}, expires {expires_at}"
    )]
    InvalidWindow {
        /// The task's `issued_at`.
        issued_at: i64,
        /// The task's `not_before`.
        not_before: i64,
        /// The task's `expires_at`.
        expires_at: i64,
    },

    /// The task's sequence number is not above the highest one already seen.
    #[error("task sequence {seq} is not above the high-water mark {high_water_seq}")]
    Replayed {
        /// The task's sequence number.
        seq: u64,
        /// The highest sequence number the node has already accepted.
        high_water_seq: u64,
    },
}

impl Rejection {
    /// A stable snake_case code for logs and metrics; unlike the `Display`
    /// text it never changes and never contains input.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too_large",
            Rejection::MalformedEnvelope { .. } => "malformed_envelope",
            Rejection::UnsupportedVersion { .. } => "unsupported_version",
            Rejection::UnknownKey { .. } => "unknown_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::MalformedPayload { .. } => "malformed_payload",
            Rejection::NonCanonical => "non_canonical",
            Rejection::WrongNode { .. } => "wrong_node",
            Rejection::WrongEpoch { .. } => "wrong_epoch",
            Rejection::NotYetValid { .. } => "not_yet_valid",
            Rejection::Expired { .. } => "expired",
            Rejection::InvalidWindow { .. } => "invalid_window",
            Rejection::Replayed { .. } => "replayed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn one_of_each() -> Vec<Rejection> {
        vec![
            Rejection::TooLarge { size: 2, limit: 1 },
            Rejection::MalformedEnvelope {
                detail: String::new(),
            },
            Rejection::UnsupportedVersion { version: 2 },
            Rejection::UnknownKey {
                key_id: String::new(),
            },
            Rejection::BadSignature,
            Rejection::MalformedPayload {
                detail: String::new(),
            },
            Rejection::NonCanonical,
            Rejection::WrongNode {
                expected_node_id: Uuid::nil(),
                task_node_id: Uuid::nil(),
            },
            Rejection::WrongEpoch {
                expected_epoch: 0,
                task_epoch: 1,
            },
            Rejection::NotYetValid {
                not_before: 1,
                now: 0,
            },
            Rejection::Expired {
                expires_at: 0,
                now: 1,
            },
            Rejection::InvalidWindow {
                issued_at: 0,
                not_before: 1,
                expires_at: 0,
            },
            Rejection::Replayed {
                seq: 1,
                high_water_seq: 1,
            },
        ]
    }

    #[test]
    fn every_reason_code_is_distinct_snake_case() {
        let rejections = one_of_each();
        let codes: HashSet<&str> = rejections.iter().map(Rejection::reason).collect();
        assert_eq!(codes.len(), rejections.len());
        for code in codes {
            assert!(
                code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{code}"
            );
        }
    }

    #[test]
    fn an_unknown_key_id_is_escaped_when_displayed() {
        let rejection = Rejection::UnknownKey {
            key_id: "abc\nFAKE LOG LINE".to_owned(),
        };
        assert!(!rejection.to_string().contains('\n'));
    }
}
