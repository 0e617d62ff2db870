//! An in-process OTLP trace collector, and a test tracer that exports to it.
//!
//! [`Collector::start`] serves the OTLP/gRPC `TraceService` on `127.0.0.1:0` and keeps every span
//! it receives, from any number of exporters (a broker process pointed at it with
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, and the test itself through [`init_test_tracer`]).
//! [`Collector::wait_for`] waits, with a deadline and without sleeping, until the spans received
//! satisfy a condition.
//!
//! # Flushing and runtimes
//! The test tracer exports through a batch span processor, which runs on a thread of its own and
//! holds spans for up to 5 s: call `provider.force_flush()` once the spans of interest have ended,
//! before waiting for them. `force_flush` (and the shutdown that happens when the last handle on
//! the provider is dropped) blocks the calling thread until the export is done, and the export
//! runs on the Tokio runtime, so a current-thread runtime stalls until the exporter's 5 s timeout:
//! tests that use [`init_test_tracer`] must be `#[tokio::test(flavor = "multi_thread")]`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::Layer as _;

/// One span as the collector received it. Ids are lowercase hex, as in a `traceparent` header
/// (and as `opentelemetry`'s `TraceId` / `SpanId` display them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectedSpan {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; `None` for a root span.
    pub parent_span_id: Option<String>,
    /// The span's name (for a `tracing` span, its `otel.name` field when it has one).
    pub name: String,
    /// The `service.name` attribute of the exporter's resource (empty when it sent none).
    pub service_name: String,
    /// The span kind as OTLP spells it: `SPAN_KIND_INTERNAL`, `SPAN_KIND_SERVER`,
    /// `SPAN_KIND_CLIENT`, `SPAN_KIND_PRODUCER`, `SPAN_KIND_CONSUMER` or `SPAN_KIND_UNSPECIFIED`.
    pub kind: String,
    /// The span's attributes, each value rendered as text (a string as is, numbers and booleans
    /// in decimal, anything else in debug form).
    pub attributes: BTreeMap<String, String>,
    /// The spans it links to, as `(trace id, span id)`.
    pub links: Vec<(String, String)>,
}

impl CollectedSpan {
    /// Whether `parent` is this span's parent.
    pub fn is_child_of(&self, parent: &CollectedSpan) -> bool {
        self.trace_id == parent.trace_id && self.parent_span_id.as_deref() == Some(&parent.span_id)
    }

    /// Whether this span links to `other`.
    pub fn links_to(&self, other: &CollectedSpan) -> bool {
        self.links
            .iter()
            .any(|(trace, span)| *trace == other.trace_id && *span == other.span_id)
    }

    /// The attribute `key`, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

impl fmt::Display for CollectedSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] trace {} span {} parent {}",
            self.name,
            self.service_name,
            self.trace_id,
            self.span_id,
            self.parent_span_id.as_deref().unwrap_or("-")
        )
    }
}

/// What the server shares with the [`Collector`] handle.
#[derive(Debug)]
struct Store {
    spans: Mutex<Vec<CollectedSpan>>,
    /// The number of spans received, bumped after every export, so waiters wake up.
    received: watch::Sender<usize>,
}

impl Store {
    fn spans(&self) -> Vec<CollectedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The OTLP `TraceService` that fills the store.
struct Service(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| {
                    resource
                        .attributes
                        .iter()
                        .find(|attribute| attribute.key == "service.name")
                })
                .and_then(|attribute| attribute.value.as_ref())
                .map(render)
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.push(CollectedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty()
                        && span.parent_span_id.iter().any(|byte| *byte != 0))
                    .then(|| hex(&span.parent_span_id)),
                    name: span.name,
                    service_name: service_name.clone(),
                    kind: SpanKind::try_from(span.kind)
                        .map_or("SPAN_KIND_UNSPECIFIED", |kind| kind.as_str_name())
                        .to_owned(),
                    attributes: attributes(&span.attributes),
                    links: span
                        .links
                        .iter()
                        .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                        .collect(),
                });
            }
        }
        let total = {
            let mut spans = self.0.spans.lock().unwrap_or_else(PoisonError::into_inner);
            spans.extend(received);
            spans.len()
        };
        self.0.received.send_replace(total);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn render(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::BoolValue(flag)) => flag.to_string(),
        Some(any_value::Value::IntValue(number)) => number.to_string(),
        Some(any_value::Value::DoubleValue(number)) => number.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|attribute| {
            (
                attribute.key.clone(),
                attribute.value.as_ref().map(render).unwrap_or_default(),
            )
        })
        .collect()
}

/// An OTLP/gRPC trace collector serving on a free port of 127.0.0.1 until it is dropped.
#[derive(Debug)]
pub struct Collector {
    addr: SocketAddr,
    store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Collector {
    /// Starts the collector; it accepts exports as soon as this returns.
    ///
    /// # Panics
    /// When no port of 127.0.0.1 can be bound (a broken test machine).
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the OTLP collector");
        let addr = listener
            .local_addr()
            .expect("the collector's bound address");
        let store = Arc::new(Store {
            spans: Mutex::default(),
            received: watch::Sender::new(0),
        });
        let (shutdown, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(Service(store.clone()));
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                eprintln!("OTLP test collector stopped: {error}");
            }
        });
        Collector {
            addr,
            store,
            shutdown: Some(shutdown),
            server,
        }
    }

    /// The URL exporters send to, `http://127.0.0.1:PORT` (the value for
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.store.spans()
    }

    /// Waits until the spans received so far satisfy `predicate`, and returns them. The predicate
    /// is checked at once, then after every export that arrives (no polling interval).
    ///
    /// Spans from the test's own tracer only arrive once it is flushed (see the module docs).
    ///
    /// # Errors
    /// When `deadline` passes first; the message lists every span received.
    pub async fn wait_for(
        &self,
        predicate: impl Fn(&[CollectedSpan]) -> bool,
        deadline: Duration,
    ) -> Result<Vec<CollectedSpan>> {
        let until = tokio::time::Instant::now() + deadline;
        let mut received = self.store.received.subscribe();
        loop {
            received.mark_unchanged();
            let spans = self.spans();
            if predicate(&spans) {
                return Ok(spans);
            }
            match tokio::time::timeout_at(until, received.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self.store`, so it cannot be gone; check once more anyway.
                Ok(Err(_)) | Err(_) => {
                    let spans = self.spans();
                    if predicate(&spans) {
                        return Ok(spans);
                    }
                    let listing: Vec<String> = spans.iter().map(ToString::to_string).collect();
                    bail!(
                        "the OTLP collector did not receive the expected spans within {deadline:?}; \
                         it has {}:\n  {}",
                        spans.len(),
                        listing.join("\n  ")
                    );
                }
            }
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.server.abort();
    }
}

/// Sets up a tracer that exports the test's own spans (a publisher's, a subscriber's) to the OTLP
/// collector at `endpoint`, under the resource attribute `service.name` = `service_name`:
/// - an OTLP/gRPC span exporter (`opentelemetry-otlp`, tonic) behind a batch span processor;
/// - a `tracing` subscriber (a registry with a `tracing-opentelemetry` layer for spans at `INFO`
///   and above, without source location, thread and busy/idle attributes), made the default dispatcher **of the calling thread** until the returned guard
///   is dropped;
/// - the global text-map propagator set to W3C trace context.
///
/// Hold the guard for the whole test. The thread default covers the test's own async body (a
/// `#[tokio::test]` body runs on the test thread); a task it spawns must take the dispatcher
/// along, with `tracing::instrument::WithSubscriber::with_current_subscriber`.
///
/// Nothing is exported until `provider.force_flush()`; must be called inside a multi-thread
/// Tokio runtime (see the module docs).
///
/// # Errors
/// When the exporter cannot be built (an invalid endpoint).
pub fn init_test_tracer(
    endpoint: &str,
    service_name: &str,
) -> Result<(SdkTracerProvider, tracing::subscriber::DefaultGuard)> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .with_context(|| format!("building the OTLP span exporter for {endpoint}"))?;
    let provider = SdkTracerProvider::builder()
        .with_resource(
            Resource::builder_empty()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Configured as docs/OBSERVABILITY.md recommends to applications: none of the `tracing`
    // bookkeeping attributes (source location, thread, busy/idle time, target).
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("switchboard-e2e"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    Ok((provider, guard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    #[tokio::test(flavor = "multi_thread")]
    async fn spans_from_a_test_tracer_arrive() -> Result<()> {
        let collector = Collector::start().await;
        assert!(collector.endpoint().starts_with("http://127.0.0.1:"));
        assert!(collector.spans().is_empty());
        let (provider, _guard) = init_test_tracer(&collector.endpoint(), "otlp-self-test")?;

        let root = tracing::info_span!("self-test.root");
        let child = tracing::info_span!(parent: &root, "self-test.child", answer = 42);
        let (trace_id, root_id) = {
            let context = root.context();
            let span = context.span();
            let span_context = span.span_context();
            (
                span_context.trace_id().to_string(),
                span_context.span_id().to_string(),
            )
        };
        drop(child);

        // A subscriber's processing span joins the trace a delivered message carries.
        let mut delivered = switchboard_client::Message {
            offset: 7,
            channel: "crm.contact.updated".to_owned(),
            ..Default::default()
        };
        delivered.headers.insert(
            switchboard_client::TRACEPARENT.to_owned(),
            format!("00-{trace_id}-{root_id}-01"),
        );
        drop(root);
        drop(switchboard_client::delivery_span(&delivered));

        // Nothing arrives before the flush (the batch processor holds spans for 5 s).
        provider.force_flush()?;
        let spans = collector
            .wait_for(|spans| spans.len() >= 3, Duration::from_secs(10))
            .await?;
        assert_eq!(spans.len(), 3, "{spans:?}");
        let root = spans
            .iter()
            .find(|span| span.name == "self-test.root")
            .expect("the root span");
        let child = spans
            .iter()
            .find(|span| span.name == "self-test.child")
            .expect("the child span");
        assert_eq!(root.trace_id, trace_id);
        assert_eq!(root.span_id, root_id);
        assert_eq!(root.parent_span_id, None);
        assert_eq!(root.service_name, "otlp-self-test");
        assert_eq!(root.kind, "SPAN_KIND_INTERNAL");
        assert!(child.is_child_of(root), "{child} under {root}");
        assert_eq!(
            child.attributes.get("answer").map(String::as_str),
            Some("42")
        );
        let processing = spans
            .iter()
            .find(|span| span.name == "process crm.contact.updated")
            .expect("the delivery span, under its otel.name");
        assert!(processing.is_child_of(root), "{processing} under {root}");
        assert_eq!(processing.kind, "SPAN_KIND_CONSUMER");
        assert_eq!(
            processing.attributes["messaging.destination.name"],
            "crm.contact.updated"
        );
        assert_eq!(processing.attributes["messaging.message.id"], "7");

        // A deadline that passes is an error that lists what arrived.
        let error = collector
            .wait_for(|spans| spans.len() > 3, Duration::from_millis(50))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("self-test.child"), "{error}");

        provider.shutdown()?;
        Ok(())
    }
}
