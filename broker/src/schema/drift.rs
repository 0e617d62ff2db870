//! Drift: messages that do not match their channel's schema, refused or only warned.
//!
//! Each is counted at once in `switchboard_schema_drift_total`, and announced on
//! [`DRIFT_CHANNEL`] as a stored message operators can subscribe to and alert on. Announcements
//! are rate-limited per node (`schemas.drift_events_per_second`): a burst of bad messages must not
//! become a burst of writes. Those not announced are counted and summed into the next
//! announcement (`suppressed`), so nothing is lost from the count, only from the detail.
//!
//! The announcement is queued (bounded) to a task that proposes it: the publish being checked
//! never waits for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Mismatch;
use crate::error::BrokerError;
use crate::message::{Item, NewMessage, SchemaPolicy};
use crate::observability::metrics;
use crate::shutdown::ShutdownSignal;
use crate::write::proposer::{self, Proposer};

/// The reserved channel drift is announced on.
pub(crate) const DRIFT_CHANNEL: &str = "$sys.schema.drift";

/// Announcements waiting for the task; more are counted as suppressed.
const QUEUE: usize = 64;

/// Hands drift to the metric and to the announcing task; cheap to clone.
#[derive(Clone)]
pub(crate) struct DriftReporter {
    queue: mpsc::Sender<Mismatch>,
    /// Drift not announced since the last announcement (queue full or over the rate).
    suppressed: Arc<AtomicU64>,
}

impl DriftReporter {
    /// Starts the announcing task: at most `per_second` announcements a second, proposed through
    /// `proposer`, from node `node_id`, until `shutdown`.
    pub(crate) fn start(
        proposer: Proposer,
        node_id: u64,
        per_second: u32,
        shutdown: ShutdownSignal,
    ) -> DriftReporter {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let suppressed = Arc::new(AtomicU64::new(0));
        tokio::spawn(announce(
            receiver,
            proposer,
            node_id,
            per_second,
            Arc::clone(&suppressed),
            shutdown,
        ));
        DriftReporter { queue, suppressed }
    }

    /// Reports the drift a schema check found, if any, and passes its verdict on: `Ok` when
    /// the write may go on (it matched, or it was only warned), the refusal otherwise.
    ///
    /// # Errors
    /// The check's error: a [`BrokerError::Schema`] refusal (reported), or a store error.
    pub(crate) fn account(
        &self,
        verdict: Result<Option<Mismatch>, BrokerError>,
    ) -> Result<(), BrokerError> {
        match verdict {
            Ok(None) => Ok(()),
            Ok(Some(warned)) => {
                self.report(warned);
                Ok(())
            }
            Err(error) => {
                if let BrokerError::Schema(mismatch) = &error {
                    self.report((**mismatch).clone());
                }
                Err(error)
            }
        }
    }

    /// Counts `mismatch` and queues its announcement.
    fn report(&self, mismatch: Mismatch) {
        metrics::schema_drift(
            &mismatch.pattern,
            mismatch.schema_version(),
            mismatch.keyword(),
            outcome(mismatch.policy),
        );
        if self.queue.try_send(mismatch).is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The announcing task.
async fn announce(
    mut receiver: mpsc::Receiver<Mismatch>,
    proposer: Proposer,
    node_id: u64,
    per_second: u32,
    suppressed: Arc<AtomicU64>,
    mut shutdown: ShutdownSignal,
) {
    let mut window = Window::new(per_second);
    loop {
        let mismatch = tokio::select! {
            next = receiver.recv() => match next {
                Some(mismatch) => mismatch,
                None => return,
            },
            () = shutdown.wait() => return,
        };
        if !window.admit(Instant::now()) {
            suppressed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let before = suppressed.swap(0, Ordering::Relaxed);
        let event = event(&mismatch, node_id, before);
        let message = NewMessage::system(DRIFT_CHANNEL.to_owned(), event.to_string());
        let result = match proposer.submit(vec![Item::Publish(message)]).await {
            Ok(pending) => proposer::outcome(pending).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            // The metric has it; the detail is lost, and the next event says how many were.
            suppressed.fetch_add(1 + before, Ordering::Relaxed);
            tracing::debug!(error = %e, "a schema drift event could not be published");
        }
    }
}

/// The announcement of `mismatch`, as JSON.
fn event(mismatch: &Mismatch, node_id: u64, suppressed: u64) -> serde_json::Value {
    serde_json::json!({
        "channel": mismatch.channel,
        "pattern": mismatch.pattern,
        "schema_version": mismatch.schema_version(),
        "message_schema_version": mismatch.message_version,
        "policy": mismatch.policy.as_str(),
        "outcome": outcome(mismatch.policy),
        "reason": mismatch.reason().as_str(),
        "failures": mismatch.failures(),
        "node_id": node_id,
        "suppressed_before": suppressed,
    })
}

/// What became of a message that did not match under `policy`: `refused` or `warned`.
fn outcome(policy: SchemaPolicy) -> &'static str {
    match policy {
        SchemaPolicy::Enforce => "refused",
        SchemaPolicy::Warn | SchemaPolicy::Off => "warned",
    }
}

/// At most `limit` admissions in any one-second window (a fixed window, restarted at the first
/// admission after it ends).
struct Window {
    limit: u32,
    started: Option<Instant>,
    admitted: u32,
}

impl Window {
    fn new(limit: u32) -> Window {
        Window {
            limit,
            started: None,
            admitted: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> bool {
        let expired = self
            .started
            .is_none_or(|started| now.duration_since(started) >= Duration::from_secs(1));
        if expired {
            self.started = Some(now);
            self.admitted = 0;
        }
        if self.admitted < self.limit {
            self.admitted += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_admits_its_limit_per_second() {
        let start = Instant::now();
        let mut window = Window::new(3);
        let admitted = (0..10).filter(|_| window.admit(start)).count();
        assert_eq!(admitted, 3);
        assert!(!window.admit(start + Duration::from_millis(999)));
        assert!(window.admit(start + Duration::from_secs(1)));
        let mut closed = Window::new(0);
        assert!(!closed.admit(start));
    }
}
