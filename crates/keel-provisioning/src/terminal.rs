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

/// Open a terminal into a running allocation. Upgrades to a WebSocket:
/// binary frames carry the terminal's bytes both ways; send a text frame
/// `{"type":"resize","cols":N,"rows":N}` to resize it. The session closes
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
        (status = 409, description = "`allocation_not_running`: only a running allocation has a terminal", body = ErrorBody),
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
    .ok_or(ProvisioningError::NotRunning(state))?;

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

/// Relays until one side ends; returns why.
async fn relay(
    mut client: WebSocket,
    terminals: &Terminals,
    target: &Target,
    grant: &[u8],
    max_secs: u64,
) -> String {
    let agent = match tokio::time::timeout(CONNECT_TIMEOUT, connect(terminals, target, grant)).await
    {
        Ok(Ok(agent)) => agent,
        Ok(Err(reason)) => {
            close(&mut client, &reason).await;
            return reason;
        }
        Err(_) => {
            let reason = "the host did not answer".to_owned();
            close(&mut client, &reason).await;
            return reason;
        }
    };
    let (mut to_agent, mut from_agent) = agent.split();
    // The agent enforces the limit too; this one also covers the api side.
    let deadline = tokio::time::sleep(Duration::from_secs(max_secs));
    tokio::pin!(deadline);
    let reason = loop {
        tokio::select! {
            () = &mut deadline => break "the session reached its time limit".to_owned(),
            message = client.recv() => {
                let forwarded = match message {
                    Some(Ok(Message::Binary(bytes))) => tungstenite::Message::Binary(bytes),
                    Some(Ok(Message::Text(text))) => tungstenite::Message::text(text.as_str()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => {
                        let _ = to_agent.send(tungstenite::Message::Close(None)).await;
                        break "the client closed the session".to_owned();
                    }
                };
                if to_agent.send(forwarded).await.is_err() {
                    break "the host closed the session".to_owned();
                }
            }
            message = from_agent.next() => match message {
                Some(Ok(tungstenite::Message::Binary(bytes))) => {
                    if client.send(Message::Binary(bytes)).await.is_err() {
                        let _ = to_agent.send(tungstenite::Message::Close(None)).await;
                        break "the client went away".to_owned();
                    }
                }
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    break frame
                        .map(|frame| frame.reason.as_str().to_owned())
                        .filter(|reason| !reason.is_empty())
                        .unwrap_or_else(|| "the host closed the session".to_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break "the connection to the host was lost".to_owned(),
            },
        }
    };
    close(&mut client, &reason).await;
    reason
}

/// Sends the client a normal close with `reason` (cut to the 123 bytes a
/// close frame allows).
async fn close(client: &mut WebSocket, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let _ = client
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: reason[..end].into(),
        })))
        .await;
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
