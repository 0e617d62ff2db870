//! What both sides share once messages arrive: reading a subscription or a watch until it has what
//! was sent (or its time is up), and turning what the readers saw into figures.

use futures::{Stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::payload::{self, now_ns, ACK_LATENCY, DELIVERY_LATENCY, WATCH_LATENCY};
use crate::{Metric, Outcome, Plan};

/// Either side's publisher with at most `window` messages unacknowledged: `send` waits for a free
/// slot, a task reads the acks, and `finish` waits for the acks of everything sent.
pub trait Windowed {
    fn send(
        &self,
        subject: &'static str,
        seq: u64,
        size: usize,
    ) -> impl std::future::Future<Output = anyhow::Result<()>>;
    fn finish(self) -> impl std::future::Future<Output = anyhow::Result<AckTally>>;
}

/// W1 on either side: `w1_messages` messages of `size` bytes to one subject, as fast as the
/// window allows; msgs/s, MB/s and ack latency.
pub async fn publish_all(publisher: impl Windowed, plan: &Plan) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    for seq in 0..plan.w1_messages as u64 {
        publisher.send("bench.w1.publish", seq, plan.size).await?;
    }
    let tally = publisher.finish().await?;
    Ok(tally.throughput(start.elapsed(), plan.size))
}

/// W2 on either side: `subject` at W2's fixed rate ([`payload::paced`]) while `readers` (already
/// live, expecting every message) record the latency of the measured ones.
pub async fn publish_paced(
    publisher: impl Windowed,
    subject: &'static str,
    readers: Vec<ReaderTask>,
    plan: &Plan,
) -> anyhow::Result<Outcome> {
    let (_, total) = plan.w2_counts();
    let size = plan.size;
    let late_us = payload::paced(total, plan.w2_rate, |seq| {
        let publisher = &publisher;
        async move { publisher.send(subject, seq, size).await }
    })
    .await?;
    let tally = publisher.finish().await?;
    let mut outcome = latency_outcome(&join(readers).await?, total)?;
    payload::lateness_note(late_us, &mut outcome);
    tally.annotate(&mut outcome);
    Ok(outcome)
}

/// W3 on either side: publish as fast as the window allows for `w3_duration`, tell the `readers`
/// (spread over `sources` servers in turn) how many to expect, and wait for them; also how many
/// messages the readers on each server received.
pub async fn publish_for_a_while(
    publisher: impl Windowed,
    readers: Vec<ReaderTask>,
    expected: watch::Sender<u64>,
    sources: usize,
    plan: &Plan,
) -> anyhow::Result<(Outcome, Vec<u64>)> {
    let start_ns = now_ns();
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed() < plan.w3_duration {
        publisher.send("bench.w3.events", seq, plan.size).await?;
        seq += 1;
    }
    let tally = publisher.finish().await?;
    let publish_seconds = start.elapsed().as_secs_f64();
    expected.send_replace(tally.acked);
    let received = join(readers).await?;
    let mut outcome = fan_out_outcome(&received, tally.acked, publish_seconds, start_ns);
    tally.annotate(&mut outcome);
    Ok((outcome, per_source(&received, sources)))
}

/// What a windowed publisher's ack reader saw: the W1 figures of either side.
#[derive(Debug)]
pub struct AckTally {
    pub acked: u64,
    pub failed: u64,
    pub first_failure: Option<String>,
    pub latency: Histogram<u64>,
    /// How this side words a failed publish in the notes ("refused", "failed").
    failure_word: &'static str,
}

impl AckTally {
    /// An empty tally; `failure_word` names a failed publish in the notes.
    pub fn new(failure_word: &'static str) -> anyhow::Result<AckTally> {
        Ok(AckTally {
            acked: 0,
            failed: 0,
            first_failure: None,
            latency: payload::histogram()?,
            failure_word,
        })
    }

    /// Counts a failed publish, keeping the first reason.
    pub fn fail(&mut self, reason: impl std::fmt::Display) {
        self.failed += 1;
        self.first_failure.get_or_insert_with(|| reason.to_string());
    }

    /// The W1 outcome: throughput over `elapsed` for messages of `size` bytes, ack latency, and a
    /// note when publishes failed.
    pub fn throughput(&self, elapsed: std::time::Duration, size: usize) -> Outcome {
        let rate = self.acked as f64 / elapsed.as_secs_f64();
        let mut outcome = Outcome::default();
        outcome
            .metrics
            .push(Metric::higher("msgs/s", "msgs/s", rate));
        outcome
            .metrics
            .push(Metric::higher("MB/s", "MB/s", rate * size as f64 / 1e6));
        outcome
            .metrics
            .extend(payload::latency_metrics(&self.latency, ACK_LATENCY));
        self.annotate(&mut outcome);
        outcome
    }

    /// Adds the acknowledged count to `outcome` (the cost per message is worked out from it), and
    /// a note when publishes failed.
    pub fn annotate(&self, outcome: &mut Outcome) {
        outcome.counts.push(("acknowledged".to_owned(), self.acked));
        if self.failed > 0 {
            outcome.notes.push(format!(
                "{} publishes {} (first: {})",
                self.failed,
                self.failure_word,
                self.first_failure.as_deref().unwrap_or("?")
            ));
        }
    }
}

/// What one reader (subscriber or watcher) saw.
#[derive(Debug)]
pub struct Received {
    pub count: u64,
    /// When the last counted event arrived ([`now_ns`]).
    pub last_ns: u64,
    pub latency: Histogram<u64>,
}

/// One event as the reader's `classify` function sees it.
pub enum Seen {
    /// Not a delivery (a snapshot marker, a heartbeat): not counted.
    Other,
    /// A delivery, counted; with its sequence number and send time when it carries them.
    Delivery(Option<(u64, u64)>),
}

/// Reads `events` until `expected` deliveries arrived (a number the publisher may set later:
/// `u64::MAX` until then) or `deadline` passes. Records the latency of deliveries numbered
/// `record_from` or later when it is `Some`.
pub async fn receive<S, T, F>(
    mut events: S,
    mut classify: F,
    mut expected: watch::Receiver<u64>,
    record_from: Option<u64>,
    deadline: Instant,
) -> anyhow::Result<Received>
where
    S: Stream<Item = T> + Unpin,
    F: FnMut(T) -> anyhow::Result<Seen>,
{
    let mut received = Received {
        count: 0,
        last_ns: 0,
        latency: payload::histogram()?,
    };
    let mut publisher_gone = false;
    loop {
        if received.count >= *expected.borrow() {
            break;
        }
        tokio::select! {
            next = tokio::time::timeout_at(deadline, events.next()) => {
                let Ok(Some(event)) = next else { break };
                let now = now_ns();
                if let Seen::Delivery(stamp) = classify(event)? {
                    received.count += 1;
                    received.last_ns = now;
                    if let (Some(from), Some((seq, sent))) = (record_from, stamp) {
                        if seq >= from {
                            payload::record_ns(&mut received.latency, now.saturating_sub(sent));
                        }
                    }
                }
            }
            changed = expected.changed(), if !publisher_gone => {
                // Gone without a final count: read on until the deadline.
                publisher_gone = changed.is_err();
            }
        }
    }
    Ok(received)
}

pub type ReaderTask = JoinHandle<anyhow::Result<Received>>;

pub async fn join(tasks: Vec<ReaderTask>) -> anyhow::Result<Vec<Received>> {
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await??);
    }
    Ok(results)
}

/// How many messages the readers on each of `sources` servers received, when reader `i` read
/// from server `i % sources` (subscribers spread over the nodes of a cluster in turn).
fn per_source(received: &[Received], sources: usize) -> Vec<u64> {
    let mut per_source = vec![0u64; sources];
    for (i, reader) in received.iter().enumerate() {
        if let Some(count) = per_source.get_mut(i % sources.max(1)) {
            *count += reader.count;
        }
    }
    per_source
}

/// W2's figures: the latency of every measured delivery to every subscriber.
pub fn latency_outcome(received: &[Received], expected: u64) -> anyhow::Result<Outcome> {
    let mut latency = payload::histogram()?;
    for reader in received {
        latency.add(&reader.latency)?;
    }
    let mut outcome = Outcome::default();
    outcome
        .metrics
        .extend(payload::latency_metrics(&latency, DELIVERY_LATENCY));
    let short = received.iter().filter(|r| r.count < expected).count();
    if short > 0 {
        outcome.notes.push(format!(
            "{short} of {} subscribers did not receive all {expected} messages in time",
            received.len()
        ));
    }
    Ok(outcome)
}

/// W3's figures from what each subscriber received: deliveries per second from the first publish
/// to the last delivery (or the end of the drain time).
pub fn fan_out_outcome(
    received: &[Received],
    published: u64,
    publish_seconds: f64,
    start_ns: u64,
) -> Outcome {
    let subscribers = received.len();
    let delivered: u64 = received.iter().map(|r| r.count).sum();
    let last_ns = received.iter().map(|r| r.last_ns).max().unwrap_or(start_ns);
    let seconds = (last_ns.saturating_sub(start_ns) as f64 / 1e9).max(publish_seconds);
    let complete = received.iter().filter(|r| r.count >= published).count();
    let mut outcome = Outcome::default();
    outcome.metrics.push(Metric::higher(
        "delivered msgs/s",
        "msgs/s",
        delivered as f64 / seconds.max(1e-9),
    ));
    outcome.metrics.push(Metric::higher(
        "published msgs/s",
        "msgs/s",
        published as f64 / publish_seconds.max(1e-9),
    ));
    outcome
        .metrics
        .push(Metric::lower("first publish→last delivery", "s", seconds));
    if complete < subscribers {
        outcome.notes.push(format!(
            "{} of {subscribers} subscribers had not received all {published} messages when the drain time ran out ({delivered} of {} deliveries)",
            subscribers - complete,
            published * subscribers as u64
        ));
    }
    outcome
}

/// W4's figures: updates per second and their latency, and the watchers' latency.
pub fn entity_outcome(
    done: u64,
    elapsed: f64,
    update_latency: &Histogram<u64>,
    watchers: &[Received],
    failed: u64,
    first_error: Option<String>,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    outcome.metrics.push(Metric::higher(
        "updates/s",
        "updates/s",
        done as f64 / elapsed.max(1e-9),
    ));
    outcome.metrics.push(Metric::lower(
        "update ack p50",
        "µs",
        update_latency.value_at_quantile(0.5) as f64,
    ));
    outcome.metrics.push(Metric::lower(
        "update ack p99",
        "µs",
        update_latency.value_at_quantile(0.99) as f64,
    ));
    let mut watch_latency = payload::histogram()?;
    for watcher in watchers {
        watch_latency.add(&watcher.latency)?;
    }
    outcome
        .metrics
        .extend(payload::latency_metrics(&watch_latency, WATCH_LATENCY));
    if failed > 0 {
        outcome.notes.push(format!(
            "{failed} updates failed (first: {})",
            first_error.as_deref().unwrap_or("?")
        ));
    }
    let short = watchers.iter().filter(|w| w.count < done).count();
    if short > 0 {
        outcome.notes.push(format!(
            "{short} of {} watchers did not see all {done} updates in time",
            watchers.len()
        ));
    }
    Ok(outcome)
}

/// The writers' side of W4, shared by both brokers: `writers` tasks, each updating its own
/// entities one at a time, `total` updates in all, until `deadline`.
pub struct UpdateTally {
    pub done: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub latency: Histogram<u64>,
    pub elapsed: f64,
}

/// Runs `update(writer, entity_index, n, sent_ns)` from `writers` concurrent tasks, each on its
/// own entities (`writer`, `writer + writers`, ...; `entities` in all), `total` times in all.
pub async fn run_updates<F, Fut>(
    writers: usize,
    entities: usize,
    total: u64,
    deadline: Instant,
    update: F,
) -> anyhow::Result<UpdateTally>
where
    F: Fn(usize, u64, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let writers = writers.max(1);
    let per_writer = (entities / writers).max(1);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(writers);
    for writer in 0..writers {
        let next = next.clone();
        let update = update.clone();
        tasks.push(tokio::spawn(async move {
            let mut latency = payload::histogram()?;
            let mut done = 0u64;
            let mut failed = 0u64;
            let mut first_error = None;
            let mut round = 0usize;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total || Instant::now() > deadline {
                    break;
                }
                let entity = writer + writers * (round % per_writer);
                round += 1;
                let sent = now_ns();
                match update(entity, n, sent).await {
                    Ok(()) => {
                        done += 1;
                        payload::record_ns(&mut latency, now_ns().saturating_sub(sent));
                    }
                    Err(error) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            anyhow::Ok((latency, done, failed, first_error))
        }));
    }
    let mut tally = UpdateTally {
        done: 0,
        failed: 0,
        first_error: None,
        latency: payload::histogram()?,
        elapsed: 0.0,
    };
    for task in tasks {
        let (latency, done, failed, first_error) = task.await??;
        tally.latency.add(&latency)?;
        tally.done += done;
        tally.failed += failed;
        if tally.first_error.is_none() {
            tally.first_error = first_error;
        }
    }
    tally.elapsed = start.elapsed().as_secs_f64();
    Ok(tally)
}
