//! The local KMS: master keys in a file, for local mode and single-host
//! installs. The file is created on first run with mode 0600 and refused
//! when anyone but its owner can read it. Rotation appends a master key
//! and makes it current; the old ones stay to unwrap what they wrapped.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::{DataKey, Kms, KmsError, WrappedKey, crypto};

struct MasterKey {
    id: String,
    created_at: OffsetDateTime,
    key: Zeroizing<[u8; 32]>,
}

/// Master keys held in a 0600 file.
pub struct LocalKms {
    path: PathBuf,
    /// Oldest first; the last one wraps new data keys.
    keys: Vec<MasterKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    id: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    /// Base64 of the 32 key bytes.
    key: String,
}

impl LocalKms {
    /// Opens the master-key file at `path`, creating it (0600, one master
    /// key) if there is none.
    pub fn open_or_create(path: impl Into<PathBuf>) -> Result<Self, KmsError> {
        let path = path.into();
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => {
                let kms = Self {
                    keys: vec![new_master_key(1)?],
                    path,
                };
                write_synced(&mut file, &kms.path, &kms.serialize()?)?;
                sync_parent(&kms.path)?;
                Ok(kms)
            }
            Err(error) if error.kind() == ErrorKind::AlreadyExists => Self::open(path),
            Err(source) => Err(KmsError::Io { path, source }),
        }
    }

    /// Opens an existing master-key file.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, KmsError> {
        let path = path.into();
        let io = |source| KmsError::Io {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KmsError::InsecurePermissions {
                path,
                mode: mode & 0o777,
            });
        }
        let mut text = Zeroizing::new(String::new());
        file.read_to_string(&mut text).map_err(io)?;
        let corrupt = |reason: String| KmsError::CorruptKeyFile {
            path: path.clone(),
            reason,
        };
        let stored: KeyFile = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let mut keys = Vec::with_capacity(stored.keys.len());
        for key in stored.keys {
            let bytes = Zeroizing::new(
                STANDARD
                    .decode(key.key.as_bytes())
                    .map_err(|_| corrupt(format!("key `{}` is not base64", key.id)))?,
            );
            let bytes: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| corrupt(format!("key `{}` is not 32 bytes", key.id)))?;
            if keys.iter().any(|k: &MasterKey| k.id == key.id) {
                return Err(corrupt(format!("key `{}` appears twice", key.id)));
            }
            keys.push(MasterKey {
                id: key.id,
                created_at: key.created_at,
                key: Zeroizing::new(bytes),
            });
        }
        if keys.is_empty() {
            return Err(corrupt("it holds no key".to_owned()));
        }
        Ok(Self { path, keys })
    }

    /// Adds a master key and makes it the one that wraps new data keys;
    /// the file is replaced atomically. Returns the new key's id.
    pub fn rotate(&mut self) -> Result<String, KmsError> {
        let key = new_master_key(self.keys.len() + 1)?;
        let id = key.id.clone();
        self.keys.push(key);
        let text = match self.serialize() {
            Ok(text) => text,
            Err(error) => {
                self.keys.pop();
                return Err(error);
            }
        };
        let tmp = self.path.with_extension("tmp");
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| KmsError::Io {
                path: tmp.clone(),
                source,
            })
            .and_then(|mut file| write_synced(&mut file, &tmp, &text))
            .and_then(|()| {
                std::fs::rename(&tmp, &self.path).map_err(|source| KmsError::Io {
                    path: self.path.clone(),
                    source,
                })
            })
            .and_then(|()| sync_parent(&self.path));
        if let Err(error) = written {
            self.keys.pop();
            return Err(error);
        }
        Ok(id)
    }

    /// The id of the master key that wraps new data keys.
    pub fn current_key_id(&self) -> &str {
        self.current().id.as_str()
    }

    fn current(&self) -> &MasterKey {
        // `open` and `open_or_create` never build an empty list.
        &self.keys[self.keys.len() - 1]
    }

    fn serialize(&self) -> Result<Zeroizing<String>, KmsError> {
        let file = KeyFile {
            keys: self
                .keys
                .iter()
                .map(|key| StoredKey {
                    id: key.id.clone(),
                    created_at: key.created_at,
                    key: STANDARD.encode(key.key.as_ref()),
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&file).map_err(|e| KmsError::CorruptKeyFile {
            path: self.path.clone(),
            reason: e.to_string(),
        });
        // The encoded keys live on only inside the zeroized text.
        for key in file.keys {
            drop(Zeroizing::new(key.key));
        }
        text.map(Zeroizing::new)
    }
}

/// Master keys wrap with this context, so a blob wrapped under one id is
/// never accepted under another.
fn wrap_context(id: &str) -> Vec<u8> {
    format!("keel-kms/local/{id}").into_bytes()
}

impl Kms for LocalKms {
    async fn generate_data_key(&self) -> Result<DataKey, KmsError> {
        let plaintext = crypto::random_key()?;
        let master = self.current();
        let blob = crypto::seal(&master.key, &wrap_context(&master.id), plaintext.as_ref())?;
        Ok(DataKey {
            plaintext,
            wrapped: WrappedKey {
                key_id: master.id.clone(),
                blob,
            },
        })
    }

    async fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        let master = self
            .keys
            .iter()
            .find(|key| key.id == wrapped.key_id)
            .ok_or_else(|| KmsError::UnknownMasterKey(wrapped.key_id.clone()))?;
        let key = crypto::open(&master.key, &wrap_context(&master.id), &wrapped.blob)?;
        let key: [u8; 32] = key.as_slice().try_into().map_err(|_| KmsError::Decrypt)?;
        Ok(Zeroizing::new(key))
    }
}

fn new_master_key(number: usize) -> Result<MasterKey, KmsError> {
    Ok(MasterKey {
        id: format!("local-{number}"),
        created_at: OffsetDateTime::now_utc(),
        key: crypto::random_key()?,
    })
}

fn write_synced(file: &mut File, path: &Path, text: &str) -> Result<(), KmsError> {
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KmsError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Makes a create or rename durable: fsync the directory holding it.
fn sync_parent(path: &Path) -> Result<(), KmsError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| KmsError::Io {
            path: parent.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::envelope;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "keel-kms-{}-{}",
            std::process::id(),
            OffsetDateTime::now_utc().unix_timestamp_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("master.keys")
    }

    #[tokio::test]
    async fn the_file_is_created_0600_on_first_run_and_the_same_keys_come_back() {
        let path = scratch();
        let kms = LocalKms::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = envelope::seal(&kms, "ctx", b"a secret").await.unwrap();
        let again = LocalKms::open_or_create(&path).unwrap();
        assert_eq!(again.current_key_id(), "local-1");
        assert_eq!(
            envelope::open(&again, "ctx", &sealed)
                .await
                .unwrap()
                .as_slice(),
            b"a secret"
        );
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let path = scratch();
        LocalKms::open_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            LocalKms::open(&path),
            Err(KmsError::InsecurePermissions { mode: 0o644, .. })
        ));
    }

    #[test]
    fn a_damaged_key_file_is_refused_with_the_reason() {
        for text in [
            "not json",
            r#"{"keys":[]}"#,
            r#"{"keys":[{"id":"local-1","created_at":"2026-01-01T00:00:00Z","key":"c2hvcnQ="}]}"#,
        ] {
            let path = scratch();
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap();
            file.write_all(text.as_bytes()).unwrap();
            assert!(
                matches!(LocalKms::open(&path), Err(KmsError::CorruptKeyFile { .. })),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn after_a_rotation_new_secrets_use_the_new_key_and_old_ones_still_open() {
        let path = scratch();
        let mut kms = LocalKms::open_or_create(&path).unwrap();
        let old = envelope::seal(&kms, "ctx", b"old secret").await.unwrap();
        assert_eq!(kms.rotate().unwrap(), "local-2");
        let new = envelope::seal(&kms, "ctx", b"new secret").await.unwrap();
        assert_eq!(envelope::master_key_id(&old).unwrap(), "local-1");
        assert_eq!(envelope::master_key_id(&new).unwrap(), "local-2");
        // Reloaded from the file, both still open.
        let reloaded = LocalKms::open(&path).unwrap();
        assert_eq!(reloaded.current_key_id(), "local-2");
        assert_eq!(
            envelope::open(&reloaded, "ctx", &old)
                .await
                .unwrap()
                .as_slice(),
            b"old secret"
        );
        assert_eq!(
            envelope::open(&reloaded, "ctx", &new)
                .await
                .unwrap()
                .as_slice(),
            b"new secret"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn another_context_a_changed_byte_or_another_kms_never_opens_a_secret() {
        let kms = LocalKms::open_or_create(scratch()).unwrap();
        let sealed = envelope::seal(&kms, "keel/pki/node-ca.key", b"ca key")
            .await
            .unwrap();
        assert!(matches!(
            envelope::open(&kms, "keel/pki/signing.key", &sealed).await,
            Err(KmsError::Decrypt)
        ));
        for at in [0, 5, sealed.len() / 2, sealed.len() - 1] {
            let mut altered = sealed.clone();
            altered[at] ^= 0x01;
            assert!(
                envelope::open(&kms, "keel/pki/node-ca.key", &altered)
                    .await
                    .is_err(),
                "byte {at}"
            );
        }
        assert!(matches!(
            envelope::open(&kms, "keel/pki/node-ca.key", &sealed[..20]).await,
            Err(KmsError::Malformed(_))
        ));
        // A KMS with its own master key of the same id cannot unwrap it.
        let other = LocalKms::open_or_create(scratch()).unwrap();
        assert!(matches!(
            envelope::open(&other, "keel/pki/node-ca.key", &sealed).await,
            Err(KmsError::Decrypt)
        ));
    }

    #[tokio::test]
    async fn each_secret_gets_its_own_data_key() {
        let kms = LocalKms::open_or_create(scratch()).unwrap();
        let a = envelope::seal(&kms, "ctx", b"same").await.unwrap();
        let b = envelope::seal(&kms, "ctx", b"same").await.unwrap();
        assert_ne!(a, b);
    }
}
