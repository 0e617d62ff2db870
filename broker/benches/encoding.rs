//! Message encoding on the hot paths: what a delivery costs to build and encode per subscriber
//! (and with the encoding shared by every subscriber), and what a group-committed batch costs to encode into the log and the store and to read back.
//!
//! Run: `cargo bench -p switchboard-broker --bench encoding`
//!
//! The messages look like the benchmark's (`bench/`): 1 KiB of payload, a channel of three
//! segments, a correlation id and a `traceparent` header; a batch holds 32 of them, about what one
//! group commit carries under W1.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prost::Message as _;
use switchboard_broker::bench_api::{checksum_encode, convert, encode_outgoing};
use switchboard_broker::bench_api::{Command, Item, NewMessage, Rules, StoredMessage};
use switchboard_broker::bench_api::{Delivery, Outgoing, SharedMessage};
use switchboard_broker::bench_api::{MessageStore, WriteBatch};
use switchboard_proto::v1 as pb;

/// Messages in one group-committed batch.
const BATCH: usize = 32;

fn stored(offset: u64) -> StoredMessage {
    let mut headers = BTreeMap::new();
    headers.insert(
        "traceparent".to_owned(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
    );
    StoredMessage {
        offset,
        publish_time_us: 1_764_000_000_000_000 + offset,
        message: NewMessage {
            channel: "bench.w3.events".to_owned(),
            payload: Bytes::from(vec![b'x'; 1024]),
            content_type: "application/json".to_owned(),
            schema_version: "1.0.0".to_owned(),
            correlation_id: "6f1c2a4e-8d5b-4c3a-9e7f-2b1d0c9a8e7f".to_owned(),
            causation_id: String::new(),
            idempotency_key: String::new(),
            ttl_ms: 0,
            headers,
            hops: 0,
        },
        chain: Vec::new(),
    }
}

fn batch() -> Vec<StoredMessage> {
    (1..=BATCH as u64).map(stored).collect()
}

/// One delivery as a subscription builds it: the protobuf message from the stored one, wrapped in
/// an event, encoded into the stream's buffer.
fn encode_delivery(message: &StoredMessage, buf: &mut BytesMut) {
    let event = pb::SubscribeEvent {
        event: Some(pb::subscribe_event::Event::Message(convert::message(
            message,
        ))),
    };
    event.encode(buf).unwrap_or_else(|e| panic!("{e}"));
}

/// One message delivered to 1 and to 100 subscribers: each delivery built and encoded on its own
/// (how deliveries were made before, and how History still encodes), against the subscription
/// path, which encodes the message once and appends each delivery's own fields.
fn delivery(c: &mut Criterion) {
    let message = Arc::new(stored(1));
    let mut group = c.benchmark_group("delivery");
    for subscribers in [1u64, 100] {
        group.throughput(Throughput::Elements(subscribers));
        group.bench_with_input(
            BenchmarkId::new("per_subscriber_encode", subscribers),
            &subscribers,
            |b, &n| {
                let mut buf = BytesMut::with_capacity(2048);
                b.iter(|| {
                    for _ in 0..n {
                        buf.clear();
                        encode_delivery(black_box(&message), &mut buf);
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("shared_encode", subscribers),
            &subscribers,
            |b, &n| {
                let mut buf = BytesMut::with_capacity(2048);
                b.iter(|| {
                    // What the hub does once per message, then each subscription per delivery.
                    let shared = SharedMessage::new(Arc::clone(black_box(&message)));
                    for id in 0..n {
                        buf.clear();
                        let delivery = Delivery::new(Arc::clone(&shared), 0, 0, id);
                        encode_outgoing(&Outgoing::Delivery(delivery), &mut buf)
                            .unwrap_or_else(|e| panic!("{e}"));
                    }
                })
            },
        );
    }
    group.finish();
}

/// A delivery decoded by a client, for scale: what every subscriber pays on its side.
fn delivery_decode(c: &mut Criterion) {
    let mut buf = BytesMut::new();
    encode_delivery(&stored(1), &mut buf);
    let encoded = buf.freeze();
    c.bench_function("delivery/decode", |b| {
        b.iter(|| pb::SubscribeEvent::decode(black_box(encoded.clone())))
    });
}

/// A batch of 32 messages: as a log entry's command (bincode, what the raft log stores), and as
/// the store's batch record (written through [`MessageStore::put_batch`], read through
/// [`MessageStore::batch`] from a real sled tree, so it follows whatever encoding the store uses).
fn stored_batch(c: &mut Criterion) {
    let messages = batch();
    let command = Command::Batch {
        stamped_at_us: 1,
        rules: Rules {
            dedup_window_us: 1,
            loop_window_us: 1,
            max_hops: 8,
            max_clock_skew_ms: 1,
        },
        items: messages
            .iter()
            .map(|m| Item::Publish(m.message.clone()))
            .collect(),
    };
    let mut group = c.benchmark_group("batch_32");
    group.throughput(Throughput::Elements(BATCH as u64));

    group.bench_function("log_command_encode", |b| {
        b.iter(|| bincode::serialize(black_box(&command)))
    });
    let encoded = bincode::serialize(&command).unwrap_or_else(|e| panic!("{e}"));
    group.bench_function("log_command_decode", |b| {
        b.iter(|| bincode::deserialize::<Command>(black_box(&encoded)))
    });

    // What apply encodes per batch; writing the body to its batch file is left out, so that
    // criterion's many iterations measure the encoding and do not fill the disk.
    group.bench_function("store_encode", |b| {
        b.iter(|| checksum_encode(black_box(&messages)))
    });

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = sled::Config::new()
        .path(dir.path())
        .open()
        .unwrap_or_else(|e| panic!("{e}"));
    let store =
        MessageStore::open(&db, &dir.path().join("batches")).unwrap_or_else(|e| panic!("{e}"));
    let mut writes = WriteBatch::default();
    store
        .put_batch(&mut writes, 1, &messages)
        .unwrap_or_else(|e| panic!("{e}"));
    store.apply(writes).unwrap_or_else(|e| panic!("{e}"));
    group.bench_function("store_read_decode", |b| {
        b.iter(|| store.batch(black_box(1)))
    });
    group.finish();
}

criterion_group!(benches, delivery, delivery_decode, stored_batch);
criterion_main!(benches);
