//! The agent's Prometheus metrics: tasks by outcome (accepted, or the
//! reason they were refused) and the workloads running. Served at
//! `/metrics` on `metrics_listen` when it is configured.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use keel_http::metrics::Registry;
use keel_http::metrics::prometheus_client::metrics::counter::Counter;
use keel_http::metrics::prometheus_client::metrics::family::Family;
use keel_http::metrics::prometheus_client::metrics::gauge::Gauge;

use crate::workloads::WorkloadDriver;

/// `outcome`: `accepted`, or the refusal's reason (`replayed`,
/// `bad_signature`…).
type OutcomeLabels = [(&'static str, String); 1];

/// Tasks received, by outcome: one agent is one process, so one family.
static TASKS: LazyLock<Family<OutcomeLabels, Counter>> = LazyLock::new(Family::default);

/// Counts one task by its outcome.
pub fn count_task(outcome: &str) {
    TASKS
        .get_or_create(&[("outcome", outcome.to_owned())])
        .inc();
}

/// Serves the agent's metrics on `listener` until `shutdown`, refreshing the
/// workload count every 5 seconds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    driver: Arc<dyn WorkloadDriver>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    registry.register(
        "keel_agent_tasks",
        "Tasks received, by outcome",
        TASKS.clone(),
    );
    let workloads = Gauge::<i64>::default();
    registry.register(
        "keel_agent_workloads",
        "Workloads running on this host",
        workloads.clone(),
    );
    let refresher = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticks.tick().await;
            workloads.set(i64::try_from(driver.running_allocations().len()).unwrap_or(i64::MAX));
        }
    });
    let served = keel_http::metrics::serve(listener, Arc::new(registry), shutdown).await;
    refresher.abort();
    served
}
