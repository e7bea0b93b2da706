//! The KMS errors. None of them carries key material.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by others (mode {mode:o}); a master-key file must be 0600: chmod 600 it"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a master-key file Keel wrote: {reason}")]
    CorruptKeyFile { path: PathBuf, reason: String },
    #[error("no master key `{0}`: it wrapped this data key but this KMS does not hold it")]
    UnknownMasterKey(String),
    #[error("not a sealed secret Keel wrote: {0}")]
    Malformed(&'static str),
    /// Wrong key, wrong context, or the bytes were changed: AES-GCM does not
    /// say which, and neither do we.
    #[error("the secret could not be decrypted (wrong key or context, or altered)")]
    Decrypt,
    #[error("the system's random number generator failed")]
    Random,
    #[error("the secret could not be encrypted")]
    Seal,
    #[error("the envelope names master key `{0}`, which is not one this KMS is configured to use")]
    ForeignMasterKey(String),
    #[error(
        "no AWS credentials: set kms.access_key_id and kms.secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )]
    NoCredentials,
    #[error("the KMS failed: {0}")]
    Backend(String),
}
