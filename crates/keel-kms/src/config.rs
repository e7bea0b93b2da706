//! Choosing a KMS by configuration: `[kms] provider = "local" | "aws"`.

use std::path::PathBuf;

use zeroize::Zeroizing;

use crate::{AwsKms, AwsKmsConfig, DataKey, Kms, KmsError, LocalKms, WrappedKey};

/// The `[kms]` section.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(tag = "provider", rename_all = "snake_case", deny_unknown_fields)]
pub enum KmsConfig {
    /// Master keys in a 0600 file, created on first run (local mode).
    Local { master_key_file: PathBuf },
    /// AWS KMS.
    Aws(AwsKmsConfig),
}

impl Default for KmsConfig {
    fn default() -> Self {
        KmsConfig::Local {
            master_key_file: PathBuf::from(".keel/kms/master-keys.json"),
        }
    }
}

/// The configured KMS. An enum rather than a trait object: [`Kms`] has
/// `async` methods, and there are exactly two implementations.
pub enum AnyKms {
    Local(LocalKms),
    Aws(AwsKms),
}

impl AnyKms {
    /// Builds the configured KMS. `create` lets the local KMS make its
    /// master-key file (and its directory, 0700) on first run.
    pub fn from_config(config: &KmsConfig, create: bool) -> Result<Self, KmsError> {
        match config {
            KmsConfig::Local { master_key_file } => {
                if !create {
                    return LocalKms::open(master_key_file).map(AnyKms::Local);
                }
                if let Some(parent) = master_key_file
                    .parent()
                    .filter(|parent| !parent.as_os_str().is_empty())
                {
                    create_private_dir(parent)?;
                }
                LocalKms::open_or_create(master_key_file).map(AnyKms::Local)
            }
            KmsConfig::Aws(aws) => AwsKms::new(aws).map(AnyKms::Aws),
        }
    }

    /// Which master key wraps new data keys, for logs (`None` for AWS,
    /// where it is the configured `key_id`).
    pub fn local_current_key_id(&self) -> Option<&str> {
        match self {
            AnyKms::Local(local) => Some(local.current_key_id()),
            AnyKms::Aws(_) => None,
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), KmsError> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(source) => Err(KmsError::Io {
            path: dir.to_owned(),
            source,
        }),
    }
}

impl Kms for AnyKms {
    async fn generate_data_key(&self, context: &str) -> Result<DataKey, KmsError> {
        match self {
            AnyKms::Local(local) => local.generate_data_key(context).await,
            AnyKms::Aws(aws) => aws.generate_data_key(context).await,
        }
    }

    async fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &str,
    ) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        match self {
            AnyKms::Local(local) => local.decrypt_data_key(wrapped, context).await,
            AnyKms::Aws(aws) => aws.decrypt_data_key(wrapped, context).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_providers_parse_and_unknown_fields_are_refused() {
        let local: KmsConfig =
            serde_json::from_str(r#"{"provider":"local","master_key_file":"/k.json"}"#).unwrap();
        assert!(matches!(local, KmsConfig::Local { .. }));
        let aws: KmsConfig = serde_json::from_str(
            r#"{"provider":"aws","region":"eu-west-1","key_id":"alias/keel"}"#,
        )
        .unwrap();
        assert!(matches!(aws, KmsConfig::Aws(ref config) if config.key_id == "alias/keel"));
        assert!(
            serde_json::from_str::<KmsConfig>(
                r#"{"provider":"local","master_key_file":"/k","region":"x"}"#
            )
            .is_err()
        );
        assert!(serde_json::from_str::<KmsConfig>(r#"{"provider":"vault"}"#).is_err());
    }

    #[test]
    fn aws_without_credentials_anywhere_is_a_clear_error() {
        let config = AwsKmsConfig {
            region: "eu-west-1".to_owned(),
            key_id: "k".to_owned(),
            access_key_id: Some("only-half".to_owned()),
            ..AwsKmsConfig::default()
        };
        assert!(matches!(
            AnyKms::from_config(&KmsConfig::Aws(config), false),
            Err(KmsError::NoCredentials)
        ));
    }

    #[test]
    fn the_aws_config_never_prints_its_secrets() {
        let config = AwsKmsConfig {
            secret_access_key: Some("very-secret".to_owned()),
            session_token: Some("also-secret".to_owned()),
            ..AwsKmsConfig::default()
        };
        let printed = format!("{:?}", KmsConfig::Aws(config));
        assert!(!printed.contains("very-secret") && !printed.contains("also-secret"));
    }
}
