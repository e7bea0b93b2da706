//! Terminals: `GET /v1/projects/{p}/allocations/{a}/terminal` upgrades to a
//! WebSocket that the api bridges to a shell the allocation's node agent
//! opens on a pseudo-terminal in the workload's environment.
//!
//! The request is authorised like any other (`AllocationTerminal`: members
//! and up, and tokens they delegate it to) and only for a `running`
//! allocation. The api then signs a *grant* with the task-signing keys (an
//! `OpenTerminal` operation naming the node, its enrolment epoch, the
//! tenant, a fresh session id and the session's time limit; valid for a
//! minute and single use) and opens a WebSocket to the agent over mutual
//! TLS with its own `api` certificate, authenticating the agent by the node
//! id in its certificate. Frames are relayed unchanged both ways (binary:
//! terminal bytes; text: `{"type":"resize","cols":N,"rows":N}`).
//!
//! Audited as `allocation.terminal_open` (who, when, which session) and
//! `allocation.terminal_close` (how long, why it ended); never the bytes.
//! The session ends when either side closes, the time limit passes, or the
//! workload stops (the agent ends it then, see `keel_agent::terminal`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use keel_auth::Ctx;
use keel_auth::authz::{Action, authorize_project};
use keel_core::ids::{AllocationId, HostId, ProjectId};
use keel_db::Audit;
use keel_http::{ApiError, ErrorBody, Path};
use keel_task::{Operation, TaskPayload};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite;
use uuid::Uuid;

use crate::model::AllocationState;
use crate::signing::SignerRing;
use crate::{ProvisioningError, service};

/// The agent's terminal endpoint and the header carrying the grant (the
/// node agent's `terminal` module has the same two).
const AGENT_TERMINAL_PATH: &str = "/v1/terminal";
const GRANT_HEADER: &str = "x-keel-terminal-grant";
/// How long a grant may wait to be used.
const GRANT_LIFETIME_SECS: i64 = 60;
/// How long connecting to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame relayed either way.
const MAX_FRAME_BYTES: usize = 64 * 1024;

/// `[terminal]` in the api's configuration.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalConfig {
    /// The longest a session lasts, in seconds (the agent caps it at 8 h).
    #[serde(default = "default_max_session_secs")]
    pub max_session_secs: u64,
}

impl Default for TerminalConfig {
    fn default() -> Self {
        Self {
            max_session_secs: default_max_session_secs(),
        }
    }
}

fn default_max_session_secs() -> u64 {
    3600
}

/// What the api needs to open sessions: the task-signing keys (for
/// grants), its own client certificate and the node CA (for the agent
/// connection).
pub struct Terminals {
    pub signers: Arc<SignerRing>,
    pub identity: Arc<keel_pki::HotIdentity>,
    pub node_ca_pem: String,
    pub config: TerminalConfig,
    /// Set when the api stops: every session ends (and is audited).
    stopping: tokio::sync::watch::Sender<bool>,
    /// Sessions open now.
    open: tokio::sync::watch::Sender<usize>,
}

impl Terminals {
    pub fn new(
        signers: Arc<SignerRing>,
        identity: Arc<keel_pki::HotIdentity>,
        node_ca_pem: String,
        config: TerminalConfig,
    ) -> Self {
        Self {
            signers,
            identity,
            node_ca_pem,
            config,
            stopping: tokio::sync::watch::channel(false).0,
            open: tokio::sync::watch::channel(0).0,
        }
    }

    /// Ends every open session (each is told why and audited) and waits
    /// for them, at most `grace`. Upgraded connections outlive the
    /// server's own drain, so the api calls this when it stops.
    pub async fn end_sessions(&self, grace: Duration) {
        self.stopping.send_replace(true);
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(grace, open.wait_for(|open| *open == 0)).await;
    }
}

/// Counts a session as open until dropped.
struct OpenSession<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> OpenSession<'a> {
    fn new(open: &'a tokio::sync::watch::Sender<usize>) -> Self {
        open.send_modify(|open| *open += 1);
        Self(open)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open = open.saturating_sub(1));
    }
}

impl std::fmt::Debug for Terminals {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Terminals")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Where the session goes.
struct Target {
    host: HostId,
    agent_url: String,
}

/// Open a terminal into a running allocation. Upgrades to a WebSocket
/// (subprotocol `keel.terminal.v1`): binary frames carry the terminal's
/// bytes both ways; send a text frame `{"type":"resize","cols":N,"rows":N}`
/// to resize it. Browsers, which cannot set `Authorization` on a
/// WebSocket, offer the subprotocols `keel.terminal.v1` and
/// `keel.bearer.<access token>` instead. The session closes
/// (with the reason in the close frame) when the shell exits, the
/// allocation stops, or after `[terminal] max_session_secs`.
#[utoipa::path(
    get,
    path = "/v1/projects/{project_id}/allocations/{allocation_id}/terminal",
    operation_id = "allocation_terminal",
    tag = "allocations",
    params(
        ("project_id" = ProjectId, Path, description = "The project"),
        ("allocation_id" = AllocationId, Path, description = "The allocation"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 101, description = "Switching protocols: the terminal session"),
        (status = 400, description = "`invalid_path`, or `websocket_required`: this is a WebSocket endpoint", body = ErrorBody),
        (status = 401, description = "`unauthenticated`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`allocation_not_running`: only a running allocation has a terminal; `terminal_unavailable`: its host is gone", body = ErrorBody),
    )
)]
pub async fn allocation_terminal(
    ctx: Ctx,
    State(terminals): State<Arc<Terminals>>,
    Path((project_id, allocation_id)): Path<(ProjectId, AllocationId)>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let mut tx = ctx.begin().await.map_err(ProvisioningError::from)?;
    let project = authorize_project(
        tx.conn(),
        &ctx.principal,
        Action::AllocationTerminal,
        project_id,
    )
    .await
    .map_err(ProvisioningError::from)?;
    let allocation = service::allocation_get(tx.conn(), &project, allocation_id).await?;
    let state = allocation.state();
    let (AllocationState::Running, Some(host)) = (state, allocation.host_id) else {
        return Err(ProvisioningError::NotRunning(state).into());
    };
    let Ok(upgrade) = upgrade else {
        return Err(ProvisioningError::WebSocketRequired.into());
    };
    let (agent_url, epoch): (String, i64) = sqlx::query_as(
        "SELECT agent_url, enrolment_epoch FROM hosts WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(host)
    .fetch_optional(tx.conn())
    .await
    .map_err(ProvisioningError::from)?
    .ok_or(ProvisioningError::TerminalUnavailable(
        "the allocation's host is no longer part of the platform",
    ))?;

    let session_id = Uuid::now_v7();
    let max_secs = terminals.config.max_session_secs;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let grant = terminals
        .signers
        .sign(&TaskPayload {
            task_id: session_id,
            tenant_id: Some(project.tenant_id.as_uuid()),
            node_id: host.as_uuid(),
            enrolment_epoch: u64::try_from(epoch).unwrap_or_default(),
            // Grants are outside the task sequence; single use by session.
            seq: 1,
            issued_at: now,
            not_before: now,
            expires_at: now + GRANT_LIFETIME_SECS,
            traceparent: keel_telemetry::current_traceparent(),
            operation: Operation::OpenTerminal {
                allocation_id: allocation_id.as_uuid(),
                session_id,
                max_secs,
            },
        })
        .map_err(ApiError::internal)?;
    let resource = allocation.resource_name();
    let tenant = project.tenant_id;
    tx.commit(
        Audit::new("allocation.terminal_open", Some(tenant), resource.clone()).with_details(
            serde_json::json!({ "session_id": session_id, "host_id": host, "max_secs": max_secs }),
        ),
    )
    .await
    .map_err(ProvisioningError::from)?;

    let target = Target { host, agent_url };
    let upgrade = upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .protocols(["keel.terminal.v1"]);
    Ok(upgrade.on_upgrade(move |client| async move {
        let _open = OpenSession::new(&terminals.open);
        let started = Instant::now();
        let reason = relay(client, &terminals, &target, &grant, max_secs).await;
        let seconds = started.elapsed().as_secs();
        tracing::info!(%session_id, %allocation_id, seconds, %reason, "terminal session ended");
        let closed = async {
            let tx = ctx.begin().await?;
            tx.commit(
                Audit::new("allocation.terminal_close", Some(tenant), resource).with_details(
                    serde_json::json!({
                        "session_id": session_id,
                        "duration_secs": seconds,
                        "reason": reason,
                    }),
                ),
            )
            .await
        };
        if let Err(error) = closed.await {
            tracing::error!(%session_id, %error, "could not audit the end of a terminal session");
        }
    }))
}

/// Relays until one side ends, the time limit passes or the api stops;
/// returns why. Each direction is its own pump, so a side that stops
/// reading holds up only its own direction (and, through TCP, the agent's
/// output), while the limit and the api's shutdown always end the session.
async fn relay(
    client: WebSocket,
    terminals: &Terminals,
    target: &Target,
    grant: &[u8],
    max_secs: u64,
) -> String {
    let agent = match tokio::time::timeout(CONNECT_TIMEOUT, connect(terminals, target, grant)).await
    {
        Ok(Ok(agent)) => agent,
        Ok(Err(refusal)) => {
            tracing::warn!(host = %target.host, %refusal, "no terminal session on the host");
            let reason = "the host refused the session".to_owned();
            close(client, &reason).await;
            return reason;
        }
        Err(_) => {
            let reason = "the host did not answer".to_owned();
            close(client, &reason).await;
            return reason;
        }
    };
    let (mut to_agent, mut from_agent) = agent.split();
    let (mut to_client, mut from_client) = client.split();
    let mut stopping = terminals.stopping.subscribe();

    let upstream = async {
        while let Some(message) = from_client.next().await {
            let forwarded = match message {
                Ok(Message::Binary(bytes)) => tungstenite::Message::Binary(bytes),
                Ok(Message::Text(text)) => tungstenite::Message::text(text.as_str()),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(Message::Close(_)) | Err(_) => break,
            };
            if to_agent.send(forwarded).await.is_err() {
                return "the connection to the host was lost".to_owned();
            }
        }
        "the client closed the session".to_owned()
    };
    let downstream = async {
        while let Some(message) = from_agent.next().await {
            match message {
                Ok(tungstenite::Message::Binary(bytes)) => {
                    if to_client.send(Message::Binary(bytes)).await.is_err() {
                        return "the client went away".to_owned();
                    }
                }
                // The agent says why it ended the session.
                Ok(tungstenite::Message::Close(frame)) => {
                    return frame
                        .map(|frame| frame.reason.as_str().to_owned())
                        .filter(|reason| !reason.is_empty())
                        .unwrap_or_else(|| "the host closed the session".to_owned());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        "the connection to the host was lost".to_owned()
    };
    let reason = tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(max_secs)) => {
            "the session reached its time limit".to_owned()
        }
        _ = stopping.wait_for(|stopping| *stopping) => "the api is restarting".to_owned(),
        reason = upstream => reason,
        reason = downstream => reason,
    };
    // Tell the agent (it ends the shell) and the client, neither for long.
    if let Ok(agent) = to_agent.reunite(from_agent) {
        let mut agent = agent;
        let _ = tokio::time::timeout(Duration::from_secs(5), agent.close(None)).await;
    }
    if let Ok(client) = to_client.reunite(from_client) {
        close(client, &reason).await;
    }
    reason
}

/// Sends the client a normal close with `reason` (cut to the 123 bytes a
/// close frame allows), giving up after a few seconds.
async fn close(mut client: WebSocket, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = Message::Close(Some(CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: reason[..end].into(),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(5), client.send(frame)).await;
}

type AgentSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens the WebSocket to the agent: mutual TLS as the api, the agent
/// authenticated by its node id, the grant in a header.
async fn connect(
    terminals: &Terminals,
    target: &Target,
    grant: &[u8],
) -> Result<AgentSocket, String> {
    let unreachable = |error: &dyn std::fmt::Display| format!("the host is unreachable: {error}");
    let uri: axum::http::Uri = target
        .agent_url
        .parse()
        .map_err(|error| unreachable(&error))?;
    let host_name = uri.host().ok_or("the host has no address")?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let roots =
        keel_pki::certs_from_pem(&terminals.node_ca_pem).map_err(|error| unreachable(&error))?;
    let tls = keel_pki::client_config_for_node_with_identity(
        &roots,
        target.host.as_uuid(),
        Arc::clone(&terminals.identity),
    )
    .map_err(|error| unreachable(&error))?;
    let server_name = rustls::pki_types::ServerName::try_from(host_name.clone())
        .map_err(|error| unreachable(&error))?;
    let tcp = tokio::net::TcpStream::connect((host_name.as_str(), port))
        .await
        .map_err(|error| unreachable(&error))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|error| unreachable(&error))?;
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "wss://{host_name}:{port}{AGENT_TERMINAL_PATH}"
    ))
    .map_err(|error| unreachable(&error))?;
    let grant = base64::engine::general_purpose::STANDARD.encode(grant);
    request.headers_mut().insert(
        GRANT_HEADER,
        grant.parse().map_err(|error| unreachable(&error))?,
    );
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => {
            // The agent's refusal: `{"code", "message"}`.
            let message = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                .and_then(|body| body["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("the host refused ({})", response.status()));
            Err(message)
        }
        Err(error) => Err(unreachable(&error)),
    }
}
