//! Token-bucket rate limits keyed by principal or connection, in bounded memory.
//!
//! Why this shape:
//! - The clock is an argument (`check(key, now)`), so every rule is tested exactly, without
//!   sleeping, and the edge passes one `Instant` per call.
//! - The bucket is kept as GCRA's "theoretical arrival time" in integer nanoseconds rather than a
//!   floating-point token count: refills are exact, a retry hint is precise, and a bucket that has
//!   refilled completely is recognisable (`tat <= now`) — it holds no information and can be
//!   dropped.
//! - The number of keys is bounded whatever keys arrive: a new key beyond the bound evicts the
//!   least recently used one (an idle, refilled bucket is always the first to go, and dropping it
//!   loses nothing; dropping a busy one only hands that key a fresh burst). [`TokenBuckets::sweep`]
//!   drops every refilled bucket, for a periodic trim.
//! - [`RateLimiter`] shares buckets between tasks behind sharded mutexes, so concurrent calls for
//!   different keys rarely contend; each critical section is a hash lookup and a B-tree update.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A rate: `per_second` calls on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained calls per second; fractions allowed (`0.5` is one call every two seconds).
    pub per_second: f64,
    /// Calls allowed back to back after an idle period (the bucket's capacity); at least 1.
    pub burst: u32,
}

/// A [`RateLimit`] or limiter that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum RateLimitError {
    /// The rate is not a finite number above zero, or so small or large that one call's interval
    /// is not representable (over ~584 years, or under a nanosecond).
    #[error("rate limit per_second must be a positive finite number with an interval from 1 ns to ~584 years, got {0}")]
    InvalidRate(f64),
    /// A burst of zero would refuse everything.
    #[error("rate limit burst must be at least 1")]
    ZeroBurst,
    /// A bound of zero keys would keep no bucket.
    #[error("a rate limiter must keep at least one key (and have at least one shard)")]
    NoCapacity,
}

/// A refusal: the key has spent its budget; a call after the given time will be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded; retry after {} ms", retry_after_ms(.0))]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// The stable reason string for the status details (code `RESOURCE_EXHAUSTED`).
    pub fn reason(&self) -> &'static str {
        "RATE_LIMITED"
    }

    /// The wait rounded up to whole milliseconds, for a retry hint: retrying after it succeeds.
    pub fn millis(&self) -> u64 {
        retry_after_ms(&self.0)
    }
}

fn retry_after_ms(wait: &Duration) -> u64 {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// A rate limit in the form the buckets use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gcra {
    /// Time one call costs: `1 / per_second`.
    interval: Duration,
    /// Time a full bucket holds: `burst * interval`.
    window: Duration,
}

impl Gcra {
    fn new(limit: RateLimit) -> Result<Gcra, RateLimitError> {
        if limit.burst == 0 {
            return Err(RateLimitError::ZeroBurst);
        }
        let invalid = RateLimitError::InvalidRate(limit.per_second);
        if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
            return Err(invalid);
        }
        let interval = Duration::try_from_secs_f64(1.0 / limit.per_second)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid.clone())?;
        let window = interval.checked_mul(limit.burst).ok_or(invalid)?;
        Ok(Gcra { interval, window })
    }
}

/// Why a key's bucket is kept: when it next has a whole call available, and its place in the
/// least-recently-used order.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Theoretical arrival time: the bucket is full at and after it; each call pushes it one
    /// interval later, and a call is allowed while it stays within one window of now.
    tat: Instant,
    /// The key's position in [`TokenBuckets::order`].
    used: u64,
}

/// Token buckets for many keys, at most `max_keys` of them, for one owner (see [`RateLimiter`] to
/// share them).
#[derive(Debug)]
pub(crate) struct TokenBuckets<K> {
    gcra: Gcra,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
    /// Keys by last use, oldest first.
    order: BTreeMap<u64, K>,
    /// The next use stamp.
    next_use: u64,
}

impl<K: Hash + Eq + Clone> TokenBuckets<K> {
    /// Buckets of `limit` for at most `max_keys` keys.
    pub(crate) fn new(
        limit: RateLimit,
        max_keys: usize,
    ) -> Result<TokenBuckets<K>, RateLimitError> {
        if max_keys == 0 {
            return Err(RateLimitError::NoCapacity);
        }
        Ok(TokenBuckets {
            gcra: Gcra::new(limit)?,
            max_keys,
            buckets: HashMap::new(),
            order: BTreeMap::new(),
            next_use: 0,
        })
    }

    /// Takes one call from `key`'s bucket at `now`, or says how long until one is available. A
    /// refused call takes nothing. An unknown key starts with a full bucket; a `now` earlier than
    /// one already seen counts as no time passing.
    pub(crate) fn check(&mut self, key: &K, now: Instant) -> Result<(), RetryAfter> {
        let used = self.next_use;
        self.next_use += 1;
        match self.buckets.get(key) {
            Some(bucket) => {
                self.order.remove(&bucket.used);
            }
            None => {
                while self.buckets.len() >= self.max_keys {
                    let Some((_, oldest)) = self.order.pop_first() else {
                        break;
                    };
                    self.buckets.remove(&oldest);
                }
                self.buckets.insert(key.clone(), Bucket { tat: now, used });
            }
        }
        self.order.insert(used, key.clone());
        let Some(bucket) = self.buckets.get_mut(key) else {
            // Unreachable: the key was just found or inserted.
            return Err(RetryAfter(self.gcra.window));
        };
        bucket.used = used;
        let tat = bucket.tat.max(now);
        let Some(next_tat) = tat.checked_add(self.gcra.interval) else {
            // Unreachable for a bucket within one window of a real clock; refuse rather than panic.
            return Err(RetryAfter(self.gcra.window));
        };
        // The call is allowed if, after it, the bucket is at most one window ahead of now.
        match next_tat.checked_sub(self.gcra.window) {
            Some(allowed_at) if allowed_at > now => Err(RetryAfter(allowed_at - now)),
            _ => {
                bucket.tat = next_tat;
                Ok(())
            }
        }
    }

    /// Gives back one call [`TokenBuckets::check`] took from `key`, for a call that turned out not
    /// to count (a budget of failures, charged before the outcome is known). The bucket never
    /// holds more than its burst; an unknown key (refilled and swept, or evicted) is left alone.
    pub(crate) fn refund(&mut self, key: &K) {
        if let Some(bucket) = self.buckets.get_mut(key) {
            if let Some(tat) = bucket.tat.checked_sub(self.gcra.interval) {
                bucket.tat = tat;
            }
        }
    }

    /// Drops every bucket that has refilled completely by `now`: each would behave exactly as an
    /// unknown key. Returns how many were dropped.
    pub(crate) fn sweep(&mut self, now: Instant) -> usize {
        let before = self.buckets.len();
        let order = &mut self.order;
        self.buckets.retain(|_, bucket| {
            let keep = bucket.tat > now;
            if !keep {
                order.remove(&bucket.used);
            }
            keep
        });
        before - self.buckets.len()
    }

    /// Drops `key`'s bucket (its connection closed). Returns whether there was one.
    #[cfg(test)]
    pub(crate) fn forget(&mut self, key: &K) -> bool {
        match self.buckets.remove(key) {
            Some(bucket) => {
                self.order.remove(&bucket.used);
                true
            }
            None => false,
        }
    }

    /// How many keys have a bucket.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key has a bucket.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// What a limit is keyed by: the authenticated principal, or the connection for calls made before
/// or without authentication.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RateKey {
    /// A principal's subject.
    Principal(String),
    /// A connection's id.
    Connection(std::net::SocketAddr),
}

/// [`TokenBuckets`] shared between tasks: the keys are spread over shards, each behind its own
/// mutex, and the bound on keys is divided among the shards.
#[derive(Debug)]
pub(crate) struct RateLimiter<K> {
    shards: Box<[Mutex<TokenBuckets<K>>]>,
    hasher: RandomState,
}

/// Shards when the caller has no opinion: enough that a few busy keys rarely share a lock.
pub(crate) const DEFAULT_SHARDS: usize = 16;

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter of `limit` for at most `max_keys` keys (rounded up to a multiple of `shards`),
    /// spread over `shards` mutexes.
    pub(crate) fn new(
        limit: RateLimit,
        max_keys: usize,
        shards: usize,
    ) -> Result<RateLimiter<K>, RateLimitError> {
        if shards == 0 || max_keys == 0 {
            return Err(RateLimitError::NoCapacity);
        }
        let shards = shards.min(max_keys);
        let per_shard = max_keys.div_ceil(shards);
        let shards = (0..shards)
            .map(|_| TokenBuckets::new(limit, per_shard).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RateLimiter {
            shards: shards.into_boxed_slice(),
            hasher: RandomState::new(),
        })
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, TokenBuckets<K>> {
        let index = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        // A panic while holding the lock cannot leave a bucket half-updated in a way that matters
        // more than refusing every later call would, so a poisoned lock is used as is.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// [`TokenBuckets::check`] for `key`.
    pub(crate) fn check(&self, key: &K, now: Instant) -> Result<(), RetryAfter> {
        self.shard(key).check(key, now)
    }

    /// [`TokenBuckets::refund`] for `key`.
    pub(crate) fn refund(&self, key: &K) {
        self.shard(key).refund(key);
    }

    /// [`TokenBuckets::forget`] for `key`.
    #[cfg(test)]
    pub(crate) fn forget(&self, key: &K) -> bool {
        self.shard(key).forget(key)
    }

    /// [`TokenBuckets::sweep`] over every shard; returns how many buckets were dropped.
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .sweep(now)
            })
            .sum()
    }

    /// How many keys have a bucket.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no key has a bucket.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    fn buckets(per_second: f64, burst: u32, max_keys: usize) -> TokenBuckets<u32> {
        TokenBuckets::new(limit(per_second, burst), max_keys).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let mut b = buckets(10.0, 3, 10);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.check(&1, t0), Ok(()));
        }
        assert_eq!(b.check(&1, t0), Err(RetryAfter(ms(100))));
        // Refused calls take nothing: the hint does not grow.
        assert_eq!(b.check(&1, t0), Err(RetryAfter(ms(100))));
        assert_eq!(b.check(&1, t0 + ms(40)), Err(RetryAfter(ms(60))));
        assert_eq!(b.check(&1, t0 + ms(100)), Ok(()));
        assert_eq!(b.check(&1, t0 + ms(100)), Err(RetryAfter(ms(100))));
        // After a long idle period the bucket is full again, and no fuller than the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.check(&1, later), Ok(()));
        }
        assert!(b.check(&1, later).is_err());
    }

    #[test]
    fn fractional_rates_and_burst_of_one() {
        let mut b = buckets(0.5, 1, 10);
        let t0 = Instant::now();
        assert_eq!(b.check(&1, t0), Ok(()));
        assert_eq!(b.check(&1, t0), Err(RetryAfter(Duration::from_secs(2))));
        assert_eq!(b.check(&1, t0 + ms(1999)), Err(RetryAfter(ms(1))));
        assert_eq!(b.check(&1, t0 + ms(2000)), Ok(()));
    }

    #[test]
    fn keys_are_independent() {
        let mut b = buckets(1.0, 1, 10);
        let t0 = Instant::now();
        assert!(b.check(&1, t0).is_ok());
        assert!(b.check(&1, t0).is_err());
        assert!(b.check(&2, t0).is_ok());
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn clock_going_backwards_grants_nothing() {
        let mut b = buckets(1.0, 2, 10);
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(b.check(&1, t0).is_ok());
        assert!(b.check(&1, t0).is_ok());
        let earlier = t0 - Duration::from_secs(5);
        assert!(b.check(&1, earlier).is_err());
        assert_eq!(b.check(&1, t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn key_count_is_bounded_and_lru_evicted() {
        let mut b = buckets(1.0, 1, 3);
        let t0 = Instant::now();
        for key in 1..=3 {
            assert!(b.check(&key, t0).is_ok());
        }
        // Key 1 is used again (refused, but used), so key 2 is the least recently used.
        assert!(b.check(&1, t0).is_err());
        assert!(b.check(&4, t0).is_ok());
        assert_eq!(b.len(), 3);
        assert!(b.check(&1, t0).is_err(), "key 1 kept its spent bucket");
        assert!(b.check(&3, t0).is_err(), "key 3 kept its spent bucket");
        assert!(b.check(&2, t0).is_ok(), "key 2 was evicted and starts full");
        for key in 0..10_000 {
            let _ = b.check(&(key + 100), t0);
            assert!(b.len() <= 3);
            assert_eq!(b.order.len(), b.buckets.len());
        }
    }

    #[test]
    fn sweep_drops_only_refilled_buckets() {
        let mut b = buckets(1.0, 2, 10);
        let t0 = Instant::now();
        assert!(b.check(&1, t0).is_ok());
        assert!(b.check(&2, t0).is_ok());
        assert!(b.check(&2, t0).is_ok());
        assert_eq!(b.sweep(t0), 0);
        // Key 1 spent one call (refilled after 1 s), key 2 two (after 2 s).
        assert_eq!(b.sweep(t0 + ms(1000)), 1);
        assert_eq!(b.len(), 1);
        assert!(b.check(&2, t0 + ms(1000)).is_ok());
        assert_eq!(b.sweep(t0 + ms(3000)), 1);
        assert!(b.is_empty());
        assert!(b.order.is_empty());
    }

    #[test]
    fn a_refund_gives_back_one_call_and_never_more_than_the_burst() {
        let mut b = buckets(1.0, 2, 10);
        let t0 = Instant::now();
        assert!(b.check(&1, t0).is_ok());
        assert!(b.check(&1, t0).is_ok());
        assert!(b.check(&1, t0).is_err());
        b.refund(&1);
        assert!(b.check(&1, t0).is_ok(), "the refunded call");
        assert!(b.check(&1, t0).is_err());
        // Refunds beyond what was taken (or for an unknown key) add nothing.
        for _ in 0..5 {
            b.refund(&1);
            b.refund(&2);
        }
        assert!(b.check(&1, t0).is_ok());
        assert!(b.check(&1, t0).is_ok());
        assert!(b.check(&1, t0).is_err(), "still a burst of 2");
        assert_eq!(b.len(), 1, "a refund creates no bucket");
    }

    #[test]
    fn forget_drops_a_key() {
        let mut b = buckets(1.0, 1, 10);
        let t0 = Instant::now();
        assert!(b.check(&1, t0).is_ok());
        assert!(b.forget(&1));
        assert!(!b.forget(&1));
        assert!(b.is_empty() && b.order.is_empty());
        assert!(b.check(&1, t0).is_ok());
    }

    #[test]
    fn refuses_unusable_limits() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-30, 1e30] {
            assert!(
                matches!(
                    TokenBuckets::<u32>::new(limit(rate, 1), 1),
                    Err(RateLimitError::InvalidRate(_))
                ),
                "{rate}"
            );
        }
        assert!(matches!(
            TokenBuckets::<u32>::new(limit(1.0, 0), 1),
            Err(RateLimitError::ZeroBurst)
        ));
        assert!(matches!(
            TokenBuckets::<u32>::new(limit(1.0, 1), 0),
            Err(RateLimitError::NoCapacity)
        ));
        assert!(matches!(
            RateLimiter::<u32>::new(limit(1.0, 1), 10, 0),
            Err(RateLimitError::NoCapacity)
        ));
        // A long window overflows nothing: one call a day, a year's burst.
        assert!(TokenBuckets::<u32>::new(limit(1.0 / 86_400.0, 365), 1).is_ok());
    }

    #[test]
    fn retry_after_rounds_up_and_names_the_reason() {
        let r = RetryAfter(Duration::from_micros(1500));
        assert_eq!(r.millis(), 2);
        assert_eq!(RetryAfter(ms(3)).millis(), 3);
        assert_eq!(r.reason(), "RATE_LIMITED");
        assert!(r.to_string().contains("2 ms"), "{r}");
    }

    #[test]
    fn shared_limiter_counts_exactly_across_threads() {
        let limiter = Arc::new(
            RateLimiter::new(limit(1.0, 50), 1000, DEFAULT_SHARDS)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let now = Instant::now();
        let key = RateKey::Principal("agent-1".into());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                let key = key.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| limiter.check(&key, now).is_ok())
                        .count()
                })
            })
            .collect();
        let allowed: usize = threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| panic!("thread panicked")))
            .sum();
        assert_eq!(allowed, 50);
        assert!(limiter
            .check(&RateKey::Connection(([127, 0, 0, 1], 7).into()), now)
            .is_ok());
        assert_eq!(limiter.len(), 2);
        assert!(limiter.forget(&RateKey::Connection(([127, 0, 0, 1], 7).into())));
        assert_eq!(limiter.sweep(now + Duration::from_secs(60)), 1);
        assert!(limiter.is_empty());
    }

    #[test]
    fn shared_limiter_bounds_keys() {
        let limiter = RateLimiter::new(limit(1.0, 1), 64, 4).unwrap_or_else(|e| panic!("{e}"));
        let now = Instant::now();
        for key in 0..10_000u64 {
            let _ = limiter.check(&key, now);
        }
        assert!(limiter.len() <= 64, "{}", limiter.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Over any interval, a key is allowed at most `burst + rate * elapsed` calls, a refusal's
        /// hint is exact (one nanosecond earlier is still refused, at the hint it is allowed), and
        /// the map never exceeds its bound.
        #[test]
        fn never_more_than_the_rate_allows(
            per_second in prop::sample::select(vec![0.5, 1.0, 3.0, 10.0, 1000.0]),
            burst in 1u32..6,
            max_keys in 2usize..6,
            steps in prop::collection::vec((0u32..4, 0u64..700), 1..200),
        ) {
            let mut b = buckets(per_second, burst, max_keys);
            let t0 = Instant::now();
            let mut now = t0;
            let mut allowed: HashMap<u32, Vec<Instant>> = HashMap::new();
            let mut evicted = false;
            for (key, advance_ms) in steps {
                now += ms(advance_ms);
                let known = b.buckets.contains_key(&key);
                if !known && b.len() == max_keys {
                    evicted = true;
                }
                match b.check(&key, now) {
                    Ok(()) => allowed.entry(key).or_default().push(now),
                    Err(RetryAfter(wait)) => {
                        prop_assert!(!wait.is_zero());
                        let mut probe = buckets(per_second, burst, 1);
                        probe.buckets.insert(key, b.buckets[&key]);
                        probe.order.insert(b.buckets[&key].used, key);
                        prop_assert!(probe.check(&key, now + wait - Duration::from_nanos(1)).is_err());
                        prop_assert!(probe.check(&key, now + wait).is_ok());
                    }
                }
                prop_assert!(b.len() <= max_keys);
                prop_assert_eq!(b.order.len(), b.len());
            }
            if !evicted {
                for times in allowed.values() {
                    for (i, start) in times.iter().enumerate() {
                        for (j, end) in times.iter().enumerate().skip(i) {
                            let calls = (j - i + 1) as f64;
                            let elapsed = end.duration_since(*start).as_secs_f64();
                            prop_assert!(
                                calls <= f64::from(burst) + elapsed * per_second + 1e-6,
                                "{} calls in {}s at {}/s burst {}", calls, elapsed, per_second, burst
                            );
                        }
                    }
                }
            }
        }
    }
}
