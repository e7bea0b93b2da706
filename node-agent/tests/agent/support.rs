//! The shared fixture: two real CAs, a node certificate, a worker client
//! certificate, a task signer, an agent state directory, and an agent
//! serving on 127.0.0.1:0 whose reports go to a channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_agent::state::{NodeRecord, SigningKeyRecord};
use keel_agent::{AgentState, ProcessDriver, RunningAgent, WorkloadReport, start_agent};
use keel_pki::{CaKind, CertificateAuthority, NodeServerVerifier};
use keel_task::{Operation, TaskPayload, TaskSigner, verifying_key_to_base64};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use uuid::Uuid;

/// The tenant every test task is for.
pub const TENANT: Uuid = Uuid::from_u128(0x007e_4a47);

/// How long any single wait in a test may take before it counts as a failure.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A directory under the system temp dir, removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(label: &str) -> Self {
        Self(std::env::temp_dir().join(format!("keel-agent-{label}-{}", Uuid::new_v4())))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// A certificate and its private key, PEM.
pub struct Credentials {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Fixture {
    pub node_ca: CertificateAuthority,
    pub control_plane_ca: CertificateAuthority,
    pub signer: TaskSigner,
    pub state: AgentState,
    pub worker: Credentials,
    scratch: ScratchDir,
}

impl Fixture {
    pub fn new() -> Self {
        let scratch = ScratchDir::new("test");
        let node_ca = CertificateAuthority::generate(CaKind::Node).unwrap();
        let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane).unwrap();
        let node_id = Uuid::new_v4();
        let (csr_pem, key_pem) = keel_pki::make_csr("test-node").unwrap();
        let node_certificate = node_ca
            .sign_node_csr(&csr_pem, node_id, time::Duration::hours(1))
            .unwrap();
        let (worker_certificate, worker_key_pem) = control_plane_ca
            .issue_control_plane_client("worker", time::Duration::hours(1))
            .unwrap();
        let signer = TaskSigner::generate();
        let state = AgentState {
            dir: scratch.0.clone(),
            node: NodeRecord {
                node_id,
                enrolment_epoch: 3,
                name: "test-node".to_owned(),
                listen: "127.0.0.1:0".parse().unwrap(),
                agent_url: "https://127.0.0.1:0".to_owned(),
                agent_api_url: "https://127.0.0.1:1".to_owned(),
                enrolled_at: OffsetDateTime::now_utc(),
            },
            key_pem,
            cert_pem: node_certificate.cert_pem,
            node_ca_pem: node_ca.cert_pem().to_owned(),
            control_plane_ca_pem: control_plane_ca.cert_pem().to_owned(),
            signing_keys: vec![SigningKeyRecord {
                key_id: signer.key_id().to_owned(),
                public_key: verifying_key_to_base64(&signer.verifying_key()),
                ..SigningKeyRecord::default()
            }],
        };
        state.save().unwrap();
        Self {
            node_ca,
            control_plane_ca,
            signer,
            state,
            worker: Credentials {
                cert_pem: worker_certificate.cert_pem,
                key_pem: worker_key_pem,
            },
            scratch,
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.scratch.0
    }

    pub fn node_id(&self) -> Uuid {
        self.state.node.node_id
    }

    /// Starts an agent on the saved state directory, as `run` would, but on
    /// a free port and with reports going to a channel.
    pub async fn start_agent(&self) -> TestAgent {
        self.start_agent_with_grace(Duration::from_secs(10)).await
    }

    pub async fn start_agent_with_grace(&self, stop_grace_period: Duration) -> TestAgent {
        let state = AgentState::load(self.state_dir()).unwrap();
        let (report_sink, reports) = mpsc::unbounded_channel();
        let driver = Arc::new(
            ProcessDriver::with_launcher(&state.dir, Arc::new(report_sink), launcher())
                .unwrap()
                .with_stop_grace_period(stop_grace_period),
        );
        let agent = start_agent(&state, "127.0.0.1:0".parse().unwrap(), driver.clone())
            .await
            .unwrap();
        TestAgent {
            agent,
            driver,
            reports,
        }
    }

    /// A client that verifies the agent by node identity and presents the
    /// given certificate.
    pub fn client_presenting(&self, credentials: &Credentials) -> reqwest::Client {
        let tls = keel_pki::client_config_for_node(
            &[self.node_ca.cert_der().clone()],
            self.node_id(),
            &credentials.cert_pem,
            &credentials.key_pem,
        )
        .unwrap();
        client_from(Arc::unwrap_or_clone(tls))
    }

    /// The control plane's worker, as the agent expects it.
    pub fn worker_client(&self) -> reqwest::Client {
        self.client_presenting(&self.worker)
    }

    /// A client that checks the agent properly but has no certificate.
    pub fn client_without_certificate(&self) -> reqwest::Client {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            NodeServerVerifier::new(&[self.node_ca.cert_der().clone()], self.node_id()).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        client_from(tls)
    }

    /// A task payload for this node, valid now, with the given sequence
    /// number and operation.
    pub fn payload(&self, seq: u64, operation: Operation) -> TaskPayload {
        let now = now_unix();
        TaskPayload {
            task_id: Uuid::new_v4(),
            tenant_id: Some(TENANT),
            node_id: self.node_id(),
            enrolment_epoch: self.state.node.enrolment_epoch,
            seq,
            issued_at: now,
            not_before: now,
            expires_at: now + 300,
            traceparent: None,
            operation,
        }
    }

    pub fn sign(&self, payload: &TaskPayload) -> Vec<u8> {
        self.signer.sign_to_bytes(payload).unwrap()
    }
}

fn client_from(tls: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// The `keel-agent` binary, which runs the workload shims.
pub fn launcher() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel-agent"))
}

pub fn start(allocation_id: Uuid, command: &[&str]) -> Operation {
    Operation::StartWorkload {
        allocation_id,
        command: command.iter().map(|part| (*part).to_owned()).collect(),
        vcpus: 1,
        memory_mib: 64,
    }
}

pub fn stop(allocation_id: Uuid) -> Operation {
    Operation::StopWorkload { allocation_id }
}

pub struct TestAgent {
    pub agent: RunningAgent,
    pub driver: Arc<ProcessDriver>,
    pub reports: mpsc::UnboundedReceiver<WorkloadReport>,
}

impl TestAgent {
    pub fn tasks_url(&self) -> String {
        format!("https://{}/v1/tasks", self.agent.local_addr())
    }

    /// Posts raw envelope bytes as the given client; returns the status and
    /// the JSON body.
    pub async fn post_task(
        &self,
        client: &reqwest::Client,
        envelope: Vec<u8>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let response = client
            .post(self.tasks_url())
            .header("content-type", "application/json")
            .body(envelope)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    /// The next report, or a test failure if none comes in time.
    pub async fn next_report(&mut self) -> WorkloadReport {
        tokio::time::timeout(PATIENCE, self.reports.recv())
            .await
            .expect("a report within the time limit")
            .expect("the report channel is open")
    }

    /// Asserts that no report is pending right now.
    pub fn assert_no_pending_report(&mut self) {
        if let Ok(report) = self.reports.try_recv() {
            panic!("unexpected report {report:?}");
        }
    }
}

/// Polls `condition` every 10 ms until it holds, failing after [`PATIENCE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
