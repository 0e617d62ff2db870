//! Histograms for the delivery path, where a value is recorded per delivery — hundreds of
//! thousands a second with many subscribers.
//!
//! The Prometheus exporter's histograms keep every sample in a lock-free list until its upkeep
//! folds them into buckets (every 5 s): per sample an epoch pin, two atomic read-modify-writes and
//! a block allocated every 64, and at 600k deliveries a second with three histograms, 70 MB of
//! samples waiting between upkeeps. Here instead a histogram is a fixed array of bucket counters
//! ([`FixedHistogram`]), and each subscription task tallies its deliveries in plain integers
//! ([`Tally`]) that it adds to the shared counters once per batch, so a delivery costs a bucket
//! search and three additions to memory no other core touches.
//!
//! The text rendered is the standard histogram exposition (`_bucket{le}`, `_sum`, `_count`), the
//! same families as before, present from start.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed bucket bounds (seconds) and atomic counters: bounded memory whatever
/// the rate, readable at any time.
pub(crate) struct FixedHistogram {
    /// Upper bounds of the buckets, ascending; a last bucket (`+Inf`) follows them.
    bounds: &'static [f64],
    /// Samples per bucket (not cumulative), `bounds.len() + 1` of them.
    buckets: Box<[AtomicU64]>,
    /// The sum of the samples, in nanoseconds (integers add atomically; f64 seconds do not).
    sum_nanos: AtomicU64,
}

impl FixedHistogram {
    /// An empty histogram over `bounds` (ascending upper bounds, in seconds).
    pub(crate) fn new(bounds: &'static [f64]) -> FixedHistogram {
        FixedHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// A tally for one task to record into without touching shared memory (see [`Tally`]).
    pub(crate) fn tally(&'static self) -> Tally {
        Tally {
            histogram: self,
            buckets: vec![0; self.bounds.len() + 1].into_boxed_slice(),
            sum_nanos: 0,
            count: 0,
        }
    }

    /// Records one sample directly (for call sites that record rarely).
    pub(crate) fn record(&self, seconds: f64) {
        let bucket = bucket_of(self.bounds, seconds);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos(seconds), Ordering::Relaxed);
    }

    /// Writes the histogram's samples as `name` with `labels` (already formatted as
    /// `key="value"` pairs, comma separated; empty for none). The caller writes `# HELP`/`# TYPE`.
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(bound) => bound.to_string(),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }

    /// Samples recorded so far.
    #[cfg(test)]
    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// One task's samples of a [`FixedHistogram`] not yet added to it: recording touches only this
/// task's memory; [`Tally::flush`] adds them to the shared counters. Flushed when dropped too.
pub(crate) struct Tally {
    histogram: &'static FixedHistogram,
    buckets: Box<[u64]>,
    sum_nanos: u64,
    count: u64,
}

impl Tally {
    /// Samples held before [`Tally::record`] flushes by itself, so a long replay shows in the
    /// histogram while it runs.
    const FLUSH_EVERY: u64 = 1024;

    /// Records one sample in seconds.
    pub(crate) fn record(&mut self, seconds: f64) {
        self.buckets[bucket_of(self.histogram.bounds, seconds)] += 1;
        self.sum_nanos = self.sum_nanos.saturating_add(nanos(seconds));
        self.count += 1;
        if self.count >= Self::FLUSH_EVERY {
            self.flush();
        }
    }

    /// Adds the samples held to the shared histogram.
    pub(crate) fn flush(&mut self) {
        if self.count == 0 {
            return;
        }
        for (held, shared) in self.buckets.iter_mut().zip(self.histogram.buckets.iter()) {
            if *held > 0 {
                shared.fetch_add(*held, Ordering::Relaxed);
                *held = 0;
            }
        }
        self.histogram
            .sum_nanos
            .fetch_add(self.sum_nanos, Ordering::Relaxed);
        self.sum_nanos = 0;
        self.count = 0;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The bucket a sample falls in: the first whose upper bound is at least the sample (the
/// Prometheus `le` rule), or the last (`+Inf`). NaN counts as +Inf.
fn bucket_of(bounds: &[f64], seconds: f64) -> usize {
    if seconds.is_nan() {
        return bounds.len();
    }
    bounds.partition_point(|bound| *bound < seconds)
}

fn nanos(seconds: f64) -> u64 {
    // `as` saturates: negative and NaN become 0, huge values u64::MAX.
    (seconds * 1e9) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    static BOUNDS: &[f64] = &[0.001, 0.01, 0.1];

    #[test]
    fn samples_fall_in_the_first_bucket_whose_bound_holds_them() {
        assert_eq!(bucket_of(BOUNDS, 0.0), 0);
        assert_eq!(
            bucket_of(BOUNDS, 0.001),
            0,
            "le: a bound holds its own value"
        );
        assert_eq!(bucket_of(BOUNDS, 0.0011), 1);
        assert_eq!(bucket_of(BOUNDS, 0.1), 2);
        assert_eq!(bucket_of(BOUNDS, 7.0), 3, "over every bound: +Inf");
        assert_eq!(bucket_of(BOUNDS, f64::NAN), 3);
    }

    #[test]
    fn a_tally_reaches_the_histogram_when_flushed_dropped_or_full() {
        let histogram: &'static FixedHistogram = Box::leak(Box::new(FixedHistogram::new(BOUNDS)));
        let mut tally = histogram.tally();
        tally.record(0.005);
        tally.record(0.5);
        assert_eq!(histogram.count(), 0, "held by the task until flushed");
        tally.flush();
        assert_eq!(histogram.count(), 2);
        tally.record(0.0001);
        drop(tally);
        assert_eq!(histogram.count(), 3, "dropping flushes");
        let mut tally = histogram.tally();
        for _ in 0..Tally::FLUSH_EVERY {
            tally.record(0.05);
        }
        assert_eq!(
            histogram.count(),
            3 + Tally::FLUSH_EVERY,
            "a full tally flushes itself"
        );
        histogram.record(0.0005);
        assert_eq!(histogram.count(), 4 + Tally::FLUSH_EVERY);
    }

    #[test]
    fn renders_cumulative_buckets_sum_and_count() {
        let histogram: &'static FixedHistogram = Box::leak(Box::new(FixedHistogram::new(BOUNDS)));
        histogram.record(0.0005);
        histogram.record(0.05);
        histogram.record(3.0);
        let mut out = String::new();
        histogram.render(&mut out, "x_seconds", "stage=\"a\"");
        assert_eq!(
            out,
            "x_seconds_bucket{stage=\"a\",le=\"0.001\"} 1\n\
             x_seconds_bucket{stage=\"a\",le=\"0.01\"} 1\n\
             x_seconds_bucket{stage=\"a\",le=\"0.1\"} 2\n\
             x_seconds_bucket{stage=\"a\",le=\"+Inf\"} 3\n\
             x_seconds_sum{stage=\"a\"} 3.0505\n\
             x_seconds_count{stage=\"a\"} 3\n"
        );
        let mut bare = String::new();
        FixedHistogram::new(BOUNDS).render(&mut bare, "y", "");
        assert!(bare.starts_with("y_bucket{le=\"0.001\"} 0\n"), "{bare}");
        assert!(bare.ends_with("y_sum 0\ny_count 0\n"), "{bare}");
    }
}
