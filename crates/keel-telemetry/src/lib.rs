//! Logs and traces for every Keel process (api, worker, node agent).
//!
//! [`init`] installs one `tracing` subscriber: log lines on stderr (JSON in
//! production, compact locally) and, when an OTLP endpoint is configured,
//! an OpenTelemetry layer that turns spans into OTLP spans exported in
//! batches. Without an endpoint nothing is exported and spans cost what
//! they cost before.
//!
//! One create is one trace across three processes. The W3C `traceparent`
//! travels in the outbox row, then in the signed task; each process
//! continues it with [`continue_trace`] on the span that does the work and
//! hands on its own position with [`traceparent`]:
//!
//! ```text
//! api: request span ──outbox.traceparent──▶ worker: deliver span
//!      ──task.traceparent (signed)──▶ agent: task span
//! ```

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The standard variables that also switch export on (the exporter reads
/// them itself when no endpoint is configured).
const STANDARD_ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStyle {
    /// One JSON object per line with the span's fields (request id).
    Json,
    /// Compact text; colours only when stderr is a terminal.
    Compact,
}

/// What [`init`] sets up.
#[derive(Clone, Debug)]
pub struct Settings<'a> {
    /// `service.name` of the exported spans: `keel-api`, `keel-worker`,
    /// `keel-agent`.
    pub service: &'static str,
    /// An `EnvFilter` directive; `RUST_LOG` overrides it.
    pub filter: &'a str,
    pub style: LogStyle,
    /// The OTLP/HTTP base URL (`http://collector:4318`); spans go to
    /// `{endpoint}/v1/traces`. `None` leaves it to the standard
    /// `OTEL_EXPORTER_OTLP_*ENDPOINT` variables, and without those nothing
    /// is exported.
    pub otlp_endpoint: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP endpoint `{endpoint}` is not usable: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("setting up the OTLP exporter: {0}")]
    Exporter(String),
}

/// Keeps the trace pipeline alive; dropping it sends the spans still
/// buffered. Hold it in `main` until the process ends.
#[must_use = "dropping the guard stops exporting spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("keel: flushing the last spans failed: {error}");
        }
    }
}

/// The target of spans that are logged but never exported (the agent
/// listener's heartbeats and reports: one root trace each would flood a
/// collector).
pub const UNTRACED: &str = "keel::untraced";

/// Installs the global subscriber. Call once, first thing in `main` (the
/// exporter's client is built on its own thread, so inside a runtime is
/// fine; dropping the guard there blocks that thread while the last spans
/// go out, a few seconds at most). A second call leaves the first
/// subscriber in place.
pub fn init(settings: &Settings<'_>) -> Result<Telemetry, TelemetryError> {
    // The log filter decides what is logged, not what is traced: spans at
    // info and above are exported whatever the log level.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.filter))
        // The exporter's own complaints (a collector that is down).
        .add_directive(exporter_directive());
    let provider = tracer_provider(settings)?;
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("keel"))
            .with_filter(
                Targets::new()
                    .with_default(LevelFilter::INFO)
                    .with_target(UNTRACED, LevelFilter::OFF)
                    .with_target("opentelemetry", LevelFilter::OFF)
                    .with_target("opentelemetry_sdk", LevelFilter::OFF)
                    .with_target("opentelemetry_otlp", LevelFilter::OFF),
            )
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(otel_layer);
    let installed = match settings.style {
        LogStyle::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
        LogStyle::Compact => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
    };
    if installed.is_err() {
        // Someone (a test harness) installed a subscriber first; ours is
        // not used, so neither is its pipeline.
        return Ok(Telemetry { provider: None });
    }
    if let Some(endpoint) = settings
        .otlp_endpoint
        .filter(|endpoint| !endpoint.trim().is_empty())
    {
        tracing::info!(
            endpoint,
            service = settings.service,
            "exporting traces over OTLP"
        );
    }
    Ok(Telemetry { provider })
}

/// `warn` for the exporter's crates, unless `RUST_LOG` names them.
fn exporter_directive() -> tracing_subscriber::filter::Directive {
    "opentelemetry=warn"
        .parse()
        .unwrap_or_else(|_| LevelFilter::WARN.into())
}

/// Only plain HTTP: the exporter's client has no TLS.
fn check_endpoint(endpoint: &str) -> Result<(), TelemetryError> {
    if endpoint.starts_with("http://") {
        Ok(())
    } else {
        Err(TelemetryError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason: "only http:// is supported; run the collector beside the process".to_owned(),
        })
    }
}

fn tracer_provider(settings: &Settings<'_>) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let configured = settings
        .otlp_endpoint
        .map(str::trim)
        .filter(|endpoint| !endpoint.is_empty());
    let endpoint = match configured {
        Some(endpoint) => {
            let endpoint = endpoint.trim_end_matches('/');
            check_endpoint(endpoint)?;
            Some(format!("{endpoint}/v1/traces"))
        }
        None => {
            let standard: Vec<String> = STANDARD_ENDPOINT_VARIABLES
                .iter()
                .filter_map(|name| std::env::var(name).ok())
                .filter(|value| !value.trim().is_empty())
                .collect();
            if standard.is_empty() {
                return Ok(None);
            }
            for endpoint in &standard {
                check_endpoint(endpoint)?;
            }
            None
        }
    };
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(endpoint) = endpoint {
        use opentelemetry_otlp::WithExportConfig as _;
        builder = builder.with_endpoint(endpoint);
    }
    let exporter = builder
        .build()
        .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service)
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// Makes `span` a child of the remote span a `traceparent` names. Call it
/// before the span is entered or asked for its own [`traceparent`]; an
/// invalid value or a process that exports nothing leaves the span as it
/// was.
pub fn continue_trace(span: &Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed or the span
        // already started: either way there is nothing to continue.
        let _ = span.set_parent(context);
    }
}

/// The W3C `traceparent` that names `span`, for the work it hands on (an
/// outbox row, a signed task). `None` when spans are not exported.
pub fn traceparent(span: &Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// [`traceparent`] of the current span.
pub fn current_traceparent() -> Option<String> {
    traceparent(&Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_endpoints_are_accepted() {
        let settings = |endpoint| Settings {
            service: "keel-test",
            filter: "info",
            style: LogStyle::Compact,
            otlp_endpoint: Some(endpoint),
        };
        let refused =
            tracer_provider(&settings("https://collector:4318")).expect_err("https is refused");
        assert!(refused.to_string().contains("only http://"), "{refused}");
        let provider = tracer_provider(&settings("http://127.0.0.1:4318/"))
            .expect("plain http is fine")
            .expect("an endpoint switches export on");
        let _ = provider.shutdown();
        // An empty value is no endpoint (as an unset variable).
        assert!(
            tracer_provider(&settings(" "))
                .expect("empty is fine")
                .is_none()
        );
    }

    #[test]
    fn without_an_exporter_spans_name_no_trace() {
        let span = tracing::info_span!("plain");
        continue_trace(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        assert_eq!(traceparent(&span), None);
    }

    #[test]
    fn a_span_continues_the_trace_it_is_given_and_names_itself() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("child");
            continue_trace(&span, parent);
            let own = traceparent(&span).expect("an exported span has a context");
            let parts: Vec<&str> = own.split('-').collect();
            assert_eq!(parts[0], "00");
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(
                parts[2], "00f067aa0ba902b7",
                "the span's own id, not its parent's"
            );
            assert_eq!(parts[3], "01");

            // Inside it, the current span is it.
            let inner = span.in_scope(current_traceparent).expect("current span");
            assert_eq!(inner, own);

            // Garbage is ignored: a new root trace.
            let fresh = tracing::info_span!("fresh");
            continue_trace(&fresh, "00-zz-yy-01");
            let fresh = traceparent(&fresh).expect("a new trace");
            assert!(!fresh.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        });
    }
}
