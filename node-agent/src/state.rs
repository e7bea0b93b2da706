//! The agent's state directory: what enrolment saves and `run` loads.
//!
//! Everything the agent knows about itself lives in one directory, so that an
//! operator can back it up, inspect it or wipe it (to re-enrol) as a unit:
//!
//! | file                   | content                                         |
//! |------------------------|-------------------------------------------------|
//! | `node.json`            | node id, enrolment epoch, name, URLs, listen    |
//! | `key.pem`              | the node's private key (mode 0600)              |
//! | `cert.pem`             | the node certificate issued by the node CA      |
//! | `node-ca.pem`          | the node CA certificate                         |
//! | `control-plane-ca.pem` | the only root the agent trusts for its peers    |
//! | `signing-keys.json`    | the Ed25519 keys tasks must be signed with      |
//! | `high-water`           | highest task sequence number acted on           |
//! | `tasks.log`            | accepted tasks, hash-chained (see [`crate::tasks`]) |
//! | `status.json`          | running, or why the agent stopped (`status`)    |
//! | `renewal.json`         | a renewed key + certificate being installed     |
//! | `workloads/`           | one working directory per allocation            |
//!
//! The directory is created with mode 0700 and every file with mode 0600
//! from the start (never created open and tightened afterwards), and each
//! file is written to a temporary name, fsynced and renamed into place so a
//! crash never leaves a half-written file behind. `node.json` is written last:
//! its presence is what marks an enrolment as complete.
//!
//! Loading is strict. A key file readable by anyone but its owner is refused
//! (as ssh does), and the saved material is cross-checked — the certificate
//! must name this node, every signing key must match its key id, the TLS
//! configurations must build — so that a damaged directory fails at start-up
//! with a clear message instead of at the first task.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_pki::PkiError;
use keel_task::{TaskError, TaskVerifier, VerifyingKey, key_id_of, verifying_key_from_base64};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The record of the enrolment itself.
pub const NODE_FILE: &str = "node.json";
/// The node's private key.
pub const KEY_FILE: &str = "key.pem";
/// The node certificate.
pub const CERT_FILE: &str = "cert.pem";
/// The node CA certificate.
pub const NODE_CA_FILE: &str = "node-ca.pem";
/// The control-plane CA certificate.
pub const CONTROL_PLANE_CA_FILE: &str = "control-plane-ca.pem";
/// The trusted task-signing keys.
pub const SIGNING_KEYS_FILE: &str = "signing-keys.json";
/// The replay high-water mark.
pub const HIGH_WATER_FILE: &str = "high-water";
/// A renewed key and certificate, written before they replace
/// `key.pem` and `cert.pem` (a redo record: see [`install_identity`]).
pub const RENEWAL_FILE: &str = "renewal.json";
/// The append-only log of accepted tasks.
pub const TASK_LOG_FILE: &str = "tasks.log";
/// The parent of all workload working directories.
pub const WORKLOADS_DIR: &str = "workloads";

/// Mode of the state directory: owner only.
pub const STATE_DIR_MODE: u32 = 0o700;
/// Mode of every file the agent writes: owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// What `node.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The id the control plane gave this node.
    pub node_id: Uuid,
    /// The enrolment epoch; tasks for any other epoch are refused.
    pub enrolment_epoch: u64,
    /// The human-readable name the node enrolled with.
    pub name: String,
    /// The address the agent's HTTPS server listens on.
    pub listen: SocketAddr,
    /// The URL the control plane was told to reach the agent at.
    pub agent_url: String,
    /// The control plane's agent-facing base URL, where reports go.
    pub agent_api_url: String,
    /// When enrolment completed.
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
}

/// One task-signing key, as the control plane publishes it. The agent
/// keeps retired keys too (so a retirement is never undone) but trusts
/// only those not retired by its own clock (see [`crate::keyring`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyRecord {
    /// The key's fingerprint as computed by [`keel_task::key_id_of`].
    pub key_id: String,
    /// Standard base64 of the 32 raw bytes of the Ed25519 public key.
    pub public_key: String,
    /// Unix seconds from which the control plane signs with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signs_from: Option<i64>,
    /// Unix seconds after which it is no longer trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retires_at: Option<i64>,
    /// Base64 of the control-plane CA's signature over the key,
    /// `signs_from` and `retires_at` (`keel_task::key_statement`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_signature: Option<String>,
}

impl SigningKeyRecord {
    /// Whether the key is trusted at `now_unix` (not yet retired).
    pub fn is_live(&self, now_unix: i64) -> bool {
        self.retires_at.is_none_or(|retires| retires > now_unix)
    }
}

/// Everything the agent needs to run, as saved by enrolment.
#[derive(Clone)]
pub struct AgentState {
    /// The state directory this was loaded from or will be saved to.
    pub dir: PathBuf,
    /// The contents of `node.json`.
    pub node: NodeRecord,
    /// The node's private key, PEM.
    pub key_pem: String,
    /// The node certificate, PEM.
    pub cert_pem: String,
    /// The node CA certificate, PEM.
    pub node_ca_pem: String,
    /// The control-plane CA certificate, PEM.
    pub control_plane_ca_pem: String,
    /// The trusted task-signing keys.
    pub signing_keys: Vec<SigningKeyRecord>,
}

impl fmt::Debug for AgentState {
    /// Leaves the private key out, so the state can be logged safely.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("AgentState")
            .field("dir", &self.dir)
            .field("node", &self.node)
            .field("signing_keys", &self.signing_keys)
            .finish_non_exhaustive()
    }
}

/// Why the state directory could not be saved, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory holds no completed enrolment.
    #[error("{dir} holds no enrolment (no {NODE_FILE}); run `keel-agent join` first")]
    NotEnrolled {
        /// The state directory.
        dir: PathBuf,
    },

    /// The directory already holds an enrolment that would be overwritten.
    #[error("{dir} already holds an enrolment; move it away first if you really mean to re-enrol")]
    AlreadyEnrolled {
        /// The state directory.
        dir: PathBuf,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A JSON file could not be parsed or produced.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },

    /// The private key file is accessible to other users.
    #[error(
        "{path} has mode {mode:o}, which lets other users read the node's private key; \
         run `chmod 600` on it"
    )]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// No task-signing key is trusted, so no task could ever be accepted.
    #[error("no task-signing keys are configured")]
    NoSigningKeys,

    /// A task-signing key could not be decoded.
    #[error("task-signing key {key_id:?} is invalid: {source}")]
    InvalidSigningKey {
        /// The key id it was listed under.
        key_id: String,
        /// Why it was refused.
        #[source]
        source: TaskError,
    },

    /// A task-signing key is listed under a key id that is not its own.
    #[error("task-signing key listed as {listed:?} actually has key id {actual:?}")]
    SigningKeyIdMismatch {
        /// The key id in the list.
        listed: String,
        /// The key id computed from the key.
        actual: String,
    },

    /// The node certificate does not carry this node's identity.
    #[error("the node certificate does not name node {node_id}")]
    CertificateNotForNode {
        /// The node id from `node.json`.
        node_id: Uuid,
    },

    /// The control plane's agent-facing URL is not HTTPS.
    #[error("agent_api_url {url:?} must be an https:// URL")]
    InsecureAgentApiUrl {
        /// The URL found.
        url: String,
    },

    /// Certificates or keys could not be turned into a TLS configuration.
    #[error("{what}: {source}")]
    Tls {
        /// Which configuration or certificate was being built.
        what: &'static str,
        /// The PKI library's error.
        #[source]
        source: PkiError,
    },
}

impl AgentState {
    /// Whether `dir` holds a completed enrolment.
    pub fn is_enrolled(dir: &Path) -> bool {
        dir.join(NODE_FILE).exists()
    }

    /// Writes the whole state to [`AgentState::dir`], creating the directory
    /// with mode 0700 if needed. Refuses to overwrite an existing enrolment.
    pub fn save(&self) -> Result<(), StateError> {
        if Self::is_enrolled(&self.dir) {
            return Err(StateError::AlreadyEnrolled {
                dir: self.dir.clone(),
            });
        }
        create_private_dir(&self.dir)?;
        let signing_keys_json =
            to_json_bytes(&self.dir.join(SIGNING_KEYS_FILE), &self.signing_keys)?;
        let node_json = to_json_bytes(&self.dir.join(NODE_FILE), &self.node)?;

        save_file(&self.dir.join(KEY_FILE), self.key_pem.as_bytes())?;
        save_file(&self.dir.join(CERT_FILE), self.cert_pem.as_bytes())?;
        save_file(&self.dir.join(NODE_CA_FILE), self.node_ca_pem.as_bytes())?;
        save_file(
            &self.dir.join(CONTROL_PLANE_CA_FILE),
            self.control_plane_ca_pem.as_bytes(),
        )?;
        save_file(&self.dir.join(SIGNING_KEYS_FILE), &signing_keys_json)?;
        // Last, so that a crash part-way leaves a directory that is visibly
        // not enrolled rather than one that looks complete but is not.
        save_file(&self.dir.join(NODE_FILE), &node_json)?;
        Ok(())
    }

    /// Reads and cross-checks the state saved in `dir`.
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        if !Self::is_enrolled(dir) {
            return Err(StateError::NotEnrolled {
                dir: dir.to_path_buf(),
            });
        }
        let key_path = dir.join(KEY_FILE);
        finish_pending_renewal(dir)?;
        refuse_key_file_readable_by_others(&key_path)?;

        let node: NodeRecord = read_json(&dir.join(NODE_FILE))?;
        let signing_keys: Vec<SigningKeyRecord> = read_json(&dir.join(SIGNING_KEYS_FILE))?;
        let state = Self {
            dir: dir.to_path_buf(),
            node,
            key_pem: read_text(&key_path)?,
            cert_pem: read_text(&dir.join(CERT_FILE))?,
            node_ca_pem: read_text(&dir.join(NODE_CA_FILE))?,
            control_plane_ca_pem: read_text(&dir.join(CONTROL_PLANE_CA_FILE))?,
            signing_keys,
        };
        state.validate()?;
        Ok(state)
    }

    /// Checks that the pieces fit together: the certificate names this node,
    /// every signing key decodes and matches its key id, the report URL is
    /// HTTPS, and both TLS configurations can be built.
    pub fn validate(&self) -> Result<(), StateError> {
        let certificates =
            keel_pki::certs_from_pem(&self.cert_pem).map_err(|source| StateError::Tls {
                what: "node certificate",
                source,
            })?;
        let names_this_node = certificates
            .first()
            .and_then(|leaf| keel_pki::node_identity(leaf.as_ref()))
            == Some(self.node.node_id);
        if !names_this_node {
            return Err(StateError::CertificateNotForNode {
                node_id: self.node.node_id,
            });
        }
        if !self.node.agent_api_url.starts_with("https://") {
            return Err(StateError::InsecureAgentApiUrl {
                url: self.node.agent_api_url.clone(),
            });
        }
        self.verifying_keys()?;
        self.server_tls_config()?;
        self.report_client_tls_config()?;
        Ok(())
    }

    /// Every known task-signing key (retired ones included), decoded and
    /// checked against its id.
    pub fn verifying_keys(&self) -> Result<Vec<VerifyingKey>, StateError> {
        decode_signing_keys(&self.signing_keys)
    }

    /// A verifier for tasks addressed to this node in its current epoch,
    /// trusting the keys live at `now_unix`.
    pub fn task_verifier_at(&self, now_unix: i64) -> Result<TaskVerifier, StateError> {
        let live: Vec<SigningKeyRecord> = self
            .signing_keys
            .iter()
            .filter(|record| record.is_live(now_unix))
            .cloned()
            .collect();
        Ok(TaskVerifier::new(
            self.node.node_id,
            self.node.enrolment_epoch,
            decode_signing_keys(&live).or_else(|error| match error {
                StateError::NoSigningKeys => Ok(Vec::new()),
                other => Err(other),
            })?,
        ))
    }

    /// The public fields of this state's identity, for logs and `status`.
    pub fn certificate_validity(&self) -> Option<(OffsetDateTime, OffsetDateTime)> {
        let der = keel_pki::certs_from_pem(&self.cert_pem).ok()?;
        keel_pki::validity(der.first()?.as_ref())
    }
}

/// Decodes task-signing key records, checking each against its key id.
pub fn decode_signing_keys(records: &[SigningKeyRecord]) -> Result<Vec<VerifyingKey>, StateError> {
    if records.is_empty() {
        return Err(StateError::NoSigningKeys);
    }
    records
        .iter()
        .map(|record| {
            let verifying_key =
                verifying_key_from_base64(&record.public_key).map_err(|source| {
                    StateError::InvalidSigningKey {
                        key_id: record.key_id.clone(),
                        source,
                    }
                })?;
            let actual = key_id_of(&verifying_key);
            if actual != record.key_id {
                return Err(StateError::SigningKeyIdMismatch {
                    listed: record.key_id.clone(),
                    actual,
                });
            }
            Ok(verifying_key)
        })
        .collect()
}

impl AgentState {
    /// A verifier for tasks addressed to this node in its current epoch,
    /// trusting the keys live now.
    pub fn task_verifier(&self) -> Result<TaskVerifier, StateError> {
        self.task_verifier_at(OffsetDateTime::now_utc().unix_timestamp())
    }

    /// The TLS server configuration: the node certificate, and client
    /// certificates required to chain to the control-plane CA and nothing
    /// else.
    pub fn server_tls_config(&self) -> Result<Arc<rustls::ServerConfig>, StateError> {
        let control_plane_roots = self.control_plane_roots()?;
        keel_pki::server_config_requiring_client_certs(
            &control_plane_roots,
            &self.cert_pem,
            &self.key_pem,
        )
        .map_err(|source| StateError::Tls {
            what: "agent TLS server configuration",
            source,
        })
    }

    /// The TLS client configuration for reports: the control plane's server
    /// certificate must chain to the control-plane CA, and the agent presents
    /// its node certificate.
    pub fn report_client_tls_config(&self) -> Result<Arc<rustls::ClientConfig>, StateError> {
        let control_plane_roots = self.control_plane_roots()?;
        keel_pki::client_config(&control_plane_roots, &self.cert_pem, &self.key_pem).map_err(
            |source| StateError::Tls {
                what: "report client TLS configuration",
                source,
            },
        )
    }

    /// Where workload working directories live.
    pub fn workloads_dir(&self) -> PathBuf {
        self.dir.join(WORKLOADS_DIR)
    }

    fn control_plane_roots(
        &self,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, StateError> {
        keel_pki::certs_from_pem(&self.control_plane_ca_pem).map_err(|source| StateError::Tls {
            what: "control-plane CA certificate",
            source,
        })
    }
}

/// Reads `node.json` alone (re-enrolment needs the node id even when the
/// rest of the state no longer loads, e.g. with an expired certificate).
pub fn read_node_record(dir: &Path) -> Result<NodeRecord, StateError> {
    read_json(&dir.join(NODE_FILE))
}

/// What an enrolled node trusts now: the control-plane CA (PEM) and the
/// task-signing keys with what it learned of their retirement. A
/// re-enrolment keeps both unless the operator pins another CA.
pub fn read_trust(dir: &Path) -> Result<(String, Vec<SigningKeyRecord>), StateError> {
    Ok((
        read_text(&dir.join(CONTROL_PLANE_CA_FILE))?,
        read_json(&dir.join(SIGNING_KEYS_FILE))?,
    ))
}

/// Replaces `signing-keys.json` (atomically).
pub fn save_signing_keys(dir: &Path, records: &[SigningKeyRecord]) -> Result<(), StateError> {
    let path = dir.join(SIGNING_KEYS_FILE);
    let bytes = to_json_bytes(&path, &records)?;
    save_file(&path, &bytes)
}

/// A renewed identity (or a whole re-enrolment) on its way into the
/// state files.
#[derive(Serialize, Deserialize)]
struct PendingIdentity {
    cert_pem: String,
    key_pem: String,
    /// Re-enrolment only: everything else enrolment hands over.
    #[serde(default)]
    reenrolment: Option<Box<Reenrolment>>,
}

#[derive(Serialize, Deserialize)]
struct Reenrolment {
    node: NodeRecord,
    node_ca_pem: String,
    control_plane_ca_pem: String,
    signing_keys: Vec<SigningKeyRecord>,
}

/// Installs a new key and certificate so that a crash at any point leaves
/// either the old pair or the new pair, never a key with the wrong
/// certificate: the pair is first written whole to `renewal.json`, then
/// each file is replaced, then the record is removed. [`AgentState::load`]
/// finishes an installation a crash interrupted.
pub fn install_identity(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), StateError> {
    write_pending(
        dir,
        &PendingIdentity {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            reenrolment: None,
        },
    )
}

/// Replaces an enrolment with a re-enrolment of the same node, keeping the
/// task ledger and the workloads: like [`install_identity`], all or
/// nothing across a crash.
pub fn install_reenrolment(state: &AgentState) -> Result<(), StateError> {
    write_pending(
        &state.dir,
        &PendingIdentity {
            cert_pem: state.cert_pem.clone(),
            key_pem: state.key_pem.clone(),
            reenrolment: Some(Box::new(Reenrolment {
                node: state.node.clone(),
                node_ca_pem: state.node_ca_pem.clone(),
                control_plane_ca_pem: state.control_plane_ca_pem.clone(),
                signing_keys: state.signing_keys.clone(),
            })),
        },
    )
}

fn write_pending(dir: &Path, pending_identity: &PendingIdentity) -> Result<(), StateError> {
    let pending = dir.join(RENEWAL_FILE);
    let record = serde_json::to_vec(pending_identity).map_err(|source| StateError::Json {
        path: pending.clone(),
        source,
    })?;
    save_file(&pending, &record)?;
    finish_pending_renewal(dir)
}

/// Completes an identity installation recorded in `renewal.json`, if any.
fn finish_pending_renewal(dir: &Path) -> Result<(), StateError> {
    let pending = dir.join(RENEWAL_FILE);
    let text = match fs::read_to_string(&pending) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StateError::Io {
                path: pending,
                source,
            });
        }
    };
    let Ok(identity) = serde_json::from_str::<PendingIdentity>(&text) else {
        // Written atomically, so unreadable means it never completed: the
        // old pair is still in place.
        fs::remove_file(&pending).map_err(|source| StateError::Io {
            path: pending.clone(),
            source,
        })?;
        return Ok(());
    };
    save_file(&dir.join(KEY_FILE), identity.key_pem.as_bytes())?;
    save_file(&dir.join(CERT_FILE), identity.cert_pem.as_bytes())?;
    if let Some(reenrolment) = identity.reenrolment {
        save_file(&dir.join(NODE_CA_FILE), reenrolment.node_ca_pem.as_bytes())?;
        save_file(
            &dir.join(CONTROL_PLANE_CA_FILE),
            reenrolment.control_plane_ca_pem.as_bytes(),
        )?;
        save_signing_keys(dir, &reenrolment.signing_keys)?;
        let node_path = dir.join(NODE_FILE);
        let node_json = to_json_bytes(&node_path, &reenrolment.node)?;
        save_file(&node_path, &node_json)?;
        let _ = fs::remove_file(dir.join(crate::status::STATUS_FILE));
    }
    fs::remove_file(&pending).map_err(|source| StateError::Io {
        path: pending.clone(),
        source,
    })?;
    sync_parent_dir(&pending).map_err(|source| StateError::Io {
        path: pending,
        source,
    })
}

/// Creates `dir` (and its parents) if missing and makes sure it is 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    let io_error = |source| StateError::Io {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(io_error)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(STATE_DIR_MODE)).map_err(io_error)
}

/// Replaces `path` with `contents` so that readers only ever see the old or
/// the new file, and the new one survives a power cut once this returns.
///
/// The temporary file is created with mode 0600 from the start, which matters
/// for the private key: it is never readable by others, not even briefly.
pub(crate) fn write_file_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut temporary_name = path.as_os_str().to_owned();
    temporary_name.push(".tmp");
    let temporary_path = PathBuf::from(temporary_name);

    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE_MODE)
        .open(&temporary_path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary_path, path)?;
    sync_parent_dir(path)
}

/// [`write_file_atomically`] with the path attached to any error.
fn save_file(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    write_file_atomically(path, contents).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Fsyncs the directory holding `path`, which is what makes a rename (or a
/// newly created file) itself durable.
pub(crate) fn sync_parent_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

fn refuse_key_file_readable_by_others(key_path: &Path) -> Result<(), StateError> {
    let metadata = fs::metadata(key_path).map_err(|source| StateError::Io {
        path: key_path.to_path_buf(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StateError::InsecureKeyFile {
            path: key_path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn read_text(path: &Path) -> Result<String, StateError> {
    fs::read_to_string(path).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|source| StateError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn to_json_bytes<T: Serialize>(path: &Path, value: &T) -> Result<Vec<u8>, StateError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_pki::{CaKind, CertificateAuthority};
    use keel_task::{TaskSigner, verifying_key_to_base64};

    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new() -> Self {
            Self(std::env::temp_dir().join(format!("keel-agent-state-test-{}", Uuid::new_v4())))
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample_state(dir: &Path) -> AgentState {
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let node_id = Uuid::new_v4();
        let (csr_pem, key_pem) = keel_pki::make_csr("node-a").unwrap();
        let issued = node_ca
            .sign_node_csr(&csr_pem, node_id, time::Duration::hours(1))
            .unwrap();
        let signer = TaskSigner::generate();
        AgentState {
            dir: dir.to_path_buf(),
            node: NodeRecord {
                node_id,
                enrolment_epoch: 1,
                name: "node-a".to_owned(),
                listen: "127.0.0.1:7443".parse().unwrap(),
                agent_url: "https://127.0.0.1:7443".to_owned(),
                agent_api_url: "https://127.0.0.1:8443".to_owned(),
                enrolled_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            },
            key_pem,
            cert_pem: issued.cert_pem,
            node_ca_pem: node_ca.cert_pem().to_owned(),
            control_plane_ca_pem: control_plane_ca.cert_pem().to_owned(),
            signing_keys: vec![SigningKeyRecord {
                key_id: signer.key_id().to_owned(),
                public_key: verifying_key_to_base64(&signer.verifying_key()),
                ..SigningKeyRecord::default()
            }],
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_saved_state_loads_back_unchanged() {
        let scratch = ScratchDir::new();
        let state = sample_state(&scratch.0);
        state.save().unwrap();
        let loaded = AgentState::load(&scratch.0).unwrap();
        assert_eq!(loaded.node, state.node);
        assert_eq!(loaded.key_pem, state.key_pem);
        assert_eq!(loaded.cert_pem, state.cert_pem);
        assert_eq!(loaded.signing_keys, state.signing_keys);
    }

    #[test]
    fn the_directory_is_owner_only_and_every_file_is_mode_0600() {
        let scratch = ScratchDir::new();
        sample_state(&scratch.0).save().unwrap();
        assert_eq!(mode_of(&scratch.0), 0o700);
        for file in [
            NODE_FILE,
            KEY_FILE,
            CERT_FILE,
            NODE_CA_FILE,
            CONTROL_PLANE_CA_FILE,
            SIGNING_KEYS_FILE,
        ] {
            assert_eq!(mode_of(&scratch.0.join(file)), 0o600, "{file}");
        }
    }

    #[test]
    fn an_existing_enrolment_is_never_overwritten() {
        let scratch = ScratchDir::new();
        sample_state(&scratch.0).save().unwrap();
        assert!(matches!(
            sample_state(&scratch.0).save(),
            Err(StateError::AlreadyEnrolled { .. })
        ));
    }

    #[test]
    fn a_directory_without_an_enrolment_is_reported_as_such() {
        let scratch = ScratchDir::new();
        assert!(matches!(
            AgentState::load(&scratch.0),
            Err(StateError::NotEnrolled { .. })
        ));
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        let scratch = ScratchDir::new();
        sample_state(&scratch.0).save().unwrap();
        fs::set_permissions(scratch.0.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            AgentState::load(&scratch.0),
            Err(StateError::InsecureKeyFile { mode: 0o644, .. })
        ));
    }

    #[test]
    fn a_certificate_for_another_node_is_refused() {
        let scratch = ScratchDir::new();
        let mut state = sample_state(&scratch.0);
        state.node.node_id = Uuid::new_v4();
        assert!(matches!(
            state.validate(),
            Err(StateError::CertificateNotForNode { .. })
        ));
    }

    #[test]
    fn a_signing_key_listed_under_the_wrong_id_is_refused() {
        let scratch = ScratchDir::new();
        let mut state = sample_state(&scratch.0);
        state.signing_keys[0].key_id = "0000000000000000".to_owned();
        assert!(matches!(
            state.validate(),
            Err(StateError::SigningKeyIdMismatch { .. })
        ));
    }

    #[test]
    fn an_empty_signing_key_list_is_refused() {
        let scratch = ScratchDir::new();
        let mut state = sample_state(&scratch.0);
        state.signing_keys.clear();
        assert!(matches!(state.validate(), Err(StateError::NoSigningKeys)));
    }

    #[test]
    fn a_plain_http_report_url_is_refused() {
        let scratch = ScratchDir::new();
        let mut state = sample_state(&scratch.0);
        state.node.agent_api_url = "http://127.0.0.1:8443".to_owned();
        assert!(matches!(
            state.validate(),
            Err(StateError::InsecureAgentApiUrl { .. })
        ));
    }

    #[test]
    fn an_interrupted_renewal_is_finished_on_load_and_a_torn_one_dropped() {
        let scratch = ScratchDir::new();
        let state = sample_state(&scratch.0);
        state.save().unwrap();
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let (csr_pem, new_key) = keel_pki::make_csr("node-a").unwrap();
        let new_cert = node_ca
            .sign_node_csr(&csr_pem, state.node.node_id, time::Duration::hours(1))
            .unwrap()
            .cert_pem;

        // A crash after the record was written, before the files moved.
        let record = serde_json::json!({ "cert_pem": new_cert, "key_pem": new_key });
        fs::write(scratch.0.join(RENEWAL_FILE), record.to_string()).unwrap();
        let loaded = AgentState::load(&scratch.0).unwrap();
        assert_eq!(
            (loaded.cert_pem.as_str(), loaded.key_pem.as_str()),
            (new_cert.as_str(), new_key.as_str())
        );
        assert!(!scratch.0.join(RENEWAL_FILE).exists());
        assert_eq!(mode_of(&scratch.0.join(KEY_FILE)), 0o600);

        // A record torn mid-write never completed: the pair in place stays.
        fs::write(scratch.0.join(RENEWAL_FILE), "{\"cert_pem\": \"tr").unwrap();
        let loaded = AgentState::load(&scratch.0).unwrap();
        assert_eq!(loaded.cert_pem, new_cert);
        assert!(!scratch.0.join(RENEWAL_FILE).exists());
    }

    #[test]
    fn the_debug_output_leaves_the_private_key_out() {
        let scratch = ScratchDir::new();
        let state = sample_state(&scratch.0);
        assert!(!format!("{state:?}").contains("PRIVATE KEY"));
    }
}
