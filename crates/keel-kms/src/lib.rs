//! Secrets at rest under envelope encryption.
//!
//! Every secret Keel stores (CA private keys, task-signing keys, …) is
//! encrypted with a data key of its own (AES-256-GCM), and only that data
//! key, wrapped by a KMS, is stored next to it. The KMS never sees the
//! secret; the database and the disk never see a key that opens it.
//!
//! - [`Kms`] is the one trait: `generate_data_key` and `decrypt_data_key`,
//!   the two calls AWS KMS offers for exactly this.
//! - [`AwsKms`] is AWS KMS through `aws-sdk-kms`.
//! - [`LocalKms`] keeps its master keys in a file (0600, created on first
//!   run) for local mode; [`LocalKms::rotate`] adds a master key that wraps
//!   every new data key while the old ones still unwrap theirs.
//! - [`envelope::seal`] and [`envelope::open`] put a secret in and out of
//!   its envelope, bound to a context string so that one stored secret
//!   cannot be passed off as another.

mod aws;
mod config;
mod crypto;
pub mod envelope;
mod error;
mod local;

use std::future::Future;

use zeroize::Zeroizing;

pub use aws::{AwsKms, AwsKmsConfig};
pub use config::{AnyKms, KmsConfig};
pub use error::KmsError;
pub use local::LocalKms;

/// A data key wrapped by a KMS, as stored: which master key wrapped it
/// and the KMS's ciphertext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    pub key_id: String,
    pub blob: Vec<u8>,
}

/// A fresh data key: the plaintext to encrypt with (then forget), and the
/// same key wrapped, to store.
pub struct DataKey {
    pub plaintext: Zeroizing<[u8; 32]>,
    pub wrapped: WrappedKey,
}

/// A key management service that wraps data keys under master keys it
/// never lets out. `context` names what the data key protects (e.g.
/// `keel/pki/node-ca.key`): a data key wrapped for one context never
/// unwraps for another.
pub trait Kms: Send + Sync {
    /// A new 256-bit data key, wrapped under the current master key.
    fn generate_data_key(
        &self,
        context: &str,
    ) -> impl Future<Output = Result<DataKey, KmsError>> + Send;

    /// Unwraps a data key that this KMS wrapped for `context`, under any
    /// master key it still holds (and no other).
    fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &str,
    ) -> impl Future<Output = Result<Zeroizing<[u8; 32]>, KmsError>> + Send;
}
