//! Validation at the edge: each rule refused with its code and reason, nothing stored on refusal,
//! and a refused message in a stream does not end the stream.

use switchboard_client::{HistoryQuery, Publish, Reason, Start};

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
