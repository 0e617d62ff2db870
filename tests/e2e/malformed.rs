//! Calls whose shape is wrong before any rule of the request applies: bodies that are not
//! protobuf, unary calls carrying two messages, metadata over the limit. Each gets
//! INVALID_ARGUMENT with its reason (docs/ERRORS.md), nothing is written, and only that call is
//! refused: the connection's other calls go on.

use bytes::Bytes;
use prost::Message as _;
use switchboard_e2e::DEADLINE;
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_client::BrokerClient;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::common::*;

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

async fn connect(f: &Fixture) -> Channel {
    Channel::from_shared(f.broker.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sends `bodies` as the request messages of a call to `path`, which the client sends as a
/// stream whatever the method's shape; the first response message or the status is the answer.
async fn call_raw(channel: Channel, path: &'static str, bodies: Vec<Bytes>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut responses = grpc
        .streaming(
            tonic::Request::new(futures::stream::iter(bodies)),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?
        .into_inner();
    responses.message().await.map(drop)
}

async fn stored_on(channel: Channel, pattern: &str) -> usize {
    BrokerClient::new(channel)
        .history(pb::HistoryRequest {
            pattern: pattern.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages
        .len()
}

fn publish(channel: &str, payload: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        channel: channel.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_body_that_is_not_protobuf_is_invalid_argument_with_a_reason() {
    let f = fixture(&[]).await;
    let channel = connect(&f).await;
    // Field 1 (the channel, a string) claims 5 bytes and has 1; then field 1 as invalid UTF-8.
    let truncated = Bytes::from_static(&[0x0a, 0x05, b'a']);
    let not_utf8 = Bytes::from_static(&[0x0a, 0x02, 0xff, 0xfe]);
    let paths = [
        "/switchboard.v1.Broker/Publish",
        "/switchboard.v1.Broker/PublishStream",
        "/switchboard.v1.Broker/Subscribe",
        "/switchboard.v1.Broker/History",
        "/switchboard.v1.Entities/UpdateEntity",
        "/switchboard.v1.Auth/IssueToken",
    ];
    for path in paths {
        for body in [&truncated, &not_utf8] {
            let status = call_raw(channel.clone(), path, vec![body.clone()])
                .await
                .expect_err(path);
            assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
            assert_eq!(reason(&status), "MALFORMED_REQUEST", "{path}: {status:?}");
        }
    }
}

#[tokio::test]
async fn a_unary_call_with_two_messages_is_refused_and_stores_nothing() {
    let f = fixture(&[]).await;
    let channel = connect(&f).await;
    let path = "/switchboard.v1.Broker/Publish";
    let first = Bytes::from(publish("twice.sent", "1").encode_to_vec());
    let second = Bytes::from(publish("twice.sent", "2").encode_to_vec());

    let status = call_raw(channel.clone(), path, vec![first.clone(), second])
        .await
        .expect_err("two messages on a unary call");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "MALFORMED_REQUEST", "{status:?}");
    assert_eq!(stored_on(channel.clone(), "twice.>").await, 0);

    // One message, framed the same way, is a publish like any other.
    call_raw(channel.clone(), path, vec![first])
        .await
        .expect("one message");
    assert_eq!(stored_on(channel, "twice.>").await, 1);
}

#[tokio::test]
async fn metadata_over_the_limit_refuses_that_call_and_the_connection_goes_on() {
    let f = fixture(&[]).await;
    let channel = connect(&f).await;
    let mut broker = BrokerClient::new(channel);
    // A stream on the same connection, which a GOAWAY would end.
    let mut events = broker
        .subscribe(pb::SubscribeRequest {
            pattern: "meta.>".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    events.message().await.unwrap().expect("subscribed");

    // Over the 16 KiB default, up to well past it: the 40 KiB set spans several HTTP/2 frames.
    for kib in [20, 40] {
        let mut request = tonic::Request::new(publish("meta.big", "1"));
        for i in 0..kib {
            request.metadata_mut().insert(
                MetadataKey::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap(),
                MetadataValue::try_from("a".repeat(1000)).unwrap(),
            );
        }
        let status = broker
            .publish(request)
            .await
            .expect_err("metadata too large");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{kib} KiB: {status:?}"
        );
        assert_eq!(
            reason(&status),
            "METADATA_TOO_LARGE",
            "{kib} KiB: {status:?}"
        );
    }

    broker.publish(publish("meta.fine", "2")).await.unwrap();
    let event = tokio::time::timeout(DEADLINE, events.message())
        .await
        .expect("the subscription answers")
        .expect("the subscription is still open")
        .expect("an event");
    match event.event {
        Some(pb::subscribe_event::Event::Message(message)) => {
            assert_eq!(message.channel, "meta.fine");
        }
        other => panic!("expected the message, got {other:?}"),
    }
}
