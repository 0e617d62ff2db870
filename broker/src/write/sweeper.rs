//! TTL and retention: the sweeper.
//!
//! Expired messages are never delivered or returned (readers check the expiry time), and they are
//! removed from disk by a sweep. The sweep is a [`Command::Sweep`] in the replicated log, stamped
//! with the leader's clock and carrying the retention limits, so every replica removes exactly
//! the same messages. The leader proposes one every `retention.sweep_interval`, but only when the
//! store's indexes show something to remove — an idle broker writes nothing.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::Retention;
use crate::message::{now_us, Command, CommandOutcome, Rules};
use crate::observability::metrics;
use crate::raft::Raft;
use crate::shutdown::ShutdownSignal;
use crate::state::store::MessageStore;
use crate::state::AppliedProgress;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Whether a sweep at `now_us` would remove anything.
fn sweep_due(
    store: &MessageStore,
    progress: &AppliedProgress,
    settings: &Retention,
    rules: &Rules,
    now_us: u64,
) -> Result<bool, crate::error::BrokerError> {
    Ok(progress.stored_bytes > settings.max_bytes
        || store.has_dedup_before(now_us.saturating_sub(rules.dedup_window_us))?
        || !store.expired_batch_keys(now_us, 1)?.is_empty()
        || !store
            .batch_keys_published_before(now_us.saturating_sub(micros(settings.max_age)), 1)?
            .is_empty())
}

/// Runs the sweeper until shutdown.
pub async fn run(
    raft: Raft,
    node_id: u64,
    store: MessageStore,
    progress: watch::Receiver<AppliedProgress>,
    settings: Retention,
    rules: Rules,
    mut shutdown: ShutdownSignal,
) {
    let mut tick = tokio::time::interval(settings.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        if raft.metrics().borrow().current_leader != Some(node_id) {
            continue;
        }
        let now = now_us();
        let due = sweep_due(&store, &progress.borrow(), &settings, &rules, now);
        match due {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot check what to sweep");
                continue;
            }
        }
        let command = Command::Sweep {
            now_us: now,
            max_age_us: micros(settings.max_age),
            max_bytes: settings.max_bytes,
            dedup_window_us: rules.dedup_window_us,
        };
        match raft.client_write(command).await {
            Ok(response) => {
                if let CommandOutcome::Swept { removed } = response.data {
                    metrics::sweep(removed);
                }
                tracing::debug!(outcome = ?response.data, "swept");
            }
            Err(e) => tracing::warn!(error = %e, "sweep not committed; retrying next interval"),
        }
    }
}
