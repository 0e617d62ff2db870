//! The circuit breaker of a broker endpoint: after repeated failures of the endpoint, publishes
//! fail fast for a cooldown instead of each waiting on a broker that is down; then one probe goes
//! through, and its outcome closes the circuit or opens it again.
//!
//! ```text
//!            N endpoint failures in a row             cooldown over: one call
//!  Closed ─────────────────────────────▶ Open ─────────────────────────────▶ HalfOpen
//!    ▲                                    ▲                                    │
//!    │        the probe fails             └────────────────────────────────────┤
//!    └─────────────────────────────────────────────────────────────────────────┘
//!                                   the probe gets an answer
//! ```
//! Only failures that say the endpoint is unhealthy count (a lost connection, `NO_LEADER`, ...:
//! see `retry::is_endpoint_failure`); any answer from the broker, a refusal of the message
//! included, is a success here. While the probe is out every other call fails fast; a probe
//! abandoned before its answer (its future dropped) opens the circuit again at once, so the next
//! call probes instead.
//!
//! The time is passed in (`now`) so the state machine is tested without clocks.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::retry::is_endpoint_failure;

/// When a client's circuit breaker opens and how long it stays open; see
/// [`ConnectOptions::circuit_breaker`](crate::ConnectOptions::circuit_breaker).
///
/// Off by default. With [`CircuitPolicy::default`]: opens after 5 endpoint failures in a row, for
/// 5 s.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitPolicy {
    /// How many endpoint failures in a row open the circuit (at least 1). Default: 5.
    pub failure_threshold: u32,
    /// How long an open circuit fails calls fast before it lets a probe through. Default: 5 s.
    pub cooldown: Duration,
}

impl Default for CircuitPolicy {
    fn default() -> Self {
        CircuitPolicy {
            failure_threshold: 5,
            cooldown: Duration::from_secs(5),
        }
    }
}

impl CircuitPolicy {
    /// A policy that opens after `failures` endpoint failures in a row, for `cooldown`.
    pub fn new(failures: u32, cooldown: Duration) -> CircuitPolicy {
        CircuitPolicy {
            failure_threshold: failures.max(1),
            cooldown,
        }
    }
}

/// The state of a client's circuit breaker ([`Client::circuit_state`](crate::Client::circuit_state)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls fail fast with [`Error::CircuitOpen`] until the cooldown is over.
    Open,
    /// One probe is out; the other calls fail fast until its answer.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`, as in the tracing events.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
}

/// One endpoint's breaker, shared by the clones of a [`Client`](crate::Client).
#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    url: String,
    policy: CircuitPolicy,
    inner: Mutex<Inner>,
}

/// Leave to make one call, from [`CircuitBreaker::admit`]: its outcome must be recorded
/// ([`Permit::record`]); dropped unrecorded, a probe reopens the circuit.
#[derive(Debug)]
pub(crate) struct Permit {
    breaker: Arc<CircuitBreaker>,
    probe: bool,
    recorded: bool,
}

impl CircuitBreaker {
    pub(crate) fn new(url: String, policy: CircuitPolicy) -> CircuitBreaker {
        CircuitBreaker {
            url,
            policy,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state as calls last left it: an open circuit whose cooldown is over reads `Open`
    /// until the next call, which becomes the probe.
    pub(crate) fn state(&self) -> CircuitState {
        match self.lock().state {
            State::Closed => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen => CircuitState::HalfOpen,
        }
    }

    /// Lets a call through, or fails it fast with [`Error::CircuitOpen`].
    pub(crate) fn admit(self: &Arc<Self>, now: Instant) -> Result<Permit, Error> {
        let mut inner = self.lock();
        let probe = match inner.state {
            State::Closed => false,
            State::Open { until } if now >= until => {
                inner.state = State::HalfOpen;
                tracing::info!(
                    url = %self.url,
                    state = CircuitState::HalfOpen.as_str(),
                    "circuit half open: letting one probe through"
                );
                true
            }
            State::Open { until } => return Err(self.open_error(until - now)),
            State::HalfOpen => return Err(self.open_error(Duration::ZERO)),
        };
        Ok(Permit {
            breaker: Arc::clone(self),
            probe,
            recorded: false,
        })
    }

    fn open_error(&self, retry_in: Duration) -> Error {
        Error::CircuitOpen {
            url: self.url.clone(),
            retry_in,
        }
    }

    fn succeeded(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = 0;
        if !matches!(inner.state, State::Closed) {
            inner.state = State::Closed;
            tracing::info!(
                url = %self.url,
                state = CircuitState::Closed.as_str(),
                "circuit closed: the broker answers again"
            );
        }
    }

    fn failed(&self, probe: bool, now: Instant, error: &Error) {
        let mut inner = self.lock();
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let opens = match inner.state {
            State::HalfOpen => probe,
            State::Closed => inner.consecutive_failures >= self.policy.failure_threshold,
            // Already open: a call admitted before it opened does not extend the cooldown.
            State::Open { .. } => false,
        };
        if opens {
            inner.state = State::Open {
                until: now + self.policy.cooldown,
            };
            tracing::warn!(
                url = %self.url,
                state = CircuitState::Open.as_str(),
                failures = inner.consecutive_failures,
                cooldown_ms = self.policy.cooldown.as_millis() as u64,
                %error,
                "circuit open: failing calls fast"
            );
        }
    }

    /// A probe went away without an answer: the next call probes again.
    fn abandoned(&self, now: Instant) {
        let mut inner = self.lock();
        if matches!(inner.state, State::HalfOpen) {
            inner.state = State::Open { until: now };
        }
    }
}

impl Permit {
    /// Records the outcome of the call this permit admitted.
    pub(crate) fn record<T>(mut self, outcome: &Result<T, Error>, now: Instant) {
        self.recorded = true;
        match outcome {
            Err(error) if is_endpoint_failure(error) => self.breaker.failed(self.probe, now, error),
            _ => self.breaker.succeeded(),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.breaker.abandoned(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Result<(), Error> {
        Err(Error::from(tonic::Status::unavailable(
            "connection refused",
        )))
    }

    fn refused() -> Result<(), Error> {
        Err(Error::from(tonic::Status::invalid_argument("bad channel")))
    }

    fn breaker() -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new(
            "http://b:1".to_owned(),
            CircuitPolicy::new(3, Duration::from_secs(5)),
        ))
    }

    #[test]
    fn opens_after_consecutive_failures_fails_fast_then_probes_and_closes() {
        let breaker = breaker();
        let t0 = Instant::now();
        for _ in 0..2 {
            breaker.admit(t0).unwrap().record(&down(), t0);
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        breaker.admit(t0).unwrap().record(&down(), t0);
        assert_eq!(breaker.state(), CircuitState::Open);

        // Fails fast during the cooldown, saying how long is left.
        let later = t0 + Duration::from_secs(2);
        match breaker.admit(later).unwrap_err() {
            Error::CircuitOpen { url, retry_in } => {
                assert_eq!(url, "http://b:1");
                assert_eq!(retry_in, Duration::from_secs(3));
            }
            other => panic!("unexpected {other:?}"),
        }

        // After it, one probe goes through; the others still fail fast.
        let after = t0 + Duration::from_secs(5);
        let probe = breaker.admit(after).unwrap();
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        assert!(matches!(
            breaker.admit(after),
            Err(Error::CircuitOpen { .. })
        ));
        probe.record(&Ok(()), after);
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(breaker.admit(after).is_ok());
    }

    #[test]
    fn a_failed_probe_opens_the_circuit_for_another_cooldown() {
        let breaker = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            breaker.admit(t0).unwrap().record(&down(), t0);
        }
        let t1 = t0 + Duration::from_secs(5);
        breaker.admit(t1).unwrap().record(&down(), t1);
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(breaker.admit(t1 + Duration::from_secs(4)).is_err());
        assert!(breaker.admit(t1 + Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn a_refusal_is_an_answer_and_resets_the_count() {
        let breaker = breaker();
        let t0 = Instant::now();
        for _ in 0..2 {
            breaker.admit(t0).unwrap().record(&down(), t0);
        }
        breaker.admit(t0).unwrap().record(&refused(), t0);
        for _ in 0..2 {
            breaker.admit(t0).unwrap().record(&down(), t0);
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let breaker = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            breaker.admit(t0).unwrap().record(&down(), t0);
        }
        let t1 = t0 + Duration::from_secs(5);
        drop(breaker.admit(t1).unwrap());
        assert_eq!(breaker.state(), CircuitState::Open);
        let probe = breaker.admit(t1).unwrap();
        probe.record(&Ok(()), t1);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
}
