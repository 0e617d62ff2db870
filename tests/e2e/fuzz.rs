//! The edge against hostile input: arbitrary bytes, and arbitrary protobuf field soups, sent as the
//! body of every method of every public service. Whatever arrives, the broker answers each call
//! with a response or a status (never a hang or a crash), and still serves afterwards.
//!
//! Bounded in CI (`SWITCHBOARD_FUZZ_CASES`, 300 by default); for a longer run by hand:
//! `SWITCHBOARD_FUZZ_CASES=20000 cargo test -p switchboard-e2e --test e2e fuzz -- --nocapture`
//! (docs/SECURITY.md).

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use switchboard_e2e::BrokerProcess;
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;
use tonic::Status;

use crate::common::RawCodec;

/// How a method is called.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Unary,
    ServerStream,
    BidiStream,
}

const METHODS: &[(&str, Shape)] = &[
    ("/switchboard.v1.Broker/Publish", Shape::Unary),
    ("/switchboard.v1.Broker/PublishStream", Shape::BidiStream),
    ("/switchboard.v1.Broker/Subscribe", Shape::ServerStream),
    ("/switchboard.v1.Broker/History", Shape::Unary),
    ("/switchboard.v1.Broker/Info", Shape::Unary),
    ("/switchboard.v1.Broker/Ack", Shape::Unary),
    ("/switchboard.v1.Broker/ListSubscriptions", Shape::Unary),
    ("/switchboard.v1.Broker/ListConsumers", Shape::Unary),
    ("/switchboard.v1.Broker/GetConsumer", Shape::Unary),
    ("/switchboard.v1.Broker/DeleteConsumer", Shape::Unary),
    ("/switchboard.v1.Entities/UpdateEntity", Shape::Unary),
    ("/switchboard.v1.Entities/DeleteEntity", Shape::Unary),
    ("/switchboard.v1.Entities/GetEntity", Shape::Unary),
    (
        "/switchboard.v1.Entities/WatchEntities",
        Shape::ServerStream,
    ),
    ("/switchboard.v1.Auth/IssueToken", Shape::Unary),
];

/// One protobuf field with an arbitrary number and value of an arbitrary wire type.
fn field() -> impl Strategy<Value = Vec<u8>> {
    let number = 1u32..24;
    let value = prop_oneof![
        any::<u64>().prop_map(|v| (0u8, varint(v))),
        any::<[u8; 8]>().prop_map(|v| (1u8, v.to_vec())),
        // Length-delimited: arbitrary bytes, text in the channel grammar's alphabet, or a nested
        // soup (a message inside a message).
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| (2u8, delimited(&v))),
        "[a-z0-9.*>$_ -]{0,40}".prop_map(|s| (2u8, delimited(s.as_bytes()))),
        proptest::collection::vec(
            (1u32..12, any::<u64>())
                .prop_map(|(n, v)| [varint(u64::from(n << 3)), varint(v)].concat()),
            0..6
        )
        .prop_map(|fields| (2u8, delimited(&fields.concat()))),
        any::<[u8; 4]>().prop_map(|v| (5u8, v.to_vec())),
    ];
    (number, value).prop_map(|(number, (wire, bytes))| {
        let mut out = varint(u64::from(number << 3 | u32::from(wire)));
        out.extend(bytes);
        out
    })
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn delimited(bytes: &[u8]) -> Vec<u8> {
    let mut out = varint(bytes.len() as u64);
    out.extend_from_slice(bytes);
    out
}

/// A body: raw bytes, or a soup of plausible fields.
fn body() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256).prop_map(Bytes::from),
        proptest::collection::vec(field(), 0..12).prop_map(|fields| Bytes::from(fields.concat())),
    ]
}

/// Longest wait for one call's first answer; a hang fails the run.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// The answer to one call: `Ok` for a response (or a stream's first event), else the status code.
type Answer = Result<(), tonic::Code>;

/// Sends `bodies` to `method`; `None` if it did not answer within [`CALL_DEADLINE`].
async fn call(
    channel: Channel,
    method: &'static str,
    shape: Shape,
    bodies: Vec<Bytes>,
) -> Option<Answer> {
    let mut grpc = tonic::client::Grpc::new(channel);
    tokio::time::timeout(CALL_DEADLINE, async {
        grpc.ready().await.map_err(|_| tonic::Code::Unavailable)?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        let first = bodies.first().cloned().unwrap_or_default();
        let code = |status: Status| status.code();
        match shape {
            Shape::Unary => grpc
                .unary(tonic::Request::new(first), path, RawCodec)
                .await
                .map(drop)
                .map_err(code),
            Shape::ServerStream => {
                let mut events = grpc
                    .server_streaming(tonic::Request::new(first), path, RawCodec)
                    .await
                    .map_err(code)?
                    .into_inner();
                // The first event (or the end) is the answer; a live stream is dropped after.
                events.message().await.map(drop).map_err(code)
            }
            Shape::BidiStream => {
                let requests = futures::stream::iter(bodies);
                let mut acks = grpc
                    .streaming(tonic::Request::new(requests), path, RawCodec)
                    .await
                    .map_err(code)?
                    .into_inner();
                while acks.message().await.map_err(code)?.is_some() {}
                Ok(())
            }
        }
    })
    .await
    .ok()
}

fn cases() -> u32 {
    std::env::var("SWITCHBOARD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[test]
fn arbitrary_bodies_on_every_method_get_an_answer_and_never_crash_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"), &[]).expect("broker starts");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let channel = runtime.block_on(async {
        Channel::from_shared(broker.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    });

    let strategy = (0..METHODS.len(), proptest::collection::vec(body(), 1..4));
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let answers = std::cell::RefCell::new(std::collections::BTreeMap::<String, u32>::new());
    let result = runner.run(&strategy, |(method, bodies)| {
        let (name, shape) = METHODS[method];
        let answer = runtime.block_on(call(channel.clone(), name, shape, bodies));
        prop_assert!(
            answer.is_some(),
            "{name} did not answer within {CALL_DEADLINE:?}"
        );
        let key = match answer {
            Some(Ok(())) => "OK".to_owned(),
            Some(Err(code)) => switchboard_proto::code_name(code).to_owned(),
            None => unreachable!(),
        };
        *answers.borrow_mut().entry(key).or_default() += 1;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\nbroker log:\n{}", broker.log());
    }
    let answers = answers.into_inner();
    println!("answers by code: {answers:?}");
    // The run reached the handlers: some bodies decoded into requests that were served, and some
    // were refused for their content, not only for failing to decode.
    assert!(answers.contains_key("OK"), "{answers:?}");
    assert!(answers.contains_key("INVALID_ARGUMENT"), "{answers:?}");
    assert!(
        !answers.contains_key("UNAVAILABLE"),
        "the connection broke during the run: {answers:?}"
    );

    // Still serving, and nothing in its log says a task panicked.
    runtime.block_on(async {
        let mut raw = BrokerClient::new(channel);
        raw.info(pb::InfoRequest {})
            .await
            .expect("the broker still answers after the run");
    });
    let log = broker.log();
    assert!(!log.contains("panicked"), "a task panicked:\n{log}");
}
