//! [`RetryPolicy`]: when and how long a publish is tried again, and which failures are worth it.
//!
//! A retry is safe only because of idempotency keys: a publish whose fate is unknown (the
//! connection broke after the request left, `LEADER_UNREACHABLE`, `NO_QUORUM`) may have been
//! stored, and sending it again with the same key within the broker's `loops.dedup_window` is
//! answered `duplicate` with the original offset instead of storing a second copy. So under a
//! policy that retries, every publish carries a key: the caller's, or a UUID the client makes.
//!
//! Which failures are retried is one table, [`retry_after`]: the ones where the broker (or the
//! way to it) could not take the message now, never a refusal of the message itself.

use std::time::{Duration, Instant};

use switchboard_proto::Reason;
use tonic::Code;

use crate::backoff::{Backoff, Jitter};
use crate::error::Error;

/// How a publish is retried: exponential backoff with full jitter between attempts, for as long
/// as an overall deadline allows.
///
/// The default is **no retry**: one attempt, the broker's answer returned as it is (the
/// behaviour of earlier versions, which callers and tests rely on to see a refusal such as
/// `UNAVAILABLE NO_LEADER` at once). [`RetryPolicy::within`] turns retries on:
///
/// ```
/// use std::time::Duration;
/// use switchboard_client::{ConnectOptions, RetryPolicy};
///
/// let options = ConnectOptions::default().retry(RetryPolicy::within(Duration::from_secs(30)));
/// assert_eq!(options.retry.initial_backoff, Duration::from_millis(50));
/// assert_eq!(options.retry.max_backoff, Duration::from_secs(2));
/// assert!(RetryPolicy::default().is_none());
/// ```
///
/// Retried: `UNAVAILABLE` with `NO_LEADER`, `NOT_LEADER`, `LEADER_UNREACHABLE`, `NO_QUORUM` or
/// `SHUTTING_DOWN`; a lost connection (a failed connect, a transport error with no reason from
/// the broker); `RESOURCE_EXHAUSTED RATE_LIMITED`, not before its `retry_after_ms`. Never
/// retried: everything else (invalid messages, missing grants, schema refusals, loops, storage
/// full or failing, an open circuit, ...), and ephemeral messages, which are at most once.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// How long after the first attempt a new attempt may still start. `Duration::ZERO` (the
    /// default) means one attempt and no retry. An attempt already started is not cut short by
    /// it: its answer is awaited, so the deadline never leaves a message's fate unknown on our
    /// side when the broker would have answered.
    pub deadline: Duration,
    /// The delay before the first retry (before jitter). Default: 50 ms.
    pub initial_backoff: Duration,
    /// The longest delay between attempts (before jitter). Default: 2 s.
    pub max_backoff: Duration,
    /// At most this many attempts in all (the first included); `None` (the default): as many as
    /// the deadline allows.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::none()
    }
}

impl RetryPolicy {
    /// One attempt, no retry (the default).
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            deadline: Duration::ZERO,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            max_attempts: None,
        }
    }

    /// Retries for up to `deadline` after the first attempt, with backoff from 50 ms doubling to
    /// 2 s, full jitter.
    pub fn within(deadline: Duration) -> RetryPolicy {
        RetryPolicy {
            deadline,
            ..RetryPolicy::none()
        }
    }

    /// Sets [`RetryPolicy::initial_backoff`] and [`RetryPolicy::max_backoff`].
    pub fn backoff(mut self, initial: Duration, max: Duration) -> RetryPolicy {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Sets [`RetryPolicy::max_attempts`] (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> RetryPolicy {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// Whether this policy never retries.
    pub fn is_none(&self) -> bool {
        self.deadline.is_zero() || self.max_attempts == Some(1)
    }

    /// The backoff between attempts: this policy's bounds, full jitter.
    pub(crate) fn backoff_schedule(&self) -> Backoff {
        Backoff::new(self.initial_backoff, self.max_backoff).jitter(Jitter::Full)
    }
}

/// Whether a publish that failed with `error` is worth another attempt, and the least wait before
/// it: `None` for no retry, `Some(Duration::ZERO)` for "after the usual backoff",
/// `Some(wait)` for a broker that said when (`RATE_LIMITED`'s `retry_after_ms`).
///
/// This is the one table of retryable publish failures; see [`RetryPolicy`] for the list and
/// `docs/CLIENT-RESILIENCE.md` for why.
pub(crate) fn retry_after(error: &Error) -> Option<Duration> {
    match error {
        Error::Connect { .. } => Some(Duration::ZERO),
        Error::Status { code, reason, .. } => match (code, reason.as_deref()) {
            (Code::Unavailable, Some(_)) => matches!(
                error.reason(),
                Some(
                    Reason::NoLeader
                        | Reason::NotLeader
                        | Reason::LeaderUnreachable
                        | Reason::NoQuorum
                        | Reason::ShuttingDown
                )
            )
            .then_some(Duration::ZERO),
            (Code::ResourceExhausted, Some(_)) if error.reason() == Some(Reason::RateLimited) => {
                Some(rate_limit_wait(error))
            }
            // No reason: not the broker's answer but the transport's (connection refused or
            // reset, the HTTP/2 stream broken).
            (
                Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::Internal
                | Code::DeadlineExceeded,
                None,
            ) => Some(Duration::ZERO),
            _ => None,
        },
        // A refusal inside a publish stream: the same table as a status.
        Error::Refused(refusal) => retry_after(&Error::Status {
            code: Code::from_i32(refusal.code),
            reason: Some(refusal.reason.clone()).filter(|reason| !reason.is_empty()),
            message: String::new(),
            metadata: refusal
                .metadata
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        }),
        Error::InvalidArgument(_)
        | Error::Closed
        | Error::CircuitOpen { .. }
        | Error::OutboxFull { .. }
        | Error::OutboxStorage { .. }
        | Error::NoReply { .. } => None,
    }
}

/// How long to wait before attempt `attempts + 1`, after attempt `attempts` (the first started at
/// `started`) failed with `error`; `None` when the policy says to give up: it never retries, the
/// failure is not retryable, the attempts are spent, or the deadline leaves no room (or less than
/// the wait the broker asked for). The wait is the backoff's draw, at least the broker's
/// `retry_after`, at most what is left of the deadline (so the last attempt starts on it).
pub(crate) fn next_wait(
    policy: &RetryPolicy,
    backoff: &mut Backoff,
    attempts: u32,
    started: Instant,
    error: &Error,
) -> Option<Duration> {
    if policy.is_none() {
        return None;
    }
    let least = retry_after(error)?;
    if policy.max_attempts.is_some_and(|max| attempts >= max) {
        return None;
    }
    let remaining = policy.deadline.checked_sub(started.elapsed())?;
    if remaining.is_zero() || least > remaining {
        return None;
    }
    Some(backoff.next_delay().max(least).min(remaining))
}

/// `RATE_LIMITED`'s `retry_after_ms`, or 1 s when it is missing or not a number.
fn rate_limit_wait(error: &Error) -> Duration {
    error
        .metadata("retry_after_ms")
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis)
}

/// Whether this failure says the endpoint itself is unhealthy (what a circuit breaker counts):
/// a retryable failure other than a rate limit, which is the broker alive and answering.
pub(crate) fn is_endpoint_failure(error: &Error) -> bool {
    retry_after(error).is_some()
        && !(error.code() == Code::ResourceExhausted && error.reason() == Some(Reason::RateLimited))
}

/// A fresh idempotency key: a random (version 4) UUID.
pub(crate) fn new_idempotency_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use switchboard_proto::v1::Refusal;
    use tonic_types::{ErrorDetails, StatusExt};

    fn refusal(code: Code, reason: &str, metadata: &[(&str, &str)]) -> Error {
        let metadata: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Error::from(tonic::Status::with_error_details(
            code,
            "x",
            ErrorDetails::with_error_info(reason, switchboard_proto::ERROR_DOMAIN, metadata),
        ))
    }

    #[test]
    fn only_failures_of_availability_are_retried() {
        for reason in [
            "NO_LEADER",
            "NOT_LEADER",
            "LEADER_UNREACHABLE",
            "NO_QUORUM",
            "SHUTTING_DOWN",
        ] {
            let error = refusal(Code::Unavailable, reason, &[]);
            assert_eq!(retry_after(&error), Some(Duration::ZERO), "{reason}");
            assert!(is_endpoint_failure(&error), "{reason}");
        }
        // The transport's failures carry no reason.
        for code in [Code::Unavailable, Code::Unknown, Code::Cancelled] {
            let error = Error::from(tonic::Status::new(code, "connection reset"));
            assert_eq!(retry_after(&error), Some(Duration::ZERO), "{code:?}");
        }
        let connect = Error::Connect {
            url: "http://b:1".to_owned(),
            message: "refused".to_owned(),
        };
        assert_eq!(retry_after(&connect), Some(Duration::ZERO));

        for (code, reason) in [
            (Code::InvalidArgument, "CHANNEL_INVALID"),
            (Code::InvalidArgument, "SCHEMA_MISMATCH"),
            (Code::PermissionDenied, "PUBLISH_DENIED"),
            (Code::Unauthenticated, "TOKEN_EXPIRED"),
            (Code::FailedPrecondition, "LOOP_DETECTED"),
            (Code::ResourceExhausted, "STORAGE_FULL"),
            (Code::Internal, "STORAGE_FAILURE"),
            // An availability reason this client does not know is not guessed at.
            (Code::Unavailable, "SOMETHING_NEWER"),
        ] {
            let error = refusal(code, reason, &[]);
            assert_eq!(retry_after(&error), None, "{reason}");
            assert!(!is_endpoint_failure(&error), "{reason}");
        }
        for error in [
            Error::InvalidArgument("x".to_owned()),
            Error::Closed,
            Error::from(tonic::Status::invalid_argument("too large")),
            Error::from(tonic::Status::out_of_range("too large")),
        ] {
            assert_eq!(retry_after(&error), None, "{error}");
        }
    }

    #[test]
    fn a_rate_limit_is_retried_after_the_wait_it_names() {
        let limited = refusal(
            Code::ResourceExhausted,
            "RATE_LIMITED",
            &[("retry_after_ms", "250")],
        );
        assert_eq!(retry_after(&limited), Some(Duration::from_millis(250)));
        // The broker is alive: a rate limit is no failure of the endpoint.
        assert!(!is_endpoint_failure(&limited));
        let unnamed = refusal(Code::ResourceExhausted, "RATE_LIMITED", &[]);
        assert_eq!(retry_after(&unnamed), Some(Duration::from_secs(1)));
    }

    #[test]
    fn stream_refusals_sort_like_statuses() {
        let refused = |code: Code, reason: &str| {
            Error::Refused(Refusal {
                code: code as i32,
                reason: reason.to_owned(),
                message: String::new(),
                metadata: Default::default(),
            })
        };
        assert_eq!(
            retry_after(&refused(Code::Unavailable, "NO_QUORUM")),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&refused(Code::InvalidArgument, "CHANNEL_INVALID")),
            None
        );
    }

    #[test]
    fn the_wait_respects_the_policy_the_deadline_and_the_broker() {
        let down = Error::from(tonic::Status::unavailable("connection refused"));
        let invalid = Error::from(tonic::Status::invalid_argument("bad"));
        let policy = RetryPolicy::within(Duration::from_secs(10))
            .backoff(Duration::from_millis(100), Duration::from_secs(1));
        let now = Instant::now();
        let mut backoff = policy.backoff_schedule();
        let wait = next_wait(&policy, &mut backoff, 1, now, &down).unwrap();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(next_wait(&policy, &mut backoff, 1, now, &invalid), None);
        assert_eq!(
            next_wait(&RetryPolicy::none(), &mut backoff, 1, now, &down),
            None
        );
        let three = policy.clone().max_attempts(3);
        assert!(next_wait(&three, &mut backoff, 2, now, &down).is_some());
        assert_eq!(next_wait(&three, &mut backoff, 3, now, &down), None);
        // A first attempt that started longer ago than the deadline: no more.
        if let Some(long_ago) = now.checked_sub(Duration::from_secs(11)) {
            assert_eq!(next_wait(&policy, &mut backoff, 1, long_ago, &down), None);
        }
        // The broker's wait is honoured, unless it is beyond the deadline.
        let limited = refusal(
            Code::ResourceExhausted,
            "RATE_LIMITED",
            &[("retry_after_ms", "3000")],
        );
        let wait = next_wait(&policy, &mut backoff, 1, now, &limited).unwrap();
        assert!(wait >= Duration::from_secs(3), "{wait:?}");
        let short = RetryPolicy::within(Duration::from_secs(1));
        assert_eq!(next_wait(&short, &mut backoff, 1, now, &limited), None);
    }

    #[test]
    fn policies() {
        assert!(RetryPolicy::default().is_none());
        assert!(RetryPolicy::within(Duration::from_secs(1))
            .max_attempts(1)
            .is_none());
        let policy = RetryPolicy::within(Duration::from_secs(1))
            .backoff(Duration::from_millis(10), Duration::from_millis(80));
        assert!(!policy.is_none());
        let mut schedule = policy.backoff_schedule();
        assert_eq!(schedule.next_base(), Duration::from_millis(10));
        let keys: std::collections::HashSet<String> =
            (0..100).map(|_| new_idempotency_key()).collect();
        assert_eq!(keys.len(), 100);
        assert!(keys.iter().all(|key| key.len() == 36));
    }
}
