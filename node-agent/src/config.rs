//! The agent's configuration file (`keel-agent run --config FILE`).
//!
//! ```toml
//! state_dir = "/var/lib/keel-agent"
//!
//! [timing]                 # seconds
//! heartbeat_secs = 15
//! key_refresh_secs = 60
//! renewal_retry_secs = 30
//! reorder_wait_ms = 1000   # how long a task waits for a lower-numbered one
//!
//! [workloads]
//! driver = "process"       # or "simulated" (scale tests: nothing runs)
//! stop_grace_secs = 10     # SIGTERM → SIGKILL
//!
//! [capacity]               # what the host offers instead of what is detected
//! vcpus = 64
//! memory_mib = 131072
//! ```
//!
//! Everything but `state_dir` is optional. `--state-dir DIR` instead of a
//! file means the defaults. The environment overrides the file
//! (`KEEL_AGENT_HEARTBEAT_SECS`, `KEEL_AGENT_KEY_REFRESH_SECS`,
//! `KEEL_AGENT_RENEWAL_RETRY_SECS`, `KEEL_AGENT_REORDER_WAIT_MS`, `KEEL_AGENT_DRIVER`,
//! `KEEL_AGENT_METRICS_LISTEN`, `KEEL_AGENT_OTLP_ENDPOINT`,
//! `KEEL_AGENT_VCPUS`, `KEEL_AGENT_MEMORY_MIB`, `KEEL_AGENT_DISK_GIB`), which is how tests
//! shorten the timings. A wrong or unknown key stops the agent with a
//! message naming it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::control::LinkTiming;

/// Which workload driver `run` uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// Real processes under shims, with users and cgroups.
    #[default]
    Process,
    /// Nothing runs; states are reported as if it did.
    Simulated,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    pub heartbeat_secs: u64,
    pub key_refresh_secs: u64,
    pub renewal_retry_secs: u64,
    /// How long a task ahead of the sequence waits for the lower numbers
    /// still missing (`crate::tasks`), in milliseconds.
    pub reorder_wait_ms: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        Self {
            heartbeat_secs: 15,
            key_refresh_secs: 60,
            renewal_retry_secs: 30,
            reorder_wait_ms: crate::tasks::REORDER_WAIT_MS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadsConfig {
    pub driver: DriverKind,
    pub stop_grace_secs: u64,
}

impl Default for WorkloadsConfig {
    fn default() -> Self {
        Self {
            driver: DriverKind::Process,
            stop_grace_secs: 10,
        }
    }
}

/// What the host offers the control plane, when that is not what the agent
/// detects (as Nomad's `cpu_total_compute` and `memory_total_mb`): to keep
/// some back for the system, or to sell more vCPUs than there are cores
/// (the workloads' CPU limits still apply each on its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// vCPUs offered instead of the detected logical CPUs.
    pub vcpus: Option<u32>,
    /// Memory offered instead of the detected total, MiB.
    pub memory_mib: Option<u64>,
    /// Workload disk offered instead of the state directory's file system
    /// size, GiB.
    pub disk_gib: Option<u64>,
}

impl CapacityConfig {
    /// `detected` with the configured values in place of what they name.
    pub fn apply(&self, mut detected: crate::inventory::Capacity) -> crate::inventory::Capacity {
        if let Some(vcpus) = self.vcpus {
            detected.vcpus = vcpus;
        }
        if let Some(memory_mib) = self.memory_mib {
            detected.memory_mib = memory_mib;
        }
        if let Some(disk_gib) = self.disk_gib {
            detected.disk_gib = disk_gib;
        }
        detected
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    #[serde(default)]
    pub timing: TimingConfig,
    #[serde(default)]
    pub workloads: WorkloadsConfig,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere; keep it
    /// on loopback or the operators' network.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The OTLP/HTTP collector spans go to (`http://127.0.0.1:4318`), if
    /// any; the standard `OTEL_EXPORTER_OTLP_ENDPOINT` works too.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// What the host offers instead of what is detected.
    #[serde(default)]
    pub capacity: CapacityConfig,
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl AgentConfig {
    /// The defaults for a state directory (`--state-dir`).
    pub fn for_state_dir(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            timing: TimingConfig::default(),
            workloads: WorkloadsConfig::default(),
            metrics_listen: None,
            otlp_endpoint: None,
            capacity: CapacityConfig::default(),
        }
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|error| ConfigError::Invalid {
            path: path.to_owned(),
            message: error.message().to_owned(),
        })?;
        config.check().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        let timing = &self.timing;
        for (name, value) in [
            ("timing.heartbeat_secs", timing.heartbeat_secs),
            ("timing.key_refresh_secs", timing.key_refresh_secs),
            ("timing.renewal_retry_secs", timing.renewal_retry_secs),
        ] {
            if !(1..=3600).contains(&value) {
                return Err(format!("{name} must be between 1 and 3600, got {value}"));
            }
        }
        if timing.reorder_wait_ms > 60_000 {
            return Err("timing.reorder_wait_ms must be at most 60000".to_owned());
        }
        if self.workloads.stop_grace_secs > 600 {
            return Err("workloads.stop_grace_secs must be at most 600".to_owned());
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err("state_dir must not be empty".to_owned());
        }
        Ok(())
    }

    /// Applies the `KEEL_AGENT_*` overrides.
    pub fn with_env_overrides(mut self) -> Self {
        // A positive whole number (seconds, vCPUs, MiB).
        let seconds = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|value| value.parse::<u64>().ok())
                .filter(|value| *value > 0)
        };
        if let Some(value) = seconds("KEEL_AGENT_HEARTBEAT_SECS") {
            self.timing.heartbeat_secs = value;
        }
        if let Some(value) = seconds("KEEL_AGENT_KEY_REFRESH_SECS") {
            self.timing.key_refresh_secs = value;
        }
        if let Some(value) = seconds("KEEL_AGENT_REORDER_WAIT_MS") {
            self.timing.reorder_wait_ms = value.min(60_000);
        }
        if let Some(value) = seconds("KEEL_AGENT_RENEWAL_RETRY_SECS") {
            self.timing.renewal_retry_secs = value;
        }
        if let Some(listen) = std::env::var("KEEL_AGENT_METRICS_LISTEN")
            .ok()
            .and_then(|value| value.parse().ok())
        {
            self.metrics_listen = Some(listen);
        }
        if let Some(vcpus) = seconds("KEEL_AGENT_VCPUS") {
            self.capacity.vcpus = Some(u32::try_from(vcpus).unwrap_or(u32::MAX));
        }
        if let Some(memory_mib) = seconds("KEEL_AGENT_MEMORY_MIB") {
            self.capacity.memory_mib = Some(memory_mib);
        }
        if let Some(disk_gib) = seconds("KEEL_AGENT_DISK_GIB") {
            self.capacity.disk_gib = Some(disk_gib);
        }
        if let Some(endpoint) = std::env::var("KEEL_AGENT_OTLP_ENDPOINT")
            .ok()
            .filter(|value| !value.is_empty())
        {
            self.otlp_endpoint = Some(endpoint);
        }
        if std::env::var("KEEL_AGENT_DRIVER").as_deref() == Ok("simulated") {
            self.workloads.driver = DriverKind::Simulated;
        }
        self
    }

    /// The link's timings.
    pub fn link_timing(&self) -> LinkTiming {
        LinkTiming {
            key_refresh: Duration::from_secs(self.timing.key_refresh_secs),
            renewal_retry: Duration::from_secs(self.timing.renewal_retry_secs),
            heartbeat: Duration::from_secs(self.timing.heartbeat_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, String> {
        let config: AgentConfig = toml::from_str(text).map_err(|error| error.to_string())?;
        config.check()?;
        Ok(config)
    }

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let config = parse("state_dir = \"/var/lib/keel-agent\"\n").unwrap();
        assert_eq!(
            config,
            AgentConfig::for_state_dir(Path::new("/var/lib/keel-agent"))
        );
        assert_eq!(config.link_timing().heartbeat, Duration::from_secs(15));
    }

    #[test]
    fn a_full_file_is_read() {
        let config = parse(
            "state_dir = \"/s\"\n[timing]\nheartbeat_secs = 5\nkey_refresh_secs = 7\n\
             renewal_retry_secs = 9\n[workloads]\ndriver = \"simulated\"\nstop_grace_secs = 3\n",
        )
        .unwrap();
        assert_eq!(config.timing.heartbeat_secs, 5);
        assert_eq!(config.workloads.driver, DriverKind::Simulated);
        assert_eq!(config.workloads.stop_grace_secs, 3);
    }

    #[test]
    fn configured_capacity_replaces_what_is_detected() {
        let config = parse(
            "state_dir = \"/s\"\notlp_endpoint = \"http://127.0.0.1:4318\"\n[capacity]\nvcpus = 64\n",
        )
        .unwrap();
        assert_eq!(
            config.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        let detected = crate::inventory::Capacity {
            vcpus: 2,
            memory_mib: 24_000,
            disk_gib: 100,
            gpu_model: None,
            gpu_count: 0,
        };
        let offered = config.capacity.apply(detected.clone());
        assert_eq!(offered.vcpus, 64);
        assert_eq!(offered.memory_mib, 24_000, "memory stays as detected");
        assert_eq!(
            CapacityConfig::default().apply(detected.clone()),
            detected,
            "nothing configured, nothing replaced"
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (text, named) in [
            ("", "state_dir"),
            ("state_dir = \"/s\"\nsurprise = 1\n", "surprise"),
            (
                "state_dir = \"/s\"\n[timing]\nheartbeat_secs = 0\n",
                "heartbeat_secs",
            ),
            (
                "state_dir = \"/s\"\n[workloads]\ndriver = \"docker\"\n",
                "docker",
            ),
            ("state_dir = \"/s\"\n[timing]\nheartbeat = 5\n", "heartbeat"),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(named), "{text:?}: {error}");
        }
    }
}
