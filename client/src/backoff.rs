//! [`Backoff`]: the growing, randomized delay between attempts, one type for every loop that
//! tries again (a subscription resuming, a publish retrying, the outbox flushing).
//!
//! Why randomize: clients cut off by the same outage fail at the same moment; with a fixed
//! schedule they would all come back at the same moments too, and a broker that has just
//! restarted (or a new leader) would meet every one of them at once, again and again. A random
//! delay spreads them out. Two spreads are offered:
//! - [`Jitter::Equal`], uniform in `[base / 2, base]`: never much shorter than the schedule, for a
//!   subscription that wants to come back soon but not in lockstep;
//! - [`Jitter::Full`], uniform in `[0, base]`: the widest spread (and so the least load on the
//!   recovering broker for the same number of clients), for publishes, which many clients make at
//!   once.

use std::time::Duration;

use rand::Rng;

/// How a [`Backoff`] randomizes each delay around its base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Jitter {
    /// Uniformly in `[base / 2, base]` (the default).
    #[default]
    Equal,
    /// Uniformly in `[0, base]`: "full jitter".
    Full,
}

/// Exponential backoff with jitter: the base delay starts at `initial`, doubles after every
/// attempt up to `max`, and each actual delay is drawn around the base as its [`Jitter`] says
/// (by default uniformly from `[base / 2, base]`), so many clients cut off at once do not come
/// back in lockstep.
///
/// ```
/// use std::time::Duration;
/// use switchboard_client::{Backoff, Jitter};
///
/// let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
///     .jitter(Jitter::Full);
/// let first = backoff.next_delay();
/// assert!(first <= Duration::from_millis(50));
/// ```
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    base: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A backoff starting at `initial` and growing to at most `max` (`max` is raised to `initial`
    /// if it is smaller), with [`Jitter::Equal`].
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            base: initial,
            jitter: Jitter::Equal,
        }
    }

    /// This backoff with another spread.
    pub fn jitter(mut self, jitter: Jitter) -> Backoff {
        self.jitter = jitter;
        self
    }

    /// The base delay for the next attempt (before jitter), which then doubles up to the cap.
    pub fn next_base(&mut self) -> Duration {
        let base = self.base;
        self.base = self.base.saturating_mul(2).min(self.max);
        base
    }

    /// The delay to wait before the next attempt: [`Backoff::next_base`] with jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_from(&mut rand::thread_rng())
    }

    /// [`Backoff::next_delay`], drawing from `rng` (a seeded one makes a schedule repeatable).
    pub fn next_delay_from(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.next_base();
        let low = match self.jitter {
            Jitter::Equal => base / 2,
            Jitter::Full => Duration::ZERO,
        };
        if base <= low {
            return base;
        }
        rng.gen_range(low..=base)
    }

    /// Starts over from the initial delay (after a successful attempt).
    pub fn reset(&mut self) {
        self.base = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let bases: Vec<u128> = (0..10).map(|_| backoff.next_base().as_millis()).collect();
        assert_eq!(
            bases,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        backoff.reset();
        assert_eq!(backoff.next_base(), Duration::from_millis(50));
    }

    #[test]
    fn equal_jitter_stays_within_half_to_full_base() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut base = Duration::from_millis(50);
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay >= base / 2 && delay <= base, "{delay:?} vs {base:?}");
            base = (base * 2).min(Duration::from_secs(5));
        }
    }

    #[test]
    fn backoff_cap_below_initial_is_raised() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_millis(10));
        assert_eq!(backoff.next_base(), Duration::from_secs(1));
        assert_eq!(backoff.next_base(), Duration::from_secs(1));
        let mut zero = Backoff::new(Duration::ZERO, Duration::ZERO).jitter(Jitter::Full);
        assert_eq!(zero.next_delay(), Duration::ZERO);
    }

    /// The point of jitter: a thousand clients cut off at the same moment, each with its own
    /// backoff, do not retry at the same moments. For each of their first six retries, the delays
    /// the clients draw cover the whole `[0, base]` range (every tenth of it is used, none holds
    /// more than a fifth of the clients), and stay within it.
    #[test]
    fn full_jitter_spreads_the_retries_of_many_clients() {
        const CLIENTS: usize = 1000;
        let mut rng = StdRng::seed_from_u64(24);
        let mut clients: Vec<Backoff> = (0..CLIENTS)
            .map(|_| {
                Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
                    .jitter(Jitter::Full)
            })
            .collect();
        let mut base = Duration::from_millis(100);
        for attempt in 0..6 {
            let mut tenths = [0usize; 10];
            for client in &mut clients {
                let delay = client.next_delay_from(&mut rng);
                assert!(delay <= base, "attempt {attempt}: {delay:?} above {base:?}");
                let tenth = (delay.as_secs_f64() / base.as_secs_f64() * 10.0) as usize;
                tenths[tenth.min(9)] += 1;
            }
            assert!(
                tenths.iter().all(|&n| n > 0 && n < CLIENTS / 5),
                "attempt {attempt}: the delays bunch up: {tenths:?}"
            );
            base = (base * 2).min(Duration::from_secs(2));
        }
    }

    /// Without jitter (a zero-width range) every client would wait exactly the base: the
    /// schedule itself is the same for all of them, so only the draw spreads them.
    #[test]
    fn the_schedule_is_the_same_for_every_client_before_jitter() {
        let mut a = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..8 {
            assert_eq!(a.next_base(), b.next_base());
        }
    }
}
