//! The sweeper: the leader's timer for TTL and retention sweeps.
//!
//! The leader proposes a sweep every `retention.sweep_interval`, but only when the store's indexes
//! show something to remove ([`ttl::sweep_due`]) — an idle broker writes nothing. What a sweep
//! removes, and why every replica removes the same, is [`crate::state::ttl`]'s.

use tokio::sync::watch;

use crate::config::Retention;
use crate::message::{now_us, CommandOutcome, Rules};
use crate::observability::metrics;
use crate::raft::Raft;
use crate::shutdown::ShutdownSignal;
use crate::state::store::MessageStore;
use crate::state::{ttl, AppliedProgress};

/// Runs the sweeper until shutdown.
pub(crate) async fn run(
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
        let stored_bytes = progress.borrow().stored_bytes;
        let due = ttl::sweep_due(&store, stored_bytes, &settings, &rules, now);
        match due {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot check what to sweep");
                continue;
            }
        }
        match raft
            .client_write(ttl::sweep_command(&settings, &rules, now))
            .await
        {
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
