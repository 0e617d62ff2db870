//! Several messages per `SubscribeEvent` (`SubscribeRequest.max_batch`, `SubscribeEvent.batch`),
//! through the raw gRPC contract and through the client: every message exactly once and in
//! order across batches, gaps between batches, credits counting messages, and single messages for
//! a subscriber that did not ask.

use switchboard_client::{Start, SubscribeOptions};
use switchboard_e2e::DEADLINE;
use switchboard_proto::v1 as pb;

use crate::common::*;

type Events = tonic::Streaming<pb::SubscribeEvent>;

/// What a subscriber got, unpacked: a message, or a gap.
#[derive(Debug)]
// Nearly every item is a message: boxing it would cost an allocation each for nothing.
#[allow(clippy::large_enum_variant)]
enum Got {
    Message(pb::Message),
    Gap(pb::Gap),
}

/// What the events read so far carried, and how they came.
#[derive(Default)]
struct Received {
    got: Vec<Got>,
    /// The size of every batch event.
    batches: Vec<usize>,
    /// Messages that came in a `message` event of their own.
    singles: usize,
}

impl Received {
    /// Offsets of the messages, in the order they came.
    fn offsets(&self) -> Vec<u64> {
        self.got
            .iter()
            .filter_map(|g| match g {
                Got::Message(m) => Some(m.offset),
                Got::Gap(_) => None,
            })
            .collect()
    }

    fn messages(&self) -> usize {
        self.offsets().len()
    }

    /// The highest offset the messages and gaps so far account for.
    fn last_offset(&self) -> u64 {
        match self.got.last() {
            Some(Got::Message(m)) => m.offset,
            Some(Got::Gap(g)) => g.to_offset,
            None => 0,
        }
    }

    /// Reads one event and unpacks it.
    async fn read(&mut self, events: &mut Events) {
        let event = match tokio::time::timeout(DEADLINE, events.message()).await {
            Ok(Ok(Some(pb::SubscribeEvent { event: Some(event) }))) => event,
            other => panic!(
                "expected an event after {} messages, got {other:?}",
                self.messages()
            ),
        };
        match event {
            pb::subscribe_event::Event::Message(m) => {
                self.singles += 1;
                self.got.push(Got::Message(m));
            }
            pb::subscribe_event::Event::Batch(batch) => {
                assert!(batch.messages.len() >= 2, "a batch of one: {batch:?}");
                self.batches.push(batch.messages.len());
                self.got
                    .extend(batch.messages.into_iter().map(Got::Message));
            }
            pb::subscribe_event::Event::Gap(g) => self.got.push(Got::Gap(g)),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Reads until the messages and gaps account for everything up to `last`.
    async fn read_through(&mut self, events: &mut Events, last: u64) {
        while self.last_offset() < last {
            self.read(events).await;
        }
    }
}

fn request(
    pattern: &str,
    max_batch: u32,
    start: Option<pb::StartPosition>,
) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        pattern: pattern.into(),
        start,
        max_batch,
        ..Default::default()
    }
}

fn earliest() -> Option<pb::StartPosition> {
    Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Earliest(pb::Earliest {})),
    })
}

async fn open(raw: &mut Raw, request: pb::SubscribeRequest) -> (Events, pb::Subscribed) {
    let mut events = raw
        .subscribe(request)
        .await
        .expect("subscribes")
        .into_inner();
    match tokio::time::timeout(DEADLINE, events.message()).await {
        Ok(Ok(Some(pb::SubscribeEvent {
            event: Some(pb::subscribe_event::Event::Subscribed(s)),
        }))) => (events, s),
        other => panic!("expected Subscribed, got {other:?}"),
    }
}

/// Publishes `count` messages on `channel` (payloads `{"v":i,...}` of about `pad` bytes) over
/// one stream; returns their offsets.
async fn publish(raw: &mut Raw, channel: &str, count: usize, pad: usize) -> Vec<u64> {
    let payloads = (0..count)
        .map(|i| {
            let payload = format!("{{\"v\":{i},\"pad\":\"{}\"}}", "x".repeat(pad));
            (channel.to_owned(), payload)
        })
        .collect();
    publish_all(raw, payloads).await
}

#[tokio::test]
async fn a_subscriber_asking_for_batches_catches_up_in_batches_with_every_message_once_in_order() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    let offsets = publish(&mut client, "batch.a", 3_000, 10).await;

    let (mut events, _) = open(&mut client, request("batch.>", 100, earliest())).await;
    let mut received = Received::default();
    received
        .read_through(&mut events, *offsets.last().unwrap())
        .await;
    assert_eq!(received.offsets(), offsets, "every message once, in order");
    // Caught up from the store a page at a time: ready together, so packed.
    assert!(
        !received.batches.is_empty(),
        "no batch in 3,000 messages read from the store"
    );
    assert!(
        received.batches.iter().all(|n| *n <= 100),
        "batches within max_batch: {:?}",
        received.batches
    );

    // Then live: what is published after catching up comes too, still once and in order.
    let live = publish(&mut client, "batch.b", 2_000, 10).await;
    let mut received = Received::default();
    received
        .read_through(&mut events, *live.last().unwrap())
        .await;
    assert_eq!(received.offsets(), live);
}

#[tokio::test]
async fn a_subscriber_not_asking_for_batches_gets_one_message_per_event() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    let offsets = publish(&mut client, "single.a", 2_000, 10).await;
    for max_batch in [0, 1] {
        let (mut events, _) = open(&mut client, request("single.>", max_batch, earliest())).await;
        let mut received = Received::default();
        received
            .read_through(&mut events, *offsets.last().unwrap())
            .await;
        assert_eq!(received.offsets(), offsets, "max_batch {max_batch}");
        assert!(received.batches.is_empty(), "max_batch {max_batch}");
        assert_eq!(received.singles, offsets.len());
    }
}

#[tokio::test]
async fn a_slow_subscriber_asking_for_batches_gets_everything_in_order_after_falling_behind() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    // Opened, then not read at all while 20,000 messages of about 1 KiB are published: more than
    // its mailbox and the transport hold, so the broker serves it from the store afterwards.
    let (mut slow, sub) = open(&mut client, request("slow.>", 256, None)).await;
    let offsets = publish(&mut client, "slow.x", 20_000, 1_000).await;

    let mut received = Received::default();
    received
        .read_through(&mut slow, *offsets.last().unwrap())
        .await;
    assert_eq!(received.offsets(), offsets, "every message once, in order");
    assert!(!received.batches.is_empty(), "behind, it got batches");
    assert!(received.batches.iter().all(|n| *n <= 256));

    let info = client
        .list_subscriptions(pb::ListSubscriptionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .subscriptions
        .into_iter()
        .find(|s| s.subscription_id == sub.subscription_id)
        .expect("listed");
    assert!(info.slow_switches >= 1, "it fell behind: {info:?}");
    assert_eq!(info.delivered, offsets.len() as u64, "{info:?}");
}

#[tokio::test]
async fn a_drop_oldest_subscriber_with_batches_sees_gaps_between_batches_and_the_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flow.toml");
    std::fs::write(&config, "[subscriptions]\nqueue_depth = 4\n").unwrap();
    let f = fixture(&["--config", config.to_str().unwrap()]).await;
    let mut client = raw(f.broker.url()).await;
    let mut subscribe = request("drop.>", 64, None);
    subscribe.policy = pb::FlowPolicy::DropOldest as i32;
    subscribe.window = 50;
    let (mut events, _) = open(&mut client, subscribe).await;

    let total = 5_000;
    let offsets = publish(&mut client, "drop.x", total, 1_000).await;
    let mut received = Received::default();
    received
        .read_through(&mut events, *offsets.last().unwrap())
        .await;

    let (mut last_seen, mut delivered, mut dropped) = (0u64, 0u64, 0u64);
    for got in &received.got {
        match got {
            Got::Message(m) => {
                assert!(
                    m.offset > last_seen,
                    "in order: {} after {last_seen}",
                    m.offset
                );
                last_seen = m.offset;
                delivered += 1;
            }
            Got::Gap(g) => {
                assert!(
                    g.from_offset > last_seen && g.to_offset >= g.from_offset,
                    "{g:?} after {last_seen}"
                );
                assert_eq!(g.reason, pb::gap::Reason::Dropped as i32);
                last_seen = g.to_offset;
                dropped += g.count;
            }
        }
    }
    assert!(dropped > 0, "the stalled consumer lost something");
    assert_eq!(
        delivered + dropped,
        total as u64,
        "gaps and deliveries add up"
    );
    assert!(!received.batches.is_empty(), "what it kept came in batches");
}

#[tokio::test]
async fn credits_count_the_messages_inside_batches() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    let mut subscribe = request("credit.>", 100, None);
    subscribe.max_unacked = 3;
    let (mut events, sub) = open(&mut client, subscribe).await;
    let offsets = publish(&mut client, "credit.x", 10, 10).await;

    let mut received = Received::default();
    received.read_through(&mut events, offsets[2]).await;
    assert_eq!(received.offsets(), offsets[..3].to_vec());
    let id = sub.subscription_id;
    let lister = client.clone();
    let info = switchboard_e2e::eventually("the subscription to wait for credits", || {
        let mut lister = lister.clone();
        async move {
            let info = lister
                .list_subscriptions(pb::ListSubscriptionsRequest {})
                .await
                .ok()?
                .into_inner()
                .subscriptions
                .into_iter()
                .find(|s| s.subscription_id == id)?;
            info.waiting_for_credit.then_some(info)
        }
    })
    .await
    .unwrap();
    assert_eq!((info.pending, info.delivered), (3, 3));
    // Three credits back: the next three messages.
    client
        .ack(pb::AckRequest {
            subscription_id: id,
            offsets: offsets[..3].to_vec(),
        })
        .await
        .unwrap();
    let mut more = Received::default();
    more.read_through(&mut events, offsets[5]).await;
    assert_eq!(more.offsets(), offsets[3..6].to_vec());
}

#[tokio::test]
async fn the_client_subscription_unpacks_batches_into_single_messages_in_order() {
    let f = fixture(&[]).await;
    let mut client = raw(f.broker.url()).await;
    let mut published = publish(&mut client, "unpack.a", 3_000, 10).await;
    for options in [
        SubscribeOptions::default(),
        SubscribeOptions::default().max_batch(1),
    ] {
        let mut subscription = f
            .client
            .subscribe_with("unpack.a", Start::Earliest, options.clone())
            .await
            .expect("subscribes");
        let messages = take(&mut subscription, published.len()).await;
        assert_eq!(offsets(&messages), published, "{options:?}");
        let live = publish(&mut client, "unpack.a", 500, 10).await;
        let messages = take(&mut subscription, live.len()).await;
        assert_eq!(offsets(&messages), live, "{options:?}");
        assert_nothing_more(&mut subscription, std::time::Duration::from_millis(200)).await;
        published.extend(live);
    }
}
