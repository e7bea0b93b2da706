//! The agent's own calls to the control plane (besides reports): learning
//! task-signing keys and renewing its certificate, over the same mutual
//! TLS as reports, presenting the node certificate of the moment.
//!
//! - **Keys**: every [`LinkTiming::key_refresh`] the agent fetches the
//!   published keys, merges them ([`crate::keyring::merge`]: only keys and
//!   retirements the pinned control-plane CA signed), saves them and swaps
//!   the verifier. It
//!   also re-evaluates retirements on its own clock, network or not.
//! - **Renewal**: at a random point between 50 % and 70 % of the time from
//!   when it got its certificate to its expiry, the agent makes a NEW key,
//!   asks `POST /v1/agent/renew` (authenticated by the current
//!   certificate), installs the pair crash-safely
//!   ([`crate::state::install_identity`]) and swaps it into the running
//!   listener and client ([`keel_pki::HotIdentity`]): no restart, and open
//!   connections keep going. A failed attempt is retried every
//!   [`LinkTiming::renewal_retry`] until the certificate expires.
//! - **Heartbeats**: every [`LinkTiming::heartbeat`] the agent posts its
//!   detected capacity and the allocations it runs
//!   (`POST /v1/agent/heartbeat`); the control plane marks a host that
//!   stops doing so offline.
//! - **Giving up, clearly**: an expired certificate, or a control plane
//!   that refuses this node's certificate (403: revoked, or superseded by
//!   a re-enrolment), ends [`ControlPlaneLink::run`] with
//!   [`LinkOutcome::NeedsReenrolment`]; `run` then writes `status.json` and
//!   exits with code 78 rather than crash-looping.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_pki::HotIdentity;
use rand::Rng as _;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::time::Instant;
use uuid::Uuid;

use crate::keyring::{self, Merged, PublishedKeys};
use crate::state::{
    AgentState, CERT_FILE, SigningKeyRecord, StateError, install_identity, save_signing_keys,
};
use crate::status::{AgentCondition, Status, write_status};
use crate::tasks::TaskInbox;
use crate::workloads::WorkloadDriver;

/// How often the link works.
#[derive(Debug, Clone, Copy)]
pub struct LinkTiming {
    pub key_refresh: Duration,
    pub renewal_retry: Duration,
    pub heartbeat: Duration,
}

impl Default for LinkTiming {
    fn default() -> Self {
        Self {
            key_refresh: Duration::from_secs(60),
            renewal_retry: Duration::from_secs(30),
            heartbeat: Duration::from_secs(15),
        }
    }
}

/// Why a call to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("could not reach the control plane: {0}")]
    Unreachable(String),
    #[error("the control plane refused ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("the control plane's answer is unusable: {0}")]
    Invalid(String),
    #[error(transparent)]
    State(#[from] StateError),
}

impl LinkError {
    /// A refusal that means this node's certificate is no longer accepted.
    fn is_certificate_refused(&self) -> bool {
        matches!(self, LinkError::Refused { status: 403, .. })
    }
}

/// How [`ControlPlaneLink::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOutcome {
    Stopped,
    NeedsReenrolment(String),
}

#[derive(Deserialize)]
struct Renewed {
    certificate_pem: String,
}

fn build_client(client_tls: &rustls::ClientConfig) -> Result<reqwest::Client, LinkError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_tls.clone())
        .https_only(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(|error| LinkError::Invalid(error.to_string()))
}

/// Key refresh and certificate renewal for one running agent.
pub struct ControlPlaneLink {
    dir: PathBuf,
    node_id: Uuid,
    enrolment_epoch: u64,
    base_url: String,
    /// Rebuilt after each renewal, so the next call makes a new connection
    /// that presents the new certificate (pooled ones would go on with the
    /// old; the control plane lets the old one ask for a renewal again only
    /// until the new one has been presented).
    client: Mutex<reqwest::Client>,
    client_tls: rustls::ClientConfig,
    identity: Arc<HotIdentity>,
    inbox: Arc<TaskInbox>,
    driver: Arc<dyn WorkloadDriver>,
    /// The pinned control-plane CA: it vouches for every signing key.
    control_plane_ca_der: Vec<u8>,
    keys: tokio::sync::Mutex<Vec<SigningKeyRecord>>,
    /// When the current certificate was obtained, and when it expires.
    certificate: Mutex<(OffsetDateTime, OffsetDateTime)>,
    timing: LinkTiming,
    /// What heartbeats report instead of the detected capacity.
    capacity: crate::config::CapacityConfig,
}

impl std::fmt::Debug for ControlPlaneLink {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ControlPlaneLink")
            .field("node_id", &self.node_id)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// When a certificate was obtained: when its file was written (an agent
/// that restarts keeps its renewal schedule), but never before it became
/// valid.
fn obtained_at(state: &AgentState, not_before: OffsetDateTime) -> OffsetDateTime {
    std::fs::metadata(state.dir.join(CERT_FILE))
        .and_then(|metadata| metadata.modified())
        .ok()
        .map(OffsetDateTime::from)
        .map_or(not_before, |written| written.max(not_before))
}

impl ControlPlaneLink {
    pub fn new(
        state: &AgentState,
        identity: Arc<HotIdentity>,
        client_tls: rustls::ClientConfig,
        inbox: Arc<TaskInbox>,
        driver: Arc<dyn WorkloadDriver>,
        timing: LinkTiming,
    ) -> Result<Self, LinkError> {
        let (not_before, not_after) = state
            .certificate_validity()
            .ok_or_else(|| LinkError::Invalid("the node certificate has no validity".into()))?;
        let client = build_client(&client_tls)?;
        Ok(Self {
            dir: state.dir.clone(),
            node_id: state.node.node_id,
            enrolment_epoch: state.node.enrolment_epoch,
            base_url: state.node.agent_api_url.trim_end_matches('/').to_owned(),
            client: Mutex::new(client),
            client_tls,
            identity,
            inbox,
            driver,
            control_plane_ca_der: keel_pki::certs_from_pem(&state.control_plane_ca_pem)
                .ok()
                .and_then(|certs| certs.into_iter().next())
                .map(|der| der.as_ref().to_vec())
                .ok_or_else(|| LinkError::Invalid("no control-plane CA certificate".into()))?,
            keys: tokio::sync::Mutex::new(state.signing_keys.clone()),
            certificate: Mutex::new((obtained_at(state, not_before), not_after)),
            timing,
            capacity: crate::config::CapacityConfig::default(),
        })
    }

    fn client(&self) -> reqwest::Client {
        self.client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn certificate(&self) -> (OffsetDateTime, OffsetDateTime) {
        match self.certificate.lock() {
            Ok(guard) => *guard,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// When the current certificate expires.
    pub fn certificate_not_after(&self) -> OffsetDateTime {
        self.certificate().1
    }

    /// The renewal time for `fraction` (0.5–0.7) of the way from when the
    /// certificate was obtained to its expiry.
    pub fn renewal_due(&self, fraction: f64) -> OffsetDateTime {
        let (obtained, not_after) = self.certificate();
        obtained + (not_after - obtained) * fraction
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, LinkError> {
        let response = request
            .send()
            .await
            .map_err(|error| LinkError::Unreachable(error.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(LinkError::Refused {
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        })
    }

    /// Fetches the published keys and trusts the endorsed ones.
    pub async fn refresh_keys(&self) -> Result<Merged, LinkError> {
        let response = self
            .call(
                self.client()
                    .get(format!("{}/v1/agent/signing-keys", self.base_url)),
            )
            .await?;
        let published: PublishedKeys = response
            .json()
            .await
            .map_err(|error| LinkError::Invalid(error.to_string()))?;
        let mut keys = self.keys.lock().await;
        let merged = keyring::merge(&keys, &published.keys, &self.control_plane_ca_der);
        for (key_id, reason) in &merged.refused {
            tracing::warn!(%key_id, reason, "refused a task-signing key the control plane published");
        }
        if merged.changed() {
            save_signing_keys(&self.dir, &merged.records)?;
            tracing::info!(added = ?merged.added, retired = ?merged.retired, "task-signing keys updated");
            *keys = merged.records.clone();
        }
        self.apply_keys(&keys);
        Ok(merged)
    }

    /// Rebuilds the verifier from the keys live now.
    fn apply_keys(&self, keys: &[SigningKeyRecord]) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let live: Vec<_> = keys
            .iter()
            .filter(|record| record.is_live(now))
            .filter_map(|record| keel_task::verifying_key_from_base64(&record.public_key).ok())
            .collect();
        if live.is_empty() {
            tracing::error!(
                "no task-signing key is live: every task will be refused until the control plane publishes one this node can verify"
            );
        }
        self.inbox.replace_verifier(keel_task::TaskVerifier::new(
            self.node_id,
            self.enrolment_epoch,
            live,
        ));
    }

    /// Reports `capacity`'s values in heartbeats instead of detected ones.
    pub fn with_capacity(mut self, capacity: crate::config::CapacityConfig) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sends one heartbeat: the capacity detected now (with the configured
    /// overrides) and the allocations running.
    pub async fn heartbeat(&self) -> Result<(), LinkError> {
        let capacity = self.capacity.apply(
            crate::inventory::detect(&self.dir)
                .await
                .map_err(LinkError::Invalid)?,
        );
        let workloads: Vec<serde_json::Value> = self
            .driver
            .running_allocations()
            .into_iter()
            .map(|allocation_id| serde_json::json!({ "allocation_id": allocation_id }))
            .collect();
        self.call(
            self.client()
                .post(format!("{}/v1/agent/heartbeat", self.base_url))
                .json(&serde_json::json!({ "capacity": capacity, "workloads": workloads })),
        )
        .await
        .map(|_| ())
    }

    /// Renews the certificate with a new key; returns the new expiry.
    pub async fn renew(&self) -> Result<OffsetDateTime, LinkError> {
        let (csr_pem, key_pem) = keel_pki::make_csr(&self.node_id.to_string())
            .map_err(|error| LinkError::Invalid(error.to_string()))?;
        let response = self
            .call(
                self.client()
                    .post(format!("{}/v1/agent/renew", self.base_url))
                    .json(&serde_json::json!({ "csr_pem": csr_pem })),
            )
            .await?;
        let renewed: Renewed = response
            .json()
            .await
            .map_err(|error| LinkError::Invalid(error.to_string()))?;
        let der = keel_pki::certs_from_pem(&renewed.certificate_pem)
            .map_err(|error| LinkError::Invalid(error.to_string()))?;
        let leaf = der
            .first()
            .ok_or_else(|| LinkError::Invalid("no certificate".into()))?;
        if keel_pki::node_identity(leaf.as_ref()) != Some(self.node_id) {
            return Err(LinkError::Invalid(
                "the renewed certificate names another node".into(),
            ));
        }
        let (_, not_after) = keel_pki::validity(leaf.as_ref())
            .ok_or_else(|| LinkError::Invalid("the renewed certificate has no validity".into()))?;
        // Checked before anything is written: the key must fit.
        self.identity
            .replace(&renewed.certificate_pem, &key_pem)
            .map_err(|error| LinkError::Invalid(error.to_string()))?;
        install_identity(&self.dir, &renewed.certificate_pem, &key_pem)?;
        match self.certificate.lock() {
            Ok(mut guard) => *guard = (OffsetDateTime::now_utc(), not_after),
            Err(poisoned) => *poisoned.into_inner() = (OffsetDateTime::now_utc(), not_after),
        }
        match build_client(&self.client_tls) {
            Ok(client) => {
                *self
                    .client
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
            }
            Err(error) => tracing::warn!(%error, "could not rebuild the control-plane client"),
        }
        tracing::info!(%not_after, "node certificate renewed");
        Ok(not_after)
    }

    fn write_running_status(&self, renewal_due: OffsetDateTime) {
        let mut status = Status::new(AgentCondition::Running);
        status.certificate_not_after = Some(self.certificate_not_after());
        status.renewal_due = Some(renewal_due);
        write_status(&self.dir, &status);
    }

    /// Refreshes keys and renews the certificate until `shutdown`, or until
    /// the node cannot go on without re-enrolment.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> LinkOutcome {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut fraction = rand::thread_rng().gen_range(0.5..0.7);
        let mut next_refresh = Instant::now();
        let mut next_heartbeat = Instant::now();
        let mut next_renewal = None::<Instant>;
        loop {
            let now = OffsetDateTime::now_utc();
            if now >= self.certificate_not_after() {
                return LinkOutcome::NeedsReenrolment(format!(
                    "the node certificate expired at {} before it could be renewed",
                    self.certificate_not_after()
                ));
            }
            let due = self.renewal_due(fraction);
            let renewal_at = next_renewal.unwrap_or_else(|| instant_at(due));
            let wake = renewal_at.min(next_refresh).min(next_heartbeat);
            self.write_running_status(due);
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return LinkOutcome::Stopped,
                () = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= next_refresh {
                next_refresh = Instant::now() + self.timing.key_refresh;
                match self.refresh_keys().await {
                    Ok(_) => {}
                    Err(error) if error.is_certificate_refused() => {
                        return refused(&error);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "refreshing the task-signing keys failed");
                        let keys = self.keys.lock().await;
                        self.apply_keys(&keys);
                    }
                }
            }
            if Instant::now() >= next_heartbeat {
                next_heartbeat = Instant::now() + self.timing.heartbeat;
                match self.heartbeat().await {
                    Ok(()) => {}
                    Err(error) if error.is_certificate_refused() => return refused(&error),
                    Err(error) => tracing::warn!(%error, "heartbeat failed"),
                }
            }
            if Instant::now() >= renewal_at {
                match self.renew().await {
                    Ok(_) => {
                        fraction = rand::thread_rng().gen_range(0.5..0.7);
                        next_renewal = None;
                    }
                    Err(error) if error.is_certificate_refused() => return refused(&error),
                    Err(error) => {
                        tracing::warn!(%error, "renewing the node certificate failed; will retry");
                        next_renewal = Some(Instant::now() + self.timing.renewal_retry);
                    }
                }
            }
        }
    }
}

fn refused(error: &LinkError) -> LinkOutcome {
    LinkOutcome::NeedsReenrolment(format!(
        "the control plane refuses this node's certificate (revoked, or superseded by a re-enrolment): {error}"
    ))
}

/// The tokio instant of a wall-clock time (now if it has passed).
fn instant_at(at: OffsetDateTime) -> Instant {
    let wait = at - OffsetDateTime::now_utc();
    Instant::now() + Duration::try_from(wait).unwrap_or(Duration::ZERO)
}
