//! Terminal sessions against a running agent, over real mutual TLS as the
//! control plane's api: a shell in the workload's directory that ends
//! with its time limit, with the workload, and takes its processes along.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use futures::{SinkExt as _, StreamExt as _};
use keel_task::Operation;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use uuid::Uuid;

use crate::support::{Fixture, TestAgent, eventually, start, stop};

type Session =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens a session as the api with a fresh grant for `allocation_id`.
async fn open(fixture: &Fixture, agent: &TestAgent, allocation_id: Uuid, max_secs: u64) -> Session {
    let (certificate, key_pem) = fixture
        .control_plane_ca
        .issue_control_plane_client("api", time::Duration::hours(1))
        .unwrap();
    let identity = keel_pki::HotIdentity::from_pem(&certificate.cert_pem, &key_pem).unwrap();
    let tls = keel_pki::client_config_for_node_with_identity(
        &[fixture.node_ca.cert_der().clone()],
        fixture.node_id(),
        identity,
    )
    .unwrap();
    let address = agent.agent.local_addr();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let grant = fixture.sign(&fixture.payload(
        1,
        Operation::OpenTerminal {
            allocation_id,
            session_id: Uuid::new_v4(),
            max_secs,
        },
    ));
    let mut request = format!("wss://{address}/v1/terminal")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "x-keel-terminal-grant",
        BASE64_STANDARD.encode(grant).parse().unwrap(),
    );
    tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap()
        .0
}

/// Output until `wanted` shows (or the session closes: `[closed: why]`).
async fn read_until(session: &mut Session, wanted: &str) -> String {
    let mut seen = String::new();
    let read = async {
        while let Some(Ok(message)) = session.next().await {
            match message {
                Message::Binary(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
                Message::Close(frame) => {
                    let reason = frame
                        .map(|frame| frame.reason.to_string())
                        .unwrap_or_default();
                    seen.push_str(&format!("[closed: {reason}]"));
                }
                _ => {}
            }
            if seen.contains(wanted) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), read).await;
    seen
}

async fn type_line(session: &mut Session, line: &str) {
    session
        .send(Message::Binary(format!("{line}\n").into_bytes().into()))
        .await
        .unwrap();
}

/// Processes whose command line mentions `marker`.
fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_runs_a_shell_in_the_workload_and_ends_with_its_limit_taking_its_processes() {
    let fixture = Fixture::new();
    let mut agent = fixture.start_agent().await;
    let allocation_id = Uuid::new_v4();
    let (status, body) = agent
        .post_task(
            &fixture.worker_client(),
            fixture.sign(&fixture.payload(1, start(allocation_id, &["sleep", "30"]))),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    agent.next_report().await;

    let mut session = open(&fixture, &agent, allocation_id, 2).await;
    type_line(&mut session, "echo in-$((6*7)); pwd").await;
    let output = read_until(&mut session, &allocation_id.to_string()).await;
    assert!(output.contains("in-42"), "{output}");
    // A process the shell started, backgrounded, goes with the session.
    let seconds = 4000 + allocation_id.as_u128() % 1000;
    type_line(&mut session, &format!("sleep {seconds} &")).await;
    let marker = format!("sleep\0{seconds}\0");
    eventually("the background process to run", || {
        processes_with(&marker) == 1
    })
    .await;
    let ended = read_until(&mut session, "[closed:").await;
    assert!(
        ended.contains("[closed: the session reached its time limit]"),
        "{ended}"
    );
    eventually("the session's processes to be gone", || {
        processes_with(&marker) == 0
    })
    .await;

    // A new session ends when the workload stops.
    let mut session = open(&fixture, &agent, allocation_id, 600).await;
    type_line(&mut session, "echo ready").await;
    assert!(
        read_until(&mut session, "ready\r\n")
            .await
            .contains("ready")
    );
    let (status, body) = agent
        .post_task(
            &fixture.worker_client(),
            fixture.sign(&fixture.payload(2, stop(allocation_id))),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let ended = read_until(&mut session, "[closed:").await;
    assert!(ended.contains("[closed: the workload stopped]"), "{ended}");
}
