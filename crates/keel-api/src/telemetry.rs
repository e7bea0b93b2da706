//! Logging and tracing of the api and the worker: JSON lines in
//! production, human-readable locally; every line inside a request carries
//! the request's span fields (request id, trace id). Spans go to an OTLP
//! collector when `[tracing] otlp_endpoint` is set (see `keel_telemetry`).

use serde::Deserialize;

pub use keel_telemetry::Telemetry;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    #[default]
    Pretty,
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info,keel_db=debug`. `RUST_LOG`
    /// overrides it.
    #[serde(default = "default_filter")]
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            filter: default_filter(),
        }
    }
}

fn default_filter() -> String {
    "info".to_owned()
}

/// OpenTelemetry trace export, off unless an endpoint is set here or in the
/// standard `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP base URL, e.g. `http://127.0.0.1:4318`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

/// Installs the global subscriber for `service` (`keel-api`,
/// `keel-worker`). Call once, first thing; keep the guard until exit.
pub fn init(
    service: &'static str,
    log: &LogConfig,
    tracing: &TracingConfig,
) -> Result<Telemetry, keel_telemetry::TelemetryError> {
    keel_telemetry::init(&keel_telemetry::Settings {
        service,
        filter: &log.filter,
        style: match log.format {
            LogFormat::Json => keel_telemetry::LogStyle::Json,
            LogFormat::Pretty => keel_telemetry::LogStyle::Compact,
        },
        otlp_endpoint: tracing.otlp_endpoint.as_deref(),
    })
}
