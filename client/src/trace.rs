//! Trace context across the bus: W3C `traceparent` / `tracestate` out with every publish, and back
//! in with every delivery, so one trace runs from the publisher through the broker to each
//! subscriber.
//!
//! # Publishing
//! Spans follow the OpenTelemetry messaging semantic conventions (v1.44.0; the table is in
//! `docs/OBSERVABILITY.md`). [`Client::publish`](crate::Client::publish) runs under a
//! `publish {channel}` span (kind `PRODUCER`, a child of the current span), and each message of
//! [`Client::publish_stream`](crate::Client::publish_stream) and
//! [`Publisher::send`](crate::Publisher::send) gets a `create {channel}` span. That span's context
//! is injected twice:
//! - into the gRPC request metadata, for the call as a whole;
//! - into each message's headers, so the context is stored with the message and travels on with
//!   every delivery, even one replayed from history long after.
//!
//! A message that already carries a `traceparent` header (set with
//! [`Publish::header`](crate::Publish::header) or [`Publish::trace_context`](crate::Publish::trace_context))
//! keeps it, with its `tracestate`: an explicit context always wins (the `publish` span is then of
//! kind `CLIENT` and links to it). When there is no valid span context (no OpenTelemetry layer
//! installed, and no context attached with the API), nothing is injected, so a program that does
//! not trace sends exactly what it built. An empty `tracestate` is never written.
//!
//! The wire format is always W3C trace context ([`TraceContextPropagator`]), whatever global
//! propagator the application installed: it is what the broker reads.
//!
//! # Receiving
//! The broker replaces a delivered message's `traceparent` with the context of its delivery span.
//! [`trace_context`] reads it back; [`delivery_span`] makes the `process {channel}` span for the
//! processing of that message, whose parent is the delivery, so the subscriber's work joins the
//! publisher's trace. Acknowledgements run under an `ack {pattern}` span (settle) and each history
//! page under a `receive {pattern}` span linking to every message it holds.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use switchboard_proto::v1::Message;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header that carries the trace id, the parent span id and the sampling flag.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header that carries vendor-specific trace state, beside [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// The OpenTelemetry context a publish made now propagates: that of the current `tracing` span
/// (through `tracing-opentelemetry`) when it has a valid span context, otherwise
/// [`Context::current`] (a context attached with the OpenTelemetry API directly).
///
/// Its span context is invalid when neither exists; nothing is propagated then.
pub fn current_context() -> Context {
    let context = Span::current().context();
    if context.span().span_context().is_valid() {
        context
    } else {
        Context::current()
    }
}

/// The trace context a delivered (or historical) message carries in its `traceparent` and
/// `tracestate` headers: for a delivery, the broker's delivery span; for a message read from
/// history, the publisher's context as the broker stored it.
///
/// Its span context is invalid (`context.span().span_context().is_valid()` is false) when the
/// message carries none, or one that does not parse.
///
/// # Example
/// ```
/// use opentelemetry::trace::TraceContextExt;
/// use switchboard_client::{trace_context, Message};
///
/// let mut message = Message::default();
/// message.headers.insert(
///     "traceparent".to_owned(),
///     "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
/// );
/// let context = trace_context(&message);
/// let span = context.span();
/// assert_eq!(
///     span.span_context().trace_id().to_string(),
///     "0af7651916cd43dd8448eb211c80319c"
/// );
/// assert!(span.span_context().is_remote());
/// ```
pub fn trace_context(message: &Message) -> Context {
    extract_headers(&message.headers)
}

/// `messaging.system` of every span the client makes.
const SYSTEM: &str = "switchboard";

/// A span for processing `message`: `process {channel}`, kind `CONSUMER`, following the
/// OpenTelemetry messaging semantic conventions (see `docs/OBSERVABILITY.md`), so the
/// processing joins the publisher's trace as a child of the broker's delivery span.
///
/// The span is a `tracing` span at `INFO` level (its `tracing` name is `switchboard.process`; the
/// exported name is given as `otel.name`) with the attributes `messaging.system`
/// (`switchboard`), `messaging.operation.type` and `messaging.operation.name` (`process`),
/// `messaging.destination.name` (the channel), `messaging.message.id` (the offset) and
/// `messaging.message.conversation_id` (the correlation id, when it has one).
///
/// Its parent is the trace context the message carries (see [`trace_context`]) and it links to
/// that context too, as the conventions ask of a process span; a span current when this is
/// called (for example a server span the message arrived in) is linked rather than the parent.
/// When the message carries no trace context, the span's parent is the current span, as for any
/// other span. Parent and links are only exported when a `tracing-opentelemetry` layer is
/// installed; without one this is an ordinary `tracing` span.
///
/// # Example
/// ```no_run
/// use futures::StreamExt;
/// use switchboard_client::{delivery_span, Client, Start};
/// use tracing::Instrument;
///
/// # async fn handle(_: &switchboard_client::Message) {}
/// # async fn run(client: Client) -> Result<(), switchboard_client::Error> {
/// let mut subscription = client.subscribe("crm.*.updated", Start::Latest).await?;
/// while let Some(message) = subscription.next().await {
///     let message = message?;
///     let span = delivery_span(&message);
///     handle(&message).instrument(span).await;
/// }
/// # Ok(())
/// # }
/// ```
pub fn delivery_span(message: &Message) -> Span {
    let span = tracing::info_span!(
        "switchboard.process",
        otel.name = %format_args!("process {}", message.channel),
        otel.kind = "consumer",
        messaging.system = SYSTEM,
        "messaging.operation.type" = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %message.channel,
        messaging.message.id = %message.offset,
        messaging.message.conversation_id = tracing::field::Empty,
    );
    if !message.correlation_id.is_empty() {
        span.record(
            "messaging.message.conversation_id",
            message.correlation_id.as_str(),
        );
    }
    let context = trace_context(message);
    let carried = context.span().span_context().clone();
    if carried.is_valid() {
        let ambient = Span::current().context().span().span_context().clone();
        // Fails only when no OpenTelemetry layer is installed (nothing to join then) or the span
        // is disabled.
        let _ignored = span.set_parent(context);
        span.add_link(carried);
        span.add_link(ambient);
    }
    span
}

/// How a message being published gets its creation context (see [`publish_span`]).
pub(crate) struct Outgoing {
    /// The span of the operation; current while it runs.
    pub span: Span,
    /// The context for the request metadata.
    pub context: Context,
}

/// The span of a single-message publish (`Client::publish`), `publish {channel}`, and the
/// message's creation context: a child of the current span (or of the OpenTelemetry context
/// attached with the API directly), whose context is written into `headers` — kind `PRODUCER`.
/// When `headers` already carry a `traceparent` (a creation context the caller chose), it is left
/// alone and the span, kind `CLIENT`, links to it instead, as the conventions ask.
pub(crate) fn publish_span(channel: &str, headers: &mut HashMap<String, String>) -> Outgoing {
    let explicit = has_traceparent(headers);
    let kind = if explicit { "client" } else { "producer" };
    let span = tracing::info_span!(
        "switchboard.publish",
        otel.name = %format_args!("publish {channel}"),
        otel.kind = kind,
        messaging.system = SYSTEM,
        "messaging.operation.type" = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %channel,
        messaging.message.id = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    adopt_api_context(&span);
    if explicit {
        span.add_link(extract_headers(headers).span().span_context().clone());
    }
    let context = context_of(&span);
    inject_headers(&context, headers);
    Outgoing { span, context }
}

/// `create {channel}`, kind `PRODUCER`: the creation context of one message of a publish stream
/// (`Client::publish_stream`, `Publisher::send`), written into its headers; a child of `parent`
/// (the span current when the stream was opened or the message sent). A message that carries its
/// own `traceparent` gets no span and keeps its context.
pub(crate) fn create_span(parent: &Span, channel: &str, headers: &mut HashMap<String, String>) {
    if has_traceparent(headers) {
        return;
    }
    let mut create = || {
        let span = tracing::info_span!(
            parent: parent,
            "switchboard.create",
            otel.name = %format_args!("create {channel}"),
            otel.kind = "producer",
            messaging.system = SYSTEM,
            "messaging.operation.type" = "create",
            messaging.operation.name = "create",
            messaging.destination.name = %channel,
        );
        if !parent.context().span().span_context().is_valid() {
            adopt_api_context(&span);
        }
        inject_headers(&context_of(&span), headers);
    };
    // A stream's messages are made where the transport polls it, maybe on a thread without the
    // application's dispatcher: the span is made with the dispatcher that recorded its parent.
    match parent.with_subscriber(|(_, dispatch)| dispatch.clone()) {
        Some(dispatch) => tracing::dispatcher::with_default(&dispatch, create),
        None => create(),
    }
}

/// Records the offset a publish was stored at (its `messaging.message.id`).
pub(crate) fn published(span: &Span, offset: u64) {
    if offset > 0 {
        span.record("messaging.message.id", offset.to_string());
    }
}

/// Records a failed operation: `error.type` (the broker's reason code, or the gRPC code) and an
/// error status.
pub(crate) fn failed(span: &Span, error: &crate::Error) {
    let kind = match error.reason() {
        Some(reason) => reason.as_str().to_owned(),
        None => match error {
            crate::Error::Status { code, .. } => format!("{code:?}"),
            _ => "_OTHER".to_owned(),
        },
    };
    span.set_status(opentelemetry::trace::Status::error(error.to_string()));
    span.record("error.type", kind.as_str());
}

/// `ack {pattern}`, kind `CLIENT`: acknowledging deliveries of a subscription (`settle`).
pub(crate) fn settle_span(pattern: &str, durable: Option<&str>, offsets: &[u64]) -> Span {
    let span = tracing::info_span!(
        "switchboard.settle",
        otel.name = %format_args!("ack {pattern}"),
        otel.kind = "client",
        messaging.system = SYSTEM,
        "messaging.operation.type" = "settle",
        messaging.operation.name = "ack",
        messaging.destination.template = %pattern,
        messaging.consumer.group.name = tracing::field::Empty,
        messaging.message.id = tracing::field::Empty,
        messaging.batch.message_count = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    if let Some(durable) = durable {
        span.record("messaging.consumer.group.name", durable);
    }
    match offsets {
        [offset] => {
            span.record("messaging.message.id", offset.to_string());
        }
        _ => {
            span.record("messaging.batch.message_count", offsets.len());
        }
    }
    adopt_api_context(&span);
    span
}

/// `receive {pattern}`, kind `CLIENT`: one page of history, a batch receive. Its links, one per
/// message, point at each message's creation context ([`received`] adds them once the page is
/// in).
pub(crate) fn receive_span(pattern: &str) -> Span {
    let span = tracing::info_span!(
        "switchboard.receive",
        otel.name = %format_args!("receive {pattern}"),
        otel.kind = "client",
        messaging.system = SYSTEM,
        "messaging.operation.type" = "receive",
        messaging.operation.name = "history",
        messaging.destination.template = %pattern,
        messaging.batch.message_count = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    adopt_api_context(&span);
    span
}

/// Records the messages a receive span received: their count, and a link to each one's trace
/// context (for a stored message, the broker's publish span, itself under the publisher's).
pub(crate) fn received(span: &Span, messages: &[Message]) {
    span.record("messaging.batch.message_count", messages.len());
    for message in messages {
        span.add_link(trace_context(message).span().span_context().clone());
    }
}

/// Makes the OpenTelemetry context attached with the API directly the parent of `span`, when the
/// current `tracing` span has none (see [`current_context`]).
fn adopt_api_context(span: &Span) {
    if !Span::current().context().span().span_context().is_valid() {
        let attached = Context::current();
        if attached.span().span_context().is_valid() {
            let _ignored = span.set_parent(attached);
        }
    }
}

/// The context to propagate for an operation under `span`: the span's own when an OpenTelemetry
/// layer records it, otherwise whatever [`current_context`] finds (a context attached with the
/// API directly), otherwise none.
fn context_of(span: &Span) -> Context {
    let context = span.context();
    if context.span().span_context().is_valid() {
        context
    } else {
        current_context()
    }
}

/// Whether `headers` carry a `traceparent` of their own (any letter case).
pub(crate) fn has_traceparent(headers: &HashMap<String, String>) -> bool {
    headers
        .keys()
        .any(|name| name.eq_ignore_ascii_case(TRACEPARENT))
}

/// Writes `context` into `headers` unless they already carry a `traceparent` (or the context has
/// no valid span context).
pub(crate) fn inject_headers(context: &Context, headers: &mut HashMap<String, String>) {
    if !context.span().span_context().is_valid() || has_traceparent(headers) {
        return;
    }
    TraceContextPropagator::new().inject_context(context, &mut HeaderInjector(headers));
}

/// Writes `context` into `headers`, replacing any `traceparent` and `tracestate` they carry (in
/// any letter case); with an invalid context, only removes them.
pub(crate) fn replace_headers(context: &Context, headers: &mut HashMap<String, String>) {
    headers.retain(|name, _| {
        !name.eq_ignore_ascii_case(TRACEPARENT) && !name.eq_ignore_ascii_case(TRACESTATE)
    });
    inject_headers(context, headers);
}

/// Writes `context` into gRPC request metadata (nothing when it has no valid span context).
pub(crate) fn inject_metadata(context: &Context, metadata: &mut MetadataMap) {
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(context, &mut MetadataInjector(metadata));
    }
}

/// Reads the trace context in `headers` (invalid when there is none).
pub(crate) fn extract_headers(headers: &HashMap<String, String>) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Message headers as an OpenTelemetry carrier to write into. An empty value (an empty
/// `tracestate`) is not written.
struct HeaderInjector<'a>(&'a mut HashMap<String, String>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.insert(key.to_owned(), value);
        }
    }
}

/// Message headers as an OpenTelemetry carrier to read from; names match in any letter case.
struct HeaderExtractor<'a>(&'a HashMap<String, String>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.get(key) {
            Some(value) => Some(value),
            None => self
                .0
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(key))
                .map(|(_, value)| value.as_str()),
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// gRPC request metadata as an OpenTelemetry carrier to write into. A value that is not valid
/// ASCII metadata (or is empty) is not written.
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// A context whose span is remote, with these ids and a trace state.
    fn context(trace: u128, span: u64) -> Context {
        let state = TraceState::from_key_value([("vendor", "value")]).unwrap();
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            true,
            state,
        ))
    }

    #[test]
    fn injection_round_trips_through_headers() {
        let sent = context(
            0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
            0xb7ad_6b71_6920_3331,
        );
        let mut headers = HashMap::new();
        inject_headers(&sent, &mut headers);
        assert_eq!(headers[TRACEPARENT], PARENT);
        assert_eq!(headers[TRACESTATE], "vendor=value");

        let message = Message {
            headers,
            ..Message::default()
        };
        let received = trace_context(&message);
        let (sent, received) = (sent.span(), received.span());
        let (sent, received) = (sent.span_context(), received.span_context());
        assert!(received.is_valid() && received.is_remote() && received.is_sampled());
        assert_eq!(received.trace_id(), sent.trace_id());
        assert_eq!(received.span_id(), sent.span_id());
        assert_eq!(received.trace_state().header(), "vendor=value");
    }

    #[test]
    fn an_explicit_traceparent_is_kept() {
        let explicit = "00-11111111111111111111111111111111-2222222222222222-01";
        for name in ["traceparent", "TraceParent"] {
            let mut headers = HashMap::from([
                (name.to_owned(), explicit.to_owned()),
                ("tracestate".to_owned(), "mine=1".to_owned()),
            ]);
            inject_headers(&context(7, 8), &mut headers);
            assert_eq!(headers.len(), 2, "{headers:?}");
            assert_eq!(headers[name], explicit);
            assert_eq!(headers["tracestate"], "mine=1");
            let received = extract_headers(&headers);
            assert_eq!(
                received.span().span_context().trace_id(),
                TraceId::from(0x1111_1111_1111_1111_1111_1111_1111_1111)
            );
        }
    }

    #[test]
    fn replace_overrides_an_earlier_context() {
        let mut headers = HashMap::from([
            ("TRACEPARENT".to_owned(), PARENT.to_owned()),
            ("TraceState".to_owned(), "old=1".to_owned()),
            ("other".to_owned(), "kept".to_owned()),
        ]);
        replace_headers(&context(5, 6), &mut headers);
        assert_eq!(
            headers[TRACEPARENT],
            "00-00000000000000000000000000000005-0000000000000006-01"
        );
        assert_eq!(headers[TRACESTATE], "vendor=value");
        assert_eq!(headers["other"], "kept");
        assert_eq!(headers.len(), 3);

        replace_headers(&Context::new(), &mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["other"]);
    }

    #[test]
    fn nothing_is_injected_without_a_span_context() {
        let mut headers = HashMap::new();
        inject_headers(&Context::new(), &mut headers);
        inject_headers(&current_context(), &mut headers);
        assert!(headers.is_empty());

        let mut metadata = MetadataMap::new();
        inject_metadata(&current_context(), &mut metadata);
        assert!(metadata.is_empty());
        assert!(!trace_context(&Message::default())
            .span()
            .span_context()
            .is_valid());
    }

    #[test]
    fn metadata_gets_the_context() {
        let mut metadata = MetadataMap::new();
        inject_metadata(
            &context(
                0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
                0xb7ad_6b71_6920_3331,
            ),
            &mut metadata,
        );
        assert_eq!(
            metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
            Some(PARENT)
        );
        assert_eq!(
            metadata.get(TRACESTATE).and_then(|v| v.to_str().ok()),
            Some("vendor=value")
        );

        // An empty trace state is left out.
        let bare = Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(1),
            SpanId::from(2),
            TraceFlags::default(),
            true,
            TraceState::default(),
        ));
        let mut metadata = MetadataMap::new();
        inject_metadata(&bare, &mut metadata);
        assert_eq!(metadata.len(), 1);
        assert_eq!(
            metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
            Some("00-00000000000000000000000000000001-0000000000000002-00")
        );
    }

    /// Keeps every finished span, for the tests that run a real tracer.
    #[derive(Clone, Debug, Default)]
    struct Spans(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Spans {
        async fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    #[test]
    fn the_current_span_is_injected_and_the_delivery_span_joins_it() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;

        let spans = Spans::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let publish = tracing::info_span!("publish");
            let mut headers = HashMap::new();
            publish.in_scope(|| inject_headers(&current_context(), &mut headers));
            let sent = publish.context().span().span_context().clone();
            assert!(sent.is_valid());
            assert_eq!(
                headers[TRACEPARENT],
                format!("00-{}-{}-01", sent.trace_id(), sent.span_id())
            );
            drop(publish);

            let message = Message {
                offset: 7,
                channel: "crm.contact.updated".to_owned(),
                headers,
                ..Message::default()
            };
            let process = delivery_span(&message);
            let received = process.context().span().span_context().clone();
            assert_eq!(received.trace_id(), sent.trace_id());
            drop(process);

            // Outside any span, nothing is injected.
            let mut headers = HashMap::new();
            inject_headers(&current_context(), &mut headers);
            assert!(headers.is_empty());
        });

        let spans = spans.0.lock().unwrap();
        let process = spans
            .iter()
            .find(|span| span.name == "process crm.contact.updated")
            .expect("the delivery span is exported under its name");
        assert_eq!(process.span_kind, opentelemetry::trace::SpanKind::Consumer);
        assert_eq!(process.parent_span_id, sent_span_id(&spans));
        assert!(process.parent_span_is_remote);
    }

    fn sent_span_id(spans: &[opentelemetry_sdk::trace::SpanData]) -> SpanId {
        spans
            .iter()
            .find(|span| span.name == "publish")
            .expect("the publish span is exported")
            .span_context
            .span_id()
    }

    #[test]
    fn current_context_falls_back_to_the_attached_one() {
        let attached = context(9, 10);
        let _guard = attached.clone().attach();
        let current = current_context();
        assert_eq!(
            current.span().span_context().trace_id(),
            TraceId::from(9_u128)
        );
        let mut headers = HashMap::new();
        inject_headers(&current, &mut headers);
        assert_eq!(
            headers[TRACEPARENT],
            "00-00000000000000000000000000000009-000000000000000a-01"
        );
    }
}
