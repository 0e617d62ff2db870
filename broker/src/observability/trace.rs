//! Tracing across the bus: W3C trace context in and out of messages, the broker's spans, and
//! OTLP export.
//!
//! Spans follow the OpenTelemetry messaging semantic conventions (v1.44.0; the table is in
//! docs/OBSERVABILITY.md). The path of one message: the publisher's span → `publish {channel}`
//! (kind SERVER, child of the `traceparent` in the message's headers, or in the request's
//! metadata) → its children `commit {channel}` (the log write, fsync included) and
//! `apply {channel}` → one `deliver {pattern}` (kind PRODUCER) per subscriber, whose context
//! replaces the `traceparent` header of the delivered message, so the subscriber's `process`
//! span (kind CONSUMER) is its child. The `tracing` names stay `switchboard.*` (what the exporter
//! lets through); the exported names are given as `otel.name`.
//!
//! The publish span's context is stored in the message's `traceparent` header, so a delivery —
//! even one replayed from the store long after — joins the publisher's trace. An empty
//! `tracestate` is never written.
//!
//! Export is off unless an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`, or
//! `tracing.otlp_endpoint`). When it is off, none of this does any work: no header is parsed or
//! written and no span context is built ([`enabled`] is checked first).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether trace export is on.
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns context propagation on (done once export is set up).
pub(crate) fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// A remote parent: the trace context a publisher sent.
pub(crate) type Parent = opentelemetry::Context;

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HeaderExtractor<'a, M>(&'a M);

impl Extractor for HeaderExtractor<'_, HashMap<String, String>> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl Extractor for HeaderExtractor<'_, BTreeMap<String, String>> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Message headers as a carrier to write into. An empty value (the `tracestate` of a context
/// that has none) is not written: a delivery must not gain an empty `tracestate` header.
struct HeaderInjector<'a, M>(&'a mut M);

impl Injector for HeaderInjector<'_, BTreeMap<String, String>> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            self.0.remove(key);
        } else {
            self.0.insert(key.to_owned(), value);
        }
    }
}

impl Injector for HeaderInjector<'_, HashMap<String, String>> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            self.0.remove(key);
        } else {
            self.0.insert(key.to_owned(), value);
        }
    }
}

fn valid(context: opentelemetry::Context) -> Option<Parent> {
    context.span().span_context().is_valid().then_some(context)
}

/// The trace context in a request's metadata, if any (and if tracing is on).
pub(crate) fn parent_from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Parent> {
    if !enabled() {
        return None;
    }
    valid(TraceContextPropagator::new().extract(&MetadataExtractor(metadata)))
}

/// The trace context in a message's headers, if any (and if tracing is on).
pub(crate) fn parent_from_headers(headers: &HashMap<String, String>) -> Option<Parent> {
    if !enabled() || !headers.contains_key("traceparent") {
        return None;
    }
    valid(TraceContextPropagator::new().extract(&HeaderExtractor(headers)))
}

fn stored_parent(headers: &BTreeMap<String, String>) -> Option<Parent> {
    if !enabled() || !headers.contains_key("traceparent") {
        return None;
    }
    valid(TraceContextPropagator::new().extract(&HeaderExtractor(headers)))
}

/// `messaging.system` of every span: the messaging system as the semantic conventions name it.
const SYSTEM: &str = "switchboard";

/// The broker's span of one message published to it (`Publish`, one message of a
/// `PublishStream`, or a gateway publish): `publish {channel}`, kind `SERVER` (the server side of
/// the publisher's `send`), under the publisher's context when it sent one. Ends with the answer;
/// [`published`] or [`refused`] records how it went.
pub(crate) fn publish_span(parent: Option<&Parent>, channel: &str, correlation_id: &str) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "switchboard.publish",
        otel.name = %format_args!("publish {channel}"),
        otel.kind = "server",
        messaging.system = SYSTEM,
        "messaging.operation.type" = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %channel,
        messaging.message.id = tracing::field::Empty,
        messaging.message.conversation_id = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    if !correlation_id.is_empty() {
        span.record("messaging.message.conversation_id", correlation_id);
    }
    if let Some(parent) = parent {
        let _ = span.set_parent(parent.clone());
    }
    span
}

/// Records the offset a publish was stored at (its `messaging.message.id`; an ephemeral message,
/// never stored, has none).
pub(crate) fn published(span: &Span, offset: u64) {
    if offset > 0 && !span.is_none() {
        span.record("messaging.message.id", offset.to_string());
    }
}

/// Records why a publish was refused (`error.type`, the refusal's reason code) and marks the span
/// as failed.
pub(crate) fn refused(span: &Span, reason: &str) {
    if !span.is_none() {
        span.record("error.type", reason);
        span.set_status(opentelemetry::trace::Status::error(reason.to_owned()));
    }
}

/// `commit {channel}`: the log write of a publish (group commit, fdatasync, apply) until its ack,
/// a child of its publish span. Ends when dropped.
pub(crate) fn commit_span(publish: &Span, channel: &str) -> Span {
    if !enabled() || publish.is_none() {
        return Span::none();
    }
    tracing::info_span!(
        parent: publish,
        "switchboard.commit",
        otel.name = %format_args!("commit {channel}"),
        messaging.system = SYSTEM,
        messaging.destination.name = %channel,
    )
}

/// Writes `span`'s context into a message's headers (replacing the publisher's `traceparent`), so
/// everything that later happens to the message joins the trace under it.
pub(crate) fn stamp_message(span: &Span, headers: &mut BTreeMap<String, String>) {
    if !enabled() || span.is_none() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Records that a stored message was applied on this node: `apply {channel}`, under its publish
/// span.
pub(crate) fn applied(headers: &BTreeMap<String, String>, channel: &str, offset: u64) {
    if let Some(parent) = stored_parent(headers) {
        let span = tracing::info_span!(
            "switchboard.apply",
            otel.name = %format_args!("apply {channel}"),
            messaging.system = SYSTEM,
            messaging.destination.name = %channel,
            messaging.message.id = %offset,
        );
        let _ = span.set_parent(parent);
    }
}

/// The subscription a delivery goes to, as its span describes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subscriber<'a> {
    /// Its id on this node.
    pub id: u64,
    /// Its pattern: the span's `messaging.destination.template` and name.
    pub pattern: &'a str,
    /// Its durable name: `messaging.consumer.group.name`.
    pub durable: Option<&'a str>,
}

/// Records one delivery of a stored message and points the delivered copy's `traceparent` at it:
/// `deliver {pattern}`, kind `PRODUCER` (the broker sends the message on to a subscriber, and the
/// span's context is the creation context of the copy it sends, so the subscriber's `process`
/// span, kind `CONSUMER`, is its child).
pub(crate) fn delivered(
    stored: &BTreeMap<String, String>,
    outgoing: &mut HashMap<String, String>,
    subscriber: &Subscriber<'_>,
    channel: &str,
    offset: u64,
) {
    let Some(parent) = stored_parent(stored) else {
        return;
    };
    let span = tracing::info_span!(
        "switchboard.deliver",
        otel.name = %format_args!("deliver {}", subscriber.pattern),
        otel.kind = "producer",
        messaging.system = SYSTEM,
        "messaging.operation.type" = "send",
        messaging.operation.name = "deliver",
        messaging.destination.name = %channel,
        messaging.destination.template = %subscriber.pattern,
        messaging.consumer.group.name = tracing::field::Empty,
        messaging.message.id = tracing::field::Empty,
        messaging.switchboard.subscription.id = subscriber.id,
    );
    // An ephemeral message (offset 0) was never stored and has no id.
    if offset > 0 {
        span.record("messaging.message.id", offset.to_string());
    }
    if let Some(durable) = subscriber.durable {
        span.record("messaging.consumer.group.name", durable);
    }
    let _ = span.set_parent(parent);
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(outgoing));
}

/// The running OTLP exporter; [`Export::shutdown`] flushes what is left.
pub struct Export {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Export {
    /// Flushes pending spans and stops the exporter.
    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

/// Where to export spans, when anywhere.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// The collector's gRPC endpoint, for example `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
}

/// The OpenTelemetry layer spans are exported through: only what the messaging conventions ask
/// for, so none of the `tracing` bookkeeping the layer adds by default (source location
/// `code.*`, `thread.*`, `busy_ns` / `idle_ns`, `target`).
fn otel_layer<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
}

/// Installs the process's `tracing` subscriber: logs (text or JSON) filtered by `filter`, plus, when
/// `otlp` is given, an OpenTelemetry layer exporting spans over OTLP/gRPC. Must run inside the
/// Tokio runtime (the exporter's gRPC client needs it).
///
/// # Errors
/// The exporter cannot be built (a malformed endpoint).
pub fn install_subscriber(
    filter: tracing_subscriber::EnvFilter,
    json: bool,
    otlp: Option<&OtlpSettings>,
) -> Result<Option<Export>, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let (otel, export) = match otlp {
        Some(settings) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .build()?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(settings.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("switchboard");
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            enable();
            (Some(otel_layer(tracer)), Some(Export { provider }))
        }
        None => (None, None),
    };
    // Only the broker's own spans go to the exporter; logs keep the configured filter.
    let otel = otel.map(|layer| {
        tracing_subscriber::Layer::with_filter(
            layer,
            tracing_subscriber::filter::filter_fn(|meta| meta.name().starts_with("switchboard.")),
        )
    });
    tracing_subscriber::registry()
        .with(otel)
        .with(text.map(|l| tracing_subscriber::Layer::with_filter(l, filter.clone())))
        .with(json_layer.map(|l| tracing_subscriber::Layer::with_filter(l, filter)))
        .init();
    Ok(export)
}
