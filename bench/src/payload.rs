//! Message bodies and latency histograms.
//!
//! Every body is JSON (Switchboard validates JSON payloads; NATS gets the very same bytes):
//! `{"s":"0000000042","t":"00000000001234567890","p":"xxxx…"}`, padded to the requested size.
//! `s` is the message's sequence number and `t` the time it was sent, in nanoseconds since the
//! benchmark started ([`now_ns`]); both have fixed widths, so a receiver reads them without
//! parsing the JSON.

use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::Metric;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the benchmark process first asked (one clock for publishers and receivers,
/// which live in the same process).
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

const SEQ_AT: usize = 6;
const SEQ_LEN: usize = 10;
const TIME_AT: usize = SEQ_AT + SEQ_LEN + 7;
const TIME_LEN: usize = 20;
/// The bytes before the padding: `{"s":"..........","t":"....................","p":"` plus `"}`.
const OVERHEAD: usize = TIME_AT + TIME_LEN + 9;

/// A body of `size` bytes (at least the 52 the header and the padding's quotes need) carrying `seq` and `sent_ns`.
pub fn encode(seq: u64, sent_ns: u64, size: usize) -> Bytes {
    let padding = size.saturating_sub(OVERHEAD);
    let mut body = String::with_capacity(OVERHEAD + padding);
    body.push_str(&format!(
        "{{\"s\":\"{seq:010}\",\"t\":\"{sent_ns:020}\",\"p\":\""
    ));
    body.extend(std::iter::repeat_n('x', padding));
    body.push_str("\"}");
    Bytes::from(body)
}

/// Queues W1k's bodies name, in turn: the group a KPI view splits them by.
pub const KPI_QUEUES: u64 = 10;

/// [`encode`]'s body with what a telemetry event carries for KPI views (W1k): a duration
/// `"ms"` (a number, 0–1999 ms, spread over the sequence) and a queue `"q"` (one of
/// [`KPI_QUEUES`]), still `size` bytes and still read by [`decode`].
pub fn encode_kpi(seq: u64, sent_ns: u64, size: usize) -> Bytes {
    let fields = format!(
        "\"ms\":{},\"q\":\"q{}\",",
        (seq * 7919) % 2000,
        seq % KPI_QUEUES
    );
    let padding = size.saturating_sub(OVERHEAD + fields.len());
    let mut body = String::with_capacity(OVERHEAD + fields.len() + padding);
    body.push_str(&format!(
        "{{\"s\":\"{seq:010}\",\"t\":\"{sent_ns:020}\",{fields}\"p\":\""
    ));
    body.extend(std::iter::repeat_n('x', padding));
    body.push_str("\"}");
    Bytes::from(body)
}

/// The sequence number and send time of a body made by [`encode`].
pub fn decode(body: &[u8]) -> Option<(u64, u64)> {
    let seq = std::str::from_utf8(body.get(SEQ_AT..SEQ_AT + SEQ_LEN)?).ok()?;
    let sent = std::str::from_utf8(body.get(TIME_AT..TIME_AT + TIME_LEN)?).ok()?;
    Some((seq.parse().ok()?, sent.parse().ok()?))
}

/// The send time in an entity's fields (`{"t":"<ns>", ...}`, W4), wherever the field is.
pub fn entity_time(fields: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(fields).ok()?;
    value.get("t")?.as_str()?.parse().ok()
}

/// The fields of one W4 update: the send time and a counter.
pub fn entity_fields(sent_ns: u64, n: u64) -> serde_json::Value {
    serde_json::json!({ "t": format!("{sent_ns:020}"), "n": n, "agent": "bench" })
}

/// A histogram of latencies in microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?)
}

/// Records a latency given in nanoseconds.
pub fn record_ns(histogram: &mut Histogram<u64>, ns: u64) {
    histogram.saturating_record((ns / 1_000).max(1));
}

/// The quantiles of `histogram` that `names` names, in µs.
pub fn latency_metrics(histogram: &Histogram<u64>, names: LatencyNames) -> Vec<Metric> {
    let mut metrics = vec![
        Metric::lower(names.p50, "µs", histogram.value_at_quantile(0.50) as f64),
        Metric::lower(names.p99, "µs", histogram.value_at_quantile(0.99) as f64),
    ];
    if let Some(p90) = names.p90 {
        metrics.insert(
            1,
            Metric::lower(p90, "µs", histogram.value_at_quantile(0.90) as f64),
        );
    }
    if let Some(p999) = names.p999 {
        metrics.push(Metric::lower(
            p999,
            "µs",
            histogram.value_at_quantile(0.999) as f64,
        ));
    }
    if let Some(max) = names.max {
        metrics.push(Metric::lower(max, "µs", histogram.max() as f64));
    }
    metrics
}

/// The metric names of one latency distribution (static, so rows can be matched by name).
pub struct LatencyNames {
    pub p50: &'static str,
    pub p90: Option<&'static str>,
    pub p99: &'static str,
    pub p999: Option<&'static str>,
    pub max: Option<&'static str>,
}

pub const ACK_LATENCY: LatencyNames = LatencyNames {
    p50: "ack latency p50",
    p90: None,
    p99: "ack latency p99",
    p999: None,
    max: None,
};

pub const DELIVERY_LATENCY: LatencyNames = LatencyNames {
    p50: "publish→receive p50",
    p90: Some("publish→receive p90"),
    p99: "publish→receive p99",
    p999: Some("publish→receive p99.9"),
    max: Some("publish→receive max"),
};

pub const WATCH_LATENCY: LatencyNames = LatencyNames {
    p50: "update→watch p50",
    p90: None,
    p99: "update→watch p99",
    p999: None,
    max: Some("update→watch max"),
};

/// How long before a due time the pacer stops sleeping and spins. Linux lets a sleep end up to
/// its timer slack (50 µs by default) late, so a sleep to this much before the due time ends
/// close to it, and the spin covers the rest.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// Calls `send(seq)` for `seq` in `0..total`, message `seq` due at `seq / rate` seconds after the
/// start (never earlier; late ones go at once, so a stall shows as latency). Returns how late the
/// latest send was, in µs.
///
/// The schedule is kept by an OS thread of its own: the calling worker thread leaves the runtime
/// for the whole run (`block_in_place`; another takes its place), sleeps to `SPIN` before each
/// absolute due time, spins to it, and runs the send there. The tokio timer would not do: it
/// wakes on 1 ms ticks, so at 5,000 msgs/s it sends ~5 messages at once, and a broker commits
/// them as one log entry; paced exactly, each message is an entry of its own, as a steady
/// stream of independent publishers makes them. Needs the multi-threaded runtime.
pub async fn paced<F, Fut>(total: u64, rate: u32, mut send: F) -> anyhow::Result<u64>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        let start = Instant::now();
        let period_ns = 1_000_000_000u64 / u64::from(rate.max(1));
        let mut worst_late_us = 0u64;
        for seq in 0..total {
            let due = start + std::time::Duration::from_nanos(seq * period_ns);
            wait_until(due);
            let late = Instant::now().saturating_duration_since(due);
            worst_late_us = worst_late_us.max(u64::try_from(late.as_micros()).unwrap_or(u64::MAX));
            runtime.block_on(send(seq))?;
        }
        Ok(worst_late_us)
    })
}

/// Sleeps until [`SPIN`] before `due`, then spins until `due` (returns at once if it has passed).
fn wait_until(due: Instant) {
    let early = due.saturating_duration_since(Instant::now());
    if early > SPIN {
        std::thread::sleep(early - SPIN);
    }
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

/// Notes a publisher that fell more than 5 ms behind its schedule.
pub fn lateness_note(late_us: u64, outcome: &mut crate::Outcome) {
    if late_us > 5_000 {
        outcome.notes.push(format!(
            "the publisher fell behind its schedule by up to {:.1} ms",
            late_us as f64 / 1000.0
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips_and_is_json_of_the_right_size() {
        let body = encode(42, 1_234_567_890, 1024);
        assert_eq!(body.len(), 1024);
        assert_eq!(decode(&body), Some((42, 1_234_567_890)));
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["s"], "0000000042");
    }

    #[test]
    fn kpi_bodies_are_json_of_the_right_size_and_still_decode() {
        let body = encode_kpi(42, 7, 1024);
        assert_eq!(body.len(), 1024);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["ms"], (42 * 7919) % 2000);
        assert_eq!(value["q"], "q2");
        assert_eq!(decode(&body), Some((42, 7)));
    }

    #[test]
    fn small_bodies_keep_their_header() {
        let body = encode(7, 9, 10);
        assert_eq!(body.len(), OVERHEAD);
        assert_eq!(decode(&body), Some((7, 9)));
    }

    #[test]
    fn entity_fields_carry_the_time() {
        let fields = entity_fields(123_456, 3);
        let bytes = serde_json::to_vec(&fields).unwrap();
        assert_eq!(entity_time(&bytes), Some(123_456));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_sends_every_message_once_in_order_and_stops_at_a_failure() {
        let mut sent = Vec::new();
        paced(50, 1_000_000, |seq| {
            sent.push(seq);
            async { Ok(()) }
        })
        .await
        .unwrap();
        assert_eq!(sent, (0..50).collect::<Vec<u64>>());

        let mut tried = Vec::new();
        let result = paced(50, 1_000_000, |seq| {
            tried.push(seq);
            async move {
                if seq == 3 {
                    anyhow::bail!("the stream closed");
                }
                Ok(())
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(tried, vec![0, 1, 2, 3]);
    }

    #[test]
    fn histogram_reports_quantiles_in_microseconds() {
        let mut h = histogram().unwrap();
        for us in 1..=1000u64 {
            record_ns(&mut h, us * 1_000);
        }
        let metrics = latency_metrics(&h, DELIVERY_LATENCY);
        assert_eq!(metrics.len(), 5);
        assert!((metrics[0].value - 500.0).abs() <= 1.0);
        assert!((metrics[4].value - 1000.0).abs() <= 1.0);
    }
}
