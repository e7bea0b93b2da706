//! The control plane's key material as one process holds it: the two CAs
//! (from Postgres, private keys opened by the KMS; see
//! `keel_inventory::trust`) and the certificates this process presents.
//!
//! The api creates what is missing at start-up
//! ([`ControlPlaneKeys::load_or_create`]); the worker and the CLI only
//! load ([`ControlPlaneKeys::load`]). Service certificates (the api's agent
//! listener, the worker's client certificate) are issued fresh, in memory,
//! by each process from the control-plane CA: no service key is ever
//! written anywhere.

use std::sync::Arc;

use anyhow::Context;
use keel_db::Db;
use keel_inventory::trust;
use keel_kms::AnyKms;
use keel_pki::HotIdentity;
use keel_pki::{CaKind, CertificateAuthority};
use time::Duration;

use crate::Config;

/// Lifetime of the certificates the api and the worker present.
const SERVICE_CERT_LIFETIME: Duration = Duration::days(30);
/// How often a running api or worker re-issues its own certificate (well
/// before it expires; the new one is swapped in without a restart).
pub const SERVICE_CERT_REISSUE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

pub struct ControlPlaneKeys {
    pub node_ca: CertificateAuthority,
    pub control_plane_ca: CertificateAuthority,
}

/// A certificate and its key, as PEM.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The configured KMS. `create` lets a local KMS make its master-key file
/// (the api's start-up; everything else needs it to exist).
pub fn kms(config: &Config, create: bool) -> anyhow::Result<AnyKms> {
    AnyKms::from_config(&config.kms, create).context("opening the KMS (the [kms] section)")
}

impl ControlPlaneKeys {
    /// Loads the key material, creating whatever is missing. For the api.
    pub async fn load_or_create(db: &Db, kms: &AnyKms) -> anyhow::Result<Self> {
        let keys = Self::open(db, kms, true).await?;
        trust::ensure_signing_key(db, kms, &keys.control_plane_ca)
            .await
            .context("creating the first task-signing key")?;
        Ok(keys)
    }

    /// Loads existing key material. For the worker and the CLI.
    pub async fn load(db: &Db, kms: &AnyKms) -> anyhow::Result<Self> {
        Self::open(db, kms, false).await
    }

    async fn open(db: &Db, kms: &AnyKms, create: bool) -> anyhow::Result<Self> {
        let node_ca = trust::authority(db, kms, CaKind::Node, create)
            .await
            .context("loading the node CA")?;
        let control_plane_ca = trust::authority(db, kms, CaKind::ControlPlane, create)
            .await
            .context("loading the control-plane CA")?;
        Ok(Self {
            node_ca,
            control_plane_ca,
        })
    }

    /// [`ControlPlaneKeys::service_identity`] in a form TLS configs can
    /// present and [`reissue_periodically`] can replace.
    pub fn hot_service_identity(
        &self,
        component: &str,
        server_names: &[String],
    ) -> anyhow::Result<Arc<HotIdentity>> {
        let identity = self.service_identity(component, server_names)?;
        Ok(HotIdentity::from_pem(
            &identity.cert_pem,
            &identity.key_pem,
        )?)
    }

    /// A fresh certificate for a control-plane component, from the
    /// control-plane CA. `server_names` non-empty makes it a server
    /// certificate for those names (DNS names or IP addresses).
    pub fn service_identity(
        &self,
        component: &str,
        server_names: &[String],
    ) -> anyhow::Result<Identity> {
        let (issued, key_pem) = if server_names.is_empty() {
            self.control_plane_ca
                .issue_control_plane_client(component, SERVICE_CERT_LIFETIME)?
        } else {
            let (ips, dns): (Vec<_>, Vec<_>) = server_names
                .iter()
                .partition(|name| name.parse::<std::net::IpAddr>().is_ok());
            let ips: Vec<std::net::IpAddr> =
                ips.iter().filter_map(|name| name.parse().ok()).collect();
            let dns: Vec<String> = dns.into_iter().cloned().collect();
            self.control_plane_ca
                .issue_server(component, &dns, &ips, SERVICE_CERT_LIFETIME)?
        };
        Ok(Identity {
            cert_pem: issued.cert_pem,
            key_pem,
        })
    }
}

/// Re-issues `identity` (for `component`, with `server_names`) every
/// [`SERVICE_CERT_REISSUE`] until `stopped`, so a process that runs for
/// months never presents an expired certificate. A failed re-issue is
/// logged and retried at the next tick (the current one has weeks left).
pub async fn reissue_periodically(
    keys: Arc<ControlPlaneKeys>,
    identity: Arc<HotIdentity>,
    component: String,
    server_names: Vec<String>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(SERVICE_CERT_REISSUE);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let renewed = keys
            .service_identity(&component, &server_names)
            .and_then(|next| Ok(identity.replace(&next.cert_pem, &next.key_pem)?));
        match renewed {
            Ok(()) => tracing::info!(%component, "re-issued this process's certificate"),
            Err(error) => {
                tracing::warn!(%component, error = %error, "re-issuing this process's certificate failed")
            }
        }
    }
}
