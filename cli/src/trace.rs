//! `sb`'s own trace of what it publishes, exported over OTLP/gRPC when the standard
//! OpenTelemetry variables configure an exporter.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The SDK reads the rest of
//! the standard variables itself: the endpoint, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`
//! (`sb` when unset) and `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`.
//!
//! `sb publish` then runs under a root span, `sb publish`, whose trace id it prints on stderr
//! (`sb: trace <id>`); the client's `publish {channel}` span is its child, and its context
//! travels with the message, so the broker's spans and every subscriber's join the same trace.
//! Without export nothing is set up and no span context exists, so nothing is injected.

use std::future::Future;
use std::sync::OnceLock;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Instrument as _;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The `tracing` name of `sb`'s root span (exported under `otel.name`).
const ROOT: &str = "sb.publish";

/// The running exporter, flushed by [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether the environment asks for trace export.
fn configured(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| env(name).is_some_and(|value| !value.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let no_exporter = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none");
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !disabled
        && !no_exporter
}

/// The OpenTelemetry layer for `sb`'s subscriber when export is configured (see the module
/// docs); `None` otherwise, or when the exporter cannot be built (said on stderr: a publish is no
/// reason to fail). Only the client's spans and `sb`'s root span are exported, without the
/// `tracing` bookkeeping attributes (source location, thread, busy/idle time).
///
/// Must run inside the Tokio runtime: the exporter's gRPC channel starts there.
pub fn layer<S>() -> Option<impl Layer<S>>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    if !configured(|name| std::env::var(name).ok()) {
        return None;
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(protocol) = std::env::var(name) {
            if protocol.trim() != "grpc" {
                eprintln!("sb: {name}={protocol} is not supported; exporting OTLP over gRPC");
            }
            break;
        }
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("sb: no trace export: {error}");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |name| name.trim().is_empty()) {
        resource = resource.with_service_name("sb");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("sb");
    let _ = PROVIDER.set(provider);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let layer: OpenTelemetryLayer<S, SdkTracer> = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false);
    Some(
        layer.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.name() == ROOT || meta.name().starts_with("switchboard.")
        })),
    )
}

/// Runs `publish` under `sb`'s root span when export is on, and prints the trace id on stderr
/// (whether the publish succeeded or not: a failed one is worth finding too).
pub async fn traced<F>(publish: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    if PROVIDER.get().is_none() {
        return publish.await;
    }
    let root = tracing::info_span!(ROOT, otel.name = "sb publish");
    let trace_id = root.context().span().span_context().trace_id();
    let outcome = publish.instrument(root).await;
    eprintln!("sb: trace {trace_id}");
    outcome
}

/// Exports what is left and stops the exporter (nothing when export is off). The export runs on
/// the runtime this awaits on, so the flush happens on a blocking thread meanwhile.
pub async fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let provider = provider.clone();
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = flushed {
            eprintln!("sb: exporting the trace failed: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn export_follows_the_standard_variables() {
        assert!(!configured(env(&[])));
        assert!(configured(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4317"
        )])));
        assert!(configured(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://127.0.0.1:4317"
        )])));
        assert!(!configured(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(!configured(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ])));
        assert!(!configured(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])));
    }
}
