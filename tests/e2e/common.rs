//! Helpers shared by the scenarios.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use switchboard_client::{split_stream_ack, Client, Publish, Subscription};
use switchboard_e2e::{BrokerProcess, DEADLINE};
use switchboard_proto::v1::Message;
use tempfile::TempDir;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// A broker in a fresh folder, and a client connected to it.
pub struct Fixture {
    pub broker: BrokerProcess,
    pub client: Client,
    /// Kept so the folder lives as long as the fixture.
    pub _dir: TempDir,
}

pub async fn fixture(extra: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = BrokerProcess::start(&dir.path().join("data"), extra).expect("broker starts");
    let client = Client::connect(broker.url())
        .await
        .expect("client connects");
    Fixture {
        broker,
        client,
        _dir: dir,
    }
}

/// Reads `n` messages from a subscription, failing after the deadline.
pub async fn take(subscription: &mut Subscription, n: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(Ok(message))) => out.push(message),
            Ok(Some(Err(e))) => panic!("subscription failed after {} messages: {e}", out.len()),
            Ok(None) => panic!("subscription ended after {} of {n} messages", out.len()),
            Err(_) => panic!("timed out after {} of {n} messages", out.len()),
        }
    }
    out
}

/// Asserts that nothing more arrives within `quiet` — used only after the expected messages
/// and a later marker message have arrived, so it checks for extras, not for timing.
pub async fn assert_nothing_more(subscription: &mut Subscription, quiet: Duration) {
    if let Ok(Some(item)) = tokio::time::timeout(quiet, subscription.next()).await {
        panic!("unexpected extra item: {item:?}");
    }
}

pub fn offsets(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

pub fn payload_text(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

/// Sends `publishes` through one `PublishStream` and returns every answer as it came: the
/// sequence number and the ack or refusal.
pub async fn publish_stream_answers<P>(
    client: &Client,
    publishes: P,
) -> Vec<(
    u64,
    Result<switchboard_client::proto::PublishAck, switchboard_client::Error>,
)>
where
    P: IntoIterator<Item = Publish>,
    P::IntoIter: Send + 'static,
{
    let acks: Vec<_> = client
        .publish_stream(futures::stream::iter(publishes))
        .await
        .unwrap()
        .collect()
        .await;
    acks.into_iter()
        .map(|a| split_stream_ack(a.unwrap()))
        .collect()
}

/// Publishes `payloads` (JSON texts) on `channel` through one `PublishStream`; returns each
/// acknowledged offset with its payload, in the order sent.
pub async fn publish_stream_acked(
    client: &Client,
    channel: String,
    payloads: Vec<String>,
) -> Vec<(u64, String)> {
    let stream = payloads
        .clone()
        .into_iter()
        .map(move |payload| Publish::new(channel.clone(), payload));
    publish_stream_answers(client, stream)
        .await
        .into_iter()
        .zip(payloads)
        .map(|((_, answer), payload)| (answer.unwrap().offset, payload))
        .collect()
}

/// Merges what several publishers were acknowledged into offset → payload, asserting that each
/// publisher's offsets increase in the order it sent and that no offset was given twice.
pub fn merge_acked(per_publisher: Vec<Vec<(u64, String)>>) -> BTreeMap<u64, String> {
    let mut acked = BTreeMap::new();
    for acks in per_publisher {
        assert!(
            acks.windows(2).all(|w| w[0].0 < w[1].0),
            "a publisher's offsets increase in the order it sent"
        );
        for (offset, payload) in acks {
            assert!(
                acked.insert(offset, payload).is_none(),
                "offset {offset} given twice"
            );
        }
    }
    acked
}

/// Passes bodies through untouched, so a test can send bytes no generated client would.
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Default)]
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A raw gRPC client of the broker (the generated one), for what `switchboard-client` hides.
pub type Raw = switchboard_proto::v1::broker_client::BrokerClient<tonic::transport::Channel>;

/// Connects a [`Raw`] client to `url`, taking messages up to 64 MiB.
pub async fn raw(url: String) -> Raw {
    Raw::connect(url)
        .await
        .expect("connects")
        .max_decoding_message_size(64 << 20)
}

/// Publishes `payloads` (channel, JSON text) over one stream; returns their offsets.
pub async fn publish_all(raw: &mut Raw, payloads: Vec<(String, String)>) -> Vec<u64> {
    let n = payloads.len();
    let requests =
        payloads
            .into_iter()
            .map(|(channel, payload)| switchboard_proto::v1::PublishRequest {
                channel,
                payload: payload.into(),
                ..Default::default()
            });
    let mut acks = raw
        .publish_stream(futures::stream::iter(requests))
        .await
        .expect("stream opens")
        .into_inner();
    let mut offsets = Vec::with_capacity(n);
    while let Some(ack) = acks.message().await.expect("acks") {
        match ack.result {
            Some(switchboard_proto::v1::publish_stream_ack::Result::Ack(a)) => {
                offsets.push(a.offset)
            }
            other => panic!("refused: {other:?}"),
        }
    }
    assert_eq!(offsets.len(), n);
    offsets
}
