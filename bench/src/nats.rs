//! The same workloads against NATS JetStream, through `async-nats`.
//!
//! - Publishing is JetStream publish (persisted in the stream `BENCH`, file storage, one replica;
//!   three in a cluster, where [`replicated_stream`] creates it before the workload) with at most
//!   `window` acks pending, as Switchboard's publisher has at most `window` messages
//!   unacknowledged. Whether the store syncs before the ack is the server's configuration
//!   ([`crate::brokers::NatsSync`]), not the client's.
//! - Subscribers are JetStream ordered push consumers (ephemeral, delivering new messages of the
//!   stream that match their filter), the JetStream counterpart of a Switchboard subscription:
//!   both deliver stored messages and can start from any point. Each has its own connection.
//! - Entities are a KV bucket (`contacts`, file storage, history 1): an update is a `put`, a
//!   watcher is `watch_all`. NATS KV stores whole values, not field-level merges.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use async_nats::jetstream::{self, consumer, stream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::payload::{self, now_ns};
use crate::tally::{self, AckTally, ReaderTask, Seen};
use crate::{Outcome, Plan};

async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        // Deliveries are read as fast as they come; a deeper client queue than the default.
        .subscription_capacity(65_536)
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))
}

fn context(client: async_nats::Client, window: usize) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .max_ack_inflight(window)
        .backpressure_on_inflight(true)
        .timeout(Duration::from_secs(30))
        .build(client)
}

/// The stream every workload publishes to: `bench.>`, file storage, `replicas` copies. A workload
/// asks for one replica and gets the stream as it is when a cluster's start made it already.
async fn bench_stream(js: &jetstream::Context, replicas: usize) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: "BENCH".to_owned(),
        subjects: vec!["bench.>".to_owned()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    // JetStream may still be starting right after the port opens, and a cluster's has to elect
    // its meta leader first.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => return Ok(stream),
            Err(error) if Instant::now() < deadline => {
                attempt += 1;
                if attempt == 1 {
                    eprintln!("[bench] waiting for JetStream: {error}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(anyhow!("cannot create the stream BENCH: {error}")),
        }
    }
}

/// Creates the stream `BENCH` with `replicas` copies through the server at `url`, waits until its
/// leader is elected and every replica is current, and returns the leader's server name.
pub async fn replicated_stream(url: &str, replicas: usize) -> anyhow::Result<String> {
    let client = connect(url).await?;
    let js = jetstream::new(client);
    let mut stream = bench_stream(&js, replicas).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = stream
            .info()
            .await
            .map_err(|e| anyhow!("cannot read the stream's info: {e}"))?;
        let cluster = info.cluster.clone();
        let ready = cluster.as_ref().and_then(|cluster| {
            let leader = cluster.leader.clone()?;
            let all_current = cluster.replicas.len() + 1 >= replicas
                && cluster.replicas.iter().all(|peer| peer.current);
            all_current.then_some(leader)
        });
        if let Some(leader) = ready {
            return Ok(leader);
        }
        if Instant::now() > deadline {
            bail!("the stream BENCH has no leader with current replicas within 30 s: {cluster:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A JetStream publisher with at most `window` acks pending; a task awaits the acks in order and
/// records their latency.
struct Windowed {
    js: jetstream::Context,
    slots: std::sync::Arc<Semaphore>,
    pending: mpsc::Sender<(u64, jetstream::context::PublishAckFuture)>,
    reader: tokio::task::JoinHandle<anyhow::Result<AckTally>>,
}

impl Windowed {
    fn open(js: jetstream::Context, window: usize) -> Windowed {
        let slots = std::sync::Arc::new(Semaphore::new(window));
        let (pending, mut acks) =
            mpsc::channel::<(u64, jetstream::context::PublishAckFuture)>(window.max(1));
        let reader = tokio::spawn({
            let slots = slots.clone();
            async move {
                let mut tally = AckTally::new("failed")?;
                while let Some((sent, ack)) = acks.recv().await {
                    let result = ack.await;
                    let now = now_ns();
                    slots.add_permits(1);
                    match result {
                        Ok(_) => {
                            tally.acked += 1;
                            payload::record_ns(&mut tally.latency, now.saturating_sub(sent));
                        }
                        Err(error) => tally.fail(error),
                    }
                }
                anyhow::Ok(tally)
            }
        });
        Windowed {
            js,
            slots,
            pending,
            reader,
        }
    }
}

impl tally::Windowed for Windowed {
    async fn send(&self, subject: &'static str, seq: u64, size: usize) -> anyhow::Result<()> {
        self.slots.acquire().await?.forget();
        let sent = now_ns();
        let ack = self
            .js
            .publish(subject, payload::encode(seq, sent, size))
            .await
            .context("JetStream publish failed")?;
        self.pending
            .send((sent, ack))
            .await
            .map_err(|_| anyhow!("the ack reader stopped"))
    }

    async fn finish(self) -> anyhow::Result<AckTally> {
        drop(self.pending);
        self.reader.await?
    }
}

/// W1: as Switchboard's, with JetStream publish.
pub async fn w1(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let client = connect(url).await?;
    let js = context(client, plan.window);
    bench_stream(&js, 1).await?;
    tally::publish_all(Windowed::open(js, plan.window), plan).await
}

/// `count` ordered push consumers of the stream filtered by `filter`, each on its own connection,
/// created (so delivering) when this returns. They are spread over `urls` in turn (consumer `i`
/// on `urls[i % urls.len()]`: several servers of a cluster).
async fn subscribers(
    urls: &[String],
    stream: &stream::Stream,
    filter: &str,
    count: usize,
    expected: &watch::Receiver<u64>,
    record_from: Option<u64>,
    deadline: Instant,
) -> anyhow::Result<Vec<ReaderTask>> {
    let mut tasks = Vec::with_capacity(count);
    let stream_name = stream.cached_info().config.name.clone();
    for url in urls.iter().cycle().take(count) {
        let client = connect(url).await?;
        let js = jetstream::new(client.clone());
        let stream = js.get_stream(&stream_name).await?;
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: filter.to_owned(),
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create an ordered consumer on {filter}"))?;
        let messages = consumer.messages().await?;
        let expected = expected.clone();
        tasks.push(tokio::spawn(async move {
            let _client = client;
            tally::receive(
                messages,
                |message| {
                    let message = message.map_err(|e| anyhow!("the consumer failed: {e}"))?;
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

/// W2: as Switchboard's, with JetStream publish and ordered consumers.
pub async fn w2(
    url: &str,
    plan: &Plan,
    subscriber_count: usize,
    wildcard: bool,
) -> anyhow::Result<Outcome> {
    w2_across(url, url, plan, subscriber_count, wildcard).await
}

/// W2 with the publisher on `publish_url` and the consumers on `subscribe_url` (another server
/// of a cluster, in W5b).
pub async fn w2_across(
    publish_url: &str,
    subscribe_url: &str,
    plan: &Plan,
    subscriber_count: usize,
    wildcard: bool,
) -> anyhow::Result<Outcome> {
    let (warm, total) = plan.w2_counts();
    let subject = "bench.w2.events";
    let filter = if wildcard { "bench.w2.*" } else { subject };
    let client = connect(publish_url).await?;
    let js = context(client, plan.window);
    let stream = bench_stream(&js, 1).await?;
    let deadline = Instant::now() + plan.w2_warmup + plan.w2_duration + Duration::from_secs(15);
    let (_expected_tx, expected) = watch::channel(total);
    let tasks = subscribers(
        &[subscribe_url.to_owned()],
        &stream,
        filter,
        subscriber_count,
        &expected,
        Some(warm),
        deadline,
    )
    .await?;
    tally::publish_paced(Windowed::open(js, plan.window), subject, tasks, plan).await
}

/// W2e: W2a over core NATS — publish and subscribe with no JetStream, nothing stored, at most
/// once: what Switchboard's ephemeral messages compare with.
pub async fn w2_core(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let (warm, total) = plan.w2_counts();
    let subject = "bench.w2.events";
    let deadline = Instant::now() + plan.w2_warmup + plan.w2_duration + Duration::from_secs(15);
    let (_expected_tx, expected) = watch::channel(total);
    let subscriber = connect(url).await?;
    let messages = subscriber.subscribe(subject).await?;
    // The subscription is on the server once a round trip after it is done.
    subscriber.flush().await?;
    let reader = tokio::spawn(async move {
        let _client = subscriber;
        tally::receive(
            messages,
            |message| Ok(Seen::Delivery(payload::decode(&message.payload))),
            expected,
            Some(warm),
            deadline,
        )
        .await
    });
    let client = connect(url).await?;
    let size = plan.size;
    let late_us = payload::paced(total, plan.w2_rate, |seq| {
        let client = &client;
        async move {
            client
                .publish(subject, payload::encode(seq, now_ns(), size))
                .await
                .context("NATS publish failed")
        }
    })
    .await?;
    client.flush().await?;
    let mut outcome = tally::latency_outcome(&tally::join(vec![reader]).await?, total)?;
    payload::lateness_note(late_us, &mut outcome);
    Ok(outcome)
}

/// W3: as Switchboard's, with JetStream publish and ordered consumers.
pub async fn w3(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    Ok(w3_spread(url, &[url.to_owned()], plan).await?.0)
}

/// W3 with the publisher on `publish_url` and the consumers spread over `subscribe_urls` (the
/// followers of a cluster, in W5c); also how many messages the consumers on each of them
/// received, in the same order.
pub async fn w3_spread(
    publish_url: &str,
    subscribe_urls: &[String],
    plan: &Plan,
) -> anyhow::Result<(Outcome, Vec<u64>)> {
    let client = connect(publish_url).await?;
    let js = context(client, plan.window);
    let stream = bench_stream(&js, 1).await?;
    let deadline = Instant::now() + plan.w3_duration + plan.w3_drain + Duration::from_secs(5);
    let (expected_tx, expected) = watch::channel(u64::MAX);
    let tasks = subscribers(
        subscribe_urls,
        &stream,
        "bench.w3.*",
        plan.w3_subscribers,
        &expected,
        None,
        deadline,
    )
    .await?;
    let publisher = Windowed::open(js, plan.window);
    tally::publish_for_a_while(publisher, tasks, expected_tx, subscribe_urls.len(), plan).await
}

/// W4: as Switchboard's, with a KV bucket: `put` per update, `watch_all` per watcher.
pub async fn w4(url: &str, plan: &Plan) -> anyhow::Result<Outcome> {
    let client = connect(url).await?;
    let js = context(client, plan.window);
    // Wait for JetStream as for the stream, then create the bucket.
    bench_stream(&js, 1).await?;
    // The bucket's stream, as `create_key_value` would make it (that call first asks for the
    // account's info, which async-nats 0.51 cannot parse from a 2.9 server).
    js.create_stream(stream::Config {
        name: "KV_contacts".to_owned(),
        subjects: vec!["$KV.contacts.>".to_owned()],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow!("cannot create the KV bucket's stream: {e}"))?;
    let store = js
        .get_key_value("contacts")
        .await
        .map_err(|e| anyhow!("cannot open the KV bucket: {e}"))?;
    let deadline = Instant::now() + plan.w4_limit();
    let (expected_tx, expected) = watch::channel(u64::MAX);
    let mut watchers = Vec::with_capacity(plan.w4_watchers);
    for _ in 0..plan.w4_watchers {
        let client = connect(url).await?;
        let watch = jetstream::new(client.clone())
            .get_key_value("contacts")
            .await
            .map_err(|e| anyhow!("cannot open the KV bucket: {e}"))?
            .watch_all()
            .await
            .map_err(|e| anyhow!("cannot watch the KV bucket: {e}"))?;
        let expected = expected.clone();
        watchers.push(tokio::spawn(async move {
            let _client = client;
            tally::receive(
                watch,
                |entry| {
                    let entry = entry.map_err(|e| anyhow!("the KV watch failed: {e}"))?;
                    Ok(Seen::Delivery(
                        payload::entity_time(&entry.value).map(|sent| (0, sent)),
                    ))
                },
                expected,
                Some(0),
                deadline,
            )
            .await
        }));
    }
    let updates = tally::run_updates(
        plan.w4_writers,
        plan.w4_entities,
        plan.w4_updates as u64,
        deadline,
        move |entity, n, sent| {
            let store = store.clone();
            async move {
                let value = serde_json::to_vec(&payload::entity_fields(sent, n))?;
                store
                    .put(format!("contact.c{entity}"), value.into())
                    .await
                    .map_err(|e| anyhow!("KV put failed: {e}"))?;
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
