//! Helpers shared by the end-to-end tests: real binaries, real ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SIGNING_KEY: &str = "e2e-signing-key-that-is-long-enough-0123456789";

/// A child process killed when the test ends, however it ends.
pub struct Process {
    pub child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment every control-plane process of this test shares.
pub fn control_plane_env(
    command: &mut Command,
    database: &keel_testing::TestDb,
    kms_dir: &Path,
    api: u16,
    agents: u16,
) {
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KEEL_DATABASE__URL", &database.app_url)
        .env("KEEL_DATABASE__MIGRATE_URL", &database.admin_url)
        .env("KEEL_AUTH__SIGNING_KEYS", format!("[\"{SIGNING_KEY}\"]"))
        .env("KEEL_SERVER__LISTEN", format!("127.0.0.1:{api}"))
        .env("KEEL_AGENT__LISTEN", format!("127.0.0.1:{agents}"))
        .env("KEEL_KMS__PROVIDER", "local")
        .env(
            "KEEL_KMS__MASTER_KEY_FILE",
            kms_dir.join("master-keys.json"),
        )
        .env("KEEL_LOG__FILTER", "info");
}

pub fn spawn(name: &'static str, command: &mut Command, logs: &Path) -> Process {
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    let child = command
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|error| panic!("starting {name}: {error}"));
    Process { child }
}

pub async fn eventually<T, F, Fut>(what: &str, logs: &Path, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            let mut dump = String::new();
            for entry in std::fs::read_dir(logs).unwrap().flatten() {
                dump += &format!(
                    "\n--- {}\n{}",
                    entry.path().display(),
                    std::fs::read_to_string(entry.path()).unwrap_or_default()
                );
            }
            panic!("timed out waiting for {what}{dump}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /metrics` of a metrics listener on 127.0.0.1 (plain HTTP/1.0).
pub async fn scrape(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.starts_with("HTTP/1.0 200").then_some(response)
}

pub fn pid_is_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would say so in stat.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

impl Process {
    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

/// Runs a command to completion; panics with its stderr if it fails.
pub fn run_ok(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{:?} failed: {}{}",
        command,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A small Keel of real processes on one fresh database, each started
/// (and restarted) on demand with the same ports and state.
pub struct Keel {
    pub database: keel_testing::TestDb,
    pub scratch: PathBuf,
    pub kms_dir: PathBuf,
    pub agent_state: PathBuf,
    pub logs: PathBuf,
    pub api_port: u16,
    pub agents_port: u16,
    /// Processes started so far (log files are numbered by it).
    pub started: usize,
    /// More environment for the api and the worker.
    pub control_plane_env: Vec<(&'static str, String)>,
    /// More environment for the agent.
    pub agent_env: Vec<(&'static str, String)>,
}

impl Keel {
    /// A fresh database and scratch directory named after `test`.
    pub async fn new(test: &str) -> Self {
        let scratch =
            std::env::temp_dir().join(format!("keel-e2e-{test}-{}", uuid::Uuid::new_v4().simple()));
        let logs = scratch.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        Self {
            database: keel_testing::test_db().await,
            kms_dir: scratch.join("kms"),
            agent_state: scratch.join("agent"),
            logs,
            scratch,
            api_port: free_port(),
            agents_port: free_port(),
            started: 0,
            control_plane_env: vec![("KEEL_RATE_LIMIT__ENABLED", "false".into())],
            agent_env: vec![("KEEL_AGENT_HEARTBEAT_SECS", "1".into())],
        }
    }

    /// The api's address, without credentials.
    pub fn config(&self) -> keel_client::apis::configuration::Configuration {
        keel_client::apis::configuration::Configuration {
            base_path: format!("http://127.0.0.1:{}", self.api_port),
            ..Default::default()
        }
    }

    pub fn env(&self, command: &mut Command) {
        control_plane_env(
            command,
            &self.database,
            &self.kms_dir,
            self.api_port,
            self.agents_port,
        );
        command.envs(
            self.control_plane_env
                .iter()
                .map(|(key, value)| (key, value)),
        );
    }

    fn log_name(&mut self, what: &str) -> &'static str {
        self.started += 1;
        Box::leak(format!("{what}-{}", self.started).into_boxed_str())
    }

    /// Starts the api (without waiting for it: see [`Keel::ready`]).
    pub fn api(&mut self) -> Process {
        let mut command = Command::new(binary("api"));
        self.env(&mut command);
        let name = self.log_name("api");
        spawn(name, &mut command, &self.logs)
    }

    pub fn worker(&mut self) -> Process {
        let mut command = Command::new(binary("worker"));
        self.env(&mut command);
        let name = self.log_name("worker");
        spawn(name, &mut command, &self.logs)
    }

    /// Runs the agent enrolled by [`Keel::enrol`].
    pub fn agent(&mut self) -> Process {
        let mut command = Command::new(binary("keel-agent"));
        command
            .arg("run")
            .arg("--state-dir")
            .arg(&self.agent_state)
            .envs(self.agent_env.iter().map(|(key, value)| (key, value)));
        let name = self.log_name("agent");
        spawn(name, &mut command, &self.logs)
    }

    /// Waits until the api answers ready.
    pub async fn ready(&self) {
        let config = self.config();
        eventually("the api to be ready", &self.logs, || async {
            keel_client::apis::health_api::health_ready(&config)
                .await
                .ok()
        })
        .await;
    }

    /// Enrols the agent's state directory as `node` (the api must run).
    pub fn enrol(&self, node: &str) {
        let mut token = Command::new(binary("api"));
        self.env(&mut token);
        let token = run_ok(token.arg("join-token")).trim().to_owned();
        run_ok(
            Command::new(binary("keel-agent"))
                .args(["enrol", "--api-url", &self.config().base_path])
                .args(["--join-token", &token, "--name", node])
                .arg("--state-dir")
                .arg(&self.agent_state)
                .args(["--listen", &format!("127.0.0.1:{}", free_port())]),
        );
    }

    /// Registers a tenant for `email` and logs in: its credentials and the
    /// id of its first project.
    pub async fn sign_up(
        &self,
        email: &str,
    ) -> (keel_client::apis::configuration::Configuration, String) {
        use keel_client::apis::auth_api;
        use keel_client::models::{LoginRequest, RegisterRequest};
        let config = self.config();
        let password = "a long enough password";
        let registered = auth_api::auth_register(
            &config,
            RegisterRequest::new(email.into(), password.into(), "E2E".into()),
        )
        .await
        .unwrap();
        let login = auth_api::auth_login(&config, LoginRequest::new(email.into(), password.into()))
            .await
            .unwrap();
        let tenant = keel_client::apis::configuration::Configuration {
            bearer_access_token: Some(login.access_token),
            ..config
        };
        (tenant, registered.project_id.to_string())
    }

    /// The text of every log file written so far.
    pub fn log_text(&self) -> String {
        std::fs::read_dir(&self.logs)
            .unwrap()
            .flatten()
            .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
            .collect()
    }

    /// Kills what the agent left running and removes the scratch directory.
    pub fn clean_up(&self) {
        reap_workloads(&self.agent_state);
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Kills what the agent of `state_dir` left running (an agent that stopped
/// leaves its workloads on purpose) and removes their cgroups.
pub fn reap_workloads(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("runtime")) else {
        return;
    };
    let mut cgroups = Vec::new();
    for entry in entries.flatten() {
        let record: Option<serde_json::Value> =
            std::fs::read_to_string(entry.path().join("record.json"))
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok());
        let pid = std::fs::read_to_string(entry.path().join("pid")).unwrap_or_default();
        let mut pids = vec![pid.trim().to_owned()];
        if let Some(record) = &record {
            pids.push(record["shim_pid"].to_string());
            if let Some(dirs) = record["cgroup"].as_array() {
                cgroups.extend(
                    dirs.iter()
                        .filter_map(|dir| dir.as_str().map(PathBuf::from)),
                );
            }
        }
        for pid in pids.into_iter().filter(|pid| !pid.is_empty()) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for dir in cgroups {
        let _ = std::fs::remove_dir(dir);
    }
}

/// One span as an OTLP collector received it.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// `service.name` of the process that exported it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// String attributes (`http.route`, ...).
    pub attributes: Vec<(String, String)>,
}

/// A small OTLP/HTTP (protobuf) trace receiver on 127.0.0.1, standing in
/// for a collector.
pub struct OtlpReceiver {
    /// The base URL to configure as the OTLP endpoint.
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        use prost::Message as _;

        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                    };
                    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect();
                    let text =
                        |value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| {
                            match value.as_ref().and_then(|value| value.value.as_ref()) {
                                Some(Value::StringValue(text)) => Some(text.clone()),
                                _ => None,
                            }
                        };
                    let mut received = sink.lock().unwrap();
                    for resource_spans in request.resource_spans {
                        let service = resource_spans
                            .resource
                            .iter()
                            .flat_map(|resource| &resource.attributes)
                            .find(|attribute| attribute.key == "service.name")
                            .and_then(|attribute| text(&attribute.value))
                            .unwrap_or_default();
                        for span in resource_spans
                            .scope_spans
                            .into_iter()
                            .flat_map(|scope| scope.spans)
                        {
                            received.push(ReceivedSpan {
                                service: service.clone(),
                                name: span.name,
                                trace_id: hex(&span.trace_id),
                                span_id: hex(&span.span_id),
                                parent_span_id: hex(&span.parent_span_id),
                                attributes: span
                                    .attributes
                                    .iter()
                                    .filter_map(|attribute| {
                                        Some((attribute.key.clone(), text(&attribute.value)?))
                                    })
                                    .collect(),
                            });
                        }
                    }
                    (
                        axum::http::StatusCode::OK,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { endpoint, spans }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }
}

/// A terminal session opened as a tenant would: a WebSocket to the api.
pub type Terminal = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// How a terminal client presents its access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TerminalAuth {
    /// `Authorization: Bearer` (programs).
    Header,
    /// The `keel.bearer.<token>` subprotocol (browsers, which cannot set
    /// headers on a WebSocket).
    Subprotocol,
}

pub async fn open_terminal(
    api_port: u16,
    token: &str,
    project: &str,
    allocation: &str,
    auth: TerminalAuth,
) -> Result<Terminal, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = format!(
        "ws://127.0.0.1:{api_port}/v1/projects/{project}/allocations/{allocation}/terminal"
    )
    .into_client_request()?;
    let (header, value) = match auth {
        TerminalAuth::Header => ("authorization", format!("Bearer {token}")),
        TerminalAuth::Subprotocol => (
            "sec-websocket-protocol",
            format!("keel.terminal.v1, keel.bearer.{token}"),
        ),
    };
    request.headers_mut().insert(header, value.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", api_port))
        .await
        .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
    let (socket, response) = tokio_tungstenite::client_async(request, tcp).await?;
    if auth == TerminalAuth::Subprotocol {
        // The session's protocol is chosen; the token is never echoed.
        assert_eq!(
            response.headers().get("sec-websocket-protocol").unwrap(),
            "keel.terminal.v1"
        );
    }
    Ok(socket)
}

/// Reads terminal output until it contains `wanted` (or 30 s pass, or the
/// session ends); returns all of it, with a close frame's reason appended
/// as `[closed: reason]`.
pub async fn read_until(terminal: &mut Terminal, wanted: &str) -> String {
    use futures::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let mut seen = String::new();
    let read = async {
        while let Some(message) = terminal.next().await {
            match message {
                Ok(Message::Binary(bytes)) => seen.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(Message::Close(frame)) => {
                    let reason = frame
                        .map(|frame| frame.reason.to_string())
                        .unwrap_or_default();
                    seen.push_str(&format!("[closed: {reason}]"));
                }
                Ok(_) => {}
                Err(_) => break,
            }
            if seen.contains(wanted) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), read).await;
    seen
}

/// Types `line` into the terminal.
pub async fn type_line(terminal: &mut Terminal, line: &str) {
    use futures::SinkExt as _;
    terminal
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            format!("{line}\n").into_bytes().into(),
        ))
        .await
        .unwrap();
}
