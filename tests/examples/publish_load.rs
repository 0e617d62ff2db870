//! A small load generator for quick, reproducible measurements (the full side-by-side benchmark
//! against NATS is its own tool). Publishes N messages of SIZE bytes to one channel over one
//! `PublishStream` with at most WINDOW unacknowledged, and prints throughput and ack latency.
//!
//! ```text
//! cargo run --release -p switchboard-e2e --example publish_load -- http://127.0.0.1:7400 200000 1024 256
//! ```
// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchboard_client::{split_stream_ack, Client, Publish};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:7400".into());
    let count: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200_000);
    let size: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let window: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(256);

    let client = Client::connect(url).await?;
    // A JSON string payload of the requested size.
    let payload = bytes::Bytes::from(format!("\"{}\"", "x".repeat(size.saturating_sub(2))));
    let (publisher, mut acks) = client.publisher(window);
    // At most `window` messages are sent and not yet acknowledged.
    let unacked = std::sync::Arc::new(tokio::sync::Semaphore::new(window));
    let sent_at = std::sync::Arc::new(std::sync::Mutex::new(VecDeque::with_capacity(window)));
    let start = Instant::now();
    let producer = {
        let sent_at = sent_at.clone();
        let payload = payload.clone();
        let unacked = unacked.clone();
        tokio::spawn(async move {
            for _ in 0..count {
                unacked.acquire().await?.forget();
                sent_at.lock().unwrap().push_back(Instant::now());
                publisher
                    .send(Publish::new("bench.w1.publish", payload.clone()))
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut latencies = Vec::with_capacity(count);
    let mut refused = 0usize;
    while latencies.len() + refused < count {
        let Some(ack) = acks.next().await else { break };
        let sent = sent_at.lock().unwrap().pop_front();
        unacked.add_permits(1);
        if split_stream_ack(ack?).1.is_err() {
            refused += 1;
        }
        if let Some(sent) = sent {
            latencies.push(sent.elapsed());
        }
    }
    producer.await??;
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let rate = count as f64 / elapsed.as_secs_f64();
    println!(
        "{count} msgs of {size} B, window {window}: {rate:.0} msgs/s, {:.1} MB/s, ack p50 {:?} p99 {:?} max {:?}, refused {refused}, in {:.2?}",
        rate * size as f64 / 1e6,
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or(Duration::ZERO),
        elapsed
    );
    Ok(())
}
