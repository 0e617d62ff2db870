//! One trace from publisher through broker to subscriber, exported over OTLP to an in-process
//! collector, with span names, kinds and attributes as the OpenTelemetry messaging semantic
//! conventions (v1.44.0) give them; see docs/OBSERVABILITY.md.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use switchboard_client::{
    delivery_span, Client, HistoryQuery, Message, Publish, Start, SubscribeOptions,
    SubscriptionEvent,
};
use switchboard_e2e::otlp::{init_test_tracer, CollectedSpan, Collector};
use switchboard_e2e::{sb_binary, BrokerProcess, DEADLINE};
use tracing::Instrument;

/// Attributes the `tracing` layer adds unless told not to, and the broker's former ad-hoc ones:
/// none may appear on a broker or `sb` span.
const NOISE: [&str; 12] = [
    "code.file.path",
    "code.filepath",
    "code.line.number",
    "code.lineno",
    "code.module.name",
    "code.namespace",
    "thread.name",
    "thread.id",
    "busy_ns",
    "idle_ns",
    "target",
    "channel",
];

fn named<'a>(spans: &'a [CollectedSpan], name: &str, service: &str) -> Option<&'a CollectedSpan> {
    spans
        .iter()
        .find(|s| s.name == name && s.service_name == service)
}

fn span<'a>(spans: &'a [CollectedSpan], name: &str, service: &str) -> &'a CollectedSpan {
    named(spans, name, service).unwrap_or_else(|| panic!("no span {name} from {service}"))
}

/// Asserts `span`'s kind and its `messaging.*` attributes (`expected` must all be there, with
/// these values), and that it carries none of the noise.
fn assert_messaging(span: &CollectedSpan, kind: &str, expected: &[(&str, &str)]) {
    assert_eq!(span.kind, kind, "{span}: {:?}", span.attributes);
    assert_eq!(
        span.attribute("messaging.system"),
        Some("switchboard"),
        "{span}: {:?}",
        span.attributes
    );
    for (key, value) in expected {
        assert_eq!(
            span.attribute(key),
            Some(*value),
            "{span}: {key} in {:?}",
            span.attributes
        );
    }
    assert_clean(span);
}

fn assert_clean(span: &CollectedSpan) {
    for noise in NOISE {
        assert!(
            !span.attributes.contains_key(noise),
            "{span} carries {noise}: {:?}",
            span.attributes
        );
    }
    assert!(
        !span.attributes.contains_key("offset") && !span.attributes.contains_key("subscription"),
        "{span}: {:?}",
        span.attributes
    );
}

/// A broker exporting to `collector` (service name `switchboard-e2e-broker`), its batches sent
/// every 100 ms rather than every 5 s.
fn traced_broker(collector: &Collector) -> (tempfile::TempDir, BrokerProcess) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tracing.toml");
    std::fs::write(
        &config,
        format!(
            "[tracing]\notlp_endpoint = \"{}\"\nservice_name = \"switchboard-e2e-broker\"\n",
            collector.endpoint()
        ),
    )
    .unwrap();
    let broker = BrokerProcess::start_with_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .unwrap();
    (dir, broker)
}

async fn next_message(subscription: &mut switchboard_client::Subscription) -> Message {
    loop {
        let event = tokio::time::timeout(DEADLINE, subscription.next_event())
            .await
            .expect("delivered in time")
            .expect("stream open")
            .expect("an event");
        if let SubscriptionEvent::Message(message) = event {
            return message;
        }
    }
}

const BROKER: &str = "switchboard-e2e-broker";
const APP: &str = "e2e-app";

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_span_joins_the_publishers_trace_through_the_broker() {
    let collector = Collector::start().await;
    let (_dir, broker) = traced_broker(&collector);
    let (provider, _guard) = init_test_tracer(&collector.endpoint(), APP).unwrap();

    let client = Client::connect(broker.url()).await.unwrap();
    let mut subscription = client.subscribe("traced.>", Start::Latest).await.unwrap();
    let publisher = tracing::info_span!("publisher");
    let ack = client
        .publish(
            Publish::new("traced.order.placed", "{}")
                .correlation_id("6f1c3b7e-9a0d-4c2e-8b1a-2d3e4f5a6b7c"),
        )
        .instrument(publisher.clone())
        .await
        .unwrap();
    drop(publisher);
    let message = next_message(&mut subscription).await;
    assert!(
        !message.headers.contains_key("tracestate"),
        "no tracestate was sent, so none is delivered: {:?}",
        message.headers
    );
    drop(delivery_span(&message));
    provider.force_flush().unwrap();

    let spans = collector
        .wait_for(
            |spans| {
                [
                    ("publisher", APP),
                    ("publish traced.order.placed", APP),
                    ("process traced.order.placed", APP),
                    ("publish traced.order.placed", BROKER),
                    ("commit traced.order.placed", BROKER),
                    ("apply traced.order.placed", BROKER),
                    ("deliver traced.>", BROKER),
                ]
                .iter()
                .all(|(name, service)| named(spans, name, service).is_some())
            },
            DEADLINE,
        )
        .await
        .unwrap();
    let publisher = span(&spans, "publisher", APP);
    let send = span(&spans, "publish traced.order.placed", APP);
    let receive = span(&spans, "publish traced.order.placed", BROKER);
    let commit = span(&spans, "commit traced.order.placed", BROKER);
    let apply = span(&spans, "apply traced.order.placed", BROKER);
    let deliver = span(&spans, "deliver traced.>", BROKER);
    let process = span(&spans, "process traced.order.placed", APP);
    for span in [send, receive, commit, apply, deliver, process] {
        assert_eq!(
            span.trace_id, publisher.trace_id,
            "{span} is in the publisher's trace"
        );
    }
    assert!(
        send.is_child_of(publisher),
        "the client's send span under the app's"
    );
    assert!(
        receive.is_child_of(send),
        "the broker's publish under the send"
    );
    assert!(
        commit.is_child_of(receive),
        "commit under the broker's publish"
    );
    assert!(
        apply.is_child_of(receive),
        "apply under the broker's publish"
    );
    assert!(
        deliver.is_child_of(receive),
        "delivery under the broker's publish"
    );
    assert!(
        process.is_child_of(deliver),
        "processing under the delivery"
    );
    assert!(
        process.links_to(deliver),
        "processing links to the creation context"
    );

    let offset = ack.offset.to_string();
    assert_messaging(
        send,
        "SPAN_KIND_PRODUCER",
        &[
            ("messaging.operation.type", "send"),
            ("messaging.operation.name", "publish"),
            ("messaging.destination.name", "traced.order.placed"),
            ("messaging.message.id", &offset),
        ],
    );
    assert_messaging(
        receive,
        "SPAN_KIND_SERVER",
        &[
            ("messaging.operation.type", "send"),
            ("messaging.operation.name", "publish"),
            ("messaging.destination.name", "traced.order.placed"),
            ("messaging.message.id", &offset),
            (
                "messaging.message.conversation_id",
                "6f1c3b7e-9a0d-4c2e-8b1a-2d3e4f5a6b7c",
            ),
        ],
    );
    assert_eq!(receive.service_name, BROKER);
    assert_messaging(
        commit,
        "SPAN_KIND_INTERNAL",
        &[("messaging.destination.name", "traced.order.placed")],
    );
    assert_messaging(
        apply,
        "SPAN_KIND_INTERNAL",
        &[
            ("messaging.destination.name", "traced.order.placed"),
            ("messaging.message.id", &offset),
        ],
    );
    assert_messaging(
        deliver,
        "SPAN_KIND_PRODUCER",
        &[
            ("messaging.operation.type", "send"),
            ("messaging.operation.name", "deliver"),
            ("messaging.destination.name", "traced.order.placed"),
            ("messaging.destination.template", "traced.>"),
            ("messaging.message.id", &offset),
        ],
    );
    assert!(
        !deliver
            .attributes
            .contains_key("messaging.consumer.group.name"),
        "not a durable consumer: {:?}",
        deliver.attributes
    );
    assert_eq!(process.kind, "SPAN_KIND_CONSUMER");
    for (key, value) in [
        ("messaging.system", "switchboard"),
        ("messaging.operation.type", "process"),
        ("messaging.operation.name", "process"),
        ("messaging.destination.name", "traced.order.placed"),
        ("messaging.message.id", offset.as_str()),
        (
            "messaging.message.conversation_id",
            "6f1c3b7e-9a0d-4c2e-8b1a-2d3e4f5a6b7c",
        ),
    ] {
        assert_eq!(process.attribute(key), Some(value), "{key}: {process}");
    }
    // A single-message publish is no batch.
    for span in [send, receive, deliver, process] {
        assert!(!span
            .attributes
            .contains_key("messaging.batch.message_count"));
    }
}

/// The broker never delivers an empty `tracestate`, whatever the publisher sent, and passes a
/// real one on; a publisher's own creation context is kept by the client (its span, kind CLIENT,
/// links to it).
#[tokio::test(flavor = "multi_thread")]
async fn tracestate_is_delivered_only_when_there_is_one() {
    let collector = Collector::start().await;
    let (_dir, broker) = traced_broker(&collector);
    let (provider, _guard) = init_test_tracer(&collector.endpoint(), APP).unwrap();
    let client = Client::connect(broker.url()).await.unwrap();
    let mut subscription = client.subscribe("state.>", Start::Latest).await.unwrap();

    let explicit = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let cases: [(&str, HashMap<String, String>, Option<&str>); 3] = [
        ("state.none", HashMap::new(), None),
        (
            "state.empty",
            HashMap::from([
                ("traceparent".to_owned(), explicit.to_owned()),
                ("tracestate".to_owned(), String::new()),
            ]),
            None,
        ),
        (
            "state.vendor",
            HashMap::from([
                ("traceparent".to_owned(), explicit.to_owned()),
                ("tracestate".to_owned(), "vendor=1".to_owned()),
            ]),
            Some("vendor=1"),
        ),
    ];
    let app = tracing::info_span!("app");
    for (channel, headers, _) in &cases {
        client
            .publish(Publish::new(*channel, "{}").headers(headers.clone()))
            .instrument(app.clone())
            .await
            .unwrap();
    }
    drop(app);
    for (channel, _, tracestate) in &cases {
        let message = next_message(&mut subscription).await;
        assert_eq!(message.channel, *channel);
        assert!(message.headers.contains_key("traceparent"), "{message:?}");
        assert_eq!(
            message.headers.get("tracestate").map(String::as_str),
            *tracestate,
            "{channel}: {:?}",
            message.headers
        );
    }
    provider.force_flush().unwrap();
    let spans = collector
        .wait_for(
            |spans| named(spans, "publish state.vendor", BROKER).is_some(),
            DEADLINE,
        )
        .await
        .unwrap();
    // The caller's traceparent is the creation context: the client's span links to it.
    let send = span(&spans, "publish state.vendor", APP);
    assert_eq!(send.kind, "SPAN_KIND_CLIENT");
    assert!(
        send.links
            .iter()
            .any(|(trace, span)| trace == "0af7651916cd43dd8448eb211c80319c"
                && span == "b7ad6b7169203331"),
        "{send}: {:?}",
        send.links
    );
    // And the broker's span continues it.
    let receive = span(&spans, "publish state.vendor", BROKER);
    assert_eq!(receive.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(receive.parent_span_id.as_deref(), Some("b7ad6b7169203331"));
}

/// A durable consumer's deliveries and acknowledgements name its group; a history page is a batch
/// receive linking to each message's creation context.
#[tokio::test(flavor = "multi_thread")]
async fn durable_acks_settle_and_history_receives_a_batch() {
    let collector = Collector::start().await;
    let (_dir, broker) = traced_broker(&collector);
    let (provider, _guard) = init_test_tracer(&collector.endpoint(), APP).unwrap();
    let client = Client::connect(broker.url()).await.unwrap();
    let options = SubscribeOptions::default().durable("billing");
    let mut subscription = client
        .subscribe_with("billing.*", Start::Earliest, options)
        .await
        .unwrap();
    let app = tracing::info_span!("app");
    let mut offsets = Vec::new();
    for n in 0..3 {
        let ack = client
            .publish(Publish::new("billing.invoice", format!("{{\"n\":{n}}}")))
            .instrument(app.clone())
            .await
            .unwrap();
        offsets.push(ack.offset);
    }
    drop(app);
    let first = next_message(&mut subscription).await;
    subscription.ack(first.offset).await.unwrap();
    let second = next_message(&mut subscription).await;
    let third = next_message(&mut subscription).await;
    subscription
        .ack_many(&[second.offset, third.offset])
        .await
        .unwrap();

    let page = client
        .history(HistoryQuery::new("billing.*").from(Start::Earliest))
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 3);
    provider.force_flush().unwrap();

    let spans = collector
        .wait_for(
            |spans| {
                spans
                    .iter()
                    .filter(|s| s.name == "deliver billing.*" && s.service_name == BROKER)
                    .count()
                    >= 3
                    && spans
                        .iter()
                        .filter(|s| s.name == "ack billing.*" && s.service_name == APP)
                        .count()
                        >= 2
                    && named(spans, "receive billing.*", APP).is_some()
                    && spans
                        .iter()
                        .filter(|s| s.name == "publish billing.invoice" && s.service_name == BROKER)
                        .count()
                        >= 3
            },
            DEADLINE,
        )
        .await
        .unwrap();
    let deliver = span(&spans, "deliver billing.*", BROKER);
    assert_messaging(
        deliver,
        "SPAN_KIND_PRODUCER",
        &[
            ("messaging.consumer.group.name", "billing"),
            ("messaging.destination.template", "billing.*"),
            ("messaging.destination.name", "billing.invoice"),
        ],
    );
    let acks: Vec<&CollectedSpan> = spans
        .iter()
        .filter(|s| s.name == "ack billing.*" && s.service_name == APP)
        .collect();
    let single = acks
        .iter()
        .find(|s| s.attributes.contains_key("messaging.message.id"))
        .expect("the single ack");
    assert_messaging(
        single,
        "SPAN_KIND_CLIENT",
        &[
            ("messaging.operation.type", "settle"),
            ("messaging.operation.name", "ack"),
            ("messaging.consumer.group.name", "billing"),
            ("messaging.destination.template", "billing.*"),
            ("messaging.message.id", &first.offset.to_string()),
        ],
    );
    let batch = acks
        .iter()
        .find(|s| s.attributes.contains_key("messaging.batch.message_count"))
        .expect("the batch ack");
    assert_messaging(
        batch,
        "SPAN_KIND_CLIENT",
        &[
            ("messaging.operation.type", "settle"),
            ("messaging.batch.message_count", "2"),
        ],
    );
    assert!(!batch.attributes.contains_key("messaging.message.id"));

    let receive = span(&spans, "receive billing.*", APP);
    assert_messaging(
        receive,
        "SPAN_KIND_CLIENT",
        &[
            ("messaging.operation.type", "receive"),
            ("messaging.destination.template", "billing.*"),
            ("messaging.batch.message_count", "3"),
        ],
    );
    assert!(!receive.attributes.contains_key("messaging.message.id"));
    // Links, not a parent: one per message, to the context stored with it (the broker's publish
    // span of that message).
    let publishes: Vec<&CollectedSpan> = spans
        .iter()
        .filter(|s| s.name == "publish billing.invoice" && s.service_name == BROKER)
        .collect();
    assert_eq!(receive.links.len(), 3, "{:?}", receive.links);
    for publish in publishes {
        assert!(receive.links_to(publish), "{receive} links to {publish}");
    }
    assert_ne!(
        receive.trace_id, deliver.trace_id,
        "a history read is a trace of its own"
    );
    let _ = offsets;
}

/// `sb publish` with the standard OTEL_* variables exports its own spans, in the same trace as
/// the broker's, and prints the trace id.
#[tokio::test(flavor = "multi_thread")]
async fn sb_publish_starts_a_trace_and_prints_its_id() {
    let collector = Collector::start().await;
    let (_dir, broker) = traced_broker(&collector);
    let url = broker.url();
    let endpoint = collector.endpoint();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(sb_binary())
            .args(["publish", "cli.traced", r#"{"from":"sb"}"#])
            .env("SWITCHBOARD_URL", url)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_SERVICE_NAME", "sb-e2e")
            .env_remove("SB_OUTPUT")
            .env_remove("OTEL_SDK_DISABLED")
            .env_remove("OTEL_TRACES_EXPORTER")
            .stdin(Stdio::null())
            .output()
            .expect("sb runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "sb failed: {stderr}");
    let trace_id = stderr
        .lines()
        .find_map(|line| line.strip_prefix("sb: trace "))
        .unwrap_or_else(|| panic!("no trace id on stderr: {stderr}"))
        .trim()
        .to_owned();
    assert_eq!(trace_id.len(), 32, "{trace_id}");
    // The ack stays the only thing on stdout.
    let ack: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let offset = ack["offset"].as_u64().unwrap().to_string();

    // `sb` flushed before exiting; the broker exports every 100 ms.
    let spans = collector
        .wait_for(
            |spans| {
                named(spans, "sb publish", "sb-e2e").is_some()
                    && named(spans, "publish cli.traced", "sb-e2e").is_some()
                    && named(spans, "publish cli.traced", BROKER).is_some()
            },
            DEADLINE,
        )
        .await
        .unwrap();
    let root = span(&spans, "sb publish", "sb-e2e");
    let send = span(&spans, "publish cli.traced", "sb-e2e");
    let receive = span(&spans, "publish cli.traced", BROKER);
    assert_eq!(root.trace_id, trace_id);
    assert_eq!(root.parent_span_id, None, "sb starts the trace");
    assert_clean(root);
    assert!(send.is_child_of(root));
    assert!(receive.is_child_of(send));
    assert_messaging(
        send,
        "SPAN_KIND_PRODUCER",
        &[
            ("messaging.operation.type", "send"),
            ("messaging.destination.name", "cli.traced"),
            ("messaging.message.id", &offset),
        ],
    );
    // Only `sb`'s and the client's spans are exported, none of the transport's.
    assert!(
        spans
            .iter()
            .filter(|s| s.service_name == "sb-e2e")
            .all(|s| s.name == "sb publish" || s.name == "publish cli.traced"),
        "{spans:?}"
    );
}

/// Without OTEL_* variables `sb` prints no trace id and sends no trace context.
#[tokio::test(flavor = "multi_thread")]
async fn sb_publish_without_export_sends_no_trace_context() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"), &[]).unwrap();
    let client = Client::connect(broker.url()).await.unwrap();
    let mut subscription = client.subscribe("cli.plain", Start::Latest).await.unwrap();
    let url = broker.url();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(sb_binary())
            .args(["publish", "cli.plain", "{}"])
            .env("SWITCHBOARD_URL", url)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .output()
            .expect("sb runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "sb failed: {stderr}");
    assert!(!stderr.contains("sb: trace"), "{stderr}");
    let message = next_message(&mut subscription).await;
    assert!(
        !message.headers.contains_key("traceparent") && !message.headers.contains_key("tracestate"),
        "{:?}",
        message.headers
    );
}
