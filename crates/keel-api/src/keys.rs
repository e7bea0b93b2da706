//! The control plane's key material: the node CA, the control-plane CA,
//! the task-signing key, and the certificates the api's agent listener and
//! the worker present.
//!
//! Kept as files (keys 0600) in `pki.dir`; the api creates what is missing
//! at start-up ([`ControlPlaneKeys::load_or_create`]), the worker only
//! loads ([`ControlPlaneKeys::load`]). Envelope encryption of these keys
//! under a KMS key, and their storage in Postgres for multi-host
//! deployments, is the node-channel issue's work; this module is the seam.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keel_pki::{CaKind, CertificateAuthority};
use keel_task::TaskSigner;
use time::{Duration, OffsetDateTime};

/// Lifetime of the certificates the api and the worker present.
const SERVICE_CERT_LIFETIME: Duration = Duration::days(30);
/// Re-issue a service certificate when less than this is left.
const SERVICE_CERT_RENEW_BEFORE: Duration = Duration::days(7);

pub struct ControlPlaneKeys {
    pub node_ca: CertificateAuthority,
    pub control_plane_ca: CertificateAuthority,
    pub task_signer: TaskSigner,
    dir: PathBuf,
}

/// A certificate and its key, as PEM.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("writing {}", temporary.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn load_ca(
    dir: &Path,
    kind: CaKind,
    stem: &str,
    create: bool,
) -> anyhow::Result<CertificateAuthority> {
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    if cert.exists() && key.exists() {
        return CertificateAuthority::from_pem(kind, &read(&cert)?, &read(&key)?)
            .with_context(|| format!("loading the {kind} CA from {}", dir.display()));
    }
    if !create {
        bail!(
            "the {kind} CA is missing in {} (start the api once to create it)",
            dir.display()
        );
    }
    let ca = CertificateAuthority::generate(kind)?;
    write_private(&key, &ca.key_pem())?;
    write_private(&cert, ca.cert_pem())?;
    tracing::info!(%kind, fingerprint = %ca.fingerprint_sha256_hex(), "created a certificate authority");
    Ok(ca)
}

/// When a PEM certificate expires; `None` if it cannot be read (then it
/// is simply re-issued).
fn certificate_not_after(cert_pem: &str) -> Option<OffsetDateTime> {
    let der = keel_pki::certs_from_pem(cert_pem)
        .ok()?
        .into_iter()
        .next()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(&der).ok()?;
    OffsetDateTime::from_unix_timestamp(certificate.validity().not_after.timestamp()).ok()
}

impl ControlPlaneKeys {
    /// Loads the key material, creating whatever is missing. For the api.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        Self::open(dir, true)
    }

    /// Loads existing key material. For the worker.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        Self::open(dir, false)
    }

    fn open(dir: &Path, create: bool) -> anyhow::Result<Self> {
        let node_ca = load_ca(dir, CaKind::Node, "node-ca", create)?;
        let control_plane_ca = load_ca(dir, CaKind::ControlPlane, "control-plane-ca", create)?;
        let signer_path = dir.join("task-signing.key");
        let task_signer = if signer_path.exists() {
            TaskSigner::from_pkcs8_pem(&read(&signer_path)?)
                .context("loading the task-signing key")?
        } else if create {
            let signer = TaskSigner::generate();
            write_private(&signer_path, &signer.to_pkcs8_pem())?;
            signer
        } else {
            bail!("the task-signing key is missing in {}", dir.display());
        };
        Ok(Self {
            node_ca,
            control_plane_ca,
            task_signer,
            dir: dir.to_owned(),
        })
    }

    /// The certificate a control-plane component presents, issued by the
    /// control-plane CA and re-issued when it nears expiry. `server_names`
    /// non-empty makes it a server certificate for those names.
    pub fn service_identity(
        &self,
        component: &str,
        server_names: &[String],
    ) -> anyhow::Result<Identity> {
        let (cert_path, key_path) = (
            self.dir.join(format!("{component}.crt")),
            self.dir.join(format!("{component}.key")),
        );
        if cert_path.exists() && key_path.exists() {
            let cert_pem = read(&cert_path)?;
            let fresh = certificate_not_after(&cert_pem).is_some_and(|not_after| {
                not_after - OffsetDateTime::now_utc() > SERVICE_CERT_RENEW_BEFORE
            });
            if fresh {
                return Ok(Identity {
                    cert_pem,
                    key_pem: read(&key_path)?,
                });
            }
        }
        let (issued, key_pem) = if server_names.is_empty() {
            self.control_plane_ca
                .issue_control_plane_client(component, SERVICE_CERT_LIFETIME)?
        } else {
            let (dns, ips): (Vec<String>, Vec<std::net::IpAddr>) =
                server_names
                    .iter()
                    .fold((Vec::new(), Vec::new()), |(mut dns, mut ips), name| {
                        match name.parse() {
                            Ok(ip) => ips.push(ip),
                            Err(_) => dns.push(name.clone()),
                        }
                        (dns, ips)
                    });
            self.control_plane_ca
                .issue_server(component, &dns, &ips, SERVICE_CERT_LIFETIME)?
        };
        write_private(&key_path, &key_pem)?;
        write_private(&cert_path, &issued.cert_pem)?;
        Ok(Identity {
            cert_pem: issued.cert_pem,
            key_pem,
        })
    }
}
