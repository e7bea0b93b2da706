//! `keel-agent-bench`: the node agent's numbers for `make bench`.
//!
//! ```text
//! keel-agent-bench --agent PATH/TO/keel-agent [--launches N]
//! ```
//!
//! 1. **Verification throughput, one core**: `TaskVerifier::verify` over
//!    20,000 distinct signed envelopes on one thread (size check, key
//!    lookup, strict Ed25519, canonical decode, binding, window, sequence).
//!    Also verify + durable accept (the ledger's fsync'd log and high-water
//!    mark) for 2,000 tasks, which is what bounds a node in practice.
//! 2. **Resident memory**: a real `keel-agent run` (release) with the
//!    simulated driver, idle, then with 100 workloads started through
//!    signed tasks over mutual TLS.
//! 3. **Signed → started**: a real `keel-agent run` with the process
//!    driver; N times, a task is signed and posted, and the workload (a
//!    shell) writes the time it started; p50 and p99 of the difference.
//!
//! Prints a table and whether the targets (idle RSS < 20 MB, ≥ 10,000
//! verifications/s, signed → started p50 < 20 ms) are met.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_agent::AgentState;
use keel_agent::state::{NodeRecord, SigningKeyRecord};
use keel_agent::tasks::TaskLedger;
use keel_pki::{CaKind, CertificateAuthority};
use keel_task::{Operation, TaskPayload, TaskSigner, TaskVerifier, verifying_key_to_base64};
use time::OffsetDateTime;
use uuid::Uuid;

struct Node {
    state: AgentState,
    signer: TaskSigner,
    node_ca: CertificateAuthority,
    worker_cert: String,
    worker_key: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn make_node(dir: &Path) -> anyhow::Result<Node> {
    let node_ca = CertificateAuthority::generate(CaKind::Node)?;
    let control_plane_ca = CertificateAuthority::generate(CaKind::ControlPlane)?;
    let node_id = Uuid::new_v4();
    let (csr, key_pem) = keel_pki::make_csr("bench-node")?;
    let cert = node_ca.sign_node_csr(&csr, node_id, time::Duration::days(1))?;
    let (worker, worker_key) =
        control_plane_ca.issue_control_plane_client("worker", time::Duration::days(1))?;
    let signer = TaskSigner::generate();
    let port = free_port()?;
    let state = AgentState {
        dir: dir.to_owned(),
        node: NodeRecord {
            node_id,
            enrolment_epoch: 1,
            name: "bench-node".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            agent_url: format!("https://127.0.0.1:{port}"),
            // No control plane: reports and heartbeats retry quietly.
            agent_api_url: "https://127.0.0.1:1".to_owned(),
            enrolled_at: OffsetDateTime::now_utc(),
        },
        key_pem,
        cert_pem: cert.cert_pem,
        node_ca_pem: node_ca.cert_pem().to_owned(),
        control_plane_ca_pem: control_plane_ca.cert_pem().to_owned(),
        signing_keys: vec![SigningKeyRecord {
            key_id: signer.key_id().to_owned(),
            public_key: verifying_key_to_base64(&signer.verifying_key()),
            ..SigningKeyRecord::default()
        }],
    };
    state.save()?;
    Ok(Node {
        state,
        signer,
        node_ca,
        worker_cert: worker.cert_pem,
        worker_key,
    })
}

fn payload(node: &Node, seq: u64, operation: Operation) -> TaskPayload {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    TaskPayload {
        task_id: Uuid::new_v4(),
        tenant_id: Some(Uuid::from_u128(1)),
        node_id: node.state.node.node_id,
        enrolment_epoch: 1,
        seq,
        issued_at: now,
        not_before: now,
        expires_at: now + 300,
        traceparent: None,
        operation,
    }
}

fn start(allocation_id: Uuid, command: &[&str]) -> Operation {
    Operation::StartWorkload {
        allocation_id,
        command: command.iter().map(|part| (*part).to_owned()).collect(),
        vcpus: 1,
        memory_mib: 256,
    }
}

/// Verifications per second on this thread, and verify + durable accept
/// per second.
fn verification(node: &Node, scratch: &Path) -> anyhow::Result<(f64, f64)> {
    let verifier = TaskVerifier::new(node.state.node.node_id, 1, [node.signer.verifying_key()]);
    let envelopes: Vec<Vec<u8>> = (1..=20_000u64)
        .map(|seq| {
            node.signer
                .sign_to_bytes(&payload(node, seq, start(Uuid::new_v4(), &["sleep", "1"])))
        })
        .collect::<Result<_, _>>()?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let started = Instant::now();
    for envelope in &envelopes {
        verifier
            .verify(envelope, now, 0)
            .map_err(|rejection| anyhow::anyhow!("{rejection}"))?;
    }
    let verify_rate = envelopes.len() as f64 / started.elapsed().as_secs_f64();

    let ledger_dir = scratch.join("ledger");
    std::fs::create_dir_all(&ledger_dir)?;
    let mut ledger = TaskLedger::open(&ledger_dir)?;
    let accepted = &envelopes[..2_000];
    let started = Instant::now();
    for envelope in accepted {
        let task = verifier
            .verify(envelope, now, ledger.high_water())
            .map_err(|rejection| anyhow::anyhow!("{rejection}"))?;
        ledger.record_accepted(&task, envelope, OffsetDateTime::now_utc())?;
    }
    let accept_rate = accepted.len() as f64 / started.elapsed().as_secs_f64();
    Ok((verify_rate, accept_rate))
}

fn worker_client(node: &Node) -> anyhow::Result<reqwest::Client> {
    let tls = keel_pki::client_config_for_node(
        &[node.node_ca.cert_der().clone()],
        node.state.node.node_id,
        &node.worker_cert,
        &node.worker_key,
    )?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(Arc::unwrap_or_clone(tls))
        .timeout(Duration::from_secs(10))
        .build()?)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn run_agent(binary: &Path, node: &Node, simulated: bool) -> anyhow::Result<Agent> {
    let mut command = Command::new(binary);
    command
        .arg("run")
        .arg("--state-dir")
        .arg(&node.state.dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if simulated {
        command.env("KEEL_AGENT_DRIVER", "simulated");
    }
    Ok(Agent(command.spawn().context("starting keel-agent")?))
}

async fn post(client: &reqwest::Client, node: &Node, envelope: Vec<u8>) -> anyhow::Result<()> {
    let url = format!(
        "https://127.0.0.1:{}/v1/tasks",
        node.state.node.listen.port()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .post(&url)
            .header("content-type", "application/json")
            .body(envelope.clone())
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => bail!("the agent refused a task: {}", response.status()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let (mut binary, mut launches) = (None::<PathBuf>, 50usize);
    while let Some(flag) = arguments.next() {
        let value = arguments.next().context("a flag needs a value")?;
        match flag.as_str() {
            "--agent" => binary = Some(value.into()),
            "--launches" => launches = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    let binary = binary.context("usage: keel-agent-bench --agent PATH [--launches N]")?;
    let scratch = std::env::temp_dir().join(format!("keel-agent-bench-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&scratch)?;

    let bench = async {
        // 1. verification
        let node = make_node(&scratch.join("verify"))?;
        let (verify_rate, accept_rate) = verification(&node, &scratch)?;

        // 2. memory, with the simulated driver
        let node = make_node(&scratch.join("memory"))?;
        let agent = run_agent(&binary, &node, true)?;
        let client = worker_client(&node)?;
        // Wait until it serves (a stop of nothing is harmless), then idle.
        post(
            &client,
            &node,
            node.signer.sign_to_bytes(&payload(
                &node,
                1,
                Operation::StopWorkload {
                    allocation_id: Uuid::new_v4(),
                },
            ))?,
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = rss_mib(agent.0.id())?;
        for seq in 2..102u64 {
            let task = payload(&node, seq, start(Uuid::new_v4(), &["sleep", "600"]));
            post(&client, &node, node.signer.sign_to_bytes(&task)?).await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let loaded = rss_mib(agent.0.id())?;
        drop(agent);

        // 3. signed → started, with the process driver
        let node = make_node(&scratch.join("launch"))?;
        let agent = run_agent(&binary, &node, false)?;
        let client = worker_client(&node)?;
        let mut latencies = Vec::with_capacity(launches);
        let mut allocations = Vec::with_capacity(launches);
        let script = "date +%s%N > started; exec sleep 600";
        for seq in 1..=launches as u64 {
            let allocation_id = Uuid::new_v4();
            let signed_at = OffsetDateTime::now_utc().unix_timestamp_nanos();
            let task = payload(&node, seq, start(allocation_id, &["sh", "-c", script]));
            post(&client, &node, node.signer.sign_to_bytes(&task)?).await?;
            let started_file = node
                .state
                .dir
                .join("workloads")
                .join(allocation_id.to_string())
                .join("started");
            let deadline = Instant::now() + Duration::from_secs(10);
            let started_at: i128 = loop {
                if let Some(nanos) = std::fs::read_to_string(&started_file)
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
                {
                    break nanos;
                }
                if Instant::now() > deadline {
                    bail!("workload {allocation_id} did not start");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            latencies.push((started_at - signed_at) as f64 / 1e6);
            allocations.push(allocation_id);
        }
        let mut seq = launches as u64;
        for allocation_id in allocations {
            seq += 1;
            let task = payload(&node, seq, Operation::StopWorkload { allocation_id });
            post(&client, &node, node.signer.sign_to_bytes(&task)?).await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(agent);
        latencies.sort_by(f64::total_cmp);
        Ok::<_, anyhow::Error>((verify_rate, accept_rate, idle, loaded, latencies))
    };
    let outcome = bench.await;
    let _ = std::fs::remove_dir_all(&scratch);
    let (verify_rate, accept_rate, idle, loaded, latencies) = outcome?;
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));

    println!("node agent                                   value");
    println!("task verifications/s (one core) ........ {verify_rate:>10.0}");
    println!("verify + durable accept (fsync) /s ...... {accept_rate:>10.0}");
    println!("resident memory, idle (MiB) ............. {idle:>10.1}");
    println!("resident memory, 100 workloads (MiB) .... {loaded:>10.1}");
    println!(
        "signed → started p50 / p99 (ms) ......... {p50:>6.1} / {p99:.1}  ({} launches)",
        latencies.len()
    );
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "target: idle RSS < 20 MB ............... {}",
        verdict(idle < 20.0)
    );
    println!(
        "target: >= 10,000 verifications/s ...... {}",
        verdict(verify_rate >= 10_000.0)
    );
    println!(
        "target: signed → started p50 < 20 ms ... {}",
        verdict(p50 < 20.0)
    );
    Ok(())
}
