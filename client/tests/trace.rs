//! Trace context on the wire: what `publish`, `publish_stream` and the `Publisher` send to a mock
//! broker (request metadata and message headers) under a span traced by `tracing-opentelemetry`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use switchboard_client::proto::{
    AckRequest, AckResponse, ConsumerInfo, DeleteConsumerRequest, DeleteConsumerResponse,
    GetConsumerRequest, HistoryRequest, HistoryResponse, ListConsumersRequest,
    ListConsumersResponse, ListSubscriptionsRequest, ListSubscriptionsResponse, PublishAck,
    PublishRequest, PublishStreamAck, SubscribeEvent, SubscribeRequest,
};
use switchboard_client::{Client, Publish};
use switchboard_proto::v1::broker_server::{Broker, BrokerServer};
use switchboard_proto::v1::{publish_stream_ack, InfoRequest, InfoResponse};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// One call as the mock saw it: the `traceparent` of its metadata, and each message's headers.
#[derive(Clone, Debug)]
struct Call {
    traceparent: Option<String>,
    headers: Vec<HashMap<String, String>>,
}

#[derive(Clone, Default)]
struct Mock {
    calls: Arc<Mutex<Vec<Call>>>,
}

fn traceparent_of<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get("traceparent")
        .map(|value| value.to_str().unwrap().to_owned())
}

#[tonic::async_trait]
impl Broker for Mock {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishAck>, Status> {
        let traceparent = traceparent_of(&request);
        let headers = vec![request.into_inner().headers];
        self.calls.lock().unwrap().push(Call {
            traceparent,
            headers,
        });
        Ok(Response::new(PublishAck {
            offset: 1,
            ..PublishAck::default()
        }))
    }

    type PublishStreamStream = ReceiverStream<Result<PublishStreamAck, Status>>;

    async fn publish_stream(
        &self,
        request: Request<tonic::Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let index = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                traceparent: traceparent_of(&request),
                headers: Vec::new(),
            });
            calls.len() - 1
        };
        let mut requests = request.into_inner();
        let calls = self.calls.clone();
        let (sender, receiver) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut sequence = 0;
            while let Some(Ok(request)) = requests.next().await {
                calls.lock().unwrap()[index].headers.push(request.headers);
                let ack = PublishStreamAck {
                    sequence,
                    result: Some(publish_stream_ack::Result::Ack(PublishAck::default())),
                };
                sequence += 1;
                if sender.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    type SubscribeStream = ReceiverStream<Result<SubscribeEvent, Status>>;

    async fn subscribe(
        &self,
        _request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("not in this mock"))
    }

    async fn history(
        &self,
        _request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        Err(Status::unimplemented("not in this mock"))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Err(Status::unimplemented("not in this mock"))
    }

    async fn ack(&self, _request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        Err(Status::unimplemented("not in this mock"))
    }

    async fn list_subscriptions(
        &self,
        _request: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        Err(Status::unimplemented("not in this mock"))
    }

    async fn list_consumers(
        &self,
        _request: Request<ListConsumersRequest>,
    ) -> Result<Response<ListConsumersResponse>, Status> {
        Err(Status::unimplemented("not in this mock"))
    }

    async fn get_consumer(
        &self,
        _request: Request<GetConsumerRequest>,
    ) -> Result<Response<ConsumerInfo>, Status> {
        Err(Status::unimplemented("not in this mock"))
    }

    async fn delete_consumer(
        &self,
        _request: Request<DeleteConsumerRequest>,
    ) -> Result<Response<DeleteConsumerResponse>, Status> {
        Err(Status::unimplemented("not in this mock"))
    }
}

/// Serves the mock on a free port and connects a client to it.
async fn start() -> (Mock, Client) {
    let mock = Mock::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = BrokerServer::new(mock.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
    });
    let client = Client::connect(format!("http://{addr}")).await.unwrap();
    (mock, client)
}

/// A `tracing` dispatcher that gives spans OpenTelemetry contexts (nothing is exported).
fn traced() -> (SdkTracerProvider, tracing::Dispatch) {
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    (provider, tracing::Dispatch::new(subscriber))
}

fn traceparent(context: &SpanContext) -> String {
    format!("00-{}-{}-01", context.trace_id(), context.span_id())
}

/// The trace id and the parent span id of a `traceparent` value.
fn ids(traceparent: &str) -> (&str, &str) {
    let mut parts = traceparent.split('-').skip(1);
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}

/// Asserts that `sent` is the context of a span made under `current`: the same trace, another
/// span (the client's `publish` or `create` span).
fn assert_child_context(sent: &str, current: &str) {
    let (trace, span) = ids(sent);
    assert_eq!(trace, ids(current).0, "{sent} in the trace of {current}");
    assert_ne!(span, ids(current).1, "{sent} is a span of its own");
    assert_eq!(span.len(), 16, "{sent}");
}

/// The tests of this file run one at a time. Each sets a thread-local `tracing` dispatcher
/// (`set_default`), and `tracing` caches whether a callsite is enabled process-wide: a span
/// callsite first met on a thread without the OpenTelemetry layer can be cached as disabled while
/// another test's thread, with the layer, meets it — its span then records nothing, and the
/// publish falls back to the current context (seen as a failure of the first test below only
/// when the three run in parallel). A process has one dispatcher in production, so this is the
/// tests' arrangement, not the client's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn publish_sends_the_context_of_its_span_in_metadata_and_headers() {
    let _serial = SERIAL.lock().await;
    let (_provider, dispatch) = traced();
    let _default = tracing::dispatcher::set_default(&dispatch);
    let (mock, client) = start().await;

    let span = tracing::info_span!("widget.save");
    let current = traceparent(span.context().span().span_context());
    client
        .publish(Publish::new("crm.contact.updated", "{}"))
        .instrument(span)
        .await
        .unwrap();

    // An explicit traceparent is kept; the metadata carries the call's span.
    let explicit = "00-11111111111111111111111111111111-2222222222222222-01";
    let span = tracing::info_span!("widget.forward");
    let forwarded = traceparent(span.context().span().span_context());
    client
        .publish(Publish::new("crm.contact.updated", "{}").header("traceparent", explicit))
        .instrument(span)
        .await
        .unwrap();

    // Outside any span the publish span starts a trace of its own.
    client
        .publish(Publish::new("crm.contact.updated", "{}").header("k", "v"))
        .await
        .unwrap();

    let calls = mock.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    let sent = calls[0].traceparent.clone().unwrap();
    assert_child_context(&sent, &current);
    assert_eq!(calls[0].headers[0]["traceparent"], sent);
    assert!(!calls[0].headers[0].contains_key("tracestate"));
    assert_child_context(calls[1].traceparent.as_deref().unwrap(), &forwarded);
    assert_eq!(calls[1].headers[0]["traceparent"], explicit);
    let own = calls[2].traceparent.clone().unwrap();
    assert_ne!(ids(&own).0, ids(&current).0);
    assert_eq!(calls[2].headers[0]["traceparent"], own);
    assert_eq!(calls[2].headers[0]["k"], "v");
}

#[tokio::test]
async fn a_publish_without_an_opentelemetry_layer_sends_no_context() {
    let _serial = SERIAL.lock().await;
    let (mock, client) = start().await;
    let span = tracing::info_span!("widget.save");
    client
        .publish(Publish::new("crm.contact.updated", "{}").header("k", "v"))
        .instrument(span)
        .await
        .unwrap();
    let calls = mock.calls.lock().unwrap().clone();
    assert_eq!(calls[0].traceparent, None);
    assert_eq!(
        calls[0].headers[0],
        HashMap::from([("k".to_owned(), "v".to_owned())])
    );
}

#[tokio::test]
async fn streams_carry_the_context_of_the_call_and_of_each_send() {
    let _serial = SERIAL.lock().await;
    let (_provider, dispatch) = traced();
    let _default = tracing::dispatcher::set_default(&dispatch);
    let (mock, client) = start().await;

    // publish_stream: the context of the call in the metadata, a `create` span under it for every
    // message without one of its own.
    let explicit = "00-11111111111111111111111111111111-2222222222222222-01";
    let span = tracing::info_span!("batch");
    let expected = traceparent(span.context().span().span_context());
    async {
        let messages = futures::stream::iter([
            Publish::new("a.b", "1"),
            Publish::new("a.b", "2").header("traceparent", explicit),
        ]);
        let acks: Vec<_> = client
            .publish_stream(messages)
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(acks.len(), 2);
    }
    .instrument(span)
    .await;

    // publisher: the metadata has the context of the call, each message that of a `create` span
    // under its send's.
    let opened = tracing::info_span!("open");
    let (publisher, mut acks) = opened.in_scope(|| client.publisher(4));
    let first = tracing::info_span!("first");
    let second = tracing::info_span!("second");
    let (opened, first_parent, second_parent) = (
        traceparent(opened.context().span().span_context()),
        traceparent(first.context().span().span_context()),
        traceparent(second.context().span().span_context()),
    );
    publisher
        .send(Publish::new("a.b", "1"))
        .instrument(first)
        .await
        .unwrap();
    publisher
        .send(Publish::new("a.b", "2"))
        .instrument(second)
        .await
        .unwrap();
    drop(publisher);
    let mut count = 0;
    while let Some(ack) = acks.next().await {
        ack.unwrap();
        count += 1;
    }
    assert_eq!(count, 2);

    let calls = mock.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].traceparent.as_deref(), Some(expected.as_str()));
    assert_child_context(&calls[0].headers[0]["traceparent"], &expected);
    assert_eq!(calls[0].headers[1]["traceparent"], explicit);
    assert_eq!(calls[1].traceparent.as_deref(), Some(opened.as_str()));
    assert_child_context(&calls[1].headers[0]["traceparent"], &first_parent);
    assert_child_context(&calls[1].headers[1]["traceparent"], &second_parent);
}
