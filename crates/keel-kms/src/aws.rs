//! AWS KMS through `aws-sdk-kms`: `GenerateDataKey` under one master key,
//! `Decrypt` naming the master key each envelope records — only if it is
//! the configured key or a retired one still configured: an envelope
//! rewritten to name a key someone else controls is refused before AWS is
//! asked. The caller's context goes along as the encryption context, so
//! AWS itself binds each data key to what it protects. Rotating means
//! configuring a new master key and listing the old one as retired (or
//! letting AWS rotate a key's material): new envelopes name the new key,
//! old ones still open with theirs.

use aws_sdk_kms::Client;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::DisplayErrorContext;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use zeroize::Zeroizing;

use crate::{DataKey, Kms, KmsError, WrappedKey};

/// Where the AWS KMS is and which master key wraps new data keys.
///
/// Credentials are either given here or taken from the standard
/// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`) when the KMS is built.
#[derive(Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsKmsConfig {
    pub region: String,
    /// The master key for new data keys: a key id or key ARN.
    pub key_id: String,
    /// Earlier master keys (ids or ARNs) whose envelopes must still open.
    #[serde(default)]
    pub retired_key_ids: Vec<String>,
    /// Another endpoint than AWS's (a VPC endpoint, or a test server).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsKmsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKmsConfig")
            .field("region", &self.region)
            .field("key_id", &self.key_id)
            .field("retired_key_ids", &self.retired_key_ids)
            .field("endpoint_url", &self.endpoint_url)
            .finish_non_exhaustive()
    }
}

/// Data keys wrapped by AWS KMS.
pub struct AwsKms {
    client: Client,
    key_id: String,
    /// Every master key an envelope may name: the current and retired ones.
    allowed: Vec<String>,
}

/// The encryption-context entry that carries the caller's context.
const CONTEXT_KEY: &str = "keel:context";

impl AwsKms {
    /// Fails only when no credentials are configured or in the environment.
    pub fn new(config: &AwsKmsConfig) -> Result<Self, KmsError> {
        let mut allowed = vec![config.key_id.clone()];
        allowed.extend(config.retired_key_ids.iter().cloned());
        Ok(Self {
            client: client(config, credentials(config)?),
            key_id: config.key_id.clone(),
            allowed,
        })
    }

    /// Whether `named` (the ARN an envelope records) is one of the
    /// configured keys, given as an id or an ARN.
    fn allows(&self, named: &str) -> bool {
        self.allowed
            .iter()
            .any(|key| named == key || named.rsplit_once(":key/").is_some_and(|(_, id)| id == key))
    }

    /// The SDK client, for set-up steps (creating keys in tests).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The configured credentials, else those of the standard environment
/// variables.
fn credentials(config: &AwsKmsConfig) -> Result<Credentials, KmsError> {
    let from_env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let (access_key_id, secret_access_key, session_token) =
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone(), config.session_token.clone()),
            (None, None) => (
                from_env("AWS_ACCESS_KEY_ID").ok_or(KmsError::NoCredentials)?,
                from_env("AWS_SECRET_ACCESS_KEY").ok_or(KmsError::NoCredentials)?,
                from_env("AWS_SESSION_TOKEN"),
            ),
            _ => return Err(KmsError::NoCredentials),
        };
    Ok(Credentials::new(
        access_key_id,
        secret_access_key,
        session_token,
        None,
        "keel-config",
    ))
}

/// An SDK client on the SDK's hyper client with rustls on ring (the TLS
/// stack the rest of Keel uses).
fn client(config: &AwsKmsConfig, credentials: Credentials) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut builder = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .http_client(http)
        .credentials_provider(credentials);
    if let Some(url) = &config.endpoint_url {
        builder = builder.endpoint_url(url.clone());
    }
    Client::from_conf(builder.build())
}

fn backend(error: impl std::error::Error) -> KmsError {
    KmsError::Backend(DisplayErrorContext(error).to_string())
}

fn key_bytes(plaintext: Option<&Blob>) -> Result<Zeroizing<[u8; 32]>, KmsError> {
    let bytes = plaintext.ok_or(KmsError::Backend(
        "AWS KMS returned no plaintext".to_owned(),
    ))?;
    let key: [u8; 32] = bytes
        .as_ref()
        .try_into()
        .map_err(|_| KmsError::Backend("AWS KMS returned a key of another size".to_owned()))?;
    Ok(Zeroizing::new(key))
}

impl Kms for AwsKms {
    async fn generate_data_key(&self, context: &str) -> Result<DataKey, KmsError> {
        let out = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .encryption_context(CONTEXT_KEY, context)
            .send()
            .await
            .map_err(backend)?;
        let plaintext = key_bytes(out.plaintext())?;
        let blob = out
            .ciphertext_blob()
            .ok_or(KmsError::Backend(
                "AWS KMS returned no wrapped key".to_owned(),
            ))?
            .as_ref()
            .to_vec();
        // The key's ARN, whatever form of id was configured: envelopes
        // name the exact key that opens them.
        let key_id = out.key_id().unwrap_or(&self.key_id).to_owned();
        Ok(DataKey {
            plaintext,
            wrapped: WrappedKey { key_id, blob },
        })
    }

    async fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &str,
    ) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        if !self.allows(&wrapped.key_id) {
            return Err(KmsError::ForeignMasterKey(wrapped.key_id.clone()));
        }
        let out = self
            .client
            .decrypt()
            .key_id(&wrapped.key_id)
            .encryption_context(CONTEXT_KEY, context)
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .send()
            .await
            .map_err(|error| {
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_invalid_ciphertext_exception())
                {
                    KmsError::Decrypt
                } else {
                    backend(error)
                }
            })?;
        key_bytes(out.plaintext())
    }
}
