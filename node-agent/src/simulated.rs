//! A driver that runs nothing: it remembers which allocations "run" and
//! reports state changes as a real driver would. For scale tests of the
//! agent and the control plane (thousands of workloads on one machine) and
//! for the agent's benchmarks. Same trait as [`crate::ProcessDriver`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use uuid::Uuid;

use crate::reports::{ReportSink, WorkloadReport};
use crate::workloads::{StartOutcome, StopOutcome, WorkloadDriver, WorkloadSpec};

/// Simulated workloads: start and stop take effect at once.
pub struct SimulatedDriver {
    running: Mutex<HashMap<Uuid, Option<Uuid>>>,
    reports: Arc<dyn ReportSink>,
}

impl SimulatedDriver {
    pub fn new(reports: Arc<dyn ReportSink>) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            reports,
        }
    }

    /// Ends a simulated workload by itself, as if it had exited with
    /// `reason`.
    pub fn fail(&self, allocation_id: Uuid, reason: &str) -> bool {
        let removed = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&allocation_id)
            .is_some();
        if removed {
            self.reports
                .report(WorkloadReport::failed(allocation_id, reason));
        }
        removed
    }
}

impl std::fmt::Debug for SimulatedDriver {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SimulatedDriver")
            .field("running", &self.running_allocations().len())
            .finish()
    }
}

impl WorkloadDriver for SimulatedDriver {
    fn start_workload(&self, spec: WorkloadSpec) -> StartOutcome {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.contains_key(&spec.allocation_id) {
            return StartOutcome::AlreadyRunning;
        }
        running.insert(spec.allocation_id, spec.tenant_id);
        self.reports
            .report(WorkloadReport::running(spec.allocation_id));
        StartOutcome::Started
    }

    fn stop_workload(&self, allocation_id: Uuid) -> StopOutcome {
        let removed = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&allocation_id)
            .is_some();
        self.reports
            .report(WorkloadReport::terminated(allocation_id));
        if removed {
            StopOutcome::Stopping
        } else {
            StopOutcome::NotRunning
        }
    }

    fn running_allocations(&self) -> Vec<Uuid> {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    fn tenant_of(&self, allocation_id: Uuid) -> Option<Option<Uuid>> {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&allocation_id)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WorkloadState;

    #[test]
    fn thousands_of_simulated_workloads_start_report_and_stop() {
        let (sink, mut reports) = tokio::sync::mpsc::unbounded_channel::<WorkloadReport>();
        let driver = SimulatedDriver::new(Arc::new(sink));
        let ids: Vec<Uuid> = (0..5_000).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            let spec = WorkloadSpec {
                allocation_id: *id,
                tenant_id: None,
                command: vec!["sleep".into()],
                vcpus: 1,
                memory_mib: 64,
            };
            assert_eq!(driver.start_workload(spec.clone()), StartOutcome::Started);
            assert_eq!(driver.start_workload(spec), StartOutcome::AlreadyRunning);
        }
        assert_eq!(driver.running_allocations().len(), 5_000);
        assert!(driver.fail(ids[0], "simulated crash"));
        for id in &ids[1..] {
            assert_eq!(driver.stop_workload(*id), StopOutcome::Stopping);
        }
        assert!(driver.running_allocations().is_empty());
        let mut states = Vec::new();
        while let Ok(report) = reports.try_recv() {
            states.push(report.state);
        }
        assert_eq!(states.len(), 10_000);
        assert_eq!(
            states
                .iter()
                .filter(|s| **s == WorkloadState::Failed)
                .count(),
            1
        );
    }
}
