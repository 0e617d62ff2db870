//! TTL and retention: what a sweep removes, and whether one is due.
//!
//! A message's TTL runs from its publish time (the leader's stamp):
//! [`StoredMessage::expires_at_us`] is the one rule, and every reader checks it — History and
//! catch-up reads ([`super::store::MessageStore::read`]), live deliveries and redeliveries
//! ([`crate::fanout::subscription`]) — so an expired message is never delivered or returned, even
//! before it is removed. The store keeps an expiry index (`x` records) so a sweep visits only
//! batches with something to remove. The leader proposes a sweep (a [`crate::message::Command::Sweep`]
//! stamped with its clock and carrying the limits) when [`sweep_due`] says so
//! ([`crate::write::sweeper`]); apply then runs [`sweep`] on every replica alike. The largest TTL
//! a publish may ask for is checked at the edge (`limits.max_ttl`).

use std::time::Duration;

use super::position::Position;
use super::store::{MessageStore, WriteBatch};
use crate::config::Retention;
use crate::error::BrokerError;
use crate::message::{Command, Rules, StoredMessage};

/// Most batches one sweep visits, so a sweep never stalls apply for long; the next sweep goes on.
pub(crate) const SWEEP_BATCH_LIMIT: usize = 512;

/// Removes expired messages, then whole batches past the age limit, then the oldest batches while
/// the store is over its byte limit. Visits at most [`SWEEP_BATCH_LIMIT`] batches.
pub(crate) fn sweep(
    store: &MessageStore,
    meta: &mut Position,
    now_us: u64,
    max_age_us: u64,
    max_bytes: u64,
    batch: &mut WriteBatch,
) -> Result<u64, BrokerError> {
    let mut removed = 0u64;
    let mut bytes = meta.stored_bytes;
    let mut visited = std::collections::HashSet::new();

    // Age: every message of a batch shares one publish time, so whole batches go.
    for key in
        store.batch_keys_published_before(now_us.saturating_sub(max_age_us), SWEEP_BATCH_LIMIT)?
    {
        if let Some(old) = store.batch(key)? {
            MessageStore::delete_batch(batch, &old);
            removed += old.messages.len() as u64;
            bytes = bytes.saturating_sub(old.encoded_len as u64);
            visited.insert(key);
        }
    }

    // TTL: drop the expired messages of each batch the expiry index points at; rewrite the rest.
    let budget = SWEEP_BATCH_LIMIT.saturating_sub(visited.len());
    for key in store.expired_batch_keys(now_us, budget)? {
        if visited.contains(&key) {
            continue;
        }
        let Some(old) = store.batch(key)? else {
            continue;
        };
        visited.insert(key);
        let keep: Vec<StoredMessage> = old
            .messages
            .iter()
            .filter(|m| !m.is_expired(now_us))
            .cloned()
            .collect();
        removed += (old.messages.len() - keep.len()) as u64;
        bytes = bytes.saturating_sub(old.encoded_len as u64);
        MessageStore::delete_batch(batch, &old);
        if !keep.is_empty() {
            bytes += store.put_batch(batch, key, &keep)? as u64;
        }
    }

    // Bytes: oldest first. Batches already handled above are skipped (their size is counted).
    if bytes > max_bytes {
        for item in store.batches_from(0) {
            if bytes <= max_bytes || visited.len() >= SWEEP_BATCH_LIMIT {
                break;
            }
            let old = item?;
            if !visited.insert(old.key) {
                continue;
            }
            MessageStore::delete_batch(batch, &old);
            removed += old.messages.len() as u64;
            bytes = bytes.saturating_sub(old.encoded_len as u64);
        }
    }

    meta.stored_bytes = bytes;
    Ok(removed)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Whether a sweep at `now_us` would remove anything: the store is over its byte limit, or holds a
/// dedup record past its window, an expired message or a batch past the age limit.
///
/// # Errors
/// The embedded store's error.
pub(crate) fn sweep_due(
    store: &MessageStore,
    stored_bytes: u64,
    settings: &Retention,
    rules: &Rules,
    now_us: u64,
) -> Result<bool, BrokerError> {
    Ok(stored_bytes > settings.max_bytes
        || super::dedup::any_to_forget(store, now_us, rules.dedup_window_us)?
        || !store.expired_batch_keys(now_us, 1)?.is_empty()
        || !store
            .batch_keys_published_before(now_us.saturating_sub(micros(settings.max_age)), 1)?
            .is_empty())
}

/// The sweep the leader proposes at `now_us` (its clock), with the limits in force.
pub(crate) fn sweep_command(settings: &Retention, rules: &Rules, now_us: u64) -> Command {
    Command::Sweep {
        now_us,
        max_age_us: micros(settings.max_age),
        max_bytes: settings.max_bytes,
        dedup_window_us: rules.dedup_window_us,
    }
}
