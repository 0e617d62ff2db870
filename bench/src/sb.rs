//! The workloads against Switchboard, through `switchboard-client`. Every subscriber and watcher
//! has a connection of its own, as separate widgets would; the publisher uses one `PublishStream`
//! with at most `window` messages unacknowledged.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures::StreamExt;
use switchboard_client::{
    split_stream_ack, Client, EntityEvent, EntityUpdate, Publish, PublishAcks, Publisher, Start,
    SubscribeOptions,
};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::payload::{self, now_ns};
use crate::tally::{self, AckTally, ReaderTask, Seen};
use crate::{Outcome, Plan};

async fn connect(url: &str) -> anyhow::Result<Client> {
    Client::connect(url.to_owned())
        .await
        .with_context(|| format!("cannot connect to Switchboard at {url}"))
}

fn subscribe_options() -> SubscribeOptions {
    // A deeper client-side queue than the default 64: the benchmark reads as fast as it can.
    SubscribeOptions::default()
        .buffer(1024)
        .max_reconnect_attempts(Some(0))
}

/// A publish stream with at most `window` messages unacknowledged: [`Windowed::send`] waits for a
/// free slot, and a task reads the acks (one per message, in order), recording their latency.
pub(crate) struct Windowed {
    publisher: Publisher,
    /// Whether the messages are ephemeral (delivered at once, never stored; acked with offset 0).
    ephemeral: bool,
    /// Whether the bodies carry W1k's telemetry fields ([`payload::encode_kpi`]).
    kpi_bodies: bool,
    slots: Arc<Semaphore>,
    sent_at: Arc<Mutex<VecDeque<u64>>>,
    reader: tokio::task::JoinHandle<anyhow::Result<AckTally>>,
}

impl Windowed {
    pub(crate) fn open(client: &Client, window: usize) -> Windowed {
        Windowed::open_with(client, window, false)
    }

    /// [`Windowed::open`], sending ephemeral messages when `ephemeral`.
    pub(crate) fn open_with(client: &Client, window: usize, ephemeral: bool) -> Windowed {
        let (publisher, acks) = client.publisher(window);
        let slots = Arc::new(Semaphore::new(window));
        let sent_at = Arc::new(Mutex::new(VecDeque::with_capacity(window)));
        let reader = tokio::spawn({
            let slots = slots.clone();
            let sent_at = sent_at.clone();
            async move {
                let tally = read_acks(acks, slots.clone(), sent_at).await;
                // No more acks will free a slot: a sender waiting for one fails instead of
                // waiting forever (the broker died, or the stream failed).
                slots.close();
                tally
            }
        });
        Windowed {
            publisher,
            ephemeral,
            kpi_bodies: false,
            slots,
            sent_at,
            reader,
        }
    }
}

impl tally::Windowed for Windowed {
    async fn send(&self, channel: &'static str, seq: u64, size: usize) -> anyhow::Result<()> {
        self.slots.acquire().await?.forget();
        let sent = now_ns();
        self.sent_at
            .lock()
            .map_err(|_| anyhow!("a lock was poisoned"))?
            .push_back(sent);
        let body = if self.kpi_bodies {
            payload::encode_kpi(seq, sent, size)
        } else {
            payload::encode(seq, sent, size)
        };
        let mut message = Publish::new(channel, body);
        if self.ephemeral {
            message = message.ephemeral();
        }
        self.publisher
            .send(message)
            .await
            .context("the publish stream closed")
    }

    /// Ends the stream and waits for the acks of everything sent.
    async fn finish(self) -> anyhow::Result<AckTally> {
        drop(self.publisher);
        self.reader.await?
    }
}

async fn read_acks(
    mut acks: PublishAcks,
    slots: Arc<Semaphore>,
    sent_at: Arc<Mutex<VecDeque<u64>>>,
) -> anyhow::Result<AckTally> {
    let mut tally = AckTally::new("refused")?;
    while let Some(ack) = acks.next().await {
        let ack = ack.context("the publish stream failed")?;
        let now = now_ns();
        let sent = sent_at
            .lock()
            .map_err(|_| anyhow!("a lock was poisoned"))?
            .pop_front();
        slots.add_permits(1);
        match split_stream_ack(ack).1 {
            Ok(_) => tally.acked += 1,
            Err(refusal) => tally.fail(refusal),
        }
        if let Some(sent) = sent {
            payload::record_ns(&mut tally.latency, now.saturating_sub(sent));
        }
    }
    Ok(tally)
}

/// W1: one publisher, `w1_messages` messages of `size` bytes to one channel, at most `window`
/// unacknowledged.
pub async fn w1(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let client = connect(url).await?;
    tally::publish_all(Windowed::open(&client, plan.window), plan).await
}

/// A schema such as an integration registers for its events: every field typed, the sequence and
/// the time constrained by patterns, nothing else allowed (docs/SCHEMAS.md).
const W1_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["s", "t", "p"],
  "properties": {
    "s": {"type": "string", "pattern": "^[0-9]{10}$"},
    "t": {"type": "string", "pattern": "^[0-9]{20}$"},
    "p": {"type": "string", "maxLength": 1048576}
  },
  "additionalProperties": false
}"#;

/// W1s: W1 with [`W1_SCHEMA`] enforced on its channel, so every message is checked before it is
/// proposed.
pub async fn w1_with_schema(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let client = connect(url).await?;
    client
        .schema_put(switchboard_client::SchemaPut::new(
            "bench.w1.*",
            "1.0.0",
            W1_SCHEMA,
        ))
        .await
        .context("cannot register W1s's schema")?;
    tally::publish_all(Windowed::open(&client, plan.window), plan).await
}

/// W1k's three KPI views on W1's channel: a count per minute and hour; a duration's quantiles per
/// queue per minute and quarter hour; one queue's durations per minute (a filter).
const W1K_VIEWS: [&str; 3] = [
    r#"{"name": "w1k_count", "pattern": "bench.w1.*", "windows": ["1m", "1h"]}"#,
    r#"{"name": "w1k_by_queue", "pattern": "bench.w1.*", "group_by": {"json": "/q"},
        "measures": [{"name": "ms", "field": "/ms"}], "windows": ["1m", "15m"]}"#,
    r#"{"name": "w1k_one_queue", "pattern": "bench.w1.*",
        "filters": [{"field": {"json": "/q"}, "equals": "q1"}],
        "measures": [{"name": "ms", "field": "/ms"}], "windows": ["1m"]}"#,
];

/// W1k: W1 with three KPI views folding every message (docs/KPIS.md), and bodies that carry
/// the numbers and the group they measure.
pub async fn w1_with_kpis(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let client = connect(url).await?;
    for definition in W1K_VIEWS {
        client
            .kpi_define(definition)
            .await
            .context("cannot define W1k's views")?;
    }
    let mut publisher = Windowed::open(&client, plan.window);
    publisher.kpi_bodies = true;
    let outcome = tally::publish_all(publisher, plan).await?;
    // Every message was counted: the views are not lagging behind the acks.
    let values = client
        .kpi_values(
            switchboard_client::KpiQuery::new("w1k_count")
                .window("1h")
                .windows(2),
        )
        .await
        .context("cannot read W1k's counts")?;
    let counted: u64 = values
        .windows
        .iter()
        .flat_map(|w| &w.groups)
        .map(|g| g.messages)
        .sum();
    anyhow::ensure!(
        counted == plan.w1_messages as u64,
        "W1k's count view holds {counted} messages; {} were published",
        plan.w1_messages
    );
    Ok(outcome)
}

/// `count` subscribers on `pattern`, each on its own connection, live when this returns. They
/// are spread over `urls` in turn (subscriber `i` on `urls[i % urls.len()]`: several nodes of a
/// cluster).
pub(crate) async fn subscribers(
    urls: &[String],
    pattern: &str,
    count: usize,
    expected: &watch::Receiver<u64>,
    record_from: Option<u64>,
    deadline: Instant,
) -> anyhow::Result<Vec<ReaderTask>> {
    let mut tasks = Vec::with_capacity(count);
    for url in urls.iter().cycle().take(count) {
        let client = connect(url).await?;
        let subscription = client
            .subscribe_with(pattern, Start::Latest, subscribe_options())
            .await
            .with_context(|| format!("cannot subscribe to {pattern}"))?;
        let expected = expected.clone();
        tasks.push(tokio::spawn(async move {
            // The connection lives as long as its subscription.
            let _client = client;
            tally::receive(
                subscription,
                |message| {
                    let message = message.context("the subscription failed")?;
                    // Read the stamp only when the latency is recorded (not in W3).
                    Ok(Seen::Delivery(
                        record_from.and_then(|_| payload::decode(&message.payload)),
                    ))
                },
                expected,
                record_from,
                deadline,
            )
            .await
        }));
    }
    Ok(tasks)
}

/// W2: `w2_rate` messages per second for the warm-up and then the measured period, to
/// `subscriber_count` subscribers on the exact channel or on a wildcard; publish→receive latency
/// of the messages after the warm-up.
pub async fn w2(
    url: &str,
    plan: &Plan,
    subscriber_count: usize,
    wildcard: bool,
) -> anyhow::Result<Outcome> {
    w2_across(url, url, plan, subscriber_count, wildcard, false).await
}

/// W2e: W2a with ephemeral messages (delivered at once to live subscribers, never stored).
pub async fn w2_ephemeral(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    w2_across(url, url, plan, 1, false, true).await
}

/// W2 with the publisher on `publish_url` and the subscribers on `subscribe_url` (another node
/// of a cluster, in W5b).
pub async fn w2_across(
    publish_url: &str,
    subscribe_url: &str,
    plan: &Plan,
    subscriber_count: usize,
    wildcard: bool,
    ephemeral: bool,
) -> anyhow::Result<Outcome> {
    let (warm, total) = plan.w2_counts();
    let channel = "bench.w2.events";
    let pattern = if wildcard { "bench.w2.*" } else { channel };
    let deadline = Instant::now() + plan.w2_warmup + plan.w2_duration + Duration::from_secs(15);
    let (_expected_tx, expected) = watch::channel(total);
    let tasks = subscribers(
        &[subscribe_url.to_owned()],
        pattern,
        subscriber_count,
        &expected,
        Some(warm),
        deadline,
    )
    .await?;
    let client = connect(publish_url).await?;
    let stream = Windowed::open_with(&client, plan.window, ephemeral);
    tally::publish_paced(stream, channel, tasks, plan).await
}

/// W3: `w3_subscribers` subscribers on a wildcard; one publisher as fast as its window allows for
/// `w3_duration`; deliveries per second until every subscriber has every message (or the drain
/// time is up).
pub async fn w3(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    Ok(w3_spread(url, &[url.to_owned()], plan).await?.0)
}

/// W3 with the publisher on `publish_url` and the subscribers spread over `subscribe_urls` (the
/// followers or replicas of a cluster, in W5c). Also returns how many messages the subscribers
/// on each of `subscribe_urls` received, in the same order.
pub async fn w3_spread(
    publish_url: &str,
    subscribe_urls: &[String],
    plan: &Plan,
) -> anyhow::Result<(Outcome, Vec<u64>)> {
    let deadline = Instant::now() + plan.w3_duration + plan.w3_drain + Duration::from_secs(5);
    let (expected_tx, expected) = watch::channel(u64::MAX);
    let tasks = subscribers(
        subscribe_urls,
        "bench.w3.*",
        plan.w3_subscribers,
        &expected,
        None,
        deadline,
    )
    .await?;
    let client = connect(publish_url).await?;
    let stream = Windowed::open(&client, plan.window);
    tally::publish_for_a_while(stream, tasks, expected_tx, subscribe_urls.len(), plan).await
}

/// W4: `w4_writers` concurrent writers update `w4_entities` contacts (`UpdateEntity`, each writer
/// its own entities, one update at a time), `w4_updates` in all, while `w4_watchers` watchers
/// follow `contact.*` (`WatchEntities`); updates per second, their latency, and update→watch
/// latency.
pub async fn w4(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let deadline = Instant::now() + plan.w4_limit();
    let (expected_tx, expected) = watch::channel(u64::MAX);
    let mut watchers = Vec::with_capacity(plan.w4_watchers);
    for _ in 0..plan.w4_watchers {
        let client = connect(url).await?;
        let mut watch = client
            .watch_entities("contact.*")
            .await
            .context("cannot watch contact.*")?;
        // Live once the (empty) snapshot is complete.
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(EntityEvent::SnapshotComplete(_)))) => {}
            other => return Err(anyhow!("the entity watch did not go live: {other:?}")),
        }
        let expected = expected.clone();
        watchers.push(tokio::spawn(async move {
            let _client = client;
            tally::receive(
                watch,
                |event| {
                    Ok(match event.context("the entity watch failed")? {
                        EntityEvent::Change(entity) => Seen::Delivery(
                            payload::entity_time(&entity.fields).map(|sent| (0, sent)),
                        ),
                        _ => Seen::Other,
                    })
                },
                expected,
                Some(0),
                deadline,
            )
            .await
        }));
    }
    let client = connect(url).await?;
    let updates = tally::run_updates(
        plan.w4_writers,
        plan.w4_entities,
        plan.w4_updates as u64,
        deadline,
        move |entity, n, sent| {
            let client = client.clone();
            async move {
                let fields = payload::entity_fields(sent, n);
                client
                    .update_entity(EntityUpdate::new("contact", format!("c{entity}"), fields))
                    .await?;
                Ok(())
            }
        },
    )
    .await?;
    expected_tx.send_replace(updates.done);
    let watchers = tally::join(watchers).await?;
    tally::entity_outcome(
        updates.done,
        updates.elapsed,
        &updates.latency,
        &watchers,
        updates.failed,
        updates.first_error,
    )
}
