//! Idempotent retries: a publish with an idempotency key that a stored message on the same channel
//! already used, within the dedup window, is answered with that original (`duplicate`, its offset
//! and publish time) and stores nothing. Decided at apply from the log alone, so every replica
//! and every replay answers alike.
//!
//! The records themselves are the store's `i` (channel + key → original) and `k` (publish time →
//! `i` key) records; sweeps forget those past the window ([`forget`]).

use std::collections::HashMap;

use super::store::{MessageStore, WriteBatch};
use crate::error::BrokerError;
use crate::message::{NewMessage, Rules};

/// Most dedup records one sweep forgets, so a sweep never stalls apply for long.
const FORGET_LIMIT: usize = super::ttl::SWEEP_BATCH_LIMIT;

/// What an idempotency key names: the stored message a retry is answered with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DedupRecord {
    /// The original's offset.
    pub offset: u64,
    /// The original's publish time, µs.
    pub publish_time_us: u64,
    /// The original's correlation id, so a retry's ack names the same conversation.
    pub correlation_id: String,
}

/// A message's idempotency key on its channel, with what its record will say.
pub(crate) struct Key {
    channel: String,
    key: String,
    correlation_id: String,
}

impl Key {
    /// The key `message` carries, if any.
    pub(crate) fn of(message: &NewMessage) -> Option<Key> {
        (!message.idempotency_key.is_empty()).then(|| Key {
            channel: message.channel.clone(),
            key: message.idempotency_key.clone(),
            correlation_id: message.correlation_id.clone(),
        })
    }
}

/// The keys one batch recorded: its writes are not readable from the store until it is applied,
/// and a retry may come in the same batch.
#[derive(Default)]
pub(crate) struct Recorded(HashMap<(String, String), DedupRecord>);

impl Recorded {
    /// The original a retry of `message` at `now_us` is answered with: recorded by this batch or
    /// stored, and within the dedup window.
    ///
    /// # Errors
    /// The embedded store's error, or a damaged record.
    pub(crate) fn original(
        &self,
        store: &MessageStore,
        message: &NewMessage,
        now_us: u64,
        rules: &Rules,
    ) -> Result<Option<DedupRecord>, BrokerError> {
        if message.idempotency_key.is_empty() {
            return Ok(None);
        }
        let key = (message.channel.clone(), message.idempotency_key.clone());
        let seen = match self.0.get(&key) {
            Some(seen) => Some(seen.clone()),
            None => store.dedup(&key.0, &key.1)?,
        };
        Ok(seen.filter(|original| {
            now_us.saturating_sub(original.publish_time_us) < rules.dedup_window_us
        }))
    }

    /// Records that `key` names the message stored at `offset` at `publish_time_us`.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub(crate) fn record(
        &mut self,
        batch: &mut WriteBatch,
        key: Key,
        offset: u64,
        publish_time_us: u64,
    ) -> Result<(), BrokerError> {
        let record = DedupRecord {
            offset,
            publish_time_us,
            correlation_id: key.correlation_id,
        };
        MessageStore::put_dedup(batch, &key.channel, &key.key, &record)?;
        self.0.insert((key.channel, key.key), record);
        Ok(())
    }
}

/// Adds the writes that forget the records older than the dedup window at `now_us` (at most
/// `FORGET_LIMIT`); a key reused since keeps its newer record.
///
/// # Errors
/// The embedded store's error, or a damaged record.
pub(crate) fn forget(
    store: &MessageStore,
    batch: &mut WriteBatch,
    now_us: u64,
    window_us: u64,
) -> Result<usize, BrokerError> {
    store.forget_dedup_before(batch, now_us.saturating_sub(window_us), FORGET_LIMIT)
}

/// Whether a sweep at `now_us` has records to forget.
///
/// # Errors
/// The embedded store's error.
pub(crate) fn any_to_forget(
    store: &MessageStore,
    now_us: u64,
    window_us: u64,
) -> Result<bool, BrokerError> {
    store.has_dedup_before(now_us.saturating_sub(window_us))
}
