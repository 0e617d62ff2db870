//! Validation at the edge: each rule refused with its code and reason, nothing stored on refusal,
//! and a refused message in a stream does not end the stream.

use switchboard_client::{HistoryQuery, Publish, Reason, Start};
use switchboard_e2e::{http_request, SseStream};
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_client::BrokerClient;
use switchboard_proto::v1::entities_client::EntitiesClient;
use tonic::Code;

use crate::common::*;

fn big_payload() -> Vec<u8> {
    let mut v = vec![b' '; 70_000];
    v[0] = b'1';
    v
}

#[tokio::test]
async fn each_rule_is_refused_with_its_reason_and_nothing_is_stored() {
    let f = fixture(&[]).await;
    let cases: Vec<(Publish, Reason)> = vec![
        (Publish::new("crm", "{}"), Reason::ChannelInvalid),
        (Publish::new("crm..updated", "{}"), Reason::ChannelInvalid),
        (
            Publish::new("crm.contact updated", "{}"),
            Reason::ChannelInvalid,
        ),
        (Publish::new("crm.*.updated", "{}"), Reason::ChannelInvalid),
        (
            Publish::new(format!("a.{}", "b".repeat(300)), "{}"),
            Reason::ChannelInvalid,
        ),
        (
            Publish::new("$state.contact.1", "{}"),
            Reason::ChannelReserved,
        ),
        (
            Publish::new("crm.contact.updated", big_payload()),
            Reason::PayloadTooLarge,
        ),
        (
            Publish::new("crm.contact.updated", "{oops"),
            Reason::PayloadNotJson,
        ),
        (
            Publish::new("crm.contact.updated", "{}").schema_version("v1"),
            Reason::SchemaVersionInvalid,
        ),
        (
            Publish::new("crm.contact.updated", "{}").correlation_id("not-a-uuid"),
            Reason::CorrelationIdInvalid,
        ),
        (
            Publish::new("crm.contact.updated", "{}").content_type("text"),
            Reason::ContentTypeInvalid,
        ),
        (
            Publish::new("crm.contact.updated", "{}").idempotency_key("k".repeat(300)),
            Reason::IdempotencyKeyInvalid,
        ),
        (
            Publish::new("crm.contact.updated", "{}").header("bad name", "x"),
            Reason::HeadersInvalid,
        ),
    ];
    for (publish, reason) in cases {
        let channel = publish.channel().to_owned();
        let err = f.client.publish(publish).await.expect_err(&channel);
        assert_eq!(err.code(), Code::InvalidArgument, "{channel}: {err}");
        assert_eq!(err.reason(), Some(reason), "{channel}: {err}");
        assert!(
            err.to_string()
                .starts_with(&format!("INVALID_ARGUMENT {reason}: ")),
            "{err}"
        );
    }
    // Bad patterns and starts are refused too.
    let Err(err) = f.client.subscribe("crm.>.x", Start::Latest).await else {
        panic!("a bad pattern is refused");
    };
    assert_eq!(err.reason(), Some(Reason::PatternInvalid));
    // The client library refuses `latest` for history itself; the broker must too, for clients
    // generated in other languages.
    let mut raw = switchboard_proto::v1::broker_client::BrokerClient::connect(f.broker.url())
        .await
        .unwrap();
    let status = raw
        .history(switchboard_proto::v1::HistoryRequest {
            pattern: "crm.>".into(),
            from: Some(Start::Latest.into()),
            ..Default::default()
        })
        .await
        .expect_err("latest is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        switchboard_client::Error::from(status).reason(),
        Some(Reason::StartInvalid)
    );

    // Nothing was stored: the log is empty and the next accepted message gets offset 1.
    let info = f.client.info().await.unwrap();
    assert_eq!((info.last_offset, info.stored_bytes), (0, 0));
    let ack = f
        .client
        .publish(Publish::new("crm.contact.updated", "{}"))
        .await
        .unwrap();
    assert_eq!(ack.offset, 1);
    // Non-JSON content types are not parsed.
    let ack = f
        .client
        .publish(
            Publish::new("files.blob.added", vec![0xff, 0x00])
                .content_type("application/octet-stream"),
        )
        .await
        .unwrap();
    assert_eq!(ack.offset, 2);
}

#[tokio::test]
async fn a_refused_message_in_a_stream_gets_its_own_refusal_and_the_stream_goes_on() {
    let f = fixture(&[]).await;
    let messages = vec![
        Publish::new("tele.widget.click", "{}"),
        Publish::new("tele..click", "{}"),
        Publish::new("tele.widget.click", "not json"),
        Publish::new("tele.widget.view", "{}"),
    ];
    let results = publish_stream_answers(&f.client, messages).await;
    assert_eq!(results.len(), 4);
    assert_eq!(
        results.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(results[0].1.as_ref().unwrap().offset, 1);
    assert_eq!(
        results[1].1.as_ref().unwrap_err().reason(),
        Some(Reason::ChannelInvalid)
    );
    assert_eq!(
        results[2].1.as_ref().unwrap_err().reason(),
        Some(Reason::PayloadNotJson)
    );
    assert_eq!(results[3].1.as_ref().unwrap().offset, 2);
    let page = f.client.history(HistoryQuery::new(">")).await.unwrap();
    assert_eq!(offsets(&page.messages), vec![1, 2]);
}

/// The code and reason a refused call carries, the reason as sent on the wire.
fn refusal(status: tonic::Status) -> (Code, String) {
    let error = switchboard_client::Error::from(status);
    (error.code(), error.reason_str().unwrap_or("").to_owned())
}

fn subscribe_request(pattern: &str, start: Option<Start>) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        pattern: pattern.into(),
        start: start.map(Into::into),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_pattern_of_one_segment_matches_nothing_and_is_refused_on_every_route() {
    let f = fixture(&[]).await;
    let url = f.broker.url();
    let mut raw = BrokerClient::connect(url.clone()).await.unwrap();
    let mut entities = EntitiesClient::connect(url).await.unwrap();
    let invalid = (Code::InvalidArgument, "PATTERN_INVALID".to_owned());

    // Channels have at least two segments, so `orders` or `*` could never deliver anything.
    for pattern in ["orders", "*", "$state"] {
        let status = raw
            .subscribe(subscribe_request(pattern, None))
            .await
            .expect_err(pattern);
        assert_eq!(refusal(status), invalid, "Subscribe {pattern:?}");
        let durable = pb::SubscribeRequest {
            durable_name: "one-segment".into(),
            ..subscribe_request(pattern, None)
        };
        let status = raw.subscribe(durable).await.expect_err(pattern);
        assert_eq!(refusal(status), invalid, "durable Subscribe {pattern:?}");
        let status = raw
            .history(pb::HistoryRequest {
                pattern: pattern.into(),
                ..Default::default()
            })
            .await
            .expect_err(pattern);
        assert_eq!(refusal(status), invalid, "History {pattern:?}");
        let sse = http_request(
            "GET",
            &format!(
                "http://{}/v1/subscribe?pattern={}",
                f.broker.addr,
                pattern.replace('$', "%24").replace('*', "%2A")
            ),
            &[],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(sse.status, 400, "SSE {pattern:?}: {sse:?}");
        assert!(sse.body.contains("\"PATTERN_INVALID\""), "{sse:?}");
    }
    // A watch's pattern is over `type.id`: one segment names no entity either.
    for pattern in ["contact", "*"] {
        let status = entities
            .watch_entities(pb::WatchEntitiesRequest {
                pattern: pattern.into(),
                ..Default::default()
            })
            .await
            .expect_err(pattern);
        assert_eq!(refusal(status), invalid, "WatchEntities {pattern:?}");
    }
    assert!(raw
        .list_consumers(pb::ListConsumersRequest {})
        .await
        .unwrap()
        .into_inner()
        .consumers
        .is_empty());

    // `>` alone is every channel, and stays allowed.
    let mut all = f.client.subscribe(">", Start::Latest).await.unwrap();
    let ack = f
        .client
        .publish(Publish::new("orders.created", "{}"))
        .await
        .unwrap();
    assert_eq!(offsets(&take(&mut all, 1).await), vec![ack.offset]);
    entities
        .watch_entities(pb::WatchEntitiesRequest {
            pattern: ">".into(),
            ..Default::default()
        })
        .await
        .expect("a watch of every entity");
}

#[tokio::test]
async fn a_start_beyond_the_next_offset_is_refused_and_the_next_offset_waits() {
    let f = fixture(&[]).await;
    let mut raw = BrokerClient::connect(f.broker.url()).await.unwrap();
    for _ in 0..3 {
        f.client
            .publish(Publish::new("orders.created", "{}"))
            .await
            .unwrap();
    }
    let next = f.client.info().await.unwrap().last_offset + 1;
    let beyond = (Code::OutOfRange, "START_BEYOND_END".to_owned());

    for start in [next + 1, u64::MAX] {
        let status = raw
            .subscribe(subscribe_request("orders.>", Some(Start::Offset(start))))
            .await
            .expect_err("a start beyond the end");
        assert_eq!(refusal(status), beyond, "start {start}");
    }
    // A durable consumer is not created from such a start.
    let durable = pb::SubscribeRequest {
        durable_name: "from-the-future".into(),
        ..subscribe_request("orders.>", Some(Start::Offset(next + 1_000)))
    };
    assert_eq!(refusal(raw.subscribe(durable).await.unwrap_err()), beyond);
    assert!(raw
        .list_consumers(pb::ListConsumersRequest {})
        .await
        .unwrap()
        .into_inner()
        .consumers
        .is_empty());
    // EventSource's `Last-Event-ID` resumes after the id it names: the same rule.
    let sse = SseStream::open(
        &format!("http://{}/v1/subscribe?pattern=orders.%3E", f.broker.addr),
        &[("Last-Event-ID", &u64::MAX.to_string())],
    )
    .await
    .unwrap();
    assert_eq!(sse.status, 400);
    let sse = http_request(
        "GET",
        &format!(
            "http://{}/v1/subscribe?pattern=orders.%3E&last_event_id={next}",
            f.broker.addr
        ),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(sse.status, 400, "{sse:?}");
    assert!(sse.body.contains("\"START_BEYOND_END\""), "{sse:?}");

    // The next offset itself is the live tail: it waits for the next message.
    let mut at_next = f
        .client
        .subscribe("orders.>", Start::Offset(next))
        .await
        .unwrap();
    let ack = f
        .client
        .publish(Publish::new("orders.created", "{}"))
        .await
        .unwrap();
    assert_eq!(ack.offset, next);
    assert_eq!(offsets(&take(&mut at_next, 1).await), vec![next]);
}

/// JSON is checked alike wherever it enters: a publish over gRPC, a publish through the browser
/// gateway, entity fields over gRPC and through a gateway `PATCH`. Each refuses text that is not
/// UTF-8 (RFC 8259 §8.1), nesting deeper than 64, and a number beyond a double's range, and
/// accepts what is just inside those bounds.
#[tokio::test]
async fn json_is_checked_alike_on_every_route() {
    use switchboard_proto::v1 as pb;
    use tonic_types::StatusExt;

    let f = fixture(&[]).await;
    let gateway = format!("http://{}", f.broker.addr);
    let channel = tonic::transport::Channel::from_shared(f.broker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut broker = pb::broker_client::BrokerClient::new(channel.clone());
    let mut entities = pb::entities_client::EntitiesClient::new(channel);
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let refused: Vec<(&str, Vec<u8>)> = vec![
        ("not UTF-8", b"{\"s\":\"\xff\"}".to_vec()),
        ("65 deep", format!("{{\"a\":{}}}", nested(64)).into_bytes()),
        ("out of range", br#"{"n":1e400}"#.to_vec()),
    ];
    let accepted: Vec<(&str, Vec<u8>)> = vec![
        ("64 deep", format!("{{\"a\":{}}}", nested(63)).into_bytes()),
        (
            "a large integer",
            br#"{"n":123456789012345678901234567890}"#.to_vec(),
        ),
    ];
    let reason = |status: &tonic::Status| status.get_details_error_info().unwrap().reason;

    for (i, (case, json)) in refused.iter().chain(&accepted).enumerate() {
        let ok = i >= refused.len();
        let grpc_publish = broker
            .publish(pb::PublishRequest {
                channel: "json.grpc".into(),
                payload: json.clone().into(),
                ..Default::default()
            })
            .await;
        match &grpc_publish {
            Ok(_) => assert!(ok, "gRPC publish, {case}: accepted"),
            Err(status) => {
                assert!(!ok, "gRPC publish, {case}: {status:?}");
                assert_eq!(status.code(), Code::InvalidArgument, "{case}");
                assert_eq!(reason(status), "PAYLOAD_NOT_JSON", "gRPC publish, {case}");
            }
        }

        // The gateway's body holds the payload: text that is not UTF-8 spoils the body itself.
        let mut body = br#"{"channel":"json.http","payload":"#.to_vec();
        body.extend_from_slice(json);
        body.push(b'}');
        let http_publish =
            switchboard_e2e::http_request("POST", &format!("{gateway}/v1/publish"), &[], &body)
                .await
                .unwrap();
        let expected = match (ok, *case) {
            (true, _) => None,
            (false, "not UTF-8") => Some("BODY_MALFORMED"),
            (false, _) => Some("PAYLOAD_NOT_JSON"),
        };
        assert_http(&http_publish, expected, &format!("gateway publish, {case}"));

        let grpc_update = entities
            .update_entity(pb::UpdateEntityRequest {
                key: Some(pb::EntityKey {
                    r#type: "doc".into(),
                    id: format!("g{i}"),
                }),
                fields: json.clone().into(),
                stamp: Some(pb::WriteStamp {
                    timestamp_ms: 0,
                    version: 0,
                    writer: "test".into(),
                }),
                expected_version: None,
            })
            .await;
        match &grpc_update {
            Ok(_) => assert!(ok, "gRPC entity update, {case}: accepted"),
            Err(status) => {
                assert!(!ok, "gRPC entity update, {case}: {status:?}");
                assert_eq!(status.code(), Code::InvalidArgument, "{case}");
                assert_eq!(
                    reason(status),
                    "ENTITY_FIELDS_INVALID",
                    "entity update, {case}"
                );
            }
        }

        let http_update = switchboard_e2e::http_request(
            "PATCH",
            &format!("{gateway}/v1/entities/doc/h{i}"),
            &[],
            json,
        )
        .await
        .unwrap();
        let expected = (!ok).then_some("ENTITY_FIELDS_INVALID");
        assert_http(&http_update, expected, &format!("gateway PATCH, {case}"));
    }
}

fn assert_http(response: &switchboard_e2e::HttpResponse, refused: Option<&str>, what: &str) {
    match refused {
        None => assert_eq!(response.status, 200, "{what}: {response:?}"),
        Some(reason) => {
            assert_eq!(response.status, 400, "{what}: {response:?}");
            let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
            assert_eq!(
                body["reason"],
                serde_json::json!(reason),
                "{what}: {response:?}"
            );
        }
    }
}
