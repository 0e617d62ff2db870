//! Where the state is: the next offset, the latest publish time and the totals — the small,
//! always-in-memory part of the state, saved in the store's meta record (`m`) together with raft's
//! [`Bookkeeping`] of which entry it reflects.
//!
//! The record is the checksummed bincode of the pair (bookkeeping, position): bincode writes a
//! pair as its two halves one after the other, so the record reads the same as before the two
//! were split apart.

use serde::{Deserialize, Serialize};

use super::store::{MessageStore, WriteBatch};
use crate::error::BrokerError;
use crate::raft::state_machine::Bookkeeping;

/// The domain position after the last applied entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Position {
    /// The offset the next published message gets (offsets start at 1).
    pub next_offset: u64,
    /// The latest publish time given, µs since the epoch.
    pub last_publish_time_us: u64,
    /// Encoded bytes of all stored batches.
    pub stored_bytes: u64,
    /// Publishes refused as loops so far.
    pub loops_detected: u64,
}

impl Default for Position {
    /// The position of an empty store.
    fn default() -> Self {
        Position {
            next_offset: 1,
            last_publish_time_us: 0,
            stored_bytes: 0,
            loops_detected: 0,
        }
    }
}

impl Position {
    /// The highest offset given so far (0 when none).
    pub(crate) fn last_offset(&self) -> u64 {
        self.next_offset.saturating_sub(1)
    }

    /// Adds the write of the meta record — this position and `bookkeeping` — to `batch`.
    ///
    /// # Errors
    /// Only if encoding fails.
    pub(crate) fn write(
        &self,
        bookkeeping: &Bookkeeping,
        batch: &mut WriteBatch,
    ) -> Result<(), BrokerError> {
        let bytes = crate::checksum::encode(&(bookkeeping, self))
            .map_err(|e| BrokerError::Storage(format!("cannot encode state meta: {e}")))?;
        MessageStore::put_meta(batch, &bytes);
        Ok(())
    }
}

/// Reads the meta record, or the initial state for an empty store.
///
/// # Errors
/// The embedded store's error, or a damaged record.
pub(crate) fn load(store: &MessageStore) -> Result<(Bookkeeping, Position), BrokerError> {
    match store.meta()? {
        Some(bytes) => decode(&bytes),
        None => Ok((Bookkeeping::default(), Position::default())),
    }
}

/// Decodes a meta record's bytes.
///
/// # Errors
/// A damaged record.
pub(crate) fn decode(bytes: &[u8]) -> Result<(Bookkeeping, Position), BrokerError> {
    crate::checksum::decode(bytes).map_err(|e| BrokerError::Corrupt(format!("state meta: {e}")))
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId};

    use super::*;

    /// The meta record as it was written before raft's bookkeeping and the position were split.
    #[derive(Serialize)]
    struct FlatMeta {
        last_applied: Option<LogId<u64>>,
        membership: openraft::StoredMembership<u64, crate::raft::Member>,
        next_offset: u64,
        last_publish_time_us: u64,
        stored_bytes: u64,
        loops_detected: u64,
    }

    #[test]
    fn a_record_written_before_the_split_reads_the_same() {
        let last_applied = Some(LogId::new(CommittedLeaderId::new(3, 1), 42));
        let old = crate::checksum::encode(&FlatMeta {
            last_applied,
            membership: Default::default(),
            next_offset: 7,
            last_publish_time_us: 1_000,
            stored_bytes: 512,
            loops_detected: 2,
        })
        .unwrap();
        let (bookkeeping, position): (Bookkeeping, Position) =
            crate::checksum::decode(&old).unwrap();
        assert_eq!(bookkeeping.last_applied, last_applied);
        assert_eq!(
            position,
            Position {
                next_offset: 7,
                last_publish_time_us: 1_000,
                stored_bytes: 512,
                loops_detected: 2,
            }
        );
        let mut batch = WriteBatch::default();
        position.write(&bookkeeping, &mut batch).unwrap();
        assert_eq!(
            crate::checksum::encode(&(&bookkeeping, &position)).unwrap(),
            old,
            "written back byte for byte"
        );
    }
}
