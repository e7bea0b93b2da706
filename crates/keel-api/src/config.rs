//! Configuration: built-in defaults, then an optional TOML file
//! (`--config PATH` or `KEEL_CONFIG`), then `KEEL_…` environment variables
//! (`__` separates levels: `KEEL_DATABASE__URL`,
//! `KEEL_AUTH__SIGNING_KEYS='["…"]'`). A wrong or missing value stops
//! start-up with a message naming the key. Secrets (`database.url`,
//! `auth.signing_keys`) print as `[REDACTED]` in `Debug`.

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use keel_auth::TokenConfig;
use keel_auth::idempotency::IdempotencyConfig;
use keel_auth::limits::RateLimitConfig;
use keel_db::DatabaseConfig;
use serde::Deserialize;

use crate::telemetry::{LogConfig, TracingConfig};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// OpenTelemetry trace export (OTLP).
    #[serde(default)]
    pub tracing: TracingConfig,
    pub database: DatabaseConfig,
    /// Apply migrations when the api starts (also `api migrate`).
    #[serde(default = "yes")]
    pub database_migrate_on_start: bool,
    pub auth: TokenConfig,
    #[serde(default)]
    pub pki: PkiConfig,
    /// Which KMS seals the control plane's private keys.
    #[serde(default)]
    pub kms: keel_kms::KmsConfig,
    #[serde(default)]
    pub agent: AgentListenerConfig,
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Deadlines of the allocation lifecycle (the reconciler's).
    #[serde(default)]
    pub lifecycle: keel_provisioning::reconcile::Deadlines,
    /// Where the api and the worker serve Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Terminal sessions into workloads.
    #[serde(default)]
    pub terminal: keel_provisioning::terminal::TerminalConfig,
    /// The web console the api serves at `/`.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// The billing currency, tax and invoice timing (api and worker).
    #[serde(default)]
    pub billing: keel_billing::BillingConfig,
    /// How tenants pay: the manual provider or Stripe (api).
    #[serde(default)]
    pub payments: keel_payments::PaymentsConfig,
}

/// The web console: a directory holding the built console (`ui/dist`).
/// Unset, the api serves only the API.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub dir: Option<std::path::PathBuf>,
}

/// Prometheus `/metrics` listeners, each off unless set. Keep them on
/// loopback or the operators' network.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The api's, e.g. `127.0.0.1:9464`.
    #[serde(default)]
    pub api_listen: Option<SocketAddr>,
    /// The worker's, e.g. `127.0.0.1:9465`.
    #[serde(default)]
    pub worker_listen: Option<SocketAddr>,
}

/// Certificates issued to nodes. (The CAs and keys themselves live in
/// Postgres, sealed by the KMS.)
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// Lifetime of a node certificate, in seconds (at least 10; agents
    /// renew at 50–70 % of it).
    pub node_cert_lifetime_secs: u32,
    /// No longer used: the keys moved from files into Postgres. Accepted so
    /// that older configuration files still load; a warning says so.
    #[serde(default, skip_serializing)]
    pub dir: Option<std::path::PathBuf>,
}

impl Default for PkiConfig {
    fn default() -> Self {
        Self {
            node_cert_lifetime_secs: 7 * 24 * 3600,
            dir: None,
        }
    }
}

/// The mutual-TLS listener node agents report to.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentListenerConfig {
    pub listen: SocketAddr,
    /// The URL agents are told to use; defaults to `https://{listen}`.
    #[serde(default)]
    pub advertised_url: Option<String>,
    /// Names (DNS or IP) the listener's certificate carries.
    pub server_names: Vec<String>,
    /// A host not heard from (heartbeats every 15 s) for this long goes
    /// offline and its allocations lost.
    #[serde(default = "default_offline_after_secs")]
    pub offline_after_secs: u32,
}

fn default_offline_after_secs() -> u32 {
    90
}

impl Default for AgentListenerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            advertised_url: None,
            server_names: vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            offline_after_secs: default_offline_after_secs(),
        }
    }
}

impl AgentListenerConfig {
    pub fn url(&self) -> String {
        self.advertised_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.listen))
    }
}

/// The top-level keys of [`Config`].
const SECTIONS: &[&str] = &[
    "billing",
    "payments",
    "server",
    "log",
    "tracing",
    "database",
    "database_migrate_on_start",
    "auth",
    "pki",
    "kms",
    "agent",
    "idempotency",
    "rate_limit",
    "lifecycle",
    "metrics",
    "terminal",
    "console",
];

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

impl Config {
    /// Loads defaults → `file` (if given) → `KEEL_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::figment(file)
            .extract()
            .map_err(|error| ConfigError(Box::new(error)))
    }

    fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::new()
            .merge(Serialized::default("server", ServerConfig::default()))
            .merge(Serialized::default("log", LogConfig::default()))
            .merge(Serialized::default("pki", PkiConfig::default()))
            .merge(Serialized::default("agent", AgentListenerConfig::default()))
            .merge(Serialized::default(
                "idempotency",
                IdempotencyConfig::default(),
            ))
            .merge(Serialized::default(
                "rate_limit",
                RateLimitConfig::default(),
            ));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only variables naming one of our sections are configuration:
        // other `KEEL_*` variables (KEEL_CONFIG, KEEL_TEST_DATABASE_URL, the
        // scripts' own) are not, and must not trip `deny_unknown_fields`.
        figment.merge(Env::prefixed("KEEL_").split("__").filter(|key| {
            let section = key.as_str().split('.').next().unwrap_or_default();
            SECTIONS
                .iter()
                .any(|known| section.eq_ignore_ascii_case(known))
        }))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API returns its own error.
mod tests {
    use super::*;
    use figment::Jail;

    const KEY: &str = "an-example-signing-secret-of-32-bytes-or-more";

    #[test]
    fn environment_overrides_the_file_which_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "keel.toml",
                &format!(
                    "[database]\nurl = \"postgres://file@localhost/keel\"\n[auth]\nsigning_keys = [\"{KEY}\"]\n[server]\nlisten = \"127.0.0.1:9000\"\n"
                ),
            )?;
            jail.set_env("KEEL_SERVER__LISTEN", "127.0.0.1:9100");
            // Every section is read from the environment, the later ones too.
            jail.set_env("KEEL_LIFECYCLE__START_SECS", "7");
            jail.set_env("KEEL_METRICS__WORKER_LISTEN", "127.0.0.1:9465");
            jail.set_env("KEEL_TRACING__OTLP_ENDPOINT", "http://127.0.0.1:4318");
            let config = Config::load(Some(Path::new("keel.toml"))).expect("loads");
            assert_eq!(config.server.listen.port(), 9100);
            assert_eq!(config.lifecycle.start_secs, 7);
            assert_eq!(config.lifecycle.stop_secs, 120);
            assert_eq!(
                config.metrics.worker_listen,
                Some("127.0.0.1:9465".parse().unwrap())
            );
            assert_eq!(
                config.tracing.otlp_endpoint.as_deref(),
                Some("http://127.0.0.1:4318")
            );
            assert_eq!(config.log.filter, "info");
            assert!(config.database_migrate_on_start);
            Ok(())
        });
    }

    #[test]
    fn a_wrong_value_names_its_key() {
        Jail::expect_with(|jail| {
            jail.set_env("KEEL_DATABASE__URL", "postgres://x@localhost/keel");
            jail.set_env("KEEL_AUTH__SIGNING_KEYS", format!("[\"{KEY}\"]"));
            jail.set_env("KEEL_SERVER__LISTEN", "not an address");
            let error = Config::load(None)
                .expect_err("must fail")
                .to_string()
                .to_lowercase();
            assert!(error.contains("server.listen"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn other_keel_variables_are_not_configuration() {
        Jail::expect_with(|jail| {
            jail.set_env("KEEL_DATABASE__URL", "postgres://x@localhost/keel");
            jail.set_env("KEEL_AUTH__SIGNING_KEYS", format!("[\"{KEY}\"]"));
            jail.set_env("KEEL_TEST_DATABASE_URL", "postgres://elsewhere");
            jail.set_env("KEEL_CONFIG", "/nowhere.toml");
            Config::load(None).expect("unrelated KEEL_ variables are ignored");
            Ok(())
        });
    }

    #[test]
    fn a_missing_database_url_names_its_key() {
        Jail::expect_with(|jail| {
            jail.set_env("KEEL_AUTH__SIGNING_KEYS", format!("[\"{KEY}\"]"));
            let error = Config::load(None).expect_err("must fail").to_string();
            assert!(error.contains("database"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        Jail::expect_with(|jail| {
            jail.set_env(
                "KEEL_DATABASE__URL",
                "postgres://user:hunter2@localhost/keel",
            );
            jail.set_env("KEEL_AUTH__SIGNING_KEYS", format!("[\"{KEY}\"]"));
            let config = Config::load(None).expect("loads");
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(!debug.contains(KEY), "{debug}");
            Ok(())
        });
    }
}
