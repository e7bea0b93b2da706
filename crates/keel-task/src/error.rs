//! Errors raised while producing envelopes or handling keys.
//!
//! These are operator-facing errors on the trusted side. Reasons for refusing
//! an incoming task live in [`crate::Rejection`] instead, because those are
//! expected in normal operation and need stable, loggable codes.

/// Something went wrong while signing a task or loading a key.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The payload or envelope could not be encoded as JSON.
    #[error("could not encode the task as JSON: {0}")]
    Serialisation(#[from] serde_json::Error),

    /// The PEM text was not a valid PKCS#8 Ed25519 private key.
    #[error("invalid PKCS#8 PEM private key: {detail}")]
    InvalidPrivateKeyPem {
        /// The decoder's explanation; it never contains key material.
        detail: String,
    },

    /// A public key was not valid standard base64.
    #[error("public key is not valid base64: {0}")]
    InvalidPublicKeyBase64(#[from] base64::DecodeError),

    /// A public key decoded to the wrong number of bytes.
    #[error("public key must be 32 bytes, got {length}")]
    InvalidPublicKeyLength {
        /// How many bytes the base64 decoded to.
        length: usize,
    },

    /// The 32 bytes are not the encoding of a point on the curve.
    #[error("public key bytes are not a valid Ed25519 point")]
    InvalidPublicKeyPoint,

    /// The key has small order, so signatures under it prove nothing.
    #[error("public key is a weak (small-order) Ed25519 point")]
    WeakPublicKey,
}
