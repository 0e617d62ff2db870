//! `sb bench CHANNEL`: publish and subscribe throughput and publish→receive latency against any
//! broker, in the manner of `nats bench`.
//!
//! Subscribers, each on a connection of its own, subscribe to CHANNEL from the latest offset.
//! Once the broker has confirmed every one, publishers, each on a connection of its own, publish
//! `--msgs` messages between them: one at a time, waiting for each ack, or with `--stream`
//! pipelined on one publish stream each; paced by `--rate` if given. Every message carries a
//! header with this run's id, its publisher, its sequence number and when it was sent on this
//! process's monotonic clock, so a subscriber counts exactly the messages of this run (other
//! traffic on the channel is ignored), notices a missing or repeated one, and times each.
//!
//! The run ends when every subscriber has every message, or at `--timeout`; it then prints one
//! record (through [`crate::print`], so `--output json|text` apply). A subscriber that missed
//! messages of a stored run makes the exit status 1, after the record.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use switchboard_client::{split_stream_ack, Client, Publish, Start, SubscribeOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::print;
use crate::security::SecurityArgs;

/// `sb bench --help`'s notes and examples.
pub const HELP: &str = "\
Subscribers (--sub, each on its own connection) subscribe to CHANNEL from now on; then
publishers (--pub, each on its own connection) publish --msgs messages of --size bytes between
them, each waiting for its ack, or pipelined on a publish stream with --stream, at --rate
messages per second in all if given. Each message carries an `sb-bench` header with the run, its
publisher, sequence number and send time, so subscribers count exactly this run's messages
(other traffic on the channel is ignored) and time each from its send to its receipt.

It stops once every subscriber has every message, or at --timeout (60s by default), and prints
one record: publish and subscribe msgs/s and bytes/s, latency_ms (publish→receive, all
subscribers: p50, p90, p99, max), publish_ack_ms (each publish call to its ack; not with
--stream), each subscriber's received, missing and duplicate counts, and complete (every publish
acknowledged, every subscriber with every message). Exits with status 1 after the record if a
publish was not acknowledged, or a subscriber missed messages, in time (for --ephemeral runs,
delivered at most once, missing messages are reported, not an error). The messages are stored
like any others unless --ephemeral: bench on a channel of its own.

Examples:
  sb bench bench.load --pub 1 --sub 2 --msgs 10000 --size 128
  sb bench bench.load --pub 4 --msgs 100000 --stream
  sb bench bench.load --sub 1 --msgs 3000 --rate 500 --output text
  sb bench bench.live --sub 3 --ephemeral --timeout 20s";

/// The header that marks a bench message: `RUN/PUBLISHER/SEQUENCE/SENT_NS`.
const HEADER: &str = "sb-bench";
/// The largest latency the histograms hold (longer ones count as this): one hour, in µs.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// The largest payload `--size` takes (the broker's default message limit is 1 MiB).
const MAX_SIZE: usize = 16 << 20;
/// With `--ephemeral` (at most once), how long a subscriber waits for more after publishing
/// ended and nothing arrived: dropped messages would otherwise hold it until `--timeout`.
const EPHEMERAL_SETTLE: Duration = Duration::from_secs(2);
/// Messages queued ahead of a publish stream (`--stream`).
const STREAM_QUEUE: usize = 256;

/// `sb bench`'s arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The channel to publish to and subscribe on (one channel, not a pattern).
    channel: String,

    /// Publishers, each on a connection of its own.
    #[arg(long = "pub", value_name = "N", default_value_t = 1)]
    publishers: u32,

    /// Subscribers, each on a connection of its own; 0 measures publishing alone.
    #[arg(long = "sub", value_name = "N", default_value_t = 0)]
    subscribers: u32,

    /// Messages to publish in all, shared between the publishers.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    msgs: u64,

    /// Payload size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 128)]
    size: usize,

    /// Publish at most this many messages per second in all (shared between the publishers);
    /// as fast as acks come by default.
    #[arg(long, value_name = "MSGS_PER_S")]
    rate: Option<u64>,

    /// Pipeline the messages on one publish stream per publisher instead of waiting for each ack.
    #[arg(long)]
    stream: bool,

    /// Publish ephemeral messages (never stored, delivered at most once to live subscribers).
    #[arg(long)]
    ephemeral: bool,

    /// Stop after this long whatever is left, for example `30s`.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = humantime::parse_duration,
        default_value = "60s"
    )]
    timeout: Duration,
}

/// Throughput of one side (publishers or subscribers) or of one of them.
#[derive(Debug, Serialize)]
struct Throughput {
    messages: u64,
    bytes: u64,
    seconds: f64,
    msgs_per_s: f64,
    bytes_per_s: f64,
}

impl Throughput {
    fn new(messages: u64, size: usize, seconds: f64) -> Throughput {
        let bytes = messages * size as u64;
        let per_second = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        Throughput {
            messages,
            bytes,
            seconds: round(seconds, 6),
            msgs_per_s: round(per_second(messages), 1),
            bytes_per_s: round(per_second(bytes), 0),
        }
    }
}

/// One subscriber's count, against what was published.
#[derive(Debug, Serialize)]
struct SubscriberCount {
    received: u64,
    missing: u64,
    duplicates: u64,
    msgs_per_s: f64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
struct Percentiles {
    count: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Option<Percentiles> {
        if histogram.is_empty() {
            return None;
        }
        let ms = |us: u64| round(us as f64 / 1000.0, 3);
        Some(Percentiles {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        })
    }
}

/// What `sb bench` prints.
#[derive(Debug, Serialize)]
struct Report {
    channel: String,
    run: String,
    mode: &'static str,
    ephemeral: bool,
    publishers: u32,
    subscribers: u32,
    size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<u64>,
    /// Whether every publish was acknowledged and every subscriber has every message.
    complete: bool,
    publish: Throughput,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscribe: Option<Throughput>,
    /// From a message's send to its receipt by a subscriber, over all subscribers.
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<Percentiles>,
    /// From a publish call to its ack (not with --stream, where acks are pipelined).
    #[serde(skip_serializing_if = "Option::is_none")]
    publish_ack_ms: Option<Percentiles>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    each_publisher: Vec<Throughput>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    each_subscriber: Vec<SubscriberCount>,
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("latency histogram")
}

/// The messages of publisher `index` of `publishers` sharing `total`.
fn share(total: u64, publishers: u32, index: u32) -> u64 {
    let publishers = u64::from(publishers);
    total / publishers + u64::from(u64::from(index) < total % publishers)
}

/// What one publisher did.
struct Published {
    acked: u64,
    finished: Instant,
    ack_latency: Histogram<u64>,
}

/// What one subscriber saw.
struct Received {
    /// Per publisher, whether each sequence number arrived.
    seen: Vec<Vec<bool>>,
    received: u64,
    duplicates: u64,
    last: Option<Instant>,
    latency: Histogram<u64>,
}

/// Everything a publisher or subscriber task needs to know about the run.
struct Plan {
    channel: String,
    run: String,
    publishers: u32,
    msgs: u64,
    payload: Bytes,
    ephemeral: bool,
    /// The monotonic clock's origin the send times in the header count from.
    origin: Instant,
    deadline: Instant,
}

impl Plan {
    fn message(&self, publisher: u32, sequence: u64) -> Publish {
        let sent_ns = self.origin.elapsed().as_nanos();
        let publish = Publish::new(self.channel.clone(), self.payload.clone())
            .content_type("application/octet-stream")
            .header(
                HEADER,
                format!("{}/{publisher}/{sequence}/{sent_ns}", self.run),
            );
        if self.ephemeral {
            publish.ephemeral()
        } else {
            publish
        }
    }

    /// The publisher, sequence number and send time of a message of this run.
    fn identify(&self, header: &str) -> Option<(usize, u64, u64)> {
        let mut parts = header.split('/');
        if parts.next()? != self.run {
            return None;
        }
        let publisher = parts.next()?.parse().ok()?;
        let sequence = parts.next()?.parse().ok()?;
        let sent_ns = parts.next()?.parse().ok()?;
        Some((publisher, sequence, sent_ns))
    }
}

/// Runs the bench and prints its record.
///
/// # Errors
/// Invalid arguments; a connection, subscription or publish that fails (a refusal included); a
/// stored run in which a subscriber missed messages before `--timeout` (after printing).
pub async fn run(client: &Client, security: &SecurityArgs, args: BenchArgs) -> anyhow::Result<()> {
    if args.publishers == 0 {
        bail!("--pub must be at least 1");
    }
    if args.msgs == 0 {
        bail!("--msgs must be at least 1");
    }
    if args.size > MAX_SIZE {
        bail!("--size must be at most {MAX_SIZE} bytes");
    }
    if args.rate == Some(0) {
        bail!("--rate must be at least 1 (leave it out for no limit)");
    }
    let origin = Instant::now();
    let plan = Arc::new(Plan {
        channel: args.channel.clone(),
        run: run_id(),
        publishers: args.publishers,
        msgs: args.msgs,
        payload: Bytes::from(vec![b'x'; args.size]),
        ephemeral: args.ephemeral,
        origin,
        deadline: origin + args.timeout,
    });
    let connect = || async {
        let options = security.connect_options()?;
        Client::connect_with(client.url().to_owned(), options)
            .await
            .context("connect")
    };

    let (published_tx, published_rx) = watch::channel(false);
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers {
        let subscriber = connect().await?;
        let subscription = subscriber
            .subscribe_with(&plan.channel, Start::Latest, SubscribeOptions::default())
            .await
            .with_context(|| format!("subscribe to {}", plan.channel))?;
        let plan = Arc::clone(&plan);
        let published = published_rx.clone();
        subscribers.push(tokio::spawn(async move {
            // The connection lives as long as its subscription.
            let _subscriber = subscriber;
            receive(subscription, &plan, published).await
        }));
    }
    eprintln!(
        "sb: bench run {}: {} subscriber(s) ready; {} publisher(s) sending {} messages of {} bytes to {}",
        plan.run, args.subscribers, args.publishers, args.msgs, args.size, plan.channel
    );

    let started = Instant::now();
    let mut publishers = Vec::new();
    for index in 0..args.publishers {
        let publisher = connect().await?;
        let plan = Arc::clone(&plan);
        let count = share(args.msgs, args.publishers, index);
        let rate = args
            .rate
            .map(|rate| rate as f64 / f64::from(args.publishers));
        let stream = args.stream;
        publishers.push(tokio::spawn(async move {
            publish(&publisher, &plan, index, count, rate, stream, started).await
        }));
    }
    let mut published = Vec::new();
    for task in publishers {
        published.push(task.await.context("a publisher task failed")??);
    }
    let _ = published_tx.send(true);
    let mut received = Vec::new();
    for task in subscribers {
        received.push(task.await.context("a subscriber task failed")??);
    }

    let report = report(&args, &plan, started, &published, &received)?;
    print::record(&serde_json::to_string(&report)?)?;
    let acked: u64 = published.iter().map(|p| p.acked).sum();
    if acked < args.msgs {
        bail!(
            "{acked} of {} publishes acknowledged within --timeout {}",
            args.msgs,
            humantime::format_duration(args.timeout)
        );
    }
    if !args.ephemeral {
        if let Some((i, short)) = report
            .each_subscriber
            .iter()
            .enumerate()
            .find(|(_, s)| s.missing > 0)
        {
            bail!(
                "subscriber {i} received {} of {} messages within --timeout {}",
                short.received - short.duplicates,
                args.msgs,
                humantime::format_duration(args.timeout)
            );
        }
    }
    Ok(())
}

/// An id for this run, unique enough to tell its messages from another run's on the channel.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}{:x}", nanos & 0xffff_ffff_ffff, std::process::id())
}

/// Publishes `count` messages as publisher `index`, at `rate` per second if given.
async fn publish(
    client: &Client,
    plan: &Plan,
    index: u32,
    count: u64,
    rate: Option<f64>,
    stream: bool,
    started: Instant,
) -> anyhow::Result<Published> {
    let pace = |sequence: u64| async move {
        if let Some(rate) = rate {
            tokio::time::sleep_until(started + Duration::from_secs_f64(sequence as f64 / rate))
                .await;
        }
    };
    let mut ack_latency = latency_histogram()?;
    let mut acked = 0;
    if stream {
        let (publisher, mut acks) = client.publisher(STREAM_QUEUE);
        let counting = tokio::spawn(async move {
            let mut acked = 0u64;
            while let Some(answer) = acks.next().await {
                let (_, result) = split_stream_ack(answer?);
                result?;
                acked += 1;
                if acked == count {
                    break;
                }
            }
            Ok::<_, switchboard_client::Error>(acked)
        });
        for sequence in 0..count {
            pace(sequence).await;
            let send = publisher.send(plan.message(index, sequence));
            if tokio::time::timeout_at(plan.deadline, send).await.is_err() {
                break;
            }
        }
        drop(publisher);
        acked = match tokio::time::timeout_at(plan.deadline, counting).await {
            Ok(answer) => answer.context("the ack reader failed")??,
            Err(_) => 0,
        };
    } else {
        for sequence in 0..count {
            pace(sequence).await;
            let sent = Instant::now();
            let answer = tokio::time::timeout_at(
                plan.deadline,
                client.publish(plan.message(index, sequence)),
            )
            .await;
            let Ok(answer) = answer else { break };
            answer.with_context(|| format!("publish to {}", plan.channel))?;
            ack_latency.saturating_record(sent.elapsed().as_micros().max(1) as u64);
            acked += 1;
        }
    }
    Ok(Published {
        acked,
        finished: Instant::now(),
        ack_latency,
    })
}

/// Reads the subscription until it has every message of the run, or the deadline (with
/// `--ephemeral`, also once publishing ended and nothing came for [`EPHEMERAL_SETTLE`]).
async fn receive(
    mut subscription: switchboard_client::Subscription,
    plan: &Plan,
    mut published: watch::Receiver<bool>,
) -> anyhow::Result<Received> {
    let per_publisher = |index: u32| share(plan.msgs, plan.publishers, index) as usize;
    let mut seen = Received {
        seen: (0..plan.publishers)
            .map(|i| vec![false; per_publisher(i)])
            .collect(),
        received: 0,
        duplicates: 0,
        last: None,
        latency: latency_histogram()?,
    };
    let mut distinct = 0u64;
    while distinct < plan.msgs {
        let mut until = plan.deadline;
        if plan.ephemeral && *published.borrow() {
            until = until.min(seen.last.unwrap_or_else(Instant::now) + EPHEMERAL_SETTLE);
        }
        let waiting_for_publishers = plan.ephemeral && !*published.borrow();
        let next = tokio::select! {
            next = tokio::time::timeout_at(until, subscription.next()) => next,
            // Publishing ended: from now on, the wait is bounded by EPHEMERAL_SETTLE.
            _ = published.changed(), if waiting_for_publishers => continue,
        };
        let message = match next {
            Err(_) => break,
            Ok(None) => bail!("the subscription to {} ended", plan.channel),
            Ok(Some(message)) => message.context("subscription")?,
        };
        let now = Instant::now();
        let Some((publisher, sequence, sent_ns)) = message
            .headers
            .get(HEADER)
            .and_then(|header| plan.identify(header))
        else {
            continue;
        };
        let Some(slot) = seen
            .seen
            .get_mut(publisher)
            .and_then(|s| s.get_mut(sequence as usize))
        else {
            continue;
        };
        seen.received += 1;
        seen.last = Some(now);
        if std::mem::replace(slot, true) {
            seen.duplicates += 1;
            continue;
        }
        distinct += 1;
        let since_origin = now.duration_since(plan.origin).as_nanos() as u64;
        let latency_us = since_origin.saturating_sub(sent_ns) / 1000;
        seen.latency.saturating_record(latency_us.max(1));
    }
    Ok(seen)
}

fn report(
    args: &BenchArgs,
    plan: &Plan,
    started: Instant,
    published: &[Published],
    received: &[Received],
) -> anyhow::Result<Report> {
    let seconds_to = |end: Instant| end.saturating_duration_since(started).as_secs_f64();
    let acked: u64 = published.iter().map(|p| p.acked).sum();
    let publish_end = published
        .iter()
        .map(|p| p.finished)
        .max()
        .unwrap_or(started);
    let mut ack_latency = latency_histogram()?;
    let mut latency = latency_histogram()?;
    for p in published {
        ack_latency.add(&p.ack_latency)?;
    }
    for r in received {
        latency.add(&r.latency)?;
    }
    let each_subscriber: Vec<SubscriberCount> = received
        .iter()
        .map(|r| {
            let distinct = r.received - r.duplicates;
            let seconds = r.last.map_or(0.0, seconds_to);
            SubscriberCount {
                received: r.received,
                missing: plan.msgs.saturating_sub(distinct),
                duplicates: r.duplicates,
                msgs_per_s: Throughput::new(r.received, args.size, seconds).msgs_per_s,
            }
        })
        .collect();
    let subscribe = (!received.is_empty()).then(|| {
        let total: u64 = received.iter().map(|r| r.received).sum();
        let end = received.iter().filter_map(|r| r.last).max();
        Throughput::new(total, args.size, end.map_or(0.0, seconds_to))
    });
    let complete = acked == args.msgs && each_subscriber.iter().all(|s| s.missing == 0);
    Ok(Report {
        channel: plan.channel.clone(),
        run: plan.run.clone(),
        mode: if args.stream { "stream" } else { "unary" },
        ephemeral: args.ephemeral,
        publishers: args.publishers,
        subscribers: args.subscribers,
        size: args.size,
        rate: args.rate,
        complete,
        publish: Throughput::new(acked, args.size, seconds_to(publish_end)),
        subscribe,
        latency_ms: Percentiles::of(&latency),
        publish_ack_ms: Percentiles::of(&ack_latency),
        each_publisher: if published.len() > 1 {
            published
                .iter()
                .map(|p| Throughput::new(p.acked, args.size, seconds_to(p.finished)))
                .collect()
        } else {
            Vec::new()
        },
        each_subscriber,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_messages_are_shared_between_publishers_exactly() {
        let shares: Vec<u64> = (0..3).map(|i| share(10, 3, i)).collect();
        assert_eq!(shares, [4, 3, 3]);
        assert_eq!(share(2, 3, 2), 0);
    }

    #[test]
    fn only_this_runs_messages_are_counted() {
        let origin = Instant::now();
        let plan = Plan {
            channel: "bench.x".into(),
            run: "abc".into(),
            publishers: 1,
            msgs: 1,
            payload: Bytes::new(),
            ephemeral: false,
            origin,
            deadline: origin,
        };
        assert_eq!(plan.identify("abc/0/7/123"), Some((0, 7, 123)));
        assert_eq!(plan.identify("abd/0/7/123"), None);
        assert_eq!(plan.identify("abc/0/x/123"), None);
        let message = plan.message(0, 5).into_request();
        let header = message.headers.get(HEADER).cloned().unwrap_or_default();
        assert!(header.starts_with("abc/0/5/"), "{header}");
    }
}
