//! The signed task envelope shared by the control plane and the node agent.
//!
//! The control plane decides what a node should run and hands the node agent
//! a *task*. The agent must be able to prove, without asking anyone, that the
//! task really came from the control plane, that it is meant for this node in
//! its current enrolment, that it is fresh, and that it has not been seen
//! before. This crate holds both halves of that contract — [`TaskSigner`] for
//! the control plane and [`TaskVerifier`] for the agent — so the two sides can
//! never drift apart. It performs no I/O: keys, clocks and the replay
//! high-water mark are all passed in by the caller.
//!
//! # Wire format
//!
//! A task travels as a JSON [`TaskEnvelope`]:
//!
//! ```json
//! { "v": 1, "key_id": "0123456789abcdef", "payload": "<base64>", "sig": "<base64>" }
//! ```
//!
//! `payload` is the standard base64 of the *exact* bytes that were signed,
//! which are the compact JSON encoding of a [`TaskPayload`]. `sig` is the
//! base64 of the 64-byte Ed25519 signature over [`DOMAIN_PREFIX`] followed by
//! those bytes.
//!
//! # Design decisions
//!
//! * **Sign bytes, not structures.** The payload is carried as opaque bytes so
//!   that the verifier checks the signature over exactly what the signer
//!   produced. Nothing is ever re-serialised before verification, which means
//!   that differences between JSON encoders cannot make a good task fail or a
//!   forged one pass.
//! * **Domain separation.** The signed message starts with
//!   `keel-task-v1\0`, so a signature made by the task key can never be
//!   replayed as a signature for some other protocol that happens to use the
//!   same key, and a future `v2` format cannot be confused with this one.
//! * **Canonical payloads only.** After the signature has been checked the
//!   payload is decoded and re-encoded; the result must equal the signed bytes
//!   exactly. This closes the door on payloads that mean different things to
//!   different JSON parsers (duplicate keys, odd escapes, whitespace tricks),
//!   so every component that ever looks at the signed bytes sees one meaning.
//! * **A fixed, documented order of checks.** [`TaskVerifier::verify`] runs
//!   cheap structural checks first, then the signature, and only then looks
//!   at anything inside the payload. No field of the payload influences a
//!   decision before it has been authenticated, and the first failure is the
//!   one reported, so a tampered *and* expired task is reported as tampered.
//! * **Binding to the node and its enrolment.** Every payload names the node
//!   and the enrolment epoch it was issued for. Re-enrolling a node bumps the
//!   epoch, which invalidates every task issued before, without having to
//!   rotate the control plane's signing key.
//! * **Freshness and replay.** Tasks carry a validity window (checked with a
//!   small allowance for clock skew and a cap on total lifetime) and a
//!   per-node sequence number. The agent keeps the highest sequence number it
//!   has acted on and rejects anything at or below it.
//! * **Key rotation.** Envelopes name their key by a short fingerprint
//!   ([`key_id_of`]), so the agent can trust several keys at once while the
//!   control plane rolls from one to the next.
//!
//! # Example
//!
//! ```
//! use keel_task::{Operation, TaskPayload, TaskSigner, TaskVerifier};
//! use uuid::Uuid;
//!
//! let signer = TaskSigner::generate();
//! let node_id = Uuid::new_v4();
//! let now = 1_700_000_000;
//! let payload = TaskPayload {
//!     task_id: Uuid::new_v4(),
//!     tenant_id: None,
//!     node_id,
//!     enrolment_epoch: 3,
//!     seq: 42,
//!     issued_at: now,
//!     not_before: now,
//!     expires_at: now + 300,
//!     traceparent: None,
//!     operation: Operation::StopWorkload { allocation_id: Uuid::new_v4() },
//! };
//! let wire_bytes = signer.sign_to_bytes(&payload)?;
//!
//! let verifier = TaskVerifier::new(node_id, 3, [signer.verifying_key()]);
//! let verified = verifier.verify(&wire_bytes, now, 41).expect("a good task verifies");
//! assert_eq!(verified, payload);
//! # Ok::<(), keel_task::TaskError>(())
//! ```

mod envelope;
mod error;
mod keys;
mod payload;
mod rejection;
mod signer;
mod statement;
mod verifier;

pub use envelope::TaskEnvelope;
pub use error::TaskError;
pub use keys::{key_id_of, verifying_key_from_base64, verifying_key_to_base64};
pub use payload::{Operation, TaskPayload};
pub use rejection::Rejection;
pub use signer::TaskSigner;
pub use statement::{KEY_STATEMENT_DOMAIN, key_statement};
pub use verifier::{DEFAULT_MAX_CLOCK_SKEW_SECS, DEFAULT_MAX_LIFETIME_SECS, TaskVerifier};

/// Re-exported so callers can name key types without depending on
/// `ed25519-dalek` themselves (and so both sides agree on its version).
pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// The only envelope format version this crate produces and accepts.
pub const ENVELOPE_VERSION: u8 = 1;

/// Bytes prepended to the payload before signing, for domain separation.
///
/// The trailing NUL terminates the label, so a message signed under this
/// label can never also be read as a message under a longer label such as
/// `keel-task-v10`.
pub const DOMAIN_PREFIX: &[u8] = b"keel-task-v1\0";

/// The largest envelope, in bytes, the verifier will even try to parse.
///
/// Tasks are small control messages; capping the size up front bounds the
/// memory and CPU an unauthenticated sender can make the agent spend.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;

/// Builds the exact message that is signed and verified: the domain prefix
/// followed by the payload bytes.
fn signed_message(payload_bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(DOMAIN_PREFIX.len() + payload_bytes.len());
    message.extend_from_slice(DOMAIN_PREFIX);
    message.extend_from_slice(payload_bytes);
    message
}
