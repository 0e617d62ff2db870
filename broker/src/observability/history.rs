//! The console's charts: a short, bounded history of this node's rates and lags, kept in memory
//! by the admin listener and served as `GET /console/api/history`.
//!
//! Every [`SAMPLE_INTERVAL`] the sampler reads the same recorder `/metrics` renders and the
//! subscription registry, and appends one point to each series: publishes and deliveries per
//! second, refusals per second, the 99th percentile of live publish→deliver latency over the
//! interval, and each subscription's lag. Each series is a ring of [`SAMPLES`] points (ten
//! minutes), and at most [`MAX_SUBSCRIPTION_SERIES`] subscriptions have a lag series, so the
//! history's size does not depend on traffic or on how long the broker runs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::admin::Sources;
use super::metrics;
use crate::shutdown::ShutdownSignal;

/// How often a point is added to every series.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// Points kept per series: ten minutes at [`SAMPLE_INTERVAL`].
pub(crate) const SAMPLES: usize = 300;
/// Subscriptions with a lag series at once. Beyond it, a new subscription takes the place of one
/// that ended, or of the live one with the smallest peak lag if its own lag is larger; the rest
/// are counted in `subscriptions_omitted`.
pub(crate) const MAX_SUBSCRIPTION_SERIES: usize = 16;

/// The counters a point is computed from, cumulative since the process started.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Counters {
    /// Accepted publishes (stored and ephemeral) on this node.
    pub published: f64,
    /// Deliveries to this node's subscribers (stored and ephemeral messages).
    pub delivered: f64,
    /// Refused publishes, access refusals and entity refusals.
    pub refused: f64,
    /// The live publish→deliver histogram: (upper bound in seconds, cumulative count), in
    /// increasing bound order, the last one `+Inf`.
    pub latency_buckets: Vec<(f64, f64)>,
}

/// What one sample reads.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// When it was read (for the rates).
    pub at: Instant,
    /// The wall clock then, in µs since the epoch (for the charts' time axis).
    pub time_us: u64,
    /// The counters.
    pub counters: Counters,
    /// The live subscriptions: (id, pattern, lag).
    pub subscriptions: Vec<(u64, String, u64)>,
}

/// A fixed-size ring of points; `None` where there was nothing to compute (no previous sample,
/// no delivery in the interval, a subscription not live then).
type Series = VecDeque<Option<f64>>;

fn push(series: &mut Series, value: Option<f64>) {
    if series.len() == SAMPLES {
        series.pop_front();
    }
    series.push_back(value);
}

#[derive(Debug)]
struct SubscriptionSeries {
    id: u64,
    pattern: String,
    live: bool,
    lag: Series,
}

impl SubscriptionSeries {
    fn peak(&self) -> f64 {
        self.lag.iter().flatten().fold(0.0, |a, b| a.max(*b))
    }
}

/// The rings, behind one lock (a sample and a read each hold it briefly).
#[derive(Debug, Default)]
struct Rings {
    times_us: VecDeque<u64>,
    publish_rate: Series,
    delivery_rate: Series,
    refusal_rate: Series,
    deliver_p99_s: Series,
    subscriptions: Vec<SubscriptionSeries>,
    subscriptions_omitted: usize,
    previous: Option<(Instant, Counters)>,
}

/// The console's history: cheap to clone, shared by the sampler and the HTTP handlers.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    rings: Arc<Mutex<Rings>>,
}

impl History {
    /// An empty history.
    pub(crate) fn new() -> History {
        History::default()
    }

    fn rings(&self) -> std::sync::MutexGuard<'_, Rings> {
        // The rings hold plain numbers: one left half-updated by a panic is still safe to read.
        self.rings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one point to every series.
    pub(crate) fn record(&self, sample: Sample) {
        let mut rings = self.rings();
        let rings = &mut *rings;
        if rings.times_us.len() == SAMPLES {
            rings.times_us.pop_front();
        }
        rings.times_us.push_back(sample.time_us);

        let (mut publish, mut delivery, mut refusal, mut p99) = (None, None, None, None);
        let now = &sample.counters;
        if let Some((then, before)) = &rings.previous {
            let seconds = sample.at.saturating_duration_since(*then).as_secs_f64();
            if seconds > 0.0 {
                // To a thousandth: the JSON the page polls stays small.
                let rate = |a: f64, b: f64| Some(round((a - b).max(0.0) / seconds, 1e3));
                publish = rate(now.published, before.published);
                delivery = rate(now.delivered, before.delivered);
                refusal = rate(now.refused, before.refused);
            }
            p99 = quantile(0.99, &before.latency_buckets, &now.latency_buckets)
                .map(|seconds| round(seconds, 1e6));
        }
        push(&mut rings.publish_rate, publish);
        push(&mut rings.delivery_rate, delivery);
        push(&mut rings.refusal_rate, refusal);
        push(&mut rings.deliver_p99_s, p99);
        rings.previous = Some((sample.at, sample.counters));

        record_subscriptions(rings, sample.subscriptions);
    }

    /// The history as JSON for the page: the time axis, then each series with one point per time.
    pub(crate) fn to_json(&self) -> Value {
        let rings = self.rings();
        let subscriptions: Vec<Value> = rings
            .subscriptions
            .iter()
            .map(|s| json!({ "id": s.id, "pattern": s.pattern, "live": s.live, "lag": s.lag }))
            .collect();
        json!({
            "interval_s": SAMPLE_INTERVAL.as_secs_f64(),
            "capacity": SAMPLES,
            "max_subscription_series": MAX_SUBSCRIPTION_SERIES,
            "times_us": rings.times_us,
            "publish_rate": rings.publish_rate,
            "delivery_rate": rings.delivery_rate,
            "refusal_rate": rings.refusal_rate,
            "deliver_p99_s": rings.deliver_p99_s,
            "subscriptions": subscriptions,
            "subscriptions_omitted": rings.subscriptions_omitted,
        })
    }
}

/// Appends each tracked subscription's lag (`None` once it ended), drops series with nothing
/// left in the window, and gives free or reclaimable places to untracked live subscriptions,
/// the most lagging first.
fn record_subscriptions(rings: &mut Rings, mut live: Vec<(u64, String, u64)>) {
    for series in &mut rings.subscriptions {
        let now = live.iter().find(|(id, _, _)| *id == series.id);
        series.live = now.is_some();
        push(&mut series.lag, now.map(|(_, _, lag)| *lag as f64));
    }
    rings
        .subscriptions
        .retain(|s| s.lag.iter().any(Option::is_some));

    live.retain(|(id, _, _)| !rings.subscriptions.iter().any(|s| s.id == *id));
    live.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let points = rings.times_us.len();
    let mut omitted = 0;
    for (id, pattern, lag) in live {
        let lag = lag as f64;
        let place = if rings.subscriptions.len() < MAX_SUBSCRIPTION_SERIES {
            None
        } else if let Some(ended) = rings.subscriptions.iter().position(|s| !s.live) {
            Some(ended)
        } else {
            let quietest = rings
                .subscriptions
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.peak().total_cmp(&b.1.peak()))
                .filter(|(_, s)| s.peak() < lag)
                .map(|(i, _)| i);
            match quietest {
                Some(i) => Some(i),
                None => {
                    omitted += 1;
                    continue;
                }
            }
        };
        let mut series = SubscriptionSeries {
            id,
            pattern,
            live: true,
            lag: std::iter::repeat_n(None, points.saturating_sub(1)).collect(),
        };
        push(&mut series.lag, Some(lag));
        match place {
            Some(i) => rings.subscriptions[i] = series,
            None => rings.subscriptions.push(series),
        }
    }
    rings.subscriptions_omitted = omitted;
}

/// `value` rounded to a multiple of `1 / per_unit`.
fn round(value: f64, per_unit: f64) -> f64 {
    (value * per_unit).round() / per_unit
}

/// The `q` quantile of the observations made between two readings of a cumulative histogram,
/// interpolated linearly inside its bucket as Prometheus' `histogram_quantile` does; `None` when
/// nothing was observed in between. One in the `+Inf` bucket reads as the highest finite bound.
fn quantile(q: f64, before: &[(f64, f64)], now: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0.0, |(_, c)| *c);
            (*bound, (count - earlier).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, count) in &delta {
        if *count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let share = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (*bound, *count);
    }
    Some(lower.0)
}

/// Reads the counters from the text `/metrics` serves (without the scrape-time state, which the
/// sampler reads itself): whichever way a family is recorded, it is read as it is exported.
fn read_counters() -> Counters {
    parse_counters(&metrics::render(&metrics::Scrape::default()))
}

fn parse_counters(text: &str) -> Counters {
    let mut counters = Counters::default();
    let bucket = format!("{}_bucket", metrics::LIVE_PUBLISH_TO_DELIVER);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let has = |label: &str| labels.contains(label);
        match name {
            metrics::PUBLISHES if has("result=\"accepted\"") => counters.published += value,
            metrics::PUBLISHES if has("result=\"refused\"") => counters.refused += value,
            metrics::ACCESS_REFUSALS | metrics::ENTITY_REFUSALS => counters.refused += value,
            metrics::DELIVERIES => counters.delivered += value,
            metrics::EPHEMERAL if has("outcome=\"delivered\"") => counters.delivered += value,
            name if name == bucket => {
                let Some(le) = labels
                    .split_once("le=\"")
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map(|(le, _)| le)
                else {
                    continue;
                };
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    match le.parse() {
                        Ok(bound) => bound,
                        Err(_) => continue,
                    }
                };
                counters.latency_buckets.push((bound, value));
            }
            _ => {}
        }
    }
    counters.latency_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    counters
}

/// Samples into `history` every [`SAMPLE_INTERVAL`] until shutdown begins.
pub(crate) async fn sample(sources: Arc<Sources>, history: History, shutdown: ShutdownSignal) {
    let mut stopping = shutdown;
    let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopping.wait() => return,
        }
        // Both clocks at once: the page plots against the wall clock what was divided by the
        // monotonic one.
        let (at, time_us) = (Instant::now(), crate::message::now_us());
        let counters = read_counters();
        let last_offset = sources.progress.borrow().last_offset;
        let subscriptions = sources
            .registry
            .list()
            .iter()
            .map(|control| {
                let scraped = super::admin::subscription_scrape(control);
                let lag = scraped.lag(last_offset);
                (scraped.id, scraped.pattern, lag)
            })
            .collect();
        history.record(Sample {
            at,
            time_us,
            counters,
            subscriptions,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, published: f64, subscriptions: Vec<(u64, String, u64)>) -> Sample {
        Sample {
            at,
            time_us: 0,
            counters: Counters {
                published,
                ..Counters::default()
            },
            subscriptions,
        }
    }

    #[test]
    fn every_series_is_bounded_however_long_it_runs() {
        let history = History::new();
        let start = Instant::now();
        for i in 0..(SAMPLES * 3) {
            let subscriptions = (0..(MAX_SUBSCRIPTION_SERIES as u64 + 5))
                .map(|id| (id + i as u64, "a.>".to_owned(), id))
                .collect();
            history.record(sample(
                start + Duration::from_secs(2 * i as u64),
                i as f64,
                subscriptions,
            ));
        }
        let json = history.to_json();
        for name in [
            "times_us",
            "publish_rate",
            "delivery_rate",
            "refusal_rate",
            "deliver_p99_s",
        ] {
            assert_eq!(json[name].as_array().unwrap().len(), SAMPLES, "{name}");
        }
        let subscriptions = json["subscriptions"].as_array().unwrap();
        assert_eq!(subscriptions.len(), MAX_SUBSCRIPTION_SERIES);
        for s in subscriptions {
            assert_eq!(s["lag"].as_array().unwrap().len(), SAMPLES);
        }
        assert_eq!(json["publish_rate"][SAMPLES - 1], 0.5, "1 publish per 2 s");
    }

    #[test]
    fn a_new_subscription_takes_the_place_of_an_ended_one() {
        let history = History::new();
        let start = Instant::now();
        let first: Vec<_> = (0..MAX_SUBSCRIPTION_SERIES as u64)
            .map(|id| (id, "a".to_owned(), 0))
            .collect();
        history.record(sample(start, 0.0, first.clone()));
        // One ends, two arrive: the busier newcomer takes the ended one's place.
        let mut second = first[1..].to_vec();
        second.push((100, "b".to_owned(), 5));
        second.push((101, "c".to_owned(), 0));
        history.record(sample(start + SAMPLE_INTERVAL, 0.0, second));
        let json = history.to_json();
        let ids: Vec<u64> = json["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_u64().unwrap())
            .collect();
        assert!(ids.contains(&100) && !ids.contains(&0), "{ids:?}");
        assert_eq!(json["subscriptions_omitted"], 1, "{json}");
        let newcomer = json["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == 100)
            .unwrap();
        assert_eq!(
            newcomer["lag"],
            json!([null, 5.0]),
            "aligned with the time axis"
        );
    }

    #[test]
    fn the_quantile_is_of_the_interval_only() {
        let before = [(0.001, 100.0), (0.01, 100.0), (f64::INFINITY, 100.0)];
        let now = [(0.001, 100.0), (0.01, 200.0), (f64::INFINITY, 200.0)];
        // The 100 new observations are all in (1 ms, 10 ms]: p99 interpolates inside it.
        let p99 = quantile(0.99, &before, &now).unwrap();
        assert!((p99 - 0.00991).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.99, &now, &now), None, "nothing observed");
        let overflow = [(0.001, 0.0), (0.01, 0.0), (f64::INFINITY, 3.0)];
        assert_eq!(quantile(0.99, &[], &overflow), Some(0.01));
    }

    #[test]
    fn counters_are_read_from_the_exposition_text() {
        let text = "\
# TYPE switchboard_publishes_total counter
switchboard_publishes_total{result=\"accepted\"} 7
switchboard_publishes_total{result=\"refused\",reason=\"CHANNEL_INVALID\"} 2
switchboard_access_refusals_total{reason=\"ORIGIN_NOT_ALLOWED\"} 1
switchboard_deliveries_total{policy=\"lossless\"} 10
switchboard_ephemeral_messages_total{outcome=\"delivered\"} 3
switchboard_ephemeral_messages_total{outcome=\"published\"} 3
switchboard_live_publish_to_deliver_seconds_bucket{le=\"+Inf\"} 4
switchboard_live_publish_to_deliver_seconds_bucket{le=\"0.0005\"} 4
switchboard_live_publish_to_deliver_seconds_count 4
";
        let counters = parse_counters(text);
        assert_eq!(counters.published, 7.0);
        assert_eq!(counters.refused, 3.0);
        assert_eq!(counters.delivered, 13.0);
        assert_eq!(
            counters.latency_buckets,
            vec![(0.0005, 4.0), (f64::INFINITY, 4.0)]
        );
    }
}
