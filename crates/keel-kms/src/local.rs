//! The local KMS: master keys in a file, for local mode and single-host
//! installs. The file is created on first run with mode 0600 and refused
//! when anyone but its owner can read it. Rotation appends a master key
//! and makes it current; the old ones stay to unwrap what they wrapped.
//!
//! The file is only ever replaced whole: a new version is written to a
//! fresh temporary file (`create_new`, 0600, never a symlink), synced,
//! then linked (first run) or renamed (rotation) into place, so a crash
//! leaves the old file or the new one, never half of one. Rotation holds
//! an exclusive lock on `<file>.lock` and re-reads the file first, so two
//! processes rotating at once both keep each other's keys.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

/// Opening a symlink fails instead of following it.
const O_NOFOLLOW: i32 = libc::O_NOFOLLOW;
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
        if path.exists() {
            return Self::open(path);
        }
        let kms = Self {
            keys: vec![new_master_key()?],
            path,
        };
        let tmp = write_temp(&kms.path, &kms.serialize()?)?;
        // A link fails if the file appeared meanwhile (another process's
        // first run): theirs wins, and we read it.
        let linked = std::fs::hard_link(&tmp, &kms.path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_parent(&kms.path)?;
                Ok(kms)
            }
            Err(error) if error.kind() == ErrorKind::AlreadyExists => Self::open(kms.path),
            Err(source) => Err(KmsError::Io {
                path: kms.path,
                source,
            }),
        }
    }

    /// Opens an existing master-key file.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, KmsError> {
        let path = path.into();
        let io = |source| KmsError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
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
            let encoded = Zeroizing::new(key.key);
            let bytes = Zeroizing::new(
                STANDARD
                    .decode(encoded.as_bytes())
                    .map_err(|_| corrupt(format!("key `{}` is not base64", key.id)))?,
            );
            let mut secret = Zeroizing::new([0u8; 32]);
            if bytes.len() != secret.len() {
                return Err(corrupt(format!("key `{}` is not 32 bytes", key.id)));
            }
            secret.copy_from_slice(&bytes);
            if keys.iter().any(|k: &MasterKey| k.id == key.id) {
                return Err(corrupt(format!("key `{}` appears twice", key.id)));
            }
            keys.push(MasterKey {
                id: key.id,
                created_at: key.created_at,
                key: secret,
            });
        }
        if keys.is_empty() {
            return Err(corrupt("it holds no key".to_owned()));
        }
        Ok(Self { path, keys })
    }

    /// Adds a master key and makes it the one that wraps new data keys;
    /// the file is replaced atomically, under a lock, after re-reading it
    /// (keys another process added meanwhile are kept). Returns the new
    /// key's id.
    pub fn rotate(&mut self) -> Result<String, KmsError> {
        let lock_path = self.path.with_extension("lock");
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|source| KmsError::Io {
                path: lock_path.clone(),
                source,
            })?;
        lock.lock().map_err(|source| KmsError::Io {
            path: lock_path.clone(),
            source,
        })?;
        let mut current = Self::open(self.path.clone())?;
        let key = new_master_key()?;
        let id = key.id.clone();
        current.keys.push(key);
        let tmp = write_temp(&current.path, &current.serialize()?)?;
        let renamed = std::fs::rename(&tmp, &current.path);
        if renamed.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        renamed.map_err(|source| KmsError::Io {
            path: current.path.clone(),
            source,
        })?;
        sync_parent(&current.path)?;
        *self = current;
        drop(lock);
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
        // Wipe the encoded keys; the text is wiped by its `Zeroizing`.
        for key in file.keys {
            drop(Zeroizing::new(key.key));
        }
        text.map(Zeroizing::new)
    }
}

/// What a master key's wrapping is bound to: its own id (a blob wrapped
/// under one id is never accepted under another) and the caller's context.
fn wrap_context(id: &str, context: &str) -> Vec<u8> {
    format!("keel-kms/local/{id}\n{context}").into_bytes()
}

impl Kms for LocalKms {
    async fn generate_data_key(&self, context: &str) -> Result<DataKey, KmsError> {
        let plaintext = crypto::random_key()?;
        let master = self.current();
        let blob = crypto::seal(
            &master.key,
            &wrap_context(&master.id, context),
            plaintext.as_ref(),
        )?;
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
        context: &str,
    ) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        // A key added by `rotate` in another process (the CLI) after this
        // one loaded the file: read the file again rather than fail until a
        // restart. Only keys from our own 0600 file are ever used.
        let reloaded;
        let master = match self.keys.iter().find(|key| key.id == wrapped.key_id) {
            Some(master) => master,
            None => {
                reloaded = Self::open(self.path.clone())?;
                reloaded
                    .keys
                    .iter()
                    .find(|key| key.id == wrapped.key_id)
                    .ok_or_else(|| KmsError::UnknownMasterKey(wrapped.key_id.clone()))?
            }
        };
        let bytes = crypto::open(
            &master.key,
            &wrap_context(&master.id, context),
            &wrapped.blob,
        )?;
        let mut key = Zeroizing::new([0u8; 32]);
        if bytes.len() != key.len() {
            return Err(KmsError::Decrypt);
        }
        key.copy_from_slice(&bytes);
        Ok(key)
    }
}

/// A master key with a random id: two keys made anywhere never share one.
fn new_master_key() -> Result<MasterKey, KmsError> {
    let suffix = crypto::random_key()?;
    let id = format!(
        "local-{}",
        suffix[..8]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    );
    Ok(MasterKey {
        id,
        created_at: OffsetDateTime::now_utc(),
        key: crypto::random_key()?,
    })
}

/// Writes `text` to a new temporary file next to `path` (0600, created
/// fresh, never through a symlink) and syncs it; returns its path.
fn write_temp(path: &Path, text: &str) -> Result<PathBuf, KmsError> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce = crypto::random_key()?;
    let tmp = path.with_file_name(format!(
        ".{name}.{:02x}{:02x}{:02x}{:02x}.tmp",
        nonce[0], nonce[1], nonce[2], nonce[3]
    ));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(O_NOFOLLOW)
        .open(&tmp)
        .map_err(|source| KmsError::Io {
            path: tmp.clone(),
            source,
        })
        .and_then(|mut file| write_synced(&mut file, &tmp, text));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(error);
    }
    Ok(tmp)
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

    /// A directory of its own, removed when the test ends.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "keel-kms-{}-{}",
                std::process::id(),
                OffsetDateTime::now_utc().unix_timestamp_nanos()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn keys(&self) -> PathBuf {
            self.0.join("master.keys")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn the_file_is_created_0600_on_first_run_and_the_same_keys_come_back() {
        let scratch = Scratch::new();
        let path = scratch.keys();
        let kms = LocalKms::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = envelope::seal(&kms, "ctx", b"a secret").await.unwrap();
        let again = LocalKms::open_or_create(&path).unwrap();
        assert_eq!(again.current_key_id(), kms.current_key_id());
        // Nothing but the key file is left in the directory.
        assert_eq!(std::fs::read_dir(&scratch.0).unwrap().count(), 1);
        assert_eq!(
            envelope::open(&again, "ctx", &sealed)
                .await
                .unwrap()
                .as_slice(),
            b"a secret"
        );
    }

    #[test]
    fn a_key_file_others_can_read_or_a_symlink_is_refused() {
        let scratch = Scratch::new();
        let path = scratch.keys();
        LocalKms::open_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            LocalKms::open(&path),
            Err(KmsError::InsecurePermissions { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = scratch.0.join("link.keys");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(LocalKms::open(&link), Err(KmsError::Io { .. })));
    }

    #[test]
    fn a_damaged_key_file_is_refused_with_the_reason() {
        for text in [
            "not json",
            r#"{"keys":[]}"#,
            r#"{"keys":[{"id":"local-1","created_at":"2026-01-01T00:00:00Z","key":"c2hvcnQ="}]}"#,
        ] {
            let scratch = Scratch::new();
            let path = scratch.keys();
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
        let scratch = Scratch::new();
        let path = scratch.keys();
        let mut kms = LocalKms::open_or_create(&path).unwrap();
        let first = kms.current_key_id().to_owned();
        let old = envelope::seal(&kms, "ctx", b"old secret").await.unwrap();
        let second = kms.rotate().unwrap();
        assert_ne!(first, second);
        let new = envelope::seal(&kms, "ctx", b"new secret").await.unwrap();
        assert_eq!(envelope::master_key_id(&old).unwrap(), first);
        assert_eq!(envelope::master_key_id(&new).unwrap(), second);
        // Reloaded from the file, both still open.
        let reloaded = LocalKms::open(&path).unwrap();
        assert_eq!(reloaded.current_key_id(), second);
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
    async fn a_running_process_opens_envelopes_sealed_under_a_key_another_process_added() {
        let scratch = Scratch::new();
        let path = scratch.keys();
        let running = LocalKms::open_or_create(&path).unwrap();
        let mut cli = LocalKms::open(&path).unwrap();
        cli.rotate().unwrap();
        let sealed = envelope::seal(&cli, "ctx", b"re-wrapped").await.unwrap();
        assert_eq!(
            envelope::open(&running, "ctx", &sealed)
                .await
                .unwrap()
                .as_slice(),
            b"re-wrapped"
        );
        // A key in no file stays unknown.
        let stranger = Scratch::new();
        let other = LocalKms::open_or_create(stranger.keys()).unwrap();
        let foreign = envelope::seal(&other, "ctx", b"x").await.unwrap();
        assert!(matches!(
            envelope::open(&running, "ctx", &foreign).await,
            Err(KmsError::UnknownMasterKey(_))
        ));
    }

    #[tokio::test]
    async fn two_processes_rotating_one_file_keep_each_others_keys() {
        let scratch = Scratch::new();
        let path = scratch.keys();
        let mut api = LocalKms::open_or_create(&path).unwrap();
        let mut worker = LocalKms::open(&path).unwrap();
        let from_api = api.rotate().unwrap();
        let sealed = envelope::seal(&api, "ctx", b"secret").await.unwrap();
        // The worker's view is stale; its rotation re-reads the file first.
        let from_worker = worker.rotate().unwrap();
        assert_ne!(from_api, from_worker);
        let reloaded = LocalKms::open(&path).unwrap();
        assert_eq!(reloaded.current_key_id(), from_worker);
        assert_eq!(
            envelope::open(&reloaded, "ctx", &sealed)
                .await
                .unwrap()
                .as_slice(),
            b"secret"
        );
    }

    #[tokio::test]
    async fn another_context_a_changed_byte_or_another_kms_never_opens_a_secret() {
        let scratch = Scratch::new();
        let kms = LocalKms::open_or_create(scratch.keys()).unwrap();
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
        // Another KMS (its own master keys) cannot unwrap it.
        let elsewhere = Scratch::new();
        let other = LocalKms::open_or_create(elsewhere.keys()).unwrap();
        assert!(matches!(
            envelope::open(&other, "keel/pki/node-ca.key", &sealed).await,
            Err(KmsError::UnknownMasterKey(_))
        ));
    }

    #[tokio::test]
    async fn each_secret_gets_its_own_data_key() {
        let scratch = Scratch::new();
        let kms = LocalKms::open_or_create(scratch.keys()).unwrap();
        let a = envelope::seal(&kms, "ctx", b"same").await.unwrap();
        let b = envelope::seal(&kms, "ctx", b"same").await.unwrap();
        assert_ne!(a, b);
    }
}
