//! One trace from publisher through broker to subscriber, exported over OTLP to an in-process
//! collector.

use futures::StreamExt;
use switchboard_client::{delivery_span, Client, Publish, Start};
use switchboard_e2e::otlp::{init_test_tracer, CollectedSpan, Collector};
use switchboard_e2e::{BrokerProcess, DEADLINE};
use tracing::Instrument;

fn named<'a>(spans: &'a [CollectedSpan], name: &str) -> Option<&'a CollectedSpan> {
    spans.iter().find(|s| s.name == name)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_span_joins_the_publishers_trace_through_the_broker() {
    let collector = Collector::start().await;
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
        // Export the broker's batches quickly rather than every 5 s.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .unwrap();
    let (provider, _guard) = init_test_tracer(&collector.endpoint(), "e2e-app").unwrap();

    let client = Client::connect(broker.url()).await.unwrap();
    let mut subscription = client.subscribe("traced.>", Start::Latest).await.unwrap();
    let publisher = tracing::info_span!("publisher");
    client
        .publish(Publish::new("traced.order.placed", "{}"))
        .instrument(publisher.clone())
        .await
        .unwrap();
    drop(publisher);
    let message = tokio::time::timeout(DEADLINE, subscription.next())
        .await
        .expect("delivered in time")
        .expect("stream open")
        .expect("a message");
    drop(delivery_span(&message, "subscriber"));
    provider.force_flush().unwrap();

    let spans = collector
        .wait_for(
            |spans| {
                [
                    "publisher",
                    "subscriber",
                    "switchboard.receive",
                    "switchboard.deliver",
                ]
                .iter()
                .all(|n| named(spans, n).is_some())
            },
            DEADLINE,
        )
        .await
        .unwrap();
    let publisher = named(&spans, "publisher").unwrap();
    let receive = named(&spans, "switchboard.receive").unwrap();
    let deliver = named(&spans, "switchboard.deliver").unwrap();
    let subscriber = named(&spans, "subscriber").unwrap();
    for span in [receive, deliver, subscriber] {
        assert_eq!(
            span.trace_id, publisher.trace_id,
            "{span} is in the publisher's trace"
        );
    }
    assert!(
        receive.is_child_of(publisher),
        "broker receive under the publisher"
    );
    assert!(
        deliver.is_child_of(receive),
        "delivery under the broker's receive"
    );
    assert!(
        subscriber.is_child_of(deliver),
        "the subscriber's span under the delivery"
    );
    assert_eq!(receive.service_name, "switchboard-e2e-broker");
    // Commit and apply are recorded under the receive span too.
    let spans = collector
        .wait_for(
            |spans| {
                named(spans, "switchboard.commit").is_some()
                    && named(spans, "switchboard.apply").is_some()
            },
            DEADLINE,
        )
        .await
        .unwrap();
    assert!(named(&spans, "switchboard.commit")
        .unwrap()
        .is_child_of(receive));
    assert!(named(&spans, "switchboard.apply")
        .unwrap()
        .is_child_of(receive));
}
