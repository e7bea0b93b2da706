//! Telling the control plane what happened to workloads.
//!
//! Drivers hand [`WorkloadReport`]s to a [`ReportSink`] and move on; they
//! never wait for the network. The production sink is the sending half of an
//! unbounded channel whose receiving half is owned by exactly one
//! [`ReportDelivery`] task. That task posts one report at a time to
//! `{agent_api_url}/v1/agent/reports` over mutual TLS (the node certificate
//! as the client identity, the control-plane CA as the only trusted root) and
//! does not move on until the report is stored or definitely refused. One
//! queue and one sender are what guarantee that the control plane sees the
//! reports of an allocation in the order they happened — `running` can never
//! overtake the `terminated` that followed it.
//!
//! Transient failures (network errors, 5xx, 408 and 429) are retried with
//! exponential backoff from 0.5 s doubling up to 30 s, for as long as the
//! agent runs: a control plane that is down for an hour must still learn
//! what happened meanwhile. Any other 4xx means the control plane will never
//! take this report, so it is logged and dropped rather than blocking every
//! report behind it. The queue is unbounded because reports are a handful of
//! bytes per workload state change; it is not persisted, so reports still
//! queued when the agent stops are lost (the control plane reconciles).
//!
//! Tests observe reports without an api by using a plain
//! `mpsc::UnboundedSender<WorkloadReport>` as the sink.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::state::{AgentState, StateError};

/// The path reports are posted to, below the control plane's agent-facing
/// base URL.
pub const REPORTS_PATH: &str = "/v1/agent/reports";

/// The state of a workload as the control plane records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadState {
    /// The workload's process was started.
    Running,
    /// The workload could not start, or ended without being asked to.
    Failed,
    /// The workload ended because it was asked to stop (or was not running
    /// when asked to stop).
    Terminated,
}

/// One state change of one allocation's workload; the exact JSON body of a
/// report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadReport {
    /// The allocation whose workload changed state.
    pub allocation_id: Uuid,
    /// The new state.
    pub state: WorkloadState,
    /// Why, for `failed`; `null` otherwise.
    pub reason: Option<String>,
}

impl WorkloadReport {
    /// The workload is running.
    pub fn running(allocation_id: Uuid) -> Self {
        Self {
            allocation_id,
            state: WorkloadState::Running,
            reason: None,
        }
    }

    /// The workload failed, for the given reason.
    pub fn failed(allocation_id: Uuid, reason: impl Into<String>) -> Self {
        Self {
            allocation_id,
            state: WorkloadState::Failed,
            reason: Some(reason.into()),
        }
    }

    /// The workload was stopped as asked.
    pub fn terminated(allocation_id: Uuid) -> Self {
        Self {
            allocation_id,
            state: WorkloadState::Terminated,
            reason: None,
        }
    }
}

/// Where drivers put reports. Implementations must keep the order of the
/// reports they are given and must not block.
pub trait ReportSink: Send + Sync {
    /// Queues one report for delivery.
    fn report(&self, report: WorkloadReport);
}

impl ReportSink for mpsc::UnboundedSender<WorkloadReport> {
    fn report(&self, report: WorkloadReport) {
        if let Err(unsent) = self.send(report) {
            // Only happens while the agent shuts down, after delivery stopped.
            tracing::warn!(report = ?unsent.0, "report dropped: delivery has stopped");
        }
    }
}

/// How long to wait between delivery attempts of one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait after the first failure.
    pub initial_delay: Duration,
    /// The longest wait; doubling stops here.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after `delay`: twice as long, capped at the maximum.
    fn next_delay(&self, delay: Duration) -> Duration {
        delay.saturating_mul(2).min(self.max_delay)
    }
}

/// Why report delivery could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The saved state could not produce a TLS client configuration.
    #[error(transparent)]
    State(#[from] StateError),

    /// The HTTP client could not be built.
    #[error("could not build the report HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// How one delivery attempt went.
#[derive(Debug)]
enum AttemptOutcome {
    Stored,
    Refused(reqwest::StatusCode),
    Retry(String),
}

/// The single task that delivers queued reports, in order. See the module
/// docs.
#[derive(Debug)]
pub struct ReportDelivery {
    client: reqwest::Client,
    reports_url: String,
    queue: mpsc::UnboundedReceiver<WorkloadReport>,
    retry_policy: RetryPolicy,
}

/// Timeout of one delivery attempt, so that a control plane that accepts a
/// connection and then hangs cannot stall reports forever.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

impl ReportDelivery {
    /// A queue (the sink to give drivers) and its delivery task, for the
    /// control plane named in the saved state.
    pub fn for_state(
        state: &AgentState,
    ) -> Result<(mpsc::UnboundedSender<WorkloadReport>, Self), ReportError> {
        let tls_config = state.report_client_tls_config()?;
        Self::new(
            &state.node.agent_api_url,
            Arc::unwrap_or_clone(tls_config),
            RetryPolicy::default(),
        )
    }

    /// A queue and its delivery task, posting to `{agent_api_url}/v1/agent/reports`
    /// with the given TLS client configuration.
    pub fn new(
        agent_api_url: &str,
        tls_config: rustls::ClientConfig,
        retry_policy: RetryPolicy,
    ) -> Result<(mpsc::UnboundedSender<WorkloadReport>, Self), ReportError> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config)
            // Reports must never travel in clear text or to an unauthenticated
            // server, whatever URL the state holds.
            .https_only(true)
            .connect_timeout(Duration::from_secs(5))
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .map_err(ReportError::Client)?;
        let (sender, queue) = mpsc::unbounded_channel();
        let delivery = Self {
            client,
            reports_url: format!("{}{REPORTS_PATH}", agent_api_url.trim_end_matches('/')),
            queue,
            retry_policy,
        };
        Ok((sender, delivery))
    }

    /// Delivers reports until `shutdown` resolves or every sink is dropped.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let report = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                next = self.queue.recv() => match next {
                    Some(report) => report,
                    None => break,
                },
            };
            tokio::select! {
                biased;
                () = shutdown.as_mut() => {
                    tracing::warn!(?report, "shutting down with a report undelivered");
                    break;
                }
                () = self.deliver_with_retries(&report) => {}
            }
        }
        let undelivered = self.queue.len();
        if undelivered > 0 {
            tracing::warn!(undelivered, "reports left undelivered at shutdown");
        }
    }

    /// Posts one report until it is stored or refused for good.
    async fn deliver_with_retries(&self, report: &WorkloadReport) {
        let mut delay = self.retry_policy.initial_delay;
        loop {
            match self.attempt(report).await {
                AttemptOutcome::Stored => {
                    tracing::debug!(?report, "report delivered");
                    return;
                }
                AttemptOutcome::Refused(status) => {
                    tracing::error!(?report, %status, "control plane refused the report; dropping it");
                    return;
                }
                AttemptOutcome::Retry(problem) => {
                    tracing::warn!(
                        ?report,
                        %problem,
                        retry_in_ms = delay.as_millis(),
                        "report not delivered; will retry"
                    );
                    tokio::time::sleep(delay).await;
                    delay = self.retry_policy.next_delay(delay);
                }
            }
        }
    }

    async fn attempt(&self, report: &WorkloadReport) -> AttemptOutcome {
        let response = match self
            .client
            .post(&self.reports_url)
            .json(report)
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => return AttemptOutcome::Retry(error.to_string()),
        };
        let status = response.status();
        if status.is_success() {
            AttemptOutcome::Stored
        } else if status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            AttemptOutcome::Retry(format!("status {status}"))
        } else {
            AttemptOutcome::Refused(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_serialise_to_the_agreed_json() {
        let allocation_id = Uuid::from_u128(1);
        assert_eq!(
            serde_json::to_value(WorkloadReport::running(allocation_id)).unwrap(),
            serde_json::json!({
                "allocation_id": "00000000-0000-0000-0000-000000000001",
                "state": "running",
                "reason": null,
            })
        );
        assert_eq!(
            serde_json::to_value(WorkloadReport::failed(allocation_id, "boom")).unwrap()["state"],
            "failed"
        );
        assert_eq!(
            serde_json::to_value(WorkloadReport::terminated(allocation_id)).unwrap()["state"],
            "terminated"
        );
    }

    #[test]
    fn the_backoff_doubles_from_half_a_second_up_to_thirty_seconds() {
        let policy = RetryPolicy::default();
        let mut delay = policy.initial_delay;
        let mut delays = vec![delay];
        for _ in 0..8 {
            delay = policy.next_delay(delay);
            delays.push(delay);
        }
        let seconds: Vec<f64> = delays.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(seconds, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
    }
}
